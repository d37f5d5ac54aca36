/**
 * Internal snapshots, write side (QEMU's qcow2_snapshot_create / _goto /
 * _delete and qcow2_write_snapshots), and the VM state area
 * (qcow2_save_vmstate / qcow2_load_vmstate).
 *
 * Crash safety. A snapshot shares clusters with the active tables, so the
 * refcount of every cluster the active tables reach changes from 1 to 2 (or
 * back), and with it the COPIED flag of the active entries. Flags and
 * refcounts live in different sectors, so no write order keeps them equal
 * at every instant; the order here makes the only possible disagreement the
 * harmless one (COPIED clear while the refcount is 1: the next write copies
 * the cluster needlessly, and `qemu-img check -r all` sets the flag again),
 * never COPIED set on a shared cluster (which would let a write change the
 * snapshot), and refcounts never fall below the references on disk:
 *  - create: clear COPIED in the active tables, barrier, raise the
 *    refcounts, barrier, write the new snapshot table, barrier, switch the
 *    header to it in one sector write, barrier;
 *  - apply: clear COPIED in the snapshot's tables, raise their refcounts,
 *    barrier, write the snapshot's L1 (without COPIED) over the active one,
 *    barrier, drop the old active tree's references, recompute COPIED;
 *  - delete: switch to a table without the entry first, then drop the
 *    snapshot's references, then recompute COPIED.
 * Callers hold the image lock; the node is drained (core/img/snapshot.ts),
 * so no lock-free in-place write can race with a cluster becoming shared.
 */
import { BlockError, toBlockError } from '../../core/errors.ts';
import { bdrvPread, bdrvPwritev } from '../../core/io.ts';
import type { SnapshotInfo } from '../../core/driver.ts';
import type { BlockNode } from '../../core/node.ts';
import { allocClusters, barrier, checkUsable, getRefcount, overlapCheck, queueFree, signalCorruption, updateRefcounts, writeback } from './alloc.ts';
import { parseCompressedEntry } from './cluster.ts';
import { HDR, hex, LIMITS, validateTable } from './header.ts';
import type { Qcow2Snapshot } from './snapshot.ts';
import { entryOffset, forgetCompressed, HI_COMPRESSED, HI_COPIED, hiWord, loWord, OL, setL1, state, type DiscardType, type Qcow2State } from './state.ts';
import { growL1, qcow2Pwritev, qcow2Truncate } from './write.ts';
import { qcow2Preadv } from './read.ts';

/** Bytes of known extra data QEMU 7.2 writes for every entry (vm_state_size_large, disk_size, icount). */
const KNOWN_EXTRA = 24;
/** QEMU's QEMUSnapshotInfo keeps names in 256 bytes and ids in 128, both with the NUL. */
const MAX_NAME_BYTES = 255;

const enc = new TextEncoder();

// ---------------------------------------------------------------------------
// Snapshot table

/** Bytes the table takes on disk, or -1 past QCOW_MAX_SNAPSHOTS_SIZE (QEMU's size loop in qcow2_write_snapshots). */
export function snapshotTableSize(list: readonly Qcow2Snapshot[]): number {
  let off = 0;
  for (const sn of list) {
    off = Math.ceil(off / 8) * 8;
    off += LIMITS.SNAPSHOT_HEADER_SIZE + Math.max(KNOWN_EXTRA, sn.extraDataSize) + enc.encode(sn.id).length + enc.encode(sn.name).length;
    if (off > LIMITS.MAX_SNAPSHOTS_SIZE) return -1;
  }
  return off;
}

