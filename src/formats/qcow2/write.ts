/**
 * The qcow2 write path (QEMU's qcow2_co_pwritev_part, qcow2-cluster.c's
 * allocation, zeroing and discard, qcow2_co_pwritev_compressed and
 * qcow2_co_truncate).
 *
 * A write to clusters the active L1 owns alone (COPIED) goes straight to
 * their host clusters without the image lock. Anything else takes the lock
 * and, one L2 slice at a time: makes the L2 table ours (allocating it, or
 * copying one shared with a snapshot), fetches the old contents of the
 * partly written (sub)clusters through the read path (backing file, zero,
 * compressed or shared clusters), writes them merged with the new data to
 * a freshly allocated run, and only then points the L2 entries at it. The
 * references the old entries held are queued and dropped at the next
 * writeback, after the new entries are on disk (see alloc.ts).
 */
import { qcow2TruncateBitmapsCheck } from './bitmap-store.ts';
import { BlockError, isBlockError, toBlockError } from '../../core/errors.ts';
import { bdrvBlockStatusAbove, bdrvPwritev, bdrvPwriteZeroes, bdrvTruncate, bdrvGetLength } from '../../core/io.ts';
import type { BlockNode } from '../../core/node.ts';
import { BLOCK, REQ, type PreallocMode } from '../../core/types.ts';
import {
  allocBytes,
  allocClusters,
  barrier,
  checkUsable,
  ev,
  freeEntry,
  getRefcount,
  markDirtyIfLazy,
  overlapCheck,
  queueFree,
  refcountArea,
  shrinkReftable,
  signalCorruption,
  updateRefcounts,
  writeback,
} from './alloc.ts';
import { getHostOffset, l2Kernel, newL2Scan, SC } from './cluster.ts';
import { compressCluster } from './compress.ts';
import { AUTOCLEAR, HDR, hex, LIMITS } from './header.ts';
import { qcow2Preadv } from './read.ts';
import {
  entryOffset,
  forgetCompressed,
  HI_COMPRESSED,
  HI_COPIED,
  hiWord,
  l1Words,
  LO_ZERO,
  loWord,
  offsetWords,
  setL1,
  setWords,
  state,
  type DiscardType,
  type Qcow2State,
} from './state.ts';

/** One L2 entry with its extended-L2 bitmap (0 for standard entries). */
interface Entry {
  hi: number;
  lo: number;
  /** Bits 32-63 of the bitmap: subclusters that read as zeroes. */
  zero: number;
  /** Bits 0-31: allocated subclusters. */
  alloc: number;
}

/** A pinned, writable L2 slice and the index of the wanted entry in it. */
interface SliceRef {
  offset: number;
  slice: Uint8Array;
  index: number;
  /** Entries from `index` to the end of the slice. */
  room: number;
}

const ALL = 0xffffffff;
const scan = newL2Scan();

function getEntry(s: Qcow2State, slice: Uint8Array, i: number): Entry {
  const o = i * s.l2EntryBytes;
  const ext = s.l2EntryBytes === 16;
  return { hi: hiWord(slice, o), lo: loWord(slice, o), zero: ext ? hiWord(slice, o + 8) : 0, alloc: ext ? loWord(slice, o + 8) : 0 };
}

function putEntry(s: Qcow2State, slice: Uint8Array, i: number, e: Entry): void {
  const o = i * s.l2EntryBytes;
  setWords(slice, o, e.hi >>> 0, e.lo >>> 0);
  if (s.l2EntryBytes === 16) setWords(slice, o + 8, e.zero >>> 0, e.alloc >>> 0);
}

function sameEntry(a: Entry, b: Entry): boolean {
  return a.hi >>> 0 === b.hi >>> 0 && a.lo >>> 0 === b.lo >>> 0 && a.zero >>> 0 === b.zero >>> 0 && a.alloc >>> 0 === b.alloc >>> 0;
}

/** Whether the entry names a host cluster (compressed clusters excluded); with a data file, offset 0 counts when COPIED. */
function hasHost(s: Qcow2State, e: Entry): boolean {
  if (e.hi & HI_COMPRESSED) return false;
  const off = entryOffset(e.hi, e.lo);
  return off !== 0 || (s.hasDataFile && (e.hi & HI_COPIED) !== 0);
}

/** Mask of subclusters [from, to) (QCOW_OFLAG_SUB_*_RANGE). */
function scMask(from: number, to: number): number {
  if (to - from >= 32) return ALL;
  return ((((1 << (to - from)) >>> 0) - 1) << from) >>> 0;
}

/** Validates an entry through the L2 kernel (invalid bitmaps, misaligned or foreign host offsets) before it is rewritten. */
async function validateEntry(s: Qcow2State, ref: SliceRef, i: number, l2Offset: number): Promise<void> {
  const g = s.mapping.geometry;
  l2Kernel().scan(ref.slice, i, 0, 1, g, scan);
  const where = `(L2 offset: ${hex(l2Offset)}, L2 index: ${hex(i)})`;
  if (scan.type === SC.INVALID) throw await signalCorruption(s, `Invalid cluster entry found  ${where}`);
  if (scan.type === SC.COMPRESSED && s.hasDataFile) throw await signalCorruption(s, `Compressed cluster entry found in image with external data file ${where}`);
  const e = getEntry(s, ref.slice, i);
  if (hasHost(s, e)) {
    const host = entryOffset(e.hi, e.lo);
    if (host < 0 || host % s.clusterSize !== 0) {
      throw await signalCorruption(s, `Cluster allocation offset ${host < 0 ? 'beyond 2^53' : hex(host)} unaligned ${where}`);
    }
  }
  if (s.header.version < 3 && !s.mapping.geometry.extended && !(e.hi & HI_COMPRESSED) && e.lo & LO_ZERO) {
    throw await signalCorruption(s, `Zero cluster entry found in pre-v3 image ${where}`);
  }
}

// ---------------------------------------------------------------------------
// L2 tables

/**
 * Allocates a new L2 table for L1 entry `l1i` (QEMU's l2_allocate): zeroes,
 * or a copy of the shared table at `oldOffset`, written straight to the new
 * cluster; the L1 entry changes in memory and reaches disk at writeback,
 * after the table.
 */
