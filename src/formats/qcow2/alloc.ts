/**
 * Refcount updates, cluster allocation and metadata writeback (QEMU's
 * block/qcow2-refcount.c write side, and the dependency-ordered flushing of
 * block/qcow2-cache.c).
 *
 * Crash safety rests on three rules, enforced by writeback():
 *  - refcount increments reach storage before any L2/L1 entry that uses the
 *    clusters (a crash leaks clusters at worst);
 *  - data and new L2 tables reach storage (a flush of the file) before the
 *    L2/L1 entries that point at them;
 *  - refcount decrements reach storage only after the tables that dropped the
 *    reference are on disk. Frees are therefore queued in memory
 *    (pendingFrees) and applied at the next writeback; until then the
 *    cluster keeps its refcount and cannot be handed out again.
 *
 * New refcount blocks are self-describing (they count themselves) and are
 * written and hooked into the table at once; a table that is too small is
 * replaced by a larger one placed, with the blocks it needs, at the end of
 * the image (QEMU's qcow2_refcount_area), then switched in with one header
 * write.
 */
import { BlockError, toBlockError } from '../../core/errors.ts';
import { bdrvDebugEvent, bdrvFlush, bdrvGetLength, bdrvPdiscard, bdrvPreadv, bdrvPwritev } from '../../core/io.ts';
import { HDR, hex, INCOMPAT, LIMITS, parseHeader, serializeHeader } from './header.ts';
import { refcountKernel, refcountMetadataSize } from './refcount.ts';
import { metadataOverlap, overlapName, hiWord, loWord, type DiscardType, type Qcow2State } from './state.ts';

/** Announces a blkdebug event on the image file (QEMU's BLKDBG_EVENT(bs->file, …)). */
export async function ev(s: Qcow2State, event: string): Promise<void> {
  const p = bdrvDebugEvent(s.bs.file?.bs, event);
  if (p) await p;
}

/**
 * QEMU's qcow2_signal_corruption for a writable image: the first time, the
 * corrupt bit is set in the header (v3) and every later request fails; the
 * returned error carries QEMU's message.
 */
export async function signalCorruption(s: Qcow2State, message: string): Promise<BlockError> {
  const bs = s.bs;
  if (bs.readOnly) return new BlockError('EIO', `qcow2: Image is corrupt: ${message}`, { node: bs.nodeName });
  const full = `qcow2: Marking image as corrupt: ${message}; further corruption events will be suppressed`;
  if (!s.broken) {
    bs.graph.onWarning(full);
    s.broken = true;
    s.header.incompatibleFeatures |= INCOMPAT.CORRUPT;
    try {
      await writeHeaderRaw(s);
      await bdrvFlush(bs.file!.bs);
    } catch {
      // The image is unusable either way; the caller's error is what matters.
    }
  }
  return new BlockError('EIO', full, { node: bs.nodeName });
}

/** Throws the overlap corruption (QEMU's qcow2_pre_write_overlap_check) unless the write is safe. */
export async function overlapCheck(s: Qcow2State, ign: number, offset: number, size: number): Promise<void> {
  const bit = metadataOverlap(s, ign, offset, size);
  if (bit !== 0) throw await signalCorruption(s, `Preventing invalid write on metadata (overlaps with ${overlapName(bit)})`);
}

/** Fails every request once the image was found corrupt while writable. */
export function checkUsable(s: Qcow2State): void {
  if (s.broken) throw new BlockError('EIO', 'qcow2: the image was marked corrupt; no further I/O is done on it', { node: s.bs.nodeName });
}

/** Writes the header cluster from memory, without the overlap check (it is the header). */
export async function writeHeaderRaw(s: Qcow2State): Promise<void> {
  const img: Parameters<typeof serializeHeader>[0] = { header: s.header, extensions: s.ext, writeDataFile: s.hasDataFile };
  if (s.imageBackingFile !== undefined) img.backingFile = s.imageBackingFile;
  const buf = serializeHeader(img);
  // Writing only the bytes in use keeps the write within the first cluster's meaningful part.
  await bdrvPwritev(s.bs.file!, 0, buf.length, buf);
  const written = parseHeader(buf);
  s.header.headerLength = written.headerLength;
  s.header.backingFileOffset = written.backingFileOffset;
  s.header.backingFileSize = written.backingFileSize;
}

/** Writes the 8-byte incompatible-features field alone (QEMU's qcow2_mark_dirty / mark_clean). */
async function writeIncompat(s: Qcow2State): Promise<void> {
  const b = new Uint8Array(8);
  new DataView(b.buffer).setBigUint64(0, s.header.incompatibleFeatures);
  await bdrvPwritev(s.bs.file!, HDR.incompatibleFeatures, 8, b);
}

