// The engine must run the wasm kernels, not silently fall back to the JS
// references: opening an image loads and installs them, and reads go
// through them (shown by counting calls into the module).
import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { BlockBackend } from '../core/block-backend.ts';
import { HBitmap } from '../core/hbitmap.ts';
import { firstNonZeroByte, isZeroBuffer } from '../core/zero.ts';
import { qcow2Kernels } from '../formats/qcow2/kernels.ts';
import { createNodeGraph } from '../node.ts';
import { kernels, usingWasm, type QblockExports } from './index.ts';

type ExportName = 'l2Scan' | 'isZero' | 'firstNonZero' | 'hbSet' | 'rcFindZero' | 'rcFindNonZero';

/** Wraps the named exports of the loaded module with call counters; returns the counts and a restore function. */
function countCalls(names: ExportName[]): { counts: Record<string, number>; restore: () => void } {
  const ex = kernels().host!.exports as { -readonly [K in keyof QblockExports]: QblockExports[K] };
  const counts: Record<string, number> = {};
  const saved = new Map<ExportName, unknown>();
  for (const n of names) {
    const orig = ex[n] as (...a: number[]) => number;
    saved.set(n, orig);
    counts[n] = 0;
    (ex as Record<string, unknown>)[n] = (...a: number[]) => {
      counts[n]!++;
      return orig(...a);
    };
  }
  return { counts, restore: () => saved.forEach((f, n) => ((ex as Record<string, unknown>)[n] = f)) };
}

describe('engine kernels', () => {
  let dir = '';
  beforeAll(() => {
    dir = mkdtempSync(join(tmpdir(), 'qblock-engine-kernels-'));
  });
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  it('opening an image installs the wasm kernels and reads run through them', async () => {
    const img = join(dir, 'a.qcow2');
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', img, '64M']);
    execFileSync('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x5a 1M 192k', '-c', 'write -z 4M 64k', img]);
    const graph = createNodeGraph();
    const blk = await BlockBackend.open(graph, img, { readOnly: true });
    try {
      // Loaded by the open itself, and installed where the driver looks.
      expect(usingWasm()).toBe(true);
      const k = kernels();
      expect(k.host!.shared).toBe(true);
      expect(qcow2Kernels().l2).toBe(k.l2);
      expect(qcow2Kernels().refcount).toBe(k.refcount);

      const { counts, restore } = countCalls(['l2Scan', 'isZero', 'firstNonZero', 'hbSet']);
      try {
        const data = await blk.read(1 << 20, 192 * 1024);
        expect(data.every((b) => b === 0x5a)).toBe(true);
        expect((await blk.read(4 << 20, 65536)).every((b) => b === 0)).toBe(true);
        expect(counts.l2Scan).toBeGreaterThan(0);
        expect(isZeroBuffer(new Uint8Array(4096))).toBe(true);
        expect(counts.isZero).toBeGreaterThan(0);
        expect(firstNonZeroByte(new Uint8Array(8192).fill(1, 5000))).toBe(5000);
        expect(counts.firstNonZero).toBeGreaterThan(0);
        new HBitmap(1 << 20, 512).set(0, 4096);
        expect(counts.hbSet).toBe(1);
      } finally {
        restore();
      }
      // The L2 slices the read loaded live in linear memory (the pool), so the kernel read them in place.
      expect(k.pool!.stats().inMemory).toBeGreaterThan(0);
    } finally {
      await blk.close();
    }
  });

  it('allocating writes search refcount blocks with the wasm kernel', async () => {
    const img = join(dir, 'w.qcow2');
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', img, '64M']);
    const blk = await BlockBackend.open(createNodeGraph(), img);
    try {
      const { counts, restore } = countCalls(['rcFindZero', 'rcFindNonZero']);
      try {
        await blk.pwrite(8 << 20, new Uint8Array(65536).fill(7));
        await blk.flush();
      } finally {
        restore();
      }
      expect(counts.rcFindZero! + counts.rcFindNonZero!).toBeGreaterThan(0);
      expect((await blk.read(8 << 20, 65536)).every((b) => b === 7)).toBe(true);
    } finally {
      await blk.close();
    }
    execFileSync('qemu-img', ['check', '-q', img]);
  });
});