async function l2Allocate(s: Qcow2State, l1i: number, oldOffset: number): Promise<number> {
  const cs = s.clusterSize;
  await markDirtyIfLazy(s);
  const { offset } = await allocClusters(s, 1);
  const table = new Uint8Array(cs);
  if (oldOffset !== 0) {
    await ev(s, 'l2_alloc_cow_read');
    const size = s.l2Cache.entrySize;
    for (let o = 0; o < cs; o += size) {
      const slice = await s.mapping.loadL2Slice(oldOffset + o, () => `L2 table offset ${hex(oldOffset)} beyond the end of the image file (L1 index: ${hex(l1i)})`);
      table.set(slice, o);
    }
  }
  await overlapCheck(s, 0, offset, cs);
  await ev(s, 'l2_alloc_write');
  await bdrvPwritev(s.bs.file!, offset, cs, table);
  setL1(s, l1i, offset, true);
  if (oldOffset !== 0) queueFree(s, oldOffset, cs, 'other');
  return offset;
}

/**
 * QEMU's get_cluster_table for writing: the L2 slice holding guest cluster
 * `gci`, from a table the active L1 owns alone. The slice is pinned; the
 * caller releases it.
 */
async function writableSlice(s: Qcow2State, gci: number): Promise<SliceRef> {
  const l1i = Math.floor(gci / s.l2Entries);
  // Writes past the disk (the VM state area) grow the table as QEMU's get_cluster_table does.
  if (l1i >= s.mapping.l1Size) await growL1(s, l1i + 1, false);
  const [hi, lo] = l1Words(s, l1i);
  let l2 = entryOffset(hi, lo);
  if (l2 < 0 || l2 % s.clusterSize !== 0) {
    throw await signalCorruption(s, `L2 table offset ${l2 < 0 ? 'beyond 2^53' : hex(l2)} unaligned (L1 index: ${hex(l1i)})`);
  }
  if (l2 === 0 || !(hi & HI_COPIED)) l2 = await l2Allocate(s, l1i, l2);
  const sliceEntries = s.mapping.l2SliceEntries;
  const inTable = gci % s.l2Entries;
  const offset = l2 + Math.floor(inTable / sliceEntries) * sliceEntries * s.l2EntryBytes;
  // Every caller may change the slice: with lazy refcounts the dirty bit goes to disk first, so an
  // error there happens before any entry changes (an entry changed but not marked dirty could be lost).
  await markDirtyIfLazy(s);
  for (let attempt = 0; ; attempt++) {
    if (attempt > 8) throw new BlockError('EIO', 'qcow2: no room in the L2 cache for a table being written', { node: s.bs.nodeName });
    // We hold the lock, so the cache cannot write back for us: make room for the slice we pin.
    if (s.l2Cache.fullOfUnevictable && !s.l2Cache.peek(offset)) await writeback(s);
    const slice = await s.mapping.loadL2Slice(offset, () => `L2 table offset ${hex(l2)} beyond the end of the image file (L1 index: ${hex(l1i)})`);
    // A concurrent load may have evicted it between the load and now; pin what is really cached.
    if (s.l2Cache.peek(offset) !== slice) continue;
    s.l2Cache.acquire(offset);
    const index = inTable % sliceEntries;
    return { offset, slice, index, room: sliceEntries - index };
  }
}

/** Marks the slice dirty (synchronously, so nothing can fail between changing entries and recording it). */
function sliceChanged(s: Qcow2State, ref: SliceRef): void {
  s.l2Cache.markDirty(ref.offset);
}

// ---------------------------------------------------------------------------
// Data writes

/** Writes guest data to host `offset` of the data file, after the overlap check (QEMU's qcow2_co_pwritev_task). */
async function writeData(s: Qcow2State, offset: number, data: Uint8Array): Promise<void> {
  if (!s.hasDataFile) await overlapCheck(s, 0, offset, data.length);
  await ev(s, 'write_aio');
  await bdrvPwritev(s.dataFile, offset, data.length, data);
}

/**
 * Bytes from `offset` (at most `bytes`) that map to clusters the active L1
 * owns alone and whose subclusters are all allocated, with their host
 * offset: those take the data in place. 0 when the first one does not.
 */
async function directRun(s: Qcow2State, offset: number, bytes: number): Promise<{ n: number; host: number }> {
  const m = await getHostOffset(s.mapping, offset, bytes);
  if (m.type !== SC.NORMAL) return { n: 0, host: 0 };
  const cs = s.clusterSize;
  const gci = Math.floor(offset / cs);
  const l1i = Math.floor(gci / s.l2Entries);
  const [l1hi] = l1Words(s, l1i);
  if (!(l1hi & HI_COPIED)) return { n: 0, host: 0 };
  const sliceEntries = s.mapping.l2SliceEntries;
  const inTable = gci % s.l2Entries;
  const l2 = entryOffset(l1hi, loWord(s.l1, 8 * l1i));
  const slice = s.l2Cache.peek(l2 + Math.floor(inTable / sliceEntries) * sliceEntries * s.l2EntryBytes);
  if (!slice) return { n: 0, host: 0 };
  const first = inTable % sliceEntries;
  const last = Math.floor((offset + m.bytes - 1) / cs) - gci + first;
  let n = 0;
  for (let i = first; i <= last; i++) {
    if (!(hiWord(slice, i * s.l2EntryBytes) & HI_COPIED)) break;
    n = Math.min(m.bytes, (gci + i - first + 1) * cs - offset);
  }
  return { n, host: m.hostOffset };
}

/** What one guest cluster of an allocating write needs. */
interface Plan {
  /** Entry index in the slice. */
  i: number;
  clusterStart: number;
  /** Guest range the request writes in this cluster. */
  wStart: number;
  wEnd: number;
  /** Guest range written to the host cluster: the request plus copied-on-write neighbours. */
  cowStart: number;
  cowEnd: number;
  old: Entry;
  /** Host cluster kept (ours alone): -1 when a new one is needed. */
  reuse: number;
  /** Subclusters the write touches (extended L2). */
  touched: number;
  /** The data can go in place without touching the L2 entry. */
  direct: boolean;
}

