import { afterEach, describe, expect, it } from 'vitest';
import { BlockBackend } from '../core/block-backend.ts';
import { NANOSECONDS_PER_SECOND, VirtualClock } from '../core/clock.ts';
import { Graph } from '../core/graph.ts';
import { bdrvDrainedBegin, bdrvDrainedEnd } from '../core/io.ts';
import { ThrottleGroupRegistry } from '../core/throttle-group.ts';
import type { ThrottleLimits } from '../core/throttle.ts';
import { memoryDriver } from '../protocols/memory.ts';
import { filterDrivers } from './index.ts';

const KiB = 1024;
const MiB = 1024 * KiB;

const cleanups: Array<() => Promise<void>> = [];
afterEach(async () => {
  for (const f of cleanups.splice(0).reverse()) await f();
});

/** A graph whose throttle nodes join groups of a registry on a virtual clock. */
function setup(groups: Record<string, ThrottleLimits>): { graph: Graph; clock: VirtualClock; registry: ThrottleGroupRegistry } {
  const clock = new VirtualClock();
  const registry = new ThrottleGroupRegistry(clock);
  for (const [name, limits] of Object.entries(groups)) registry.createGroup(name, limits);
  const graph = new Graph({ drivers: [memoryDriver, ...filterDrivers({ throttleGroups: registry })] });
  cleanups.push(() => graph.closeAll());
  return { graph, clock, registry };
}

async function throttled(graph: Graph, group: string, name = 'thr'): Promise<BlockBackend> {
  const blk = await BlockBackend.open(graph, { driver: 'throttle', 'node-name': name, 'throttle-group': group, file: { driver: 'memory', size: 64 * MiB } });
  cleanups.push(() => blk.close());
  return blk;
}

/**
 * Runs `work` to completion on the virtual clock: timers fire as soon as every
 * pending continuation has run, so simulated time advances exactly as far as
 * the throttling makes the requests wait. Returns the simulated seconds taken.
 */
async function runVirtual(clock: VirtualClock, work: () => Promise<void>): Promise<number> {
  const start = clock.now();
  let finished = false;
  let end = start;
  let failure: unknown;
  const p = work().then(
    () => {
      end = clock.now();
      finished = true;
    },
    (e: unknown) => {
      failure = e;
      finished = true;
    },
  );
  for (let i = 0; !finished; i++) {
    if (i > 1_000_000) throw new Error('virtual run did not finish');
    await clock.runUntilIdle();
  }
  await p;
  if (failure !== undefined) throw failure;
  return (end - start) / NANOSECONDS_PER_SECOND;
}

describe('throttle: opening', () => {
  it('needs an existing group, with QEMU messages', async () => {
    const { graph } = setup({ g: {} });
    const file = { driver: 'memory' };
    await expect(graph.open({ driver: 'throttle', 'read-only': false, file })).rejects.toThrow('Please specify a throttle group');
    await expect(graph.open({ driver: 'throttle', 'read-only': false, 'throttle-group': 'nope', file })).rejects.toThrow("Throttle group 'nope' does not exist");
    expect(graph.nodes.size).toBe(0);
  });

  it('joins the group while open and leaves it on close', async () => {
    const { graph, registry } = setup({ g: {} });
    const blk = await throttled(graph, 'g');
    expect(registry.get('g')!.memberCount).toBe(1);
    expect(blk.bs!.file!.bs.drv.name).toBe('memory');
    await blk.close();
    await graph.closeAll();
    expect(registry.get('g')!.memberCount).toBe(0);
    // Only the explicit creation holds it now, so it can be deleted.
    registry.deleteGroup('g');
  });

  it('passes data through unchanged', async () => {
    const { graph } = setup({ g: { 'bps-total': 100 * MiB } });
    const blk = await throttled(graph, 'g');
    await blk.pwrite(1000, new Uint8Array([1, 2, 3]));
    expect([...(await blk.read(999, 5))]).toEqual([0, 1, 2, 3, 0]);
    await blk.pwriteZeroes(1000, 2);
    expect([...(await blk.read(999, 5))]).toEqual([0, 0, 0, 3, 0]);
    await blk.flush();
    await blk.truncate(MiB);
    expect(await blk.getLength()).toBe(MiB);
  });
});

