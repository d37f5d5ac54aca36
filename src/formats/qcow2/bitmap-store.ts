/**
 * Persistent dirty bitmaps in qcow2 (QEMU's block/qcow2-bitmap.c; format in
 * docs/interop/qcow2.txt, "Bitmaps extension"): the bitmap directory is
 * loaded on open into the node's dirty bitmaps (autoload bitmaps enabled,
 * others disabled; bitmaps already IN_USE in the image are inconsistent),
 * IN_USE is set in the image when it is opened read-write, and on close the
 * bitmaps are written back: data clusters, bitmap tables, a new directory,
 * then the header; the old clusters are freed only after the header points
 * at the new directory, so a crash leaves the old bitmaps or leaks.
 */
import { BlockError, toBlockError } from '../../core/errors.ts';
import { BdrvDirtyBitmap, bdrvCreateDirtyBitmap, bdrvDirtyBitmapCheck, bdrvFindDirtyBitmap, bdrvReleaseDirtyBitmap, BITMAP_CHECK } from '../../core/dirty-bitmap.ts';
import { bdrvFlush, bdrvPread, bdrvPwritev } from '../../core/io.ts';
import type { BlockNode } from '../../core/node.ts';
import { allocClusters, barrier, overlapCheck, queueFree, writeback, writeHeaderRaw } from './alloc.ts';
import { BME_FLAG } from './bitmap.ts';
import { AUTOCLEAR } from './header.ts';
import { entryOffset, hiWord, loWord, OL, setWords, offsetWords, type Qcow2State } from './state.ts';

/** Limits of qcow2-bitmap.c. */
const BME = {
  MAX_TABLE_SIZE: 0x8000000,
  MAX_PHYS_SIZE: 0x20000000,
  MAX_GRANULARITY_BITS: 31,
  MIN_GRANULARITY_BITS: 9,
  MAX_NAME_SIZE: 1023,
  RESERVED_FLAGS: ~(BME_FLAG.IN_USE | BME_FLAG.AUTO) >>> 0,
  TYPE_DIRTY_TRACKING: 1,
} as const;
const MAX_BITMAPS = 65535;
const MAX_DIRECTORY_SIZE = 1024 * MAX_BITMAPS;
/** Bitmap table entry bit 0: the chunk is all ones (only without a data cluster). */
const TABLE_ALL_ONES = 1;

/** One bitmap of the directory as QEMU keeps it (Qcow2Bitmap), with the in-memory bitmap it stands for while storing. */
interface Qcow2Bitmap {
  name: string;
  tableOffset: number;
  tableSize: number;
  flags: number;
  granularityBits: number;
  dirty?: BdrvDirtyBitmap;
}

const enc = new TextEncoder();

/** Bytes of a directory entry with an `nameBytes`-byte name (calc_dir_entry_size). */
function dirEntrySize(nameBytes: number, extra = 0): number {
  return Math.ceil((24 + extra + nameBytes) / 8) * 8;
}

function directorySize(list: readonly Qcow2Bitmap[]): number {
  return list.reduce((n, bm) => n + dirEntrySize(enc.encode(bm.name).length), 0);
}

/** Entries of the bitmap table of a bitmap over `size` bytes (size_to_clusters of the serialisation size). */
function tableEntries(size: number, granularity: number, clusterSize: number): number {
  if (size === 0) return 0;
  return Math.ceil(Math.ceil(size / granularity) / 64 / (clusterSize / 8));
}

function writable(bs: BlockNode): boolean {
  return !bs.readOnly;
}

/** QEMU's check_constraints_on_bitmap, with its messages. */
function checkConstraints(s: Qcow2State, name: string, granularity: number): void {
  const bits = Math.log2(granularity);
  const len = s.bs.totalBytes;
  if (bits > BME.MAX_GRANULARITY_BITS) throw new BlockError('EINVAL', `Granularity exceeds maximum (${2 ** BME.MAX_GRANULARITY_BITS} bytes)`);
  if (bits < BME.MIN_GRANULARITY_BITS) throw new BlockError('EINVAL', `Granularity is under minimum (${2 ** BME.MIN_GRANULARITY_BITS} bytes)`);
  if (len > BME.MAX_PHYS_SIZE * 2 ** bits || len > BME.MAX_TABLE_SIZE * s.clusterSize * 2 ** bits) {
    throw new BlockError('EINVAL', 'Too much space will be occupied by the bitmap. Use larger granularity');
  }
  if (enc.encode(name).length > BME.MAX_NAME_SIZE) throw new BlockError('EINVAL', `Name length exceeds maximum (${BME.MAX_NAME_SIZE} characters)`);
}

