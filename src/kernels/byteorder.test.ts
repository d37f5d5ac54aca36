import { beforeAll, describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { byteOrderRef, firstDifferenceRef, firstEqualBlockRef, firstZeroBlockRef, instantiateKernels, type Kernels } from './index.ts';

/** `src` copied into wasm memory, so the kernel works in place. */
function inWasm(k: Kernels, src: Uint8Array, slot: string): Uint8Array {
  const host = k.host!;
  const ptr = host.scratch(slot, src.length);
  const view = host.bytes().subarray(ptr, ptr + src.length);
  view.set(src);
  return view;
}

describe('byte-order kernel', () => {
  let k: Kernels;
  beforeAll(async () => {
    k = await instantiateKernels();
  });

  it('swaps 16, 32 and 64-bit values like the reference, in place and copied', () => {
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 300 }), fc.constantFrom('swap16' as const, 'swap32' as const, 'swap64' as const), (bytes, op) => {
        const want = bytes.slice();
        byteOrderRef[op](want);
        const copied = bytes.slice();
        k.byteorder[op](copied);
        expect(Array.from(copied)).toEqual(Array.from(want));
        const w = inWasm(k, bytes, 'bo-test');
        k.byteorder[op](w);
        expect(Array.from(w)).toEqual(Array.from(want));
      }),
      { numRuns: 300 },
    );
  });

  it('decodes and encodes big-endian 64-bit table entries like the reference', () => {
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 256 }), fc.constantFrom([0x00ffffff, 0xfffffe00], [0xffffffff, 0xffffffff], [0x001fffff, 0xffffffff]), (bytes, [mh, ml]) => {
        const n = Math.floor(bytes.length / 8);
        const want = new Float64Array(n);
        const got = new Float64Array(n);
        expect(k.byteorder.decodeBe64(bytes, got, mh!, ml!)).toBe(byteOrderRef.decodeBe64(bytes, want, mh!, ml!));
        expect(Array.from(got)).toEqual(Array.from(want));
        // Values below 2^53 round-trip.
        const vals = want.map((v) => (v < 0 ? 0 : v));
        const a = new Uint8Array(8 * n);
        const b = new Uint8Array(8 * n);
        byteOrderRef.encodeBe64(vals, a);
        k.byteorder.encodeBe64(vals, b);
        expect(Array.from(b)).toEqual(Array.from(a));
        const back = new Float64Array(n);
        k.byteorder.decodeBe64(b, back, 0xffffffff, 0xffffffff);
        expect(Array.from(back)).toEqual(Array.from(vals));
      }),
      { numRuns: 300 },
    );
  });
});

describe('table range search', () => {
  let k: Kernels;
  beforeAll(async () => {
    k = await instantiateKernels();
  });

  it('finds the first masked big-endian entry in [lo, hi) like the reference (the overlap check)', () => {
    fc.assert(
      fc.property(
        fc.array(fc.tuple(fc.nat(0x3ff), fc.nat(0x3f), fc.boolean()), { maxLength: 40 }),
        fc.nat(0x3ff),
        fc.nat(64),
        fc.constantFrom([0x00ffffff, 0xfffffe00], [0x00ffffff, 0xffffffff], [0xffffffff, 0xffffffff]),
        (entries, loCluster, span, [mh, ml]) => {
          // Cluster-aligned offsets (64 KiB) with flag bits in the high and low words, some past 2^53.
          const table = new Uint8Array(entries.length * 8);
          const dv = new DataView(table.buffer);
          entries.forEach(([cluster, flags, huge], i) => {
            const off = cluster * 65536;
            dv.setUint32(8 * i, (huge ? 0x00400000 : Math.floor(off / 2 ** 32)) | (flags & 1 ? 0x80000000 : 0));
            dv.setUint32(8 * i + 4, (off >>> 0) | (flags & 0x1fe));
          });
          const lo = loCluster * 65536;
          const hi = lo + span * 65536;
          const want = byteOrderRef.findInRange(table, mh!, ml!, lo, hi);
          expect(k.byteorder.findInRange(table, mh!, ml!, lo, hi)).toBe(want);
          expect(k.byteorder.findInRange(inWasm(k, table, 'fr-test'), mh!, ml!, lo, hi)).toBe(want);
        },
      ),
      { numRuns: 500 },
    );
  });
});

describe('zero-block kernel', () => {
  let k: Kernels;
  beforeAll(async () => {
    k = await instantiateKernels();
  });

  it('finds the first all-zero block like the reference, in place and copied', () => {
    fc.assert(
      fc.property(fc.integer({ min: 0, max: 9000 }), fc.constantFrom(1, 7, 512, 4096, 65536), fc.array(fc.nat(), { maxLength: 12 }), (len, unit, marks) => {
        const buf = new Uint8Array(len);
        // Mark bytes so that some blocks hold data and others stay zero.
        for (const m of marks) if (len > 0) buf[m % len] = 1 + (m % 255);
        const want = firstZeroBlockRef(buf, unit);
        expect(k.firstZeroBlock(buf, unit)).toBe(want);
        expect(k.firstZeroBlock(inWasm(k, buf, 'zb-test'), unit)).toBe(want);
      }),
      { numRuns: 400 },
    );
  });
});

describe('compare kernels', () => {
  let k: Kernels;
  beforeAll(async () => {
    k = await instantiateKernels();
  });

  it('find the first differing byte and the first equal block like the reference, in place and copied', () => {
    fc.assert(
      fc.property(fc.integer({ min: 0, max: 9000 }), fc.integer({ min: 0, max: 200 }), fc.constantFrom(1, 7, 512, 4096), fc.array(fc.nat(), { maxLength: 12 }), fc.nat(15), (len, extra, unit, marks, shift) => {
        const a = new Uint8Array(len + 16).subarray(shift, shift + len);
        for (let i = 0; i < len; i++) a[i] = (i * 31) & 0xff;
        // b is longer than a sometimes: only the common length counts.
        const b = new Uint8Array(len + extra);
        b.set(a);
        for (const m of marks) if (len > 0) b[m % len] = (b[m % len]! + 1) & 0xff;
        const d = firstDifferenceRef(a, b);
        const e = firstEqualBlockRef(a, b, unit);
        expect(k.firstDifference(a, b)).toBe(d);
        expect(k.firstEqualBlock(a, b, unit)).toBe(e);
        const wa = inWasm(k, a, 'cmp-test-a');
        const wb = inWasm(k, b, 'cmp-test-b');
        expect(k.firstDifference(wa, wb)).toBe(d);
        expect(k.firstEqualBlock(wa, wb, unit)).toBe(e);
        expect(k.firstDifference(wa, b)).toBe(d);
      }),
      { numRuns: 400 },
    );
  });
});
