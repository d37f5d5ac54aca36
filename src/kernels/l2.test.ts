import { beforeAll, describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { jsL2Kernel, newL2Scan, scanOneStandard, SC, type L2Geometry } from '../formats/qcow2/cluster.ts';
import { instantiateKernels, l2Ref, type Kernels, type L2Run } from './index.ts';

/** Small xorshift PRNG so one fast-check seed describes a whole slice. */
function rng(seed: number): () => number {
  let x = seed | 0 || 0x2545f491;
  return () => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return x >>> 0;
  };
}

interface Case {
  g: L2Geometry;
  slice: Uint8Array;
  entries: number;
  l2Index: number;
  scIndex: number;
  nb: number;
}

/**
 * Builds a slice whose entries favour what the kernel distinguishes: runs of
 * contiguous host clusters, zero and unallocated runs, compressed entries,
 * offsets past 2^53, corrupt bitmaps, and plain random words.
 */
function makeCase(seed: number, clusterBits: number, extended: boolean, hasDataFile: boolean, entries: number, pos: [number, number, number]): Case {
  const next = rng(seed);
  const g: L2Geometry = { clusterBits, subclusterBits: extended ? clusterBits - 5 : clusterBits, extended, hasDataFile };
  const es = extended ? 16 : 8;
  const slice = new Uint8Array(entries * es);
  const dv = new DataView(slice.buffer);
  let host = (next() % 4096) * 2 ** clusterBits;
  // Kinds come in streaks, so runs of several entries are common.
  let r = 0;
  let streak = 0;
  for (let i = 0; i < entries; i++) {
    const o = i * es;
    if (streak-- <= 0) {
      r = next() % 100;
      streak = next() % 8;
    }
    let hi = 0;
    let lo = 0;
    let bmHi = 0;
    let bmLo = 0;
    if (r < 35) {
      // Contiguous data (the common case), sometimes with a gap.
      if (next() % 5 === 0) host += 2 ** clusterBits * (1 + (next() % 3));
      hi = Math.floor(host / 2 ** 32) | (next() % 2 ? 0x80000000 : 0);
      lo = host >>> 0;
      host += 2 ** clusterBits;
      bmLo = 0xffffffff;
    } else if (r < 50) {
      // Unallocated (or, with a data file, offset 0 with COPIED); extended
      // entries may have zero subclusters, or allocation bits that make them corrupt.
      hi = hasDataFile && next() % 2 ? 0x80000000 : 0;
      const k = next() % 4;
      if (k === 1) bmHi = next();
      else if (k === 2) bmHi = 0xffffffff << (next() % 32);
      else if (k === 3 && next() % 3 === 0) bmLo = 1 << (next() % 32);
    } else if (r < 60) {
      lo = 1; // zero flag (standard)
      bmHi = 0xffffffff;
      if (next() % 2) {
        hi = Math.floor(host / 2 ** 32);
        lo |= host >>> 0;
        host += 2 ** clusterBits;
      }
    } else if (r < 68) {
      hi = 0x40000000 | (next() & 0x3fffffff); // compressed
      lo = next();
    } else if (r < 74) {
      hi = 0x00200000 + (next() % 0x100); // at or past 2^53
      lo = next() & 0xfffffe00;
      bmLo = 0xffffffff;
    } else if (r < 86 && extended) {
      // Mixed subclusters: prefixes and random patterns, sometimes corrupt (a bit in both).
      hi = Math.floor(host / 2 ** 32);
      lo = host >>> 0;
      host += 2 ** clusterBits;
      const a = next();
      const b = next();
      const k = next() % 4;
      bmLo = k === 0 ? a : k === 1 ? (a & ~b) >>> 0 : k === 2 ? 0xffffffff >>> (next() % 32) : 0;
      bmHi = k === 3 ? (b & ~bmLo) >>> 0 : k === 2 ? 0 : (b & ~bmLo) >>> 0;
      if (next() % 10 === 0) bmHi = (bmHi | (bmLo & -bmLo)) >>> 0;
    } else {
      hi = next();
      lo = next();
      bmHi = next();
      bmLo = next();
    }
    dv.setUint32(o, hi >>> 0);
    dv.setUint32(o + 4, lo >>> 0);
    if (extended) {
      dv.setUint32(o + 8, bmHi >>> 0);
      dv.setUint32(o + 12, bmLo >>> 0);
    }
  }
  const l2Index = Math.floor(pos[0] * entries);
  const perCluster = extended ? 32 : 1;
  const scIndex = Math.floor(pos[1] * perCluster);
  const nb = 1 + Math.floor(pos[2] * (entries - l2Index));
  return { g, slice, entries, l2Index, scIndex, nb };
}

