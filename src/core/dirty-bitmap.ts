/**
 * Dirty bitmaps on a node (QEMU's block/dirty-bitmap.c BdrvDirtyBitmap): a
 * named or anonymous HBitmap over the node's length that every completed
 * write, zero write and discard on the node marks while it is enabled (the
 * generic request path calls bdrvSetDirty). Flags follow QEMU: persistent
 * (a format stores it on close), inconsistent (loaded from an image that was
 * not closed cleanly: unusable except for removal), readonly (loaded from a
 * read-only image: may not change), busy (in use by an operation).
 * No format knowledge here: drivers load and store persistent bitmaps.
 */
import { BlockError, HintedError } from './errors.ts';
import { HBitmap, type DirtyArea } from './hbitmap.ts';
import type { BlockNode } from './node.ts';

/** Longest bitmap name (QEMU's BDRV_BITMAP_MAX_NAME_SIZE). */
export const BITMAP_MAX_NAME_SIZE = 1023;

/** What bdrvDirtyBitmapCheck refuses (QEMU's BDRV_BITMAP_* check flags). */
export const BITMAP_CHECK = {
  BUSY: 1,
  RO: 2,
  INCONSISTENT: 4,
  /** Anything that prevents changing the bitmap. */
  DEFAULT: 7,
  /** Reading is fine on a readonly bitmap. */
  ALLOW_RO: 5,
} as const;

/** One dirty bitmap attached to a node. */
export class BdrvDirtyBitmap {
  /** The node whose writes the bitmap tracks. */
  readonly bs: BlockNode;
  /** Name, or null for an anonymous (internal) bitmap. */
  name: string | null;
  /** The bits; replaced when the node is resized. */
  hbitmap: HBitmap;
  /** Not marked by writes (QEMU's !bdrv_dirty_bitmap_enabled). */
  disabled = false;
  /** The format driver stores it in the image on close. */
  persistent = false;
  /** Loaded from an image where it was in use: its bits are meaningless. */
  inconsistent = false;
  /** Loaded from an image opened read-only: no change allowed. */
  readonly = false;
  /** In use by an operation (backup, merge source of a job…). */
  busy = false;

  /** A clear bitmap (use bdrvCreateDirtyBitmap, which checks names and attaches it). */
  constructor(bs: BlockNode, name: string | null, size: number, granularity: number) {
    this.bs = bs;
    this.name = name;
    this.hbitmap = new HBitmap(size, granularity);
  }

  /** Bytes per bit. */
  get granularity(): number {
    return this.hbitmap.granularity;
  }

  /** Bytes covered (the node's length when the bitmap was made or last resized). */
  get size(): number {
    return this.hbitmap.size;
  }

  /** Whether writes mark it (QEMU's bdrv_dirty_bitmap_enabled). */
  get enabled(): boolean {
    return !this.disabled;
  }

  /** Dirty bytes, counted in whole granules (bdrv_get_dirty_count). */
  count(): number {
    return this.hbitmap.count();
  }

  /** Whether the granule holding `offset` is dirty. */
  get(offset: number): boolean {
    return this.hbitmap.get(offset);
  }

  /** Marks a byte range dirty, regardless of enablement (bdrv_set_dirty_bitmap). */
  setDirty(offset: number, bytes: number): void {
    const end = Math.min(offset + bytes, this.size);
    if (end > offset) this.hbitmap.set(offset, end - offset);
  }

  /**
   * Clears a byte range (bdrv_reset_dirty_bitmap): offset and length are
   * rounded outwards to whole granules the way the HBitmap needs them, so a
   * range that covers part of a granule clears the whole granule, as QEMU does.
   */
  resetDirty(offset: number, bytes: number): void {
    if (bytes <= 0) return;
    const g = this.granularity;
    const start = Math.floor(offset / g) * g;
    const end = Math.min(Math.ceil((offset + bytes) / g) * g, this.size);
    if (end > start) this.hbitmap.reset(start, end - start);
  }

  /** Clears every bit (bdrv_clear_dirty_bitmap without a backup). */
  clear(): void {
    this.hbitmap.resetAll();
  }

  /** First dirty byte in [offset, offset + bytes), or -1 (bdrv_dirty_bitmap_next_dirty). */
  nextDirty(offset: number, bytes = Number.MAX_SAFE_INTEGER): number {
    return this.hbitmap.nextDirty(offset, bytes);
  }