/** Sets the dirty bit before the first metadata change with lazy refcounts (QEMU's qcow2_mark_dirty). */
export async function markDirtyIfLazy(s: Qcow2State): Promise<void> {
  if (!s.lazyRefcounts || s.dirtyMarked || s.header.version < 3) return;
  await bdrvFlush(s.bs.file!.bs);
  s.header.incompatibleFeatures |= INCOMPAT.DIRTY;
  await writeIncompat(s);
  await bdrvFlush(s.bs.file!.bs);
  s.dirtyMarked = true;
}

/** Clears the dirty bit once everything is on disk (QEMU's qcow2_mark_clean). */
export async function markClean(s: Qcow2State): Promise<void> {
  if ((s.header.incompatibleFeatures & INCOMPAT.DIRTY) === 0n) { s.dirtyMarked = false; return; }
  await bdrvFlush(s.bs.file!.bs);
  s.header.incompatibleFeatures &= ~INCOMPAT.DIRTY;
  await writeIncompat(s);
  await bdrvFlush(s.bs.file!.bs);
  s.dirtyMarked = false;
}

// ---------------------------------------------------------------------------
// Refcount blocks

/** The refcount block at `offset`, through the cache (QEMU's load_refcount_block). */
export async function loadRefblock(s: Qcow2State, offset: number): Promise<Uint8Array> {
  const hit = s.refcountCache.lookup(offset);
  if (hit) return hit;
  return s.refcountCache.get(offset, async (buf) => {
    await ev(s, 'refblock_load');
    await bdrvPreadv(s.bs.file!, offset, buf.length, buf);
  });
}

/** Offset of refcount block `index` (0 when absent), refusing misaligned entries as corruption. */
async function refblockOffset(s: Qcow2State, index: number): Promise<number> {
  if (index >= s.refcount.tableSize) return 0;
  const off = s.refcount.tableEntry(index);
  if (off !== 0 && (!Number.isFinite(off) || off % s.clusterSize !== 0)) {
    throw await signalCorruption(s, `Refblock offset ${Number.isFinite(off) ? hex(off) : 'beyond 2^53'} unaligned (reftable index: ${hex(index)})`);
  }
  // Blocks are written before the table points at them, so one past the end of the file is corrupt metadata.
  if (off !== 0 && off >= (await bdrvGetLength(s.bs.file!.bs))) {
    throw await signalCorruption(s, `Refblock offset ${hex(off)} beyond the end of the image file (reftable index: ${hex(index)})`);
  }
  return off;
}

/** Writes every dirty refcount block (QEMU's qcow2_cache_flush on the refcount cache, without the file flush). */
export async function flushRefblocks(s: Qcow2State): Promise<void> {
  await s.refcountCache.flush(async (off, buf) => {
    await overlapCheck(s, 1 << 4, off, buf.length);
    await ev(s, 'refblock_update');
    await bdrvPwritev(s.bs.file!, off, buf.length, buf);
  });
}

/** Refcount of host cluster `ci`. */
export async function getRefcount(s: Qcow2State, ci: number): Promise<number> {
  const b = Math.floor(ci / s.refcount.blockEntries);
  const off = await refblockOffset(s, b);
  if (off === 0) return 0;
  const block = await loadRefblock(s, off);
  return refcountKernel().get(block, ci - b * s.refcount.blockEntries, s.refcount.order);
}

/**
 * Adds `addend` to the refcounts of clusters [first, first+count) in the
 * cache (QEMU's update_refcount for clusters whose blocks exist). A missing
 * block is an internal inconsistency; overflow is ERANGE.
 */
export async function updateRefcounts(s: Qcow2State, first: number, count: number, addend: number): Promise<void> {
  const E = s.refcount.blockEntries;
  const order = s.refcount.order;
  const k = refcountKernel();
  let c = first;
  const end = first + count;
  while (c < end) {
    const b = Math.floor(c / E);
    const off = await refblockOffset(s, b);
    if (off === 0) throw new BlockError('EIO', `qcow2: no refcount block for cluster ${hex(c)}`, { node: s.bs.nodeName });
    const block = await loadRefblock(s, off);
    const stop = Math.min(end, (b + 1) * E);
    for (; c < stop; c++) {
      const v = k.get(block, c - b * E, order) + addend;
      if (v < 0 || v > s.refcount.max) {
        throw new BlockError(v < 0 ? 'EINVAL' : 'ERANGE', `qcow2: refcount of cluster ${hex(c)} out of range`, { node: s.bs.nodeName });
      }
      k.set(block, c - b * E, order, v);
    }
    s.refcountCache.markDirty(off);
  }
}

