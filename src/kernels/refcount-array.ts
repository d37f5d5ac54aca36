// The in-memory refcount table of check/repair (QEMU's calculate_refcounts
// and rebuild_refcount_structure), built on the refcount kernels: one entry
// per host cluster at the image's own refcount width, laid out exactly as
// on-disk refcount blocks are, so that comparing with a stored block is one
// kernel call and a rebuilt block is a view to write out as it is. With the
// wasm kernels (and a shared memory) the array lives in linear memory and the
// kernels work on it in place.

import { BlockError } from '../core/errors.ts';
import { currentKernels, type Kernels } from './index.ts';

/** Refcount width 2^order bits, for order 0..6. */
function bytesFor(entries: number, order: number): number {
  // Whole 64-bit words: the kernels read words covering a range.
  return Math.ceil((entries * 2 ** order) / 64) * 8;
}

/** A growable array of refcounts of one width, zero at creation. */
export class RefcountArray {
  /** log2 of the refcount width in bits (QEMU's refcount_order). */
  readonly order: number;
  /** Largest refcount the width holds (QEMU's refcount_max; 2^53 - 1 for 64 bits, the most a JS number holds exactly). */
  readonly max: number;
  private buf: Uint8Array;
  private entries: number;
  private ptr = 0;
  private readonly k: Kernels;
  private static readonly registry = new FinalizationRegistry<{ k: Kernels; ptr: number }>(({ k, ptr }) => k.host?.free(ptr));

  /** An array of `entries` zero refcounts of width 2^order bits; `k` defaults to the loaded kernels. */
  constructor(order: number, entries: number, k: Kernels = currentKernels()) {
    if (!(Number.isInteger(order) && order >= 0 && order <= 6)) throw new BlockError('EINVAL', `Invalid refcount order ${order}`);
    if (!(Number.isSafeInteger(entries) && entries >= 0)) throw new BlockError('EINVAL', `Invalid refcount array size ${entries}`);
    this.order = order;
    this.max = order === 6 ? Number.MAX_SAFE_INTEGER : 2 ** (1 << order) - 1;
    this.k = k;
    this.entries = entries;
    this.buf = this.allocate(bytesFor(Math.max(entries, 1), order));
  }

  /** Number of entries. */
  get length(): number {
    return this.entries;
  }

  /** Zeroed bytes in linear memory when the kernels can keep views into it (shared memory), else on the JS heap; makes them the array's storage, copying the old contents and freeing the old block. */
  private allocate(bytes: number): Uint8Array {
    const host = this.k.host;
    const old = this.buf as Uint8Array | undefined;
    if (!host?.shared) {
      const next = new Uint8Array(bytes);
      if (old) next.set(old);
      return next;
    }
    const ptr = host.alloc(bytes);
    const next = host.view(ptr, bytes);
    next.fill(0);
    // Copy before freeing: free() links the old block into a free list through its first bytes.
    if (old) next.set(old);
    if (this.ptr) {
      RefcountArray.registry.unregister(this);
      host.free(this.ptr);
    }
    this.ptr = ptr;
    RefcountArray.registry.register(this, { k: this.k, ptr }, this);
    return next;
  }

  /** Grows the array to at least `entries` entries (new ones zero); never shrinks. */
  grow(entries: number): void {
    if (entries <= this.entries) return;
    const need = bytesFor(entries, this.order);
    // Double, so growing one cluster at a time stays linear overall.
    if (need > this.buf.length) this.buf = this.allocate(Math.max(need, this.buf.length * 2));
    this.entries = entries;
  }

  /** Refcount of cluster `i` (0 past the end). */
  get(i: number): number {
    return i < this.entries ? this.k.refcount.get(this.buf, i, this.order) : 0;
  }

  /** Stores `value` for cluster `i`, growing the array as needed. */
  set(i: number, value: number): void {
    this.grow(i + 1);
    this.k.refcount.set(this.buf, i, this.order, value);
  }

  /**
   * One more reference to each cluster of [start, start + count), growing the
   * array as needed (QEMU's qcow2_inc_refcounts_imrt). Stops at the first
   * cluster already at `max`, leaving it unchanged, and returns its index so
   * the caller can report the overflow and continue after it; -1 when all
   * were counted.
   */
  incRange(start: number, count: number): number {
    if (count <= 0) return -1;
    this.grow(start + count);
    return this.k.refcount.incRange(this.buf, start, count, this.order, this.max);
  }

  /**
   * Clusters of refcount block `blockIndex` (blockEntries entries each) whose
   * counted refcount differs from the stored `block`, written to `out` as
   * cluster indices (up to out.length); returns how many. Entries past the
   * array count as 0.
   */
  compareBlock(blockIndex: number, blockEntries: number, block: Uint8Array, out: Uint32Array): number {
    const first = blockIndex * blockEntries;
    this.grow(first + blockEntries);
    const mine = this.blockView(blockIndex, blockEntries);
    const n = this.k.refcount.compare(mine, block, 0, blockEntries, this.order, out);
    for (let i = 0; i < n; i++) out[i] = out[i]! + first;
    return n;
  }

  /** The entries of refcount block `blockIndex` as on-disk bytes (a view: writing it out stores the rebuilt block). */
  blockView(blockIndex: number, blockEntries: number): Uint8Array {
    const bytes = (blockEntries * 2 ** this.order) / 8;
    if (!Number.isInteger(bytes)) throw new BlockError('EINVAL', 'A refcount block holds a whole number of bytes');
    this.grow((blockIndex + 1) * blockEntries);
    return this.buf.subarray(blockIndex * bytes, (blockIndex + 1) * bytes);
  }

  /** Number of clusters in [start, start + count) with a non-zero refcount. */
  countUsed(start = 0, count = this.entries - start): number {
    const n = Math.min(count, this.entries - start);
    return n > 0 ? this.k.refcount.countNonZero(this.buf, start, n, this.order) : 0;
  }

  /** First cluster at or after `from` with a non-zero refcount, or -1. */
  nextUsed(from: number): number {
    if (from >= this.entries) return -1;
    const r = this.k.refcount.findNonZero(this.buf, from, this.entries, this.order);
    return r >= this.entries ? -1 : r;
  }

  /** Highest cluster with a non-zero refcount, or -1 (the end of a rebuilt image). */
  highest(): number {
    // Walk back one 64 KiB-ish chunk at a time; each chunk is one kernel call.
    const chunk = Math.max(64, (65536 * 8) >> this.order);
    for (let end = this.entries; end > 0; end -= chunk) {
      const start = Math.max(0, end - chunk);
      if (this.k.refcount.countNonZero(this.buf, start, end - start, this.order) === 0) continue;
      let last = -1;
      for (let i = this.k.refcount.findNonZero(this.buf, start, end, this.order); i < end; i = this.k.refcount.findNonZero(this.buf, i + 1, end, this.order)) last = i;
      return last;
    }
    return -1;
  }

  /** First run of `want` free clusters at or after `from` inside the array, or where a run reaching its end starts (allocation for a rebuilt structure); -1 when none. */
  findFree(from: number, want: number): number {
    if (from >= this.entries) return from;
    const out = { index: -1, length: 0 };
    return this.k.refcount.findFreeRun(this.buf, from, this.entries, this.order, want, out);
  }

  /** Frees linear memory now (also freed when the array is garbage collected); the array must not be used afterwards. */
  dispose(): void {
    if (this.ptr && this.k.host) {
      RefcountArray.registry.unregister(this);
      this.k.host.free(this.ptr);
      this.ptr = 0;
    }
    this.buf = new Uint8Array(0);
    this.entries = 0;
  }
}