/** QEMU's check_dir_entry: false when the entry breaks a limit. */
function dirEntryValid(s: Qcow2State, e: { tableOffset: number; tableSize: number; granularityBits: number; flags: number; nameSize: number; type: number }): boolean {
  if (
    e.tableSize === 0 || e.tableOffset === 0 || !Number.isFinite(e.tableOffset) || e.tableOffset % s.clusterSize !== 0 ||
    e.tableSize > BME.MAX_TABLE_SIZE || e.granularityBits > BME.MAX_GRANULARITY_BITS || e.granularityBits < BME.MIN_GRANULARITY_BITS ||
    (e.flags & BME.RESERVED_FLAGS) !== 0 || e.nameSize > BME.MAX_NAME_SIZE || e.type !== BME.TYPE_DIRTY_TRACKING
  ) return false;
  const phys = e.tableSize * s.clusterSize;
  if (phys > BME.MAX_PHYS_SIZE) return false;
  if (!(e.flags & BME_FLAG.IN_USE) && s.bs.totalBytes > phys * 8 * 2 ** e.granularityBits) return false;
  return true;
}

/** Reads and validates the bitmap directory (QEMU's bitmap_list_load), with its messages. */
async function listLoad(s: Qcow2State): Promise<Qcow2Bitmap[]> {
  const ext = s.ext.bitmaps;
  if (!ext) return [];
  const size = ext.directorySize;
  if (size === 0) throw new BlockError('EINVAL', 'Requested bitmap directory size is zero');
  if (size > MAX_DIRECTORY_SIZE) throw new BlockError('EINVAL', 'Requested bitmap directory size is too big');
  let dir: Uint8Array;
  try {
    dir = await bdrvPread(s.bs.file!, ext.directoryOffset, size);
  } catch (e) {
    const be = toBlockError(e);
    throw new BlockError(be.code, `Failed to read bitmap directory: ${be.message}`, { cause: e });
  }
  const dv = new DataView(dir.buffer, dir.byteOffset, dir.byteLength);
  const out: Qcow2Bitmap[] = [];
  const broken = (): BlockError => new BlockError('EINVAL', 'Broken bitmap directory');
  let off = 0;
  while (off < size) {
    if (off + 24 > size) throw broken();
    if (out.length + 1 > ext.nbBitmaps) throw new BlockError('EINVAL', 'More bitmaps found than specified in header extension');
    const hi = dv.getUint32(off);
    const lo = dv.getUint32(off + 4);
    const e = {
      tableOffset: hi >= 0x200000 ? Infinity : hi * 0x100000000 + lo,
      tableSize: dv.getUint32(off + 8),
      flags: dv.getUint32(off + 12),
      type: dv.getUint8(off + 16),
      granularityBits: dv.getUint8(off + 17),
      nameSize: dv.getUint16(off + 18),
    };
    const extra = dv.getUint32(off + 20);
    const next = off + dirEntrySize(e.nameSize, extra);
    if (next > size) throw broken();
    const nameAt = off + 24 + extra;
    const name = new TextDecoder().decode(dir.subarray(nameAt, nameAt + e.nameSize));
    if (extra !== 0) throw new BlockError('EINVAL', 'Bitmap extra data is not supported');
    if (!dirEntryValid(s, e)) throw new BlockError('EINVAL', `Bitmap '${name}' doesn't satisfy the constraints`);
    out.push({ name, tableOffset: e.tableOffset, tableSize: e.tableSize, flags: e.flags, granularityBits: e.granularityBits });
    off = next;
  }
  if (out.length !== ext.nbBitmaps) throw new BlockError('EINVAL', 'Less bitmaps found than specified in header extension');
  return out;
}