/** Serialises the table as QEMU 7.2 writes it: entries 8-aligned, at least 24 bytes of extra data each. */
export function serializeSnapshotTable(list: readonly Qcow2Snapshot[], size: number): Uint8Array {
  const buf = new Uint8Array(size);
  const dv = new DataView(buf.buffer);
  let off = 0;
  for (const sn of list) {
    off = Math.ceil(off / 8) * 8;
    const id = enc.encode(sn.id);
    const name = enc.encode(sn.name);
    const extraSize = Math.max(KNOWN_EXTRA, sn.extraDataSize);
    dv.setBigUint64(off, BigInt(sn.l1TableOffset));
    dv.setUint32(off + 8, sn.l1Size);
    dv.setUint16(off + 12, id.length);
    dv.setUint16(off + 14, name.length);
    dv.setUint32(off + 16, sn.dateSec >>> 0);
    dv.setUint32(off + 20, sn.dateNsec >>> 0);
    dv.setBigUint64(off + 24, BigInt(sn.vmClockNsec));
    // A VM state too large for 32 bits reads as a disk-only snapshot to old programs instead of a truncated one.
    dv.setUint32(off + 32, sn.vmStateSize <= 0xffffffff ? sn.vmStateSize : 0);
    dv.setUint32(off + 36, extraSize);
    off += LIMITS.SNAPSHOT_HEADER_SIZE;
    dv.setBigUint64(off, BigInt(sn.vmStateSize));
    dv.setBigUint64(off + 8, BigInt(sn.diskSize));
    // Entries read without an icount are written with -1, "unknown", as QEMU does.
    dv.setBigUint64(off + 16, sn.icount === undefined ? 0xffffffffffffffffn : BigInt.asUintN(64, BigInt(sn.icount)));
    off += KNOWN_EXTRA;
    if (sn.extraDataSize > KNOWN_EXTRA) {
      buf.set(sn.unknownExtraData.subarray(0, sn.extraDataSize - KNOWN_EXTRA), off);
      off += sn.extraDataSize - KNOWN_EXTRA;
    }
    buf.set(id, off);
    off += id.length;
    buf.set(name, off);
    off += name.length;
  }
  return buf;
}

/**
 * Replaces the snapshot table (QEMU's qcow2_write_snapshots): the new table
 * goes to newly allocated clusters, whose refcounts and contents are made
 * durable before one header write switches nb_snapshots and
 * snapshots_offset; the old table is freed afterwards.
 */
export async function writeSnapshotTable(s: Qcow2State, list: Qcow2Snapshot[]): Promise<void> {
  const size = snapshotTableSize(list);
  if (size < 0) throw new BlockError('EFBIG', undefined, { node: s.bs.nodeName });
  const cs = s.clusterSize;
  let offset = 0;
  if (size > 0) offset = (await allocClusters(s, Math.ceil(size / cs))).offset;
  try {
    await writeback(s);
    await barrier(s);
    if (size > 0) {
      // The header does not name these clusters yet, so they must be free of any metadata.
      await overlapCheck(s, 0, offset, size);
      const table = serializeSnapshotTable(list, size);
      await bdrvPwritev(s.bs.file!, offset, size, table);
      await barrier(s);
    }
    const hdr = new Uint8Array(12);
    const dv = new DataView(hdr.buffer);
    dv.setUint32(0, list.length);
    dv.setBigUint64(4, BigInt(offset));
    await bdrvPwritev(s.bs.file!, HDR.nbSnapshots, 12, hdr);
    await barrier(s);
  } catch (e) {
    if (size > 0) queueFree(s, offset, Math.ceil(size / cs) * cs, 'always');
    throw e;
  }
  const oldOffset = s.header.snapshotsOffset;
  const oldSize = s.snapshotsSize;
  s.header.nbSnapshots = list.length;
  s.header.snapshotsOffset = offset;
  if (s.header.raw) s.header.raw.snapshotsOffset = BigInt(offset);
  s.snapshots = list;
  s.snapshotsSize = size;
  if (oldSize > 0) queueFree(s, oldOffset, oldSize, 'snapshot');
}

// ---------------------------------------------------------------------------
// Walking a tree of tables

/** A reference the tree holds: `count` bytes from host `offset` (a table, a data cluster or a compressed run). */
type RefVisitor = (offset: number, length: number) => Promise<void> | void;

