import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { isBlockError } from './errors.ts';
import { VirtualClock } from './clock.ts';
import { BlockAcctStats, type BlockAcctType } from './accounting.ts';

function make(start = 1000) {
  const clock = new VirtualClock(start);
  return { clock, stats: new BlockAcctStats(clock) };
}

/** Runs one request of `latency` ns through the stats. */
function op(
  s: { clock: VirtualClock; stats: BlockAcctStats },
  type: BlockAcctType,
  bytes: number,
  latency: number,
  outcome: 'done' | 'failed' = 'done',
): void {
  const c = s.stats.acctStart(type, bytes);
  s.clock.advanceSync(latency);
  if (outcome === 'done') s.stats.acctDone(c);
  else s.stats.acctFailed(c);
}

describe('BlockAcctStats counters', () => {
  it('starts empty with QEMU defaults and no idle time', () => {
    const { stats } = make();
    const j = stats.toJSON();
    expect(j.rd_bytes).toBe(0);
    expect(j.account_invalid).toBe(true);
    expect(j.account_failed).toBe(true);
    expect(j.timed_stats).toEqual([]);
    expect(j.idle_time_ns).toBeUndefined();
    expect('idle_time_ns' in j).toBe(false);
    expect('rd_latency_histogram' in j).toBe(false);
  });

  it('counts operations, bytes and time per type', () => {
    const s = make();
    op(s, 'read', 4096, 100);
    op(s, 'read', 512, 50);
    op(s, 'write', 65536, 1000);
    op(s, 'flush', 0, 7);
    op(s, 'unmap', 1 << 20, 3);
    s.stats.acctMergeDone('read', 2);
    s.stats.acctMergeDone('write', 1);
    s.stats.acctMergeDone('unmap', 5);
    const j = s.stats.query({ wrHighestOffset: 12345 });
    expect(j).toMatchObject({
      rd_bytes: 4608,
      wr_bytes: 65536,
      unmap_bytes: 1 << 20,
      rd_operations: 2,
      wr_operations: 1,
      flush_operations: 1,
      unmap_operations: 1,
      rd_total_time_ns: 150,
      wr_total_time_ns: 1000,
      flush_total_time_ns: 7,
      unmap_total_time_ns: 3,
      rd_merged: 2,
      wr_merged: 1,
      unmap_merged: 5,
      wr_highest_offset: 12345,
      zone_append_bytes: 0,
      zone_append_operations: 0,
      idle_time_ns: 0,
    });
    s.clock.advanceSync(999);
    expect(s.stats.toJSON().idle_time_ns).toBe(999);
    expect(s.stats.toJSON().wr_highest_offset).toBe(0);
  });

  it('a cookie is accounted once', () => {
    const s = make();
    const c = s.stats.acctStart('write', 10);
    s.stats.acctDone(c);
    s.stats.acctDone(c);
    s.stats.acctFailed(c);
    expect(s.stats.counters('write')).toMatchObject({ ops: 1, bytes: 10, failed: 0 });
    expect(c.type).toBeNull();
  });

  it('failed ops: counted, no bytes; time and idle only with account_failed', () => {
    const s = make();
    op(s, 'read', 4096, 100, 'failed');
    let j = s.stats.toJSON();
    expect(j).toMatchObject({ failed_rd_operations: 1, rd_operations: 0, rd_bytes: 0, rd_total_time_ns: 100 });
    expect(j.idle_time_ns).toBe(0);

    const t = make();
    t.stats.setup({ accountFailed: 'off' });
    op(t, 'write', 4096, 100, 'failed');
    j = t.stats.toJSON();
    expect(j).toMatchObject({ failed_wr_operations: 1, wr_total_time_ns: 0, account_failed: false });
    expect(j.idle_time_ns).toBeUndefined();
  });

  it('invalid ops: counted without time; reset idle only with account_invalid', () => {
    const s = make();
    s.stats.acctInvalid('flush');
    s.stats.acctInvalid('unmap');
    s.stats.acctInvalid('read');
    s.stats.acctInvalid('write');
    s.clock.advanceSync(10);
    let j = s.stats.toJSON();
    expect(j).toMatchObject({
      invalid_rd_operations: 1,
      invalid_wr_operations: 1,
      invalid_flush_operations: 1,
      invalid_unmap_operations: 1,
      flush_total_time_ns: 0,
      idle_time_ns: 10,
    });
    const t = make();
    t.stats.setup({ accountInvalid: false });
    t.stats.acctInvalid('read');
    j = t.stats.toJSON();
    expect(j.invalid_rd_operations).toBe(1);
    expect(j.idle_time_ns).toBeUndefined();
    expect(j.account_invalid).toBe(false);
  });

  it('rejects unknown operation types with EINVAL', () => {
    const { stats } = make();
    for (const bad of ['toString', 'zone_append', 'none']) {
      expect(() => stats.acctStart(bad as BlockAcctType, 1)).toThrow(/Invalid accounting type/);
      expect(() => stats.acctInvalid(bad as BlockAcctType)).toThrow(/Invalid accounting type/);
    }
  });

  it("setup: 'auto' and absent keep the current values", () => {
    const { stats } = make();
    stats.setup({ accountInvalid: 'off' });
    stats.setup({ accountInvalid: 'auto', accountFailed: 'auto' });
    expect(stats.accountInvalid).toBe(false);
    expect(stats.accountFailed).toBe(true);
    stats.setup({ accountInvalid: 'on', accountFailed: false });
    expect(stats.accountInvalid).toBe(true);
    expect(stats.accountFailed).toBe(false);
  });

  it('uses every BlockDeviceStats field name of QEMU', () => {
    const { stats } = make();
    stats.setLatencyHistogram('read', [10]);
    stats.setLatencyHistogram('write', [10]);
    stats.setLatencyHistogram('flush', [10]);
    stats.acctInvalid('read');
    expect(Object.keys(stats.toJSON()).sort()).toEqual(
      [
        'rd_bytes', 'wr_bytes', 'zone_append_bytes', 'unmap_bytes',
        'rd_operations', 'wr_operations', 'zone_append_operations', 'flush_operations', 'unmap_operations',
        'rd_total_time_ns', 'wr_total_time_ns', 'zone_append_total_time_ns', 'flush_total_time_ns', 'unmap_total_time_ns',
        'wr_highest_offset',
        'rd_merged', 'wr_merged', 'zone_append_merged', 'unmap_merged',
        'idle_time_ns',
        'failed_rd_operations', 'failed_wr_operations', 'failed_zone_append_operations', 'failed_flush_operations',
        'failed_unmap_operations',
        'invalid_rd_operations', 'invalid_wr_operations', 'invalid_zone_append_operations', 'invalid_flush_operations',
        'invalid_unmap_operations',
        'account_invalid', 'account_failed', 'timed_stats',
        'rd_latency_histogram', 'wr_latency_histogram', 'flush_latency_histogram',
      ].sort(),
    );
    expect(JSON.parse(JSON.stringify(stats))).toEqual(stats.toJSON());
  });
});

