// Dirty bitmaps with QEMU's HBitmap semantics, over bits (the TypeScript
// HBitmap in src/core/hbitmap.ts maps bytes to bits by the granularity).
//
// A bitmap is two arrays of little-endian u64 words in linear memory: level 0
// holds the bits, level 1 one bit per level-0 word that is non-zero. Level 1
// lets next-dirty skip 4096 clean bits per summary bit, which keeps searches
// over a sparse bitmap of a multi-terabyte disk in the microseconds. Every
// function that changes level 0 keeps level 1 exact: summary bit w is set if
// and only if word w is non-zero. Bits past the bitmap's length stay zero.
//
// Level 0 as bytes is exactly qcow2's bitmap data layout (bit i of the bitmap
// is bit i % 8 of byte i / 8), so serialising is a copy.
//
// Bit positions are f64 arguments (exact to 2^53) so JS needs no BigInt.

/** Mask of the bits of word `w` that lie in [first, end). */
// @ts-ignore: decorator
@inline
function rangeMask(w: u64, first: u64, end: u64): u64 {
  let m: u64 = 0xffffffffffffffff;
  if (w == first >> 6) m &= 0xffffffffffffffff << (first & 63);
  if (w == (end - 1) >> 6 && (end & 63) != 0) m &= (<u64>1 << (end & 63)) - 1;
  return m;
}

// @ts-ignore: decorator
@inline
function word(base: usize, w: u64): u64 {
  return load<u64>(base + <usize>(w << 3));
}

// @ts-ignore: decorator
@inline
function setWord(base: usize, w: u64, v: u64): void {
  store<u64>(base + <usize>(w << 3), v);
}

/** Sets (`on`) or clears bits [from, to) of a plain bit array. */
function fillBits(base: usize, from: u64, to: u64, on: bool): void {
  if (from >= to) return;
  const w0 = from >> 6;
  const w1 = (to - 1) >> 6;
  for (let w = w0; w <= w1; w++) {
    const m = rangeMask(w, from, to);
    const old = word(base, w);
    setWord(base, w, on ? old | m : old & ~m);
  }
}

/** Sets or clears summary bit `w` to match whether level-0 word `w` is non-zero. */
// @ts-ignore: decorator
@inline
function syncSummary(l1: usize, w: u64, nonZero: bool): void {
  const sw = w >> 6;
  const bit = <u64>1 << (w & 63);
  const old = word(l1, sw);
  setWord(l1, sw, nonZero ? old | bit : old & ~bit);
}

/** First set bit in [from, to) of a plain bit array, or -1. */
function nextSet(base: usize, from: u64, to: u64): i64 {
  if (from >= to) return -1;
  let w = from >> 6;
  const last = (to - 1) >> 6;
  let x = word(base, w) & (0xffffffffffffffff << (from & 63));
  while (true) {
    if (x != 0) {
      const pos = (w << 6) + ctz<u64>(x);
      return pos < to ? <i64>pos : -1;
    }
    if (++w > last) return -1;
    // Skip clean 128-bit stretches a vector at a time.
    while (w + 1 <= last && !v128.any_true(v128.load(base + <usize>(w << 3)))) w += 2;
    if (w > last) return -1;
    x = word(base, w);
  }
}

/** First clear bit in [from, to) of a plain bit array, or -1. */
function nextClear(base: usize, from: u64, to: u64): i64 {
  if (from >= to) return -1;
  let w = from >> 6;
  const last = (to - 1) >> 6;
  let x = ~word(base, w) & (0xffffffffffffffff << (from & 63));
  while (true) {
    if (x != 0) {
      const pos = (w << 6) + ctz<u64>(x);
      return pos < to ? <i64>pos : -1;
    }
    if (++w > last) return -1;
    while (w + 1 <= last && !v128.any_true(v128.not(v128.load(base + <usize>(w << 3))))) w += 2;
    if (w > last) return -1;
    x = ~word(base, w);
  }
}