/** L2 table offset of L1 entry `i` of `l1`, 0 when absent; corrupt entries are signalled as QEMU does. */
async function l2OffsetOf(s: Qcow2State, l1: Uint8Array, i: number): Promise<number> {
  const hi = hiWord(l1, 8 * i);
  const lo = loWord(l1, 8 * i);
  const off = entryOffset(hi, lo);
  if (off < 0 || off % s.clusterSize !== 0) {
    throw await signalCorruption(s, `L2 table offset ${off < 0 ? 'beyond 2^53' : hex(off)} unaligned (L1 index: ${hex(i)})`);
  }
  return off;
}

/**
 * Calls `visit` for every cluster reference of the tree under `l1` (QEMU's
 * walk in qcow2_update_snapshot_refcount): each L2 table, each data cluster
 * (also preallocated zero clusters), each compressed run. L2 slices are read
 * through the cache, whose dirty slices are the truth.
 */
async function walkTree(s: Qcow2State, l1: Uint8Array, l1Size: number, visit: RefVisitor): Promise<void> {
  const cs = s.clusterSize;
  const eb = s.l2EntryBytes;
  const sliceEntries = s.mapping.l2SliceEntries;
  for (let i = 0; i < l1Size; i++) {
    const l2 = await l2OffsetOf(s, l1, i);
    if (l2 === 0) continue;
    await visit(l2, cs);
    for (let first = 0; first < s.l2Entries; first += sliceEntries) {
      const sliceOffset = l2 + first * eb;
      const slice = await s.mapping.loadL2Slice(sliceOffset, () => `L2 table offset ${hex(l2)} beyond the end of the image file (L1 index: ${hex(i)})`);
      for (let j = 0; j < sliceEntries; j++) {
        const hi = hiWord(slice, j * eb);
        const lo = loWord(slice, j * eb);
        if (hi & HI_COMPRESSED) {
          const c = parseCompressedEntry(hi, lo, s.clusterBits);
          await visit(c.offset, c.size);
          continue;
        }
        const off = entryOffset(hi, lo);
        if (off === 0) continue;
        if (off < 0 || off % cs !== 0) {
          throw await signalCorruption(s, `Cluster allocation offset ${off < 0 ? 'beyond 2^53' : hex(off)} unaligned (L2 offset: ${hex(l2)}, L2 index: ${hex(first + j)})`);
        }
        await visit(off, cs);
      }
    }
  }
}

/**
 * Adds one to the refcount of everything the tree references, in runs of
 * contiguous clusters. On failure (a refcount would overflow) every increment
 * made is taken back before the error propagates, so nothing changed.
 */
async function raiseTree(s: Qcow2State, l1: Uint8Array, l1Size: number): Promise<void> {
  const cs = s.clusterSize;
  const done: Array<[number, number]> = [];
  let runStart = -1;
  let runLen = 0;
  const flush = async (): Promise<void> => {
    if (runLen === 0) return;
    // updateRefcounts stops at the first overflow with the clusters before it already raised: check first,
    // so a run is raised whole or not at all (QEMU fails with EINVAL when a refcount would overflow).
    for (let c = runStart; c < runStart + runLen; c++) {
      if ((await getRefcount(s, c)) + 1 > s.refcount.max) throw new BlockError('EINVAL', `qcow2: refcount of cluster ${hex(c)} would overflow`, { node: s.bs.nodeName });
    }
    await updateRefcounts(s, runStart, runLen, 1);
    done.push([runStart, runLen]);
    runLen = 0;
  };
  try {
    await walkTree(s, l1, l1Size, async (offset, length) => {
      const first = Math.floor(offset / cs);
      const last = Math.floor((offset + length - 1) / cs);
      for (let c = first; c <= last; c++) {
        if (runLen > 0 && c === runStart + runLen) { runLen++; continue; }
        await flush();
        runStart = c;
        runLen = 1;
      }
    });
    await flush();
  } catch (e) {
    for (const [c, n] of done.reverse()) await updateRefcounts(s, c, n, -1).catch(() => undefined);
    throw e;
  }
}