function plan(s: Qcow2State, ref: SliceRef, i: number, clusterStart: number, wStart: number, wEnd: number): Plan {
  const old = getEntry(s, ref.slice, ref.index + i);
  const cs = s.clusterSize;
  const scs = s.subclusterSize;
  const ext = s.l2EntryBytes === 16;
  const compressed = (old.hi & HI_COMPRESSED) !== 0;
  const host = hasHost(s, old);
  const reusable = host && (old.hi & HI_COPIED) !== 0;
  const p: Plan = { i: ref.index + i, clusterStart, wStart, wEnd, cowStart: clusterStart, cowEnd: clusterStart + cs, old, reuse: reusable ? entryOffset(old.hi, old.lo) : -1, touched: ALL, direct: false };
  if (ext) {
    const a = Math.floor((wStart - clusterStart) / scs);
    const b = Math.ceil((wEnd - clusterStart) / scs);
    p.touched = scMask(a, b);
    if (reusable || (!host && !compressed)) {
      // Untouched subclusters keep their own state, so only partly written ones need their old contents.
      p.cowStart = clusterStart + a * scs;
      p.cowEnd = clusterStart + b * scs;
    }
    if (compressed) p.touched = ALL;
    p.direct = reusable && (old.alloc & p.touched) >>> 0 === p.touched && (old.zero & p.touched) === 0;
  } else {
    p.direct = reusable && (old.lo & LO_ZERO) === 0;
  }
  if (s.hasDataFile && p.reuse < 0) p.reuse = clusterStart;
  return p;
}

/** The L2 entry a written cluster ends up with. */
function newEntry(s: Qcow2State, p: Plan, host: number): Entry {
  const [hi, lo] = offsetWords(host, HI_COPIED);
  if (s.l2EntryBytes !== 16) return { hi, lo, zero: 0, alloc: 0 };
  if (p.old.hi & HI_COMPRESSED) return { hi, lo, zero: 0, alloc: ALL };
  return { hi, lo, zero: (p.old.zero & ~p.touched) >>> 0, alloc: (p.old.alloc | p.touched) >>> 0 };
}

/**
 * One step of an allocating write under the lock: the clusters from `offset`
 * inside one L2 slice that share a kind (in place, in place with an L2
 * update, or a new run). Returns the bytes of the request it wrote.
 */
async function allocatingStep(bs: BlockNode, s: Qcow2State, offset: number, bytes: number, data: Uint8Array): Promise<number> {
  const cs = s.clusterSize;
  const gci = Math.floor(offset / cs);
  const ref = await writableSlice(s, gci);
  try {
    const l1i = Math.floor(gci / s.l2Entries);
    const l2Offset = entryOffset(...l1Words(s, l1i));
    const end = Math.min(offset + bytes, (gci + ref.room) * cs);
    const plans: Plan[] = [];
    for (let c = gci, i = 0; c * cs < end; c++, i++) {
      await validateEntry(s, ref, ref.index + i, l2Offset);
      const cStart = c * cs;
      const p = plan(s, ref, i, cStart, Math.max(offset, cStart), Math.min(end, cStart + cs));
      if (plans.length > 0) {
        const a = plans[0]!;
        const prev = plans[plans.length - 1]!;
        const newRun = a.reuse < 0 && p.reuse < 0 && !s.hasDataFile;
        const directRun = a.direct && p.direct && p.reuse === prev.reuse + cs;
        const contiguous = prev.cowEnd === prev.clusterStart + cs && p.cowStart === cStart;
        if (!(contiguous && (newRun || directRun))) break;
      }
      plans.push(p);
      if (!(plans[0]!.reuse < 0 && !s.hasDataFile) && !plans[0]!.direct) break;
    }
    const first = plans[0]!;
    if (first.direct) {
      const last = plans[plans.length - 1]!;
      await writeData(s, first.reuse + (first.wStart - first.clusterStart), data.subarray(0, last.wEnd - first.wStart));
      return last.wEnd - first.wStart;
    }
    let run = plans;
    let host: number;
    if (first.reuse >= 0) {
      host = first.reuse;
    } else {
      // One contiguous run for the whole step, skipping shorter holes (QEMU's qcow2_alloc_clusters in
      // do_alloc_cluster_offset): a hole a free left behind is not split across the write. A run longer
      // than one refcount block counts could never fit between the blocks our search creates in its
      // way, so such a step takes what it finds instead.
      const got = await allocClusters(s, plans.length, plans.length < s.refcount.blockEntries);
      host = got.offset;
      run = plans.slice(0, got.count);
    }
    const last = run[run.length - 1]!;
    const written = last.wEnd - first.wStart;
    const hostStart = host + (first.cowStart - first.clusterStart);
    try {
      if (await zeroCowSpace(bs, s, hostStart, last.cowEnd - first.cowStart, [first.cowStart, first.wStart], [last.wEnd, last.cowEnd])) {
        // The copy-on-write parts read as zero and the space is zeroed already: only the guest data is written.
        await writeData(s, host + (first.wStart - first.clusterStart), data.subarray(0, written));
      } else {
        await copyOnWrite(bs, s, run, host, data, written);
      }
    } catch (e) {
      if (first.reuse < 0) await abortAllocation(s, host, run.length);
      throw e;
    }
    // The data is written; only now may the entries point at it.
    for (let k = 0; k < run.length; k++) {
      const p = run[k]!;
      const e = newEntry(s, p, host + k * cs);
      putEntry(s, ref.slice, p.i, e);
      // A replaced cluster (shared with a snapshot, or compressed) loses this reference.
      if (p.reuse < 0 && (hasHost(s, p.old) || p.old.hi & HI_COMPRESSED)) freeEntry(s, p.old.hi, p.old.lo, 'never');
    }
    sliceChanged(s, ref);
    if (run.some((p) => p.old.hi & HI_COMPRESSED)) forgetCompressed(s);
    return written;
  } finally {
    s.l2Cache.release(ref.offset);
  }
}

