import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { isBlockError } from './errors.ts';
import { NANOSECONDS_PER_SECOND, VirtualClock, settle } from './clock.ts';
import { ThrottleGroupRegistry, type ThrottleGroupMember } from './throttle-group.ts';
import type { ThrottleLimits } from './throttle.ts';

const NS = NANOSECONDS_PER_SECOND;
const MiB = 1024 * 1024;

interface Started {
  t: number;
  bytes: number;
  /** Index of the WorkerSpec that started it. */
  spec: number;
  isWrite: boolean;
}

interface WorkerSpec {
  member: ThrottleGroupMember;
  /** Concurrent request loops (queue depth). */
  depth?: number;
  size?: number | (() => number);
  isWrite?: boolean;
}

/**
 * Runs saturating request loops on every member until `endNs` of simulated
 * time and returns every request start. Afterwards the members are
 * unregistered, which releases the loops still waiting.
 */
async function run(
  clock: VirtualClock,
  specs: WorkerSpec[],
  endNs: number,
  onStart?: (s: Started) => void,
): Promise<Started[]> {
  const log: Started[] = [];
  const loops: Promise<void>[] = [];
  specs.forEach((spec, idx) => {
    for (let d = 0; d < (spec.depth ?? 1); d++) {
      loops.push(
        (async () => {
          while (clock.now() < endNs && spec.member.registered) {
            const size = typeof spec.size === 'function' ? spec.size() : (spec.size ?? 4096);
            const isWrite = spec.isWrite ?? false;
            await spec.member.intercept(size, isWrite);
            if (clock.now() >= endNs || !spec.member.registered) break;
            const s = { t: clock.now(), bytes: size, spec: idx, isWrite };
            log.push(s);
            onStart?.(s);
          }
        })(),
      );
    }
  });
  await clock.runUntil(endNs);
  for (const s of specs) s.member.unregister();
  await Promise.all(loops);
  return log;
}

function sumBytes(log: Started[], pred: (s: Started) => boolean = () => true): number {
  return log.filter(pred).reduce((a, s) => a + s.bytes, 0);
}

function within(actual: number, expected: number, tolerance = 0.1): void {
  expect(actual).toBeGreaterThan(expected * (1 - tolerance));
  expect(actual).toBeLessThan(expected * (1 + tolerance));
}

function setup(limits: ThrottleLimits, members = 1) {
  const clock = new VirtualClock();
  const reg = new ThrottleGroupRegistry(clock);
  const ms: ThrottleGroupMember[] = [];
  for (let i = 0; i < members; i++) ms.push(reg.register('g'));
  ms[0]!.setLimits(limits);
  return { clock, reg, group: reg.get('g')!, members: ms };
}

describe('single member throughput', () => {
  it('1 MiB/s with 4 KiB requests over 60 s of simulated time (QD1)', async () => {
    const { clock, members } = setup({ 'bps-total': MiB });
    const log = await run(clock, [{ member: members[0]!, size: 4096 }], 60 * NS);
    within(sumBytes(log) / 60, MiB);
  });

  it('1 MiB/s with 4 KiB requests at queue depth 8, mixed directions', async () => {
    const { clock, members } = setup({ 'bps-total': MiB });
    const m = members[0]!;
    const log = await run(
      clock,
      [
        { member: m, size: 4096, depth: 4, isWrite: false },
        { member: m, size: 4096, depth: 4, isWrite: true },
      ],
      60 * NS,
    );
    within(sumBytes(log) / 60, MiB);
  });

  it('100 iops over 60 s', async () => {
    const { clock, members } = setup({ 'iops-total': 100 });
    const log = await run(clock, [{ member: members[0]!, size: 65536, depth: 2 }], 60 * NS);
    within(log.length / 60, 100);
  });

  it('read and write limits apply to their own direction', async () => {
    const { clock, members } = setup({ 'bps-read': MiB, 'bps-write': MiB / 2 });
    const m = members[0]!;
    const log = await run(
      clock,
      [
        { member: m, size: 4096, isWrite: false },
        { member: m, size: 4096, isWrite: true },
      ],
      60 * NS,
    );
    within(sumBytes(log, (s) => !s.isWrite) / 60, MiB);
    within(sumBytes(log, (s) => s.isWrite) / 60, MiB / 2);
  });

  it('a burst runs at max for burst_length, then falls back to avg', async () => {
    const { clock, members } = setup({ 'bps-total': MiB, 'bps-total-max': 10 * MiB, 'bps-total-max-length': 5 });
    const log = await run(clock, [{ member: members[0]!, size: 4096 }], 60 * NS);
    within(sumBytes(log, (s) => s.t < 5 * NS) / 5, 10 * MiB);
    within(sumBytes(log, (s) => s.t >= 20 * NS) / 40, MiB);
  });

  it('requests that need not wait resolve without the clock moving', async () => {
    const { clock, members } = setup({ 'iops-total': 100 });
    // 100 iops without max: a request waits only once the level is above 10 ops
    for (let i = 0; i < 11; i++) await members[0]!.intercept(512, false);
    expect(clock.now()).toBe(0);
    let done = false;
    void members[0]!.intercept(512, false).then(() => (done = true));
    await settle();
    expect(done).toBe(false);
    expect(members[0]!.pendingRequests(false)).toBe(1);
    await clock.advance(NS / 100);
    expect(done).toBe(true);
  });

  it('an unlimited group never waits', async () => {
    const clock = new VirtualClock();
    const reg = new ThrottleGroupRegistry(clock);
    const m = reg.register('free');
    expect(m.group.enabled).toBe(false);
    for (let i = 0; i < 1000; i++) await m.intercept(1 << 20, i % 2 === 0);
    expect(clock.pendingTimers).toBe(0);
  });
});

