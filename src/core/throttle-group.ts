/**
 * Throttle groups: several members (BlockBackends or throttle filter nodes)
 * sharing one set of limits, as QEMU's block/throttle-groups.c.
 *
 * All members of a group draw from one ThrottleState. Requests that must wait
 * queue FIFO per member and per direction. At most one timer per direction is
 * armed in the whole group; it belongs to the member whose turn it is (the
 * "token"). When a request runs, the next member in round-robin order that has
 * queued requests gets the next slot, so members saturating a group share it
 * equally by request count.
 *
 * Deliberate differences from QEMU, each because JS has no coroutines to
 * assert on: unregistering a member with queued requests releases them
 * (unthrottled) instead of asserting; a drained member never waits for another
 * member's timer; changing the limits restarts every member of the group, not
 * only the one the change came through, so a relaxed limit takes effect for
 * all queued requests at once.
 */

import { BlockError } from './errors.ts';
import { realClock, type Clock, type TimerHandle } from './clock.ts';
import {
  ThrottleState,
  throttleConfigInit,
  throttleConfigToLimits,
  throttleIsValid,
  throttleLimitsToConfig,
  type ThrottleConfig,
  type ThrottleLimits,
} from './throttle.ts';

/** 0 = read, 1 = write (QEMU's ThrottleDirection). */
type Dir = 0 | 1;
const DIRS: readonly Dir[] = [0, 1];

interface Waiter {
  wake: () => void;
}

/**
 * A one-shot timer of one member and direction. A deadline that is already
 * due runs on a microtask instead of the clock, so an "expire now" timer does
 * not depend on anyone advancing a virtual clock.
 */
class MemberTimer {
  private handle: TimerHandle | null = null;
  private immediate: { cancelled: boolean } | null = null;

  constructor(
    private readonly clock: Clock,
    private readonly fire: () => void,
  ) {}

  /** True while armed (on the clock or as an immediate microtask). */
  get pending(): boolean {
    return this.handle !== null || this.immediate !== null;
  }

  /** (Re)arms the timer for `atNs`, cancelling any previous deadline. */
  arm(atNs: number): void {
    this.cancel();
    if (atNs <= this.clock.now()) {
      const tok = { cancelled: false };
      this.immediate = tok;
      queueMicrotask(() => {
        if (tok.cancelled) return;
        this.immediate = null;
        this.fire();
      });
      return;
    }
    this.handle = this.clock.setTimer(atNs, () => {
      this.handle = null;
      this.fire();
    });
  }

  /** Disarms the timer; harmless if not armed. */
  cancel(): void {
    if (this.handle !== null) {
      this.clock.clearTimer(this.handle);
      this.handle = null;
    }
    if (this.immediate !== null) {
      this.immediate.cancelled = true;
      this.immediate = null;
    }
  }
}

/** Per-member scheduling state (the parts of QEMU's ThrottleGroupMember the group touches). */
class Slot {
  /** Requests waiting or woken-but-not-yet-run, per direction. */
  readonly pending: [number, number] = [0, 0];
  /** Waiting requests in arrival order, per direction. */
  readonly queues: [Waiter[], Waiter[]] = [[], []];
  readonly timers: [MemberTimer, MemberTimer];
  /** Drain depth; while > 0 the member is not throttled (io_limits_disabled). */
  ioLimitsDisabled = 0;
  detached = false;

  constructor(clock: Clock, onTimer: (slot: Slot, dir: Dir) => void) {
    this.timers = [new MemberTimer(clock, () => onTimer(this, 0)), new MemberTimer(clock, () => onTimer(this, 1))];
  }
}

/** The round-robin scheduler of one group: QEMU's ThrottleGroup minus the name and refcount. */
class Scheduler {
  readonly ts = new ThrottleState();
  /** Members in round-robin order; new members go first, as QLIST_INSERT_HEAD. */
  readonly slots: Slot[] = [];
  readonly tokens: [Slot | null, Slot | null] = [null, null];
  readonly anyTimerArmed: [boolean, boolean] = [false, false];