/** Writes the 512-byte group of reftable entries around `index` and makes it durable (QEMU's write_reftable_entry). */
async function writeReftableEntry(s: Qcow2State, index: number): Promise<void> {
  const start = index - (index % 64);
  const end = Math.min(start + 64, s.refcount.tableSize);
  const buf = s.refcount.table.slice(start * 8, end * 8);
  const off = s.refcount.tableOffset + start * 8;
  await overlapCheck(s, 1 << 3, off, buf.length);
  await ev(s, 'reftable_update');
  await bdrvPwritev(s.bs.file!, off, buf.length, buf);
  await bdrvFlush(s.bs.file!.bs);
}

/**
 * Creates refcount block `index` at host cluster `at` (inside the range it
 * describes, counting itself, unless `self` is false: then the block
 * covering `at` counts it and reaches disk first), writes it, then hooks
 * it into the table.
 */
async function createRefblock(s: Qcow2State, index: number, at: number, self = true): Promise<void> {
  const cs = s.clusterSize;
  const E = s.refcount.blockEntries;
  await ev(s, 'refblock_alloc');
  const block = new Uint8Array(cs);
  if (self) refcountKernel().set(block, at - index * E, s.refcount.order, 1);
  else await flushRefblocks(s);
  await overlapCheck(s, 0, at * cs, cs);
  await ev(s, 'refblock_alloc_write');
  await bdrvPwritev(s.bs.file!, at * cs, cs, block);
  await bdrvFlush(s.bs.file!.bs);
  await ev(s, 'refblock_alloc_hookup');
  s.refcount.setTableEntry(index, at * cs);
  try {
    await writeReftableEntry(s, index);
  } catch (e) {
    s.refcount.setTableEntry(index, 0);
    throw e;
  }
  await s.refcountCache.put(at * cs, block, false);
}

/**
 * Replaces the refcount table with a larger one that covers cluster `at`
 * (QEMU's qcow2_refcount_area): new blocks and the new table are placed from
 * `at` on, count themselves, are written, and the header switches to the
 * new table in one write. Returns the first cluster after the new area.
 */
async function growRefcountTable(s: Qcow2State, at: number): Promise<number> {
  const cs = s.clusterSize;
  const E = s.refcount.blockEntries;
  const oldEntries = s.refcount.tableSize;
  const perCluster = cs / 8;
  await ev(s, 'reftable_grow');
  let nb = 0;
  let k = 0;
  let entries = 0;
  for (let guard = 0; guard < 64; guard++) {
    const areaEnd = at + nb + k;
    const lastBlock = Math.floor((Math.max(areaEnd, at + 1) - 1) / E);
    const want = Math.max(lastBlock + 1, Math.ceil(oldEntries * 1.5));
    const e2 = Math.ceil(want / perCluster) * perCluster;
    const k2 = e2 / perCluster;
    const firstBlock = Math.floor(at / E);
    const nb2 = Math.floor((at + nb + k2 - 1) / E) - firstBlock + 1;
    if (nb2 === nb && k2 === k) { entries = e2; break; }
    nb = nb2; k = k2; entries = e2;
  }
  if (entries * 8 > LIMITS.MAX_REFTABLE_SIZE) throw new BlockError('EFBIG', 'qcow2: refcount table too large', { node: s.bs.nodeName });
  const firstBlock = Math.floor(at / E);
  const blocks: Uint8Array[] = [];
  for (let j = 0; j < nb; j++) blocks.push(new Uint8Array(cs));
  const kern = refcountKernel();
  for (let x = at; x < at + nb + k; x++) kern.set(blocks[Math.floor(x / E) - firstBlock]!, x % E, s.refcount.order, 1);
  const table = new Uint8Array(k * cs);
  table.set(s.refcount.table);
  const tdv = new DataView(table.buffer);
  for (let j = 0; j < nb; j++) {
    const off = (at + j) * cs;
    tdv.setUint32(8 * (firstBlock + j), Math.floor(off / 0x100000000));
    tdv.setUint32(8 * (firstBlock + j) + 4, off >>> 0);
  }
  const file = s.bs.file!;
  await overlapCheck(s, 0, at * cs, (nb + k) * cs);
  await ev(s, 'refblock_alloc_write_blocks');
  for (let j = 0; j < nb; j++) await bdrvPwritev(file, (at + j) * cs, cs, blocks[j]!);
  await ev(s, 'refblock_alloc_write_table');
  const tableOffset = (at + nb) * cs;
  await bdrvPwritev(file, tableOffset, table.length, table);
  await bdrvFlush(file.bs);
  const { oldOffset, oldBytes } = await switchReftable(s, table, tableOffset, k);
  for (let j = 0; j < nb; j++) await s.refcountCache.put((at + j) * cs, blocks[j]!, false);
  if (oldBytes > 0) queueFree(s, oldOffset, oldBytes, 'other');
  return at + nb + k;
}