/** Serialises the directory for `list` (bitmap_list_store's buffer). */
function serializeDirectory(list: readonly Qcow2Bitmap[]): Uint8Array {
  const buf = new Uint8Array(directorySize(list));
  const dv = new DataView(buf.buffer);
  let off = 0;
  for (const bm of list) {
    const name = enc.encode(bm.name);
    dv.setBigUint64(off, BigInt(bm.tableOffset));
    dv.setUint32(off + 8, bm.tableSize);
    dv.setUint32(off + 12, bm.flags);
    dv.setUint8(off + 16, BME.TYPE_DIRTY_TRACKING);
    dv.setUint8(off + 17, bm.granularityBits);
    dv.setUint16(off + 18, name.length);
    dv.setUint32(off + 20, 0);
    buf.set(name, off + 24);
    off += dirEntrySize(name.length);
  }
  return buf;
}

/** Writes the directory: at a new place (returned) or over the current one (bitmap_list_store). */
async function listStore(s: Qcow2State, list: readonly Qcow2Bitmap[], inPlace: boolean): Promise<{ offset: number; size: number }> {
  const buf = serializeDirectory(list);
  let offset: number;
  if (inPlace) {
    const ext = s.ext.bitmaps!;
    if (ext.directorySize !== buf.length) throw new BlockError('EINVAL', 'Bitmap directory size changed');
    offset = ext.directoryOffset;
  } else {
    offset = (await allocClusters(s, Math.ceil(buf.length / s.clusterSize))).offset;
  }
  try {
    await overlapCheck(s, inPlace ? OL.BITMAP_DIRECTORY : 0, offset, buf.length);
    await bdrvPwritev(s.bs.file!, offset, buf.length, buf);
  } catch (e) {
    if (!inPlace) queueFree(s, offset, buf.length, 'other');
    throw e;
  }
  return { offset, size: buf.length };
}

/** Writes the header and makes it durable (update_header_sync). */
async function headerSync(s: Qcow2State): Promise<void> {
  await writeHeaderRaw(s);
  await bdrvFlush(s.bs.file!.bs);
}

/**
 * Rewrites the directory in place with new flags (update_ext_header_and_dir_in_place):
 * the autoclear bit goes first, so a crash in between leaves bitmaps a reader drops rather than trusts.
 */
async function updateDirInPlace(s: Qcow2State, list: readonly Qcow2Bitmap[]): Promise<void> {
  const ext = s.ext.bitmaps;
  if (!(s.header.autoclearFeatures & AUTOCLEAR.BITMAPS) || !ext || list.length === 0 || list.length !== ext.nbBitmaps) {
    throw new BlockError('EINVAL', 'Invalid argument');
  }
  s.header.autoclearFeatures &= ~AUTOCLEAR.BITMAPS;
  await headerSync(s);
  await listStore(s, list, true);
  s.header.autoclearFeatures |= AUTOCLEAR.BITMAPS;
  await headerSync(s);
}

/**
 * Writes a new directory for `list` and points the header at it
 * (update_ext_header_and_dir); the old directory is freed afterwards.
 */
async function updateDirAndHeader(s: Qcow2State, list: readonly Qcow2Bitmap[]): Promise<void> {
  const old = s.ext.bitmaps;
  if (list.length > 0) {
    if (list.length > MAX_BITMAPS) throw new BlockError('EINVAL', 'Invalid argument');
    const { offset, size } = await listStore(s, list, false);
    // The new tables and directory are referenced by refcounts on disk before the header points at them.
    await writeback(s);
    await barrier(s);
    s.ext.bitmaps = { nbBitmaps: list.length, directoryOffset: offset, directorySize: size };
    s.header.autoclearFeatures |= AUTOCLEAR.BITMAPS;
  } else {
    delete s.ext.bitmaps;
    s.header.autoclearFeatures &= ~AUTOCLEAR.BITMAPS;
  }
  try {
    await headerSync(s);
  } catch (e) {
    if (old) s.ext.bitmaps = old;
    else delete s.ext.bitmaps;
    throw e;
  }
  if (old && old.directorySize > 0) queueFree(s, old.directoryOffset, old.directorySize, 'other');
}

