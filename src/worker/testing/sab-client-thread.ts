/**
 * A worker_threads body for the Node tests of the SharedArrayBuffer channel:
 * it plays the emulator's worker, running synchronous requests through
 * SabChannelClient and posting what it saw (or the error's code) back.
 */
import { parentPort, workerData } from 'node:worker_threads';
import { SabChannelClient } from '../../client/sab-channel.ts';
import { isBlockError } from '../../core/errors.ts';

/** What the test asks the thread to do. */
export interface SabThreadTask {
  sab: SharedArrayBuffer;
  /** Bytes to write at `offset`, then read back with length `readLength`. */
  write?: number[];
  offset: number;
  readLength: number;
  /** A read at this offset that must fail. */
  badOffset?: number;
}

const task = workerData as SabThreadTask;
const ch = new SabChannelClient(task.sab, { timeoutMs: 10_000 });
const out: { length: number; read: number[]; error?: string; message?: string } = { length: ch.getLength(), read: [] };
if (task.write) ch.write(new Uint8Array(task.write), task.offset);
ch.flush();
const buf = new Uint8Array(task.readLength);
ch.read(buf, task.offset);
out.read = Array.from(buf);
if (task.badOffset !== undefined) {
  try {
    ch.read(new Uint8Array(16), task.badOffset);
  } catch (e) {
    out.error = isBlockError(e) ? e.code : String(e);
    out.message = e instanceof Error ? e.message : String(e);
  }
}
parentPort!.postMessage(out);
