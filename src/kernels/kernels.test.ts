import { beforeAll, describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { COPY_CHUNK, type Kernels, kernels, loadKernels, simdSupported, usingWasm } from './index.ts';
import { firstNonZeroRef, isZeroRef } from './reference.ts';
import { isZeroBuffer } from '../core/zero.ts';

/** The obvious oracle both implementations must agree with. */
function naiveFirstNonZero(buf: Uint8Array): number {
  return buf.findIndex((b) => b !== 0);
}

/** Fills `buf` with bytes from a small xorshift PRNG seeded by `seed`. */
function fillRandom(buf: Uint8Array, seed: number): void {
  let x = seed | 0 || 0x9e3779b9;
  for (let i = 0; i < buf.length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    buf[i] = x & 0xff;
  }
}

type Shape =
  | { kind: 'zero' }
  | { kind: 'single'; pos: number; value: number }
  | { kind: 'sparse'; picks: Array<{ pos: number; value: number }> }
  | { kind: 'random'; seed: number };

const shapeArb: fc.Arbitrary<Shape> = fc.oneof(
  fc.constant<Shape>({ kind: 'zero' }),
  fc.record({ kind: fc.constant('single' as const), pos: fc.double({ min: 0, max: 1, noNaN: true, maxExcluded: true }), value: fc.integer({ min: 1, max: 255 }) }),
  fc.record({
    kind: fc.constant('sparse' as const),
    picks: fc.array(fc.record({ pos: fc.double({ min: 0, max: 1, noNaN: true, maxExcluded: true }), value: fc.integer({ min: 1, max: 255 }) }), { minLength: 1, maxLength: 6 }),
  }),
  fc.record({ kind: fc.constant('random' as const), seed: fc.integer() }),
);

/** Writes `shape` into the (zeroed) `buf`; positions are fractions of the length. */
function applyShape(buf: Uint8Array, shape: Shape): void {
  const len = buf.length;
  if (len === 0) return;
  switch (shape.kind) {
    case 'zero':
      return;
    case 'single':
      buf[Math.floor(shape.pos * len)] = shape.value;
      return;
    case 'sparse':
      for (const p of shape.picks) buf[Math.floor(p.pos * len)] = p.value;
      return;
    case 'random':
      fillRandom(buf, shape.seed);
      return;
  }
}

/** Places `len` zeroed bytes at an address that is `shift` past a 16-byte boundary inside wasm memory. */
function wasmView(k: Kernels, len: number, shift: number): Uint8Array {
  const host = k.host!;
  const ptr = host.scratch('test-in-place', len + 32);
  const start = ((ptr + 15) & ~15) + shift;
  const view = host.bytes().subarray(start, start + len);
  view.fill(0);
  return view;
}

describe('kernels', () => {
  let k: Kernels;
  beforeAll(async () => {
    k = await loadKernels();
  });

  it('run as wasm in Node, not the silent reference fallback', () => {
    expect(simdSupported()).toBe(true);
    expect(usingWasm()).toBe(true);
    expect(kernels()).toBe(k);
    expect(k.host).not.toBeNull();
  });

  it('serve the request path\'s zero check once loaded', () => {
    const buf = new Uint8Array(70000);
    expect(isZeroBuffer(buf)).toBe(true);
    buf[69999] = 1;
    expect(isZeroBuffer(buf)).toBe(false);
  });

  it('agree with the reference and the oracle on copied buffers', () => {
    fc.assert(
      fc.property(fc.integer({ min: 0, max: 70000 }), fc.integer({ min: 0, max: 15 }), shapeArb, (len, shift, shape) => {
        // A view at a random offset into a JS ArrayBuffer: exercises the reference's unaligned head.
        const buf = new Uint8Array(len + 16).subarray(shift, shift + len);
        applyShape(buf, shape);
        const want = naiveFirstNonZero(buf);
        expect(firstNonZeroRef(buf)).toBe(want);
        expect(isZeroRef(buf)).toBe(want === -1);
        expect(k.firstNonZero(buf)).toBe(want);
        expect(k.isZero(buf)).toBe(want === -1);
      }),
      { numRuns: 400 },
    );
  });

  it('agree with the oracle on unaligned data already in wasm memory', () => {
    fc.assert(
      fc.property(fc.integer({ min: 0, max: 70000 }), fc.integer({ min: 0, max: 15 }), shapeArb, (len, shift, shape) => {
        const view = wasmView(k, len, shift);
        applyShape(view, shape);
        expect(k.host!.contains(view)).toBe(true);
        const want = naiveFirstNonZero(view);
        expect(k.firstNonZero(view)).toBe(want);
        expect(k.isZero(view)).toBe(want === -1);
        expect(firstNonZeroRef(view)).toBe(want);
      }),
      { numRuns: 400 },
    );
  });

  it('find every single non-zero byte in short buffers at every alignment', () => {
    // Mismatches are collected and compared once: an expect per case would dominate the run time.
    const wrong: string[] = [];
    for (let shift = 0; shift < 16; shift++) {
      for (let len = 0; len <= 80; len++) {
        const view = wasmView(k, len, shift);
        if (!k.isZero(view) || k.firstNonZero(view) !== -1) wrong.push(`zero ${shift}/${len}`);
        for (let pos = 0; pos < len; pos++) {
          view[pos] = 0x80;
          if (pos + 1 < len) view[len - 1] = 1; // a later byte must not win
          if (k.firstNonZero(view) !== pos || k.isZero(view)) wrong.push(`byte ${pos} of ${shift}/${len}`);
          view.fill(0);
        }
      }
    }
    expect(wrong).toEqual([]);
  });

  it('scan buffers larger than the copy chunk, growing wasm memory', () => {
    const big = new Uint8Array(COPY_CHUNK * 2 + 12345);
    expect(k.isZero(big)).toBe(true);
    expect(k.firstNonZero(big)).toBe(-1);
    for (const pos of [0, COPY_CHUNK - 1, COPY_CHUNK, COPY_CHUNK * 2 + 1, big.length - 1]) {
      big[pos] = 7;
      expect(k.firstNonZero(big)).toBe(pos);
      expect(k.isZero(big)).toBe(false);
      big[pos] = 0;
    }
    // Views into memory must still be usable after the scratch block grew.
    const view = wasmView(k, 100, 3);
    view[42] = 1;
    expect(k.firstNonZero(view)).toBe(42);
  });
});

describe('kernels over an ordinary (non-shared) memory', () => {
  // What a page without cross-origin isolation gets: views detach when memory
  // grows, so nothing may keep one; results must not change.
  it('give the reference results across memory growth', async () => {
    const { instantiateKernels, referenceKernels } = await import('./index.ts');
    const k = await instantiateKernels(false);
    expect(k.host!.shared).toBe(false);
    expect(k.pool).toBeNull();
    const ref = referenceKernels;
    const bm = k.bitmap.create(1 << 20);
    const rbm = ref.bitmap.create(1 << 20);
    k.bitmap.set(bm, 1000, 5000);
    ref.bitmap.set(rbm, 1000, 5000);
    // Force growth several times: a 40 MiB buffer is copied in chunk by chunk, then large bitmaps are allocated.
    const big = new Uint8Array(40 << 20);
    big[big.length - 1] = 1;
    expect(k.firstNonZero(big)).toBe(big.length - 1);
    const huge = k.bitmap.create(1 << 28);
    k.bitmap.set(huge, (1 << 28) - 5, 3);
    expect(k.bitmap.nextDirty(huge, 0, 1 << 28)).toBe((1 << 28) - 5);
    k.bitmap.dispose(huge);
    // Results written through the results area after growth.
    expect(k.bitmap.nextDirty(bm, 0, 1 << 20)).toBe(ref.bitmap.nextDirty(rbm, 0, 1 << 20));
    expect(k.bitmap.count(bm, 0, 1 << 20)).toBe(5000);
    const runs = new Float64Array(8);
    expect(k.bitmap.dirtyRuns(bm, 0, 1 << 20, runs)).toBe(1);
    expect(Array.from(runs.subarray(0, 2))).toEqual([1000, 5000]);
    const slice = new Uint8Array(64);
    new DataView(slice.buffer).setUint32(4, 0x10000);
    new DataView(slice.buffer).setUint32(12, 0x20000);
    const g = { clusterBits: 16, subclusterBits: 16, extended: false, hasDataFile: false };
    const a = { type: 0, count: 0, invalidIndex: -1, hostCluster: 0, entryHi: 0, entryLo: 0 } as Parameters<typeof ref.l2.scan>[5];
    const b = { ...a };
    k.l2.scan(slice, 0, 0, 8, g, a);
    ref.l2.scan(slice, 0, 0, 8, g, b);
    expect(a).toEqual(b);
    const block = new Uint8Array(4096).fill(1);
    block.fill(0, 3000);
    expect(k.refcount.findZero(block, 0, 2048, 4)).toBe(ref.refcount.findZero(block, 0, 2048, 4));
    k.bitmap.dispose(bm);
  });

  it('scan views into memory in place before growth, and detached views as empty after it', async () => {
    const { instantiateKernels } = await import('./index.ts');
    const k = await instantiateKernels(false);
    const host = k.host!;
    const before = host.view(host.alloc(65536), 65536);
    before.fill(0);
    expect(k.isZero(before)).toBe(true); // remembers this buffer as in memory
    before[40000] = 9;
    expect(k.firstNonZero(before)).toBe(40000);
    expect(k.firstZeroBlock(before, 4096)).toBe(0);
    host.alloc(8 << 20); // grows: `before` detaches
    expect(before.length).toBe(0);
    expect(k.isZero(before)).toBe(true);
    expect(k.firstNonZero(before)).toBe(-1);
    expect(k.firstZeroBlock(before, 4096)).toBe(-1);
    const after = host.view(host.alloc(65536), 65536);
    after.fill(0);
    after[65535] = 1;
    expect(host.contains(after)).toBe(true);
    expect(k.isZero(after)).toBe(false);
    expect(k.firstNonZero(after)).toBe(65535);
    expect(k.firstZeroBlock(after, 4096)).toBe(0);
    // A JS-heap buffer is still copied in, never taken for a pointer into memory.
    const js = new Uint8Array(65536);
    js[3] = 1;
    expect(k.firstNonZero(js)).toBe(3);
    expect(k.isZero(js.subarray(4))).toBe(true);
  });
});
