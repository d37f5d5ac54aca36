/**
 * Consistency check and repair (QEMU's qcow2_co_check_locked and
 * qcow2_check_refcounts): count every reference the image's structures make
 * (header, L1/L2 tables of the active state and of each snapshot, snapshot
 * table, refcount table and blocks, bitmap directory and tables), compare
 * with the stored refcounts, check the COPIED flags, and repair leaks and
 * corruptions in place or, when the refcount structures themselves are
 * broken, by building new ones past the end of the image and switching the
 * header to them (QEMU's rebuild_refcount_structure).
 *
 * Messages go to the graph's warning sink with QEMU's wording (qemu-img
 * prints them on stderr); the counts come back as a CheckResult.
 */
import type { CheckResult, ProgressFn } from '../../core/driver.ts';
import { CHECK_FIX } from '../../core/driver.ts';
import { BlockError, toBlockError } from '../../core/errors.ts';
import { bdrvGetLength, bdrvPread, bdrvPwritev } from '../../core/io.ts';
import type { BlockNode } from '../../core/node.ts';
import { barrier, flushRefblocks, loadRefblock, markClean, updateRefcounts, writeback } from './alloc.ts';
import { readBitmapDirectory } from './bitmap.ts';
import { HDR, INCOMPAT, LIMITS } from './header.ts';
import { refcountKernel } from './refcount.ts';
import { readSnapshots } from './snapshot.ts';
import { entryOffset, HI_COMPRESSED, HI_COPIED, hiWord, loWord, LO_ZERO, setWords, type Qcow2State } from './state.ts';

/** A reference count per host cluster, growing on demand but never past `limit` entries (references beyond are kept sparsely). */
class RefTable {
  counts: Uint16Array;
  readonly extra = new Map<number, number>();
  overflow = false;

  constructor(n: number, private readonly limit: number) {
    this.counts = new Uint16Array(Math.max(n, 1));
  }

  get(i: number): number {
    return i < this.counts.length ? this.counts[i]! : this.extra.get(i) ?? 0;
  }

  /** Adds one reference; false when the 16-bit count overflowed (QEMU's "ERROR: overflow cluster offset"). */
  inc(i: number): boolean {
    if (i >= this.counts.length && i < this.limit) {
      const grown = new Uint16Array(Math.min(this.limit, Math.max(i + 1, this.counts.length * 2)));
      grown.set(this.counts);
      this.counts = grown;
    }
    if (i < this.counts.length) {
      if (this.counts[i] === 0xffff) return false;
      this.counts[i]!++;
      return true;
    }
    this.extra.set(i, (this.extra.get(i) ?? 0) + 1);
    return true;
  }

  /** Highest index with a reference, or -1. */
  highest(): number {
    let h = -1;
    for (let i = this.counts.length - 1; i >= 0; i--) if (this.counts[i] !== 0) { h = i; break; }
    for (const k of this.extra.keys()) if (k > h) h = k;
    return h;
  }
}

interface Ctx {
  bs: BlockNode;
  s: Qcow2State;
  res: CheckResult;
  fix: number;
  refs: RefTable;
  log: (msg: string) => void;
  /** The refcount structures cannot be fixed in place. */
  rebuild: boolean;
  /** Clusters of the refcount table and blocks (left out of a rebuilt structure). */
  refcountClusters: Set<number>;
  /** Length of the image file. */
  fileLength: number;
  /** L2 tables checked once, and the recorded effects of those checked again (see checkL2Once). */
  l2Seen: Set<string>;
  l2Memo: Map<string, L2Effects>;
  /** Reports how far the check is, in percent (the active L1 walk is most of the work). */
  progress?: (percent: number) => void;
}

function newResult(): CheckResult {
  return { corruptions: 0, leaks: 0, checkErrors: 0, corruptionsFixed: 0, leaksFixed: 0, imageEndOffset: 0, bfi: { totalClusters: 0, allocatedClusters: 0, fragmentedClusters: 0, compressedClusters: 0 } };
}

/**
 * QEMU's qcow2_inc_refcounts_imrt: one reference to every cluster
 * [offset, offset+size) touches. A region ending a cluster or more past the
 * end of the file is a corruption and is not counted (which also bounds the
 * table by the file size).
 */
