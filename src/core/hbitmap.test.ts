import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { CHUNK, HBitmap } from './hbitmap.ts';
import { bitmapRef, instantiateKernels, type BitmapOps } from '../kernels/index.ts';

/** QEMU's HBitmap semantics spelled out over one boolean per granule: the oracle. */
class Model {
  readonly bits: boolean[];
  constructor(
    readonly size: number,
    readonly g: number,
  ) {
    this.bits = new Array<boolean>(Math.max(Math.ceil(size / g), 1)).fill(false);
  }
  set(o: number, n: number): void {
    if (n === 0) return;
    for (let b = Math.floor(o / this.g); b <= Math.floor((o + n - 1) / this.g); b++) this.bits[b] = true;
  }
  reset(o: number, n: number): void {
    if (n === 0) return;
    for (let b = o / this.g; b <= Math.floor((o + n - 1) / this.g); b++) this.bits[b] = false;
  }
  count(): number {
    return this.bits.filter(Boolean).length * this.g;
  }
  nextDirty(o: number, n: number): number {
    if (o >= this.size || n <= 0) return -1;
    const end = n > this.size - o ? this.size : o + n;
    for (let b = Math.floor(o / this.g); b * this.g < end; b++) if (this.bits[b]) return Math.max(o, b * this.g);
    return -1;
  }
  nextZero(o: number, n: number): number {
    if (o >= this.size || n <= 0) return -1;
    const endBit = n > this.size - o ? this.bits.length : Math.floor((o + n - 1) / this.g) + 1;
    for (let b = Math.floor(o / this.g); b < endBit; b++) if (!this.bits[b]) return Math.max(o, b * this.g);
    return -1;
  }
}

type Op = { op: 'set' | 'reset' | 'nextDirty' | 'nextZero' | 'area' | 'areas' | 'get'; a: number; b: number };
const frac = fc.nat(0xffff).map((n) => n / 0x10000);
const opArb: fc.Arbitrary<Op> = fc.record({ op: fc.constantFrom('set' as const, 'set' as const, 'reset' as const, 'nextDirty' as const, 'nextZero' as const, 'area' as const, 'areas' as const, 'get' as const), a: frac, b: frac });

let wasmOps: BitmapOps = bitmapRef;
beforeAll(async () => {
  wasmOps = (await instantiateKernels()).bitmap;
});

describe('HBitmap', () => {

  for (const impl of ['wasm', 'reference'] as const) {
    it(`follows QEMU's semantics in bytes over the ${impl} kernel`, () => {
      const ops = impl === 'wasm' ? wasmOps : bitmapRef;
      fc.assert(
        fc.property(fc.integer({ min: 0, max: 40000 }), fc.integer({ min: 0, max: 12 }), fc.array(opArb, { minLength: 1, maxLength: 25 }), (size, gbits, seq) => {
          const g = 2 ** gbits;
          const hb = new HBitmap(size, g, ops);
          const m = new Model(size, g);
          try {
            for (const o of seq) {
              let x = Math.floor(o.a * (size + 1));
              let y = Math.floor(o.b * (size + 1));
              if (x > y) [x, y] = [y, x];
              switch (o.op) {
                case 'set':
                  hb.set(x, y - x);
                  m.set(x, y - x);
                  break;
                case 'reset': {
                  // Granule-aligned, or running to the end of the bitmap.
                  const s = Math.floor(x / g) * g;
                  const e = y === size ? size : Math.floor(y / g) * g;
                  if (e < s) break;
                  hb.reset(s, e - s);
                  m.reset(s, e - s);
                  break;
                }
                case 'nextDirty':
                  expect(hb.nextDirty(x, y - x)).toBe(m.nextDirty(x, y - x));
                  break;
                case 'nextZero':
                  expect(hb.nextZero(x, y - x)).toBe(m.nextZero(x, y - x));
                  break;
                case 'area': {
                  const max = 1 + Math.floor(o.a * 3 * g);
                  const s = m.nextDirty(x, y - x);
                  let want = null;
                  if (s >= 0) {
                    let e = s + Math.min(y - s, max);
                    const z = m.nextZero(s, e - s);
                    if (z >= 0) e = z;
                    want = { offset: s, bytes: e - s };
                  }
                  expect(hb.nextDirtyArea(x, y, max)).toEqual(want);
                  break;
                }
                case 'areas': {
                  const want: Array<{ offset: number; bytes: number }> = [];
                  for (let p = x; p < y; ) {
                    const a = hb.nextDirtyArea(p, y);
                    if (!a) break;
                    want.push(a);
                    p = a.offset + a.bytes;
                  }
                  expect(hb.dirtyAreas(x, y)).toEqual(want);
                  break;
                }
                case 'get':
                  if (x < size) expect(hb.get(x)).toBe(m.bits[Math.floor(x / g)]);
                  break;
              }
              expect(hb.count()).toBe(m.count());
            }
          } finally {
            hb.dispose();
          }
        }),
        { numRuns: 250 },
      );
    });
  }

  it('refuses unaligned resets and ranges outside the bitmap, like QEMU asserts', () => {
    const hb = new HBitmap(10000, 512);
    expect(() => hb.reset(100, 512)).toThrow(/aligned/);
    expect(() => hb.reset(0, 100)).toThrow(/aligned/);
    hb.reset(9728, 272); // the partial last granule may be reset to the end
    expect(() => hb.set(9000, 2000)).toThrow(/outside/);
    expect(() => new HBitmap(100, 3)).toThrow(/power of 2/);
  });

  it('merges bitmaps of the same and of different granularities', () => {
    const a = new HBitmap(1 << 20, 4096, wasmOps);
    const b = new HBitmap(1 << 20, 4096, wasmOps);
    const c = new HBitmap(1 << 20, 65536, wasmOps);
    b.set(10000, 20000);
    c.set(500000, 1);
    a.merge(b);
    a.merge(c);
    expect(a.dirtyAreas()).toEqual([
      { offset: 8192, bytes: 24576 },
      { offset: 458752, bytes: 65536 },
    ]);
    expect(() => a.merge(new HBitmap(1000, 512, wasmOps))).toThrow(/different sizes/);
  });

  it('round-trips through the qcow2 bitmap-table layout', () => {
    const clusterSize = 512;
    const src = new HBitmap(64 << 20, 512, wasmOps); // 131072 bits: 32 chunks of 4096 bits
    src.set(0, 4096 * 512); // chunk 0 all ones
    src.set(5 * 4096 * 512 + 1000, 3000); // chunk 5 mixed
    src.set((64 << 20) - 1, 1); // last chunk mixed
    const kinds = src.tableChunks(clusterSize);
    expect(kinds.length).toBe(32);
    expect(kinds[0]).toBe(CHUNK.ONES);
    expect(kinds[5]).toBe(CHUNK.DATA);
    expect(kinds[31]).toBe(CHUNK.DATA);
    expect([...kinds].filter((k) => k === CHUNK.ZERO).length).toBe(29);
    const dst = new HBitmap(64 << 20, 512, bitmapRef);
    const buf = new Uint8Array(clusterSize);
    kinds.forEach((kind, i) => {
      if (kind === CHUNK.ZERO) return;
      if (kind === CHUNK.ONES) return dst.deserializeChunk(i, clusterSize, 'ones');
      src.serializeChunk(i, clusterSize, buf);
      dst.deserializeChunk(i, clusterSize, buf);
    });
    expect(dst.dirtyAreas()).toEqual(src.dirtyAreas());
    expect(dst.count()).toBe(src.count());
  });
});