/**
 * Points the header at a new refcount table already written and durable
 * (one durable header write), then switches to it in memory; returns where
 * the old table was, for the caller to free.
 */
async function switchReftable(s: Qcow2State, table: Uint8Array, offset: number, clusters: number): Promise<{ oldOffset: number; oldBytes: number }> {
  const file = s.bs.file!;
  await ev(s, 'refblock_alloc_switch_table');
  const hdr = new Uint8Array(12);
  const hdv = new DataView(hdr.buffer);
  hdv.setBigUint64(0, BigInt(offset));
  hdv.setUint32(8, clusters);
  await bdrvPwritev(file, HDR.refcountTableOffset, 12, hdr);
  await bdrvFlush(file.bs);
  const old = { oldOffset: s.refcount.tableOffset, oldBytes: s.refcount.table.length };
  s.refcount.table = table;
  s.refcount.tableOffset = offset;
  s.header.refcountTableOffset = offset;
  s.header.refcountTableClusters = clusters;
  return old;
}

/**
 * Finds free clusters from s.freeClusterIndex (QEMU's alloc_clusters_noref),
 * creating refcount blocks and growing the table on the way; returns a run
 * of `n` clusters, or with `exact` false possibly fewer (at least one).
 */
async function findFree(s: Qcow2State, n: number, exact: boolean): Promise<{ start: number; count: number; firstZero: number }> {
  const E = s.refcount.blockEntries;
  const order = s.refcount.order;
  const k = refcountKernel();
  let c = s.freeClusterIndex;
  let runStart = -1;
  let runLen = 0;
  let firstZero = -1;
  for (let guard = 0; guard < 1 << 30; guard++) {
    const b = Math.floor(c / E);
    if (b >= s.refcount.tableSize) {
      if (runLen > 0 && !exact) return { start: runStart, count: runLen, firstZero };
      // The new area must lie past what the old table covers, so it starts at c, never at an earlier run.
      c = await growRefcountTable(s, c);
      runStart = -1;
      runLen = 0;
      continue;
    }
    const off = await refblockOffset(s, b);
    if (off === 0) {
      if (runLen > 0 && !exact) return { start: runStart, count: runLen, firstZero };
      // Every cluster this block would describe is free; the block takes the one the search reached.
      await createRefblock(s, b, c);
      runStart = -1;
      runLen = 0;
      c = c + 1;
      continue;
    }
    const block = await loadRefblock(s, off);
    let idx = c - b * E;
    if (runLen === 0) {
      const z = k.findZero(block, idx, E, order);
      if (z < 0) { c = (b + 1) * E; continue; }
      idx = z;
      c = b * E + z;
      runStart = c;
      if (firstZero < 0) firstZero = c;
    }
    const limit = Math.min(E, idx + (n - runLen));
    const nz = k.findNonZero(block, idx, limit, order);
    runLen += nz - idx;
    c = b * E + nz;
    if (runLen >= n) return { start: runStart, count: n, firstZero };
    if (nz < limit) {
      if (!exact && runLen > 0) return { start: runStart, count: runLen, firstZero };
      runStart = -1;
      runLen = 0;
    }
  }
  throw new BlockError('ENOSPC', 'qcow2: no free clusters', { node: s.bs.nodeName });
}

/**
 * Allocates clusters with refcount 1 (QEMU's qcow2_alloc_clusters); returns
 * the first host offset and how many clusters the run holds (exactly `n`
 * with `exact`, otherwise between 1 and n).
 */
export async function allocClusters(s: Qcow2State, n: number, exact = true): Promise<{ offset: number; count: number }> {
  if (n <= 0) throw new BlockError('EINVAL', 'qcow2: empty allocation');
  await ev(s, 'cluster_alloc');
  if (exact) {
    const start = await allocExact(s, n);
    return { offset: start * s.clusterSize, count: n };
  }
  const { start, count, firstZero } = await findFree(s, n, exact);
  await updateRefcounts(s, start, count, 1);
  // Like QEMU's alloc_clusters_noref, the search index moves past the run: holes it skipped as too
  // short are not revisited until a free lowers the index again.
  void firstZero;
  s.freeClusterIndex = start + count;
  return { offset: start * s.clusterSize, count };
}