/** Reads a bitmap table and checks every entry (bitmap_table_load / check_table_entry). */
async function loadTable(s: Qcow2State, bm: Qcow2Bitmap): Promise<Uint8Array> {
  const fail = (): BlockError => new BlockError('EINVAL', `Could not read bitmap_table table from image for bitmap '${bm.name}': Invalid argument`);
  let t: Uint8Array;
  try {
    t = await bdrvPread(s.bs.file!, bm.tableOffset, bm.tableSize * 8);
  } catch (e) {
    const be = toBlockError(e);
    throw new BlockError(be.code, `Could not read bitmap_table table from image for bitmap '${bm.name}': ${be.message}`, { cause: e });
  }
  for (let i = 0; i < bm.tableSize; i++) {
    const hi = hiWord(t, 8 * i);
    const lo = loWord(t, 8 * i);
    if (hi & 0xff000000 || lo & 0x1fe) throw fail();
    const off = entryOffset(hi, lo);
    if (off < 0) throw fail();
    if (off !== 0 && (lo & TABLE_ALL_ONES || off % s.clusterSize !== 0)) throw fail();
  }
  return t;
}

/** Creates the in-memory bitmap for a directory entry and fills it from the image unless it is IN_USE (load_bitmap). */
async function loadBitmap(bs: BlockNode, s: Qcow2State, bm: Qcow2Bitmap): Promise<BdrvDirtyBitmap> {
  const table = await loadTable(s, bm);
  const dirty = bdrvCreateDirtyBitmap(bs, 2 ** bm.granularityBits, bm.name);
  if (bm.flags & BME_FLAG.IN_USE) return dirty;
  try {
    const cs = s.clusterSize;
    const n = tableEntries(dirty.size, dirty.granularity, cs);
    if (n !== bm.tableSize || n > BME.MAX_TABLE_SIZE) throw new BlockError('EINVAL', 'Invalid argument');
    for (let i = 0; i < n; i++) {
      const hi = hiWord(table, 8 * i);
      const lo = loWord(table, 8 * i);
      const off = entryOffset(hi, lo);
      if (off === 0) {
        if (lo & TABLE_ALL_ONES) dirty.hbitmap.deserializeChunk(i, cs, 'ones');
      } else {
        dirty.hbitmap.deserializeChunk(i, cs, await bdrvPread(s.bs.file!, off, cs));
      }
    }
  } catch (e) {
    bdrvReleaseDirtyBitmap(dirty);
    const be = toBlockError(e);
    throw new BlockError(be.code, `Could not read bitmap '${bm.name}' from image: ${be.message}`, { cause: e });
  }
  return dirty;
}

/**
 * Loads the image's bitmaps into `bs` (qcow2_load_dirty_bitmaps). With
 * write access, bitmaps that were not in use are marked IN_USE in the image
 * (returns true: the header was rewritten); without it every bitmap is
 * readonly. Fails, leaving no bitmap behind, when the directory is broken.
 */
export async function qcow2LoadDirtyBitmaps(bs: BlockNode, s: Qcow2State): Promise<boolean> {
  if (!s.ext.bitmaps) return false;
  const list = await listLoad(s);
  const created: BdrvDirtyBitmap[] = [];
  let needsUpdate = false;
  try {
    for (const bm of list) {
      if (bm.flags & BME_FLAG.IN_USE && bdrvFindDirtyBitmap(bs, bm.name)) continue;
      const dirty = await loadBitmap(bs, s, bm);
      created.push(dirty);
      dirty.persistent = true;
      if (bm.flags & BME_FLAG.IN_USE) dirty.inconsistent = true;
      else {
        bm.flags |= BME_FLAG.IN_USE;
        needsUpdate = true;
      }
      if (!(bm.flags & BME_FLAG.AUTO)) dirty.disabled = true;
    }
    if (needsUpdate && writable(bs)) {
      try {
        await updateDirInPlace(s, list);
      } catch (e) {
        const be = toBlockError(e);
        throw new BlockError(be.code, `Can't update bitmap directory: ${be.message}`, { cause: e });
      }
      return true;
    }
    if (!writable(bs)) for (const d of created) d.readonly = true;
    return false;
  } catch (e) {
    for (const d of created) bdrvReleaseDirtyBitmap(d);
    throw e;
  }
}