describe('latency histograms', () => {
  it('bins latencies as [0,b0), [b0,b1), …, [bn,∞) (QEMU header example)', () => {
    const s = make();
    s.stats.setLatencyHistogram('read', [10, 50, 100]);
    for (const l of [0, 5, 9]) op(s, 'read', 1, l);
    op(s, 'read', 1, 10);
    for (const l of [50, 60, 70, 99, 99]) op(s, 'read', 1, l);
    op(s, 'read', 1, 100);
    op(s, 'read', 1, 1e9);
    expect(s.stats.getLatencyHistogram('read')).toEqual({ boundaries: [10, 50, 100], bins: [3, 1, 5, 2] });
    expect(s.stats.toJSON().rd_latency_histogram).toEqual({ boundaries: [10, 50, 100], bins: [3, 1, 5, 2] });
    expect(s.stats.getLatencyHistogram('write')).toBeUndefined();
  });

  it('counts failed requests too, whatever account_failed says', () => {
    const s = make();
    s.stats.setup({ accountFailed: 'off' });
    s.stats.setLatencyHistogram('write', [100]);
    op(s, 'write', 1, 200, 'failed');
    op(s, 'write', 1, 20);
    expect(s.stats.getLatencyHistogram('write')!.bins).toEqual([1, 1]);
  });

  it('setting boundaries resets the bins', () => {
    const s = make();
    s.stats.setLatencyHistogram('flush', [5]);
    op(s, 'flush', 0, 1);
    s.stats.setLatencyHistogram('flush', [5]);
    expect(s.stats.getLatencyHistogram('flush')!.bins).toEqual([0, 0]);
  });

  it('requires at least one strictly increasing positive integer boundary', () => {
    const { stats } = make();
    for (const bad of [[], [0], [10, 10], [10, 5], [-1], [1.5], [Number.NaN], [1, Infinity]]) {
      try {
        stats.setLatencyHistogram('read', bad);
        expect.unreachable(`accepted ${JSON.stringify(bad)}`);
      } catch (e) {
        expect(isBlockError(e, 'EINVAL')).toBe(true);
        expect((e as Error).message).toBe('Invalid argument');
      }
    }
    expect(stats.getLatencyHistogram('read')).toBeUndefined();
    stats.setLatencyHistogram('read', [1]);
    expect(stats.getLatencyHistogram('read')!.bins).toEqual([0, 0]);
  });

  it('block-latency-histogram-set: common and per-type boundaries, clear, error messages', () => {
    const { stats } = make();
    stats.blockLatencyHistogramSet('drive0', { boundaries: [10, 20], 'boundaries-write': [100] });
    expect(stats.getLatencyHistogram('read')!.boundaries).toEqual([10, 20]);
    expect(stats.getLatencyHistogram('write')!.boundaries).toEqual([100]);
    expect(stats.getLatencyHistogram('flush')!.boundaries).toEqual([10, 20]);
    expect(stats.getLatencyHistogram('unmap')).toBeUndefined();

    // only one type given: the others stay as they are
    stats.blockLatencyHistogramSet('drive0', { 'boundaries-flush': [7] });
    expect(stats.getLatencyHistogram('read')!.boundaries).toEqual([10, 20]);
    expect(stats.getLatencyHistogram('flush')!.boundaries).toEqual([7]);

    // nothing given: every histogram is cleared
    stats.blockLatencyHistogramSet('drive0', {});
    for (const t of ['read', 'write', 'flush'] as const) expect(stats.getLatencyHistogram(t)).toBeUndefined();

    expect(() => stats.blockLatencyHistogramSet('drive0', { boundaries: [5, 1] })).toThrow(
      "Device 'drive0' set read boundaries fail",
    );
    expect(() => stats.blockLatencyHistogramSet('d1', { boundaries: [5], 'boundaries-write': [] })).toThrow(
      "Device 'd1' set write boundaries fail",
    );
    // QEMU stops at the first failure; read was already set
    expect(stats.getLatencyHistogram('read')!.boundaries).toEqual([5]);
    expect(() => stats.blockLatencyHistogramSet('d1', { 'boundaries-flush': [0] })).toThrow(
      "Device 'd1' set flush boundaries fail",
    );
  });

  it('property: bins always sum to the number of completed requests and match a linear scan', () => {
    fc.assert(
      fc.property(
        fc.uniqueArray(fc.integer({ min: 1, max: 1e6 }), { minLength: 1, maxLength: 10 }),
        fc.array(fc.integer({ min: 0, max: 2e6 }), { maxLength: 100 }),
        (raw, latencies) => {
          const boundaries = [...raw].sort((a, b) => a - b);
          const s = make();
          s.stats.setLatencyHistogram('unmap', boundaries);
          for (const l of latencies) op(s, 'unmap', 1, l);
          const bins = s.stats.getLatencyHistogram('unmap')!.bins;
          const expected = new Array<number>(boundaries.length + 1).fill(0);
          for (const l of latencies) {
            let i = 0;
            while (i < boundaries.length && l >= boundaries[i]!) i++;
            expected[i]!++;
          }
          expect(bins).toEqual(expected);
        },
      ),
      { numRuns: 200 },
    );
  });
});
