import { beforeAll, describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { byteOrderRef, firstZeroBlockRef, instantiateKernels, type Kernels } from './index.ts';

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
