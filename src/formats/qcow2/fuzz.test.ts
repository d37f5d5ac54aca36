/**
 * A bounded fuzz run (the long one is scripts/fuzz-qcow2.ts): mutated
 * headers, extensions, L1/L2 entries, refcount tables and blocks and
 * snapshot tables of valid images must read consistently or fail with a
 * BlockError, each within CASE_TIMEOUT_MS, without unbounded memory.
 */
import { readFileSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { fuzzCase } from './fuzz.ts';
import { seedImages } from './fuzz.ts';
import { requireQemu, scratchDir } from './testing.ts';

const tmp = scratchDir();
let seeds: Map<string, Uint8Array>;
beforeAll(() => {
  requireQemu();
  seeds = seedImages(tmp.dir, (n) => new Uint8Array(readFileSync(tmp.path(n))));
});
afterAll(() => tmp.cleanup());

/** Cases per seed image in the bounded run. */
const CASES = 40;
/** Memory (heap plus array buffers) a run may add over its start. */
const MEMORY_BOUND = 768 * 1024 * 1024;

describe('fuzzed images', () => {
  it(`${CASES} cases per seed image fail cleanly or read consistently, in bounded time and memory`, async () => {
    const problems: string[] = [];
    const mem = (): number => {
      const m = process.memoryUsage();
      return m.heapUsed + m.arrayBuffers;
    };
    const start = mem();
    let peak = start;
    let cases = 0;
    let failedCleanly = 0;
    let i = 0;
    for (const [name, bytes] of seeds) {
      for (let k = 0; k < CASES; k++, i++) {
        const seed = 1000 + i;
        const out = await fuzzCase(bytes, seed, tmp.path(`fuzz-${i}.qcow2`));
        cases++;
        if (out.errors.length) failedCleanly++;
        if (out.problem) problems.push(`${name} seed ${seed} (${out.what}): ${out.problem}`);
        peak = Math.max(peak, mem());
      }
    }
    console.log(`fuzz: ${cases} cases, ${failedCleanly} with clean errors, peak memory +${Math.round((peak - start) / 1048576)} MiB`);
    expect(problems.slice(0, 3)).toEqual([]);
    expect(peak - start).toBeLessThan(MEMORY_BOUND);
  }, 300_000);
});