function incRefs(c: Ctx, offset: number, size: number, refcountStructure = false): void {
  if (size <= 0) return;
  const cs = c.s.clusterSize;
  if (!Number.isFinite(offset) || !Number.isFinite(size) || offset + size - c.fileLength >= cs) {
    c.log(`ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0x${Number.isFinite(offset) ? hex(offset) : 'beyond 2^53'} size 0x${hex(size)}`);
    c.res.corruptions++;
    return;
  }
  const first = Math.floor(offset / cs);
  const last = Math.floor((offset + size - 1) / cs);
  for (let k = first; k <= last; k++) {
    if (refcountStructure) c.refcountClusters.add(k);
    if (!c.refs.inc(k)) {
      c.log(`ERROR: overflow cluster offset=0x${(k * cs).toString(16)}`);
      c.res.corruptions++;
      c.rebuild = true;
    }
  }
}

function hex(n: number): string {
  return n.toString(16);
}

/** The raw 64-bit entry as QEMU prints it (%" PRIx64). */
function entryHex(hi: number, lo: number): string {
  return ((BigInt(hi >>> 0) << 32n) | BigInt(lo >>> 0)).toString(16);
}

/** Reads a table from the image file, counting a failure as a check error. */
async function readTable(c: Ctx, offset: number, len: number, what: string): Promise<Uint8Array | null> {
  try {
    return await bdrvPread(c.bs.file!, offset, len);
  } catch {
    c.log(`ERROR: I/O error in ${what}`);
    c.res.checkErrors++;
    return null;
  }
}

/** QEMU's check_refcounts_l2: references of one L2 table, with the entry checks (and fragmentation info for the active one). */
async function checkL2(c: Ctx, l2Offset: number, active: boolean, frag: { next: number }): Promise<void> {
  const s = c.s;
  const cs = s.clusterSize;
  // A table past the end of the file reads as zeroes: it references nothing.
  if (l2Offset >= c.fileLength) return;
  const table = await readTable(c, l2Offset, cs, 'check_refcounts_l2');
  if (!table) return;
  const eb = s.l2EntryBytes;
  const ext = eb === 16;
  const csizeShift = 62 - (s.clusterBits - 8);
  let dirty = false;
  for (let i = 0; i < s.l2Entries; i++) {
    const o = i * eb;
    let hi = hiWord(table, o);
    const lo = loWord(table, o);
    const bmZero = ext ? hiWord(table, o + 8) : 0;
    const bmAlloc = ext ? loWord(table, o + 8) : 0;
    if (hi & HI_COMPRESSED) {
      if (hi & HI_COPIED) {
        const fixing = (c.fix & CHECK_FIX.ERRORS) !== 0;
        c.log(`${fixing ? 'Repairing' : 'ERROR'}: compressed cluster ${i} at L2 offset 0x${hex(l2Offset)}: copied flag must never be set for compressed clusters`);
        hi = (hi & ~HI_COPIED) >>> 0;
        if (fixing) { setWords(table, o, hi, lo); dirty = true; c.res.corruptionsFixed++; } else c.res.corruptions++;
      }
      if (s.hasDataFile) {
        c.log(`ERROR compressed cluster ${i} with data file, entry=0x${entryHex(hi, lo)}`);
        c.res.corruptions++;
        continue;
      }
      if (ext && (bmZero | bmAlloc) !== 0) {
        c.log(`ERROR compressed cluster ${i} with non-zero subcluster allocation bitmap, entry=0x${entryHex(hi, lo)}`);
        c.res.corruptions++;
        continue;
      }
      const entry = (BigInt(hi >>> 0) << 32n) | BigInt(lo >>> 0);
      const coffset = Number(entry & ((1n << BigInt(csizeShift)) - 1n));
      const sectors = Number((entry >> BigInt(csizeShift)) & ((1n << BigInt(s.clusterBits - 8)) - 1n)) + 1;
      const start = coffset - (coffset % 512);
      incRefs(c, start, sectors * 512);
      if (active) {
        c.res.bfi.allocatedClusters++;
        c.res.bfi.compressedClusters++;
        // Compressed clusters share sectors, so reading neighbours re-reads data: QEMU counts them as fragmented.
        c.res.bfi.fragmentedClusters++;
      }
      continue;
    }
    const off = entryOffset(hi, lo);
    const hasHost = off !== 0 || (s.hasDataFile && (hi & HI_COPIED) !== 0);
    if (ext) {
      if (hasHost && (bmZero & bmAlloc) !== 0) {
        c.log(`ERROR offset=${hex(off)}: Allocated cluster has corrupted subcluster allocation bitmap`);
        c.res.corruptions++;
      } else if (!hasHost && bmAlloc !== 0) {
        c.log(`ERROR: Unallocated cluster has non-zero subcluster allocation bitmap, entry=0x${entryHex(hi, lo)}`);
        c.res.corruptions++;
      }
    } else if (lo & LO_ZERO && s.header.version < 3) {
      c.log(`ERROR: zero cluster entry in pre-v3 image at L2 offset 0x${hex(l2Offset)} index ${i}`);
      c.res.corruptions++;
    }
    if (!hasHost) continue;
    if (off < 0) {
      c.log(`ERROR: cluster offset of L2 entry 0x${entryHex(hi, lo)} is beyond 2^53`);
      c.res.corruptions++;
      continue;
    }
    if (active) {
      c.res.bfi.allocatedClusters++;
      if (frag.next !== 0 && off !== frag.next) c.res.bfi.fragmentedClusters++;
      frag.next = off + cs;
    }
    if (off % cs !== 0) {
      c.log(`ERROR offset=${hex(off)}: Cluster is not properly aligned; L2 entry corrupted.`);
      c.res.corruptions++;
      continue;
    }
    if (!s.hasDataFile) incRefs(c, off, cs);
  }
  if (dirty) {
    try {
      await bdrvPwritev(c.bs.file!, l2Offset, cs, table);
      s.l2Cache.discardRange(l2Offset, cs);
    } catch (e) {
      c.log(`ERROR: Could not write L2 table: ${toBlockError(e).message}`);
      c.res.checkErrors++;
    }
  }
}

