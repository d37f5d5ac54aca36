import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { isBlockError } from './errors.ts';
import { NANOSECONDS_PER_SECOND } from './clock.ts';
import {
  BucketType,
  THROTTLE_VALUE_MAX,
  ThrottleState,
  throttleComputeWait,
  throttleConfigError,
  throttleConfigFromLimits,
  throttleConfigInit,
  throttleConfigToLimits,
  throttleEnabled,
  throttleIsValid,
  throttleLeakBucket,
  throttleLimitsToConfig,
  type BucketIndex,
  type LeakyBucket,
  type ThrottleConfig,
  type ThrottleLimits,
} from './throttle.ts';

const NS = NANOSECONDS_PER_SECOND;
const MiB = 1024 * 1024;

function bucket(p: Partial<LeakyBucket>): LeakyBucket {
  return { avg: 0, max: 0, level: 0, burstLevel: 0, burstLength: 1, ...p };
}

function close(a: number, b: number): boolean {
  return Math.abs(a - b) < 1e-6;
}

/** The EINVAL message thrown by fn. */
function einval(fn: () => unknown): string {
  try {
    fn();
  } catch (e) {
    if (isBlockError(e, 'EINVAL')) return e.message;
    throw e;
  }
  throw new Error('expected EINVAL');
}

describe('leaky bucket (QEMU test-throttle vectors)', () => {
  it('leaks at avg and never below zero', () => {
    const b = bucket({ avg: 150, max: 15, level: 1.5 });
    throttleLeakBucket(b, NS / 150);
    expect(close(b.level, 0.5)).toBe(true);
    throttleLeakBucket(b, NS / 150);
    expect(close(b.level, 0)).toBe(true);
    throttleLeakBucket(b, NS / 150);
    expect(b.level).toBe(0);
  });

  it('leaks burstLevel at max only when burstLength > 1', () => {
    const b = bucket({ avg: 150, max: 250, burstLevel: 6, burstLength: 1 });
    throttleLeakBucket(b, NS / 100);
    expect(b.burstLevel).toBe(6);
    b.burstLength = 2;
    throttleLeakBucket(b, NS / 100);
    expect(close(b.burstLevel, 3.5)).toBe(true);
    throttleLeakBucket(b, NS / 100);
    expect(close(b.burstLevel, 1)).toBe(true);
    throttleLeakBucket(b, NS / 100);
    expect(b.burstLevel).toBe(0);
    throttleLeakBucket(b, NS / 100);
    expect(b.burstLevel).toBe(0);
  });

  it('computes waits: none without avg, none within max, time for the excess otherwise', () => {
    expect(throttleComputeWait(bucket({ avg: 0, max: 15, level: 1.5 }))).toBe(0);
    expect(throttleComputeWait(bucket({ avg: 150, max: 15, level: 15 }))).toBe(0);
    expect(throttleComputeWait(bucket({ avg: 150, max: 15, level: 9 }))).toBe(0);
    // half an operation above max: the time needed to do half an operation
    expect(throttleComputeWait(bucket({ avg: 150, max: 15, level: 15.5 }))).toBe(Math.trunc(NS / 150 / 2));
  });

  it('without max allows avg/10 units before waiting', () => {
    expect(throttleComputeWait(bucket({ avg: 100, level: 10 }))).toBe(0);
    expect(throttleComputeWait(bucket({ avg: 100, level: 11 }))).toBe(NS / 100);
  });

  it('allows bursts at max for burst_length seconds, then waits (QEMU vector)', () => {
    const b = bucket({ avg: 10, max: 200, burstLength: 2 });
    for (let i = 0; i < 22; i++) {
      const units = b.max / 10;
      b.level += units;
      b.burstLevel += units;
      throttleLeakBucket(b, NS / 10);
      const wait = throttleComputeWait(b);
      expect(close(b.burstLevel, 0)).toBe(true);
      expect(close(b.level, ((i + 1) * (b.max - b.avg)) / 10)).toBe(true);
      // 2 s of burst plus 100 ms because level leaked meanwhile; then wait.
      expect(wait).toBe(i < 21 ? 0 : 1.8 * NS);
    }
  });

  it('the burst bucket caps the rate during a burst', () => {
    // main bucket far from full, burst bucket one unit above max/10
    const b = bucket({ avg: 10, max: 100, burstLength: 5, level: 20, burstLevel: 11 });
    expect(throttleComputeWait(b)).toBe(NS / 100);
  });
});