/**
 * The first run of `n` clusters from s.freeClusterIndex whose refcounts are
 * 0, counting clusters without a refcount block (or past the table) as free,
 * as QEMU's alloc_clusters_noref does; moves the index past the run.
 */
async function searchRun(s: Qcow2State, n: number): Promise<number> {
  const E = s.refcount.blockEntries;
  const order = s.refcount.order;
  const k = refcountKernel();
  let c = s.freeClusterIndex;
  let runStart = c;
  while (c < runStart + n) {
    const b = Math.floor(c / E);
    const off = await refblockOffset(s, b);
    if (off === 0) {
      c = Math.min((b + 1) * E, runStart + n);
      continue;
    }
    const block = await loadRefblock(s, off);
    const limit = Math.min(E, runStart + n - b * E);
    const nz = k.findNonZero(block, c - b * E, limit, order);
    if (nz < limit) {
      runStart = b * E + nz + 1;
      c = runStart;
    } else {
      c = b * E + limit;
    }
  }
  s.freeClusterIndex = runStart + n;
  return runStart;
}

/**
 * Allocates exactly `n` contiguous clusters with refcount 1 the way QEMU's
 * qcow2_alloc_clusters places them: the run is chosen as if missing
 * refcount blocks were free; a block the run needs goes to the first free
 * cluster after the run (describing itself where it can), and the search
 * starts over, from the run's start when part of it had been counted (the
 * undone update lowers the search index again). Returns the first cluster.
 */
async function allocExact(s: Qcow2State, n: number): Promise<number> {
  const E = s.refcount.blockEntries;
  for (let guard = 0; guard < 1 << 20; guard++) {
    const start = await searchRun(s, n);
    let missing = -1;
    for (let b = Math.floor(start / E); b <= Math.floor((start + n - 1) / E); b++) {
      if (b >= s.refcount.tableSize || (await refblockOffset(s, b)) === 0) { missing = b; break; }
    }
    if (missing < 0) {
      await updateRefcounts(s, start, n, 1);
      return start;
    }
    const first = Math.max(start, missing * E);
    if (missing >= s.refcount.tableSize) {
      // The table must grow first; its new area starts where the search reached.
      s.freeClusterIndex = await growRefcountTable(s, first);
      continue;
    }
    await placeRefblock(s, missing);
    // QEMU's update_refcount undoes the part of the run it had counted, which lowers the index to the run.
    if (first > start && start < s.freeClusterIndex) s.freeClusterIndex = start;
  }
  throw new BlockError('ENOSPC', 'qcow2: no free clusters', { node: s.bs.nodeName });
}

/**
 * Creates missing refcount block `index` at the next free cluster (QEMU's
 * alloc_refcount_block): in its own range it counts itself; elsewhere its
 * cluster is counted by the block covering it, which is created the same
 * way first when it is missing too (the caller then retries).
 */
async function placeRefblock(s: Qcow2State, index: number): Promise<void> {
  const E = s.refcount.blockEntries;
  const at = await searchRun(s, 1);
  const holder = Math.floor(at / E);
  if (holder === index) {
    await createRefblock(s, index, at);
    return;
  }
  if (holder >= s.refcount.tableSize) {
    s.freeClusterIndex = await growRefcountTable(s, at);
    return;
  }
  if ((await refblockOffset(s, holder)) === 0) {
    await placeRefblock(s, holder);
    return;
  }
  await updateRefcounts(s, at, 1, 1);
  await createRefblock(s, index, at, false);
}

/**
 * Allocates `size` bytes (at most a cluster) for a compressed cluster,
 * packing them after the previous one when they fit (QEMU's qcow2_alloc_bytes).
 */
export async function allocBytes(s: Qcow2State, size: number): Promise<number> {
  const cs = s.clusterSize;
  await ev(s, 'cluster_alloc_bytes');
  let offset = s.freeByteOffset;
  if (offset !== 0) {
    const rc = await getRefcount(s, Math.floor(offset / cs));
    if (rc === 0 || rc >= s.refcount.max) offset = 0;
  }
  let freeInCluster = offset === 0 ? 0 : cs - (offset % cs);
  if (offset === 0 || freeInCluster < size) {
    const { start, firstZero } = await findFree(s, 1, true);
    s.freeClusterIndex = firstZero >= 0 && firstZero < start ? firstZero : start + 1;
    const newOff = start * cs;
    if (offset === 0 || Math.ceil(offset / cs) * cs !== newOff) {
      offset = newOff;
      freeInCluster = cs;
    } else {
      freeInCluster += cs;
    }
  }
  const first = Math.floor(offset / cs);
  const last = Math.floor((offset + size - 1) / cs);
  await updateRefcounts(s, first, last - first + 1, 1);
  s.freeByteOffset = (offset + size) % cs === 0 ? 0 : offset + size;
  return offset;
}

