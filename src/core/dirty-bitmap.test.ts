/**
 * Dirty bitmaps on nodes: the operations against a one-boolean-per-granule
 * model (fast-check), QEMU's checks and messages, and marking by the generic
 * request path (writes, zero writes, discards, unaligned ranges; disabled
 * bitmaps stay clean).
 */
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { nodeDrivers } from '../drivers-node.ts';
import {
  BITMAP_CHECK,
  bdrvCreateDirtyBitmap,
  bdrvDirtyBitmapCheck,
  bdrvDirtyBitmapTruncate,
  bdrvFindDirtyBitmap,
  bdrvMergeDirtyBitmap,
  bdrvReleaseDirtyBitmap,
  type BdrvDirtyBitmap,
} from './dirty-bitmap.ts';
import { Graph } from './graph.ts';
import { HBitmap } from './hbitmap.ts';
import { imgCreate } from './img/create.ts';
import { toolGate } from './img/gate.ts';
import { openBackend } from './img/open.ts';
import type { BlockBackend } from './block-backend.ts';
import type { BlockNode } from './node.ts';

let seq = 0;
function graph(): Graph {
  return new Graph({ drivers: nodeDrivers(), defaultProtocol: 'file', gate: toolGate });
}

async function image(fmt: 'raw' | 'qcow2', size: number): Promise<{ g: Graph; blk: BlockBackend; bs: BlockNode }> {
  const g = graph();
  const filename = `memory:dirty-bitmap-test-${++seq}`;
  await imgCreate(g, { filename, fmt, size });
  const blk = await openBackend(g, { filename, format: fmt, unmap: true });
  return { g, blk, bs: blk.bs! };
}

/** One boolean per granule: what the bitmap must say. */
class Model {
  readonly bits: boolean[];
  constructor(readonly size: number, readonly g: number) {
    this.bits = new Array<boolean>(Math.max(1, Math.ceil(size / g))).fill(false);
  }
  set(o: number, n: number): void {
    const end = Math.min(o + n, this.size);
    for (let b = Math.floor(o / this.g); b * this.g < end; b++) this.bits[b] = true;
  }
  reset(o: number, n: number): void {
    const end = Math.min(Math.ceil((o + n) / this.g) * this.g, this.size);
    for (let b = Math.floor(o / this.g); b * this.g < end; b++) this.bits[b] = false;
  }
  areas(): Array<{ offset: number; bytes: number }> {
    const out: Array<{ offset: number; bytes: number }> = [];
    for (let b = 0; b < this.bits.length; b++) {
      if (!this.bits[b]) continue;
      let e = b;
      while (e + 1 < this.bits.length && this.bits[e + 1]) e++;
      out.push({ offset: b * this.g, bytes: Math.min((e + 1) * this.g, this.size) - b * this.g });
      b = e;
    }
    return out;
  }
  count(): number {
    return this.bits.filter(Boolean).length * this.g;
  }
}

/** What the bitmap says as dirty areas. */
function areas(bm: BdrvDirtyBitmap): Array<{ offset: number; bytes: number }> {
  return bm.dirtyAreas().map((a) => ({ offset: a.offset, bytes: a.bytes }));
}