describe('throttle accounting (QEMU test-throttle vectors)', () => {
  function account(isOps: boolean, size: number, avg: number, opSize: number): number[] {
    const cfg = throttleConfigInit();
    const idx: BucketIndex[] = isOps
      ? [BucketType.OPS_TOTAL, BucketType.OPS_READ, BucketType.OPS_WRITE]
      : [BucketType.BPS_TOTAL, BucketType.BPS_READ, BucketType.BPS_WRITE];
    for (const i of idx) cfg.buckets[i]!.avg = avg;
    cfg.opSize = opSize;
    const ts = new ThrottleState();
    ts.config(cfg, 0);
    ts.account(false, size);
    ts.account(true, size);
    return idx.map((i) => ts.cfg.buckets[i]!.level);
  }

  it('charges bytes to bps buckets regardless of iops-size', () => {
    expect(account(false, 512, 150, 0)).toEqual([1024, 512, 512]);
    expect(account(false, 1024, 150, 0)).toEqual([2048, 1024, 1024]);
    expect(account(false, 1024, 150, 17)).toEqual([2048, 1024, 1024]);
  });

  it('charges one op per request, or size/iops-size for large requests', () => {
    expect(account(true, 512, 150, 0)).toEqual([2, 1, 1]);
    expect(account(true, 1024, 150, 0)).toEqual([2, 1, 1]);
    const big = account(true, 64 * 512, 150, 13 * 512);
    expect(close(big[0]!, (64 * 2) / 13)).toBe(true);
    expect(close(big[1]!, 64 / 13)).toBe(true);
    expect(close(big[2]!, 64 / 13)).toBe(true);
    // a request smaller than iops-size is still one op
    expect(account(true, 100, 150, 4096)).toEqual([2, 1, 1]);
  });

  it('tracks burstLevel only for buckets with burst_length > 1', () => {
    const cfg = throttleLimitsToConfig({ 'bps-total': 100, 'bps-total-max': 1000, 'bps-total-max-length': 3, 'iops-total': 10 });
    const ts = new ThrottleState();
    ts.config(cfg, 0);
    ts.account(true, 300);
    expect(ts.cfg.buckets[BucketType.BPS_TOTAL]!.burstLevel).toBe(300);
    expect(ts.cfg.buckets[BucketType.OPS_TOTAL]!.burstLevel).toBe(0);
    expect(ts.cfg.buckets[BucketType.BPS_READ]!.level).toBe(0);
    expect(ts.cfg.buckets[BucketType.BPS_WRITE]!.level).toBe(300);
  });
});