describe('sharing a group', () => {
  it('two members get equal halves and their sum respects the limit', async () => {
    const { clock, members } = setup({ 'bps-total': MiB }, 2);
    const log = await run(
      clock,
      members.map((member) => ({ member, size: 4096 })),
      60 * NS,
    );
    within(sumBytes(log) / 60, MiB);
    within(sumBytes(log, (s) => s.spec === 0) / 60, MiB / 2);
    within(sumBytes(log, (s) => s.spec === 1) / 60, MiB / 2);
  });

  it('three members get a third each, whatever their queue depths', async () => {
    const { clock, members } = setup({ 'iops-total': 300 }, 3);
    const depths = [1, 4, 16];
    const log = await run(
      clock,
      members.map((member, i) => ({ member, size: 4096, depth: depths[i]! })),
      60 * NS,
    );
    within(log.length / 60, 300);
    for (let i = 0; i < 3; i++) within(log.filter((s) => s.spec === i).length / 60, 100);
  });

  it('throttled requests are served round robin, with at most one timer per direction', async () => {
    const { clock, members } = setup({ 'iops-total': 50 }, 3);
    let maxTimers = 0;
    const log = await run(
      clock,
      members.map((member) => ({ member, depth: 2 })),
      20 * NS,
      () => (maxTimers = Math.max(maxTimers, clock.pendingTimers)),
    );
    expect(maxTimers).toBeLessThanOrEqual(1);
    // past the initial allowance every run of three consecutive starts has all three members
    const steady = log.slice(10);
    expect(steady.length).toBeGreaterThan(900);
    for (let i = 0; i + 3 <= steady.length; i++) {
      const seen = new Set(steady.slice(i, i + 3).map((s) => s.spec));
      expect(seen.size).toBe(3);
    }
  });

  it('reads and writes are scheduled independently (one timer each)', async () => {
    const { clock, members } = setup({ 'iops-read': 20, 'iops-write': 10 }, 2);
    let maxTimers = 0;
    const log = await run(
      clock,
      [
        { member: members[0]!, isWrite: false },
        { member: members[1]!, isWrite: false },
        { member: members[0]!, isWrite: true },
        { member: members[1]!, isWrite: true },
      ],
      30 * NS,
      () => (maxTimers = Math.max(maxTimers, clock.pendingTimers)),
    );
    expect(maxTimers).toBeLessThanOrEqual(2);
    within(log.filter((s) => !s.isWrite).length / 30, 20);
    within(log.filter((s) => s.isWrite).length / 30, 10);
    // spec 2 is member 0 writing: half of the writes
    within(log.filter((s) => s.spec === 2).length / 30, 5, 0.15);
  });

  it('limits set through one member apply to all of them', () => {
    const { members } = setup({ 'bps-total': 1000 }, 2);
    members[1]!.setLimits({ 'iops-write': 5 });
    expect(members[0]!.getLimits()['iops-write']).toBe(5);
    expect(members[0]!.getLimits()['bps-total']).toBe(0);
    members[0]!.updateLimits({ 'bps-read': 7 });
    expect(members[1]!.getLimits()).toMatchObject({ 'iops-write': 5, 'bps-read': 7 });
  });
});