/** Queues the release of every reference of the tree (the -1 pass); the refcounts drop at the next writeback. */
async function dropTree(s: Qcow2State, l1: Uint8Array, l1Size: number, type: DiscardType): Promise<void> {
  await walkTree(s, l1, l1Size, (offset, length) => queueFree(s, offset, length, type));
}

/**
 * Pins the L2 slice at `offset` for a change, making room in the cache by a
 * writeback when every entry is dirty or pinned (as the write path does).
 */
async function pinSlice(s: Qcow2State, offset: number, describe: () => string): Promise<Uint8Array> {
  for (let attempt = 0; attempt <= 8; attempt++) {
    if (s.l2Cache.fullOfUnevictable && !s.l2Cache.peek(offset)) await writeback(s);
    const slice = await s.mapping.loadL2Slice(offset, describe);
    if (s.l2Cache.peek(offset) !== slice) continue;
    s.l2Cache.acquire(offset);
    return slice;
  }
  throw new BlockError('EIO', 'qcow2: no room in the L2 cache for a table being written', { node: s.bs.nodeName });
}

/**
 * Sets the COPIED flag of every entry of the tree under `l1` to what
 * `want(offset)` answers (false for compressed and unallocated entries),
 * changing L2 slices in the cache; `setL1Flag` receives the L1 entries.
 * Returns nothing; changed slices are dirty and reach disk at writeback.
 */
async function setCopiedFlags(s: Qcow2State, l1: Uint8Array, l1Size: number, want: (offset: number) => Promise<boolean>, setL1Flag: (i: number, l2: number, copied: boolean) => void): Promise<void> {
  const eb = s.l2EntryBytes;
  const sliceEntries = s.mapping.l2SliceEntries;
  for (let i = 0; i < l1Size; i++) {
    const l2 = await l2OffsetOf(s, l1, i);
    if (l2 === 0) continue;
    for (let first = 0; first < s.l2Entries; first += sliceEntries) {
      const sliceOffset = l2 + first * eb;
      const slice = await pinSlice(s, sliceOffset, () => `L2 table offset ${hex(l2)} beyond the end of the image file (L1 index: ${hex(i)})`);
      try {
        let changed = false;
        for (let j = 0; j < sliceEntries; j++) {
          const o = j * eb;
          const hi = hiWord(slice, o);
          const lo = loWord(slice, o);
          let copied = false;
          if (!(hi & HI_COMPRESSED)) {
            const off = entryOffset(hi, lo);
            if (off > 0) copied = await want(off);
          }
          if (((hi & HI_COPIED) !== 0) !== copied) {
            const nhi = copied ? (hi | HI_COPIED) >>> 0 : (hi & ~HI_COPIED) >>> 0;
            slice[o] = nhi >>> 24;
            changed = true;
          }
        }
        if (changed) s.l2Cache.markDirty(sliceOffset);
      } finally {
        s.l2Cache.release(sliceOffset);
      }
    }
    const copied = await want(l2);
    if (((hiWord(l1, 8 * i) & HI_COPIED) !== 0) !== copied) setL1Flag(i, l2, copied);
  }
}

/** QEMU's qcow2_update_snapshot_refcount with addend 0 on the active tables: COPIED exactly where the refcount is 1. */
async function recomputeActiveCopied(s: Qcow2State): Promise<void> {
  const cs = s.clusterSize;
  await setCopiedFlags(s, s.l1, s.mapping.l1Size, async (off) => (await getRefcount(s, Math.floor(off / cs))) === 1, (i, l2, copied) => setL1(s, i, l2, copied));
}

/** Clears COPIED everywhere in the active tables (they are about to be shared). */
async function clearActiveCopied(s: Qcow2State): Promise<void> {
  await setCopiedFlags(s, s.l1, s.mapping.l1Size, async () => false, (i, l2) => setL1(s, i, l2, false));
}

/** A copy of an L1 table with every COPIED flag cleared (a snapshot's tables are never written in place). */
function withoutCopied(l1: Uint8Array, bytes: number): Uint8Array {
  const out = new Uint8Array(bytes);
  out.set(l1.subarray(0, Math.min(bytes, l1.length)));
  for (let o = 0; o < out.length; o += 8) out[o] = out[o]! & 0x7f;
  return out;
}