/** What checking one L2 table did, so a table referenced again need not be read and parsed again. */
interface L2Effects {
  clusters: number[];
  corruptions: number;
  checkErrors: number;
  allocated: number;
  fragmented: number;
  compressed: number;
  logs: string[];
}

/** A reference table that only records which clusters were counted. */
class RecordingRefs extends RefTable {
  readonly seen: number[] = [];

  constructor() {
    super(1, 1);
  }

  override inc(i: number): boolean {
    this.seen.push(i);
    return true;
  }
}

/** Most L2 tables whose effects are remembered (they only matter for tables referenced more than once). */
const L2_MEMO_LIMIT = 64;

/**
 * checkL2, except that a table seen before (shared with a snapshot, or named
 * by many entries of a corrupt L1) is replayed from what it did the first
 * time it was recorded: a corrupt L1 cannot make the check read one table
 * millions of times.
 */
async function checkL2Once(c: Ctx, l2: number, active: boolean, frag: { next: number }): Promise<void> {
  const key = `${l2}:${active}`;
  let fx = c.l2Memo.get(key);
  if (!fx && c.l2Seen.has(key) && c.l2Memo.size < L2_MEMO_LIMIT) {
    const rec = new RecordingRefs();
    const logs: string[] = [];
    const sub: Ctx = { ...c, res: newResult(), refs: rec, log: (m) => logs.push(m), fix: 0 };
    await checkL2(sub, l2, active, { next: 0 });
    fx = { clusters: rec.seen, corruptions: sub.res.corruptions, checkErrors: sub.res.checkErrors, allocated: sub.res.bfi.allocatedClusters, fragmented: sub.res.bfi.fragmentedClusters, compressed: sub.res.bfi.compressedClusters, logs };
    c.l2Memo.set(key, fx);
  }
  if (!fx) {
    c.l2Seen.add(key);
    await checkL2(c, l2, active, frag);
    return;
  }
  for (const m of fx.logs) c.log(m);
  for (const k of fx.clusters) {
    if (!c.refs.inc(k)) {
      c.log(`ERROR: overflow cluster offset=0x${(k * c.s.clusterSize).toString(16)}`);
      c.res.corruptions++;
      c.rebuild = true;
    }
  }
  c.res.corruptions += fx.corruptions;
  c.res.checkErrors += fx.checkErrors;
  c.res.bfi.allocatedClusters += fx.allocated;
  c.res.bfi.fragmentedClusters += fx.fragmented;
  c.res.bfi.compressedClusters += fx.compressed;
}

