/**
 * The shared behaviour suite (src/core/conformance.ts) run against each
 * filter over the memory protocol: a filter must be invisible to a user who
 * does not configure it to do anything.
 */
import { describe, expect, it } from 'vitest';
import { BlockBackend } from '../core/block-backend.ts';
import { casesFor, type ConformanceGroup, type ConformanceTarget } from '../core/conformance.ts';
import { Graph } from '../core/graph.ts';
import { ThrottleGroupRegistry } from '../core/throttle-group.ts';
import type { BlockdevOptions } from '../core/types.ts';
import { rawDriver } from '../formats/raw.ts';
import { memoryDriver } from '../protocols/memory.ts';
import { filterDrivers } from './index.ts';

const MiB = 1 << 20;
const DATA_GROUPS: readonly ConformanceGroup[] = ['read-write', 'zero-init', 'write-zeroes', 'discard', 'flush', 'truncate', 'truncate-prealloc', 'range-checks'];

// Limits far above what the suite moves, on the real clock: throttling must not change results, only pace them.
const registry = new ThrottleGroupRegistry();
let groupSeq = 0;

function target(
  name: string,
  options: (group: string) => BlockdevOptions,
  extra: { discardZeroBlock?: number; alignment?: number } = {},
): ConformanceTarget {
  return {
    name,
    groups: DATA_GROUPS,
    ...extra,
    async open() {
      const group = `conf-${groupSeq++}`;
      registry.createGroup(group, { 'bps-total': 64 * 1024 * MiB, 'iops-total': 10_000_000 });
      const graph = new Graph({ drivers: [memoryDriver, rawDriver, ...filterDrivers({ throttleGroups: registry })] });
      const blk = await BlockBackend.open(graph, options(group));
      return {
        blk,
        async close() {
          await blk.close();
          await graph.closeAll();
          if (graph.nodes.size !== 0) throw new Error(`${name}: nodes left open after close`);
          registry.deleteGroup(group);
        },
      };
    },
  };
}

const memory = (extra: Record<string, unknown> = {}): BlockdevOptions => ({ driver: 'memory', size: MiB, ...extra });

const targets: ConformanceTarget[] = [
  target('blkdebug (no rules) over memory', () => ({ driver: 'blkdebug', discard: 'unmap', image: memory() }), { discardZeroBlock: 1 }),
  target('blkdebug align=4096 over memory', () => ({ driver: 'blkdebug', discard: 'unmap', align: 4096, image: memory() }), {
    discardZeroBlock: 4096,
    alignment: 4096,
  }),
  target(
    'blkdebug with rules that never fire, max-transfer=64k, over memory',
    () => ({
      driver: 'blkdebug',
      discard: 'unmap',
      'max-transfer': 65536,
      'inject-error': [{ event: 'l2_load', errno: 28 }],
      'set-state': [{ event: 'pwritev', state: 5, new_state: 6 }],
      image: memory(),
    }),
    { discardZeroBlock: 1 },
  ),
  target('copy-on-read over memory align=512', () => ({ driver: 'copy-on-read', discard: 'unmap', file: memory({ align: 512 }) }), {
    discardZeroBlock: 512,
    alignment: 512,
  }),
  target('copy-on-read over memory', () => ({ driver: 'copy-on-read', discard: 'unmap', file: memory() }), { discardZeroBlock: 1 }),
  target('copy-on-read over raw over memory', () => ({ driver: 'copy-on-read', discard: 'unmap', file: { driver: 'raw', file: memory() } }), {
    discardZeroBlock: 1,
  }),
  target('throttle (generous limits) over memory', (g) => ({ driver: 'throttle', discard: 'unmap', 'throttle-group': g, file: memory() }), {
    discardZeroBlock: 1,
  }),
  target('raw over throttle over blkdebug over memory', (g) => ({
    driver: 'raw',
    discard: 'unmap',
    file: { driver: 'throttle', 'throttle-group': g, file: { driver: 'blkdebug', image: memory() } },
  }), { discardZeroBlock: 1 }),
];

for (const t of targets) {
  describe(`conformance: ${t.name}`, () => {
    const cases = casesFor(t);
    it('has cases to run', () => {
      expect(cases.length).toBeGreaterThan(0);
    });
    for (const c of cases) {
      it(`[${c.group}] ${c.name}`, async () => {
        await c.run(t);
      });
    }
  });
}