const caseArb = fc
  .record({
    seed: fc.integer(),
    clusterBits: fc.integer({ min: 9, max: 21 }),
    extended: fc.boolean(),
    hasDataFile: fc.boolean(),
    entries: fc.integer({ min: 1, max: 96 }),
    // Fractions from integers: fc.double favours 0 and 1, which would make most ranges one entry long.
    pos: fc.tuple(fc.nat(0xffff), fc.nat(0xffff), fc.nat(0xffff)).map(([a, b, c]): [number, number, number] => [a / 0x10000, b / 0x10000, c / 0x10000]),
  })
  .map(({ seed, clusterBits, extended, hasDataFile, entries, pos }) =>
    // Extended L2 needs subclusters of at least 512 bytes.
    makeCase(seed, extended ? Math.max(clusterBits, 14) : clusterBits, extended, hasDataFile, entries, pos),
  );

/** A copy of `src` inside wasm memory, so the kernel reads it in place. */
function inWasm(k: Kernels, src: Uint8Array, slot: string): Uint8Array {
  const host = k.host!;
  const ptr = host.scratch(slot, src.length);
  const view = host.bytes().subarray(ptr, ptr + src.length);
  view.set(src);
  return view;
}

describe('L2 kernel', () => {
  let k: Kernels;
  beforeAll(async () => {
    k = await instantiateKernels();
  });

  it('scan agrees with jsL2Kernel on copied and in-place slices', () => {
    fc.assert(
      fc.property(caseArb, (c) => {
        const want = newL2Scan();
        jsL2Kernel.scan(c.slice, c.l2Index, c.scIndex, c.nb, c.g, want);
        const copied = newL2Scan();
        k.l2.scan(c.slice, c.l2Index, c.scIndex, c.nb, c.g, copied);
        expect(copied).toEqual(want);
        const inPlace = newL2Scan();
        k.l2.scan(inWasm(k, c.slice, 'test-l2'), c.l2Index, c.scIndex, c.nb, c.g, inPlace);
        expect(inPlace).toEqual(want);
      }),
      { numRuns: 1500 },
    );
  });

  it('the one-entry decode of the read fast path agrees with jsL2Kernel', () => {
    fc.assert(
      fc.property(caseArb, (c) => {
        if (c.g.extended) return;
        const want = newL2Scan();
        jsL2Kernel.scan(c.slice, c.l2Index, 0, 1, c.g, want);
        const got = newL2Scan();
        scanOneStandard(c.slice, c.l2Index, c.g.hasDataFile, got);
        expect(got).toEqual(want);
      }),
      { numRuns: 3000 },
    );
  });

  it('runs agree with the reference and tile the range with scans', () => {
    fc.assert(
      fc.property(caseArb, fc.integer({ min: 1, max: 200 }), (c, maxRuns) => {
        const want: L2Run[] = [];
        const n = l2Ref.runs(c.slice, c.l2Index, c.scIndex, c.nb, c.g, want, maxRuns);
        const got: L2Run[] = [];
        expect(k.l2.runs(c.slice, c.l2Index, c.scIndex, c.nb, c.g, got, maxRuns)).toBe(n);
        expect(got.slice(0, n)).toEqual(want.slice(0, n));
        const inPlace: L2Run[] = [];
        expect(k.l2.runs(inWasm(k, c.slice, 'test-l2'), c.l2Index, c.scIndex, c.nb, c.g, inPlace, maxRuns)).toBe(n);
        expect(inPlace.slice(0, n)).toEqual(want.slice(0, n));
        // Without a limit, valid runs cover exactly the asked subclusters.
        const all: L2Run[] = [];
        const m = k.l2.runs(c.slice, c.l2Index, c.scIndex, c.nb, c.g, all, 1 << 20);
        if (all.slice(0, m).every((r) => r.type !== SC.INVALID)) {
          const perCluster = c.g.extended ? 32 : 1;
          const total = all.slice(0, m).reduce((a, r) => a + r.count, 0);
          expect(total).toBe(c.nb * perCluster - c.scIndex);
        }
      }),
      { numRuns: 800 },
    );
  });

  it('decodes sixteen fragmented 64 KiB clusters in one call', () => {
    const g: L2Geometry = { clusterBits: 16, subclusterBits: 16, extended: false, hasDataFile: false };
    const slice = new Uint8Array(16 * 8);
    const dv = new DataView(slice.buffer);
    // Every other cluster is out of order: 16 separate host extents.
    for (let i = 0; i < 16; i++) dv.setUint32(i * 8 + 4, ((i % 2 ? 40 : 10) + i) * 65536);
    const out: L2Run[] = [];
    const host = k.host!;
    let calls = 0;
    const ex = host.exports as { l2Runs: typeof host.exports.l2Runs };
    const orig = ex.l2Runs;
    ex.l2Runs = (...args) => {
      calls++;
      return orig(...args);
    };
    try {
      expect(k.l2.runs(slice, 0, 0, 16, g, out, 16)).toBe(16);
    } finally {
      ex.l2Runs = orig;
    }
    expect(calls).toBe(1);
    expect(out.map((r) => r.hostCluster / 65536)).toEqual([...Array(16).keys()].map((i) => (i % 2 ? 40 : 10) + i));
  });
});