  constructor(readonly clock: Clock) {
    this.ts.config(throttleConfigInit(), clock.now());
  }

  private readonly onTimer = (slot: Slot, dir: Dir): void => this.timerCb(slot, dir);

  /** Adds a member at the head of the round-robin list; it becomes the token if there is none. */
  register(): Slot {
    const slot = new Slot(this.clock, this.onTimer);
    for (const d of DIRS) if (this.tokens[d] === null) this.tokens[d] = slot;
    this.slots.unshift(slot);
    return slot;
  }

  /** Next member in the circular round-robin list. */
  private nextSlot(slot: Slot): Slot {
    const i = this.slots.indexOf(slot);
    return this.slots[(i + 1) % this.slots.length]!;
  }

  /** Next member with pending requests after the current token, or `slot` if there is none. */
  private nextToken(slot: Slot, dir: Dir): Slot {
    // A drained member with queued requests is served at once, without
    // waiting for other members' throttled requests.
    if (slot.pending[dir] > 0 && slot.ioLimitsDisabled > 0) return slot;
    const start = this.tokens[dir] ?? slot;
    let token = this.nextSlot(start);
    while (token !== start && token.pending[dir] === 0) token = this.nextSlot(token);
    if (token === start && token.pending[dir] === 0) token = slot;
    return token;
  }

  /**
   * Whether the next request of `slot` must wait; if it must and no timer of
   * the group is armed, arms `slot`'s timer and makes it the token.
   */
  private scheduleTimer(slot: Slot, dir: Dir): boolean {
    if (slot.ioLimitsDisabled > 0) return false;
    if (this.anyTimerArmed[dir]) return true;
    const now = this.clock.now();
    const wait = this.ts.computeWait(dir === 1, now);
    if (wait <= 0) return false;
    if (!slot.timers[dir].pending) slot.timers[dir].arm(now + wait);
    this.tokens[dir] = slot;
    this.anyTimerArmed[dir] = true;
    return true;
  }

  /** Wakes the oldest waiting request of `slot`; false if none was waiting. */
  private restartQueueNow(slot: Slot, dir: Dir): boolean {
    const w = slot.queues[dir].shift();
    if (w === undefined) return false;
    w.wake();
    return true;
  }

  /** Finds the member whose request runs next and either wakes it or arms its timer. */
  private scheduleNextRequest(slot: Slot, dir: Dir): void {
    let token = this.nextToken(slot, dir);
    if (token.pending[dir] === 0) return;
    if (!this.scheduleTimer(token, dir)) {
      // Give preference to the current member's own queue.
      if (this.restartQueueNow(slot, dir)) {
        token = slot;
      } else {
        token.timers[dir].arm(this.clock.now());
        this.anyTimerArmed[dir] = true;
      }
      this.tokens[dir] = token;
    }
  }

  private restartQueue(slot: Slot, dir: Dir): void {
    if (!this.restartQueueNow(slot, dir)) this.scheduleNextRequest(slot, dir);
  }

  private timerCb(slot: Slot, dir: Dir): void {
    if (slot.detached) return;
    this.anyTimerArmed[dir] = false;
    this.restartQueue(slot, dir);
  }

  /** Fires `slot`'s pending timers now, or runs its next queued request (throttle_group_restart_tgm). */
  restartMember(slot: Slot): void {
    for (const d of DIRS) {
      const t = slot.timers[d];
      if (t.pending) {
        t.cancel();
        this.timerCb(slot, d);
      } else {
        this.restartQueue(slot, d);
      }
    }
  }

  /** Installs a new configuration (buckets emptied) and restarts every member. */
  config(cfg: ThrottleConfig): void {
    this.ts.config(cfg, this.clock.now());
    for (const s of [...this.slots]) this.restartMember(s);
  }