describe('throttle: rates in virtual time', () => {
  it('sequential writes run within 10% of bps-total', async () => {
    const { graph, clock } = setup({ g: { 'bps-total': MiB } });
    const blk = await throttled(graph, 'g');
    const total = 8 * MiB;
    const chunk = new Uint8Array(64 * KiB).fill(1);
    const secs = await runVirtual(clock, async () => {
      for (let off = 0; off < total; off += chunk.length) await blk.pwrite(off, chunk);
    });
    const rate = total / secs;
    expect(Math.abs(rate - MiB) / MiB).toBeLessThan(0.1);
  });

  it('concurrent reads run within 10% of bps-read and leave writes alone', async () => {
    const { graph, clock } = setup({ g: { 'bps-read': 2 * MiB } });
    const blk = await throttled(graph, 'g');
    const total = 16 * MiB;
    const secs = await runVirtual(clock, async () => {
      const jobs: Array<Promise<void>> = [];
      for (let w = 0; w < 8; w++) {
        jobs.push(
          (async () => {
            for (let off = w * 128 * KiB; off < total; off += 8 * 128 * KiB) await blk.read(off, 128 * KiB);
          })(),
        );
      }
      await Promise.all(jobs);
    });
    const rate = total / secs;
    expect(Math.abs(rate - 2 * MiB) / (2 * MiB)).toBeLessThan(0.1);
    // Writes are not limited by a read-only limit: no simulated time passes.
    const wsecs = await runVirtual(clock, async () => {
      for (let off = 0; off < 4 * MiB; off += MiB) await blk.pwrite(off, new Uint8Array(MiB));
    });
    expect(wsecs).toBe(0);
  });

  it('two throttle nodes in one group share its budget', async () => {
    const { graph, clock } = setup({ shared: { 'bps-write': MiB } });
    const a = await throttled(graph, 'shared', 'ta');
    const b = await throttled(graph, 'shared', 'tb');
    const each = 4 * MiB;
    const chunk = new Uint8Array(64 * KiB);
    const secs = await runVirtual(clock, async () => {
      const write = async (blk: BlockBackend): Promise<void> => {
        for (let off = 0; off < each; off += chunk.length) await blk.pwrite(off, chunk);
      };
      await Promise.all([write(a), write(b)]);
    });
    const rate = (2 * each) / secs;
    expect(Math.abs(rate - MiB) / MiB).toBeLessThan(0.1);
  });

  it('iops limits count requests', async () => {
    const { graph, clock } = setup({ g: { 'iops-total': 100 } });
    const blk = await throttled(graph, 'g');
    const n = 500;
    const secs = await runVirtual(clock, async () => {
      for (let i = 0; i < n; i++) await blk.read(i * 512, 512);
    });
    expect(Math.abs(n / secs - 100) / 100).toBeLessThan(0.1);
  });
});

describe('throttle: drain and reopen', () => {
  it('a drained section releases queued requests without waiting for the clock', async () => {
    const { graph, clock } = setup({ g: { 'bps-total': 1000 } });
    const blk = await throttled(graph, 'g');
    const node = blk.bs!;
    // The first request fits the bucket's initial allowance; the next ones would wait minutes.
    await blk.pwrite(0, new Uint8Array(100));
    const pending = [blk.pwrite(0, new Uint8Array(64 * KiB)), blk.read(0, 64 * KiB)];
    await clock.advance(1000);
    await bdrvDrainedBegin(node);
    bdrvDrainedEnd(node);
    await Promise.all(pending);
    expect(clock.now()).toBeLessThan(NANOSECONDS_PER_SECOND);
  });

  it('reopen moves the node to another group; an unknown group is refused', async () => {
    const { graph, registry } = setup({ g: {}, h: {} });
    const blk = await throttled(graph, 'g');
    const node = blk.bs!;
    await expect(graph.reopen(node, { options: { 'throttle-group': 'zzz' } })).rejects.toThrow("Throttle group 'zzz' does not exist");
    expect(registry.get('g')!.memberCount).toBe(1);
    await graph.reopen(node, { options: { 'throttle-group': 'h' } });
    expect(registry.get('g')!.memberCount).toBe(0);
    expect(registry.get('h')!.memberCount).toBe(1);
    await blk.pwrite(0, new Uint8Array(10));
    await expect(graph.reopen(node, { options: { bogus: 1 } })).rejects.toThrow("does not support the option 'bogus'");
  });
});
