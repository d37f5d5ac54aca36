import { beforeAll, describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { jsRefcountKernel } from '../formats/qcow2/refcount.ts';
import { instantiateKernels, referenceKernels, type Kernels } from './index.ts';
import { RefcountArray } from './refcount-array.ts';

type Op = { op: 'inc'; start: number; count: number } | { op: 'set'; i: number; v: number } | { op: 'compare'; block: number; seed: number } | { op: 'query'; from: number };

const opArb: fc.Arbitrary<Op> = fc.oneof(
  { weight: 5, arbitrary: fc.record({ op: fc.constant('inc' as const), start: fc.nat(3000), count: fc.nat(300) }) },
  { weight: 1, arbitrary: fc.record({ op: fc.constant('set' as const), i: fc.nat(3000), v: fc.nat(20) }) },
  { weight: 2, arbitrary: fc.record({ op: fc.constant('compare' as const), block: fc.nat(5), seed: fc.integer() }) },
  { weight: 2, arbitrary: fc.record({ op: fc.constant('query' as const), from: fc.nat(3200) }) },
);

describe('RefcountArray (check/repair rebuild)', () => {
  let wasm: Kernels;
  beforeAll(async () => {
    wasm = await instantiateKernels();
  });

  for (const which of ['wasm', 'reference'] as const) {
    it(`counts, compares and lays out blocks like a plain model (${which} kernels)`, () => {
      fc.assert(
        fc.property(fc.integer({ min: 0, max: 6 }), fc.nat(100), fc.array(opArb, { minLength: 1, maxLength: 30 }), (order, initial, ops) => {
          const k = which === 'wasm' ? wasm : referenceKernels;
          const arr = new RefcountArray(order, initial, k);
          const max = arr.max;
          const model: number[] = new Array<number>(initial).fill(0);
          const at = (i: number): number => model[i] ?? 0;
          const blockEntries = 512;
          try {
            for (const o of ops) {
              if (o.op === 'inc') {
                // QEMU's caller reports the overflow and goes on after it; so do we.
                const end = o.start + o.count;
                let expectStop = -1;
                for (let i = o.start; i < end; i++) if (at(i) >= max) { expectStop = i; break; }
                const r = arr.incRange(o.start, o.count);
                expect(r).toBe(expectStop);
                const upTo = expectStop < 0 ? end : expectStop;
                if (o.count > 0) for (let i = model.length; i < end; i++) model[i] = 0;
                for (let i = o.start; i < upTo; i++) model[i] = at(i) + 1;
              } else if (o.op === 'set') {
                const v = Math.min(o.v, max);
                arr.set(o.i, v);
                for (let i = model.length; i <= o.i; i++) model[i] = 0;
                model[o.i] = v;
              } else if (o.op === 'compare') {
                // A "stored" block equal to the counts except a few entries.
                const disk = new Uint8Array((blockEntries * 2 ** order) / 8);
                const first = o.block * blockEntries;
                for (let i = 0; i < blockEntries; i++) jsRefcountKernel.set(disk, i, order, at(first + i));
                let x = o.seed | 0 || 1;
                for (let j = 0; j < 3; j++) {
                  x ^= x << 13;
                  x ^= x >>> 17;
                  x ^= x << 5;
                  jsRefcountKernel.set(disk, (x >>> 0) % blockEntries, order, (x >>> 8) % Math.min(max + 1, 16));
                }
                const want: number[] = [];
                for (let i = 0; i < blockEntries; i++) if (jsRefcountKernel.get(disk, i, order) !== at(first + i)) want.push(first + i);
                const out = new Uint32Array(blockEntries);
                const n = arr.compareBlock(o.block, blockEntries, disk, out);
                expect(Array.from(out.subarray(0, n))).toEqual(want);
                for (let i = model.length; i < first + blockEntries; i++) model[i] = 0;
                // The block view is the on-disk layout of the counts.
                const view = arr.blockView(o.block, blockEntries);
                const laid: number[] = [];
                const counted: number[] = [];
                for (let i = 0; i < blockEntries; i++) {
                  laid.push(jsRefcountKernel.get(view, i, order));
                  counted.push(at(first + i));
                }
                expect(laid).toEqual(counted);
              } else {
                let next = -1;
                for (let i = o.from; i < model.length; i++) if (at(i) !== 0) { next = i; break; }
                expect(arr.nextUsed(o.from)).toBe(next);
              }
            }
            expect(arr.length).toBe(model.length);
            expect(Array.from({ length: model.length }, (_, i) => arr.get(i))).toEqual(Array.from({ length: model.length }, (_, i) => at(i)));
            expect(arr.countUsed()).toBe(model.filter((v) => v !== 0).length);
            let hi = -1;
            for (let i = model.length - 1; i >= 0; i--) if (at(i) !== 0) { hi = i; break; }
            expect(arr.highest()).toBe(hi);
          } finally {
            arr.dispose();
          }
        }),
        { numRuns: 80 },
      );
    });
  }

  it('keeps its counts when it grows into a larger block of linear memory', () => {
    const arr = new RefcountArray(4, 10, wasm);
    try {
      arr.incRange(0, 10);
      arr.incRange(3, 1);
      for (let n = 100; n < 200000; n *= 3) arr.incRange(n, 5);
      expect(arr.get(0)).toBe(1);
      expect(arr.get(3)).toBe(2);
      expect(arr.get(9)).toBe(1);
      expect(arr.countUsed()).toBe(10 + 5 * 7); // n = 100, 300, …, 72900
      expect(wasm.host!.contains(arr.blockView(0, 512))).toBe(true);
    } finally {
      arr.dispose();
    }
  });
});
