/**
 * Dirty bitmaps with QEMU's HBitmap semantics (util/hbitmap.c): a bitmap over
 * `size` bytes in which each bit covers `granularity` bytes. Offsets and
 * lengths are in bytes as in QEMU's API; the bit work is done by the bitmap
 * kernel (wasm when loaded, src/kernels), which keeps the bits in linear
 * memory. Also the qcow2 bitmap-table layout (QEMU's qcow2-bitmap.c
 * load_bitmap_data/store_bitmap_data): the bitmap split into cluster-sized
 * chunks, each stored as a data cluster or as a table entry meaning "all
 * zeroes" or "all ones".
 */
import { BlockError } from './errors.ts';
import { bitmapRef } from '../kernels/reference-bitmap.ts';
import type { BitmapOps, BitmapStore } from '../kernels/types.ts';

let defaultOps: BitmapOps = bitmapRef;

/** Installs the bitmap kernel new bitmaps use (loadKernels installs the wasm one); existing bitmaps keep theirs. */
export function setBitmapKernel(ops: BitmapOps): void {
  defaultOps = ops;
}

/** How a qcow2 bitmap-table chunk is stored: not at all (table entry 0, all clear), as all ones (entry flag 1), or as a data cluster. */
export const CHUNK = { ZERO: 0, ONES: 1, DATA: 2 } as const;
export type ChunkKind = (typeof CHUNK)[keyof typeof CHUNK];

/** A dirty byte range. */
export interface DirtyArea {
  offset: number;
  bytes: number;
}

/** Most bits one bitmap may have (256 MiB of bits: 1 TiB at 512-byte granules, 128 PiB at 64 KiB). */
export const MAX_BITS = 2 ** 31;

/** Runs fetched from the kernel per call when listing dirty areas. */
const RUN_BATCH = 256;

/** QEMU's HBitmap over `size` bytes at `granularity` bytes per bit. */
export class HBitmap {
  /** Bytes the bitmap covers (QEMU's orig_size). */
  readonly size: number;
  /** Bytes per bit (a power of two). */
  readonly granularity: number;
  /** log2 of the granularity. */
  readonly granularityBits: number;
  /** Number of bits: ceil(size / granularity), at least 1. */
  readonly nbits: number;
  private readonly ops: BitmapOps;
  private store: BitmapStore | null;
  private dirtyBits = 0;
  private runs: Float64Array | null = null;

  /** A clear bitmap over `size` bytes with `granularity` bytes per bit (QEMU's hbitmap_alloc); `ops` defaults to the installed kernel. */
  constructor(size: number, granularity: number, ops: BitmapOps = defaultOps) {
    if (!(Number.isSafeInteger(size) && size >= 0)) throw new BlockError('EINVAL', `Invalid bitmap size ${size}`);
    if (!(Number.isSafeInteger(granularity) && granularity >= 1 && (granularity & (granularity - 1)) === 0 && granularity <= 2 ** 31)) {
      throw new BlockError('EINVAL', 'Granularity must be power of 2');
    }
    this.size = size;
    this.granularity = granularity;
    this.granularityBits = Math.log2(granularity);
    this.nbits = Math.max(Math.ceil(size / granularity), 1);
    // The kernels address bits with 32-bit indices in a 32-bit memory: refuse rather than wrap or abort.
    if (this.nbits > MAX_BITS) {
      throw new BlockError('EFBIG', `A dirty bitmap over ${size} bytes at granularity ${granularity} needs ${this.nbits} bits, more than the ${MAX_BITS} supported; use a larger granularity`);
    }
    this.ops = ops;
    this.store = ops.create(this.nbits);
  }

  private live(): BitmapStore {
    if (!this.store) throw new BlockError('EINVAL', 'Dirty bitmap used after dispose');
    return this.store;
  }

  private checkRange(offset: number, bytes: number): void {
    if (!(offset >= 0 && bytes >= 0 && offset + bytes <= this.size)) {
      throw new BlockError('EINVAL', `Range ${offset}+${bytes} is outside the bitmap of ${this.size} bytes`);
    }
  }

