import { promises as fsp } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { BlockBackend } from './block-backend.ts';
import { casesFor, CONFORMANCE_GROUPS, type ConformanceGroup, type ConformanceTarget } from './conformance.ts';
import { Graph } from './graph.ts';
import type { BlockdevOptions } from './types.ts';
import { nodeDrivers } from '../drivers-node.ts';

const MiB = 1 << 20;
let dir = '';
let seq = 0;

beforeAll(async () => {
  dir = await fsp.mkdtemp(join(tmpdir(), 'qblock-conf-'));
});
afterAll(async () => {
  if (dir) await fsp.rm(dir, { recursive: true, force: true });
});

/** Groups every data-keeping, resizable target supports. */
const DATA_GROUPS: readonly ConformanceGroup[] = ['read-write', 'zero-init', 'write-zeroes', 'discard', 'flush', 'truncate', 'truncate-prealloc', 'range-checks'];

/** A target that opens `options()` in a fresh graph and runs `cleanup` after closing. */
function target(
  name: string,
  groups: readonly ConformanceGroup[],
  options: () => Promise<BlockdevOptions>,
  extra: { discardZeroBlock?: number; alignment?: number; cleanup?: (o: BlockdevOptions) => Promise<void> } = {},
): ConformanceTarget {
  return {
    name,
    groups,
    ...(extra.discardZeroBlock !== undefined ? { discardZeroBlock: extra.discardZeroBlock } : {}),
    ...(extra.alignment !== undefined ? { alignment: extra.alignment } : {}),
    async open() {
      const graph = new Graph({ drivers: nodeDrivers() });
      const opts = await options();
      const blk = await BlockBackend.open(graph, opts);
      return {
        blk,
        async close() {
          await blk.close();
          await graph.closeAll();
          check(graph.nodes.size === 0, `${name}: nodes left open after close`);
          await extra.cleanup?.(opts);
        },
      };
    },
  };
}

function check(cond: boolean, msg: string): void {
  if (!cond) throw new Error(msg);
}

/** A fresh empty file of `size` bytes in the test directory. */
async function tmpFile(size: number): Promise<string> {
  const path = join(dir, `img-${seq++}.raw`);
  await fsp.writeFile(path, new Uint8Array(0));
  await fsp.truncate(path, size);
  return path;
}

async function removeFile(o: BlockdevOptions): Promise<void> {
  const f = (typeof o.file === 'object' ? o.file.filename : o.filename) as string;
  await fsp.rm(f, { force: true });
}

const targets: ConformanceTarget[] = [
  target('memory', DATA_GROUPS, async () => ({ driver: 'memory', size: MiB, discard: 'unmap' }), { discardZeroBlock: 1 }),
  target('memory align=4096', DATA_GROUPS, async () => ({ driver: 'memory', size: MiB, align: 4096, discard: 'unmap' }), {
    discardZeroBlock: 4096,
    alignment: 4096,
  }),
  target('file', DATA_GROUPS, async () => ({ driver: 'file', filename: await tmpFile(MiB), discard: 'unmap' }), {
    // Node cannot punch holes: discard is advisory and leaves the data (no discardZeroBlock).
    cleanup: removeFile,
  }),
  target('raw over memory', DATA_GROUPS, async () => ({ driver: 'raw', discard: 'unmap', file: { driver: 'memory', size: MiB } }), {
    discardZeroBlock: 1,
  }),
  target(
    'raw over memory align=4096',
    DATA_GROUPS,
    async () => ({ driver: 'raw', discard: 'unmap', file: { driver: 'memory', size: MiB, align: 4096 } }),
    { discardZeroBlock: 4096, alignment: 4096 },
  ),
  target('raw over file', DATA_GROUPS, async () => ({ driver: 'raw', discard: 'unmap', file: { driver: 'file', filename: await tmpFile(MiB) } }), {
    cleanup: removeFile,
  }),
  target(
    'raw offset=12345 size=1M over memory',
    // A fixed window cannot be resized.
    DATA_GROUPS.filter((g) => g !== 'truncate' && g !== 'truncate-prealloc'),
    async () => ({ driver: 'raw', offset: 12345, size: MiB, discard: 'unmap', file: { driver: 'memory', size: 2 * MiB + 4096 } }),
    { discardZeroBlock: 1 },
  ),
  target(
    'raw offset=4096 size=512k over memory align=4096',
    DATA_GROUPS.filter((g) => g !== 'truncate' && g !== 'truncate-prealloc'),
    async () => ({ driver: 'raw', offset: 4096, size: 512 * 1024, discard: 'unmap', file: { driver: 'memory', size: MiB, align: 4096 } }),
    { discardZeroBlock: 4096, alignment: 4096 },
  ),
  // null-co drops writes, so only the groups that do not need data apply.
  target('null-co read-zeroes=on', ['range-checks', 'flush', 'sink-zero'], async () => ({ driver: 'null-co', 'read-zeroes': true })),
  target('null-co', ['range-checks', 'flush'], async () => ({ driver: 'null-co' })),
];

describe('conformance suite', () => {
  it('every group is exercised by at least one target', () => {
    for (const g of CONFORMANCE_GROUPS) {
      expect(targets.some((t) => t.groups.includes(g)), `group ${g}`).toBe(true);
    }
  });
});

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