/** Queues the release of a reference to [offset, offset+length) for the next writeback (QEMU's qcow2_free_clusters, deferred). */
export function queueFree(s: Qcow2State, offset: number, length: number, type: DiscardType): void {
  if (length <= 0) return;
  s.pendingFrees.push({ offset, length, type });
}

/**
 * Queues the release of whatever an L2 entry references (QEMU's
 * qcow2_free_any_cluster): a compressed cluster's sectors, a data cluster, or
 * with an external data file only a discard of the guest cluster.
 */
export function freeEntry(s: Qcow2State, hi: number, lo: number, type: DiscardType): void {
  if (hi & 0x40000000) {
    const csizeShift = 62 - (s.clusterBits - 8);
    const entry = (BigInt(hi >>> 0) << 32n) | BigInt(lo >>> 0);
    const coffset = Number(entry & ((1n << BigInt(csizeShift)) - 1n));
    const sectors = Number((entry >> BigInt(csizeShift)) & ((1n << BigInt(s.clusterBits - 8)) - 1n)) + 1;
    const start = coffset - (coffset % 512);
    queueFree(s, start, sectors * 512, type);
    return;
  }
  const h = hi & 0x00ffffff;
  const off = h * 0x100000000 + ((lo & 0xfffffe00) >>> 0);
  if (off === 0 && !(s.hasDataFile && hi & 0x80000000)) return;
  if (s.hasDataFile) {
    // A data-file cluster has no refcount: only the discard remains to be done.
    s.pendingFrees.push({ offset: off, length: s.clusterSize, type, dataFile: true });
    return;
  }
  queueFree(s, off, s.clusterSize, type);
}

function passthrough(s: Qcow2State, type: DiscardType): boolean {
  switch (type) {
    case 'always': return true;
    case 'never': return false;
    default: return s.discardPassthrough[type];
  }
}

/** Drops the queued references (QEMU's update_refcount with decrease), then discards what reached 0 where asked. */
async function applyFrees(s: Qcow2State): Promise<void> {
  const cs = s.clusterSize;
  const frees = s.pendingFrees;
  s.pendingFrees = [];
  const discards: Array<[number, number, boolean]> = [];
  for (let i = 0; i < frees.length; i++) {
    const f = frees[i]!;
    if (f.dataFile) {
      if (passthrough(s, f.type)) discards.push([f.offset, f.length, true]);
      continue;
    }
    await ev(s, 'cluster_free');
    const first = Math.floor(f.offset / cs);
    const last = Math.floor((f.offset + f.length - 1) / cs);
    for (let c = first; c <= last; c++) {
      let rc: number;
      try {
        rc = await getRefcount(s, c);
      } catch (e) {
        s.bs.graph.onWarning(`qcow2_free_clusters failed: ${toBlockError(e).message}`);
        continue;
      }
      if (rc === 0) {
        // QEMU refuses to go below zero and reports it; the reference was already gone.
        s.bs.graph.onWarning('qcow2_free_clusters failed: Invalid argument');
        continue;
      }
      try {
        await updateRefcounts(s, c, 1, -1);
      } catch (e) {
        // A failed decrement leaks the cluster; put the remaining frees back so nothing is lost silently.
        s.pendingFrees.push(...frees.slice(i + 1));
        throw e;
      }
      if (rc === 1) {
        if (c < s.freeClusterIndex) s.freeClusterIndex = c;
        s.l2Cache.discardRange(c * cs, cs);
        if (s.freeByteOffset !== 0 && Math.floor(s.freeByteOffset / cs) === c) s.freeByteOffset = 0;
        if (passthrough(s, f.type)) discards.push([c * cs, cs, false]);
      }
    }
  }
  if (discards.length > 0) {
    await flushRefblocks(s);
    for (const [off, len, data] of discards) {
      try {
        await bdrvPdiscard(data ? s.dataFile : s.bs.file!, off, len);
      } catch {
        // Discard is advisory.
      }
    }
  }
}

/** Makes everything written so far on the file durable (a write barrier between dependent updates). */
export async function barrier(s: Qcow2State): Promise<void> {
  if (s.hasDataFile) await bdrvFlush(s.dataFile.bs);
  await bdrvFlush(s.bs.file!.bs);
}

