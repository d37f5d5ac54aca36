/**
 * Changing the refcount width of an open qcow2 image (QEMU's
 * qcow2_change_refcount_order): a complete second set of refcount blocks and
 * a refcount table in the new width is allocated through the old structures
 * (so, until the switch, it is only leaked space), filled from the old
 * refcounts, written and flushed; one header write then switches to it, and
 * the old blocks and table are freed through the new structures. A crash
 * before the header write leaves the old structures with some leaks; after
 * it, the new ones with some leaks.
 */
import { BlockError } from '../../core/errors.ts';
import { bdrvFlush, bdrvGetLength, bdrvPwritev } from '../../core/io.ts';
import { allocClusters, barrier, flushRefblocks, getRefcount, queueFree, updateRefcounts, writeback, writeHeaderRaw } from './alloc.ts';
import { hex, LIMITS } from './header.ts';
import { refcountKernel, RefcountState } from './refcount.ts';
import type { Qcow2State } from './state.ts';

/** Progress of one walk over the old refcount table: (done, total) in QEMU's units. */
export type WalkProgress = (done: number, total: number) => void;

/**
 * Refcounts through the current (old) structures, keeping the last block at
 * hand: the scans below visit clusters in order, so each block is looked up
 * once instead of once per cluster.
 */
function sequentialReader(s: Qcow2State): (c: number) => Promise<number> {
  const k = refcountKernel();
  let index = -1;
  let block: Uint8Array | null = null;
  return async (c) => {
    const E = s.refcount.blockEntries;
    const b = Math.floor(c / E);
    if (b !== index) {
      // getRefcount validates the block offset and loads it into the cache; the buffer stays valid while we use it.
      await getRefcount(s, c);
      const off = b < s.refcount.tableSize ? s.refcount.tableEntry(b) : 0;
      block = off !== 0 ? (s.refcountCache.peek(off) ?? null) : null;
      index = b;
      if (off !== 0 && !block) {
        index = -1;
        return getRefcount(s, c);
      }
    }
    return block ? k.get(block, c - b * E, s.refcount.order) : 0;
  };
}

/** Highest possible refcount for a width of 2^order bits. */
function maxRefcount(order: number): number {
  return order === 6 ? Number.MAX_SAFE_INTEGER : 2 ** (1 << order) - 1;
}

/**
 * Switches the image to refcounts of 2^`order` bits. Fails before changing
 * anything when a refcount does not fit the new width, with QEMU's message.
 * Callers hold the image lock.
 */
