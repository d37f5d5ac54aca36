import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { BlockBackend, type IoErrorEvent } from './block-backend.ts';
import { VirtualClock, settle } from './clock.ts';
import { BlockError } from './errors.ts';
import { Graph } from './graph.ts';
import { ThrottleGroupRegistry } from './throttle-group.ts';
import { BlockAcctStats } from './accounting.ts';
import { REQ } from './types.ts';
import { testDrivers, tstore } from './testing/drivers.ts';

let seq = 0;
const uniq = (p: string): string => `${p}-${seq++}`;
const graph = (): Graph => new Graph({ drivers: testDrivers(), defaultProtocol: 'tstore' });

async function openStore(opts: Record<string, unknown> = {}): Promise<{ blk: BlockBackend; name: string }> {
  const name = uniq('s');
  const blk = await BlockBackend.open(graph(), { driver: 'tstore', name, size: 1 << 20, ...opts });
  return { blk, name };
}

async function code(p: Promise<unknown>): Promise<string> {
  try {
    await p;
  } catch (e) {
    return e instanceof BlockError ? e.code : `not a BlockError: ${String(e)}`;
  }
  return 'resolved';
}

describe('range checks', () => {
  it('returns EIO past the end and EINVAL for negative or fractional values', async () => {
    const { blk } = await openStore({ size: 4096 });
    expect(await code(blk.pread(4096, new Uint8Array(1)))).toBe('EIO');
    expect(await code(blk.pread(4000, new Uint8Array(100)))).toBe('EIO');
    expect(await code(blk.pwrite(5000, new Uint8Array(1)))).toBe('EIO');
    expect(await code(blk.pread(-1, new Uint8Array(1)))).toBe('EINVAL');
    expect(await code(blk.pwriteZeroes(0, -5))).toBe('EINVAL');
    expect(await code(blk.pread(0.5, new Uint8Array(1)))).toBe('EINVAL');
    expect(await code(blk.pread(4096, new Uint8Array(0)))).toBe('resolved');
    expect(blk.stats.toJSON().invalid_rd_operations).toBe(4);
    await blk.close();
  });

  it('allows writes beyond EOF when asked, growing the protocol', async () => {
    const { blk } = await openStore({ size: 4096 });
    blk.allowWriteBeyondEof = true;
    await blk.pwrite(8192, new Uint8Array([1, 2, 3]));
    // QEMU grows total_sectors to the sector holding the end of the write.
    expect(await blk.getLength()).toBe(8704);
    expect([...(await blk.read(8190, 8))]).toEqual([0, 0, 1, 2, 3, 0, 0, 0]);
    await blk.close();
  });

  it('fails with ECANCELED when the signal is aborted', async () => {
    const { blk } = await openStore();
    const ac = new AbortController();
    ac.abort();
    expect(await code(blk.pread(0, new Uint8Array(10), { signal: ac.signal }))).toBe('ECANCELED');
    await blk.close();
  });
});