  /** Frees the bits now (they are also freed when the bitmap is garbage collected); the bitmap must not be used afterwards. */
  dispose(): void {
    if (this.store) this.ops.dispose(this.store);
    this.store = null;
  }

  /** Marks every granule touched by [offset, offset + bytes) dirty (hbitmap_set). */
  set(offset: number, bytes: number): void {
    this.checkRange(offset, bytes);
    if (bytes === 0) return;
    const first = Math.floor(offset / this.granularity);
    const last = Math.floor((offset + bytes - 1) / this.granularity);
    this.dirtyBits += this.ops.set(this.live(), first, last - first + 1);
  }

  /**
   * Clears the granules of [offset, offset + bytes) (hbitmap_reset): offset
   * must be granule-aligned and bytes too unless the range ends the bitmap.
   */
  reset(offset: number, bytes: number): void {
    this.checkRange(offset, bytes);
    if (bytes === 0) return;
    if (offset % this.granularity !== 0 || (bytes % this.granularity !== 0 && offset + bytes !== this.size)) {
      throw new BlockError('EINVAL', `Reset range ${offset}+${bytes} is not aligned to the granularity ${this.granularity}`);
    }
    const first = offset / this.granularity;
    const last = Math.floor((offset + bytes - 1) / this.granularity);
    this.dirtyBits -= this.ops.reset(this.live(), first, last - first + 1);
  }

  /** Clears every bit (hbitmap_reset_all). */
  resetAll(): void {
    this.dirtyBits -= this.ops.reset(this.live(), 0, this.nbits);
  }

  /** Whether the granule holding byte `offset` is dirty (hbitmap_get). */
  get(offset: number): boolean {
    this.checkRange(offset, 0);
    if (offset >= this.size) return false;
    return this.ops.get(this.live(), Math.floor(offset / this.granularity));
  }

  /** Dirty bytes: dirty granules times the granularity (hbitmap_count; may pass size when the last granule is partial). */
  count(): number {
    return this.dirtyBits * this.granularity;
  }

  /** Number of dirty granules. */
  dirtyGranules(): number {
    return this.dirtyBits;
  }

  /**
   * First dirty byte offset in [offset, offset + bytes), clamped to the
   * bitmap, or -1 (hbitmap_next_dirty: at least `offset` even when the
   * granule holding it started earlier).
   */
  nextDirty(offset: number, bytes: number): number {
    if (offset >= this.size || bytes <= 0) return -1;
    const end = bytes > this.size - offset ? this.size : offset + bytes;
    const bit = this.ops.nextDirty(this.live(), Math.floor(offset / this.granularity), Math.ceil(end / this.granularity));
    if (bit < 0) return -1;
    return Math.max(offset, bit * this.granularity);
  }

  /** First clean byte offset in [offset, offset + bytes), clamped to the bitmap, or -1 (hbitmap_next_zero). */
  nextZero(offset: number, bytes: number): number {
    if (offset >= this.size || bytes <= 0) return -1;
    const endBit = bytes > this.size - offset ? this.nbits : Math.floor((offset + bytes - 1) / this.granularity) + 1;
    const bit = this.ops.nextZero(this.live(), Math.floor(offset / this.granularity), endBit);
    if (bit < 0) return -1;
    return Math.max(offset, bit * this.granularity);
  }

  /**
   * The first dirty area in [start, end), at most `maxBytes` long
   * (hbitmap_next_dirty_area), or null when [start, end) is clean.
   */
  nextDirtyArea(start: number, end: number, maxBytes = Number.MAX_SAFE_INTEGER): DirtyArea | null {
    const stop = Math.min(end, this.size);
    if (start >= stop) return null;
    const s = this.nextDirty(start, stop - start);
    if (s < 0) return null;
    let e = s + Math.min(stop - s, maxBytes);
    const z = this.nextZero(s, e - s);
    if (z >= 0) e = z;
    return { offset: s, bytes: e - s };
  }