/**
 * Gives back the clusters a failed allocating write took (QEMU's
 * qcow2_alloc_cluster_abort): no L2 entry points at them yet, so their
 * refcounts drop at once and the next allocation may reuse them. A failure
 * here only leaks them.
 */
async function abortAllocation(s: Qcow2State, host: number, count: number): Promise<void> {
  const first = host / s.clusterSize;
  try {
    await updateRefcounts(s, first, count, -1);
  } catch (e) {
    s.bs.graph.onWarning(`qcow2_free_clusters failed: ${toBlockError(e).message}`);
    return;
  }
  if (first < s.freeClusterIndex) s.freeClusterIndex = first;
}

/**
 * QEMU's handle_alloc_space: when the copy-on-write parts of an allocation
 * read as zero, zero the whole host range with an efficient zero write
 * (NO_FALLBACK: a sparse extension at the end of a file) instead of writing
 * buffers of zeroes. Returns false when that is not possible.
 */
async function zeroCowSpace(bs: BlockNode, s: Qcow2State, hostStart: number, len: number, head: [number, number], tail: [number, number]): Promise<boolean> {
  if (head[0] === head[1] && tail[0] === tail[1]) return false;
  if (!(await readsAsZero(bs, head[0], head[1] - head[0])) || !(await readsAsZero(bs, tail[0], tail[1] - tail[0]))) return false;
  if (!s.hasDataFile) await overlapCheck(s, 0, hostStart, len);
  await ev(s, 'cluster_alloc_space');
  try {
    await bdrvPwriteZeroes(s.dataFile, hostStart, len, REQ.NO_FALLBACK);
    return true;
  } catch (e) {
    if (isBlockError(e, 'ENOTSUP') || isBlockError(e, 'EAGAIN')) return false;
    throw e;
  }
}

/** QEMU's perform_cow merged with the data write: old contents around the new data, written in one request. */
async function copyOnWrite(bs: BlockNode, s: Qcow2State, run: Plan[], host: number, data: Uint8Array, written: number): Promise<void> {
  const first = run[0]!;
  const last = run[run.length - 1]!;
  if (first.cowStart === first.wStart && written === last.cowEnd - first.cowStart && run.every((p) => p.cowStart === p.wStart && p.wEnd === p.cowEnd)) {
    // The guest data covers every byte of the new clusters: nothing to copy, and no bounce buffer.
    await writeData(s, host + (first.cowStart - first.clusterStart), data.subarray(0, written));
    return;
  }
  const buf = new Uint8Array(last.cowEnd - first.cowStart);
  const base = first.cowStart;
  let cowRead = false;
  for (const p of run) {
    if (p.cowStart < p.wStart || p.wEnd < p.cowEnd) {
      if (!cowRead) { await ev(s, 'cow_read'); cowRead = true; }
      if (p.cowStart < p.wStart) await qcow2Preadv(bs, p.cowStart, p.wStart - p.cowStart, buf.subarray(p.cowStart - base, p.wStart - base), 0);
      if (p.wEnd < p.cowEnd) await qcow2Preadv(bs, p.wEnd, p.cowEnd - p.wEnd, buf.subarray(p.wEnd - base, p.cowEnd - base), 0);
    }
  }
  buf.set(data.subarray(0, written), first.wStart - base);
  if (cowRead) await ev(s, 'cow_write');
  await writeData(s, host + (first.cowStart - first.clusterStart), buf);
}

/** The driver's pwritev (QEMU's qcow2_co_pwritev_part). */
export async function qcow2Pwritev(bs: BlockNode, offset: number, bytes: number, buf: Uint8Array): Promise<void> {
  const s = state(bs);
  checkUsable(s);
  let done = 0;
  while (done < bytes) {
    const cur = offset + done;
    const d = await directRun(s, cur, bytes - done);
    if (d.n > 0) {
      await writeData(s, d.host, buf.subarray(done, done + d.n));
      done += d.n;
      continue;
    }
    done += await s.lock.run(() => allocatingStep(bs, s, cur, bytes - done, buf.subarray(done)));
    // Clusters the step stopped using (COW away from a compressed or shared one) are free for the next step.
    await releaseFreed(s);
  }
}

// ---------------------------------------------------------------------------
// Zero writes and discards

/** QEMU's zero_in_l2_slice / zero_l2_subclusters for one slice; returns the bytes handled. */
async function zeroStep(s: Qcow2State, offset: number, bytes: number, unmap: boolean): Promise<number> {
  const cs = s.clusterSize;
  const scs = s.subclusterSize;
  const gci = Math.floor(offset / cs);
  const ref = await writableSlice(s, gci);
  try {
    const l2Offset = entryOffset(...l1Words(s, Math.floor(gci / s.l2Entries)));
    const end = Math.min(offset + bytes, (gci + ref.room) * cs);
    const ext = s.l2EntryBytes === 16;
    for (let c = gci, i = ref.index; c * cs < end; c++, i++) {
      await validateEntry(s, ref, i, l2Offset);
      const cStart = c * cs;
      const from = Math.max(offset, cStart);
      const to = Math.min(end, cStart + cs);
      const old = getEntry(s, ref.slice, i);
      const compressed = (old.hi & HI_COMPRESSED) !== 0;
      const whole = from === cStart && (to === cStart + cs || to >= s.bs.totalBytes);
      let e: Entry;
      let free = false;
      if (whole) {
        free = compressed || (unmap && hasHost(s, old));
        e = free ? { hi: 0, lo: 0, zero: 0, alloc: 0 } : { ...old };
        if (ext) { e.zero = ALL; e.alloc = 0; } else e.lo = (e.lo | LO_ZERO) >>> 0;
      } else {
        if (!ext) throw new BlockError('ENOTSUP', undefined, { node: s.bs.nodeName });
        if (compressed) throw new BlockError('ENOTSUP', undefined, { node: s.bs.nodeName });
        const m = scMask(Math.floor((from - cStart) / scs), Math.ceil((to - cStart) / scs));
        e = { ...old, zero: (old.zero | m) >>> 0, alloc: (old.alloc & ~m) >>> 0 };
      }
      if (sameEntry(e, old)) continue;
      putEntry(s, ref.slice, i, e);
      // Recorded at once: a later entry may fail validation, and this change must not be lost.
      sliceChanged(s, ref);
      if (free) {
        freeEntry(s, old.hi, old.lo, 'request');
        if (compressed) forgetCompressed(s);
      }
    }
    return end - offset;
  } finally {
    s.l2Cache.release(ref.offset);
  }
}