describe('alignment', () => {
  it('keeps unaligned concurrent writes over a 4096-aligned store byte-identical to a flat model', async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.array(fc.record({ off: fc.integer({ min: 0, max: 60000 }), len: fc.integer({ min: 1, max: 9000 }), fill: fc.integer({ min: 1, max: 255 }) }), { minLength: 1, maxLength: 12 }),
        async (ops) => {
          const { blk, name } = await openStore({ size: 1 << 16, align: 4096 });
          tstore(name).delay = 1;
          const model = new Uint8Array(1 << 16);
          // Concurrent, pairwise-disjoint within a batch so the model is exact; overlapping writes go in later batches.
          const batches: Array<typeof ops> = [];
          for (const op of ops) {
            const len = Math.min(op.len, (1 << 16) - op.off);
            const o = { ...op, len };
            const b = batches.find((bb) => bb.every((x) => x.off + x.len <= o.off || o.off + o.len <= x.off));
            if (b && batches.indexOf(b) === batches.length - 1) b.push(o);
            else batches.push([o]);
          }
          for (const b of batches) {
            await Promise.all(b.map((o) => blk.pwrite(o.off, new Uint8Array(o.len).fill(o.fill))));
            for (const o of b) model.fill(o.fill, o.off, o.off + o.len);
          }
          const got = await blk.read(0, 1 << 16);
          expect(Buffer.compare(Buffer.from(got), Buffer.from(model))).toBe(0);
          await blk.close();
        },
      ),
      { numRuns: 40 },
    );
  });

  it('serialises overlapping unaligned writes so neither is lost inside a shared block', async () => {
    const { blk, name } = await openStore({ size: 8192, align: 4096 });
    tstore(name).delay = 2;
    // Both writes touch block 0; without serialisation the second read-modify-write would undo the first.
    await Promise.all([blk.pwrite(10, new Uint8Array(10).fill(0xaa)), blk.pwrite(100, new Uint8Array(10).fill(0xbb)), blk.pwriteZeroes(3000, 10)]);
    const got = await blk.read(0, 200);
    expect(got[15]).toBe(0xaa);
    expect(got[105]).toBe(0xbb);
    await blk.close();
  });
});

describe('flush', () => {
  it('does no I/O when nothing was written since the last flush', async () => {
    const { blk, name } = await openStore();
    const s = tstore(name);
    await blk.flush();
    const afterFirst = s.flushes;
    await blk.flush();
    expect(s.flushes).toBe(afterFirst);
    await blk.pwrite(0, new Uint8Array(8));
    await blk.flush();
    expect(s.flushes).toBe(afterFirst + 1);
    await blk.flush();
    expect(s.flushes).toBe(afterFirst + 1);
    await blk.close();
  });

  it('writethrough mode flushes after every write', async () => {
    const { blk, name } = await openStore();
    blk.setEnableWriteCache(false);
    await blk.pwrite(0, new Uint8Array(8));
    await blk.pwrite(8, new Uint8Array(8));
    expect(tstore(name).flushes).toBe(2);
    await blk.close();
  });
});

describe('zero writes', () => {
  it('falls back to a zero buffer unless NO_FALLBACK', async () => {
    const { blk, name } = await openStore({ zeroes: false });
    await blk.pwrite(0, new Uint8Array(100).fill(5));
    await blk.pwriteZeroes(10, 50);
    const got = await blk.read(0, 100);
    expect(got[9]).toBe(5);
    expect(got[10]).toBe(0);
    expect(got[59]).toBe(0);
    expect(got[60]).toBe(5);
    expect(await code(blk.pwriteZeroes(0, 10, { flags: REQ.NO_FALLBACK }))).toBe('ENOTSUP');
    expect(tstore(name).zeroWrites).toBe(0);
    await blk.close();
  });

  it('detect-zeroes turns zero buffers into zero writes', async () => {
    const { blk, name } = await openStore({ 'detect-zeroes': 'on' });
    await blk.pwrite(0, new Uint8Array(4096));
    expect(tstore(name).zeroWrites).toBe(1);
    expect(tstore(name).writes).toBe(0);
    await blk.close();
  });
});

describe('error policy', () => {
  it('stops on ENOSPC with werror=enospc and completes the write on resume', async () => {
    const { blk, name } = await openStore();
    const events: IoErrorEvent[] = [];
    blk.on('io-error', (e) => events.push(e));
    tstore(name).failWrites.push('ENOSPC');
    let done = false;
    const p = blk.pwrite(512, new Uint8Array(512).fill(0x5a)).then(() => (done = true));
    for (let i = 0; i < 20 && !blk.stopped; i++) await settle();
    expect(blk.stopped).toBe(true);
    expect(blk.iostatus).toBe('nospace');
    expect(events).toMatchObject([{ operation: 'write', action: 'stop', nospace: true }]);
    await settle();
    expect(done).toBe(false);
    blk.resume();
    await p;
    expect(blk.iostatus).toBe('ok');
    expect((await blk.read(512, 512)).every((b) => b === 0x5a)).toBe(true);
    await blk.close();
  });

  it('reports other errors under enospc, and ignores them under ignore', async () => {
    const { blk, name } = await openStore();
    tstore(name).failWrites.push('EIO');
    expect(await code(blk.pwrite(0, new Uint8Array(1)))).toBe('EIO');
    blk.setOnError('report', 'ignore');
    tstore(name).failWrites.push('EIO');
    expect(await code(blk.pwrite(0, new Uint8Array(1)))).toBe('resolved');
    expect(blk.stats.toJSON().failed_wr_operations).toBe(2);
    await blk.close();
  });
});