describe('drain', () => {
  it('releases queued requests at once and lets new ones through until drainEnd', async () => {
    const { clock, members } = setup({ 'iops-total': 1 });
    const m = members[0]!;
    await m.intercept(512, false); // uses the 0.1-op allowance... and more
    const done: number[] = [];
    const queued = Array.from({ length: 10 }, (_, i) => m.intercept(512, i % 2 === 1).then(() => done.push(i)));
    await settle();
    expect(done).toEqual([]);
    expect(m.pendingRequests(false) + m.pendingRequests(true)).toBe(10);
    m.drainBegin();
    expect(m.drained).toBe(true);
    await Promise.all(queued);
    expect(clock.now()).toBe(0);
    // FIFO per direction
    expect(done.filter((i) => i % 2 === 0)).toEqual([0, 2, 4, 6, 8]);
    expect(done.filter((i) => i % 2 === 1)).toEqual([1, 3, 5, 7, 9]);
    for (let i = 0; i < 100; i++) await m.intercept(512, false);
    expect(clock.now()).toBe(0);
    // nested drains: throttling resumes after the outermost end
    m.drainBegin();
    m.drainEnd();
    for (let i = 0; i < 10; i++) await m.intercept(512, false);
    m.drainEnd();
    expect(m.drained).toBe(false);
    let late = false;
    void m.intercept(512, false).then(() => (late = true));
    await settle();
    expect(late).toBe(false);
    expect(() => m.drainEnd()).toThrow(/without drainBegin/);
    m.unregister();
  });

  it('a drained member does not wait behind another member, and the other keeps its share', async () => {
    const { clock, members } = setup({ 'iops-total': 10 }, 2);
    const [a, b] = members as [ThrottleGroupMember, ThrottleGroupMember];
    a.drainBegin();
    let aOps = 0;
    const runA = (async () => {
      for (let i = 0; i < 200; i++) {
        await a.intercept(512, false);
        aOps++;
      }
    })();
    const bLog = run(clock, [{ member: b }], 10 * NS);
    await runA;
    expect(aOps).toBe(200);
    a.drainEnd();
    a.unregister();
    // a's drained I/O was charged to the group, so b is throttled while the
    // group pays it off, but b is not starved forever and resumes.
    const log = await bLog;
    expect(log.length).toBeGreaterThan(0);
  });
});

describe('membership and registry', () => {
  it('getGroup returns one refcounted group per name', () => {
    const reg = new ThrottleGroupRegistry(new VirtualClock());
    const g1 = reg.getGroup('a');
    const g2 = reg.getGroup('a');
    expect(g1).toBe(g2);
    expect(g1.refcount).toBe(2);
    expect(reg.getGroup('b')).not.toBe(g1);
    expect(reg.names()).toEqual(['a', 'b']);
    g1.unref();
    g2.unref();
    expect(reg.has('a')).toBe(false);
    expect(() => g1.unref()).toThrow();
  });

  it('members hold a reference; the group goes with its last member', () => {
    const reg = new ThrottleGroupRegistry(new VirtualClock());
    const m1 = reg.register('g');
    const m2 = reg.register('g');
    expect(m1.group).toBe(m2.group);
    expect(m1.groupName).toBe('g');
    expect(m1.group.refcount).toBe(2);
    expect(m1.group.memberCount).toBe(2);
    m1.unregister();
    m1.unregister(); // idempotent
    expect(reg.has('g')).toBe(true);
    expect(m2.group.memberCount).toBe(1);
    m2.unregister();
    expect(reg.has('g')).toBe(false);
    expect(m2.registered).toBe(false);
  });

  it('explicit groups: duplicate names, validation, object-del semantics', () => {
    const reg = new ThrottleGroupRegistry(new VirtualClock());
    const g = reg.createGroup('tg0', { 'bps-total': 1000 });
    expect(g.getLimits()['bps-total']).toBe(1000);
    expect(() => reg.createGroup('tg0')).toThrow('A group with this name already exists');
    expect(() => reg.createGroup('bad', { 'bps-total-max': 5 })).toThrow(
      'bps_max/iops_max require corresponding bps/iops values',
    );
    expect(reg.has('bad')).toBe(false);
    const m = reg.register('tg0');
    expect(m.group).toBe(g);
    try {
      reg.deleteGroup('tg0');
      expect.unreachable();
    } catch (e) {
      expect(isBlockError(e, 'EBUSY')).toBe(true);
      expect((e as Error).message).toBe("object 'tg0' is in use, can not be deleted");
    }
    m.unregister();
    reg.deleteGroup('tg0');
    expect(reg.has('tg0')).toBe(false);
    expect(() => reg.deleteGroup('tg0')).toThrow("object 'tg0' not found");
    reg.register('implicit');
    expect(() => reg.deleteGroup('implicit')).toThrow("object 'implicit' not found");
  });

  it('unregister releases queued requests and hands the timer to the next member', async () => {
    const { clock, members } = setup({ 'iops-total': 2 }, 2);
    const [a, b] = members as [ThrottleGroupMember, ThrottleGroupMember];
    await a.intercept(512, false); // over the 0.2-op allowance: next ones wait
    const aDone: boolean[] = [];
    const aReqs = [a.intercept(512, false), a.intercept(512, false)].map((p) => p.then(() => aDone.push(true)));
    await settle();
    let bDone = 0;
    const bReqs = [b.intercept(512, false), b.intercept(512, false)].map((p) => p.then(() => bDone++));
    await settle();
    expect(aDone.length + bDone).toBe(0);
    a.unregister();
    await Promise.all(aReqs);
    expect(aDone).toHaveLength(2);
    expect(clock.now()).toBe(0);
    // a's armed timer was handed on: b's requests still complete
    await clock.runUntilIdle();
    await Promise.all(bReqs);
    expect(bDone).toBe(2);
    // an unregistered member passes through without charging
    await a.intercept(512, false);
    b.unregister();
  });

  it('setLimits restarts queued requests under the new limits', async () => {
    const { clock, members } = setup({ 'iops-total': 1 }, 2);
    const [a, b] = members as [ThrottleGroupMember, ThrottleGroupMember];
    await a.intercept(512, false);
    let done = 0;
    const reqs = [a, b, a, b, a, b].map((m) => m.intercept(512, false).then(() => done++));
    await settle();
    expect(done).toBe(0);
    a.setLimits({}); // unlimited
    await Promise.all(reqs);
    expect(done).toBe(6);
    expect(clock.now()).toBe(0);
    a.unregister();
    b.unregister();
  });

  it('an aborted queued request rejects with ECANCELED and is not charged', async () => {
    const { clock, members } = setup({ 'iops-total': 1 });
    const m = members[0]!;
    await m.intercept(512, false);
    const ac = new AbortController();
    const first = m.intercept(512, false, ac.signal);
    let secondDone = false;
    const second = m.intercept(512, false).then(() => (secondDone = true));
    await settle();
    ac.abort();
    await expect(first).rejects.toSatisfy((e: unknown) => isBlockError(e, 'ECANCELED'));
    expect(m.pendingRequests(false)).toBe(1);
    await clock.runUntilIdle();
    await second;
    expect(secondDone).toBe(true);
    // one op at 1 iops: the second request ran after ~0.9 s, not ~1.9 s
    expect(clock.now()).toBeLessThan(1.01 * NS);
    const pre = new AbortController();
    pre.abort();
    await expect(m.intercept(1, false, pre.signal)).rejects.toSatisfy((e: unknown) => isBlockError(e, 'ECANCELED'));
    m.unregister();
  });

  it('rejects negative or fractional sizes with EINVAL', async () => {
    const { members } = setup({});
    await expect(members[0]!.intercept(-1, false)).rejects.toSatisfy((e: unknown) => isBlockError(e, 'EINVAL'));
    await expect(members[0]!.intercept(1.5, true)).rejects.toSatisfy((e: unknown) => isBlockError(e, 'EINVAL'));
  });

  it('invalid limits leave the group unchanged', () => {
    const { group, members } = setup({ 'bps-total': 100 });
    expect(() => members[0]!.setLimits({ 'bps-total': 1, 'bps-read': 1 })).toThrow(/same time/);
    expect(group.getLimits()['bps-total']).toBe(100);
    expect(group.getConfig().buckets[0]!.avg).toBe(100);
  });
});