describe('BdrvDirtyBitmap', () => {
  it('follows the model through set, reset, clear, merge, serialise and resize', async () => {
    const { bs, blk } = await image('raw', 1 << 20);
    try {
      const frac = fc.nat(0xffff).map((n) => n / 0x10000);
      const op = fc.record({ op: fc.constantFrom('set', 'set', 'reset', 'clear', 'merge', 'roundtrip'), a: frac, b: frac });
      fc.assert(
        fc.property(fc.integer({ min: 9, max: 16 }), fc.integer({ min: 9, max: 16 }), fc.array(op, { minLength: 1, maxLength: 30 }), (gb, gb2, ops) => {
          const size = bs.totalBytes;
          const bm = bdrvCreateDirtyBitmap(bs, 2 ** gb, 'm');
          const other = bdrvCreateDirtyBitmap(bs, 2 ** gb2, 'other');
          try {
            const m = new Model(size, 2 ** gb);
            for (const o of ops) {
              const off = Math.floor(o.a * size);
              const len = Math.floor(o.b * (size - off));
              switch (o.op) {
                case 'set': bm.setDirty(off, len); if (len > 0) m.set(off, len); break;
                case 'reset': bm.resetDirty(off, len); if (len > 0) m.reset(off, len); break;
                case 'clear': bm.clear(); m.reset(0, size); break;
                case 'merge': {
                  other.clear();
                  other.setDirty(off, len);
                  bdrvMergeDirtyBitmap(bm, other);
                  // Each granule of the coarser or finer source marks the target granules it overlaps.
                  if (len > 0) {
                    const g2 = 2 ** gb2;
                    const s = Math.floor(off / g2) * g2;
                    const e = Math.min(Math.ceil((off + len) / g2) * g2, size);
                    m.set(s, e - s);
                  }
                  break;
                }
                case 'roundtrip': {
                  const buf = new Uint8Array(Math.ceil(size / bm.granularity / 8) + 8);
                  const n = bm.serializePart(0, size, buf);
                  bm.clear();
                  bm.deserializePart(0, size, buf.subarray(0, n));
                  break;
                }
              }
              expect(areas(bm)).toEqual(m.areas());
              expect(bm.count()).toBe(m.count());
            }
            const first = m.areas()[0];
            expect(bm.nextDirty(0)).toBe(first ? first.offset : -1);
          } finally {
            bdrvReleaseDirtyBitmap(bm);
            bdrvReleaseDirtyBitmap(other);
          }
        }),
        { numRuns: 200 },
      );
    } finally {
      await blk.close();
    }
  });

  it('checks names, granularity, flags and sizes with QEMU messages', async () => {
    const { bs, blk } = await image('raw', 1 << 20);
    try {
      const bm = bdrvCreateDirtyBitmap(bs, 65536, 'a');
      expect(bdrvFindDirtyBitmap(bs, 'a')).toBe(bm);
      expect(() => bdrvCreateDirtyBitmap(bs, 65536, 'a')).toThrow('Bitmap already exists: a');
      expect(() => bdrvCreateDirtyBitmap(bs, 65536, 'x'.repeat(1024))).toThrow(/^Bitmap name too long: x+$/);
      expect(() => bdrvCreateDirtyBitmap(bs, 256, 'b')).toThrow('Granularity must be power of 2 and at least 512');
      expect(() => bdrvCreateDirtyBitmap(bs, 3000, 'b')).toThrow('Granularity must be power of 2 and at least 512');
      // Bits beyond what the kernels address are refused instead of wrapping.
      expect(() => new HBitmap(2 ** 50, 512)).toThrow(/needs 2199023255552 bits, more than the 2147483648 supported; use a larger granularity/);
      bm.readonly = true;
      expect(() => bdrvDirtyBitmapCheck(bm, BITMAP_CHECK.DEFAULT)).toThrow("Bitmap 'a' is readonly and cannot be modified");
      expect(() => bdrvDirtyBitmapCheck(bm, BITMAP_CHECK.ALLOW_RO)).not.toThrow();
      bm.readonly = false;
      bm.inconsistent = true;
      expect(() => bdrvDirtyBitmapCheck(bm, BITMAP_CHECK.ALLOW_RO)).toThrow("Bitmap 'a' is inconsistent and cannot be used");
      bm.inconsistent = false;
      bm.busy = true;
      expect(() => bdrvDirtyBitmapCheck(bm, BITMAP_CHECK.BUSY)).toThrow("Bitmap 'a' is currently in use by another operation and cannot be used");
      expect(() => bdrvReleaseDirtyBitmap(bm)).toThrow(/in use/);
      bm.busy = false;
      const small = bdrvCreateDirtyBitmap(bs, 65536, 'small');
      bdrvDirtyBitmapTruncate(bs, 1 << 19);
      const big = bdrvCreateDirtyBitmap(bs, 65536, 'big');
      bdrvDirtyBitmapTruncate(bs, 1 << 20);
      expect(() => bdrvMergeDirtyBitmap(big, small)).not.toThrow();
      small.hbitmap.dispose();
      bdrvReleaseDirtyBitmap(bm);
      expect(bdrvFindDirtyBitmap(bs, 'a')).toBeNull();
    } finally {
      await blk.close();
    }
  });

  it('keeps the bits below the new size on resize', async () => {
    const { bs, blk } = await image('raw', 1 << 20);
    try {
      const bm = bdrvCreateDirtyBitmap(bs, 4096, 'r');
      bm.setDirty(0, 4096);
      bm.setDirty(900 * 1024, 8192);
      bdrvDirtyBitmapTruncate(bs, 512 * 1024);
      expect(areas(bm)).toEqual([{ offset: 0, bytes: 4096 }]);
      bdrvDirtyBitmapTruncate(bs, 1 << 20);
      expect(bm.size).toBe(1 << 20);
      expect(areas(bm)).toEqual([{ offset: 0, bytes: 4096 }]);
    } finally {
      await blk.close();
    }
  });
});