describe('config validation (QEMU throttle_is_valid messages)', () => {
  function cfgWith(set: (c: ThrottleConfig) => void): ThrottleConfig {
    const c = throttleConfigInit();
    set(c);
    return c;
  }

  it('accepts the empty config and reports it disabled', () => {
    const c = throttleConfigInit();
    expect(throttleConfigError(c)).toBeNull();
    expect(throttleEnabled(c)).toBe(false);
    for (let i = 0; i < 6; i++) {
      expect(throttleEnabled(cfgWith((x) => (x.buckets[i]!.avg = 150)))).toBe(true);
    }
  });

  it('rejects total together with read/write, for avg and for max', () => {
    const msg = 'bps/iops/max total values and read/write values cannot be used at the same time';
    const pairs: [BucketIndex, BucketIndex][] = [
      [BucketType.BPS_TOTAL, BucketType.BPS_READ],
      [BucketType.BPS_TOTAL, BucketType.BPS_WRITE],
      [BucketType.OPS_TOTAL, BucketType.OPS_READ],
      [BucketType.OPS_TOTAL, BucketType.OPS_WRITE],
    ];
    for (const [t, rw] of pairs) {
      expect(throttleConfigError(cfgWith((c) => ((c.buckets[t]!.avg = 1), (c.buckets[rw]!.avg = 1))))).toBe(msg);
      expect(
        throttleConfigError(
          cfgWith((c) => {
            c.buckets[t]!.avg = 1;
            c.buckets[t]!.max = 1;
            c.buckets[rw]!.avg = 0;
            c.buckets[rw]!.max = 1;
          }),
        ),
      ).toBe(msg);
    }
    // read + write without total is fine
    expect(
      throttleConfigError(cfgWith((c) => ((c.buckets[BucketType.BPS_READ]!.avg = 1), (c.buckets[BucketType.BPS_WRITE]!.avg = 1)))),
    ).toBeNull();
    expect(einval(() => throttleConfigFromLimits({ 'bps-total': 1, 'bps-read': 1 }))).toBe(msg);
    expect(einval(() => throttleConfigFromLimits({ 'iops-total': 5, 'iops-write-max': 10, 'iops-total-max': 10 }))).toBe(msg);
  });

  it('rejects iops-size without an iops limit', () => {
    expect(einval(() => throttleConfigFromLimits({ 'bps-total': 100, 'iops-size': 4096 }))).toBe(
      'iops size requires an iops value to be set',
    );
    expect(() => throttleConfigFromLimits({ 'iops-read': 100, 'iops-size': 4096 })).not.toThrow();
  });

  it('rejects values outside [0, 1e15]', () => {
    const msg = 'bps/iops/max values must be within [0, 1000000000000000]';
    expect(THROTTLE_VALUE_MAX).toBe(1e15);
    expect(einval(() => throttleConfigFromLimits({ 'bps-total': THROTTLE_VALUE_MAX + 1 }))).toBe(msg);
    expect(einval(() => throttleConfigFromLimits({ 'iops-read': -1 }))).toBe(msg);
    expect(einval(() => throttleConfigFromLimits({ 'bps-write': 1, 'bps-write-max': THROTTLE_VALUE_MAX + 1 }))).toBe(msg);
    expect(() => throttleConfigFromLimits({ 'bps-total': THROTTLE_VALUE_MAX })).not.toThrow();
    expect(() => throttleConfigFromLimits({ 'bps-total': 0 })).not.toThrow();
    for (let i = 0; i < 6; i++) {
      expect(throttleConfigError(cfgWith((c) => (c.buckets[i]!.avg = -1)))).toBe(msg);
      expect(throttleConfigError(cfgWith((c) => ((c.buckets[i]!.avg = 1), (c.buckets[i]!.max = -1))))).toBe(msg);
      expect(throttleConfigError(cfgWith((c) => (c.buckets[i]!.avg = Number.NaN)))).toBe(msg);
    }
  });

  it('checks burst lengths', () => {
    expect(einval(() => throttleConfigFromLimits({ 'bps-total': 1, 'bps-total-max': 2, 'bps-total-max-length': 0 }))).toBe(
      'the burst length cannot be 0',
    );
    expect(einval(() => throttleConfigFromLimits({ 'iops-read': 10, 'iops-read-max-length': 2 }))).toBe(
      'burst length set without burst rate',
    );
    expect(
      einval(() => throttleConfigFromLimits({ 'bps-total': 1e9, 'bps-total-max': 1e12, 'bps-total-max-length': 1001 })),
    ).toBe('burst length too high for this burst rate');
    expect(() =>
      throttleConfigFromLimits({ 'bps-total': 1e9, 'bps-total-max': 1e12, 'bps-total-max-length': 1000 }),
    ).not.toThrow();
    expect(einval(() => throttleConfigFromLimits({ 'bps-read-max-length': 4294967296 }))).toBe(
      'bps-read-max-length value must be in the range [0, 4294967295]',
    );
    expect(einval(() => throttleConfigFromLimits({ 'iops-write-max-length': -1 }))).toBe(
      'iops-write-max-length value must be in the range [0, 4294967295]',
    );
  });

  it('requires avg for max and max >= avg', () => {
    expect(einval(() => throttleConfigFromLimits({ 'bps-total-max': 100 }))).toBe(
      'bps_max/iops_max require corresponding bps/iops values',
    );
    expect(einval(() => throttleConfigFromLimits({ 'iops-write': 100, 'iops-write-max': 99 }))).toBe(
      'bps_max/iops_max cannot be lower than bps/iops',
    );
    expect(() => throttleConfigFromLimits({ 'iops-write': 100, 'iops-write-max': 100 })).not.toThrow();
  });

  it('rejects unknown keys and non-integers like QAPI', () => {
    expect(einval(() => throttleConfigFromLimits({ bps: 1 } as unknown as ThrottleLimits))).toBe("Parameter 'bps' is unexpected");
    expect(einval(() => throttleConfigFromLimits({ 'bps-total': 1.5 }))).toBe(
      "Invalid parameter type for 'bps-total', expected: integer",
    );
    expect(einval(() => throttleConfigFromLimits({ 'iops-total': '5' } as unknown as ThrottleLimits))).toBe(
      "Invalid parameter type for 'iops-total', expected: integer",
    );
    expect(einval(() => throttleConfigFromLimits({ 'iops-total': 5, 'iops-size': -1 }))).toBe(
      'Property values cannot be negative',
    );
  });

  it('throttleIsValid throws a BlockError with code EINVAL', () => {
    const c = cfgWith((x) => (x.buckets[0]!.max = 5));
    expect(() => throttleIsValid(c)).toThrow(/require corresponding/);
    try {
      throttleIsValid(c);
    } catch (e) {
      expect(isBlockError(e, 'EINVAL')).toBe(true);
    }
  });
});