/** First dirty bit in [from, to), using the summary to skip clean words; -1 when none. */
function nextDirty(l0: usize, l1: usize, from: u64, to: u64): i64 {
  if (from >= to) return -1;
  const w = from >> 6;
  const x = word(l0, w) & (0xffffffffffffffff << (from & 63));
  if (x != 0) {
    const pos = (w << 6) + ctz<u64>(x);
    return pos < to ? <i64>pos : -1;
  }
  const last = (to - 1) >> 6;
  if (w >= last) return -1;
  const nw = nextSet(l1, w + 1, last + 1);
  if (nw < 0) return -1;
  const pos = (<u64>nw << 6) + ctz<u64>(word(l0, <u64>nw));
  return pos < to ? <i64>pos : -1;
}

/** Sets bits [start, start + count); returns how many were newly set. */
export function hbSet(l0: usize, l1: usize, start: f64, count: f64): f64 {
  if (count <= 0) return 0;
  const first = <u64>start;
  const end = first + <u64>count;
  const w0 = first >> 6;
  const w1 = (end - 1) >> 6;
  let added: u64 = 0;
  for (let w = w0; w <= w1; w++) {
    const m = rangeMask(w, first, end);
    const old = word(l0, w);
    added += popcnt<u64>(m & ~old);
    setWord(l0, w, old | m);
  }
  fillBits(l1, w0, w1 + 1, true);
  return <f64>added;
}

/** Clears bits [start, start + count); returns how many were set before. */
export function hbReset(l0: usize, l1: usize, start: f64, count: f64): f64 {
  if (count <= 0) return 0;
  const first = <u64>start;
  const end = first + <u64>count;
  const w0 = first >> 6;
  const w1 = (end - 1) >> 6;
  let removed: u64 = 0;
  for (let w = w0; w <= w1; w++) {
    const m = rangeMask(w, first, end);
    const old = word(l0, w);
    if ((old & m) == 0) continue;
    removed += popcnt<u64>(old & m);
    setWord(l0, w, old & ~m);
  }
  // Interior words are now zero; the two boundary words may keep other bits.
  if (w1 > w0 + 1) fillBits(l1, w0 + 1, w1, false);
  syncSummary(l1, w0, word(l0, w0) != 0);
  syncSummary(l1, w1, word(l0, w1) != 0);
  return <f64>removed;
}

/** 1 when bit `bit` is set, else 0. */
export function hbGet(l0: usize, bit: f64): i32 {
  const b = <u64>bit;
  return <i32>((word(l0, b >> 6) >> (b & 63)) & 1);
}

/** Number of set bits in [start, start + count). */
export function hbCount(l0: usize, start: f64, count: f64): f64 {
  if (count <= 0) return 0;
  const first = <u64>start;
  const end = first + <u64>count;
  const w1 = (end - 1) >> 6;
  let n: u64 = 0;
  for (let w = first >> 6; w <= w1; w++) n += popcnt<u64>(word(l0, w) & rangeMask(w, first, end));
  return <f64>n;
}

/** First set bit in [start, end), or -1. */
export function hbNextDirty(l0: usize, l1: usize, start: f64, end: f64): f64 {
  return <f64>nextDirty(l0, l1, <u64>start, <u64>end);
}

/** First clear bit in [start, end), or -1 (end must not exceed the bitmap's length). */
export function hbNextZero(l0: usize, start: f64, end: f64): f64 {
  return <f64>nextClear(l0, <u64>start, <u64>end);
}

/**
 * Writes the runs of set bits in [start, end) as (start, length) f64 pairs
 * to `out`, at most `maxRuns` of them; returns how many. A run is cut at
 * `end`; when the result equals maxRuns the caller continues after the last run.
 */
export function hbDirtyRuns(l0: usize, l1: usize, start: f64, end: f64, out: usize, maxRuns: i32): i32 {
  let pos = <u64>start;
  const stop = <u64>end;
  let n: i32 = 0;
  while (n < maxRuns) {
    const s = nextDirty(l0, l1, pos, stop);
    if (s < 0) break;
    const z = nextClear(l0, <u64>s, stop);
    const e: u64 = z < 0 ? stop : <u64>z;
    store<f64>(out + (<usize>n << 4), <f64>s);
    store<f64>(out + (<usize>n << 4), <f64>(e - <u64>s), 8);
    n++;
    pos = e;
  }
  return n;
}