describe('property: a shared group never exceeds its limit beyond the burst allowance', () => {
  it('bytes started in [0, t] <= avg*t + bucket size + a few requests', async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.integer({ min: 64 * 1024, max: 4 * MiB }),
        fc.option(fc.record({ factor: fc.integer({ min: 1, max: 8 }), len: fc.integer({ min: 1, max: 4 }) }), {
          nil: undefined,
        }),
        fc.array(fc.record({ depth: fc.integer({ min: 1, max: 4 }), maxSize: fc.integer({ min: 512, max: 256 * 1024 }) }), {
          minLength: 1,
          maxLength: 3,
        }),
        fc.integer({ min: 1, max: 1 << 30 }),
        async (avg, burst, specs, seed) => {
          const limits: ThrottleLimits = { 'bps-total': avg };
          if (burst) {
            limits['bps-total-max'] = avg * burst.factor;
            limits['bps-total-max-length'] = burst.len;
          }
          const { clock, members: ms } = setup(limits, specs.length);
          let s = seed;
          const rand = (): number => {
            s = (s * 1103515245 + 12345) % 2147483648;
            return s / 2147483648;
          };
          const log = await run(
            clock,
            specs.map((sp, i) => ({ member: ms[i]!, depth: sp.depth, size: () => 1 + Math.floor(rand() * sp.maxSize) })),
            8 * NS,
          );
          const bucketSize = burst ? avg * burst.factor * burst.len : avg / 10;
          const maxReq = Math.max(...specs.map((sp) => sp.maxSize));
          const slack = (specs.length + 2) * maxReq + 1;
          let sum = 0;
          for (const e of log) {
            sum += e.bytes;
            const bound = (avg * e.t) / NS + bucketSize + slack;
            if (sum > bound) throw new Error(`at ${e.t} ns: ${sum} bytes > ${bound}`);
          }
        },
      ),
      { numRuns: 25 },
    );
  }, 60_000);
});
