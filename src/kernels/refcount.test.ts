import { beforeAll, describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { jsRefcountKernel } from '../formats/qcow2/refcount.ts';
import { instantiateKernels, refcountRef, type FreeRun, type Kernels } from './index.ts';

/** Small xorshift PRNG so one fast-check seed describes a whole block. */
function rng(seed: number): () => number {
  let x = seed | 0 || 0x6c078965;
  return () => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return x >>> 0;
  };
}

interface Block {
  order: number;
  entries: number;
  bytes: Uint8Array;
}

/**
 * A refcount block of width 2^order: mostly free with used islands, mostly
 * used with free holes, or random. Values stay below 2^52 so JS arithmetic
 * in the reference is exact for 64-bit entries too.
 */
function makeBlock(seed: number, order: number, words: number): Block {
  const next = rng(seed);
  const bytes = new Uint8Array(words * 8);
  const entries = (words * 64) >>> order;
  const max = order === 6 ? 2 ** 52 : 2 ** (1 << order) - 1;
  const style = next() % 3;
  let run = 0;
  let used = false;
  for (let i = 0; i < entries; i++) {
    if (run-- <= 0) {
      used = style === 0 ? next() % 4 === 0 : style === 1 ? next() % 4 !== 0 : next() % 2 === 0;
      run = next() % 12;
    }
    if (!used) continue;
    const r = next() % 8;
    const v = r === 0 ? max : r === 1 ? Math.max(1, max - 1) : 1 + (next() % Math.min(max, 0xffffffff));
    jsRefcountKernel.set(bytes, i, order, Math.min(v, max));
  }
  return { order, entries, bytes };
}

const blockArb = fc
  .record({ seed: fc.integer(), order: fc.integer({ min: 0, max: 6 }), words: fc.integer({ min: 1, max: 24 }) })
  .map(({ seed, order, words }) => makeBlock(seed, order, words));

/** A range [from, to) inside the block, from two fractions. */
const rangeArb = fc.tuple(fc.nat(0xffff), fc.nat(0xffff));
function range(b: Block, [x, y]: [number, number]): [number, number] {
  const a = Math.floor((x / 0x10000) * (b.entries + 1));
  const c = Math.floor((y / 0x10000) * (b.entries + 1));
  return a <= c ? [a, c] : [c, a];
}

/** Maximum refcount for the width, as RefcountState computes it. */
function maxOf(order: number): number {
  return order === 6 ? Number.MAX_SAFE_INTEGER : 2 ** (1 << order) - 1;
}

