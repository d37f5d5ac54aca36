/**
 * The long qcow2 fuzz run: `npx tsx scripts/fuzz-qcow2.ts [--cases N] [--seed S] [--only NAME] [--verbose]`.
 * Mutates QEMU-made seed images (see src/formats/qcow2/fuzz.ts) and requires
 * every case to work consistently or fail with a BlockError within the time
 * bound. Prints failing cases with their seeds so they replay with --seed;
 * exits non-zero when any case misbehaved.
 */
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fuzzCase, seedImages } from '../src/formats/qcow2/fuzz.ts';
import { requireQemu } from '../src/formats/qcow2/testing.ts';

function arg(name: string, fallback: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 && process.argv[i + 1] !== undefined ? process.argv[i + 1]! : fallback;
}

async function main(): Promise<void> {
  requireQemu();
  const cases = Number(arg('cases', '2000'));
  const first = Number(arg('seed', String(Date.now() % 1_000_000)));
  const only = arg('only', '');
  const verbose = process.argv.includes('--verbose');
  const dir = mkdtempSync(join(tmpdir(), 'qblock-fuzz-'));
  let bad = 0;
  try {
    const seeds = [...seedImages(dir, (n) => new Uint8Array(readFileSync(join(dir, n))))].filter(([n]) => !only || n === only);
    const t0 = Date.now();
    for (let i = 0; i < cases; i++) {
      const [name, bytes] = seeds[i % seeds.length]!;
      const seed = first + i;
      if (verbose) process.stdout.write(`${name} seed ${seed} ... `);
      const out = await fuzzCase(bytes, seed, join(dir, 'case.qcow2'));
      if (verbose) console.log(`${out.what}: ${out.problem ? 'PROBLEM' : out.errors.length ? out.errors[0] : 'ok'}`);
      if (out.problem) {
        bad++;
        console.log(`FAIL ${name} --seed ${seed} (${out.what}): ${out.problem}`);
      }
      if (!verbose && (i + 1) % 100 === 0) {
        const m = process.memoryUsage();
        console.log(`${i + 1}/${cases} cases, ${bad} failing, ${Math.round((Date.now() - t0) / 1000)} s, heap ${Math.round((m.heapUsed + m.arrayBuffers) / 1048576)} MiB`);
      }
    }
    console.log(`${cases - bad} passed, ${bad} failed`);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
  process.exitCode = bad > 0 ? 1 : 0;
}

await main();