describe('drain', () => {
  it('waits for in-flight requests and queues new ones until the drained section ends', async () => {
    const { blk, name } = await openStore();
    tstore(name).delay = 5;
    let firstDone = false;
    const first = blk.pwrite(0, new Uint8Array(10).fill(1)).then(() => (firstDone = true));
    await blk.drainedBegin();
    expect(firstDone).toBe(true);
    let secondDone = false;
    const second = blk.pwrite(0, new Uint8Array(10).fill(2)).then(() => (secondDone = true));
    await new Promise((r) => setTimeout(r, 20));
    expect(secondDone).toBe(false);
    blk.drainedEnd();
    await Promise.all([first, second]);
    expect((await blk.read(0, 1))[0]).toBe(2);
    await BlockBackend.drainAll();
    await blk.close();
  });
});

describe('node bookkeeping', () => {
  it('fires the write threshold once and tracks the highest offset', async () => {
    const { blk } = await openStore();
    const bs = blk.bs!;
    const hits: number[] = [];
    bs.writeThreshold = 1000;
    bs.onWriteThreshold = (_b, by) => hits.push(by);
    await blk.pwrite(0, new Uint8Array(500));
    await blk.pwrite(900, new Uint8Array(200));
    await blk.pwrite(2000, new Uint8Array(200));
    expect(hits).toEqual([100]);
    expect(bs.wrHighestOffset).toBe(2200);
    await blk.close();
  });

  it('runs before-write hooks, which can veto a write', async () => {
    const { blk } = await openStore();
    blk.bs!.beforeWriteHooks.push((_bs, off) => {
      if (off === 0) throw new BlockError('EPERM', 'sector 0 is protected');
    });
    expect(await code(blk.pwrite(0, new Uint8Array(1)))).toBe('EPERM');
    expect(await code(blk.pwrite(512, new Uint8Array(1)))).toBe('resolved');
    await blk.close();
  });
});

describe('removable media', () => {
  it('refuses I/O with ENOMEDIUM while the tray is open and honours the lock', async () => {
    const { blk } = await openStore();
    blk.removable = true;
    blk.lockMedium(true);
    expect(() => blk.openTray()).toThrow(/is locked/);
    blk.openTray(true);
    expect(await code(blk.pread(0, new Uint8Array(1)))).toBe('ENOMEDIUM');
    blk.closeTray();
    expect(await code(blk.pread(0, new Uint8Array(1)))).toBe('resolved');
    const changes: boolean[] = [];
    blk.on('media-change', (e) => changes.push(e.load));
    await blk.eject(true);
    expect(blk.bs).toBeNull();
    expect(changes).toEqual([false]);
  });
});

describe('accounting', () => {
  it('counts operations, bytes and failures with a latency histogram', async () => {
    const { blk } = await openStore();
    blk.stats.setLatencyHistogram('read', [10, 1_000_000_000]);
    await blk.pwrite(0, new Uint8Array(4096));
    await blk.read(0, 1000);
    await blk.read(0, 24);
    await blk.flush();
    const s = blk.stats.toJSON();
    expect(s.wr_operations).toBe(1);
    expect(s.wr_bytes).toBe(4096);
    expect(s.rd_operations).toBe(2);
    expect(s.rd_bytes).toBe(1024);
    expect(s.flush_operations).toBe(1);
    const bins = s.rd_latency_histogram!.bins;
    expect(bins.reduce((a, b) => a + b, 0)).toBe(2);
    await blk.close();
  });
});