describe('ThrottleLimits conversion', () => {
  it('maps every QAPI key to its bucket', () => {
    const cfg = throttleConfigFromLimits({
      'bps-read': 1000,
      'bps-read-max': 2000,
      'bps-read-max-length': 3,
      'bps-write': 10,
      'iops-total': 7,
      'iops-total-max': 70,
      'iops-total-max-length': 4,
      'iops-size': 4096,
    });
    expect(cfg.buckets[BucketType.BPS_READ]).toEqual(bucket({ avg: 1000, max: 2000, burstLength: 3 }));
    expect(cfg.buckets[BucketType.BPS_WRITE]).toEqual(bucket({ avg: 10 }));
    expect(cfg.buckets[BucketType.OPS_TOTAL]).toEqual(bucket({ avg: 7, max: 70, burstLength: 4 }));
    expect(cfg.buckets[BucketType.BPS_TOTAL]).toEqual(bucket({}));
    expect(cfg.opSize).toBe(4096);
  });

  it('round-trips through throttleConfigToLimits with every key present', () => {
    const limits: ThrottleLimits = { 'bps-total': 1 * MiB, 'bps-total-max': 4 * MiB, 'bps-total-max-length': 10, 'iops-read': 50 };
    const out = throttleConfigToLimits(throttleConfigFromLimits(limits));
    expect(Object.keys(out)).toHaveLength(19);
    expect(out).toMatchObject(limits);
    expect(out['iops-write']).toBe(0);
    expect(out['iops-write-max-length']).toBe(1);
    expect(out['iops-size']).toBe(0);
    expect(throttleConfigToLimits(throttleConfigFromLimits(out))).toEqual(out);
  });

  it('overrides only present keys when given a base, and validates the result', () => {
    const base = throttleConfigFromLimits({ 'bps-total': 100, 'iops-total': 10 });
    base.buckets[0]!.level = 55;
    const merged = throttleLimitsToConfig({ 'iops-total': 20 }, base);
    expect(merged.buckets[BucketType.BPS_TOTAL]!.avg).toBe(100);
    expect(merged.buckets[BucketType.BPS_TOTAL]!.level).toBe(0);
    expect(merged.buckets[BucketType.OPS_TOTAL]!.avg).toBe(20);
    expect(base.buckets[BucketType.OPS_TOTAL]!.avg).toBe(10);
    expect(einval(() => throttleLimitsToConfig({ 'bps-read': 5 }, base))).toMatch(/cannot be used at the same time/);
  });
});

