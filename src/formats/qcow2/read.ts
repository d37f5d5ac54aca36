/**
 * The qcow2 read path (QEMU's qcow2_co_preadv_part and friends): map each
 * piece of the request, then read data clusters from the data file, zero
 * clusters as zeroes, unallocated ones from the backing file, and compressed
 * clusters through the decompressor. The write path reuses it to fetch the
 * old contents of a cluster for copy-on-write.
 */
import { BlockError, toBlockError } from '../../core/errors.ts';
import { bdrvDebugEvent, bdrvPread, bdrvPreadv, bdrvPreadvSync, hasDebugListener } from '../../core/io.ts';
import type { BlockNode } from '../../core/node.ts';
import { getHostOffset, mapExtent, newHostMapping, parseCompressedEntry, SC, type HostMapping } from './cluster.ts';
import { decompressCluster, decompressClusterAsync, hasAsyncDecompress } from './compress.ts';
import { corruption, state, type Qcow2State } from './state.ts';

/** Reads one compressed cluster's data and copies the wanted part (QEMU's qcow2_co_preadv_compressed). */
export async function readCompressed(bs: BlockNode, s: Qcow2State, hi: number, lo: number, offset: number, bytes: number, out: Uint8Array): Promise<void> {
  let data: Uint8Array;
  const last = s.lastCompressed;
  if (last && last.hi === hi && last.lo === lo) {
    data = last.data;
  } else {
    const { offset: coffset, size } = parseCompressedEntry(hi, lo, s.clusterBits);
    // A write that replaces a compressed cluster while this read waits bumps the epoch: what this read decoded is then not cached.
    const epoch = s.compressedEpoch;
    const src = await bdrvPread(bs.file!, coffset, size);
    const type = s.header.compressionType;
    try {
      if (hasAsyncDecompress(type)) {
        // Decoded into a buffer of its own: other reads run while it waits.
        data = await decompressClusterAsync(type, src, s.clusterSize);
      } else {
        // The previous cluster's buffer is reused: from here to the copy below nothing awaits, so no
        // other read can be holding it, and it is unlinked first so a failure cannot leave it half-written.
        const prev = s.lastCompressed?.data;
        data = prev && prev.length === s.clusterSize ? prev : new Uint8Array(s.clusterSize);
        delete s.lastCompressed;
        decompressCluster(type, src, data);
      }
    } catch (e) {
      throw new BlockError('EIO', toBlockError(e).message, { node: bs.nodeName, cause: e });
    }
    if (s.compressedEpoch === epoch) s.lastCompressed = { hi, lo, data };
  }
  const inCluster = offset % s.clusterSize;
  out.set(data.subarray(inCluster, inCluster + bytes));
}

/** Reads one mapped extent into `out` (QEMU's qcow2_co_preadv_task plus the zero cases of qcow2_co_preadv_part); reads `m` only before returning. */
function readExtent(bs: BlockNode, s: Qcow2State, m: HostMapping, cur: number, out: Uint8Array, signal?: AbortSignal): Promise<void> {
  switch (m.type) {
    case SC.ZERO_PLAIN:
    case SC.ZERO_ALLOC:
      out.fill(0);
      return Promise.resolve();
    case SC.UNALLOCATED_PLAIN:
    case SC.UNALLOCATED_ALLOC:
      if (bs.backing) {
        const backing = bs.backing;
        const e = bdrvDebugEvent(bs.file?.bs, 'read_backing_aio');
        return e ? e.then(() => bdrvPreadv(backing, cur, out.length, out, 0, signal)) : bdrvPreadv(backing, cur, out.length, out, 0, signal);
      }
      out.fill(0);
      return Promise.resolve();
    case SC.COMPRESSED:
    {
      const { entryHi, entryLo } = m;
      const e = bdrvDebugEvent(bs.file?.bs, 'read_compressed');
      return e ? e.then(() => readCompressed(bs, s, entryHi, entryLo, cur, out.length, out)) : readCompressed(bs, s, entryHi, entryLo, cur, out.length, out);
    }
    case SC.NORMAL:
    {
      // QEMU announces data reads on the image file even with an external data file.
      const host = m.hostOffset;
      const e = bdrvDebugEvent(bs.file?.bs, 'read_aio');
      return e ? e.then(() => bdrvPreadv(s.dataFile, host, out.length, out, 0, signal)) : bdrvPreadv(s.dataFile, host, out.length, out, 0, signal);
    }
    default:
      return Promise.reject(corruption(bs, `unexpected subcluster type ${m.type}`));
  }
}