  /** QEMU's throttle_group_co_io_limits_intercept: wait for our turn, charge the request, schedule the next one. */
  async intercept(slot: Slot, bytes: number, dir: Dir, signal?: AbortSignal): Promise<void> {
    if (signal?.aborted) throw new BlockError('ECANCELED');
    const token = slot.ioLimitsDisabled > 0 ? slot : this.nextToken(slot, dir);
    const mustWait = this.scheduleTimer(token, dir);
    if (mustWait || slot.pending[dir] > 0) {
      slot.pending[dir]++;
      try {
        await this.enqueue(slot, dir, signal);
      } catch (e) {
        if (!slot.detached) slot.pending[dir]--;
        throw e;
      }
      // Released by unregister(): run unthrottled and leave the group alone.
      if (slot.detached) return;
      slot.pending[dir]--;
    }
    this.ts.account(dir === 1, bytes);
    this.scheduleNextRequest(slot, dir);
  }

  private enqueue(slot: Slot, dir: Dir, signal?: AbortSignal): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      const queue = slot.queues[dir];
      if (!signal) {
        queue.push({ wake: resolve });
        return;
      }
      const w: Waiter = { wake: resolve };
      const onAbort = (): void => {
        const i = queue.indexOf(w);
        if (i >= 0) {
          queue.splice(i, 1);
          reject(new BlockError('ECANCELED'));
        }
      };
      w.wake = () => {
        signal.removeEventListener('abort', onAbort);
        resolve();
      };
      signal.addEventListener('abort', onAbort, { once: true });
      queue.push(w);
    });
  }

  /** Removes `slot` from the group, releasing its queued requests and handing its timer on. */
  unregister(slot: Slot): void {
    if (slot.detached) return;
    slot.detached = true;
    const hadTimer: [boolean, boolean] = [false, false];
    for (const d of DIRS) {
      hadTimer[d] = slot.timers[d].pending;
      slot.timers[d].cancel();
      const waiters = slot.queues[d].splice(0);
      slot.pending[d] = 0;
      for (const w of waiters) w.wake();
      if (this.tokens[d] === slot) {
        const next = this.nextSlot(slot);
        this.tokens[d] = next === slot ? null : next;
      }
    }
    const i = this.slots.indexOf(slot);
    if (i >= 0) this.slots.splice(i, 1);
    for (const d of DIRS) {
      if (!hadTimer[d]) continue;
      this.anyTimerArmed[d] = false;
      const token = this.tokens[d];
      if (token !== null) this.scheduleNextRequest(token, d);
    }
  }
}

/**
 * A named set of limits shared by its members. Obtain one from a
 * ThrottleGroupRegistry; it stays in the registry while referenced.
 */
export class ThrottleGroup {
  /** The group's name, constant for its lifetime. */
  readonly name: string;
  private refs = 0;
  private readonly sched: Scheduler;
  /** True when created explicitly (createGroup, QEMU's -object throttle-group). */
  readonly explicit: boolean;

  /** Use ThrottleGroupRegistry.getGroup/createGroup instead of constructing directly. */
  constructor(
    name: string,
    private readonly registry: ThrottleGroupRegistry,
    explicit: boolean,
  ) {
    this.name = name;
    this.explicit = explicit;
    this.sched = new Scheduler(registry.clock);
  }

  /** The clock the group's timers run on. */
  get clock(): Clock {
    return this.sched.clock;
  }

  /** Number of references held (members plus explicit creation plus getGroup callers). */
  get refcount(): number {
    return this.refs;
  }

  /** Number of registered members. */
  get memberCount(): number {
    return this.sched.slots.length;
  }

  /** True if any limit is set. */
  get enabled(): boolean {
    return this.sched.ts.enabled;
  }

  /** Takes a reference; returns this. */
  ref(): this {
    this.refs++;
    return this;
  }

