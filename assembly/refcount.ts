// qcow2 refcount blocks for every refcount width (2^order bits, order 0..6):
// get, set, add with overflow and underflow detection, the searches the
// allocator needs (first zero entry, first non-zero entry, first run of N
// free clusters) and the bulk operations of check/repair's refcount rebuild
// (increment a range of an in-memory refcount array, compare it with a block
// read from disk, count used entries).
//
// Widths below one byte are packed least significant bits first within each
// byte; 16, 32 and 64-bit refcounts are big-endian (qcow2.txt). Reading the
// block as little-endian 64-bit words puts entry i at bits
// [(i << order) mod 64, +2^order) of word (i << order) / 64 for every width,
// so the searches test a whole word at a time: OR-folding each lane into its
// lowest bit turns "which entries are non-zero" into one mask.
//
// This must agree with the JS reference (jsRefcountKernel in
// src/formats/qcow2/refcount.ts and src/kernels/reference.ts) on every input.

/** Refcount at `index` for width 2^order, as a u64. */
// @ts-ignore: decorator
@inline
function getEntry(ptr: usize, index: u64, order: u32): u64 {
  switch (order) {
    case 0: return (<u64>load<u8>(ptr + <usize>(index >> 3)) >> (index & 7)) & 1;
    case 1: return (<u64>load<u8>(ptr + <usize>(index >> 2)) >> ((index & 3) << 1)) & 3;
    case 2: return (<u64>load<u8>(ptr + <usize>(index >> 1)) >> ((index & 1) << 2)) & 15;
    case 3: return <u64>load<u8>(ptr + <usize>index);
    case 4: return <u64>bswap<u16>(load<u16>(ptr + <usize>(index << 1)));
    case 5: return <u64>bswap<u32>(load<u32>(ptr + <usize>(index << 2)));
    default: return bswap<u64>(load<u64>(ptr + <usize>(index << 3)));
  }
}

/** Stores `value` (already known to fit) at `index` for width 2^order. */
// @ts-ignore: decorator
@inline
function setEntry(ptr: usize, index: u64, order: u32, value: u64): void {
  if (order < 3) {
    const bits = <u32>1 << order;
    const perByte = 8 >> order;
    const p = ptr + <usize>(index / perByte);
    const shift = <u32>(index % perByte) * bits;
    const mask = <u32>(((1 << bits) - 1) << shift);
    store<u8>(p, <u8>((<u32>load<u8>(p) & ~mask) | (<u32>value << shift)));
    return;
  }
  switch (order) {
    case 3: store<u8>(ptr + <usize>index, <u8>value); break;
    case 4: store<u16>(ptr + <usize>(index << 1), bswap<u16>(<u16>value)); break;
    case 5: store<u32>(ptr + <usize>(index << 2), bswap<u32>(<u32>value)); break;
    default: store<u64>(ptr + <usize>(index << 3), bswap<u64>(value)); break;
  }
}

/** Converts a non-negative f64 to u64, saturating at 2^64 - 1 instead of trapping. */
// @ts-ignore: decorator
@inline
function toU64(v: f64): u64 {
  if (v <= 0) return 0;
  if (v >= 18446744073709551615.0) return u64.MAX_VALUE;
  return <u64>v;
}

/** Refcount at `index` of the block at `ptr` for width 2^order (rounded to the nearest f64 past 2^53). */
export function rcGet(ptr: usize, index: u32, order: u32): f64 {
  return <f64>getEntry(ptr, index, order);
}

/** Stores `value` (an integer that fits the width; the caller checks) at `index`. */
export function rcSet(ptr: usize, index: u32, order: u32, value: f64): void {
  setEntry(ptr, index, order, toU64(value));
}

/**
 * Adds `addend` (may be negative) to the refcount at `index` and returns the
 * new value, or returns -1 and changes nothing when the result would be below
 * 0 or above `max` (QEMU's update_refcount overflow check).
 */
export function rcAdd(ptr: usize, index: u32, order: u32, addend: f64, max: f64): f64 {
  const cur = getEntry(ptr, index, order);
  const limit = toU64(max);
  let next: u64;
  if (addend < 0) {
    const sub = toU64(-addend);
    if (sub > cur) return -1;
    next = cur - sub;
  } else {
    const add = toU64(addend);
    if (add > limit || cur > limit - add) return -1;
    next = cur + add;
  }
  setEntry(ptr, index, order, next);
  return <f64>next;
}

/** Mask of the lowest bit of every 2^order-bit lane of a 64-bit word. */
// @ts-ignore: decorator
@inline
function laneLowBits(order: u32): u64 {
  switch (order) {
    case 0: return 0xffffffffffffffff;
    case 1: return 0x5555555555555555;
    case 2: return 0x1111111111111111;
    case 3: return 0x0101010101010101;
    case 4: return 0x0001000100010001;
    case 5: return 0x0000000100000001;
    default: return 1;
  }
}

/** ORs every bit of each 2^order-bit lane of `x` into the lane's lowest bit (other bits are junk). */
// @ts-ignore: decorator
@inline
function foldLanes(x: u64, order: u32): u64 {
  let y = x;
  if (order >= 1) y |= y >> 1;
  if (order >= 2) y |= y >> 2;
  if (order >= 3) y |= y >> 4;
  if (order >= 4) y |= y >> 8;
  if (order >= 5) y |= y >> 16;
  if (order >= 6) y |= y >> 32;
  return y;
}

