/**
 * Emptying the active layer of a qcow2 image (QEMU's qcow2_make_empty), as
 * `qemu-img commit` does after copying the top image down so that it reads
 * through to its backing file again.
 *
 * Fast path (QEMU's make_completely_empty): a v3 image with nothing but the
 * active layer (no snapshots, bitmaps, encryption header or data file) is
 * rebuilt in place as header, refcount table, one refcount block and an
 * all-zero L1 table, and the file is cut after them. The dirty bit is set
 * first, so a crash at any step leaves an image the next read-write open
 * repairs (the refcounts are rebuilt from the tables, which are only ever
 * empty or old-and-valid).
 *
 * Otherwise every guest cluster is discarded with "full" semantics (the
 * entries become unallocated, not zero), through the normal write path.
 */
import { toBlockError } from '../../core/errors.ts';
import { bdrvFlush, bdrvPwritev, bdrvTruncate } from '../../core/io.ts';
import type { BlockNode } from '../../core/node.ts';
import { barrier, checkUsable, writeback, writeHeaderRaw } from './alloc.ts';
import { CRYPT, INCOMPAT } from './header.ts';
import { refcountKernel } from './refcount.ts';
import { forgetCompressed, state, type Qcow2State } from './state.ts';
import { clusterDiscard } from './write.ts';

/** Whether the image qualifies for the in-place rebuild (QEMU's conditions in qcow2_make_empty). */
export function canRebuildEmpty(s: Qcow2State): boolean {
  const l1Clusters = Math.ceil((s.header.l1Size * 8) / s.clusterSize);
  return (
    s.header.version >= 3 &&
    s.snapshots.length === 0 &&
    s.header.nbSnapshots === 0 &&
    !s.ext.bitmaps &&
    3 + l1Clusters <= s.refcount.blockEntries &&
    s.header.cryptMethod !== CRYPT.LUKS &&
    !s.hasDataFile
  );
}

/** The driver's makeEmpty: every guest cluster of the active layer becomes unallocated. */
export async function qcow2MakeEmpty(bs: BlockNode): Promise<void> {
  const s = state(bs);
  checkUsable(s);
  if (canRebuildEmpty(s)) {
    await s.lock.run(() => rebuildEmpty(s));
    return;
  }
  // Slow path: discard in steps, each one under the lock so other requests interleave.
  const end = bs.totalBytes;
  const step = Math.floor(0x7fffffff / s.clusterSize) * s.clusterSize;
  for (let offset = 0; offset < end; offset += step) {
    const n = Math.min(step, end - offset);
    // After a commit the freed clusters are snapshot-like garbage: QEMU passes them down as snapshot discards.
    await s.lock.run(() => clusterDiscard(s, offset, Math.ceil(n / s.clusterSize) * s.clusterSize, 'snapshot', true));
  }
  await s.lock.run(() => writeback(s));
}

/** QEMU's make_completely_empty, ordered so that every intermediate state is repairable. Callers hold the lock. */
async function rebuildEmpty(s: Qcow2State): Promise<void> {
  const bs = s.bs;
  const file = bs.file!;
  const cs = s.clusterSize;
  const h = s.header;
  const l1Clusters = Math.ceil((h.l1Size * 8) / cs);
  // Whatever the caches hold must be on disk before the structures they belong to disappear.
  await writeback(s);
  await barrier(s);

  // 1. Dirty bit: from here on a crash means "rebuild the refcounts on open".
  const wasDirty = (h.incompatibleFeatures & INCOMPAT.DIRTY) !== 0n;
  if (!wasDirty) {
    h.incompatibleFeatures |= INCOMPAT.DIRTY;
    await writeHeaderRaw(s);
    await bdrvFlush(file.bs);
  }
  try {
    // 2. The active L1 table in place becomes empty: the mapping is now "nothing allocated".
    if (h.l1Size > 0) {
      await bdrvPwritev(file, h.l1TableOffset, h.l1Size * 8, new Uint8Array(h.l1Size * 8));
      await bdrvFlush(file.bs);
    }
    // 3. Zero clusters 1 .. 2+l1Clusters, where the new reftable, refblock and L1 go. An old L1 there reads empty, as
    //    step 2 left it; an old reftable there loses its entries, which only the repair reads while the dirty bit is set.
    await bdrvPwritev(file, cs, (2 + l1Clusters) * cs, new Uint8Array((2 + l1Clusters) * cs));
    await bdrvFlush(file.bs);
    // 4. One header write points at the new (empty) reftable and L1.
    const oldReftableOffset = h.refcountTableOffset;
    const oldReftableClusters = h.refcountTableClusters;
    const oldL1Offset = h.l1TableOffset;
    h.refcountTableOffset = cs;
    h.refcountTableClusters = 1;
    h.l1TableOffset = 3 * cs;
    try {
      await writeHeaderRaw(s);
      await bdrvFlush(file.bs);
    } catch (e) {
      h.refcountTableOffset = oldReftableOffset;
      h.refcountTableClusters = oldReftableClusters;
      h.l1TableOffset = oldL1Offset;
      throw e;
    }
    // 5. The refcount block counts header, reftable, itself and the L1 table; then the reftable points at it.
    const used = 3 + l1Clusters;
    const block = new Uint8Array(cs);
    const k = refcountKernel();
    for (let i = 0; i < used; i++) k.set(block, i, s.refcount.order, 1);
    await bdrvPwritev(file, 2 * cs, cs, block);
    await bdrvFlush(file.bs);
    const table = new Uint8Array(cs);
    new DataView(table.buffer).setBigUint64(0, BigInt(2 * cs));
    await bdrvPwritev(file, cs, 8, table.subarray(0, 8));
    await bdrvFlush(file.bs);
    // 6. Memory follows the file.
    s.l2Cache.invalidate();
    s.refcountCache.invalidate();
    s.l1.fill(0);
    s.l1Dirty.clear();
    s.refcount.table = table;
    s.refcount.tableOffset = cs;
    s.pendingFrees = [];
    s.freeClusterIndex = 0;
    s.freeByteOffset = 0;
    forgetCompressed(s);
    delete s.metadataPreallocation;
    // 7. Everything past the new structures is garbage now.
    await bdrvTruncate(file, used * cs, false, 'off');
  } catch (e) {
    // The dirty bit stays set: the next read-write open repairs whatever step failed.
    s.dirtyMarked = true;
    throw toBlockError(e);
  }
  // 8. Consistent again: clear the dirty bit unless it was set before for lazy refcounts.
  if (!wasDirty) {
    h.incompatibleFeatures &= ~INCOMPAT.DIRTY;
    await writeHeaderRaw(s);
    await bdrvFlush(file.bs);
  }
}
