// Test images for the Node benchmarks, made with Debian's qemu-img and
// qemu-io so the inputs are QEMU's own: raw data files (random, or text-like
// so it compresses about 3:1), qcow2 conversions of them, and the mixed image
// the qemu-img comparisons run on (allocated, zero, compressed, unallocated).

import { execFileSync } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import { closeSync, existsSync, mkdtempSync, openSync, rmSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

export const QEMU_IMG = '/usr/bin/qemu-img';
export const QEMU_IO = '/usr/bin/qemu-io';

/** Throws when QEMU's tools are missing, telling how to get them. */
export function requireQemu(): void {
  for (const p of [QEMU_IMG, QEMU_IO]) {
    if (!existsSync(p)) throw new Error(`${p} is missing: install qemu-utils (npm test's setup does)`);
  }
}

/** Runs a command and returns its stdout; throws with its stderr on failure. */
export function run(cmd: string, args: string[]): string {
  return execFileSync(cmd, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'], maxBuffer: 1 << 30 });
}

/**
 * A scratch directory removed by the returned cleanup function; with `inMemory`, on
 * /dev/shm when there is one, so the guest's disk writeback (which on this kind
 * of VM swings a gigabyte's write by seconds) does not decide a comparison.
 */
export function scratchDir(prefix: string, inMemory = false): { dir: string; cleanup: () => void } {
  const base = inMemory && existsSync('/dev/shm') ? '/dev/shm' : tmpdir();
  const dir = mkdtempSync(join(base, prefix));
  return { dir, cleanup: () => rmSync(dir, { recursive: true, force: true }) };
}

const WORDS = 'the block layer maps guest ranges to host clusters through l1 and l2 tables while refcount blocks count references to every cluster of the image file and a dirty bitmap tracks writes'.split(' ');

/** Fills `buf` with space-separated words drawn by a xorshift PRNG: compresses roughly 3:1 with deflate. */
export function fillText(buf: Uint8Array, seed: number): void {
  let x = seed | 0 || 1;
  let i = 0;
  while (i < buf.length) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    const w = WORDS[(x >>> 0) % WORDS.length]!;
    for (let j = 0; j < w.length && i < buf.length; j++) buf[i++] = w.charCodeAt(j);
    if (i < buf.length) buf[i++] = (x & 7) === 0 ? 10 : 32;
  }
}

/** Writes `size` bytes at `offset` of the file at `path` (creating it), 16 MiB at a time, random or text-like. */
export function writeData(path: string, offset: number, size: number, kind: 'random' | 'text', seed = 1): void {
  const fd = openSync(path, existsSync(path) ? 'r+' : 'w');
  try {
    const chunk = new Uint8Array(Math.min(size, 16 << 20));
    for (let done = 0; done < size; done += chunk.length) {
      const n = Math.min(chunk.length, size - done);
      const part = chunk.subarray(0, n);
      if (kind === 'random') randomFillSync(part);
      else fillText(part, seed + done);
      writeSync(fd, part, 0, n, offset + done);
    }
  } finally {
    closeSync(fd);
  }
}

/** Layout of the mixed image, in MiB from the start of the disk. */
export interface MixedLayout {
  virtualMiB: number;
  randomMiB: number;
  zeroMiB: number;
  compressedMiB: number;
  textMiB: number;
}

/** The default mixed layout: 2 GiB virtual, 1.25 GiB of it touched. */
export const MIXED: MixedLayout = { virtualMiB: 2048, randomMiB: 640, zeroMiB: 256, compressedMiB: 256, textMiB: 128 };

/**
 * Makes the mixed qcow2 image (64 KiB clusters): random data, then zero
 * clusters (write -z), then compressed text clusters (write -c), then
 * uncompressed text, the rest unallocated. Returns its path.
 */
export function makeMixedImage(dir: string, layout: MixedLayout = MIXED): string {
  const M = 1 << 20;
  const src = join(dir, 'mixed-src.raw');
  run(QEMU_IMG, ['create', '-q', '-f', 'raw', src, `${layout.virtualMiB}M`]);
  writeData(src, 0, layout.randomMiB * M, 'random');
  const textStart = layout.randomMiB + layout.zeroMiB + layout.compressedMiB;
  writeData(src, textStart * M, layout.textMiB * M, 'text', 99);
  const img = join(dir, 'mixed.qcow2');
  run(QEMU_IMG, ['convert', '-O', 'qcow2', '-o', 'cluster_size=65536', src, img]);
  rmSync(src);
  // Compressed writes go to unallocated clusters only, 1 MiB per command from a text pattern file.
  const pattern = join(dir, 'pattern.txt');
  writeData(pattern, 0, M, 'text', 7);
  const cmds = [`write -q -z ${layout.randomMiB}M ${layout.zeroMiB}M`];
  for (let i = 0; i < layout.compressedMiB; i++) cmds.push(`write -q -c -s ${pattern} ${layout.randomMiB + layout.zeroMiB + i}M 1M`);
  // qemu-io takes its commands as arguments; keep each invocation's list modest.
  for (let i = 0; i < cmds.length; i += 64) {
    run(QEMU_IO, ['-f', 'qcow2', ...cmds.slice(i, i + 64).flatMap((c) => ['-c', c]), img]);
  }
  rmSync(pattern);
  return img;
}