describe('ThrottleState', () => {
  it('config() copies the config, empties the buckets and restarts leaking at now', () => {
    const cfg = throttleConfigFromLimits({ 'bps-total': 100 });
    cfg.buckets[0]!.level = 42;
    const ts = new ThrottleState();
    ts.config(cfg, 1234);
    expect(ts.previousLeak).toBe(1234);
    expect(ts.cfg.buckets[0]!.level).toBe(0);
    cfg.buckets[0]!.avg = 1;
    expect(ts.cfg.buckets[0]!.avg).toBe(100);
    expect(ts.enabled).toBe(true);
  });

  it('computeWait takes the largest wait of the buckets for that direction', () => {
    const ts = new ThrottleState();
    ts.config(throttleConfigFromLimits({ 'bps-read': 1000, 'iops-write': 10 }), 0);
    ts.account(false, 1100); // bps-read: 1100 - 100 = 1000 over -> 1 s
    expect(ts.computeWait(false, 0)).toBe(NS);
    expect(ts.computeWait(true, 0)).toBe(0);
    ts.account(true, 0);
    ts.account(true, 0); // 2 ops, bucket 1 op -> 0.1 s
    expect(ts.computeWait(true, 0)).toBe(NS / 10);
    // half a second later half of the read excess has leaked
    expect(ts.computeWait(false, NS / 2)).toBe(NS / 2);
    // time going backwards leaks nothing
    expect(ts.computeWait(false, 0)).toBe(NS / 2);
  });
});

/** A request as the pure simulation sees it. */
interface SimReq {
  size: number;
  isWrite: boolean;
  gapNs: number;
}

/**
 * One queue-depth-1 client against a ThrottleState, scheduled the way QEMU
 * does for a single member: if a wait is needed, a timer fires after it and
 * the request then runs without checking again.
 */
function simulate(cfg: ThrottleConfig, next: (i: number) => SimReq | undefined): { t: number; req: SimReq }[] {
  const ts = new ThrottleState();
  ts.config(cfg, 0);
  let now = 0;
  const out: { t: number; req: SimReq }[] = [];
  for (let i = 0; ; i++) {
    const req = next(i);
    if (req === undefined) break;
    now += req.gapNs;
    const wait = ts.computeWait(req.isWrite, now);
    if (wait > 0) now += wait;
    ts.account(req.isWrite, req.size);
    out.push({ t: now, req });
  }
  return out;
}

/** Bytes started in [from, to). */
function bytesIn(log: { t: number; req: SimReq }[], from: number, to: number): number {
  return log.filter((e) => e.t >= from && e.t < to).reduce((s, e) => s + e.req.size, 0);
}

