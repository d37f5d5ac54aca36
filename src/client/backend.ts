/**
 * RemoteBlockBackend: the engine's BlockBackend API on the page, over the
 * comlink proxy the worker returned from attach(). Reads arrive as buffers
 * the worker transferred (no copy on the wire); a view of a
 * SharedArrayBuffer is filled in place by the worker. Writes are cloned by
 * default (only the viewed bytes, never a whole larger buffer) or
 * transferred when the caller gives up the buffer with `transfer: true`.
 * Calls may be issued without awaiting the previous ones: they pipeline.
 */
import { proxy, releaseProxy, transfer, type Remote } from 'comlink';
import type { ErrorPolicy } from '../core/block-backend.ts';
import { BlockError } from '../core/errors.ts';
import type { BackendService } from '../worker/backend-service.ts';
import { sabUnavailableReason } from './sab-layout.ts';
import type { BackendEvent, BackendStats, ErrorPolicyState, TruncateOptions } from '../worker/types.ts';

/** Per-request options on the page side. */
export interface RemoteRequestOptions {
  /** REQ.* flags. */
  flags?: number;
  signal?: AbortSignal;
}

/** Options for writes. */
export interface RemoteWriteOptions extends RemoteRequestOptions {
  /** Hand the buffer to the worker instead of copying it; the caller's buffer is detached afterwards. */
  transfer?: boolean;
}

/** What a v86 adapter or any other consumer needs of a backend: the async byte API. */
export interface DiskBackend {
  read(offset: number, length: number): Promise<Uint8Array>;
  pwrite(offset: number, data: Uint8Array): Promise<void>;
  flush(): Promise<void>;
  getLength(): Promise<number>;
}

function isShared(buf: Uint8Array): boolean {
  return typeof SharedArrayBuffer !== 'undefined' && buf.buffer instanceof SharedArrayBuffer;
}

/** Whether `buf` views all of its ArrayBuffer (so cloning or transferring it moves no extra bytes). */
function wholeBuffer(buf: Uint8Array): boolean {
  return buf.byteOffset === 0 && buf.byteLength === buf.buffer.byteLength;
}

/** A BlockBackend living in the engine worker, driven from this thread. */
export class RemoteBlockBackend implements DiskBackend {
  private closed = false;

  /** Wraps the proxy returned by the engine's attach(). */
  constructor(readonly remote: Remote<BackendService>) {}

  /** Reads buf.length bytes at offset into buf (QEMU's blk_co_preadv); a SharedArrayBuffer view is filled by the worker directly. */
  async pread(offset: number, buf: Uint8Array, opts: RemoteRequestOptions = {}): Promise<void> {
    if (isShared(buf)) {
      await this.remote.readInto(offset, buf, opts.flags ?? 0, opts.signal);
      return;
    }
    buf.set(await this.read(offset, buf.length, opts));
  }

  /** Reads `length` bytes at offset into a new buffer transferred from the worker. */
  read(offset: number, length: number, opts: RemoteRequestOptions = {}): Promise<Uint8Array> {
    return this.remote.read(offset, length, opts.flags ?? 0, opts.signal);
  }

  /** Writes buf at offset (QEMU's blk_co_pwritev); see RemoteWriteOptions.transfer. */
  async pwrite(offset: number, buf: Uint8Array, opts: RemoteWriteOptions = {}): Promise<void> {
    let data = buf;
    if (!isShared(buf)) {
      // Structured clone copies the whole underlying ArrayBuffer, so cut a view down to its bytes first.
      if (!wholeBuffer(buf)) data = buf.slice();
      if (opts.transfer || data !== buf) data = transfer(data, [data.buffer as ArrayBuffer]);
    }
    await this.remote.pwrite(offset, data, opts.flags ?? 0, opts.signal);
  }

  /** Zeroes a range; REQ.MAY_UNMAP allows deallocation (QEMU's blk_co_pwrite_zeroes). */
  async pwriteZeroes(offset: number, bytes: number, opts: { flags?: number } = {}): Promise<void> {
    await this.remote.pwriteZeroes(offset, bytes, opts.flags ?? 0);
  }

  /** Discards a range (advisory). */
  async pdiscard(offset: number, bytes: number): Promise<void> {
    await this.remote.pdiscard(offset, bytes);
  }

  /** Makes all completed writes durable. */
  async flush(): Promise<void> {
    await this.remote.flush();
  }

  /** Resizes the image. */
  async truncate(size: number, opts: TruncateOptions = {}): Promise<void> {
    await this.remote.truncate(size, opts);
  }

  /** Length of the image in bytes. */
  getLength(): Promise<number> {
    return this.remote.getLength();
  }

  /** QEMU's blockstats for the backend. */
  stats(): Promise<BackendStats> {
    return this.remote.stats();
  }

  /** Sets the read and write error policies ('report', 'ignore', 'stop', 'enospc'). */
  async setErrorPolicy(rerror: ErrorPolicy, werror: ErrorPolicy): Promise<void> {
    await this.remote.setErrorPolicy(rerror, werror);
  }

  /** The error policies, iostatus and whether requests are stopped. */
  errorPolicy(): Promise<ErrorPolicyState> {
    return this.remote.errorPolicy();
  }

  /** Retries the requests an error with action 'stop' paused. */
  async resume(): Promise<void> {
    await this.remote.resume();
  }

  /** Waits until every request on the backend has finished. */
  async drain(): Promise<void> {
    await this.remote.drain();
  }

  /** Calls `fn` for io-error, stop, resume and resize events until the backend closes. */
  async subscribe(fn: (ev: BackendEvent) => void): Promise<void> {
    await this.remote.subscribe(proxy(fn));
  }

  /**
   * A SharedArrayBuffer channel over this backend for an emulator's worker
   * (give the buffer to `new SabChannelClient(sab)` there); ENOTSUP with a
   * clear message when the page is not cross-origin isolated.
   */
  async openChannel(capacity?: number): Promise<SharedArrayBuffer> {
    if (typeof SharedArrayBuffer === 'undefined' || (globalThis as { crossOriginIsolated?: boolean }).crossOriginIsolated === false) {
      // Checked here too: without isolation the buffer could not even be posted to this page.
      throw new BlockError('ENOTSUP', sabUnavailableReason() ?? 'SharedArrayBuffer is not available');
    }
    return this.remote.openChannel(capacity);
  }

  /** Detaches the backend in the worker (flushing first) and releases the proxy. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    try {
      await this.remote.close();
    } finally {
      this.remote[releaseProxy]();
    }
  }
}