describe('marking by the request path', () => {
  for (const fmt of ['raw', 'qcow2'] as const) {
    it(`marks writes, zero writes and discards on ${fmt}, not in disabled bitmaps`, async () => {
      const { bs, blk } = await image(fmt, 1 << 20);
      try {
        const on = bdrvCreateDirtyBitmap(bs, 4096, 'on');
        const coarse = bdrvCreateDirtyBitmap(bs, 65536, 'coarse');
        const off = bdrvCreateDirtyBitmap(bs, 4096, 'off');
        off.disabled = true;
        await blk.pwrite(8192, new Uint8Array(4096).fill(1));
        expect(areas(on)).toEqual([{ offset: 8192, bytes: 4096 }]);
        expect(areas(coarse)).toEqual([{ offset: 0, bytes: 65536 }]);
        // Unaligned: the write is widened to the node's request alignment; every touched granule is dirty.
        await blk.pwrite(20000, new Uint8Array(5000).fill(2));
        expect(areas(on)).toEqual([{ offset: 8192, bytes: 4096 }, { offset: 16384, bytes: 12288 }]);
        await blk.pwriteZeroes(300 * 1024, 64 * 1024);
        expect(on.get(300 * 1024)).toBe(true);
        expect(on.get(364 * 1024 - 1)).toBe(true);
        expect(on.get(364 * 1024)).toBe(false);
        await blk.pdiscard(512 * 1024, 128 * 1024);
        expect(on.get(512 * 1024)).toBe(true);
        expect(on.get(640 * 1024 - 1)).toBe(true);
        expect(on.get(640 * 1024)).toBe(false);
        expect(off.count()).toBe(0);
        expect(on.count()).toBe((1 + 3 + 16 + 32) * 4096);
        // Enabling later tracks only later writes.
        off.disabled = false;
        await blk.pwrite(1000 * 1024, new Uint8Array(512));
        expect(areas(off)).toEqual([{ offset: 1000 * 1024, bytes: 4096 }]);
      } finally {
        await blk.close();
      }
    });
  }

  it('refuses writes and discards while a bitmap is read-only, as QEMU does', async () => {
    const { bs, blk } = await image('raw', 1 << 20);
    try {
      const bm = bdrvCreateDirtyBitmap(bs, 4096, 'ro');
      bm.readonly = true;
      await expect(blk.pwrite(0, new Uint8Array(4096))).rejects.toMatchObject({ code: 'EPERM' });
      await expect(blk.pwriteZeroes(0, 65536)).rejects.toMatchObject({ code: 'EPERM' });
      await expect(blk.pdiscard(0, 65536)).rejects.toMatchObject({ code: 'EPERM' });
      expect(bm.count()).toBe(0);
      bm.readonly = false;
      await blk.pwrite(0, new Uint8Array(4096));
      expect(bm.count()).toBe(4096);
    } finally {
      await blk.close();
    }
  });

  it('costs nothing and marks nothing without bitmaps, and stops marking once released', async () => {
    const { bs, blk } = await image('raw', 1 << 20);
    try {
      await blk.pwrite(0, new Uint8Array(4096));
      const bm = bdrvCreateDirtyBitmap(bs, 4096, 'late');
      expect(bm.count()).toBe(0);
      bdrvReleaseDirtyBitmap(bm);
      await blk.pwrite(0, new Uint8Array(4096));
      expect(bs.dirtyBitmaps).toEqual([]);
    } finally {
      await blk.close();
    }
  });
});