/** Whether [offset, offset+bytes) reads as zeroes through the whole chain, by block status alone (QEMU's is_zero). */
async function readsAsZero(bs: BlockNode, offset: number, bytes: number): Promise<boolean> {
  while (bytes > 0) {
    const st = await bdrvBlockStatusAbove(bs, null, false, false, offset, bytes);
    if (!(st.status & BLOCK.ZERO) || st.pnum <= 0) return false;
    offset += st.pnum;
    bytes -= st.pnum;
  }
  return true;
}

/** The driver's pwriteZeroes (QEMU's qcow2_co_pwrite_zeroes / qcow2_subcluster_zeroize): zero flags instead of data. */
export async function qcow2PwriteZeroes(bs: BlockNode, offset: number, bytes: number, flags: number): Promise<void> {
  const s = state(bs);
  checkUsable(s);
  // v2 has no zero flag: with a backing file the generic layer writes a buffer of zeroes instead.
  if (s.header.version < 3 && bs.backing) throw new BlockError('ENOTSUP', undefined, { node: bs.nodeName });
  const scs = s.subclusterSize;
  const head = offset % scs;
  let tail = (scs - ((offset + bytes) % scs)) % scs;
  if (offset + bytes === bs.totalBytes) tail = 0;
  if (head || tail) {
    // A piece of one subcluster: zero the whole subcluster if the rest already reads as zero
    // and it has no data of its own; otherwise the generic layer writes a buffer.
    if (!(await readsAsZero(bs, offset - head, head)) || !(await readsAsZero(bs, offset + bytes, tail))) {
      throw new BlockError('ENOTSUP', undefined, { node: bs.nodeName });
    }
    const m = await getHostOffset(s.mapping, offset - head, scs);
    if (m.type !== SC.UNALLOCATED_PLAIN && m.type !== SC.UNALLOCATED_ALLOC && m.type !== SC.ZERO_PLAIN && m.type !== SC.ZERO_ALLOC) {
      throw new BlockError('ENOTSUP', undefined, { node: bs.nodeName });
    }
    offset -= head;
    bytes = Math.min(scs, bs.totalBytes - offset);
  }
  if (s.hasDataFile && s.header.autoclearFeatures & AUTOCLEAR.DATA_FILE_RAW) {
    // The raw data file must read like the image, so it is zeroed first.
    await bdrvPwriteZeroes(s.dataFile, offset, bytes, flags & REQ.MAY_UNMAP);
  }
  if (s.header.version < 3) {
    // Without a backing file an unallocated cluster reads as zero, so v2 zeroes by discarding (QEMU does the same).
    await s.lock.run(() => clusterDiscard(s, offset, bytes, 'request', false));
    await releaseFreed(s);
    return;
  }
  const unmap = (flags & REQ.MAY_UNMAP) !== 0;
  let done = 0;
  while (done < bytes) {
    const cur = offset + done;
    done += await s.lock.run(() => zeroStep(s, cur, bytes - done, unmap));
  }
  await releaseFreed(s);
}

/**
 * Makes the clusters a zero or discard request dropped free for the next
 * allocation. QEMU lowers their refcount in memory at once (writing the
 * refcount block only after the L2 tables), so the very next write reuses
 * them; our frees wait for a writeback instead, so one runs here (it keeps
 * the crash-safe order) and the image layout follows QEMU's.
 */
async function releaseFreed(s: Qcow2State): Promise<void> {
  if (s.pendingFrees.length > 0) await s.lock.run(() => writeback(s));
}

/**
 * QEMU's discard_in_l2_slice over [offset, offset+bytes) (whole clusters):
 * with `full` the clusters become unallocated (they fall through to the
 * backing file), otherwise they read as zeroes where v3 allows it.
 * Callers hold the lock.
 */
export async function clusterDiscard(s: Qcow2State, offset: number, bytes: number, type: DiscardType, full: boolean): Promise<void> {
  const cs = s.clusterSize;
  const end = offset + bytes;
  let cur = offset;
  while (cur < end) {
    const gci = Math.floor(cur / cs);
    const l1i = Math.floor(gci / s.l2Entries);
    const tableEnd = (l1i + 1) * s.l2Entries * cs;
    // Like QEMU's discard_in_l2_slice (through get_cluster_table), a missing L2 table is allocated even
    // where the range already reads as the discard wants: image layouts stay the same as QEMU's. A full
    // discard (shrink, make_empty) skips tables it covers entirely: a shrink drops those right after, and
    // allocating thousands of empty tables for make_empty would only cost time.
    const [l1hi, l1lo] = l1Words(s, l1i);
    if (full && entryOffset(l1hi, l1lo) === 0 && l1i * s.l2Entries * cs >= offset && tableEnd <= end) {
      cur = tableEnd;
      continue;
    }
    const ref = await writableSlice(s, gci);
    try {
      const l2Offset = entryOffset(...l1Words(s, l1i));
      const stop = Math.min(end, (gci + ref.room) * cs);
      for (let c = gci, i = ref.index; c * cs < stop; c++, i++) {
        await validateEntry(s, ref, i, l2Offset);
        const old = getEntry(s, ref.slice, i);
        const allocated = hasHost(s, old) || (old.hi & HI_COMPRESSED) !== 0;
        let e = { ...old };
        if (full) {
          e = { hi: 0, lo: 0, zero: 0, alloc: 0 };
        } else if (s.bs.backing || allocated) {
          if (s.l2EntryBytes === 16) e = { hi: 0, lo: 0, zero: ALL, alloc: 0 };
          else e = { hi: 0, lo: s.header.version >= 3 ? LO_ZERO : 0, zero: 0, alloc: 0 };
        }
        if (sameEntry(e, old)) continue;
        putEntry(s, ref.slice, i, e);
        sliceChanged(s, ref);
        if (allocated) {
          freeEntry(s, old.hi, old.lo, type);
          if (old.hi & HI_COMPRESSED) forgetCompressed(s);
        }
      }
      cur = stop;
    } finally {
      s.l2Cache.release(ref.offset);
    }
  }
}

