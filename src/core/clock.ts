/**
 * Time source for throttling and accounting (QEMU's QEMUClock + QEMUTimer).
 *
 * Everything that needs "now" or a timer takes a Clock, so the same code runs
 * against the real monotonic clock in production and against a VirtualClock in
 * tests, where simulated minutes pass in milliseconds and nothing ever sleeps.
 * Times are nanoseconds held in a JS number (exact up to 2^53 ns, ~104 days of
 * uptime; beyond that precision degrades to a few ns, which is harmless here).
 */

/** Opaque id of an armed timer; only meaningful to the clock that returned it. */
export type TimerHandle = number;

/** A monotonic nanosecond clock that can arm one-shot timers. */
export interface Clock {
  /** Current time in nanoseconds; never decreases. */
  now(): number;
  /** Calls `cb` once, at or after `atNs` (a deadline in the past fires as soon as possible). */
  setTimer(atNs: number, cb: () => void): TimerHandle;
  /** Disarms a timer; unknown or already-fired handles are ignored. */
  clearTimer(handle: TimerHandle): void;
}

/** Nanoseconds in a second, as QEMU's NANOSECONDS_PER_SECOND. */
export const NANOSECONDS_PER_SECOND = 1_000_000_000;

/** Longest delay setTimeout accepts without firing immediately (2^31 - 1 ms). */
const MAX_TIMEOUT_MS = 0x7fffffff;

/**
 * The real clock: performance.now() for time and setTimeout for timers. A
 * timer never fires before its deadline (setTimeout rounds to milliseconds and
 * may fire early by a fraction; the remainder is re-armed), and delays longer
 * than setTimeout's limit are chained.
 */
export class RealClock implements Clock {
  private nextHandle = 1;
  private readonly timers = new Map<TimerHandle, ReturnType<typeof setTimeout>>();

  /** Monotonic nanoseconds since the time origin of this realm. */
  now(): number {
    return Math.floor(performance.now() * 1e6);
  }

  /** Fires `cb` at or after `atNs` on the host event loop. */
  setTimer(atNs: number, cb: () => void): TimerHandle {
    const handle = this.nextHandle++;
    const arm = (): void => {
      const remainingNs = atNs - this.now();
      const ms = Math.min(MAX_TIMEOUT_MS, Math.max(0, Math.ceil(remainingNs / 1e6)));
      this.timers.set(
        handle,
        setTimeout(() => {
          if (this.now() < atNs) {
            arm();
            return;
          }
          this.timers.delete(handle);
          cb();
        }, ms),
      );
    };
    arm();
    return handle;
  }

  /** Disarms a timer armed by this clock. */
  clearTimer(handle: TimerHandle): void {
    const t = this.timers.get(handle);
    if (t !== undefined) {
      clearTimeout(t);
      this.timers.delete(handle);
    }
  }
}

/** The process-wide real clock. */
export const realClock: Clock = new RealClock();

interface VirtualTimer {
  at: number;
  seq: number;
  cb: () => void;
}

/**
 * Yields to the host event loop once so every pending promise continuation
 * (microtask) runs. Uses setImmediate or MessageChannel where available: a
 * macrotask turn, not a sleep.
 */
export function settle(): Promise<void> {
  if (typeof setImmediate === 'function') {
    return new Promise((resolve) => setImmediate(resolve));
  }
  if (typeof MessageChannel === 'function') {
    return new Promise((resolve) => {
      const ch = new MessageChannel();
      ch.port1.onmessage = () => {
        ch.port1.close();
        resolve();
      };
      ch.port2.postMessage(null);
    });
  }
  return new Promise((resolve) => setTimeout(resolve, 0));
}

/**
 * A clock that only moves when told to. Timers fire in deadline order (ties in
 * the order they were armed) and `now()` reads the deadline of the timer being
 * fired while its callback runs. The async methods let promise continuations
 * run after every timer, so code awaiting a throttled request reacts at the
 * simulated instant the timer fired rather than at the end of the advance.
 */
export class VirtualClock implements Clock {
  private current: number;
  private seq = 0;
  private nextHandle = 1;
  private readonly timers = new Map<TimerHandle, VirtualTimer>();

  /** Starts the clock at `startNs` (default 0). */
  constructor(startNs = 0) {
    this.current = startNs;
  }

  /** The simulated time in nanoseconds. */
  now(): number {
    return this.current;
  }

  /** Arms a timer for simulated time `atNs`. */
  setTimer(atNs: number, cb: () => void): TimerHandle {
    const handle = this.nextHandle++;
    this.timers.set(handle, { at: atNs, seq: this.seq++, cb });
    return handle;
  }

  /** Disarms a timer. */
  clearTimer(handle: TimerHandle): void {
    this.timers.delete(handle);
  }

  /** Number of armed timers. */
  get pendingTimers(): number {
    return this.timers.size;
  }

  /** Deadline of the earliest armed timer, or undefined when none is armed. */
  nextDeadline(): number | undefined {
    const t = this.peek();
    return t === undefined ? undefined : t[1].at;
  }

  private peek(): [TimerHandle, VirtualTimer] | undefined {
    let best: [TimerHandle, VirtualTimer] | undefined;
    for (const entry of this.timers) {
      const t = entry[1];
      if (best === undefined || t.at < best[1].at || (t.at === best[1].at && t.seq < best[1].seq)) {
        best = entry;
      }
    }
    return best;
  }

  /** Fires the earliest timer due at or before `limitNs`; returns false when none is due. */
  private fireOne(limitNs: number): boolean {
    const next = this.peek();
    if (next === undefined || next[1].at > limitNs) return false;
    this.timers.delete(next[0]);
    if (next[1].at > this.current) this.current = next[1].at;
    next[1].cb();
    return true;
  }

  /**
   * Moves time forward by `ns`, synchronously firing every timer that falls due
   * (including timers armed by those callbacks). Promise continuations do not
   * run until the caller yields; use `advance` when they matter.
   */
  advanceSync(ns: number): void {
    if (!(ns >= 0)) throw new RangeError('VirtualClock cannot go backwards');
    const target = this.current + ns;
    while (this.fireOne(target)) {
      /* keep firing */
    }
    this.current = target;
  }

  /**
   * Moves time forward by `ns`, firing due timers one at a time and letting all
   * pending promise continuations run before the first timer and after each.
   */
  async advance(ns: number): Promise<void> {
    if (!(ns >= 0)) throw new RangeError('VirtualClock cannot go backwards');
    await this.runUntil(this.current + ns);
  }

  /** Like `advance`, but to the absolute simulated time `atNs` (no-op if already past). */
  async runUntil(atNs: number): Promise<void> {
    await settle();
    while (this.fireOne(atNs)) {
      await settle();
    }
    if (atNs > this.current) this.current = atNs;
    await settle();
  }

  /**
   * Fires timers (jumping time to each deadline) until none is armed, letting
   * promise continuations run in between. Throws after `maxTimers` timers, so
   * a timer that keeps re-arming itself cannot hang a test.
   */
  async runUntilIdle(maxTimers = 1_000_000): Promise<void> {
    await settle();
    let fired = 0;
    while (this.fireOne(Number.POSITIVE_INFINITY)) {
      if (++fired > maxTimers) throw new Error(`VirtualClock: still busy after ${maxTimers} timers`);
      await settle();
    }
  }
}