  /** Drops a reference; at zero the group leaves its registry. */
  unref(): void {
    if (this.refs <= 0) throw new BlockError('EINVAL', `throttle group '${this.name}' has no references`);
    if (--this.refs === 0) this.registry.forget(this);
  }

  /** Copy of the live configuration, bucket levels included. */
  getConfig(): ThrottleConfig {
    return this.sched.ts.getConfig();
  }

  /** Validates `cfg` (throws EINVAL with QEMU's message), installs it with empty buckets and restarts queued requests. */
  setConfig(cfg: ThrottleConfig): void {
    throttleIsValid(cfg);
    this.sched.config(cfg);
  }

  /** Every ThrottleLimits key for the current configuration. */
  getLimits(): Required<ThrottleLimits> {
    return throttleConfigToLimits(this.sched.ts.cfg);
  }

  /** Replaces the whole configuration by `limits` (absent keys = unlimited), like block_set_io_throttle. */
  setLimits(limits: ThrottleLimits): void {
    this.sched.config(throttleLimitsToConfig(limits));
  }

  /** Changes only the keys present in `limits`, like setting a throttle-group object's `limits` property. */
  updateLimits(limits: ThrottleLimits): void {
    this.sched.config(throttleLimitsToConfig(limits, this.sched.ts.cfg));
  }

  /** Adds a member (taking a reference on the group) and returns it; QEMU's throttle_group_register_tgm. */
  register(): ThrottleGroupMember {
    this.ref();
    return new ThrottleGroupMember(this, this.sched, this.sched.register());
  }
}

/**
 * One user of a throttle group, e.g. a BlockBackend: call `intercept` before
 * every read or write and only then start the I/O.
 */
export class ThrottleGroupMember {
  /** Use ThrottleGroup.register or ThrottleGroupRegistry.register instead of constructing directly. */
  constructor(
    /** The group this member belongs to (still readable after unregister). */
    readonly group: ThrottleGroup,
    private readonly sched: Scheduler,
    private readonly slot: Slot,
  ) {}

  /** Name of the member's group. */
  get groupName(): string {
    return this.group.name;
  }

  /** False once unregister() has run. */
  get registered(): boolean {
    return !this.slot.detached;
  }

  /** True between drainBegin() and the matching drainEnd(). */
  get drained(): boolean {
    return this.slot.ioLimitsDisabled > 0;
  }

  /** Requests of this member that are queued or woken but not yet started, in one direction. */
  pendingRequests(isWrite: boolean): number {
    return this.slot.pending[isWrite ? 1 : 0];
  }

  /**
   * Resolves when a request of `bytes` bytes in the given direction may start,
   * and charges it to the group's buckets at that moment. Requests of one
   * member and direction start in call order. Rejects with ECANCELED if
   * `signal` fires while the request is queued (nothing is charged), EINVAL
   * for a negative or non-integer size. After unregister() it resolves at once
   * without charging anything.
   */
  intercept(bytes: number, isWrite: boolean, signal?: AbortSignal): Promise<void> {
    if (!Number.isSafeInteger(bytes) || bytes < 0) {
      return Promise.reject(new BlockError('EINVAL', `Invalid request size ${bytes}`));
    }
    if (this.slot.detached) return Promise.resolve();
    return this.sched.intercept(this.slot, bytes, isWrite ? 1 : 0, signal);
  }

  /** Replaces the group's limits (see ThrottleGroup.setLimits). */
  setLimits(limits: ThrottleLimits): void {
    this.group.setLimits(limits);
  }

  /** Changes only the given keys of the group's limits (see ThrottleGroup.updateLimits). */
  updateLimits(limits: ThrottleLimits): void {
    this.group.updateLimits(limits);
  }

  /** The group's limits, every key present. */
  getLimits(): Required<ThrottleLimits> {
    return this.group.getLimits();
  }

  /** Installs a validated ThrottleConfig on the group. */
  setConfig(cfg: ThrottleConfig): void {
    this.group.setConfig(cfg);
  }