export async function changeRefcountOrder(s: Qcow2State, order: number, progress?: WalkProgress): Promise<void> {
  const cs = s.clusterSize;
  const file = s.bs.file!;
  await writeback(s);
  await barrier(s);
  const old = s.refcount;
  const oldTableSize = old.tableSize;
  const newEntries = (cs * 8) / 2 ** order;
  const newMax = maxRefcount(order);

  // Which new blocks are needed: one for every range holding a non-zero refcount. Scanning also checks the widths.
  const needed = new Set<number>();
  const fileClusters = Math.ceil((await bdrvGetLength(file.bs)) / cs);
  const scanEnd = Math.max(fileClusters, 0);
  const k = refcountKernel();
  // Progress as QEMU reports it: passes over the old refcount table ("walks"), each entry a unit. The first
  // pass (this scan and the first allocation round) and every further allocation round count Math.max(walk + 2, 3)
  // walks in all; the final pass that writes the new blocks knows it is the last.
  const R = oldTableSize;
  const report = (walk: number, entry: number, walks: number): void => progress?.(walk * R + entry, walks * R);
  const fullWalk = (walk: number, walks: number): void => {
    for (let j = 0; j < R; j++) report(walk, j, walks);
  };
  for (let t = 0; t < oldTableSize; t++) {
    report(0, t, 3);
    const blockOffset = old.tableEntry(t);
    if (blockOffset === 0) continue;
    const read = sequentialReader(s);
    for (let i = 0; i < old.blockEntries; i++) {
      const c = t * old.blockEntries + i;
      const rc = await read(c);
      if (rc === 0) continue;
      if (rc > newMax) {
        throw new BlockError('EINVAL', `Cannot decrease refcount entry width to ${2 ** order} bits: Cluster at offset ${hex(c * cs)} has a refcount of ${rc}`);
      }
      needed.add(Math.floor(c / newEntries));
    }
  }
  void scanEnd;

  // Allocate (through the old structures) until the new blocks and table count everything, themselves included.
  const blocks = new Map<number, number>();
  let table: { offset: number; entries: number } | null = null;
  const allocated: number[] = [];
  try {
    let walk = 0;
    for (;;) {
      if (walk > 0) fullWalk(walk, Math.max(walk + 2, 3));
      let changed = false;
      for (const b of [...needed].sort((a, c) => a - c)) {
        if (blocks.has(b)) continue;
        const { offset } = await allocClusters(s, 1);
        allocated.push(offset);
        blocks.set(b, offset);
        needed.add(Math.floor(offset / cs / newEntries));
        changed = true;
      }
      const entries = Math.max(...needed, 0) + 1;
      const tableClusters = Math.ceil((entries * 8) / cs);
      if (tableClusters * cs > LIMITS.MAX_REFTABLE_SIZE) throw new BlockError('EFBIG', 'Refcount table too large');
      if (!table || table.entries < entries) {
        if (table) {
          await updateRefcounts(s, table.offset / cs, Math.ceil((table.entries * 8) / cs), -1);
          allocated.splice(allocated.indexOf(table.offset), 1);
        }
        const { offset } = await allocClusters(s, tableClusters);
        allocated.push(offset);
        table = { offset, entries: (tableClusters * cs) / 8 };
        for (let c = 0; c < tableClusters; c++) needed.add(Math.floor((offset / cs + c) / newEntries));
        changed = true;
      }
      report(walk, R, Math.max(walk + 2, 3));
      walk++;
      if (!changed) break;
    }
    fullWalk(walk, walk + 1);

    // Fill and write the new blocks from the old refcounts (which now include the new structures).
    const tableBuf = new Uint8Array((Math.ceil((table!.entries * 8) / cs) * cs));
    const tdv = new DataView(tableBuf.buffer);
    const sorted = [...blocks].sort((a, b) => a[0] - b[0]);
    const read = sequentialReader(s);
    for (const [b, offset] of sorted) {
      const block = new Uint8Array(cs);
      for (let i = 0; i < newEntries; i++) {
        const rc = await read(b * newEntries + i);
        if (rc !== 0) k.set(block, i, order, rc);
      }
      await bdrvPwritev(file, offset, cs, block);
      tdv.setBigUint64(8 * b, BigInt(offset));
    }
    await bdrvPwritev(file, table!.offset, tableBuf.length, tableBuf);
    report(walk, R, walk + 1);
    // The old structures must count the new ones on disk before the header can name them.
    await flushRefblocks(s);
    await bdrvFlush(file.bs);

    // The switch: one header write.
    const h = s.header;
    const saved = { order: h.refcountOrder, offset: h.refcountTableOffset, clusters: h.refcountTableClusters };
    h.refcountOrder = order;
    h.refcountTableOffset = table!.offset;
    h.refcountTableClusters = tableBuf.length / cs;
    try {
      await writeHeaderRaw(s);
      await bdrvFlush(file.bs);
    } catch (e) {
      h.refcountOrder = saved.order;
      h.refcountTableOffset = saved.offset;
      h.refcountTableClusters = saved.clusters;
      throw e;
    }
    allocated.length = 0;
    s.refcountCache.invalidate();
    s.refcount = new RefcountState(s.clusterBits, order, tableBuf, table!.offset, s.refcountCache, file);
    s.freeClusterIndex = 0;
    // The old blocks and table are plain leaks now; give them back through the new structures.
    for (let t = 0; t < oldTableSize; t++) {
      const off = old.tableEntry(t);
      if (off !== 0 && Number.isFinite(off)) queueFree(s, off, cs, 'other');
    }
    queueFree(s, old.tableOffset, old.table.length, 'other');
    await writeback(s);
    await barrier(s);
  } catch (e) {
    // Before the switch nothing references the new clusters: release them through the old structures.
    for (const off of allocated) {
      try {
        const n = table && off === table.offset ? Math.ceil((table.entries * 8) / cs) : 1;
        await updateRefcounts(s, off / cs, n, -1);
      } catch {
        // Leaked at worst.
      }
    }
    throw e;
  }
}
