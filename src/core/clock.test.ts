import { describe, expect, it } from 'vitest';
import { RealClock, VirtualClock, settle } from './clock.ts';

describe('VirtualClock', () => {
  it('starts where told and only moves when advanced', async () => {
    const c = new VirtualClock(5);
    expect(c.now()).toBe(5);
    await settle();
    expect(c.now()).toBe(5);
    c.advanceSync(10);
    expect(c.now()).toBe(15);
  });

  it('fires due timers in deadline order, ties in arming order, with now() at the deadline', () => {
    const c = new VirtualClock();
    const seen: [string, number][] = [];
    c.setTimer(300, () => seen.push(['c', c.now()]));
    c.setTimer(100, () => seen.push(['a', c.now()]));
    c.setTimer(200, () => seen.push(['b1', c.now()]));
    c.setTimer(200, () => seen.push(['b2', c.now()]));
    c.setTimer(1000, () => seen.push(['late', c.now()]));
    c.advanceSync(300);
    expect(seen).toEqual([
      ['a', 100],
      ['b1', 200],
      ['b2', 200],
      ['c', 300],
    ]);
    expect(c.now()).toBe(300);
    expect(c.pendingTimers).toBe(1);
    expect(c.nextDeadline()).toBe(1000);
  });

  it('fires timers armed by callbacks within the same advance when they fall due', () => {
    const c = new VirtualClock();
    const seen: number[] = [];
    c.setTimer(10, () => {
      seen.push(c.now());
      c.setTimer(c.now() + 10, () => seen.push(c.now()));
      c.setTimer(c.now() + 1000, () => seen.push(c.now()));
    });
    c.advanceSync(100);
    expect(seen).toEqual([10, 20]);
  });

  it('clearTimer disarms; clearing twice or an unknown handle is harmless', () => {
    const c = new VirtualClock();
    let fired = false;
    const h = c.setTimer(10, () => (fired = true));
    c.clearTimer(h);
    c.clearTimer(h);
    c.clearTimer(12345);
    c.advanceSync(100);
    expect(fired).toBe(false);
  });

  it('a deadline in the past fires on the next advance without moving time back', () => {
    const c = new VirtualClock(1000);
    let at = -1;
    c.setTimer(10, () => (at = c.now()));
    c.advanceSync(0);
    expect(at).toBe(1000);
  });

  it('refuses to go backwards', async () => {
    const c = new VirtualClock();
    expect(() => c.advanceSync(-1)).toThrow(RangeError);
    await expect(c.advance(-1)).rejects.toThrow(RangeError);
  });

  it('advance lets promise continuations run between timers', async () => {
    const c = new VirtualClock();
    const sleep = (ns: number) => new Promise<void>((r) => c.setTimer(c.now() + ns, r));
    const times: number[] = [];
    const loop = (async () => {
      for (let i = 0; i < 5; i++) {
        await sleep(100);
        times.push(c.now());
      }
    })();
    await c.advance(1000);
    await loop;
    expect(times).toEqual([100, 200, 300, 400, 500]);
    expect(c.now()).toBe(1000);
  });

  it('runUntilIdle jumps from timer to timer until none is left', async () => {
    const c = new VirtualClock();
    const sleep = (ns: number) => new Promise<void>((r) => c.setTimer(c.now() + ns, r));
    let done = false;
    void (async () => {
      await sleep(1e9);
      await sleep(2e9);
      done = true;
    })();
    await c.runUntilIdle();
    expect(done).toBe(true);
    expect(c.now()).toBe(3e9);
    expect(c.pendingTimers).toBe(0);
  });

  it('runUntilIdle gives up on a timer that re-arms forever', async () => {
    const c = new VirtualClock();
    const rearm = (): void => {
      c.setTimer(c.now() + 1, rearm);
    };
    rearm();
    await expect(c.runUntilIdle(50)).rejects.toThrow(/still busy/);
  });

  it('runUntil goes to an absolute time', async () => {
    const c = new VirtualClock(100);
    await c.runUntil(50);
    expect(c.now()).toBe(100);
    await c.runUntil(500);
    expect(c.now()).toBe(500);
  });
});

describe('RealClock', () => {
  it('is monotonic and in nanoseconds', () => {
    const c = new RealClock();
    const a = c.now();
    const b = c.now();
    expect(b).toBeGreaterThanOrEqual(a);
    expect(Number.isInteger(a)).toBe(true);
    // performance.now() is ms; ns must be about a million times larger
    expect(Math.abs(a / 1e6 - performance.now())).toBeLessThan(1000);
  });

  it('never fires a timer before its deadline', async () => {
    const c = new RealClock();
    const deadline = c.now() + 2e6; // 2 ms
    const firedAt = await new Promise<number>((resolve) => c.setTimer(deadline, () => resolve(c.now())));
    expect(firedAt).toBeGreaterThanOrEqual(deadline);
  });

  it('clearTimer prevents the callback', async () => {
    const c = new RealClock();
    let fired = false;
    const h = c.setTimer(c.now() + 1e6, () => (fired = true));
    c.clearTimer(h);
    await new Promise<void>((r) => c.setTimer(c.now() + 3e6, r));
    expect(fired).toBe(false);
  });
});