/** Most sub-requests of one guest request kept in flight at once (QEMU's QCOW2_MAX_WORKERS). */
const MAX_WORKERS = 8;

/** Mapping scratch of the synchronous first step of qcow2Preadv (read before any await, so one object serves every request). */
const fastMapping = newHostMapping();

/**
 * Reads `bytes` guest bytes at `offset` into `buf` (the driver's preadv; also
 * the copy-on-write source read). When the L2 slice is cached and one extent
 * covers the whole request (the common case: one L2 kernel call over the
 * request's clusters), the data read is issued in the same turn and its
 * promise returned; anything else takes the general loop.
 */
export function qcow2Preadv(bs: BlockNode, offset: number, bytes: number, buf: Uint8Array, flags: number, signal?: AbortSignal): Promise<void> {
  const s = state(bs);
  if (!signal?.aborted) {
    const m = fastMapping;
    let pending: Promise<void> | undefined;
    try {
      pending = mapExtent(s.mapping, offset, bytes, m);
    } catch (e) {
      return Promise.reject(e);
    }
    if (pending) {
      // A cache miss: the general loop below shares the slice load; its outcome is reported there.
      pending.catch(() => undefined);
    } else if (m.bytes === bytes) {
      return readExtent(bs, s, m, offset, buf.length === bytes ? buf : buf.subarray(0, bytes), signal);
    }
  }
  return qcow2PreadvLoop(bs, s, offset, bytes, buf, flags, signal);
}

/**
 * The driver's preadvSync: serves the request on this thread when the L2
 * slice is cached and one extent covers it, and that extent is zeroes, or data
 * (or a backing range) whose node reads synchronously too. Anything else,
 * including a listener for the read events, is left to qcow2Preadv.
 */
export function qcow2PreadvSync(bs: BlockNode, offset: number, bytes: number, buf: Uint8Array): boolean {
  const s = state(bs);
  // Data files that cannot read synchronously (a file in asynchronous mode) are known before any mapping is done.
  if (s.dataFile.bs.drv.preadvSync === undefined) return false;
  const m = fastMapping;
  const pending = mapExtent(s.mapping, offset, bytes, m);
  if (pending) {
    // A cache miss: qcow2Preadv shares the slice load and reports its outcome.
    pending.catch(() => undefined);
    return false;
  }
  if (m.bytes !== bytes) return false;
  switch (m.type) {
    case SC.ZERO_PLAIN:
    case SC.ZERO_ALLOC:
      buf.fill(0, 0, bytes);
      return true;
    case SC.UNALLOCATED_PLAIN:
    case SC.UNALLOCATED_ALLOC:
      if (!bs.backing) {
        buf.fill(0, 0, bytes);
        return true;
      }
      return !hasDebugListener(bs.file?.bs) && bdrvPreadvSync(bs.backing, offset, bytes, buf);
    case SC.NORMAL:
      return !hasDebugListener(bs.file?.bs) && bdrvPreadvSync(s.dataFile, m.hostOffset, bytes, buf);
    default:
      return false;
  }
}

/** The general read loop: extent by extent, up to MAX_WORKERS data reads in flight. */
async function qcow2PreadvLoop(bs: BlockNode, s: Qcow2State, offset: number, bytes: number, buf: Uint8Array, _flags: number, signal?: AbortSignal): Promise<void> {
  const inflight = new Set<Promise<void>>();
  let failure: unknown;
  let done = 0;
  const launch = async (p: Promise<void>): Promise<void> => {
    const tracked = p.then(
      () => { inflight.delete(tracked); },
      (e: unknown) => { inflight.delete(tracked); failure ??= e; },
    );
    inflight.add(tracked);
    if (inflight.size >= MAX_WORKERS) await Promise.race(inflight);
  };
  while (done < bytes && failure === undefined) {
    if (signal?.aborted) throw new BlockError('ECANCELED');
    const cur = offset + done;
    const m = await getHostOffset(s.mapping, cur, bytes - done);
    const n = m.bytes;
    if (done === 0 && n === bytes) {
      // One extent covers the whole request: no task bookkeeping.
      await readExtent(bs, s, m, cur, buf.subarray(0, n), signal);
      return;
    }
    const out = buf.subarray(done, done + n);
    if (m.type === SC.ZERO_PLAIN || m.type === SC.ZERO_ALLOC || ((m.type === SC.UNALLOCATED_PLAIN || m.type === SC.UNALLOCATED_ALLOC) && !bs.backing)) {
      out.fill(0);
    } else {
      await launch(readExtent(bs, s, m, cur, out, signal));
    }
    done += n;
  }
  await Promise.all(inflight);
  if (failure !== undefined) throw failure;
}