describe('throughput over simulated time', () => {
  it('a 1 MiB/s bps limit with 4 KiB requests gives 1 MiB/s (±10%) over 60 s', () => {
    const cfg = throttleConfigFromLimits({ 'bps-total': MiB });
    const end = 60 * NS;
    const run = simulate(cfg, (i) => (i < 100000 ? { size: 4096, isWrite: i % 2 === 1, gapNs: 0 } : undefined)).filter(
      (e) => e.t < end,
    );
    const rate = bytesIn(run, 0, end) / 60;
    expect(rate).toBeGreaterThan(0.9 * MiB);
    expect(rate).toBeLessThan(1.1 * MiB);
  });

  it('a 100 iops limit gives 100 ops/s (±10%) over 60 s, counting big requests by iops-size', () => {
    const end = 60 * NS;
    const plain = simulate(throttleConfigFromLimits({ 'iops-total': 100 }), (i) =>
      i < 100000 ? { size: 65536, isWrite: false, gapNs: 0 } : undefined,
    ).filter((e) => e.t < end);
    expect(plain.length / 60).toBeGreaterThan(90);
    expect(plain.length / 60).toBeLessThan(110);
    // with iops-size 16 KiB a 64 KiB request counts as 4 ops
    const sized = simulate(throttleConfigFromLimits({ 'iops-total': 100, 'iops-size': 16384 }), (i) =>
      i < 100000 ? { size: 65536, isWrite: true, gapNs: 0 } : undefined,
    ).filter((e) => e.t < end);
    expect(sized.length / 60).toBeGreaterThan(22.5);
    expect(sized.length / 60).toBeLessThan(27.5);
  });

  it('a burst runs at max for about burst_length seconds, then falls back to avg', () => {
    // 1 MiB/s average, 10 MiB/s for 5 s
    const cfg = throttleConfigFromLimits({ 'bps-total': MiB, 'bps-total-max': 10 * MiB, 'bps-total-max-length': 5 });
    const log = simulate(cfg, (i) => (i < 200000 ? { size: 4096, isWrite: false, gapNs: 0 } : undefined));
    const first5 = bytesIn(log, 0, 5 * NS) / 5;
    expect(first5).toBeGreaterThan(0.9 * 10 * MiB);
    expect(first5).toBeLessThan(1.1 * 10 * MiB);
    const later = bytesIn(log, 20 * NS, 60 * NS) / 40;
    expect(later).toBeGreaterThan(0.9 * MiB);
    expect(later).toBeLessThan(1.1 * MiB);
    // the burst bucket is 5 s * 10 MiB/s and leaks at 1 MiB/s meanwhile: it lasts 50/9 s
    const burstEnd = (50 / 9) * NS;
    expect(bytesIn(log, 0, burstEnd - 0.2 * NS)).toBeGreaterThan(0.95 * 10 * MiB * (burstEnd / NS - 0.2));
    expect(bytesIn(log, burstEnd + 0.2 * NS, burstEnd + 5.2 * NS) / 5).toBeLessThan(1.1 * MiB);
  });

  it('after idling, a new burst is allowed again', () => {
    const cfg = throttleConfigFromLimits({ 'iops-total': 10, 'iops-total-max': 100, 'iops-total-max-length': 2 });
    // 400 back-to-back requests, then 60 s idle, then 400 more
    const log = simulate(cfg, (i) =>
      i < 800 ? { size: 512, isWrite: false, gapNs: i === 400 ? 60 * NS : 0 } : undefined,
    );
    const secondStart = log[400]!.t;
    const burst2 = log.filter((e) => e.t >= secondStart && e.t < secondStart + 1.5 * NS).length;
    expect(burst2).toBeGreaterThan(0.9 * 150);
  });
});