describe('HBitmap against QEMU', () => {
  let dir = '';
  beforeAll(() => {
    dir = mkdtempSync(join(tmpdir(), 'qblock-hbitmap-'));
  });
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  it('reads the persistent bitmap qemu-io dirtied from its qcow2 bitmap table', () => {
    const img = join(dir, 'b.qcow2');
    const run = (cmd: string, args: string[]): string => execFileSync(cmd, args, { encoding: 'utf8' });
    run('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', img, '256M']);
    run('qemu-img', ['bitmap', '--add', '-g', '16384', img, 'b0']);
    run('qemu-io', ['-c', 'write 1M 64k', '-c', 'write 100M 4k', '-c', 'write 255M 1M', img]);
    const file = readFileSync(img);
    const dv = new DataView(file.buffer, file.byteOffset, file.byteLength);
    // Header extensions start at header_length; the bitmaps one is 0x23852875.
    let off = dv.getUint32(100);
    let dirOffset = 0;
    let dirSize = 0;
    for (;;) {
      const type = dv.getUint32(off);
      const len = dv.getUint32(off + 4);
      if (type === 0) throw new Error('no bitmaps extension');
      if (type === 0x23852875) {
        dirSize = Number(dv.getBigUint64(off + 16));
        dirOffset = Number(dv.getBigUint64(off + 24));
        break;
      }
      off += 8 + Math.ceil(len / 8) * 8;
    }
    expect(dirSize).toBeGreaterThan(0);
    const tableOffset = Number(dv.getBigUint64(dirOffset));
    const tableSize = dv.getUint32(dirOffset + 8);
    const granularity = 2 ** dv.getUint8(dirOffset + 17);
    expect(granularity).toBe(16384);
    const hb = new HBitmap(256 << 20, granularity, wasmOps);
    expect(tableSize).toBe(hb.tableSize(4096));
    for (let i = 0; i < tableSize; i++) {
      const entry = dv.getBigUint64(tableOffset + 8 * i);
      const data = Number(entry & 0x00fffffffffffe00n);
      if (data !== 0) hb.deserializeChunk(i, 4096, file.subarray(data, data + 4096));
      else if (entry & 1n) hb.deserializeChunk(i, 4096, 'ones');
    }
    expect(hb.dirtyAreas()).toEqual([
      { offset: 1 << 20, bytes: 65536 },
      { offset: 100 << 20, bytes: 16384 },
      { offset: 255 << 20, bytes: 1 << 20 },
    ]);
    // And our serialisation of it is what QEMU wrote, cluster for cluster.
    const kinds = hb.tableChunks(4096);
    const buf = new Uint8Array(4096);
    for (let i = 0; i < tableSize; i++) {
      const data = Number(dv.getBigUint64(tableOffset + 8 * i) & 0x00fffffffffffe00n);
      expect(kinds[i] === CHUNK.ZERO).toBe(data === 0);
      if (data === 0) continue;
      hb.serializeChunk(i, 4096, buf);
      expect(Buffer.compare(Buffer.from(buf), file.subarray(data, data + 4096))).toBe(0);
    }
  });
});