/** Writes every dirty L2 slice (the L2 cache flush). */
async function flushL2(s: Qcow2State): Promise<void> {
  await s.l2Cache.flush(async (off, buf) => {
    await overlapCheck(s, 1 << 2, off, buf.length);
    await ev(s, 'l2_update');
    await bdrvPwritev(s.bs.file!, off, buf.length, buf);
  });
}

/** Writes the dirty 512-byte groups of the L1 table (QEMU's qcow2_write_l1_entry). */
async function flushL1(s: Qcow2State): Promise<void> {
  const groups = new Set<number>();
  for (const i of s.l1Dirty) groups.add(i - (i % 64));
  const sorted = [...groups].sort((a, b) => a - b);
  for (const g of sorted) {
    const end = Math.min(g + 64, s.header.l1Size);
    const buf = s.l1.slice(g * 8, end * 8);
    const off = s.header.l1TableOffset + g * 8;
    await overlapCheck(s, 1 << 1, off, buf.length);
    await ev(s, 'l1_update');
    await bdrvPwritev(s.bs.file!, off, buf.length, buf);
    for (let i = g; i < end; i++) s.l1Dirty.delete(i);
  }
  s.l1Dirty.clear();
}

/**
 * Writes all metadata changes back in dependency order (see the file
 * comment): refcount blocks, a barrier, L2 slices, a barrier, L1 entries,
 * a barrier, then the queued frees and the refcount blocks they dirtied.
 * Callers hold the image lock.
 */
export async function writeback(s: Qcow2State): Promise<void> {
  if (s.committing) return;
  s.committing = true;
  try {
    const l2 = s.l2Cache.hasDirty;
    const l1 = s.l1Dirty.size > 0;
    let wrote = false;
    if (l2 || l1) {
      await flushRefblocks(s);
      await barrier(s);
      if (l2) await flushL2(s);
      if (l1) {
        if (l2) await barrier(s);
        await flushL1(s);
      }
      wrote = true;
    }
    if (s.pendingFrees.length > 0) {
      if (wrote) await barrier(s);
      await applyFrees(s);
    }
    await flushRefblocks(s);
  } finally {
    s.committing = false;
  }
}

/** Reads the raw words of one 8-byte entry (for callers outside the hot path). */
export function entryWords(b: Uint8Array, o: number): [number, number] {
  return [hiWord(b, o), loWord(b, o)];
}

/**
 * Drops the refcount blocks that count nothing but possibly themselves
 * (QEMU's qcow2_shrink_reftable, after a shrink freed their range): the
 * table without them is written and made durable first, then each dropped
 * block's own refcount goes to 0 and its cluster is discarded. A crash in
 * between leaves the dropped blocks leaked, never referenced and free.
 */
export async function shrinkReftable(s: Qcow2State): Promise<void> {
  const E = s.refcount.blockEntries;
  const cs = s.clusterSize;
  const order = s.refcount.order;
  const k = refcountKernel();
  const size = s.refcount.tableSize;
  const next = s.refcount.table.slice();
  const dropped: number[] = [];
  for (let i = 0; i < size; i++) {
    const off = await refblockOffset(s, i);
    if (off === 0) continue;
    const block = await loadRefblock(s, off);
    const ci = off / cs;
    // A block inside the range it counts holds its own reference, which does not keep it alive.
    const own = Math.floor(ci / E) === i ? ci - i * E : -1;
    const used = own < 0 ? k.findNonZero(block, 0, E, order) < E : k.findNonZero(block, 0, own, order) < own || k.findNonZero(block, own + 1, E, order) < E;
    if (used) continue;
    next.fill(0, 8 * i, 8 * i + 8);
    dropped.push(i);
  }
  if (dropped.length === 0) return;
  await overlapCheck(s, 1 << 3, s.refcount.tableOffset, next.length);
  await ev(s, 'reftable_update');
  await bdrvPwritev(s.bs.file!, s.refcount.tableOffset, next.length, next);
  await bdrvFlush(s.bs.file!.bs);
  const discards: number[] = [];
  for (const i of dropped) {
    const off = s.refcount.tableEntry(i);
    const ci = off / cs;
    const b = Math.floor(ci / E);
    const holder = await refblockOffset(s, b);
    const block = holder === 0 ? undefined : await loadRefblock(s, holder);
    const rc = block ? k.get(block, ci - b * E, order) : 0;
    if (!block || rc !== 1) {
      s.refcount.setTableEntry(i, 0);
      throw await signalCorruption(s, `Invalid refcount: refblock offset ${hex(holder)}, reftable index ${b}, block offset ${hex(off)}, refcount ${hex(rc)}`);
    }
    k.set(block, ci - b * E, order, 0);
    s.refcountCache.markDirty(holder);
    if (ci < s.freeClusterIndex) s.freeClusterIndex = ci;
    s.refcountCache.discard(off);
    s.refcount.setTableEntry(i, 0);
    discards.push(off);
  }
  await flushRefblocks(s);
  for (const off of discards) {
    try {
      await bdrvPdiscard(s.bs.file!, off, cs);
    } catch {
      // Discard is advisory.
    }
  }
}

