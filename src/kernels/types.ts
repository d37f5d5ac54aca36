// The kernel families as the rest of qblock sees them. Each interface has two
// implementations with identical results on every input inside its documented
// domain: the JS reference (reference*.ts) and the wasm one (ops-*.ts), and a
// property test compares them on random input.

import type { L2Geometry, L2Kernel, SubclusterType } from '../formats/qcow2/cluster.ts';

/** One run of a decoded guest range: what L2Kernel.scan reports for the position where the previous run ended. */
export interface L2Run {
  type: SubclusterType;
  /** Subclusters in the run (0 with type INVALID). */
  count: number;
  /** Index in the slice of the invalid entry when type is INVALID, else -1. */
  invalidIndex: number;
  /** Host cluster offset of the run's first entry (types with a host cluster); -1 at or past 2^53; 0 otherwise and for INVALID. */
  hostCluster: number;
  /** Raw words of the run's first entry (the compressed descriptor for COMPRESSED). */
  entryHi: number;
  entryLo: number;
}

/** Creates an empty run record. */
export function newL2Run(): L2Run {
  return { type: 0, count: 0, invalidIndex: -1, hostCluster: 0, entryHi: 0, entryLo: 0 };
}

/**
 * L2 decoding: the L2Kernel scan the qcow2 driver calls, plus the decode of a
 * whole guest range in one call. In both, `nbClusters` entries from
 * `l2Index` must lie inside the slice.
 */
export interface L2Ops extends L2Kernel {
  /**
   * Decodes the range starting at subcluster `scIndex` of entry `l2Index`
   * over `nbClusters` entries into runs, each what `scan` reports where the
   * previous run ended; stops after an INVALID run or `maxRuns` runs. Fills
   * `out` from index 0 (reusing its records, appending as needed) and returns
   * the number of runs.
   */
  runs(slice: Uint8Array, l2Index: number, scIndex: number, nbClusters: number, g: L2Geometry, out: L2Run[], maxRuns: number): number;
}

/** Start and length of a run of free (zero) refcount entries. */
export interface FreeRun {
  index: number;
  length: number;
}

/**
 * Refcount access over one refcount block or an in-memory refcount array,
 * for width 2^order bits (order 0..6). Entries past the buffer are outside
 * the domain. Values are exact below 2^53.
 */
export interface RefcountOps {
  /** Refcount at `index`. */
  get(block: Uint8Array, index: number, order: number): number;
  /** Stores `value` at `index`; ERANGE when it does not fit the width. */
  set(block: Uint8Array, index: number, order: number, value: number): void;
  /** Index of the first entry in [from, to) whose refcount is 0, or -1. */
  findZero(block: Uint8Array, from: number, to: number, order: number): number;
  /** Index of the first entry in [from, to) whose refcount is not 0, or `to` when all are 0. */
  findNonZero(block: Uint8Array, from: number, to: number, order: number): number;
  /** Adds `addend` (may be negative) and returns the new refcount, or -1 leaving the entry unchanged when it would leave [0, max]. */
  add(block: Uint8Array, index: number, order: number, addend: number, max: number): number;
  /**
   * First run of zero entries in [from, to) that is `want` (>= 1) entries long
   * or reaches `to` (for the next block to continue): returns its start and
   * sets out.index/out.length (length at most want); -1 and length 0 when none.
   */
  findFreeRun(block: Uint8Array, from: number, to: number, order: number, want: number, out: FreeRun): number;
  /** Increments entries [start, start + count) by one; stops at the first entry already at `max` (left unchanged) and returns its index, else -1. */
  incRange(arr: Uint8Array, start: number, count: number, order: number, max: number): number;
  /** Writes to `out` (up to its length) the indices in [start, start + count) where `a` and `b` differ; returns how many. */
  compare(a: Uint8Array, b: Uint8Array, start: number, count: number, order: number, out: Uint32Array): number;
  /** Number of entries in [start, start + count) whose refcount is not 0. */
  countNonZero(block: Uint8Array, start: number, count: number, order: number): number;
}

/** An allocated bitmap of `nbits` bits, all clear at creation; opaque to everything but the BitmapOps that made it. */
export interface BitmapStore {
  readonly nbits: number;
}

/**
 * Bit-level dirty bitmap operations with QEMU's HBitmap semantics (ranges in
 * bits, [start, start + count) or [start, end), always inside the bitmap).
 */