// ---------------------------------------------------------------------------
// The driver operations

/** QEMU's find_new_snapshot_id: one more than the largest id that parses as a number. */
function newSnapshotId(list: readonly Qcow2Snapshot[]): string {
  let max = 0n;
  for (const sn of list) {
    const m = /^\s*[+]?(\d+)/.exec(sn.id);
    if (m) {
      const v = BigInt(m[1]!);
      if (v > max) max = v;
    }
  }
  return String(max + 1n);
}

/** QEMU's find_snapshot_by_id_and_name; -1 when nothing matches. */
export function findSnapshot(list: readonly Qcow2Snapshot[], id: string | undefined, name: string | undefined): number {
  if (id !== undefined && name !== undefined) return list.findIndex((sn) => sn.id === id && sn.name === name);
  if (id !== undefined) return list.findIndex((sn) => sn.id === id);
  if (name !== undefined) return list.findIndex((sn) => sn.name === name);
  return -1;
}

/** Truncates a string to at most `max` UTF-8 bytes (pstrcpy into QEMUSnapshotInfo's fixed arrays). */
function clampUtf8(str: string, max: number): string {
  const b = enc.encode(str);
  if (b.length <= max) return str;
  return new TextDecoder().decode(b.subarray(0, max)).replace(/\uFFFD+$/, '');
}

/** Refuses operations QEMU refuses before touching anything. */
function checkWritable(s: Qcow2State): void {
  checkUsable(s);
  if (s.bs.readOnly) throw new BlockError('EACCES', undefined, { node: s.bs.nodeName });
}

/** QEMU's qcow2_snapshot_create: a new snapshot of the active tables, with a fresh id. */
export async function qcow2SnapshotCreate(bs: BlockNode, info: SnapshotInfo): Promise<void> {
  const s = state(bs);
  checkWritable(s);
  if (s.snapshots.length >= LIMITS.MAX_SNAPSHOTS) throw new BlockError('EFBIG', undefined, { node: bs.nodeName });
  if (s.hasDataFile) throw new BlockError('ENOTSUP', undefined, { node: bs.nodeName });
  await s.lock.run(async () => {
    await writeback(s);
    await barrier(s);
    const cs = s.clusterSize;
    const l1Size = s.mapping.l1Size;
    const sn: Qcow2Snapshot = {
      l1TableOffset: 0,
      l1Size,
      id: newSnapshotId(s.snapshots),
      name: clampUtf8(info.name, MAX_NAME_BYTES),
      diskSize: bs.totalBytes,
      vmStateSize: info.vmStateSize,
      dateSec: info.dateSec,
      dateNsec: info.dateNsec,
      vmClockNsec: info.vmClockNsec,
      icount: info.icount ?? 0,
      extraDataSize: KNOWN_EXTRA,
      unknownExtraData: new Uint8Array(0),
    };
    info.id = sn.id;
    const l1Bytes = l1Size * 8;
    const l1Clusters = Math.ceil(l1Bytes / cs);
    if (l1Clusters > 0) sn.l1TableOffset = (await allocClusters(s, l1Clusters)).offset;
    const freeCopy = (): void => {
      if (l1Clusters > 0) queueFree(s, sn.l1TableOffset, l1Clusters * cs, 'always');
    };
    try {
      if (l1Bytes > 0) {
        await overlapCheck(s, 0, sn.l1TableOffset, l1Bytes);
        await bdrvPwritev(bs.file!, sn.l1TableOffset, l1Bytes, withoutCopied(s.l1, l1Bytes));
      }
      await clearActiveCopied(s);
      await writeback(s);
      await barrier(s);
    } catch (e) {
      freeCopy();
      await recomputeActiveCopied(s).catch(() => undefined);
      throw e;
    }
    try {
      await raiseTree(s, s.l1, l1Size);
      await writeback(s);
      await barrier(s);
    } catch (e) {
      freeCopy();
      await recomputeActiveCopied(s).catch(() => undefined);
      await writeback(s).catch(() => undefined);
      throw e;
    }
    try {
      await writeSnapshotTable(s, [...s.snapshots, sn]);
    } catch (e) {
      // Not switched in: take the references back (the copy of the L1 table is not on the list, so nothing else needs them).
      await dropTree(s, s.l1, l1Size, 'never').catch(() => undefined);
      freeCopy();
      await writeback(s).catch(() => undefined);
      await recomputeActiveCopied(s).catch(() => undefined);
      await writeback(s).catch(() => undefined);
      throw e;
    }
    await writeback(s);
    await barrier(s);
  });
}