/** Frees a bitmap's data clusters and table (free_bitmap_clusters), after the directory no longer names it. */
async function freeBitmapClusters(s: Qcow2State, tableOffset: number, tableSize: number): Promise<void> {
  if (tableOffset === 0 || tableSize === 0) return;
  let t: Uint8Array;
  try {
    t = await bdrvPread(s.bs.file!, tableOffset, tableSize * 8);
  } catch {
    return; // the clusters leak; check can reclaim them
  }
  for (let i = 0; i < tableSize; i++) {
    const off = entryOffset(hiWord(t, 8 * i), loWord(t, 8 * i));
    if (off > 0) queueFree(s, off, s.clusterSize, 'always');
  }
  queueFree(s, tableOffset, tableSize * 8, 'other');
}

/** Writes one bitmap's data clusters and table; returns the table's place (store_bitmap). */
async function storeBitmap(s: Qcow2State, bm: Qcow2Bitmap, dirty: BdrvDirtyBitmap): Promise<void> {
  const cs = s.clusterSize;
  const name = bm.name;
  const n = tableEntries(dirty.size, dirty.granularity, cs);
  if (n > BME.MAX_TABLE_SIZE || n * cs > BME.MAX_PHYS_SIZE) throw new BlockError('EINVAL', `Bitmap '${name}' is too big`);
  const table = new Uint8Array(n * 8);
  const allocated: number[] = [];
  let tableOffset = 0;
  try {
    if (n > 0) {
      const chunks = dirty.hbitmap.tableChunks(cs);
      const buf = new Uint8Array(cs);
      for (let i = 0; i < n; i++) {
        // QEMU writes every chunk with a dirty bit as a data cluster, never as an all-ones entry.
        if (chunks[i] === 0) continue;
        let off: number;
        try {
          off = (await allocClusters(s, 1)).offset;
        } catch (e) {
          const be = toBlockError(e);
          throw new BlockError(be.code, `Failed to allocate clusters for bitmap '${name}': ${be.message}`, { cause: e });
        }
        allocated.push(off);
        const [hi, lo] = offsetWords(off);
        setWords(table, 8 * i, hi, lo);
        dirty.hbitmap.serializeChunk(i, cs, buf);
        await overlapCheck(s, 0, off, cs);
        try {
          await bdrvPwritev(s.bs.file!, off, cs, buf);
        } catch (e) {
          const be = toBlockError(e);
          throw new BlockError(be.code, `Failed to write bitmap '${name}' to file: ${be.message}`, { cause: e });
        }
      }
    }
    try {
      tableOffset = (await allocClusters(s, Math.max(1, Math.ceil((n * 8) / cs)))).offset;
    } catch (e) {
      const be = toBlockError(e);
      throw new BlockError(be.code, `Failed to allocate clusters for bitmap '${name}': ${be.message}`, { cause: e });
    }
    await overlapCheck(s, 0, tableOffset, n * 8);
    try {
      if (n > 0) await bdrvPwritev(s.bs.file!, tableOffset, n * 8, table);
    } catch (e) {
      const be = toBlockError(e);
      throw new BlockError(be.code, `Failed to write bitmap '${name}' to file: ${be.message}`, { cause: e });
    }
  } catch (e) {
    for (const off of allocated) queueFree(s, off, cs, 'always');
    if (tableOffset > 0) queueFree(s, tableOffset, n * 8, 'other');
    throw e;
  }
  bm.tableOffset = tableOffset;
  bm.tableSize = n;
}

/**
 * Writes the node's persistent bitmaps to the image
 * (qcow2_store_persistent_dirty_bitmaps): new bitmaps are appended to the
 * directory, bitmaps loaded from the image get new tables, the header is
 * switched, then the old tables are freed. With `release`, the stored
 * bitmaps are dropped from the node (close). Callers hold the image lock.
 */