export interface BitmapOps {
  /** A new bitmap of `nbits` (>= 1) clear bits. */
  create(nbits: number): BitmapStore;
  /** Frees a bitmap's memory now; it must not be used afterwards. */
  dispose(s: BitmapStore): void;
  /** Sets bits [start, start + count); returns how many were newly set. */
  set(s: BitmapStore, start: number, count: number): number;
  /** Clears bits [start, start + count); returns how many were set. */
  reset(s: BitmapStore, start: number, count: number): number;
  /** Whether bit `bit` is set. */
  get(s: BitmapStore, bit: number): boolean;
  /** Number of set bits in [start, start + count). */
  count(s: BitmapStore, start: number, count: number): number;
  /** First set bit in [start, end), or -1. */
  nextDirty(s: BitmapStore, start: number, end: number): number;
  /** First clear bit in [start, end), or -1. */
  nextZero(s: BitmapStore, start: number, end: number): number;
  /** Writes runs of set bits in [start, end) as (start, length) pairs to `out` (up to out.length / 2 runs); returns how many. */
  dirtyRuns(s: BitmapStore, start: number, end: number, out: Float64Array): number;
  /** ORs `src` into `dst` (same nbits); returns how many bits were newly set. */
  merge(dst: BitmapStore, src: BitmapStore): number;
  /** Writes bits [startBit, startBit + nbits) (startBit a multiple of 64) in qcow2's bitmap data layout to `out`; returns ceil(nbits / 64) * 8, the bytes written. */
  serialize(s: BitmapStore, startBit: number, nbits: number, out: Uint8Array): number;
  /** Replaces bits [startBit, startBit + nbits) (startBit a multiple of 64) with serialised bits from `src`; returns the change in set bits. */
  deserialize(s: BitmapStore, startBit: number, nbits: number, src: Uint8Array): number;
  /** Classifies each `chunkBits`-bit chunk (a multiple of 64) into `out`: 0 clean, 1 all set, 2 mixed; returns the number not clean. */
  tableScan(s: BitmapStore, chunkBits: number, out: Uint8Array): number;
}

/** Byte-order helpers for big-endian tables. */
export interface ByteOrderOps {
  /** Swaps each 16-bit value of `buf` in place (buf.length / 2 values). */
  swap16(buf: Uint8Array): void;
  /** Swaps each 32-bit value of `buf` in place. */
  swap32(buf: Uint8Array): void;
  /** Swaps each 64-bit value of `buf` in place. */
  swap64(buf: Uint8Array): void;
  /** Decodes dst.length big-endian u64 entries of `src`, masked with maskHi:maskLo, into `dst` (-1 for values at or past 2^53); returns how many were -1. */
  decodeBe64(src: Uint8Array, dst: Float64Array, maskHi: number, maskLo: number): number;
  /** Encodes `src` (integers in [0, 2^53)) as big-endian u64 entries into `dst`. */
  encodeBe64(src: Float64Array, dst: Uint8Array): void;
  /**
   * Index of the first big-endian u64 entry of `table` (table.length / 8 of
   * them) whose value ANDed with maskHi:maskLo lies in [lo, hi), or -1
   * (values at or past 2^53 never match): the metadata overlap check's search of the L1 and
   * refcount tables for a table inside the clusters a write touches.
   */
  findInRange(table: Uint8Array, maskHi: number, maskLo: number, lo: number, hi: number): number;
}

/** Zero detection. */
export interface ZeroOps {
  /** True when every byte of `buf` is zero. */
  isZero(buf: Uint8Array): boolean;
  /** Offset of the first non-zero byte of `buf`, or -1 when all bytes are zero. */
  firstNonZero(buf: Uint8Array): number;
  /** Offset of the first all-zero `unit`-byte block of `buf` (blocks at multiples of unit; the last may be short), or -1. */
  firstZeroBlock(buf: Uint8Array, unit: number): number;
  /** Offset of the first byte where `a` and `b` differ over their common length, or -1 when equal. */
  firstDifference(a: Uint8Array, b: Uint8Array): number;
  /** Offset of the first `unit`-byte block (over the common length; the last may be short) where `a` and `b` are equal, or -1. */
  firstEqualBlock(a: Uint8Array, b: Uint8Array, unit: number): number;
}