/**
 * QEMU's qcow2_snapshot_goto: the snapshot's tables become the active ones
 * (the disk is resized to the snapshot's size first when it differs).
 */
export async function qcow2SnapshotGoto(bs: BlockNode, idOrName: string): Promise<void> {
  const s = state(bs);
  checkWritable(s);
  if (s.hasDataFile) throw new BlockError('ENOTSUP', undefined, { node: bs.nodeName });
  let idx = findSnapshot(s.snapshots, idOrName, undefined);
  if (idx < 0) idx = findSnapshot(s.snapshots, undefined, idOrName);
  if (idx < 0) throw new BlockError('ENOENT', undefined, { node: bs.nodeName });
  const sn = s.snapshots[idx]!;
  validateSnapshotL1(s, sn);
  // QEMU 7.2 resizes the disk to the snapshot's size first (it reports why when that fails; callers see the errno).
  if (sn.diskSize !== bs.totalBytes) await qcow2Truncate(bs, sn.diskSize, true, 'off', 0);
  await s.lock.run(async () => {
    await writeback(s);
    await barrier(s);
    await growL1(s, sn.l1Size, true);
    const curBytes = s.mapping.l1Size * 8;
    const snL1 = new Uint8Array(curBytes);
    if (sn.l1Size > 0) snL1.set(await bdrvPread(bs.file!, sn.l1TableOffset, sn.l1Size * 8));
    // The snapshot's own tables first: nothing active reads them yet, and shared entries must not claim COPIED.
    await setCopiedFlags(s, snL1, sn.l1Size, async () => false, () => undefined);
    await writeback(s);
    await barrier(s);
    await raiseTree(s, snL1, sn.l1Size);
    await writeback(s);
    await barrier(s);
    const newL1 = withoutCopied(snL1, curBytes);
    const oldL1 = s.l1.slice();
    if (curBytes > 0) {
      await overlapCheck(s, OL.ACTIVE_L1, s.header.l1TableOffset, curBytes);
      await bdrvPwritev(bs.file!, s.header.l1TableOffset, curBytes, newL1);
      await barrier(s);
    }
    s.l1.set(newL1);
    s.l1Dirty.clear();
    delete s.metadataPreallocation;
    await dropTree(s, oldL1, s.mapping.l1Size, 'snapshot');
    await writeback(s);
    await barrier(s);
    // The old tree's tables are gone or unchanged; cached slices of freed ones were dropped with them.
    s.l2Cache.invalidate();
    await recomputeActiveCopied(s);
    await writeback(s);
    await barrier(s);
  });
}

/** QEMU's qcow2_validate_table on a snapshot's L1 table. */
function validateSnapshotL1(s: Qcow2State, sn: Qcow2Snapshot): void {
  validateTable(BigInt(sn.l1TableOffset), sn.l1Size, 8, LIMITS.MAX_L1_SIZE, s.clusterSize, 'Snapshot L1 table');
}