/** The driver's pdiscard (QEMU's qcow2_co_pdiscard): whole clusters only, except the partial one at the end of the image. */
export async function qcow2Pdiscard(bs: BlockNode, offset: number, bytes: number): Promise<void> {
  const s = state(bs);
  checkUsable(s);
  const cs = s.clusterSize;
  if ((offset % cs !== 0 || bytes % cs !== 0) && (offset % cs !== 0 || offset + bytes !== bs.totalBytes)) {
    throw new BlockError('ENOTSUP', undefined, { node: bs.nodeName });
  }
  await s.lock.run(() => clusterDiscard(s, offset, bytes, 'request', false));
  await releaseFreed(s);
}

// ---------------------------------------------------------------------------
// Compressed writes

/** Sector count field and entry for a compressed cluster at `host` of `len` bytes (qcow2_alloc_compressed_cluster_offset). */
function compressedEntry(s: Qcow2State, host: number, len: number): Entry {
  const sectors = Math.floor((host + len - 1) / 512) - Math.floor(host / 512);
  const shift = BigInt(62 - (s.clusterBits - 8));
  const v = BigInt(host) | (BigInt(sectors) << shift) | (1n << 62n);
  return { hi: Number(v >> 32n) >>> 0, lo: Number(v & 0xffffffffn) >>> 0, zero: 0, alloc: 0 };
}

/**
 * The driver's pwritevCompressed (QEMU's qcow2_co_pwritev_compressed_part):
 * a cluster-aligned range compressed cluster by cluster, never over an
 * allocated cluster; only the image's last cluster may be partial.
 */
export async function qcow2PwritevCompressed(bs: BlockNode, offset: number, bytes: number, buf: Uint8Array): Promise<void> {
  const s = state(bs);
  checkUsable(s);
  const cs = s.clusterSize;
  if (s.hasDataFile) throw new BlockError('ENOTSUP', 'Compression is not supported with an external data file', { node: bs.nodeName });
  if (offset % cs !== 0) throw new BlockError('EINVAL', undefined, { node: bs.nodeName });
  if (bytes % cs !== 0 && offset + bytes !== bs.totalBytes) throw new BlockError('EINVAL', undefined, { node: bs.nodeName });
  // QEMU compresses up to QCOW2_MAX_WORKERS clusters at once: a failing cluster does not stop the ones
  // already under way, so later clusters up to that window are still written before the error returns.
  const WORKERS = 8;
  let firstError: { index: number; error: unknown } | undefined;
  for (let i = 0, done = 0; done < bytes; i++, done += cs) {
    if (firstError && firstError.index <= i - WORKERS) break;
    const chunk = Math.min(cs, bytes - done);
    try {
      await writeCompressedCluster(s, offset + done, chunk, buf.subarray(done, done + chunk));
    } catch (e) {
      firstError ??= { index: i, error: e };
    }
  }
  if (firstError) throw firstError.error;
}

/** Compresses one guest cluster (`bytes` short only at the image end) into a fresh host range, or writes it plainly if it does not shrink. */
async function writeCompressedCluster(s: Qcow2State, offset: number, bytes: number, buf: Uint8Array): Promise<void> {
  const bs = s.bs;
  const cs = s.clusterSize;
  let data = buf.subarray(0, bytes);
  if (bytes !== cs) {
    // The last cluster of an unaligned image is padded with zeroes.
    data = new Uint8Array(cs);
    data.set(buf.subarray(0, bytes));
  }
  const out = await compressCluster(s.header.compressionType, data, cs - 1);
  if (!out) {
    // Incompressible: QEMU writes it as a normal cluster.
    await qcow2Pwritev(bs, offset, bytes, buf);
    return;
  }
  await s.lock.run(async () => {
    const gci = offset / cs;
    const ref = await writableSlice(s, gci);
    try {
      const old = getEntry(s, ref.slice, ref.index);
      // Compression cannot overwrite anything (QEMU fails with EIO).
      if (entryOffset(old.hi, old.lo) !== 0) throw new BlockError('EIO', undefined, { node: bs.nodeName });
      const host = await allocBytes(s, out.length);
      await overlapCheck(s, 0, host, out.length);
      await ev(s, 'write_compressed');
      await bdrvPwritev(s.bs.file!, host, out.length, out);
      await ev(s, 'l2_update_compressed');
      putEntry(s, ref.slice, ref.index, compressedEntry(s, host, out.length));
      sliceChanged(s, ref);
      forgetCompressed(s);
    } finally {
      s.l2Cache.release(ref.offset);
    }
  });
}

// ---------------------------------------------------------------------------
// L1 growth and shrinking, resize

/**
 * Replaces the L1 table with one of at least `minSize` entries (QEMU's
 * qcow2_grow_l1_table): everything pending is written first, the new table
 * is written and made durable, then one header write switches to it.
 */