/**
 * ORs the source bitmap into the destination (same length): `nwords` level-0
 * words, visiting only words the source summary marks. Returns how many bits
 * were newly set in the destination.
 */
export function hbMerge(dstL0: usize, dstL1: usize, srcL0: usize, srcL1: usize, nwords: f64): f64 {
  const nw = <u64>nwords;
  const nsum = (nw + 63) >> 6;
  let added: u64 = 0;
  for (let sw: u64 = 0; sw < nsum; sw++) {
    let bits = word(srcL1, sw);
    if (bits == 0) continue;
    setWord(dstL1, sw, word(dstL1, sw) | bits);
    while (bits != 0) {
      const w = (sw << 6) + ctz<u64>(bits);
      const src = word(srcL0, w);
      const old = word(dstL0, w);
      added += popcnt<u64>(src & ~old);
      setWord(dstL0, w, old | src);
      bits &= bits - 1;
    }
  }
  return <f64>added;
}

/**
 * Copies bits [startBit, startBit + nbits) (startBit a multiple of 64) to
 * `out` in qcow2's bitmap data layout: ceil(nbits / 64) little-endian words,
 * bits past the range cleared. Returns the number of bytes written.
 */
export function hbSerialize(l0: usize, startBit: f64, nbits: f64, out: usize): f64 {
  const first = <u64>startBit;
  const n = <u64>nbits;
  const nwords = (n + 63) >> 6;
  memory.copy(out, l0 + <usize>(first >> 3), <usize>(nwords << 3));
  if ((n & 63) != 0) {
    const p = out + <usize>((nwords - 1) << 3);
    store<u64>(p, load<u64>(p) & ((<u64>1 << (n & 63)) - 1));
  }
  return <f64>(nwords << 3);
}

/**
 * Replaces bits [startBit, startBit + nbits) (startBit a multiple of 64) with
 * the serialised bits at `src` (ceil(nbits / 64) little-endian words); bits
 * of `src` past the range are ignored. Returns the change in set bits.
 */
export function hbDeserialize(l0: usize, l1: usize, startBit: f64, nbits: f64, src: usize): f64 {
  const first = <u64>startBit;
  const end = first + <u64>nbits;
  if (end <= first) return 0;
  const w0 = first >> 6;
  const w1 = (end - 1) >> 6;
  let delta: i64 = 0;
  for (let w = w0; w <= w1; w++) {
    const m = rangeMask(w, first, end);
    const old = word(l0, w);
    const v = (old & ~m) | (load<u64>(src + <usize>((w - w0) << 3)) & m);
    delta += <i64>popcnt<u64>(v) - <i64>popcnt<u64>(old);
    setWord(l0, w, v);
    syncSummary(l1, w, v != 0);
  }
  return <f64>delta;
}

/**
 * Classifies each chunk of `chunkBits` bits (one qcow2 bitmap cluster, a
 * multiple of 64) of a bitmap of `nbits` bits into a byte at `out`: 0 when
 * clean (bitmap table entry 0), 1 when every bit is set, 2 otherwise.
 * Returns how many chunks are not clean (clusters store_bitmap_data writes).
 */
export function hbTableScan(l0: usize, l1: usize, nbits: f64, chunkBits: f64, out: usize): i32 {
  const n = <u64>nbits;
  const c = <u64>chunkBits;
  const chunks = (n + c - 1) / c;
  let dirty: i32 = 0;
  for (let k: u64 = 0; k < chunks; k++) {
    const s = k * c;
    const e = s + c < n ? s + c : n;
    let kind: u8 = 0;
    if (nextDirty(l0, l1, s, e) >= 0) {
      kind = nextClear(l0, s, e) < 0 ? 1 : 2;
      dirty++;
    }
    store<u8>(out + <usize>k, kind);
  }
  return dirty;
}