export async function qcow2StorePersistentDirtyBitmaps(bs: BlockNode, s: Qcow2State, release: boolean): Promise<void> {
  const list = await listLoad(s);
  let nb = list.length;
  let dirSize = s.ext.bitmaps?.directorySize ?? 0;
  const drop: Array<{ offset: number; size: number }> = [];
  let needWrite = false;
  const byName = (name: string): Qcow2Bitmap | undefined => list.find((b) => b.name === name);
  for (const dirty of bs.dirtyBitmaps) {
    if (!dirty.persistent || dirty.inconsistent || dirty.name === null) continue;
    const name = dirty.name;
    if (dirty.readonly) {
      const bm = byName(name);
      if (bm) bm.dirty = dirty;
      continue;
    }
    needWrite = true;
    try {
      checkConstraints(s, name, dirty.granularity);
    } catch (e) {
      throw new BlockError('EINVAL', `Bitmap '${name}' doesn't satisfy the constraints: ${toBlockError(e).message}`);
    }
    let bm = byName(name);
    if (!bm) {
      if (++nb > MAX_BITMAPS) throw new BlockError('EINVAL', 'Too many persistent bitmaps');
      dirSize += dirEntrySize(enc.encode(name).length);
      if (dirSize > MAX_DIRECTORY_SIZE) throw new BlockError('EINVAL', 'Bitmap directory is too large');
      bm = { name, tableOffset: 0, tableSize: 0, flags: 0, granularityBits: 0 };
      list.push(bm);
    } else {
      if (!(bm.flags & BME_FLAG.IN_USE)) throw new BlockError('EINVAL', `Bitmap '${name}' already exists in the image`);
      drop.push({ offset: bm.tableOffset, size: bm.tableSize });
      bm.tableOffset = 0;
      bm.tableSize = 0;
    }
    bm.flags = dirty.enabled ? BME_FLAG.AUTO : 0;
    bm.granularityBits = Math.log2(dirty.granularity);
    bm.dirty = dirty;
  }
  if (needWrite) {
    if (!writable(bs)) throw new BlockError('EACCES', 'No write access');
    const stored: Qcow2Bitmap[] = [];
    try {
      for (const bm of list) {
        if (!bm.dirty || bm.dirty.readonly) continue;
        await storeBitmap(s, bm, bm.dirty);
        stored.push(bm);
      }
      try {
        await updateDirAndHeader(s, list);
      } catch (e) {
        const be = toBlockError(e);
        throw new BlockError(be.code, `Failed to update bitmap extension: ${be.message}`, { cause: e });
      }
    } catch (e) {
      // The new tables are not referenced by anything on disk: give their clusters back.
      for (const bm of stored) await freeBitmapClusters(s, bm.tableOffset, bm.tableSize);
      throw e;
    }
    for (const t of drop) await freeBitmapClusters(s, t.offset, t.size);
  }
  if (release) {
    for (const bm of list) if (bm.dirty) bdrvReleaseDirtyBitmap(bm.dirty);
  }
}

/** Throws QEMU's message unless a new persistent bitmap could be stored (qcow2_co_can_store_new_dirty_bitmap). */
export function qcow2CanStoreNewDirtyBitmap(bs: BlockNode, s: Qcow2State, name: string, granularity: number): void {
  const fail = (msg: string): never => {
    throw new BlockError('EINVAL', `Can't make bitmap '${name}' persistent in '${bs.displayName}': ${msg}`);
  };
  if (s.header.version < 3) fail('Cannot store dirty bitmaps in qcow2 v2 files');
  try {
    checkConstraints(s, name, granularity);
  } catch (e) {
    fail(toBlockError(e).message);
  }
  let nb = 1;
  let size = dirEntrySize(enc.encode(name).length);
  for (const d of bs.dirtyBitmaps) {
    if (!d.persistent || d.name === null) continue;
    nb++;
    size += dirEntrySize(enc.encode(d.name).length);
  }
  if (nb > MAX_BITMAPS) fail('Maximum number of persistent bitmaps is already reached');
  if (size > MAX_DIRECTORY_SIZE) fail('Not enough space in the bitmap directory');
}

