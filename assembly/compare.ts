// Byte comparison of two buffers in linear memory, for `compare` (QEMU's
// compare_buffers: runs of 512-byte sectors that are all identical or all
// different). firstDifference finds where an identical run ends; for a
// differing run, firstEqualBlock finds the first block that matches again.
// 64 bytes per step: the XOR of both sides ORed together is zero while they
// agree. Only [a, a + len) and [b, b + len) are read.

/** Index (0..15) of the first non-zero byte lane of `v`, or 16. */
// @ts-ignore: decorator
@inline
function firstLane(v: v128): i32 {
  const nz = ~i8x16.bitmask(i8x16.eq(v, i8x16.splat(0))) & 0xffff;
  return nz == 0 ? 16 : ctz<i32>(nz);
}

/** Offset of the first byte where the `len` bytes at `a` and `b` differ, or -1 when they are equal. */
export function firstDifference(a: usize, b: usize, len: usize): isize {
  let i: usize = 0;
  while (len - i >= 64) {
    const x0 = v128.xor(v128.load(a + i), v128.load(b + i));
    const x1 = v128.xor(v128.load(a + i, 16), v128.load(b + i, 16));
    const x2 = v128.xor(v128.load(a + i, 32), v128.load(b + i, 32));
    const x3 = v128.xor(v128.load(a + i, 48), v128.load(b + i, 48));
    if (v128.any_true(v128.or(v128.or(x0, x1), v128.or(x2, x3)))) break;
    i += 64;
  }
  while (len - i >= 16) {
    const lane = firstLane(v128.xor(v128.load(a + i), v128.load(b + i)));
    if (lane < 16) return <isize>(i + lane);
    i += 16;
  }
  for (; i < len; i++) if (load<u8>(a + i) != load<u8>(b + i)) return <isize>i;
  return -1;
}

/**
 * Offset of the first `unit`-byte block (blocks at multiples of unit; the
 * last may be short) in which the `len` bytes at `a` and `b` are all equal,
 * or -1 when every block has a difference.
 */
export function firstEqualBlock(a: usize, b: usize, len: usize, unit: usize): isize {
  if (unit == 0) return -1;
  for (let off: usize = 0; off < len; off += unit) {
    const n = len - off < unit ? len - off : unit;
    if (firstDifference(a + off, b + off, n) < 0) return <isize>off;
  }
  return -1;
}