/**
 * Creates self-covering refcount structures at host cluster `start`, the
 * end of the used space (QEMU's qcow2_refcount_area with an exact size): a
 * new table and the blocks missing between `start` and `additional`
 * clusters past the new structures, all counting themselves. The blocks
 * and the table are written and made durable before the header switches to
 * the table; the old table is freed after. Returns the first cluster after
 * the new structures, where the `additional` clusters may go.
 */
export async function refcountArea(s: Qcow2State, start: number, additional: number): Promise<number> {
  const cs = s.clusterSize;
  const E = s.refcount.blockEntries;
  const { blocks: total } = refcountMetadataSize(start + additional, cs, s.refcount.order, false);
  if (total * 8 > LIMITS.MAX_REFTABLE_SIZE) throw new BlockError('EFBIG', 'File too large', { node: s.bs.nodeName });
  const areaIndex = Math.floor(start / E);
  const perCluster = cs / 8;
  const tableEntries = Math.ceil(total / perCluster) * perCluster;
  const tableClusters = tableEntries / perCluster;
  const table = new Uint8Array(tableEntries * 8);
  const oldSize = s.refcount.tableSize;
  table.set(s.refcount.table.subarray(0, Math.min(oldSize, tableEntries) * 8));
  const entries = new RefcountTableView(table);
  let missing = 0;
  for (let i = areaIndex; i < total; i++) if (entries.get(i) === 0) missing++;
  const tableAt = start + missing;
  const end = tableAt + tableClusters;
  const k = refcountKernel();
  const fresh: Array<[number, Uint8Array]> = [];
  let blockAt = start;
  for (let i = areaIndex; i < total; i++) {
    let off = entries.get(i);
    let block: Uint8Array;
    if (off !== 0) {
      block = await loadRefblock(s, off);
    } else {
      off = blockAt++ * cs;
      block = new Uint8Array(cs);
      entries.set(i, off);
      fresh.push([off, block]);
    }
    const firstCovered = i * E;
    if (firstCovered < end) {
      for (let j = Math.max(start - firstCovered, 0); j < Math.min(end - firstCovered, E); j++) k.set(block, j, s.refcount.order, 1);
      if (fresh.length === 0 || fresh[fresh.length - 1]![0] !== off) s.refcountCache.markDirty(off);
    }
  }
  const file = s.bs.file!;
  await ev(s, 'refblock_alloc_write_blocks');
  await flushRefblocks(s);
  for (const [off, block] of fresh) {
    await overlapCheck(s, 0, off, cs);
    await bdrvPwritev(file, off, cs, block);
  }
  await ev(s, 'refblock_alloc_write_table');
  await overlapCheck(s, 0, tableAt * cs, table.length);
  await bdrvPwritev(file, tableAt * cs, table.length, table);
  await bdrvFlush(file.bs);
  const { oldOffset, oldBytes } = await switchReftable(s, table, tableAt * cs, tableClusters);
  for (const [off, block] of fresh) await s.refcountCache.put(off, block, false);
  if (oldBytes > 0) {
    // QEMU frees the old table at once (qcow2_free_clusters), so its clusters are free for the next allocation.
    queueFree(s, oldOffset, oldBytes, 'other');
    await applyFrees(s);
  }
  return end;
}

/** Big-endian 64-bit refcount table entries over a buffer (for a table being built). */
class RefcountTableView {
  private readonly dv: DataView;
  constructor(table: Uint8Array) {
    this.dv = new DataView(table.buffer, table.byteOffset, table.byteLength);
  }
  get(i: number): number {
    return this.dv.getUint32(8 * i) * 0x100000000 + ((this.dv.getUint32(8 * i + 4) & 0xfffffe00) >>> 0);
  }
  set(i: number, off: number): void {
    this.dv.setUint32(8 * i, Math.floor(off / 0x100000000));
    this.dv.setUint32(8 * i + 4, off >>> 0);
  }
}