/** QEMU's check_refcounts_l1: the L1 table, its L2 tables and their clusters. */
async function checkL1(c: Ctx, l1Offset: number, l1Size: number, active: boolean): Promise<void> {
  const cs = c.s.clusterSize;
  incRefs(c, l1Offset, l1Size * 8);
  if (l1Size === 0) return;
  // A table past the end of the file reads as zeroes (as a read past EOF does in QEMU): no L2 tables.
  if (!active && l1Offset >= c.fileLength) return;
  const l1 = active ? c.s.l1 : await readTable(c, l1Offset, l1Size * 8, 'check_refcounts_l1');
  if (!l1) return;
  const frag = { next: 0 };
  for (let i = 0; i < l1Size; i++) {
    const l2 = entryOffset(hiWord(l1, 8 * i), loWord(l1, 8 * i));
    if (l2 === 0) continue;
    if (l2 < 0 || l2 % cs !== 0) {
      c.log(`ERROR l2_offset=${l2 < 0 ? 'beyond 2^53' : hex(l2)}: Table is not cluster aligned; L1 entry corrupted`);
      c.res.corruptions++;
      continue;
    }
    incRefs(c, l2, cs);
    // The fragmentation count runs per L2 table, as in QEMU.
    frag.next = 0;
    await checkL2Once(c, l2, active, frag);
    if (active) c.progress?.((80 * (i + 1)) / l1Size);
  }
}

/** References of the persistent bitmaps: directory, bitmap tables and their data clusters. */
async function checkBitmaps(c: Ctx): Promise<void> {
  const b = c.s.ext.bitmaps;
  if (!b) return;
  incRefs(c, b.directoryOffset, b.directorySize);
  let dir;
  try {
    dir = await readBitmapDirectory(c.bs.file!, b);
  } catch (e) {
    c.log(`ERROR: bitmap directory could not be read: ${toBlockError(e).message}`);
    c.res.corruptions++;
    return;
  }
  for (const e of dir) {
    if (!Number.isFinite(e.tableOffset) || e.tableOffset + e.tableSize * 8 > c.fileLength + c.s.clusterSize) {
      // Counted as the corruption it is, and not read: the table would be larger than the file.
      incRefs(c, e.tableOffset, e.tableSize * 8);
      continue;
    }
    incRefs(c, e.tableOffset, e.tableSize * 8);
    const t = await readTable(c, e.tableOffset, e.tableSize * 8, 'bitmap table');
    if (!t) continue;
    for (let i = 0; i < e.tableSize; i++) {
      const off = entryOffset(hiWord(t, 8 * i), loWord(t, 8 * i));
      if (off > 0) incRefs(c, off, c.s.clusterSize);
    }
  }
}

/** QEMU's calculate_refcounts plus check_refblocks. */
async function calculate(c: Ctx): Promise<void> {
  const s = c.s;
  const cs = s.clusterSize;
  incRefs(c, 0, cs);
  await checkL1(c, s.header.l1TableOffset, s.header.l1Size, true);
  for (const sn of s.snapshots) {
    if (!Number.isFinite(sn.l1TableOffset) || sn.l1TableOffset % cs !== 0) {
      c.log(`ERROR snapshot ${sn.id} (${sn.name}) l1_offset=${Number.isFinite(sn.l1TableOffset) ? `0x${hex(sn.l1TableOffset)}` : 'beyond 2^53'}: L1 table is not cluster aligned; snapshot table entry corrupted`);
      c.res.corruptions++;
      continue;
    }
    if (sn.l1Size > LIMITS.MAX_L1_SIZE / 8) {
      c.log(`ERROR snapshot ${sn.id} (${sn.name}) l1_size=0x${hex(sn.l1Size)}: L1 size is too large; snapshot table entry corrupted`);
      c.res.corruptions++;
      continue;
    }
    await checkL1(c, sn.l1TableOffset, sn.l1Size, false);
  }
  incRefs(c, s.header.snapshotsOffset, s.snapshotsSize);
  await checkBitmaps(c);
  incRefs(c, s.refcount.tableOffset, s.refcount.table.length, true);
  const fileClusters = Math.ceil((await bdrvGetLength(c.bs.file!.bs)) / cs);
  for (let i = 0; i < s.refcount.tableSize; i++) {
    if (loWord(s.refcount.table, 8 * i) & 0x1ff) {
      c.log(`ERROR refcount table entry ${i} has reserved bits set`);
      c.res.corruptions++;
      c.rebuild = true;
      continue;
    }
    const off = s.refcount.tableEntry(i);
    if (off === 0) continue;
    if (!Number.isFinite(off) || off % cs !== 0) {
      c.log(`ERROR refcount block ${i} is not cluster aligned; refcount table entry corrupted`);
      c.res.corruptions++;
      c.rebuild = true;
      continue;
    }
    const k = off / cs;
    if (k >= fileClusters) {
      c.log(`ERROR refcount block ${i} is outside image`);
      c.res.corruptions++;
      c.rebuild = true;
      continue;
    }
    incRefs(c, off, cs, true);
    if (c.refs.get(k) !== 1) {
      c.log(`ERROR refcount block ${i} refcount=${c.refs.get(k)}`);
      c.res.corruptions++;
      c.rebuild = true;
    }
  }
}