  /** First clean byte in [offset, offset + bytes), or -1 (bdrv_dirty_bitmap_next_zero). */
  nextZero(offset: number, bytes = Number.MAX_SAFE_INTEGER): number {
    return this.hbitmap.nextZero(offset, bytes);
  }

  /** Every dirty area in [start, end), merged and clamped (iteration over the bitmap). */
  dirtyAreas(start = 0, end = this.size): DirtyArea[] {
    return this.hbitmap.dirtyAreas(start, end);
  }

  /** Serialises the bits covering [offset, offset + bytes) into `out`, low bit first (bdrv_dirty_bitmap_serialize_part); offset must be granule-aligned. Returns the bytes written. */
  serializePart(offset: number, bytes: number, out: Uint8Array): number {
    const g = this.granularity;
    if (offset % g !== 0) throw new BlockError('EINVAL', `Serialisation offset ${offset} is not aligned to the granularity ${g}`);
    const startBit = offset / g;
    const nbits = Math.ceil(Math.min(bytes, this.size - offset) / g);
    const need = Math.ceil(nbits / 8);
    if (out.length < need) throw new BlockError('EINVAL', `Serialisation buffer needs ${need} bytes`);
    out.fill(0, 0, need);
    for (const a of this.dirtyAreas(offset, offset + bytes)) {
      const b0 = a.offset / g - startBit;
      const b1 = Math.ceil((a.offset + a.bytes) / g) - startBit;
      for (let b = Math.floor(b0); b < b1; b++) out[b >> 3]! |= 1 << (b & 7);
    }
    return need;
  }

  /** Sets the bits covering [offset, offset + bytes) from `src` as serializePart wrote them (bdrv_dirty_bitmap_deserialize_part); clear bits in `src` clear. */
  deserializePart(offset: number, bytes: number, src: Uint8Array): void {
    const g = this.granularity;
    if (offset % g !== 0) throw new BlockError('EINVAL', `Serialisation offset ${offset} is not aligned to the granularity ${g}`);
    const end = Math.min(offset + bytes, this.size);
    const nbits = Math.ceil((end - offset) / g);
    this.resetDirty(offset, end - offset);
    let b = 0;
    while (b < nbits) {
      if (!((src[b >> 3]! >> (b & 7)) & 1)) { b++; continue; }
      let e = b + 1;
      while (e < nbits && (src[e >> 3]! >> (e & 7)) & 1) e++;
      const a = offset + b * g;
      this.hbitmap.set(a, Math.min(end, offset + e * g) - a);
      b = e;
    }
  }
}

/** The node's bitmaps, newest first. */
export function dirtyBitmaps(bs: BlockNode): readonly BdrvDirtyBitmap[] {
  return bs.dirtyBitmaps;
}

/** The named bitmap on `bs`, or null (bdrv_find_dirty_bitmap). */
export function bdrvFindDirtyBitmap(bs: BlockNode, name: string): BdrvDirtyBitmap | null {
  for (const bm of bs.dirtyBitmaps) if (bm.name === name) return bm;
  return null;
}

/**
 * Creates a clear, enabled bitmap over the node's current length and attaches
 * it (bdrv_create_dirty_bitmap): a duplicate or too long name fails with
 * QEMU's message; granularity must be a power of two of at least 512.
 */
export function bdrvCreateDirtyBitmap(bs: BlockNode, granularity: number, name: string | null): BdrvDirtyBitmap {
  if (!(Number.isInteger(granularity) && granularity >= 512 && (granularity & (granularity - 1)) === 0 && granularity <= 2 ** 31)) {
    throw new BlockError('EINVAL', 'Granularity must be power of 2 and at least 512');
  }
  if (name !== null) {
    if (bdrvFindDirtyBitmap(bs, name)) throw new BlockError('EINVAL', `Bitmap already exists: ${name}`);
    if (new TextEncoder().encode(name).length > BITMAP_MAX_NAME_SIZE) throw new BlockError('EINVAL', `Bitmap name too long: ${name}`);
  }
  const bm = new BdrvDirtyBitmap(bs, name, bs.totalBytes, granularity);
  // Newest first, as QEMU's list: the order decides which bitmap a copy or a store meets first.
  bs.dirtyBitmaps.unshift(bm);
  return bm;
}