describe('refcount kernel', () => {
  let k: Kernels;
  /** The block copied into wasm memory, so the kernel works in place. */
  let inWasm: (src: Uint8Array, slot: string) => Uint8Array;
  beforeAll(async () => {
    k = await instantiateKernels();
    inWasm = (src, slot) => {
      const host = k.host!;
      const ptr = host.scratch(slot, src.length);
      const view = host.bytes().subarray(ptr, ptr + src.length);
      view.set(src);
      return view;
    };
  });

  it('get agrees with jsRefcountKernel for every width, in place and copied', () => {
    fc.assert(
      fc.property(blockArb, (b) => {
        const w = inWasm(b.bytes, 'rc-test');
        // One comparison of whole lists: an expect per entry would dominate the run time.
        const want: number[] = [];
        const inPlace: number[] = [];
        const copied: number[] = [];
        for (let i = 0; i < b.entries; i++) {
          want.push(jsRefcountKernel.get(b.bytes, i, b.order));
          inPlace.push(k.refcount.get(w, i, b.order));
          copied.push(k.refcount.get(b.bytes, i, b.order));
        }
        expect(inPlace).toEqual(want);
        expect(copied).toEqual(want);
      }),
      { numRuns: 150 },
    );
  });

  it('set and add agree with the reference, including overflow and underflow', () => {
    fc.assert(
      fc.property(blockArb, fc.array(fc.tuple(fc.nat(), fc.integer({ min: -3, max: 3 }), fc.boolean()), { minLength: 1, maxLength: 40 }), (b, ops) => {
        const ref = b.bytes.slice();
        const w = inWasm(b.bytes, 'rc-test');
        const max = maxOf(b.order);
        for (const [pick, addend, doSet] of ops) {
          const i = pick % b.entries;
          if (doSet) {
            const v = Math.min(max, Math.abs(addend) * 7 + (pick % 5));
            refcountRef.set(ref, i, b.order, v);
            k.refcount.set(w, i, b.order, v);
          } else {
            const a = addend === 3 ? max : addend === -3 ? -max : addend;
            expect(k.refcount.add(w, i, b.order, a, max)).toBe(refcountRef.add(ref, i, b.order, a, max));
          }
        }
        expect(Array.from(w)).toEqual(Array.from(ref));
        // Out-of-range values are refused the same way.
        if (b.order < 6) expect(() => k.refcount.set(w, 0, b.order, max + 1)).toThrow(/does not fit/);
        expect(() => k.refcount.get(w, 0, 7)).toThrow(/Invalid refcount order/);
      }),
      { numRuns: 200 },
    );
  });

  it('findZero, findNonZero, findFreeRun and countNonZero agree with the reference', () => {
    fc.assert(
      fc.property(blockArb, rangeArb, fc.integer({ min: 1, max: 40 }), (b, r, want) => {
        const [from, to] = range(b, r);
        const w = inWasm(b.bytes, 'rc-test');
        for (const buf of [w, b.bytes]) {
          expect(k.refcount.findZero(buf, from, to, b.order)).toBe(refcountRef.findZero(b.bytes, from, to, b.order));
          expect(k.refcount.findNonZero(buf, from, to, b.order)).toBe(refcountRef.findNonZero(b.bytes, from, to, b.order));
          expect(k.refcount.countNonZero(buf, from, to - from, b.order)).toBe(refcountRef.countNonZero(b.bytes, from, to - from, b.order));
          const got: FreeRun = { index: 0, length: 0 };
          const exp: FreeRun = { index: 0, length: 0 };
          expect(k.refcount.findFreeRun(buf, from, to, b.order, want, got)).toBe(refcountRef.findFreeRun(b.bytes, from, to, b.order, want, exp));
          expect(got).toEqual(exp);
        }
      }),
      { numRuns: 600 },
    );
  });

  it('incRange and compare agree with the reference (check/repair rebuild)', () => {
    fc.assert(
      fc.property(blockArb, rangeArb, fc.nat(), fc.integer({ min: 1, max: 64 }), (b, r, seed, maxOut) => {
        const [start, end] = range(b, r);
        const max = Math.min(maxOf(b.order), 1 + (seed % 7) * 3);
        const ref = b.bytes.slice();
        const w = inWasm(b.bytes, 'rc-test');
        const js = b.bytes.slice();
        const want = refcountRef.incRange(ref, start, end - start, b.order, max);
        expect(k.refcount.incRange(w, start, end - start, b.order, max)).toBe(want);
        expect(k.refcount.incRange(js, start, end - start, b.order, max)).toBe(want);
        expect(Array.from(w)).toEqual(Array.from(ref));
        expect(Array.from(js)).toEqual(Array.from(ref));
        // Compare the incremented array with the original block: differences are exactly what changed.
        const outWant = new Uint32Array(maxOut);
        const n = refcountRef.compare(ref, b.bytes, start, end - start, b.order, outWant);
        for (const [a, c] of [[w, b.bytes], [ref, inWasm(b.bytes, 'rc-test-2')], [w, inWasm(b.bytes, 'rc-test-2')], [ref, b.bytes]] as const) {
          const out = new Uint32Array(maxOut);
          expect(k.refcount.compare(a, c, start, end - start, b.order, out)).toBe(n);
          expect(Array.from(out.subarray(0, n))).toEqual(Array.from(outWant.subarray(0, n)));
        }
      }),
      { numRuns: 300 },
    );
  });

  it('the wasm get, set and add exports agree with the reference (the engine calls the JS ones: cheaper per entry)', () => {
    fc.assert(
      fc.property(blockArb, fc.array(fc.tuple(fc.nat(), fc.integer({ min: -3, max: 3 }), fc.boolean()), { minLength: 1, maxLength: 40 }), (b, ops) => {
        const ex = k.host!.exports;
        const ref = b.bytes.slice();
        const w = inWasm(b.bytes, 'rc-test');
        const max = maxOf(b.order);
        const got: number[] = [];
        const want: number[] = [];
        for (let i = 0; i < b.entries; i++) {
          got.push(ex.rcGet(w.byteOffset, i, b.order));
          want.push(jsRefcountKernel.get(ref, i, b.order));
        }
        expect(got).toEqual(want);
        for (const [pick, addend, doSet] of ops) {
          const i = pick % b.entries;
          if (doSet) {
            const v = Math.min(max, Math.abs(addend) * 7 + (pick % 5));
            refcountRef.set(ref, i, b.order, v);
            ex.rcSet(w.byteOffset, i, b.order, v);
          } else {
            const a = addend === 3 ? max : addend === -3 ? -max : addend;
            expect(ex.rcAdd(w.byteOffset, i, b.order, a, max)).toBe(refcountRef.add(ref, i, b.order, a, max));
          }
        }
        expect(Array.from(w)).toEqual(Array.from(ref));
      }),
      { numRuns: 200 },
    );
  });

  it('finds free runs that continue into the next block', () => {
    const order = 4;
    const block = new Uint8Array(64);
    for (let i = 0; i < 20; i++) jsRefcountKernel.set(block, i, order, 1);
    const out: FreeRun = { index: 0, length: 0 };
    // 12 free entries at the end of the block: a run of 16 must continue in the next one.
    expect(k.refcount.findFreeRun(block, 0, 32, order, 16, out)).toBe(20);
    expect(out).toEqual({ index: 20, length: 12 });
    expect(k.refcount.findFreeRun(block, 0, 32, order, 8, out)).toBe(20);
    expect(out).toEqual({ index: 20, length: 8 });
  });
});