/** Where cluster `k`'s refcount is stored (its block's offset, and the index there), or the answer without one: 0 when no block counts it, -1 for a misaligned block offset. */
function refcountSlot(c: Ctx, k: number): { off: number; index: number } | number {
  const s = c.s;
  const E = s.refcount.blockEntries;
  const b = Math.floor(k / E);
  if (b >= s.refcount.tableSize) return 0;
  const off = s.refcount.tableEntry(b);
  if (off === 0) return 0;
  if (!Number.isFinite(off) || off !== Math.floor(off / s.clusterSize) * s.clusterSize) return -1;
  return { off, index: k - b * E };
}

/** Stored refcount of cluster `k`, or -1 after reporting why it cannot be read. */
async function storedRefcount(c: Ctx, k: number): Promise<number> {
  const slot = refcountSlot(c, k);
  if (typeof slot === 'number') return slot;
  try {
    const block = await loadRefblock(c.s, slot.off);
    return refcountKernel().get(block, slot.index, c.s.refcount.order);
  } catch (e) {
    c.log(`Can't get refcount for cluster ${k}: ${toBlockError(e).message}`);
    c.res.checkErrors++;
    return -1;
  }
}

/**
 * storedRefcount answered without I/O when cluster `k`'s refcount block is
 * cached (or absent), else undefined: the per-cluster loops of check settle
 * the common case in one turn and await only for a block's first load.
 */
function storedRefcountCached(c: Ctx, k: number): number | undefined {
  const slot = refcountSlot(c, k);
  if (typeof slot === 'number') return slot < 0 ? undefined : slot;
  const block = c.s.refcountCache.lookup(slot.off);
  return block ? refcountKernel().get(block, slot.index, c.s.refcount.order) : undefined;
}

/** QEMU's compare_refcounts: stored versus counted, fixing in place what `fix` allows. Returns the highest cluster in use. */
async function compare(c: Ctx, fix: number): Promise<number> {
  const s = c.s;
  const cs = s.clusterSize;
  const fileClusters = Math.ceil((await bdrvGetLength(c.bs.file!.bs)) / cs);
  const n = Math.max(fileClusters, c.refs.counts.length);
  let highest = -1;
  const visit = async (k: number): Promise<void> => {
    const stored = await storedRefcount(c, k);
    const counted = c.refs.get(k);
    if (stored < 0) {
      if (counted > 0) highest = Math.max(highest, k);
      return;
    }
    if (stored > 0 || counted > 0) highest = Math.max(highest, k);
    if (stored === counted) return;
    let fixing = false;
    // A referenced cluster with refcount 0 may have been handed out again: only a rebuild is safe (QEMU 7.2).
    if (stored === 0) c.rebuild = true;
    else if (stored > counted && fix & CHECK_FIX.LEAKS) fixing = true;
    else if (stored < counted && fix & CHECK_FIX.ERRORS) fixing = true;
    c.log(`${fixing ? 'Repairing' : stored < counted ? 'ERROR' : 'Leaked'} cluster ${k} refcount=${stored} reference=${counted}`);
    if (fixing) {
      try {
        if (counted > s.refcount.max) throw new BlockError('ERANGE', 'refcount too large');
        await updateRefcounts(s, k, 1, counted - stored);
        if (stored > counted) c.res.leaksFixed++;
        else c.res.corruptionsFixed++;
        return;
      } catch {
        if (stored < counted) c.rebuild = true;
      }
    }
    if (stored < counted) c.res.corruptions++;
    else c.res.leaks++;
  };
  const E = s.refcount.blockEntries;
  for (let k = 0; k < n; k++) {
    // Skip quickly over refcount blocks that do not exist and clusters nobody references.
    const b = Math.floor(k / E);
    if ((b >= s.refcount.tableSize || s.refcount.tableEntry(b) === 0) && k < c.refs.counts.length) {
      const end = Math.min(n, (b + 1) * E);
      let any = -1;
      for (let j = k; j < end && j < c.refs.counts.length; j++) if (c.refs.counts[j] !== 0) { any = j; break; }
      if (any < 0) { k = end - 1; continue; }
      k = any;
    }
    // Agreeing counts (nearly all of them) settle here; a disagreement, or a block not yet loaded, takes visit.
    const stored = storedRefcountCached(c, k);
    if (stored !== undefined && stored === c.refs.get(k)) {
      if (stored > 0) highest = k;
      continue;
    }
    await visit(k);
  }
  for (const k of [...c.refs.extra.keys()].sort((a, b) => a - b)) if (k >= n) await visit(k);
  await flushRefblocks(s);
  return highest;
}

