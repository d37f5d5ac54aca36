// Zero detection over linear memory: used to skip writing all-zero clusters,
// to detect zero ranges for `qemu-img map`-style reporting and for
// `convert`'s sparse output. isZero tests 128 bytes per iteration (eight
// v128 loads ORed together); firstNonZero skips 64-byte zero blocks, then
// finds the byte inside the first block that is not.
//
// Both kernels read only [ptr, ptr + len). Unaligned heads and tails are
// handled with overlapping unaligned v128 loads when len >= 16, so no byte
// outside the range is touched and no byte inside it is skipped.

/** Returns the index (0..15) of the first non-zero byte of `v`, or 16 when all are zero. */
// @ts-ignore: decorator
@inline
function firstNonZeroLane(v: v128): i32 {
  const nonZero = ~i8x16.bitmask(i8x16.eq(v, i8x16.splat(0))) & 0xffff;
  return nonZero == 0 ? 16 : ctz<i32>(nonZero);
}

/** True when the `len` bytes at `ptr` are all zero (true for len 0). */
export function isZero(ptr: usize, len: usize): bool {
  const end = ptr + len;
  if (len < 16) {
    let p = ptr;
    while (p + 8 <= end) {
      if (load<u64>(p) != 0) return false;
      p += 8;
    }
    while (p < end) {
      if (load<u8>(p) != 0) return false;
      p++;
    }
    return true;
  }
  // Unaligned head: one vector at ptr, then continue from the next 16-byte boundary.
  if (v128.any_true(v128.load(ptr))) return false;
  let p = (ptr + 16) & ~(<usize>15);
  // 256 bytes per test: sixteen loads ORed together keep the loads busy and the branches few
  // (measured a few percent over 128 bytes per test on a 64 KiB cluster).
  while (end - p >= 256) {
    const a = v128.or(v128.or(v128.load(p), v128.load(p, 16)), v128.or(v128.load(p, 32), v128.load(p, 48)));
    const b = v128.or(v128.or(v128.load(p, 64), v128.load(p, 80)), v128.or(v128.load(p, 96), v128.load(p, 112)));
    const c = v128.or(v128.or(v128.load(p, 128), v128.load(p, 144)), v128.or(v128.load(p, 160), v128.load(p, 176)));
    const d = v128.or(v128.or(v128.load(p, 192), v128.load(p, 208)), v128.or(v128.load(p, 224), v128.load(p, 240)));
    if (v128.any_true(v128.or(v128.or(a, b), v128.or(c, d)))) return false;
    p += 256;
  }
  while (end - p >= 16) {
    if (v128.any_true(v128.load(p))) return false;
    p += 16;
  }
  // Unaligned tail: the last 16 bytes, overlapping bytes already checked.
  if (p < end && v128.any_true(v128.load(end - 16))) return false;
  return true;
}

/** Offset of the first non-zero byte in the `len` bytes at `ptr`, or -1 when all are zero. */
export function firstNonZero(ptr: usize, len: usize): isize {
  const end = ptr + len;
  if (len < 16) {
    for (let p = ptr; p < end; p++) {
      if (load<u8>(p) != 0) return <isize>(p - ptr);
    }
    return -1;
  }
  let lane = firstNonZeroLane(v128.load(ptr));
  if (lane < 16) return <isize>lane;
  let p = (ptr + 16) & ~(<usize>15);
  // Skip 64-byte blocks that are entirely zero; the 16-byte loop below
  // locates the byte inside the first block that is not.
  while (end - p >= 64) {
    const a = v128.load(p);
    const b = v128.load(p, 16);
    const c = v128.load(p, 32);
    const d = v128.load(p, 48);
    if (v128.any_true(v128.or(v128.or(a, b), v128.or(c, d)))) break;
    p += 64;
  }
  while (end - p >= 16) {
    lane = firstNonZeroLane(v128.load(p));
    if (lane < 16) return <isize>(p - ptr) + lane;
    p += 16;
  }
  if (p < end) {
    // Bytes of this vector below p were already found zero, so any
    // non-zero lane lies at or after p.
    const tail = end - 16;
    lane = firstNonZeroLane(v128.load(tail));
    if (lane < 16) return <isize>(tail - ptr) + lane;
  }
  return -1;
}

/**
 * Offset of the first `unit`-byte block of the `len` bytes at `ptr` (blocks
 * start at multiples of unit; the last may be shorter) that is all zero, or
 * -1 when every block holds data. With firstNonZero this splits a buffer into
 * data and zero runs of whole blocks, as convert -S and map need.
 */
export function firstZeroBlock(ptr: usize, len: usize, unit: usize): isize {
  if (unit == 0) return -1;
  for (let off: usize = 0; off < len; off += unit) {
    const n = len - off < unit ? len - off : unit;
    if (isZero(ptr + off, n)) return <isize>off;
  }
  return -1;
}