describe('property: never above the limit beyond the burst allowance', () => {
  type Key = 'bps-total' | 'bps-read' | 'bps-write' | 'iops-total' | 'iops-read' | 'iops-write';
  const keyArb = fc.constantFrom<Key>('bps-total', 'bps-read', 'bps-write', 'iops-total', 'iops-read', 'iops-write');
  const limitArb = fc
    .record({
      key: keyArb,
      avg: fc.integer({ min: 1, max: 50_000_000 }),
      burstFactor: fc.option(fc.integer({ min: 1, max: 20 }), { nil: undefined }),
      burstLength: fc.integer({ min: 1, max: 5 }),
      iopsSize: fc.option(fc.integer({ min: 512, max: 65536 }), { nil: undefined }),
    })
    .map(({ key, avg, burstFactor, burstLength, iopsSize }) => {
      const isOps = key.startsWith('iops');
      const l: Record<string, number> = { [key]: isOps ? Math.max(1, Math.round(avg / 100_000)) : avg };
      if (burstFactor !== undefined) {
        l[`${key}-max`] = l[key]! * burstFactor;
        l[`${key}-max-length`] = burstLength;
      }
      if (isOps && iopsSize !== undefined) l['iops-size'] = iopsSize;
      return { key, limits: l as ThrottleLimits };
    });
  const reqArb = fc.record({
    size: fc.integer({ min: 0, max: 1 << 20 }),
    isWrite: fc.boolean(),
    gapNs: fc.oneof(fc.constant(0), fc.integer({ min: 0, max: 2 * NS })),
  });

  it('units started in any window <= avg*window + bucket size + the last request', () => {
    fc.assert(
      fc.property(limitArb, fc.array(reqArb, { minLength: 1, maxLength: 150 }), ({ key, limits }, reqs) => {
        const cfg = throttleConfigFromLimits(limits);
        const log = simulate(cfg, (i) => reqs[i]);
        const isOps = key.startsWith('iops');
        const dir = key.endsWith('read') ? false : key.endsWith('write') ? true : undefined;
        const avg = limits[key]!;
        const max = limits[`${key}-max` as keyof ThrottleLimits] ?? 0;
        const len = limits[`${key}-max-length` as keyof ThrottleLimits] ?? 1;
        const bucketSize = max ? max * len : avg / 10;
        const opSize = limits['iops-size'] ?? 0;
        const units = (r: SimReq): number => {
          if (dir !== undefined && r.isWrite !== dir) return 0;
          if (!isOps) return r.size;
          return opSize && r.size > opSize ? r.size / opSize : 1;
        };
        const u = log.map((e) => units(e.req));
        const prefix = [0];
        for (const x of u) prefix.push(prefix[prefix.length - 1]! + x);
        const slack = avg / NS + 1e-6 * (bucketSize + avg);
        for (let j = 0; j < log.length; j++) {
          if (u[j] === 0) continue;
          for (let i = 0; i <= j; i++) {
            const sum = prefix[j + 1]! - prefix[i]!;
            const window = (log[j]!.t - log[i]!.t) / NS;
            const bound = avg * window + bucketSize + u[j]! + slack;
            if (sum > bound) {
              throw new Error(`window [${i},${j}] started ${sum} units, bound ${bound} (${JSON.stringify(limits)})`);
            }
          }
        }
      }),
      { numRuns: 300 },
    );
  });

  it('during a burst the rate stays near max: units in any window <= max*window + max/10 + 2 requests', () => {
    fc.assert(
      fc.property(
        fc.integer({ min: 1, max: 30 }),
        fc.integer({ min: 2, max: 10 }),
        fc.integer({ min: 2, max: 5 }),
        fc.array(
          fc.record({
            // mostly back-to-back, so bursts actually saturate
            gapNs: fc.oneof(
              { arbitrary: fc.constant(0), weight: 20 },
              { arbitrary: fc.integer({ min: 0, max: NS / 2 }), weight: 1 },
            ),
          }),
          { minLength: 1, maxLength: 400 },
        ),
        (avg, factor, len, gaps) => {
          const max = avg * factor;
          const cfg = throttleConfigFromLimits({ 'iops-total': avg, 'iops-total-max': max, 'iops-total-max-length': len });
          const log = simulate(cfg, (i) => (i < gaps.length ? { size: 512, isWrite: false, gapNs: gaps[i]!.gapNs } : undefined));
          for (let j = 0; j < log.length; j++) {
            for (let i = 0; i <= j; i++) {
              const window = (log[j]!.t - log[i]!.t) / NS;
              const bound = max * window + max / 10 + 2 + 1e-6 * max;
              if (j - i + 1 > bound) throw new Error(`window [${i},${j}] ran ${j - i + 1} ops, bound ${bound}`);
            }
          }
        },
      ),
      { numRuns: 200 },
    );
  });
});
