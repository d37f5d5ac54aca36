// Byte-order helpers for qcow2's big-endian tables (L1, refcount table,
// bitmap tables): in-place swaps of whole arrays, 16 bytes per step, and the
// decode/encode between big-endian 64-bit entries and JS numbers that table
// readers need (JS numbers are exact to 2^53, so entries are masked first and
// anything at or past 2^53 is reported as -1 rather than rounded).

/** Swaps the bytes of each of the `count` 16-bit values at `ptr`, in place. */
export function swap16(ptr: usize, count: usize): void {
  const end = ptr + (count << 1);
  let p = ptr;
  const order = i8x16(1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
  while (end - p >= 16) {
    v128.store(p, i8x16.swizzle(v128.load(p), order));
    p += 16;
  }
  while (p < end) {
    store<u16>(p, bswap<u16>(load<u16>(p)));
    p += 2;
  }
}

/** Swaps the bytes of each of the `count` 32-bit values at `ptr`, in place. */
export function swap32(ptr: usize, count: usize): void {
  const end = ptr + (count << 2);
  let p = ptr;
  const order = i8x16(3, 2, 1, 0, 7, 6, 5, 4, 11, 10, 9, 8, 15, 14, 13, 12);
  while (end - p >= 16) {
    v128.store(p, i8x16.swizzle(v128.load(p), order));
    p += 16;
  }
  while (p < end) {
    store<u32>(p, bswap<u32>(load<u32>(p)));
    p += 4;
  }
}

/** Swaps the bytes of each of the `count` 64-bit values at `ptr`, in place. */
export function swap64(ptr: usize, count: usize): void {
  const end = ptr + (count << 3);
  let p = ptr;
  const order = i8x16(7, 6, 5, 4, 3, 2, 1, 0, 15, 14, 13, 12, 11, 10, 9, 8);
  while (end - p >= 16) {
    v128.store(p, i8x16.swizzle(v128.load(p), order));
    p += 16;
  }
  while (p < end) {
    store<u64>(p, bswap<u64>(load<u64>(p)));
    p += 8;
  }
}

/** Largest value a JS number holds exactly, plus one. */
const TWO_POW_53: u64 = <u64>1 << 53;

/**
 * Decodes `count` big-endian 64-bit entries at `src` into f64s at `dst`:
 * each entry is ANDed with the mask (maskHi:maskLo) and stored as a number,
 * or as -1 when the masked value is at or past 2^53. Returns how many were -1.
 */
export function decodeBe64(src: usize, dst: usize, count: usize, maskHi: u32, maskLo: u32): u32 {
  const mask = (<u64>maskHi << 32) | <u64>maskLo;
  let bad: u32 = 0;
  for (let i: usize = 0; i < count; i++) {
    const v = bswap<u64>(load<u64>(src + (i << 3))) & mask;
    if (v >= TWO_POW_53) {
      store<f64>(dst + (i << 3), -1);
      bad++;
    } else {
      store<f64>(dst + (i << 3), <f64>v);
    }
  }
  return bad;
}

/** Encodes `count` f64s at `src` (non-negative integers below 2^53) as big-endian 64-bit entries at `dst`. */
export function encodeBe64(src: usize, dst: usize, count: usize): void {
  for (let i: usize = 0; i < count; i++) {
    store<u64>(dst + (i << 3), bswap<u64>(<u64>load<f64>(src + (i << 3))));
  }
}

/**
 * Index of the first of `count` big-endian 64-bit entries at `ptr` whose
 * value ANDed with the mask (maskHi:maskLo) lies in [lo, hi) (0 <= lo, both
 * below 2^53), or -1. This is the inner loop of qcow2's metadata overlap check:
 * is any L2 table or refcount block (an L1 or refcount-table entry) inside
 * the clusters a write touches. Two entries per step: byte-swapped with one
 * swizzle, compared as signed 64-bit lanes: a value with bit 63 set reads as
 * negative, below lo, so it is never found (it is past any JS offset anyway).
 */
export function findBe64InRange(ptr: usize, count: usize, maskHi: u32, maskLo: u32, lo: f64, hi: f64): i32 {
  if (hi <= lo || count == 0) return -1;
  const mask = (<u64>maskHi << 32) | <u64>maskLo;
  const l = <i64>lo;
  const h = <i64>hi;
  const order = i8x16(7, 6, 5, 4, 3, 2, 1, 0, 15, 14, 13, 12, 11, 10, 9, 8);
  const vmask = i64x2.splat(<i64>mask);
  const vlo = i64x2.splat(l);
  const vhi = i64x2.splat(h);
  let i: usize = 0;
  for (; i + 2 <= count; i += 2) {
    const v = v128.and(i8x16.swizzle(v128.load(ptr + (i << 3)), order), vmask);
    // lo <= v < hi, per lane
    const inRange = v128.and(i64x2.ge_s(v, vlo), i64x2.lt_s(v, vhi));
    if (v128.any_true(inRange)) return <i32>(i64x2.extract_lane(inRange, 0) != 0 ? i : i + 1);
  }
  if (i < count) {
    const v = <i64>(bswap<u64>(load<u64>(ptr + (i << 3))) & mask);
    if (v >= l && v < h) return <i32>i;
  }
  return -1;
}