/** Removes a bitmap from the image now (qcow2_co_remove_persistent_dirty_bitmap); a missing one is not an error. */
export async function qcow2RemovePersistentDirtyBitmap(bs: BlockNode, s: Qcow2State, name: string): Promise<void> {
  if (!s.ext.bitmaps) return;
  await s.lock.run(async () => {
    const list = await listLoad(s);
    const i = list.findIndex((b) => b.name === name);
    if (i < 0) return;
    const [bm] = list.splice(i, 1);
    try {
      await updateDirAndHeader(s, list);
    } catch (e) {
      const be = toBlockError(e);
      throw new BlockError(be.code, `Failed to update bitmap extension: ${be.message}`, { cause: e });
    }
    await freeBitmapClusters(s, bm!.tableOffset, bm!.tableSize);
    await writeback(s);
  });
  void bs;
}

/** Before a switch to read-only: stores the bitmaps and makes them readonly (qcow2_reopen_bitmaps_ro). */
export async function qcow2ReopenBitmapsRo(bs: BlockNode, s: Qcow2State): Promise<void> {
  await qcow2StorePersistentDirtyBitmaps(bs, s, false);
  for (const d of bs.dirtyBitmaps) if (d.persistent) d.readonly = true;
}

/** After a switch to read-write: marks the image's bitmaps IN_USE and makes them writable (qcow2_reopen_bitmaps_rw). */
export async function qcow2ReopenBitmapsRw(bs: BlockNode, s: Qcow2State): Promise<void> {
  if (!s.ext.bitmaps) return;
  const list = await listLoad(s);
  const ro: BdrvDirtyBitmap[] = [];
  let needUpdate = false;
  for (const bm of list) {
    const d = bdrvFindDirtyBitmap(bs, bm.name);
    if (!d) throw new BlockError('EINVAL', `Unexpected bitmap '${bm.name}' in image '${bs.filename}'`);
    if (!(bm.flags & BME_FLAG.IN_USE)) {
      if (!d.readonly) throw new BlockError('EINVAL', `Corruption: bitmap '${bm.name}' is not marked IN_USE in the image '${bs.filename}' and not marked readonly in RAM`);
      if (d.inconsistent) throw new BlockError('EINVAL', `Corruption: bitmap '${bm.name}' is inconsistent but is not marked IN_USE in the image '${bs.filename}'`);
      bm.flags |= BME_FLAG.IN_USE;
      needUpdate = true;
    } else if (d.readonly && !d.inconsistent) {
      throw new BlockError('EINVAL', `Corruption: bitmap '${bm.name}' is marked IN_USE in the image '${bs.filename}' but it is readonly and consistent in RAM`);
    }
    if (d.readonly) ro.push(d);
  }
  if (needUpdate) {
    try {
      await updateDirInPlace(s, list);
    } catch (e) {
      const be = toBlockError(e);
      throw new BlockError(be.code, `Cannot update bitmap directory: ${be.message}`, { cause: e });
    }
  }
  for (const d of ro) d.readonly = false;
}

/** Throws unless the bitmaps allow a resize (qcow2_truncate_bitmaps_check): every image bitmap loaded and usable. */
export async function qcow2TruncateBitmapsCheck(bs: BlockNode, s: Qcow2State): Promise<void> {
  if (!s.ext.bitmaps) return;
  const list = await listLoad(s);
  for (const bm of list) {
    const d = bdrvFindDirtyBitmap(bs, bm.name);
    if (!d) throw new BlockError('ENOTSUP', 'Cannot resize qcow2 with persistent bitmaps that were not loaded into memory');
    // Its message (and hint) as QEMU reports it.
    bdrvDirtyBitmapCheck(d, BITMAP_CHECK.DEFAULT);
  }
}

/**
 * Space the persistent bitmaps of `src` would take in a new qcow2 image with
 * `clusterSize` (qcow2_get_persistent_dirty_bitmap_size): every bitmap fully
 * allocated, its table, and the directory.
 */
export function persistentBitmapsSize(src: BlockNode, clusterSize: number): number {
  let total = 0;
  let dir = 0;
  for (const d of src.dirtyBitmaps) {
    if (!d.persistent || d.name === null) continue;
    const bytes = Math.ceil(Math.ceil(d.size / d.granularity) / 8);
    const clusters = Math.ceil(bytes / clusterSize);
    total += clusters * clusterSize;
    total += Math.ceil((clusters * 8) / clusterSize) * clusterSize;
    dir += dirEntrySize(enc.encode(d.name).length);
  }
  return total + Math.ceil(dir / clusterSize) * clusterSize;
}
