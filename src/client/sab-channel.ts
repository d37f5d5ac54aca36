/**
 * The emulator's side of the SharedArrayBuffer channel: a synchronous disk
 * API for code running in its own worker (an emulator whose device model
 * cannot wait for a Promise). Each call publishes one request in the shared
 * header, wakes the engine worker and blocks in Atomics.wait until the
 * answer is there. Requests larger than the data area are split.
 *
 * Atomics.wait is forbidden on a page's main thread, so this runs in a
 * worker; the SharedArrayBuffer itself comes from RemoteBlockBackend
 * .openChannel() on the page and is handed to the worker with postMessage.
 */
import { BlockError } from '../core/errors.ts';
import { codeOfErrno, HEADER_BYTES, joinOffset, OP, requireSharedMemory, SLOT, splitOffset, STATE } from './sab-layout.ts';

/** Options for SabChannelClient. */
export interface SabChannelOptions {
  /** Give up on an answer after this many ms (EIO); default 60 s. */
  timeoutMs?: number;
}

/** Synchronous block I/O over a channel served by the engine worker. */
export class SabChannelClient {
  private readonly ctl: Int32Array;
  private readonly data: Uint8Array;
  private readonly timeoutMs: number;

  /** Wraps the SharedArrayBuffer of a channel; throws ENOTSUP without cross-origin isolation. */
  constructor(sab: SharedArrayBuffer, opts: SabChannelOptions = {}) {
    requireSharedMemory();
    if (!(sab instanceof SharedArrayBuffer) || sab.byteLength <= HEADER_BYTES) {
      throw new BlockError('EINVAL', 'Not a channel: expected the SharedArrayBuffer from openChannel()');
    }
    this.ctl = new Int32Array(sab, 0, HEADER_BYTES / 4);
    this.data = new Uint8Array(sab, HEADER_BYTES);
    this.timeoutMs = opts.timeoutMs ?? 60_000;
  }

  /** Bytes one request can carry; larger reads and writes are split into this many. */
  get capacity(): number {
    return this.data.length;
  }

  /** Runs one request and returns its numeric result; throws the engine's error as a BlockError. */
  private request(op: number, offset: number, length: number): number {
    const c = this.ctl;
    if (Atomics.compareExchange(c, SLOT.STATE, STATE.IDLE, STATE.IDLE) !== STATE.IDLE) {
      throw new BlockError('ENOMEDIUM', 'The channel was closed by the engine');
    }
    const [lo, hi] = splitOffset(offset);
    Atomics.store(c, SLOT.OP, op);
    Atomics.store(c, SLOT.OFFSET_LO, lo);
    Atomics.store(c, SLOT.OFFSET_HI, hi);
    Atomics.store(c, SLOT.LENGTH, length);
    Atomics.store(c, SLOT.ERRNO, 0);
    if (Atomics.compareExchange(c, SLOT.STATE, STATE.IDLE, STATE.REQUEST) !== STATE.IDLE) {
      throw new BlockError('ENOMEDIUM', 'The channel was closed by the engine');
    }
    Atomics.notify(c, SLOT.STATE);
    const deadline = Date.now() + this.timeoutMs;
    for (;;) {
      const st = Atomics.load(c, SLOT.STATE);
      if (st === STATE.DONE) break;
      if (st === STATE.CLOSED) throw new BlockError('ENOMEDIUM', 'The channel was closed by the engine');
      const left = deadline - Date.now();
      if (left <= 0) throw new BlockError('EIO', `The engine worker did not answer within ${this.timeoutMs} ms`);
      Atomics.wait(c, SLOT.STATE, st, left);
    }
    const errno = Atomics.load(c, SLOT.ERRNO);
    const result = joinOffset(Atomics.load(c, SLOT.RESULT_LO), Atomics.load(c, SLOT.RESULT_HI));
    let message = '';
    if (errno !== 0) {
      const n = Atomics.load(c, SLOT.MESSAGE_LENGTH);
      // TextDecoder refuses views of shared memory; copy the few message bytes out first.
      message = new TextDecoder().decode(this.data.slice(0, n));
    }
    Atomics.compareExchange(c, SLOT.STATE, STATE.DONE, STATE.IDLE);
    if (errno !== 0) throw new BlockError(codeOfErrno(errno), message || undefined);
    return result;
  }

  /** Reads `length` bytes at `offset` into buf[0..length) (all of buf by default), blocking until done. */
  read(buf: Uint8Array, offset: number, length = buf.length): void {
    if (length > buf.length) throw new BlockError('EINVAL', `Length ${length} exceeds the ${buf.length}-byte buffer`);
    for (let done = 0; done < length; ) {
      const n = Math.min(this.data.length, length - done);
      this.request(OP.READ, offset + done, n);
      buf.set(this.data.subarray(0, n), done);
      done += n;
    }
  }

  /** Writes buf[0..length) (all of buf by default) at `offset`, blocking until done. */
  write(buf: Uint8Array, offset: number, length = buf.length): void {
    if (length > buf.length) throw new BlockError('EINVAL', `Length ${length} exceeds the ${buf.length}-byte buffer`);
    for (let done = 0; done < length; ) {
      const n = Math.min(this.data.length, length - done);
      this.data.set(buf.subarray(done, done + n));
      this.request(OP.WRITE, offset + done, n);
      done += n;
    }
  }

  /** Zeroes `length` bytes at `offset`. */
  writeZeroes(offset: number, length: number): void {
    this.ranged(OP.WRITE_ZEROES, offset, length);
  }

  /** Discards `length` bytes at `offset` (advisory). */
  discard(offset: number, length: number): void {
    this.ranged(OP.DISCARD, offset, length);
  }

  /** A bufferless request split so each length fits the 32-bit LENGTH slot. */
  private ranged(op: number, offset: number, length: number): void {
    if (!Number.isInteger(length) || length < 0) throw new BlockError('EINVAL', `Invalid length ${length}`);
    const max = 1 << 30;
    for (let done = 0; done < length || length === 0; ) {
      const n = Math.min(max, length - done);
      this.request(op, offset + done, n);
      done += n;
      if (length === 0) break;
    }
  }

  /** Makes every completed write durable. */
  flush(): void {
    this.request(OP.FLUSH, 0, 0);
  }

  /** The image's length in bytes. */
  getLength(): number {
    return this.request(OP.LENGTH, 0, 0);
  }
}
