// Peak memory opening a 16 TiB virtual qcow2 image and reading across it:
// qblock in a child Node process (so nothing else shares its heap), against
// qemu-io doing the same reads on the same image, both as growth over the
// same tool idling on a tiny image. The image has data scattered over the
// whole disk, so reads load L2 slices from everywhere.

import { spawnSync } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { MemoryChildResult } from '../child/memory-16t.ts';
import { fmt, type Row } from '../lib/harness.ts';
import { QEMU_IMG, QEMU_IO, requireQemu, run, scratchDir } from '../lib/images.ts';

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..');
const CHILD = join(ROOT, 'bench', 'child', 'memory-16t.ts');
const MiB = 2 ** 20;

/** Options of the memory suite. */
export interface MemoryBenchOptions {
  quick?: boolean;
}

/** Runs the child on `image` with the offsets written to `offsetsFile`. */
function runChild(image: string, offsetsFile: string): MemoryChildResult {
  const r = spawnSync(process.execPath, ['--expose-gc', '--import', 'tsx', CHILD, image, offsetsFile], { cwd: ROOT, encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`memory child failed: ${r.stderr}`);
  return JSON.parse(r.stdout.trim().split('\n').pop()!) as MemoryChildResult;
}

/** Peak resident set of qemu-io running `cmds` on `image`, in bytes (GNU time's %M). */
function qemuIoPeak(image: string, cmds: string[]): number {
  const r = spawnSync('/usr/bin/time', ['-f', '%M', QEMU_IO, '-r', '-f', 'qcow2', ...cmds.flatMap((c) => ['-c', c]), image], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`qemu-io failed: ${r.stderr}`);
  const kib = Number(r.stderr.trim().split('\n').pop());
  return kib * 1024;
}

/** The memory rows. */
export async function memoryRows(opts: MemoryBenchOptions = {}): Promise<Row[]> {
  requireQemu();
  const G = 'memory';
  const { dir, cleanup } = scratchDir('qblock-bench-mem-');
  try {
    const TiB = 2 ** 40;
    const big = join(dir, 'big.qcow2');
    run(QEMU_IMG, ['create', '-q', '-f', 'qcow2', big, '16T']);
    // Data every 16 GiB (1024 places): each lands in its own L2 table.
    const places = opts.quick ? 128 : 1024;
    const stride = (16 * TiB) / places;
    const writes: string[] = [];
    for (let i = 0; i < places; i++) writes.push(`write -q -P ${(i % 255) + 1} ${i * stride + 65536 * (i % 7)} 64k`);
    for (let i = 0; i < writes.length; i += 256) run(QEMU_IO, ['-f', 'qcow2', ...writes.slice(i, i + 256).flatMap((c) => ['-c', c]), big]);
    // Reads: every allocated place, and 8 offsets between each pair of them (mostly unallocated).
    const offsets: number[] = [];
    for (let i = 0; i < places; i++) {
      offsets.push(i * stride + 65536 * (i % 7));
      for (let j = 1; j <= 8; j++) offsets.push(Math.floor((i * stride + (j * stride) / 9) / 4096) * 4096);
    }
    const offFile = join(dir, 'offsets.txt');
    writeFileSync(offFile, offsets.join('\n'));
    const tiny = join(dir, 'tiny.qcow2');
    run(QEMU_IMG, ['create', '-q', '-f', 'qcow2', tiny, '64M']);
    const tinyOff = join(dir, 'tiny-offsets.txt');
    writeFileSync(tinyOff, '0\n');

    const ours = runChild(big, offFile);
    const oursIdle = runChild(tiny, tinyOff);
    const oursGrowth = ours.rssPeak - ours.rssBefore;
    const oursIdleGrowth = oursIdle.rssPeak - oursIdle.rssBefore;
    const reads = offsets.map((o) => `read -q ${o} 4k`);
    const theirs = qemuIoPeak(big, reads);
    const theirsIdle = qemuIoPeak(tiny, ['read -q 0 4k']);
    const theirsGrowth = Math.max(theirs - theirsIdle, 1);
    const row: Row = {
      group: G,
      name: `open a 16 TiB image, ${offsets.length} reads across it (${places} L2 tables)`,
      ours: { label: 'qblock (RSS growth)', value: oursGrowth / MiB, unit: 'MiB' },
      baseline: { label: 'qemu-io (RSS growth)', value: theirsGrowth / MiB, unit: 'MiB' },
      ratio: theirsGrowth / Math.max(oursGrowth, 1),
      target: '< 40 MiB',
      met: oursGrowth < 40 * MiB,
      note: `ours: heap +${fmt((ours.heapPeak - ours.heapBefore) / MiB)} MiB, wasm memory ${fmt(ours.wasmBytes / MiB)} MiB, tiny-image open +${fmt(oursIdleGrowth / MiB)} MiB; ratio = qemu-io growth / ours`,
    };
    return [row];
  } finally {
    cleanup();
  }
}