/** Detaches and frees a bitmap (bdrv_release_dirty_bitmap); a busy one cannot go. */
export function bdrvReleaseDirtyBitmap(bm: BdrvDirtyBitmap): void {
  if (bm.busy) throw new BlockError('EBUSY', `Bitmap '${bm.name ?? ''}' is currently in use by another operation and cannot be used`);
  const list = bm.bs.dirtyBitmaps;
  const i = list.indexOf(bm);
  if (i >= 0) list.splice(i, 1);
  bm.hbitmap.dispose();
}

/** Releases every named, non-busy bitmap (bdrv_release_named_dirty_bitmaps, on close). */
export function bdrvReleaseNamedDirtyBitmaps(bs: BlockNode): void {
  for (const bm of [...bs.dirtyBitmaps]) if (bm.name !== null && !bm.busy) bdrvReleaseDirtyBitmap(bm);
}

/**
 * Throws QEMU's message when the bitmap has a property `flags` forbids
 * (bdrv_dirty_bitmap_check); an inconsistent bitmap's error is a
 * HintedError with QEMU's hint.
 */
export function bdrvDirtyBitmapCheck(bm: BdrvDirtyBitmap, flags: number): void {
  const name = bm.name ?? '';
  if (flags & BITMAP_CHECK.BUSY && bm.busy) {
    throw new BlockError('EBUSY', `Bitmap '${name}' is currently in use by another operation and cannot be used`);
  }
  if (flags & BITMAP_CHECK.RO && bm.readonly) throw new BlockError('EPERM', `Bitmap '${name}' is readonly and cannot be modified`);
  if (flags & BITMAP_CHECK.INCONSISTENT && bm.inconsistent) {
    throw new HintedError('EINVAL', `Bitmap '${name}' is inconsistent and cannot be used`, 'Try block-dirty-bitmap-remove to delete this bitmap from disk\n');
  }
}

/** Marks [offset, offset + bytes) in every enabled bitmap of the node (bdrv_set_dirty); the request path calls it after each completed write. */
export function bdrvSetDirty(bs: BlockNode, offset: number, bytes: number): void {
  for (const bm of bs.dirtyBitmaps) {
    if (!bm.disabled) bm.setDirty(offset, bytes);
  }
}

/** Clears a bitmap after QEMU's checks (qmp block-dirty-bitmap-clear). */
export function bdrvClearDirtyBitmap(bm: BdrvDirtyBitmap): void {
  bdrvDirtyBitmapCheck(bm, BITMAP_CHECK.DEFAULT);
  bm.clear();
}

/** ORs `src` into `dst` after QEMU's checks (bdrv_merge_dirty_bitmap): sizes must match, granularities may differ. */
export function bdrvMergeDirtyBitmap(dst: BdrvDirtyBitmap, src: BdrvDirtyBitmap): void {
  bdrvDirtyBitmapCheck(dst, BITMAP_CHECK.DEFAULT);
  bdrvDirtyBitmapCheck(src, BITMAP_CHECK.ALLOW_RO);
  if (src.size !== dst.size) {
    throw new BlockError('EINVAL', `Bitmaps are of different sizes (destination size is ${dst.size}, source size is ${src.size}) and can't be merged`);
  }
  dst.hbitmap.merge(src.hbitmap);
}

/** Resizes every bitmap of the node to `size` bytes, keeping the bits below the smaller size (bdrv_dirty_bitmap_truncate). */
export function bdrvDirtyBitmapTruncate(bs: BlockNode, size: number): void {
  for (const bm of bs.dirtyBitmaps) {
    if (bm.size === size) continue;
    const old = bm.hbitmap;
    const fresh = new HBitmap(size, old.granularity);
    for (const a of old.dirtyAreas(0, Math.min(size, old.size))) fresh.set(a.offset, a.bytes);
    bm.hbitmap = fresh;
    old.dispose();
  }
}

/** Whether any bitmap of the node is read-only (bdrv_has_readonly_bitmaps): writes to the node must then fail. */
export function bdrvHasReadonlyBitmaps(bs: BlockNode): boolean {
  return bs.dirtyBitmaps.some((bm) => bm.readonly);
}

/** Whether a bitmap would have to be written to the image on close (bdrv_has_changed_persistent_bitmaps). */
export function bdrvHasChangedPersistentBitmaps(bs: BlockNode): boolean {
  return bs.dirtyBitmaps.some((bm) => bm.persistent && !bm.readonly);
}