/** QEMU's check_oflag_copied: COPIED must be set exactly on entries of the active tables whose cluster has refcount 1. */
async function checkCopied(c: Ctx): Promise<void> {
  const s = c.s;
  const cs = s.clusterSize;
  const fixing = (c.fix & CHECK_FIX.ERRORS) !== 0;
  const refcountOf = (off: number): number | Promise<number> => storedRefcountCached(c, Math.floor(off / cs)) ?? storedRefcount(c, Math.floor(off / cs));
  let l1Changed = false;
  const copiedSeen = new Set<number>();
  for (let i = 0; i < s.header.l1Size; i++) {
    const hi = hiWord(s.l1, 8 * i);
    const lo = loWord(s.l1, 8 * i);
    const l2 = entryOffset(hi, lo);
    if (l2 <= 0 || l2 % cs !== 0) continue;
    const rc = await refcountOf(l2);
    if (rc < 0) continue;
    if ((rc === 1) !== ((hi & HI_COPIED) !== 0)) {
      c.log(`${fixing ? 'Repairing' : 'ERROR'} OFLAG_COPIED L2 cluster: l1_index=${i} l1_entry=${entryHex(hi, lo)} refcount=${rc}`);
      if (fixing) {
        setWords(s.l1, 8 * i, (rc === 1 ? hi | HI_COPIED : hi & ~HI_COPIED) >>> 0, lo);
        l1Changed = true;
        c.res.corruptionsFixed++;
      } else {
        c.res.corruptions++;
      }
    }
    // Entries of a table are checked once, however many L1 entries name it; one past the file reads as zeroes.
    if (l2 >= c.fileLength || copiedSeen.has(l2)) continue;
    copiedSeen.add(l2);
    const table = await readTable(c, l2, cs, 'check_oflag_copied');
    if (!table) continue;
    let dirty = false;
    for (let j = 0; j < s.l2Entries; j++) {
      const o = j * s.l2EntryBytes;
      const ehi = hiWord(table, o);
      const elo = loWord(table, o);
      if (ehi & HI_COMPRESSED) continue;
      const off = entryOffset(ehi, elo);
      const hasHost = off !== 0 || (s.hasDataFile && (ehi & HI_COPIED) !== 0);
      if (!hasHost || off < 0 || off % cs !== 0) continue;
      const known = s.hasDataFile ? 1 : refcountOf(off);
      const erc = typeof known === 'number' ? known : await known;
      if (erc < 0) continue;
      if ((erc === 1) !== ((ehi & HI_COPIED) !== 0)) {
        c.log(`${fixing ? 'Repairing' : 'ERROR'} OFLAG_COPIED data cluster: l2_entry=${entryHex(ehi, elo)} refcount=${erc}`);
        if (fixing) {
          setWords(table, o, (erc === 1 ? ehi | HI_COPIED : ehi & ~HI_COPIED) >>> 0, elo);
          dirty = true;
          c.res.corruptionsFixed++;
        } else {
          c.res.corruptions++;
        }
      }
    }
    if (dirty) {
      try {
        await bdrvPwritev(c.bs.file!, l2, cs, table);
        s.l2Cache.discardRange(l2, cs);
      } catch (e) {
        c.log(`ERROR: Could not write L2 table: ${toBlockError(e).message}`);
        c.res.checkErrors++;
      }
    }
  }
  if (l1Changed) {
    try {
      await bdrvPwritev(c.bs.file!, s.header.l1TableOffset, s.header.l1Size * 8, s.l1.subarray(0, s.header.l1Size * 8));
    } catch (e) {
      c.log(`ERROR: Could not write L1 table: ${toBlockError(e).message}`);
      c.res.checkErrors++;
    }
  }
}

