// qblock-img against Debian's qemu-img on the same files: convert (to raw
// and to qcow2), check, map, compare and bench, each timed end to end as a
// process (what a user waits for), the round with the median ratio of interleaved runs. The process
// startup of each tool is measured too, so the table can say how much of a
// difference is start-up and how much is work. Outputs are checked against
// QEMU's before any time counts.

import { spawnSync } from 'node:child_process';
import { existsSync, rmSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { qblockImg } from '../../src/cli/qblock-img.ts';
import { BufferedIO } from '../../src/cli/runtime.ts';
import { setFileSyncIo } from '../../src/protocols/file.ts';
import { fmt, median, now, timeRow, unavailableRow, type Row } from '../lib/harness.ts';
import { makeMixedImage, MIXED, QEMU_IMG, requireQemu, scratchDir, type MixedLayout } from '../lib/images.ts';

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..');
const QBLOCK_IMG = join(ROOT, 'bin', 'qblock-img');

/** Options of the qemu-img suite. */
export interface QemuImgBenchOptions {
  quick?: boolean;
}

interface RunResult {
  status: number;
  stdout: string;
  stderr: string;
  seconds: number;
}

/** Runs a tool and times it from spawn to exit. */
function runTool(tool: 'qemu-img' | 'qblock-img', args: string[]): RunResult {
  const [cmd, argv] = tool === 'qemu-img' ? [QEMU_IMG, args] : [process.execPath, [QBLOCK_IMG, ...args]];
  const t = now();
  const r = spawnSync(cmd, argv, { encoding: 'utf8', maxBuffer: 1 << 28 });
  const seconds = (now() - t) / 1000;
  return { status: r.status ?? -1, stdout: r.stdout ?? '', stderr: r.stderr ?? '', seconds };
}

/** Runs qblock-img inside this process (modules loaded, JIT warm) with the launcher's synchronous file I/O: the work without the start-up. */
async function runInProcess(args: string[]): Promise<RunResult> {
  const io = new BufferedIO();
  setFileSyncIo(true);
  try {
    const t = now();
    const status = await qblockImg(args, io);
    return { status, stdout: io.out, stderr: io.err, seconds: (now() - t) / 1000 };
  } finally {
    setFileSyncIo(false);
  }
}

/** True when qblock-img answers this subcommand instead of reporting it unknown. */
function hasCommand(cmd: string): boolean {
  const r = runTool('qblock-img', [cmd, '--help']);
  return !/Command not found/.test(r.stderr);
}

/** One timed comparison: `prepare` runs before each timed run (outside the timing), `check` validates both tools' results once. */
interface Case {
  name: string;
  args: string[];
  prepare?: () => void;
  check?: (ours: RunResult, theirs: RunResult) => string | null;
  target?: number;
}

/** Rows for the qblock-img vs qemu-img comparisons. */
export async function qemuImgRows(opts: QemuImgBenchOptions = {}): Promise<Row[]> {
  requireQemu();
  const G = 'qblock-img vs qemu-img';
  const rows: Row[] = [];
  if (!existsSync(QBLOCK_IMG)) return [unavailableRow(G, 'all commands', 'not available yet: bin/qblock-img')];
  // Both tools write gigabytes here: in memory, so the ratio is the tools' work, not the VM's disk.
  const { dir, cleanup } = scratchDir('qblock-bench-img-', true);
  try {
    const layout: MixedLayout = opts.quick ? { virtualMiB: 1024, randomMiB: 64, zeroMiB: 32, compressedMiB: 32, textMiB: 32 } : MIXED;
    const img = makeMixedImage(dir, layout);
    const outRaw = join(dir, 'out.raw');
    const outQcow2 = join(dir, 'out.qcow2');
    const refRaw = join(dir, 'ref.raw');
    const rm = (...ps: string[]) => () => ps.forEach((p) => rmSync(p, { force: true }));
    // A reference conversion for compare to read.
    if (runTool('qemu-img', ['convert', '-O', 'raw', img, refRaw]).status !== 0) throw new Error('qemu-img convert failed');
    const same = (a: RunResult, b: RunResult): string | null => (a.status === b.status && a.stdout === b.stdout ? null : `outputs differ: qblock-img exit ${a.status} "${a.stdout.slice(0, 200)}${a.stderr.slice(0, 200)}" vs qemu-img exit ${b.status} "${b.stdout.slice(0, 200)}"`);
    const identicalTo = (path: string) => (): string | null => {
      const r = runTool('qemu-img', ['compare', '-q', img, path]);
      return r.status === 0 ? null : `converted image differs from the source (qemu-img compare exit ${r.status})`;
    };
    const rounds = opts.quick ? 1 : 3;
    const benchCount = opts.quick ? '20000' : '200000';
    const cases: Case[] = [
      { name: 'convert -O raw', args: ['convert', '-O', 'raw', img, outRaw], prepare: rm(outRaw), check: identicalTo(outRaw), target: 1 },
      { name: 'convert -O qcow2', args: ['convert', '-O', 'qcow2', img, outQcow2], prepare: rm(outQcow2), check: identicalTo(outQcow2), target: 1 },
      { name: 'check', args: ['check', img], check: same, target: 1 },
      { name: 'map --output=json', args: ['map', '--output=json', img], check: same },
      { name: 'compare (qcow2 vs its raw conversion)', args: ['compare', img, refRaw], check: same },
      // 4 KiB reads at queue depth 1 over the allocated region, wrapping at its end.
      { name: `bench -c ${benchCount} -d 1 -s 4k (allocated data)`, args: ['bench', '-c', benchCount, '-d', '1', '-s', '4096', '-S', '4096', '-o', '0', img], check: (a) => (a.status === 0 ? null : `qblock-img bench failed: ${a.stderr}`) },
      { name: `bench -c ${benchCount} -d 16 -s 64k`, args: ['bench', '-c', benchCount, '-d', '16', '-s', '65536', img], check: (a) => (a.status === 0 ? null : `qblock-img bench failed: ${a.stderr}`) },
    ];

    // Start-up alone, to separate it from work in the rows below.
    const startOurs = median([0, 1, 2].map(() => runTool('qblock-img', ['--version']).seconds));
    const startTheirs = median([0, 1, 2].map(() => runTool('qemu-img', ['--version']).seconds));
    rows.push(timeRow(G, 'process start-up (--version)', { label: 'qblock-img', value: startOurs, unit: 's' }, { label: 'qemu-img', value: startTheirs, unit: 's' }, undefined, 'Node loading the bundled CLI (build/cli/cli.cjs) with its code cache'));

    for (const c of cases) {
      const cmd = c.args[0]!;
      if (!hasCommand(cmd)) {
        rows.push(unavailableRow(G, c.name, `not available yet: qblock-img ${cmd}`, c.target ? `≥ ${c.target}×` : undefined));
        continue;
      }
      c.prepare?.();
      const theirs = runTool('qemu-img', c.args);
      c.prepare?.();
      const ours = runTool('qblock-img', c.args);
      const problem = c.check?.(ours, theirs) ?? null;
      if (problem) {
        rows.push(unavailableRow(G, c.name, `qblock-img result rejected: ${problem}`, c.target ? `≥ ${c.target}×` : undefined));
        continue;
      }
      const a: number[] = [];
      const b: number[] = [];
      for (let i = 0; i < rounds; i++) {
        for (const who of i % 2 ? (['qemu-img', 'qblock-img'] as const) : (['qblock-img', 'qemu-img'] as const)) {
          c.prepare?.();
          const r = runTool(who, c.args);
          (who === 'qblock-img' ? a : b).push(r.seconds);
        }
      }
      // The round with the median paired ratio (see interleave in the harness).
      const order = a.map((_, i) => i).sort((x, y) => b[x]! / a[x]! - b[y]! / a[y]!);
      const mid = order[(order.length - 1) >> 1]!;
      const oursS = a[mid]!;
      const theirsS = b[mid]!;
      // The same command inside this process, after one warm-up run: what start-up hides.
      c.prepare?.();
      await runInProcess(c.args);
      const inProc: number[] = [];
      for (let i = 0; i < rounds; i++) {
        c.prepare?.();
        inProc.push((await runInProcess(c.args)).seconds);
      }
      const warm = median(inProc);
      rows.push(
        timeRow(G, c.name, { label: 'qblock-img', value: oursS, unit: 's' }, { label: 'qemu-img', value: theirsS, unit: 's' }, c.target, `in-process (warm): ${fmt(warm)} s = ${fmt(theirsS / warm)}×`),
      );
      c.prepare?.();
    }
    return rows;
  } finally {
    cleanup();
  }
}
