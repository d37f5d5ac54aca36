// JS reference of the dirty-bitmap kernel: a flat array of 32-bit words with
// no summary level, so every operation is a plain loop whose correctness is
// easy to see. Serialisation produces qcow2's layout byte by byte (bit i is
// bit i % 8 of byte i / 8) without relying on the platform's endianness.

import { BlockError } from '../core/errors.ts';
import type { BitmapOps, BitmapStore } from './types.ts';

/** A reference bitmap: `words` holds bit i at bit i % 32 of words[i / 32]; bits past nbits stay 0. */
export interface RefBitmapStore extends BitmapStore {
  readonly words: Uint32Array;
}

function store(s: BitmapStore): RefBitmapStore {
  const r = s as RefBitmapStore;
  if (!(r.words instanceof Uint32Array)) throw new BlockError('EINVAL', 'Bitmap was not created by the reference kernel');
  return r;
}

/** Bits of word `w` (bits 32w..32w+31) that lie in [first, end), as an unsigned mask. */
function mask32(w: number, first: number, end: number): number {
  const base = w * 32;
  const lo = first > base ? first - base : 0;
  const hi = end - base >= 32 ? 32 : end - base;
  const upper = hi === 32 ? 0xffffffff : (1 << hi) - 1;
  return (upper & ~((1 << lo) - 1)) >>> 0;
}

/** Number of set bits in a 32-bit value. */
function popcount32(v: number): number {
  v = v - ((v >>> 1) & 0x55555555);
  v = (v & 0x33333333) + ((v >>> 2) & 0x33333333);
  return (((v + (v >>> 4)) & 0x0f0f0f0f) * 0x01010101) >>> 24;
}

/** Index of the lowest set bit of a non-zero 32-bit value. */
function ctz32(v: number): number {
  return 31 - Math.clz32(v & -v);
}

/** First bit in [start, end) that is set (`dirty`) or clear, or -1. */
function scan(words: Uint32Array, start: number, end: number, dirty: boolean): number {
  if (start >= end) return -1;
  const last = Math.floor((end - 1) / 32);
  for (let w = Math.floor(start / 32); w <= last; w++) {
    const v = (dirty ? words[w]! : ~words[w]!) & mask32(w, start, end);
    if (v !== 0) return w * 32 + ctz32(v);
  }
  return -1;
}

/** Byte `k` of the little-endian serialisation of `words`. */
function byteAt(words: Uint32Array, k: number): number {
  return (words[k >>> 2]! >>> ((k & 3) * 8)) & 0xff;
}

/** Rejects serialisation ranges that do not start on a 64-bit boundary or leave the bitmap. */
function checkChunk(s: BitmapStore, startBit: number, nbits: number): void {
  if (startBit % 64 !== 0 || startBit < 0 || nbits < 0 || startBit + nbits > s.nbits) {
    throw new BlockError('EINVAL', `Bitmap serialisation range ${startBit}+${nbits} is not 64-bit aligned inside ${s.nbits} bits`);
  }
}