/**
 * QEMU's rebuild_refcount_structure: new refcount blocks and table, placed
 * after every cluster in use, built from the counted references (the old
 * refcount structures are not counted, so they become free), then made
 * current with one header write.
 */
async function rebuild(c: Ctx): Promise<void> {
  const s = c.s;
  const cs = s.clusterSize;
  const E = s.refcount.blockEntries;
  const order = s.refcount.order;
  const k = refcountKernel();
  c.log('Rebuilding refcount structure');
  for (const r of c.refcountClusters) {
    // Drop the old structures' own references.
    if (r < c.refs.counts.length && c.refs.counts[r]! > 0) c.refs.counts[r]!--;
    else if (c.refs.extra.has(r)) c.refs.extra.set(r, c.refs.extra.get(r)! - 1);
  }
  const fileClusters = Math.ceil((await bdrvGetLength(c.bs.file!.bs)) / cs);
  const start = Math.max(fileClusters, c.refs.highest() + 1);
  const used = new Set<number>();
  for (let i = 0; i < c.refs.counts.length; i++) if (c.refs.counts[i] !== 0) used.add(Math.floor(i / E));
  for (const [i, v] of c.refs.extra) if (v > 0) used.add(Math.floor(i / E));
  // Fixed point: the new blocks and table count themselves.
  let nb = 0;
  let tk = 0;
  let blocks: number[] = [];
  for (let guard = 0; guard < 64; guard++) {
    const all = new Set(used);
    for (let x = start; x < start + nb + tk; x++) all.add(Math.floor(x / E));
    blocks = [...all].sort((a, b) => a - b);
    const entries = (blocks.length ? blocks[blocks.length - 1]! : 0) + 1;
    const tk2 = Math.max(1, Math.ceil((entries * 8) / cs));
    if (blocks.length === nb && tk2 === tk) break;
    nb = blocks.length;
    tk = tk2;
  }
  if (tk * cs > LIMITS.MAX_REFTABLE_SIZE) throw new BlockError('EFBIG', 'Refcount table too large');
  const blockAt = new Map<number, number>();
  blocks.forEach((b, j) => blockAt.set(b, start + j));
  const tableAt = start + nb;
  const table = new Uint8Array(tk * cs);
  const tdv = new DataView(table.buffer);
  const file = c.bs.file!;
  for (const b of blocks) {
    const buf = new Uint8Array(cs);
    for (let i = 0; i < E; i++) {
      const x = b * E + i;
      let v = c.refs.get(x);
      if (x >= start && x < start + nb + tk) v = 1;
      if (v > 0) k.set(buf, i, order, Math.min(v, s.refcount.max));
    }
    const at = blockAt.get(b)! * cs;
    await bdrvPwritev(file, at, cs, buf);
    tdv.setUint32(8 * b, Math.floor(at / 0x100000000));
    tdv.setUint32(8 * b + 4, at >>> 0);
  }
  await bdrvPwritev(file, tableAt * cs, table.length, table);
  await barrier(s);
  const hdr = new Uint8Array(12);
  const hdv = new DataView(hdr.buffer);
  hdv.setBigUint64(0, BigInt(tableAt * cs));
  hdv.setUint32(8, tk);
  await bdrvPwritev(file, HDR.refcountTableOffset, 12, hdr);
  await barrier(s);
  s.refcountCache.clear();
  s.refcount.table = table;
  s.refcount.tableOffset = tableAt * cs;
  s.header.refcountTableOffset = tableAt * cs;
  s.header.refcountTableClusters = tk;
  s.freeClusterIndex = 0;
  s.freeByteOffset = 0;
}

/**
 * Checks the image and repairs what `fix` (CHECK_FIX bits) allows; callers
 * hold the image lock. Returns QEMU's counts; a repaired image with no
 * errors left gets its dirty and corrupt bits cleared.
 */