export async function growL1(s: Qcow2State, minSize: number, exact: boolean): Promise<void> {
  const old = s.header.l1Size;
  if (minSize <= old) return;
  let size = minSize;
  if (!exact) {
    size = Math.max(old, 1);
    while (size < minSize) size = Math.ceil((size * 3) / 2);
  }
  if (size * 8 > LIMITS.MAX_L1_SIZE) throw new BlockError('EFBIG', 'File too large', { node: s.bs.nodeName });
  const cs = s.clusterSize;
  await writeback(s);
  await barrier(s);
  const bytes = Math.ceil((size * 8) / cs) * cs;
  await ev(s, 'l1_grow_alloc_table');
  const { offset } = await allocClusters(s, bytes / cs);
  // The new table's refcounts must be on disk before the header names it.
  await writeback(s);
  const table = new Uint8Array(bytes);
  table.set(s.l1.subarray(0, old * 8));
  // Only the entries are written (as QEMU does), so the file ends where the table does.
  await overlapCheck(s, 0, offset, size * 8);
  await ev(s, 'l1_grow_write_table');
  await bdrvPwritev(s.bs.file!, offset, size * 8, table.subarray(0, size * 8));
  await barrier(s);
  await ev(s, 'l1_grow_activate_table');
  const hdr = new Uint8Array(12);
  const dv = new DataView(hdr.buffer);
  dv.setUint32(0, size);
  dv.setBigUint64(4, BigInt(offset));
  await bdrvPwritev(s.bs.file!, HDR.l1Size, 12, hdr);
  await barrier(s);
  const oldOffset = s.header.l1TableOffset;
  s.l1 = table;
  s.mapping.l1 = table;
  s.mapping.l1Size = size;
  s.header.l1Size = size;
  s.header.l1TableOffset = offset;
  if (old > 0) {
    // The header names the new table durably, so the old one is free now, as in QEMU: the next allocation may take it.
    queueFree(s, oldOffset, Math.ceil((old * 8) / cs) * cs, 'other');
    await writeback(s);
  }
}

/** Drops the L2 tables past `newSize` L1 entries (QEMU's qcow2_shrink_l1_table); the L1 keeps its size. */
async function shrinkL1(s: Qcow2State, newSize: number): Promise<void> {
  const size = s.header.l1Size;
  if (newSize >= size) return;
  await writeback(s);
  await ev(s, 'l1_shrink_write_table');
  const off = s.header.l1TableOffset + newSize * 8;
  await overlapCheck(s, 1 << 1, off, (size - newSize) * 8);
  await bdrvPwritev(s.bs.file!, off, (size - newSize) * 8, new Uint8Array((size - newSize) * 8));
  await barrier(s);
  await ev(s, 'l1_shrink_free_l2_clusters');
  for (let i = size - 1; i >= newSize; i--) {
    const [hi, lo] = l1Words(s, i);
    const l2 = entryOffset(hi, lo);
    s.l1.fill(0, i * 8, i * 8 + 8);
    s.l1Dirty.delete(i);
    if (l2 <= 0) continue;
    // The table is unreachable on disk now; its cached slices must not be written back.
    s.l2Cache.discardRange(l2, s.clusterSize);
    queueFree(s, l2, s.clusterSize, 'always');
  }
}

/** Index of the last cluster with a nonzero refcount (QEMU's qcow2_get_last_cluster), or -1; walks the refcount blocks from the end. */
async function lastUsedCluster(s: Qcow2State): Promise<number> {
  const E = s.refcount.blockEntries;
  for (let b = s.refcount.tableSize - 1; b >= 0; b--) {
    if (s.refcount.tableEntry(b) === 0) continue;
    for (let c = (b + 1) * E - 1; c >= b * E; c--) {
      if ((await getRefcount(s, c)) > 0) return c;
    }
  }
  return -1;
}

/**
 * Allocates host clusters for every cluster of [from, to) that has none
 * (QEMU's preallocate_co): one L2 slice at a time, its table first and then
 * one contiguous run for the clusters that need one, as QEMU's
 * qcow2_alloc_host_offset places them.
 */
async function preallocate(s: Qcow2State, from: number, to: number): Promise<void> {
  const cs = s.clusterSize;
  let c = Math.floor(from / cs);
  const endCluster = Math.ceil(to / cs);
  while (c < endCluster) {
    const ref = await writableSlice(s, c);
    try {
      const stop = Math.min(endCluster, c + ref.room);
      // Clusters that already have a host cluster (or are compressed) keep it and split the runs.
      const needs = (k: number): boolean => {
        const e = getEntry(s, ref.slice, ref.index + k);
        return !hasHost(s, e) && !(e.hi & HI_COMPRESSED);
      };
      let k = 0;
      while (c + k < stop) {
        if (!needs(k)) { k++; continue; }
        let n = 1;
        while (c + k + n < stop && needs(k + n)) n++;
        const host = s.hasDataFile ? (c + k) * cs : (await allocClusters(s, n)).offset;
        for (let j = 0; j < n; j++) linkPreallocated(s, ref, k + j, s.hasDataFile ? (c + k + j) * cs : host + j * cs);
        sliceChanged(s, ref);
        k += n;
      }
      c = stop;
    } finally {
      s.l2Cache.release(ref.offset);
    }
  }
}

/** Points entry `k` (from the slice's wanted index) at preallocated `host`; extended entries keep their bitmap, the subclusters stay unallocated like QEMU's. */
function linkPreallocated(s: Qcow2State, ref: SliceRef, k: number, host: number): void {
  const old = getEntry(s, ref.slice, ref.index + k);
  const [hi, lo] = offsetWords(host, HI_COPIED);
  putEntry(s, ref.slice, ref.index + k, s.l2EntryBytes === 16 ? { hi, lo, zero: old.zero, alloc: old.alloc } : { hi, lo, zero: 0, alloc: 0 });
}

/**
 * falloc/full growth without a data file (QEMU's qcow2_co_truncate): the
 * refcount structures for the new clusters go at the end of the file, the
 * data clusters in one run after them, the file is extended over the run
 * with the preallocation mode, and only then do L2 entries point at it.
 */
