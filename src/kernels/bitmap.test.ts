import { beforeAll, describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { bitmapRef, instantiateKernels, type BitmapStore, type Kernels } from './index.ts';

/** One operation of a random session, with positions as fractions of the bitmap (so any size works). */
type Op =
  | { op: 'set' | 'reset' | 'count' | 'nextDirty' | 'nextZero' | 'runs'; a: number; b: number }
  | { op: 'get'; a: number }
  | { op: 'serialize' | 'deserialize'; a: number; b: number; seed: number }
  | { op: 'merge'; a: number; b: number }
  | { op: 'table'; chunkWords: number };

const frac = fc.nat(0xffff).map((n) => n / 0x10000);
const opArb: fc.Arbitrary<Op> = fc.oneof(
  { weight: 4, arbitrary: fc.record({ op: fc.constantFrom('set' as const, 'reset' as const), a: frac, b: frac }) },
  { weight: 3, arbitrary: fc.record({ op: fc.constantFrom('count' as const, 'nextDirty' as const, 'nextZero' as const, 'runs' as const), a: frac, b: frac }) },
  { weight: 1, arbitrary: fc.record({ op: fc.constant('get' as const), a: frac }) },
  { weight: 2, arbitrary: fc.record({ op: fc.constantFrom('serialize' as const, 'deserialize' as const), a: frac, b: frac, seed: fc.integer() }) },
  { weight: 1, arbitrary: fc.record({ op: fc.constant('merge' as const), a: frac, b: frac }) },
  { weight: 1, arbitrary: fc.record({ op: fc.constant('table' as const), chunkWords: fc.integer({ min: 1, max: 8 }) }) },
);

/** Sizes around word and summary boundaries as well as random ones. */
const sizeArb = fc.oneof(fc.integer({ min: 1, max: 300 }), fc.constantFrom(63, 64, 65, 127, 128, 4095, 4096, 4097, 8192), fc.integer({ min: 1, max: 20000 }));

/** Fills `buf` from a xorshift PRNG, with long all-zero and all-one stretches mixed in. */
function fill(buf: Uint8Array, seed: number): void {
  let x = seed | 0 || 1;
  for (let i = 0; i < buf.length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    const mode = (x >>> 8) % 4;
    buf[i] = mode === 0 ? 0 : mode === 1 ? 0xff : x & 0xff;
  }
}

describe('bitmap kernel', () => {
  let k: Kernels;
  beforeAll(async () => {
    k = await instantiateKernels();
  });

  it('matches the reference over random sessions of operations', () => {
    fc.assert(
      fc.property(sizeArb, fc.array(opArb, { minLength: 1, maxLength: 30 }), (nbits, ops) => {
        const ref = bitmapRef.create(nbits);
        const other = bitmapRef.create(nbits);
        const w = k.bitmap.create(nbits);
        const wOther = k.bitmap.create(nbits);
        try {
          let total = 0;
          const span = (a: number, b: number): [number, number] => {
            const x = Math.floor(a * (nbits + 1));
            const y = Math.floor(b * (nbits + 1));
            return x <= y ? [x, y] : [y, x];
          };
          for (const o of ops) {
            switch (o.op) {
              case 'set':
              case 'reset': {
                const [s, e] = span(o.a, o.b);
                const d = bitmapRef[o.op](ref, s, e - s);
                expect(k.bitmap[o.op](w, s, e - s)).toBe(d);
                total += o.op === 'set' ? d : -d;
                // Give the merge source some bits too.
                bitmapRef.set(other, e - Math.floor((e - s) / 2), Math.floor((e - s) / 3));
                k.bitmap.set(wOther, e - Math.floor((e - s) / 2), Math.floor((e - s) / 3));
                break;
              }
              case 'count': {
                const [s, e] = span(o.a, o.b);
                expect(k.bitmap.count(w, s, e - s)).toBe(bitmapRef.count(ref, s, e - s));
                break;
              }
              case 'nextDirty':
              case 'nextZero': {
                const [s, e] = span(o.a, o.b);
                expect(k.bitmap[o.op](w, s, e)).toBe(bitmapRef[o.op](ref, s, e));
                break;
              }
              case 'runs': {
                const [s, e] = span(o.a, o.b);
                const max = 1 + Math.floor(o.a * 10);
                const want = new Float64Array(2 * max);
                const got = new Float64Array(2 * max);
                const n = bitmapRef.dirtyRuns(ref, s, e, want);
                expect(k.bitmap.dirtyRuns(w, s, e, got)).toBe(n);
                expect(Array.from(got.subarray(0, 2 * n))).toEqual(Array.from(want.subarray(0, 2 * n)));
                break;
              }
              case 'get': {
                const bit = Math.floor(o.a * nbits);
                expect(k.bitmap.get(w, bit)).toBe(bitmapRef.get(ref, bit));
                break;
              }
              case 'serialize':
              case 'deserialize': {
                // Serialisation ranges start on 64-bit boundaries.
                const [s0, e] = span(o.a, o.b);
                const s = Math.floor(s0 / 64) * 64;
                const bytes = Math.ceil((e - s) / 64) * 8;
                if (o.op === 'serialize') {
                  const want = new Uint8Array(bytes);
                  const got = new Uint8Array(bytes);
                  expect(k.bitmap.serialize(w, s, e - s, got)).toBe(bitmapRef.serialize(ref, s, e - s, want));
                  expect(Array.from(got)).toEqual(Array.from(want));
                } else {
                  const src = new Uint8Array(bytes);
                  fill(src, o.seed);
                  const d = bitmapRef.deserialize(ref, s, e - s, src);
                  expect(k.bitmap.deserialize(w, s, e - s, src)).toBe(d);
                  total += d;
                }
                break;
              }
              case 'merge': {
                const d = bitmapRef.merge(ref, other);
                expect(k.bitmap.merge(w, wOther)).toBe(d);
                total += d;
                break;
              }
              case 'table': {
                const chunkBits = o.chunkWords * 64;
                const chunks = Math.ceil(nbits / chunkBits);
                const want = new Uint8Array(chunks);
                const got = new Uint8Array(chunks);
                expect(k.bitmap.tableScan(w, chunkBits, got)).toBe(bitmapRef.tableScan(ref, chunkBits, want));
                expect(Array.from(got)).toEqual(Array.from(want));
                break;
              }
            }
          }
          // Whole contents and the running count agree at the end.
          const bytes = Math.ceil(nbits / 64) * 8;
          const a = new Uint8Array(bytes);
          const b = new Uint8Array(bytes);
          bitmapRef.serialize(ref, 0, nbits, a);
          k.bitmap.serialize(w, 0, nbits, b);
          expect(Array.from(b)).toEqual(Array.from(a));
          expect(k.bitmap.count(w, 0, nbits)).toBe(total);
        } finally {
          k.bitmap.dispose(w);
          k.bitmap.dispose(wOther);
        }
      }),
      { numRuns: 400 },
    );
  });

  it('finds the next dirty bit across a sparse multi-million-bit bitmap', () => {
    const nbits = 2 ** 26; // 8 MiB of bits: a 4 TiB disk at 64 KiB granularity
    const w = k.bitmap.create(nbits);
    try {
      const marks = [5, 4096 * 3 + 7, 2 ** 25 + 1, nbits - 1];
      for (const m of marks) k.bitmap.set(w, m, 1);
      const found: number[] = [];
      for (let p = k.bitmap.nextDirty(w, 0, nbits); p >= 0; p = k.bitmap.nextDirty(w, p + 1, nbits)) found.push(p);
      expect(found).toEqual(marks);
      expect(k.bitmap.count(w, 0, nbits)).toBe(marks.length);
      expect(k.bitmap.nextZero(w, 5, nbits)).toBe(6);
      k.bitmap.reset(w, 0, nbits);
      expect(k.bitmap.nextDirty(w, 0, nbits)).toBe(-1);
    } finally {
      k.bitmap.dispose(w);
    }
  });

  it('refuses a store from the other implementation and use after dispose', () => {
    const r: BitmapStore = bitmapRef.create(10);
    expect(() => k.bitmap.set(r, 0, 1)).toThrow();
    const w = k.bitmap.create(10);
    k.bitmap.dispose(w);
    expect(() => k.bitmap.get(w, 0)).toThrow(/disposed/);
  });
});