/** Bits of word `w` that belong to entries in [from, to) (bit positions are entry << order). */
// @ts-ignore: decorator
@inline
function rangeMask(w: u64, firstBit: u64, endBit: u64): u64 {
  let m: u64 = 0xffffffffffffffff;
  if (w == firstBit >> 6) m &= 0xffffffffffffffff << (firstBit & 63);
  if (w == (endBit - 1) >> 6 && (endBit & 63) != 0) m &= (<u64>1 << (endBit & 63)) - 1;
  return m;
}

/**
 * First index in [from, to) whose entry is zero (`wantZero`) or non-zero,
 * or -1 when there is none. Reads whole 64-bit words covering the range.
 */
function findEntry(ptr: usize, from: u32, to: u32, order: u32, wantZero: bool): i64 {
  if (from >= to) return -1;
  const firstBit = <u64>from << order;
  const endBit = <u64>to << order;
  const low = laneLowBits(order);
  const lastWord = (endBit - 1) >> 6;
  for (let w = firstBit >> 6; w <= lastWord; w++) {
    const nonZero = foldLanes(load<u64>(ptr + <usize>(w << 3)), order) & low;
    const hits = (wantZero ? ~nonZero & low : nonZero) & rangeMask(w, firstBit, endBit);
    if (hits != 0) return <i64>(((w << 6) + ctz<u64>(hits)) >> order);
  }
  return -1;
}

/** Index of the first entry in [from, to) whose refcount is 0, or -1 (the free-cluster search). */
export function rcFindZero(ptr: usize, from: u32, to: u32, order: u32): i32 {
  return <i32>findEntry(ptr, from, to, order, true);
}

/** Index of the first entry in [from, to) whose refcount is not 0, or `to` when all are 0. */
export function rcFindNonZero(ptr: usize, from: u32, to: u32, order: u32): i32 {
  const r = findEntry(ptr, from, to, order, false);
  return r < 0 ? <i32>to : <i32>r;
}

/**
 * First run of zero entries in [from, to) that is `want` entries long or
 * reaches `to` (a run the next block may continue): returns its start and
 * stores its length (at most `want`) as an i32 at `out`; -1 when there is none.
 */
export function rcFindFreeRun(ptr: usize, from: u32, to: u32, order: u32, want: u32, out: usize): i32 {
  let i = from;
  while (i < to) {
    const s = findEntry(ptr, i, to, order, true);
    if (s < 0) break;
    const start = <u32>s;
    const limit = want >= to - start ? to : start + want;
    const e = findEntry(ptr, start, limit, order, false);
    if (e < 0) {
      store<i32>(out, <i32>(limit - start));
      return <i32>start;
    }
    i = <u32>e + 1;
  }
  store<i32>(out, 0);
  return -1;
}

/**
 * Increments entries [start, start + count) of an in-memory refcount array by
 * one (check's inc_refcounts). Stops at the first entry already at `max`,
 * leaving it unchanged, and returns its index; returns -1 when all were
 * incremented.
 */
export function rcIncRange(ptr: usize, start: u32, count: u32, order: u32, max: f64): f64 {
  const limit = toU64(max);
  const end = <u64>start + <u64>count;
  for (let i = <u64>start; i < end; i++) {
    const v = getEntry(ptr, i, order);
    if (v >= limit) return <f64>i;
    setEntry(ptr, i, order, v + 1);
  }
  return -1;
}

/**
 * Compares entries [start, start + count) of two refcount arrays of the same
 * width (indexed alike) and writes the indices that differ, as u32s, to
 * `out`, at most `maxOut` of them. Returns how many it wrote; a result equal
 * to maxOut means the caller should continue after the last index.
 */
export function rcCompare(a: usize, b: usize, start: u32, count: u32, order: u32, out: usize, maxOut: u32): u32 {
  if (count == 0 || maxOut == 0) return 0;
  const firstBit = <u64>start << order;
  const endBit = (<u64>start + <u64>count) << order;
  const low = laneLowBits(order);
  const lastWord = (endBit - 1) >> 6;
  let n: u32 = 0;
  for (let w = firstBit >> 6; w <= lastWord; w++) {
    const off = <usize>(w << 3);
    const diff = load<u64>(a + off) ^ load<u64>(b + off);
    if (diff == 0) continue;
    let lanes = foldLanes(diff, order) & low & rangeMask(w, firstBit, endBit);
    while (lanes != 0) {
      store<u32>(out + (<usize>n << 2), <u32>(((w << 6) + ctz<u64>(lanes)) >> order));
      if (++n == maxOut) return n;
      lanes &= lanes - 1;
    }
  }
  return n;
}

/** Number of entries in [start, start + count) whose refcount is not 0. */
export function rcCountNonZero(ptr: usize, start: u32, count: u32, order: u32): u32 {
  if (count == 0) return 0;
  const firstBit = <u64>start << order;
  const endBit = (<u64>start + <u64>count) << order;
  const low = laneLowBits(order);
  const lastWord = (endBit - 1) >> 6;
  let n: u64 = 0;
  for (let w = firstBit >> 6; w <= lastWord; w++) {
    n += popcnt<u64>(foldLanes(load<u64>(ptr + <usize>(w << 3)), order) & low & rangeMask(w, firstBit, endBit));
  }
  return <u32>n;
}