async function preallocateFile(s: Qcow2State, old: number, offset: number, prealloc: PreallocMode): Promise<void> {
  const cs = s.clusterSize;
  const len = await bdrvGetLength(s.bs.file!.bs);
  const last = await lastUsedCluster(s);
  const oldFileClusters = last >= 0 ? last + 1 : Math.ceil(len / cs);
  const first = Math.floor(old / cs);
  const n = Math.ceil(offset / cs) - first;
  if (n <= 0) return;
  // An overestimate of the L2 tables (one more for an unaligned head or tail): the refcount
  // structures must cover them so that linking never needs a new refcount block.
  const l2Tables = Math.ceil(n / s.l2Entries) + 1;
  const start = await refcountArea(s, oldFileClusters, n + l2Tables);
  // The area past the new structures is free by construction (QEMU's qcow2_alloc_clusters_at).
  await updateRefcounts(s, start, n, 1);
  try {
    await bdrvTruncate(s.bs.file!, (start + n) * cs, false, prealloc);
  } catch (e) {
    await abortAllocation(s, start * cs, n);
    throw new BlockError(toBlockError(e).code, `Failed to resize underlying file: ${toBlockError(e).message}`, { node: s.bs.nodeName, cause: e });
  }
  let c = first;
  let host = start * cs;
  while (c < first + n) {
    const ref = await writableSlice(s, c);
    try {
      const count = Math.min(first + n - c, ref.room);
      for (let j = 0; j < count; j++) {
        const e = getEntry(s, ref.slice, ref.index + j);
        // The cluster straddling the old end may hold data already; QEMU moves it to the new cluster (cow_start).
        // The cluster straddling the old end keeps its head: QEMU links it with a copy-on-write of
        // [cluster start, old end), read through the old mapping (backing file included).
        const head = c + j === first ? old - first * cs : 0;
        if (head > 0) {
          const buf = new Uint8Array(head);
          await qcow2Preadv(s.bs, first * cs, head, buf, 0);
          await writeData(s, host + j * cs, buf);
        }
        linkPreallocated(s, ref, j, host + j * cs);
        if (hasHost(s, e) || e.hi & HI_COMPRESSED) freeEntry(s, e.hi, e.lo, 'never');
      }
      sliceChanged(s, ref);
      c += count;
      host += count * cs;
    } finally {
      s.l2Cache.release(ref.offset);
    }
  }
}

/** The driver's truncate (QEMU's qcow2_co_truncate): grows the L1 table, or discards the cropped clusters and drops their tables. */
export async function qcow2Truncate(bs: BlockNode, offset: number, exact: boolean, prealloc: PreallocMode, flags: number): Promise<void> {
  const s = state(bs);
  checkUsable(s);
  if (offset % 512 !== 0) throw new BlockError('EINVAL', 'The new size must be a multiple of 512', { node: bs.nodeName });
  // QEMU 7.2 resizes v3 images with snapshots (each snapshot keeps its own disk size); v2 has no room to record that.
  if (s.snapshots.length > 0 && s.header.version < 3) throw new BlockError('ENOTSUP', "Can't resize a v2 image which has snapshots", { node: bs.nodeName });
  await qcow2TruncateBitmapsCheck(bs, s);
  const old = s.header.size;
  const cs = s.clusterSize;
  const newL1 = Math.ceil(offset / (cs * s.l2Entries));
  await s.lock.run(async () => {
    const step = async (what: string, f: () => Promise<void>): Promise<void> => {
      try {
        await f();
      } catch (e) {
        const be = toBlockError(e);
        throw new BlockError(be.code, `${what}: ${be.message}`, { node: bs.nodeName, cause: e });
      }
    };
    if (offset < old) {
      if (prealloc !== 'off') throw new BlockError('ENOTSUP', "Preallocation can't be used for shrinking an image", { node: bs.nodeName });
      const from = Math.ceil(offset / cs) * cs;
      if (from < old) await step('Failed to discard cropped clusters', () => clusterDiscard(s, from, Math.ceil(old / cs) * cs - from, 'always', true));
      await step('Failed to reduce the number of L2 tables', () => shrinkL1(s, newL1));
      // The cropped clusters' references drop first, so the refcount blocks that count only them are seen empty.
      await step('Failed to discard unused refblocks', async () => {
        await writeback(s);
        await shrinkReftable(s);
      });
    } else {
      await step('Failed to grow the L1 table', () => growL1(s, newL1, true));
      if ((prealloc === 'falloc' || prealloc === 'full') && offset > old && !s.hasDataFile) {
        await preallocateFile(s, old, offset, prealloc);
      } else if (prealloc !== 'off' && offset > old) {
        await preallocate(s, Math.ceil(old / cs) * cs, offset);
        if (!s.hasDataFile) {
          // The file must cover the new clusters (QEMU's preallocate_co); falloc/full preallocate them there too.
          const len = await bdrvGetLength(s.bs.file!.bs);
          const end = ((await lastUsedCluster(s)) + 1) * cs;
          if (end > len) await bdrvTruncate(s.bs.file!, end, false, prealloc === 'metadata' ? 'off' : prealloc);
        }
      }
    }
    if (s.hasDataFile) await bdrvTruncate(s.dataFile, offset, exact, prealloc === 'metadata' ? 'off' : prealloc);
    await writeback(s);
    await barrier(s);
    const b = new Uint8Array(8);
    new DataView(b.buffer).setBigUint64(0, BigInt(offset));
    await bdrvPwritev(s.bs.file!, HDR.size, 8, b);
    await barrier(s);
    s.header.size = offset;
    s.l1VmStateIndex = newL1;
    if (offset < old && !s.hasDataFile) {
      const len = await bdrvGetLength(s.bs.file!.bs);
      const last = await lastUsedCluster(s);
      if ((last + 1) * cs < len) {
        try {
          await bdrvTruncate(s.bs.file!, (last + 1) * cs, false, 'off');
        } catch (e) {
          bs.graph.onWarning(`Failed to truncate the tail of the image: ${toBlockError(e).message}`);
        }
      }
    }
  });
  bs.totalBytes = Math.floor(offset / 512) * 512;
  if (flags & REQ.ZERO_WRITE && offset > old) {
    // The new area must read as zeroes even where an earlier shrink left data in the last cluster.
    const start = Math.ceil(old / s.subclusterSize) * s.subclusterSize;
    if (start > old) await qcow2Pwritev(bs, old, Math.min(start, offset) - old, new Uint8Array(Math.min(start, offset) - old));
    if (offset > start) await qcow2PwriteZeroes(bs, start, offset - start, 0);
  }
}

/** Refcount of the cluster holding `offset` (for tests and check). */
export async function refcountAt(bs: BlockNode, offset: number): Promise<number> {
  const s = state(bs);
  return getRefcount(s, Math.floor(offset / s.clusterSize));
}
