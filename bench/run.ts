// `npm run bench`: the Node benchmark suite. Prints one table and writes it
// as JSON (build/bench/node.json unless --out). Every figure is a ratio
// against a baseline measured in this run. Never part of `npm test`.
//
//   npm run bench                       every suite
//   npm run bench -- --only=kernels,qcow2   some suites (kernels, qcow2, qemu-img, memory)
//   npm run bench -- --quick            fewer rounds and smaller images (a smoke run)

import { mkdirSync, writeFileSync } from 'node:fs';
import { cpus, loadavg, totalmem } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { loadKernels, referenceKernels } from '../src/kernels/index.ts';
import { setCpuClock, table, type Report, type Row } from './lib/harness.ts';
import { kernelRows } from './suites/kernels.ts';
import { memoryRows } from './suites/memory.ts';
import { qcow2VsRawRows } from './suites/qcow2-raw.ts';
import { qemuImgRows } from './suites/qemu-img.ts';

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const SUITES = ['kernels', 'qcow2', 'qemu-img', 'memory'] as const;
type Suite = (typeof SUITES)[number];

/** Parses --only, --quick and --out. */
function parseArgs(argv: string[]): { only: Set<Suite>; quick: boolean; out: string } {
  let only = new Set<Suite>(SUITES);
  let quick = false;
  let out = join(ROOT, 'build', 'bench', 'node.json');
  for (const a of argv) {
    if (a === '--quick') quick = true;
    else if (a.startsWith('--only=')) {
      const names = a.slice(7).split(',');
      for (const n of names) if (!(SUITES as readonly string[]).includes(n)) throw new Error(`unknown suite ${n}; known: ${SUITES.join(', ')}`);
      only = new Set(names as Suite[]);
    } else if (a.startsWith('--out=')) out = resolve(a.slice(6));
    else throw new Error(`unknown argument ${a}`);
  }
  return { only, quick, out };
}

/** Runs the selected suites and reports. */
async function main(): Promise<void> {
  const { only, quick, out } = parseArgs(process.argv.slice(2));
  const startedAt = new Date().toISOString();
  // Kernels are timed on process CPU time (user + system, in ms): see setCpuClock.
  setCpuClock(() => {
    const u = process.cpuUsage();
    return (u.user + u.system) / 1000;
  });
  const k = await loadKernels();
  if (!k.wasm) throw new Error('the wasm kernels did not load (no SIMD?): nothing to compare');
  const rows: Row[] = [];
  const step = async (name: Suite, fn: () => Promise<Row[]>): Promise<void> => {
    if (!only.has(name)) return;
    process.stderr.write(`[bench] ${name}…\n`);
    const t = performance.now();
    rows.push(...(await fn()));
    process.stderr.write(`[bench] ${name} done in ${((performance.now() - t) / 1000).toFixed(1)} s\n`);
  };
  await step('kernels', () => kernelRows(k, referenceKernels, quick ? { rounds: 1, minMs: 50 } : {}));
  await step('qcow2', () => qcow2VsRawRows({ quick }));
  await step('qemu-img', () => qemuImgRows({ quick }));
  await step('memory', () => memoryRows({ quick }));
  const report: Report = {
    runner: 'node',
    startedAt,
    environment: { node: process.version, cpus: cpus().length, cpu: cpus()[0]?.model ?? '', memoryGiB: Math.round(totalmem() / 2 ** 30), loadAverage1m: Math.round(loadavg()[0]! * 10) / 10, quick },
    rows,
  };
  process.stdout.write(`${table(rows)}\n`);
  mkdirSync(dirname(out), { recursive: true });
  writeFileSync(out, `${JSON.stringify(report, null, 2)}\n`);
  process.stderr.write(`[bench] wrote ${out}\n`);
}

await main();