describe('throttling', () => {
  it('holds a backend to its configured bps within 10% in virtual time', async () => {
    const clock = new VirtualClock();
    const registry = new ThrottleGroupRegistry(clock);
    const g = graph();
    const bs = await g.open({ driver: 'tstore', name: uniq('t'), size: 1 << 24, 'read-only': false }, 0);
    const blk = new BlockBackend(g, { perm: 0x1f & ~0x10, sharedPerm: 0x1f, throttleRegistry: registry, stats: new BlockAcctStats(clock) });
    blk.insertNode(bs);
    const bps = 1 << 20;
    blk.enableThrottling('g1', { 'bps-total': bps });
    let bytes = 0;
    let stop = false;
    const worker = (async () => {
      while (!stop) {
        await blk.pwrite(0, new Uint8Array(4096));
        bytes += 4096;
      }
    })();
    const seconds = 30;
    for (let t = 0; t < seconds * 10; t++) {
      await clock.advance(100_000_000);
      await settle();
    }
    stop = true;
    await clock.advance(10_000_000_000);
    await worker;
    const rate = bytes / seconds;
    expect(rate).toBeGreaterThan(bps * 0.9);
    expect(rate).toBeLessThan(bps * 1.1);
    await blk.close();
  });

  it('does not throttle while drained', async () => {
    const clock = new VirtualClock();
    const registry = new ThrottleGroupRegistry(clock);
    const g = graph();
    const bs = await g.open({ driver: 'tstore', name: uniq('t'), size: 1 << 24, 'read-only': false }, 0);
    const blk = new BlockBackend(g, { perm: 0x0f, sharedPerm: 0x1f, throttleRegistry: registry });
    blk.insertNode(bs);
    blk.enableThrottling('g2', { 'iops-total': 1 });
    await blk.pwrite(0, new Uint8Array(1));
    let done = 0;
    const ps = [1, 2, 3].map(() => blk.pwrite(0, new Uint8Array(1)).then(() => done++));
    await settle();
    expect(done).toBe(0);
    // Draining must complete without the clock moving: queued requests bypass the limit.
    await blk.drain();
    await Promise.all(ps);
    expect(done).toBe(3);
    await blk.close();
  });
});

describe('notifications and op blockers', () => {
  it('tells the backend when its medium is resized', async () => {
    const { blk } = await openStore({ size: 4096 });
    const sizes: number[] = [];
    blk.on('resize', (e) => sizes.push(e.size));
    await blk.truncate(8192);
    expect(sizes).toEqual([8192]);
    expect(await blk.getLength()).toBe(8192);
    await blk.close();
  });

  it('reports a blocked operation with its reason until unblocked', async () => {
    const { blk } = await openStore();
    const bs = blk.bs!;
    bs.blockOp('resize', 'node is used by job job0');
    expect(() => bs.checkOp('resize')).toThrow(`Node '${bs.nodeName}' is busy: node is used by job job0`);
    expect(() => bs.checkOp('commit-source')).not.toThrow();
    bs.unblockOp('resize', 'node is used by job job0');
    expect(() => bs.checkOp('resize')).not.toThrow();
    await blk.close();
  });
});


describe('sector-granular lengths', () => {
  it('shows a 1000-byte protocol as a 1024-byte disk whose tail reads as zeroes, like QEMU', async () => {
    const name = uniq('odd');
    const s = tstore(name);
    s.data = new Uint8Array(1000).fill(9);
    s.length = 1000;
    const blk = await BlockBackend.open(graph(), { driver: 'tstore', name });
    expect(await blk.getLength()).toBe(1024);
    const tail = await blk.read(992, 32);
    expect([...tail.subarray(0, 8)]).toEqual(new Array(8).fill(9));
    expect(tail.subarray(8).every((b) => b === 0)).toBe(true);
    await blk.close();
  });
});