  /** Every dirty area in [start, end), in order, merged across granules and clamped to the range and the bitmap. */
  dirtyAreas(start = 0, end = this.size): DirtyArea[] {
    const stop = Math.min(end, this.size);
    const out: DirtyArea[] = [];
    if (start >= stop) return out;
    const runs = (this.runs ??= new Float64Array(2 * RUN_BATCH));
    let bit = Math.floor(start / this.granularity);
    const endBit = Math.ceil(stop / this.granularity);
    for (;;) {
      const n = this.ops.dirtyRuns(this.live(), bit, endBit, runs);
      for (let i = 0; i < n; i++) {
        const a = Math.max(start, runs[2 * i]! * this.granularity);
        const b = Math.min(stop, (runs[2 * i]! + runs[2 * i + 1]!) * this.granularity);
        out.push({ offset: a, bytes: b - a });
      }
      if (n < RUN_BATCH) return out;
      bit = runs[2 * (n - 1)]! + runs[2 * n - 1]!;
    }
  }

  /** ORs `src` (same size) into this bitmap (hbitmap_merge); granularities may differ. */
  merge(src: HBitmap): void {
    if (src.size !== this.size) throw new BlockError('EINVAL', 'Bitmaps are of different sizes');
    if (src.granularity === this.granularity && src.ops === this.ops) {
      this.dirtyBits += this.ops.merge(this.live(), src.live());
      return;
    }
    for (const a of src.dirtyAreas()) this.set(a.offset, a.bytes);
  }

  /** Bytes of disk one qcow2 bitmap data cluster covers (bytes_covered_by_bitmap_cluster). */
  bytesPerCluster(clusterSize: number): number {
    return clusterSize * 8 * this.granularity;
  }

  /** Number of entries of this bitmap's qcow2 bitmap table for `clusterSize`. */
  tableSize(clusterSize: number): number {
    return Math.ceil(this.nbits / (clusterSize * 8));
  }

  /** How each qcow2 bitmap-table chunk would be stored (CHUNK.ZERO, ONES or DATA), one byte per table entry. */
  tableChunks(clusterSize: number): Uint8Array {
    const out = new Uint8Array(this.tableSize(clusterSize));
    this.ops.tableScan(this.live(), clusterSize * 8, out);
    return out;
  }

  /** Writes table chunk `index` as the data cluster store_bitmap_data writes: the chunk's bits, zero-filled to `clusterSize` bytes in `out`. */
  serializeChunk(index: number, clusterSize: number, out: Uint8Array): void {
    const [startBit, nbits] = this.chunkBits(index, clusterSize);
    if (out.length < clusterSize) throw new BlockError('EINVAL', `Bitmap cluster buffer must be ${clusterSize} bytes`);
    const n = this.ops.serialize(this.live(), startBit, nbits, out);
    out.fill(0, n, clusterSize);
  }

  /**
   * Loads table chunk `index` as load_bitmap_data does: from a data cluster,
   * or from a table entry meaning all ones or all zeroes.
   */
  deserializeChunk(index: number, clusterSize: number, src: Uint8Array | 'zeroes' | 'ones'): void {
    const [startBit, nbits] = this.chunkBits(index, clusterSize);
    if (src === 'ones') this.dirtyBits += this.ops.set(this.live(), startBit, nbits);
    else if (src === 'zeroes') this.dirtyBits -= this.ops.reset(this.live(), startBit, nbits);
    else this.dirtyBits += this.ops.deserialize(this.live(), startBit, nbits, src);
  }

  private chunkBits(index: number, clusterSize: number): [number, number] {
    const per = clusterSize * 8;
    if (!(Number.isInteger(index) && index >= 0 && index < this.tableSize(clusterSize))) {
      throw new BlockError('EINVAL', `Bitmap table index ${index} out of range`);
    }
    const startBit = index * per;
    return [startBit, Math.min(per, this.nbits - startBit)];
  }
}
