/**
 * The `null-co` and `null-aio` protocols (QEMU's block/null.c): a device of a
 * fixed size that discards writes. Reads leave the caller's buffer as it was
 * unless `read-zeroes` is on (QEMU's default is off, and so is ours), and
 * every request can be delayed by `latency-ns` to stand in for a slow device
 * in benchmarks. Both names behave the same here; QEMU differs only in
 * whether it uses coroutines or AIO callbacks inside.
 */
import type { BlockDriver } from '../core/driver.ts';
import { BlockError, throwIfAborted } from '../core/errors.ts';
import type { BlockNode } from '../core/node.ts';
import { BLOCK, REQ, type BlockStatus } from '../core/types.ts';
import { boolOption, numberOption, sizeOption } from './driver-opts.ts';
import { newProtocolStats, type ProtocolStats } from './memory.ts';

/** Default length of a null device: 1 GiB, as QEMU. */
export const NULL_DEFAULT_SIZE = 2 ** 30;

/** Driver state of a null node. */
export interface NullNodeState {
  length: number;
  latencyNs: number;
  readZeroes: boolean;
  stats: ProtocolStats;
}

function state(bs: BlockNode): NullNodeState {
  return bs.state<NullNodeState>();
}

/** Waits `ns` nanoseconds (rounded to timer resolution), failing early with ECANCELED on abort. */
function sleepNs(ns: number, signal?: AbortSignal): Promise<void> {
  if (ns <= 0) return Promise.resolve();
  throwIfAborted(signal);
  return new Promise((resolve, reject) => {
    const onAbort = (): void => {
      clearTimeout(timer);
      reject(new BlockError('ECANCELED'));
    };
    const timer = setTimeout(() => {
      signal?.removeEventListener('abort', onAbort);
      resolve();
    }, ns / 1e6);
    signal?.addEventListener('abort', onAbort, { once: true });
  });
}

function makeNullDriver(name: 'null-co' | 'null-aio'): BlockDriver {
  return {
    name,
    kind: 'protocol',
    protocolNames: [name],
    runtimeOptions: [
      { name: 'size', type: 'size', help: 'size of the null block', defaultValue: '1G' },
      { name: 'latency-ns', type: 'number', help: 'nanoseconds (approximated) to wait before completing request', defaultValue: '0' },
      { name: 'read-zeroes', type: 'bool', help: 'return zeroes when read', defaultValue: 'off' },
    ],

    parseFilename(filename) {
      // The filename carries no information; QEMU accepts exactly one spelling.
      if (filename !== `${name}://`) {
        throw new BlockError('EINVAL', `The only allowed filename for this driver is '${name}://'`);
      }
    },

    async open(bs, options) {
      const latencyNs = numberOption(options, 'latency-ns', 0);
      if (latencyNs < 0) throw new BlockError('EINVAL', 'latency-ns is invalid');
      const st: NullNodeState = {
        length: sizeOption(options, 'size', NULL_DEFAULT_SIZE),
        latencyNs,
        readZeroes: boolOption(options, 'read-zeroes', false),
        stats: newProtocolStats(),
      };
      bs.opaque = st;
      bs.filename = `${name}://`;
      bs.supportedWriteFlags = REQ.FUA;
    },

    async preadv(bs, _offset, bytes, buf, _flags, signal) {
      const st = state(bs);
      if (st.readZeroes) buf.fill(0, 0, bytes);
      st.stats.reads++;
      st.stats.bytesRead += bytes;
      await sleepNs(st.latencyNs, signal);
    },

    async pwritev(bs, _offset, bytes, _buf, _flags, signal) {
      const st = state(bs);
      st.stats.writes++;
      st.stats.bytesWritten += bytes;
      await sleepNs(st.latencyNs, signal);
    },

    async flushToDisk(bs) {
      const st = state(bs);
      st.stats.flushes++;
      await sleepNs(st.latencyNs);
    },

    async blockStatus(bs, _wantZero, offset, bytes): Promise<BlockStatus> {
      // Without read-zeroes the content is undefined: neither DATA nor ZERO, as QEMU reports it.
      const status = BLOCK.OFFSET_VALID | (state(bs).readZeroes ? BLOCK.ZERO : 0);
      return { status, pnum: bytes, map: offset, file: bs };
    },

    async getLength(bs) {
      return state(bs).length;
    },

    async getAllocatedFileSize() {
      return 0;
    },

    async reopenPrepare() {
      // Accepted and ignored, as QEMU's null_reopen_prepare.
    },
  };
}

/** QEMU's null-co. */
export const nullCoDriver: BlockDriver = makeNullDriver('null-co');
/** QEMU's null-aio (same behaviour here). */
export const nullAioDriver: BlockDriver = makeNullDriver('null-aio');
