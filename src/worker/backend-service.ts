/**
 * A BlockBackend as the engine worker exposes it through comlink (one
 * comlink proxy per attached backend). Reads come back as transferred
 * buffers (no copy on the way out) or land straight in a SharedArrayBuffer
 * view the caller passed; writes take the caller's bytes as they arrive.
 * Calls may be pipelined: each is its own request on the backend, which
 * serialises what must be serialised.
 */
import { proxy, releaseProxy, transfer, type ProxyMarked } from 'comlink';
import type { BlockBackend, ErrorPolicy } from '../core/block-backend.ts';
import { BlockError } from '../core/errors.ts';
import { SabChannelServer } from './sab-server.ts';
import type { BackendEvent, BackendStats, ErrorPolicyState, TruncateOptions } from './types.ts';

/** A subscriber as the worker receives it (a comlink proxy of the page's function). */
type EventSink = ((ev: BackendEvent) => void) & { [releaseProxy]?: () => void };

const POLICIES: readonly ErrorPolicy[] = ['report', 'ignore', 'stop', 'enospc'];

function isSharedView(buf: unknown): buf is Uint8Array {
  return buf instanceof Uint8Array && typeof SharedArrayBuffer !== 'undefined' && buf.buffer instanceof SharedArrayBuffer;
}

/** The worker-side object behind a client's RemoteBlockBackend. */
export class BackendService {
  private closed = false;
  private readonly channels = new Set<SabChannelServer>();
  private readonly unsubscribers = new Set<() => void>();

  /** Serves `blk`; `onClose` lets the host forget it. */
  constructor(
    readonly blk: BlockBackend,
    private readonly onClose: (s: BackendService) => void,
  ) {}

  private live(): BlockBackend {
    if (this.closed) throw new BlockError('ENOMEDIUM', 'The backend was closed', { node: this.blk.name });
    return this.blk;
  }

  /** Reads `length` bytes at `offset` and transfers them to the caller. */
  async read(offset: number, length: number, flags = 0, signal?: AbortSignal): Promise<Uint8Array> {
    const buf = await this.live().read(offset, length, signal ? { flags, signal } : { flags });
    return transfer(buf, [buf.buffer]);
  }

  /** Reads into a view of a SharedArrayBuffer the caller shares with us (no copy at all); other buffers are refused. */
  async readInto(offset: number, view: Uint8Array, flags = 0, signal?: AbortSignal): Promise<void> {
    if (!isSharedView(view)) throw new BlockError('EINVAL', 'readInto() needs a view of a SharedArrayBuffer; use read() for ordinary buffers');
    await this.live().pread(offset, view, signal ? { flags, signal } : { flags });
  }

  /** Writes `data` at `offset`. */
  async pwrite(offset: number, data: Uint8Array, flags = 0, signal?: AbortSignal): Promise<void> {
    if (!(data instanceof Uint8Array)) throw new BlockError('EINVAL', 'pwrite() expects a Uint8Array');
    await this.live().pwrite(offset, data, signal ? { flags, signal } : { flags });
  }

  /** Zeroes a range (REQ.MAY_UNMAP lets it deallocate). */
  async pwriteZeroes(offset: number, bytes: number, flags = 0): Promise<void> {
    await this.live().pwriteZeroes(offset, bytes, { flags });
  }

  /** Discards a range. */
  async pdiscard(offset: number, bytes: number): Promise<void> {
    await this.live().pdiscard(offset, bytes);
  }

  /** Makes completed writes durable. */
  async flush(): Promise<void> {
    await this.live().flush();
  }

  /** Resizes the image. */
  async truncate(size: number, opts: TruncateOptions = {}): Promise<void> {
    await this.live().truncate(size, opts);
  }

  /** Length in bytes. */
  async getLength(): Promise<number> {
    return this.live().getLength();
  }

  /** QEMU's blockstats for this backend. */
  stats(): BackendStats {
    return this.blk.stats.query();
  }

  /** Sets the read and write error policies (QEMU's rerror/werror). */
  setErrorPolicy(rerror: ErrorPolicy, werror: ErrorPolicy): void {
    if (!POLICIES.includes(rerror) || !POLICIES.includes(werror)) {
      throw new BlockError('EINVAL', `Error policies are one of ${POLICIES.join(', ')} (got '${rerror}', '${werror}')`);
    }
    this.live().setOnError(rerror, werror);
  }

  /** The error policies, iostatus and whether requests are stopped. */
  errorPolicy(): ErrorPolicyState {
    const b = this.blk;
    return { rerror: b.readErrorPolicy, werror: b.writeErrorPolicy, iostatus: b.iostatus, stopped: b.stopped };
  }

  /** Retries the requests a 'stop' action paused (QEMU's `cont`). */
  resume(): void {
    this.live().resume();
  }

  /** Waits until every request on the backend has finished. */
  async drain(): Promise<void> {
    await this.live().drain();
  }

  /** Sends io-error, stop, resume and resize events to `sink` until close; returns nothing (one sink per call). */
  subscribe(sink: EventSink): void {
    const b = this.live();
    const send = (ev: BackendEvent): void => {
      try {
        const r: unknown = sink(ev);
        if (r instanceof Promise) r.catch(() => undefined);
      } catch {
        // A page that went away cannot be told.
      }
    };
    const offs = [
      b.on('io-error', (event) => send({ type: 'io-error', event })),
      b.on('stop', (event) => send({ type: 'stop', event })),
      b.on('resume', () => send({ type: 'resume' })),
      b.on('resize', ({ size }) => send({ type: 'resize', size })),
    ];
    this.unsubscribers.add(() => {
      for (const off of offs) off();
      try {
        sink[releaseProxy]?.();
      } catch {
        // Already released.
      }
    });
  }

  /**
   * Opens a SharedArrayBuffer channel over this backend for an emulator's
   * worker (see SabChannelClient) and returns its buffer; ENOTSUP without
   * cross-origin isolation.
   */
  openChannel(capacity?: number): SharedArrayBuffer {
    const server = new SabChannelServer(this.live(), capacity);
    this.channels.add(server);
    return server.sab;
  }

  /** Detaches the backend from its node (flushing first) and stops its channels. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    for (const ch of this.channels) await ch.close();
    this.channels.clear();
    for (const u of this.unsubscribers) u();
    this.unsubscribers.clear();
    try {
      // A stopped backend would park the flush until resume(); its writes were reported already.
      if (this.blk.isAvailable() && !this.blk.isReadOnly() && !this.blk.stopped) await this.blk.flush().catch(() => undefined);
      await this.blk.close();
    } finally {
      this.onClose(this);
    }
  }
}

/** Wraps a service for comlink so the client gets a proxy rather than a copy. */
export function proxied(s: BackendService): BackendService & ProxyMarked {
  return proxy(s);
}