/** QEMU's qcow2_snapshot_delete: the entry leaves the table first, then its references are dropped. */
export async function qcow2SnapshotDelete(bs: BlockNode, id: string | undefined, name: string | undefined): Promise<void> {
  const s = state(bs);
  checkWritable(s);
  if (s.hasDataFile) throw new BlockError('ENOTSUP', undefined, { node: bs.nodeName });
  await s.lock.run(async () => {
    const idx = findSnapshot(s.snapshots, id, name);
    if (idx < 0) throw new BlockError('ENOENT', "Can't find the snapshot", { node: bs.nodeName });
    const sn = s.snapshots[idx]!;
    validateSnapshotL1(s, sn);
    await writeback(s);
    await barrier(s);
    try {
      await writeSnapshotTable(s, s.snapshots.filter((_, i) => i !== idx));
    } catch (e) {
      const be = toBlockError(e);
      throw new BlockError(be.code, `Failed to remove snapshot from snapshot list: ${be.message}`, { node: bs.nodeName });
    }
    const step = async (what: string, f: () => Promise<void>): Promise<void> => {
      try {
        await f();
      } catch (e) {
        const be = toBlockError(e);
        throw new BlockError(be.code, `${what}: ${be.message}`, { node: bs.nodeName });
      }
    };
    await step('Failed to free the cluster and L1 table', async () => {
      const l1 = sn.l1Size > 0 ? await bdrvPread(bs.file!, sn.l1TableOffset, sn.l1Size * 8) : new Uint8Array(0);
      await dropTree(s, l1, sn.l1Size, 'snapshot');
      queueFree(s, sn.l1TableOffset, sn.l1Size * 8, 'snapshot');
      await writeback(s);
      await barrier(s);
    });
    await step('Failed to update snapshot status in disk', async () => {
      await recomputeActiveCopied(s);
      await writeback(s);
      await barrier(s);
    });
  });
}

/**
 * QEMU's qcow2_snapshot_load_tmp: a read-only node reads through the
 * snapshot's L1 table from now on (the disk keeps its current size; the
 * snapshot's table may be shorter, the rest reads as unallocated).
 */
export async function qcow2SnapshotLoadTmp(bs: BlockNode, id: string | undefined, name: string | undefined): Promise<void> {
  const s = state(bs);
  if (!bs.readOnly) throw new BlockError('EPERM', 'Device is writable, cannot load a snapshot temporarily', { node: bs.nodeName });
  const idx = findSnapshot(s.snapshots, id, name);
  if (idx < 0) throw new BlockError('ENOENT', "Can't find snapshot", { node: bs.nodeName });
  const sn = s.snapshots[idx]!;
  validateSnapshotL1(s, sn);
  let l1: Uint8Array;
  try {
    l1 = sn.l1Size > 0 ? await bdrvPread(bs.file!, sn.l1TableOffset, sn.l1Size * 8) : new Uint8Array(0);
  } catch (e) {
    throw new BlockError(toBlockError(e).code, 'Failed to read l1 table for snapshot', { node: bs.nodeName, cause: e });
  }
  await s.lock.run(async () => {
    s.l1 = l1;
    s.mapping.l1 = l1;
    s.mapping.l1Size = sn.l1Size;
    s.header.l1Size = sn.l1Size;
    s.header.l1TableOffset = sn.l1TableOffset;
    s.l1Dirty.clear();
    delete s.metadataPreallocation;
    forgetCompressed(s);
  });
}

// ---------------------------------------------------------------------------
// VM state

/** Guest offset where the VM state area starts (QEMU's qcow2_vm_state_offset). */
export function vmStateOffset(s: Qcow2State): number {
  return s.l1VmStateIndex * s.clusterSize * s.l2Entries;
}

/** QEMU's qcow2_save_vmstate: a write past the disk, through the driver's own write path. */
export async function qcow2SaveVmstate(bs: BlockNode, buf: Uint8Array, pos: number): Promise<void> {
  const s = state(bs);
  checkWritable(s);
  await qcow2Pwritev(bs, vmStateOffset(s) + pos, buf.length, buf);
}

/** QEMU's qcow2_load_vmstate: a read past the disk; what was never written reads as zeroes. */
export async function qcow2LoadVmstate(bs: BlockNode, buf: Uint8Array, pos: number): Promise<void> {
  const s = state(bs);
  await qcow2Preadv(bs, vmStateOffset(s) + pos, buf.length, buf, 0);
}