/** JS reference of BitmapOps. */
export const bitmapRef: BitmapOps = {
  create(nbits) {
    if (!(nbits >= 1 && Number.isSafeInteger(nbits))) throw new BlockError('EINVAL', `Bitmap size ${nbits} must be a positive integer`);
    // Whole 64-bit words, as the serialised layout and the wasm kernel use.
    const s: RefBitmapStore = { nbits, words: new Uint32Array(Math.ceil(nbits / 64) * 2) };
    return s;
  },
  dispose() {
    // Garbage collected.
  },
  set(s, start, count) {
    const { words } = store(s);
    if (count <= 0) return 0;
    const end = start + count;
    let added = 0;
    for (let w = Math.floor(start / 32); w <= Math.floor((end - 1) / 32); w++) {
      const m = mask32(w, start, end);
      added += popcount32(m & ~words[w]!);
      words[w] = words[w]! | m;
    }
    return added;
  },
  reset(s, start, count) {
    const { words } = store(s);
    if (count <= 0) return 0;
    const end = start + count;
    let removed = 0;
    for (let w = Math.floor(start / 32); w <= Math.floor((end - 1) / 32); w++) {
      const m = mask32(w, start, end);
      removed += popcount32(m & words[w]!);
      words[w] = words[w]! & ~m;
    }
    return removed;
  },
  get(s, bit) {
    const { words } = store(s);
    return ((words[Math.floor(bit / 32)]! >>> (bit % 32)) & 1) === 1;
  },
  count(s, start, count) {
    const { words } = store(s);
    if (count <= 0) return 0;
    const end = start + count;
    let n = 0;
    for (let w = Math.floor(start / 32); w <= Math.floor((end - 1) / 32); w++) n += popcount32(words[w]! & mask32(w, start, end));
    return n;
  },
  nextDirty(s, start, end) {
    return scan(store(s).words, start, end, true);
  },
  nextZero(s, start, end) {
    return scan(store(s).words, start, end, false);
  },
  dirtyRuns(s, start, end, out) {
    const { words } = store(s);
    const max = Math.floor(out.length / 2);
    let n = 0;
    let pos = start;
    while (n < max) {
      const a = scan(words, pos, end, true);
      if (a < 0) break;
      const z = scan(words, a, end, false);
      const b = z < 0 ? end : z;
      out[2 * n] = a;
      out[2 * n + 1] = b - a;
      n++;
      pos = b;
    }
    return n;
  },
  merge(dst, src) {
    const d = store(dst).words;
    const sw = store(src).words;
    if (dst.nbits !== src.nbits) throw new BlockError('EINVAL', 'Bitmaps of different sizes cannot be merged');
    let added = 0;
    for (let w = 0; w < d.length; w++) {
      added += popcount32(sw[w]! & ~d[w]!);
      d[w] = d[w]! | sw[w]!;
    }
    return added;
  },
  serialize(s, startBit, nbits, out) {
    const { words } = store(s);
    checkChunk(s, startBit, nbits);
    const bytes = Math.ceil(nbits / 64) * 8;
    const first = startBit / 8;
    for (let k = 0; k < bytes; k++) {
      const bitBase = 8 * k;
      let b = byteAt(words, first + k);
      if (bitBase + 8 > nbits) b &= bitBase >= nbits ? 0 : (1 << (nbits - bitBase)) - 1;
      out[k] = b;
    }
    return bytes;
  },
  deserialize(s, startBit, nbits, src) {
    const { words } = store(s);
    checkChunk(s, startBit, nbits);
    if (nbits === 0) return 0;
    const end = startBit + nbits;
    let delta = 0;
    for (let w = startBit / 32; w <= Math.floor((end - 1) / 32); w++) {
      const o = (w - startBit / 32) * 4;
      const v = (src[o]! | (src[o + 1]! << 8) | (src[o + 2]! << 16) | (src[o + 3]! << 24)) >>> 0;
      const m = mask32(w, startBit, end);
      const old = words[w]!;
      const next = ((old & ~m) | (v & m)) >>> 0;
      delta += popcount32(next) - popcount32(old);
      words[w] = next;
    }
    return delta;
  },
  tableScan(s, chunkBits, out) {
    const { words } = store(s);
    if (!(chunkBits > 0 && chunkBits % 64 === 0)) throw new BlockError('EINVAL', `Bitmap chunk of ${chunkBits} bits is not a multiple of 64`);
    const chunks = Math.ceil(s.nbits / chunkBits);
    let dirty = 0;
    for (let k = 0; k < chunks; k++) {
      const a = k * chunkBits;
      const b = Math.min(s.nbits, a + chunkBits);
      let kind = 0;
      if (scan(words, a, b, true) >= 0) {
        kind = scan(words, a, b, false) < 0 ? 1 : 2;
        dirty++;
      }
      out[k] = kind;
    }
    return dirty;
  },
};