export async function qcow2Check(bs: BlockNode, s: Qcow2State, fix: number, progress?: ProgressFn): Promise<CheckResult> {
  if (fix && bs.readOnly) throw new BlockError('EACCES', 'Cannot repair a read-only image', { node: bs.nodeName });
  const res = newResult();
  const log = (m: string): void => bs.graph.onWarning(m);
  if (!bs.readOnly && !s.broken) {
    // Pending frees and dirty tables would otherwise show up as leaks.
    await writeback(s);
    await barrier(s);
  }
  if (s.header.nbSnapshots > 0 && s.snapshots.length === 0) {
    try {
      const r = await readSnapshots(bs.file!, s.header.snapshotsOffset, s.header.nbSnapshots, s.header.size);
      s.snapshots = r.snapshots;
      s.snapshotsSize = r.size;
    } catch (e) {
      log(`ERROR: ${toBlockError(e).message}`);
      res.corruptions++;
    }
  }
  const cs = s.clusterSize;
  const fileLength = await bdrvGetLength(bs.file!.bs);
  const fileClusters = Math.ceil(fileLength / cs);
  res.bfi.totalClusters = Math.ceil(Math.floor(s.header.size / 512) * 512 / cs);
  // References past the file are kept sparsely, so a corrupt entry cannot make the table huge.
  const c: Ctx = { bs, s, res, fix, refs: new RefTable(fileClusters, fileClusters + 1024), log, rebuild: false, refcountClusters: new Set(), fileLength, l2Seen: new Set(), l2Memo: new Map() };
  if (progress) c.progress = (p) => progress(p, 100);
  await calculate(c);
  progress?.(90, 100);
  const before = { ...res, bfi: { ...res.bfi } };
  let highest = await compare(c, 0);
  if (fix && c.rebuild && fix & CHECK_FIX.ERRORS) {
    const old = { corruptions: res.corruptions, leaks: res.leaks };
    await rebuild(c);
    // Count again against the new structures (QEMU recalculates and fixes the old structures' leaks).
    const newLength = await bdrvGetLength(bs.file!.bs);
    const again: Ctx = { bs, s, res: newResult(), fix: 0, refs: new RefTable(Math.ceil(newLength / cs), Math.ceil(newLength / cs) + 1024), log: () => undefined, rebuild: false, refcountClusters: new Set(), fileLength: newLength, l2Seen: new Set(), l2Memo: new Map() };
    await calculate(again);
    highest = await compare(again, CHECK_FIX.LEAKS);
    Object.assign(res, { ...before, corruptions: again.res.corruptions, leaks: again.res.leaks - again.res.leaksFixed, checkErrors: before.checkErrors + again.res.checkErrors });
    if (res.corruptions < old.corruptions) res.corruptionsFixed += old.corruptions - res.corruptions;
    if (res.leaks < old.leaks) res.leaksFixed += old.leaks - res.leaks;
  } else if (fix) {
    if (c.rebuild) {
      // Only -r all may rebuild; QEMU gives up with EIO ("Check failed") rather than half-repair.
      log('ERROR need to rebuild refcount structures');
      res.checkErrors++;
      throw new BlockError('EIO', undefined, { node: bs.nodeName });
    }
    if (res.leaks || res.corruptions) {
      Object.assign(res, before, { bfi: before.bfi });
      highest = await compare(c, fix);
    }
  }
  progress?.(95, 100);
  c.res = res;
  await checkCopied(c);
  res.imageEndOffset = (highest + 1) * cs;
  if (fix) {
    await flushRefblocks(s);
    await barrier(s);
    if (res.checkErrors === 0 && res.corruptions === 0) {
      // QEMU's qcow2_mark_clean and qcow2_mark_consistent.
      await markClean(s);
      if (s.header.incompatibleFeatures & INCOMPAT.CORRUPT) {
        s.header.incompatibleFeatures &= ~INCOMPAT.CORRUPT;
        const b = new Uint8Array(8);
        new DataView(b.buffer).setBigUint64(0, s.header.incompatibleFeatures);
        await bdrvPwritev(bs.file!, HDR.incompatibleFeatures, 8, b);
        await barrier(s);
      }
    }
  }
  progress?.(100, 100);
  return res;
}
