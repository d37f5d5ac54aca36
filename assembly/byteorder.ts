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