  /** Copy of the group's live configuration. */
  getConfig(): ThrottleConfig {
    return this.group.getConfig();
  }

  /**
   * Disables throttling for this member (nestable): queued requests are
   * released at once, and new ones run without waiting, though they are
   * still charged to the group. Mirrors blk_root_drained_begin.
   */
  drainBegin(): void {
    if (this.slot.ioLimitsDisabled++ === 0 && !this.slot.detached) this.sched.restartMember(this.slot);
  }

  /** Ends one drainBegin(); throttling resumes after the outermost one. Throws EINVAL if not drained. */
  drainEnd(): void {
    if (this.slot.ioLimitsDisabled === 0) throw new BlockError('EINVAL', 'drainEnd() without drainBegin()');
    this.slot.ioLimitsDisabled--;
  }

  /**
   * Leaves the group (dropping this member's reference): queued requests are
   * released unthrottled, an armed timer is handed to the next member. Idempotent.
   */
  unregister(): void {
    if (this.slot.detached) return;
    this.sched.unregister(this.slot);
    this.group.unref();
  }
}

/**
 * Named throttle groups on one clock. Groups are refcounted: created on first
 * use by getGroup/register, removed when the last reference goes.
 */
export class ThrottleGroupRegistry {
  private readonly groups = new Map<string, ThrottleGroup>();

  /** Creates an empty registry whose groups time with `clock` (default: the real clock). */
  constructor(readonly clock: Clock = realClock) {}

  /** True if a group of that name exists (throttle_group_exists). */
  has(name: string): boolean {
    return this.groups.has(name);
  }

  /** The group of that name without taking a reference, or undefined. */
  get(name: string): ThrottleGroup | undefined {
    return this.groups.get(name);
  }

  /** Names of all live groups, in creation order. */
  names(): string[] {
    return [...this.groups.keys()];
  }

  /** Returns the named group with a new reference, creating an unlimited one if needed (throttle_group_incref). */
  getGroup(name: string): ThrottleGroup {
    let g = this.groups.get(name);
    if (g === undefined) {
      g = new ThrottleGroup(name, this, false);
      this.groups.set(name, g);
    }
    return g.ref();
  }

  /**
   * Creates a group explicitly, like `-object throttle-group,id=name,limits…`,
   * holding one reference until deleteGroup. Throws EINVAL "A group with this
   * name already exists" or QEMU's limit validation messages.
   */
  createGroup(name: string, limits: ThrottleLimits = {}): ThrottleGroup {
    if (this.groups.has(name)) throw new BlockError('EINVAL', 'A group with this name already exists');
    const cfg = throttleLimitsToConfig(limits);
    const g = new ThrottleGroup(name, this, true);
    g.setConfig(cfg);
    this.groups.set(name, g);
    return g.ref();
  }

  /**
   * Deletes an explicitly created group, like object-del: ENOENT "object 'x'
   * not found" if there is none, EBUSY "object 'x' is in use, can not be
   * deleted" while members or other references remain.
   */
  deleteGroup(name: string): void {
    const g = this.groups.get(name);
    if (g === undefined || !g.explicit) throw new BlockError('ENOENT', `object '${name}' not found`);
    if (g.refcount > 1) throw new BlockError('EBUSY', `object '${name}' is in use, can not be deleted`);
    g.unref();
  }

  /** Registers a new member in the named group, creating the group if needed (throttle_group_register_tgm). */
  register(name: string): ThrottleGroupMember {
    const g = this.getGroup(name);
    const m = g.register();
    g.unref();
    return m;
  }

  /** Called by ThrottleGroup when its last reference goes. */
  forget(group: ThrottleGroup): void {
    if (this.groups.get(group.name) === group) this.groups.delete(group.name);
  }
}

/** The process-wide registry on the real clock, for callers that do not bring their own. */
export const throttleGroups = new ThrottleGroupRegistry();
