// Child process of the memory benchmark: opens a 16 TiB qcow2 image, reads
// 4 KiB at the offsets given on the command line (one per line in a file),
// and prints the process's memory before opening and at its peak while
// reading, as one JSON line. Run with --expose-gc so the "before" figure is
// taken after a collection.
//
//   node --expose-gc --import tsx bench/child/memory-16t.ts IMAGE OFFSETS_FILE

import { readFileSync } from 'node:fs';
import { BlockBackend } from '../../src/core/block-backend.ts';
import { loadKernels } from '../../src/kernels/index.ts';
import { createNodeGraph } from '../../src/node.ts';

/** What the parent reads back. */
export interface MemoryChildResult {
  rssBefore: number;
  rssPeak: number;
  heapBefore: number;
  heapPeak: number;
  externalPeak: number;
  wasmBytes: number;
  reads: number;
  seconds: number;
}

const gc = (globalThis as { gc?: () => void }).gc;

async function main(): Promise<void> {
  const [image, offsetsFile] = process.argv.slice(2);
  if (!image || !offsetsFile) throw new Error('usage: memory-16t.ts IMAGE OFFSETS_FILE');
  const offsets = readFileSync(offsetsFile, 'utf8').trim().split('\n').map(Number);
  const k = await loadKernels();
  gc?.();
  const before = process.memoryUsage();
  let rssPeak = before.rss;
  let heapPeak = before.heapUsed;
  let externalPeak = before.external + before.arrayBuffers;
  const sample = (): void => {
    const m = process.memoryUsage();
    rssPeak = Math.max(rssPeak, m.rss);
    heapPeak = Math.max(heapPeak, m.heapUsed);
    externalPeak = Math.max(externalPeak, m.external + m.arrayBuffers);
  };
  const t = performance.now();
  const blk = await BlockBackend.open(createNodeGraph(), image, { readOnly: true });
  const buf = new Uint8Array(4096);
  let n = 0;
  for (const off of offsets) {
    await blk.pread(off, buf);
    if (++n % 128 === 0) sample();
  }
  sample();
  const seconds = (performance.now() - t) / 1000;
  await blk.close();
  const r: MemoryChildResult = {
    rssBefore: before.rss,
    rssPeak,
    heapBefore: before.heapUsed,
    heapPeak,
    externalPeak,
    wasmBytes: k.host?.memoryBytes() ?? 0,
    reads: n,
    seconds,
  };
  process.stdout.write(`${JSON.stringify(r)}\n`);
}

await main();
