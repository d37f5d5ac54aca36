/**
 * The engine side of the SharedArrayBuffer channel (layout in
 * src/client/sab-layout.ts): waits for a request with Atomics.waitAsync, so
 * the worker's event loop stays free for comlink calls, runs it on a
 * BlockBackend reading straight into (or writing straight from) the shared
 * data area, then publishes the result and wakes the client.
 */
import type { BlockBackend } from '../core/block-backend.ts';
import { BlockError, toBlockError } from '../core/errors.ts';
import { DEFAULT_CAPACITY, HEADER_BYTES, joinOffset, OP, requireSharedMemory, SLOT, splitOffset, STATE } from '../client/sab-layout.ts';

/** Atomics.waitAsync as lib.es2022 lacks it. */
type WaitAsync = (ta: Int32Array, index: number, value: number, timeout?: number) => { async: boolean; value: Promise<'ok' | 'timed-out'> | 'not-equal' | 'timed-out' };

function waitAsync(): WaitAsync {
  const w = (Atomics as unknown as { waitAsync?: WaitAsync }).waitAsync;
  if (typeof w !== 'function') throw new BlockError('ENOTSUP', 'The SharedArrayBuffer channel needs Atomics.waitAsync in the engine worker');
  return w;
}

/** Serves one channel until close(); at most one request is in progress. */
export class SabChannelServer {
  readonly sab: SharedArrayBuffer;
  private readonly ctl: Int32Array;
  private readonly data: Uint8Array;
  private closed = false;
  /** Settles when the serving loop has ended. */
  readonly done: Promise<void>;

  /** Allocates a channel of `capacity` data bytes over `blk` and starts serving it. */
  constructor(private readonly blk: BlockBackend, capacity = DEFAULT_CAPACITY) {
    requireSharedMemory();
    if (!Number.isInteger(capacity) || capacity < 512 || capacity > 1 << 30) {
      throw new BlockError('EINVAL', `Channel capacity must be an integer between 512 bytes and 1 GiB (got ${capacity})`);
    }
    this.sab = new SharedArrayBuffer(HEADER_BYTES + capacity);
    this.ctl = new Int32Array(this.sab, 0, HEADER_BYTES / 4);
    this.data = new Uint8Array(this.sab, HEADER_BYTES, capacity);
    this.done = this.loop();
  }

  private async loop(): Promise<void> {
    const wait = waitAsync();
    for (;;) {
      const st = Atomics.load(this.ctl, SLOT.STATE);
      if (this.closed || st === STATE.CLOSED) return;
      if (st !== STATE.REQUEST) {
        const r = wait(this.ctl, SLOT.STATE, st);
        if (r.async) await r.value;
        continue;
      }
      await this.serve();
    }
  }

  private async serve(): Promise<void> {
    const c = this.ctl;
    const op = Atomics.load(c, SLOT.OP);
    const offset = joinOffset(Atomics.load(c, SLOT.OFFSET_LO), Atomics.load(c, SLOT.OFFSET_HI));
    const length = Atomics.load(c, SLOT.LENGTH);
    let result = 0;
    let errno = 0;
    let message = '';
    try {
      if ((op === OP.READ || op === OP.WRITE) && (length < 0 || length > this.data.length)) {
        throw new BlockError('EINVAL', `Request of ${length} bytes exceeds the channel's ${this.data.length}-byte buffer`);
      }
      switch (op) {
        case OP.READ:
          await this.blk.pread(offset, this.data.subarray(0, length));
          result = length;
          break;
        case OP.WRITE:
          await this.blk.pwrite(offset, this.data.subarray(0, length));
          result = length;
          break;
        case OP.WRITE_ZEROES:
          await this.blk.pwriteZeroes(offset, length);
          break;
        case OP.DISCARD:
          await this.blk.pdiscard(offset, length);
          break;
        case OP.FLUSH:
          await this.blk.flush();
          break;
        case OP.LENGTH:
          result = await this.blk.getLength();
          break;
        default:
          throw new BlockError('EINVAL', `Unknown channel operation ${op}`);
      }
    } catch (e) {
      const be = toBlockError(e);
      errno = be.errno;
      message = be.message;
    }
    if (errno !== 0) {
      const bytes = new TextEncoder().encode(message.slice(0, 4096));
      const n = Math.min(bytes.length, this.data.length);
      this.data.set(bytes.subarray(0, n));
      Atomics.store(c, SLOT.MESSAGE_LENGTH, n);
    }
    const [lo, hi] = splitOffset(result);
    Atomics.store(c, SLOT.RESULT_LO, lo);
    Atomics.store(c, SLOT.RESULT_HI, hi);
    Atomics.store(c, SLOT.ERRNO, errno);
    // compareExchange, not store: a close() that came meanwhile must stay visible to the client.
    Atomics.compareExchange(c, SLOT.STATE, STATE.REQUEST, STATE.DONE);
    Atomics.notify(c, SLOT.STATE);
  }

  /** Stops serving: a client waiting or arriving later gets ENOMEDIUM. */
  async close(): Promise<void> {
    if (this.closed) return this.done;
    this.closed = true;
    Atomics.store(this.ctl, SLOT.STATE, STATE.CLOSED);
    Atomics.notify(this.ctl, SLOT.STATE);
    return this.done;
  }
}
