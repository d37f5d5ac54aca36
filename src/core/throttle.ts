/**
 * I/O throttling: QEMU's leaky-bucket algorithm (util/throttle.c) as pure
 * logic. Nothing here reads a clock or arms a timer; callers pass `now` in
 * nanoseconds. ThrottleGroup (throttle-group.ts) adds the timers and the
 * round-robin scheduling between the members of a group.
 *
 * Six buckets limit bytes and operations per second, in total and per
 * direction. Each bucket has an average rate `avg`, an optional burst rate
 * `max` that may be sustained for `burstLength` seconds, and two levels: the
 * main `level` leaks at `avg` and holds `max * burstLength` units (or `avg/10`
 * without a burst rate) before requests must wait; `burstLevel` leaks at `max`
 * and holds `max/10`, which caps the rate during a burst. `opSize` (iops-size)
 * makes a large request count as several operations.
 */

import { BlockError } from './errors.ts';
import { NANOSECONDS_PER_SECOND } from './clock.ts';

/** Largest accepted rate or burst value, QEMU's THROTTLE_VALUE_MAX. */
export const THROTTLE_VALUE_MAX = 1_000_000_000_000_000;

/** Largest accepted burst length in seconds (C's UINT_MAX). */
export const THROTTLE_BURST_LENGTH_MAX = 4_294_967_295;

/** Bucket indices in QEMU's order (BucketType). */
export const BucketType = {
  BPS_TOTAL: 0,
  BPS_READ: 1,
  BPS_WRITE: 2,
  OPS_TOTAL: 3,
  OPS_READ: 4,
  OPS_WRITE: 5,
} as const;

/** One of the six bucket indices. */
export type BucketIndex = (typeof BucketType)[keyof typeof BucketType];

/** Number of buckets in a ThrottleConfig. */
export const BUCKETS_COUNT = 6;

/** A leaky bucket: configuration (avg, max, burstLength) plus state (level, burstLevel). */
export interface LeakyBucket {
  /** Average goal in units (bytes or operations) per second; 0 = unlimited. */
  avg: number;
  /** Burst rate in units per second; 0 = no burst configured. */
  max: number;
  /** Units accounted and not yet leaked at `avg`. */
  level: number;
  /** Units accounted and not yet leaked at `max` (tracked only when burstLength > 1). */
  burstLevel: number;
  /** Seconds the burst rate may be sustained; at least 1. */
  burstLength: number;
}

/** The six buckets plus the iops-size; QEMU's ThrottleConfig. */
export interface ThrottleConfig {
  /** Indexed by BucketType. */
  buckets: LeakyBucket[];
  /** Size in bytes of one operation for the iops buckets; 0 = every request is one op. */
  opSize: number;
}

/** QEMU's QAPI ThrottleLimits: every key optional, values in bytes/ops per second. */
export interface ThrottleLimits {
  'iops-total'?: number;
  'iops-total-max'?: number;
  'iops-total-max-length'?: number;
  'iops-read'?: number;
  'iops-read-max'?: number;
  'iops-read-max-length'?: number;
  'iops-write'?: number;
  'iops-write-max'?: number;
  'iops-write-max-length'?: number;
  'bps-total'?: number;
  'bps-total-max'?: number;
  'bps-total-max-length'?: number;
  'bps-read'?: number;
  'bps-read-max'?: number;
  'bps-read-max-length'?: number;
  'bps-write'?: number;
  'bps-write-max'?: number;
  'bps-write-max-length'?: number;
  'iops-size'?: number;
}

/** A key of ThrottleLimits. */
export type ThrottleLimitKey = keyof ThrottleLimits;

/** QAPI key stem of each bucket, indexed by BucketType. */
const BUCKET_KEYS = ['bps-total', 'bps-read', 'bps-write', 'iops-total', 'iops-read', 'iops-write'] as const;

/** Every key ThrottleLimits accepts, in QAPI declaration order. */
export const THROTTLE_LIMIT_KEYS: readonly ThrottleLimitKey[] = [
  'iops-total', 'iops-total-max', 'iops-total-max-length',
  'iops-read', 'iops-read-max', 'iops-read-max-length',
  'iops-write', 'iops-write-max', 'iops-write-max-length',
  'bps-total', 'bps-total-max', 'bps-total-max-length',
  'bps-read', 'bps-read-max', 'bps-read-max-length',
  'bps-write', 'bps-write-max', 'bps-write-max-length',
  'iops-size',
];

/** Buckets checked for a read and for a write, QEMU's to_check table. */
const TO_CHECK: readonly (readonly BucketIndex[])[] = [
  [BucketType.BPS_TOTAL, BucketType.OPS_TOTAL, BucketType.BPS_READ, BucketType.OPS_READ],
  [BucketType.BPS_TOTAL, BucketType.OPS_TOTAL, BucketType.BPS_WRITE, BucketType.OPS_WRITE],
];

/** (size bucket, units bucket) pairs charged for a read and for a write. */
const TO_ACCOUNT: readonly (readonly (readonly [BucketIndex, BucketIndex])[])[] = [
  [[BucketType.BPS_TOTAL, BucketType.OPS_TOTAL], [BucketType.BPS_READ, BucketType.OPS_READ]],
  [[BucketType.BPS_TOTAL, BucketType.OPS_TOTAL], [BucketType.BPS_WRITE, BucketType.OPS_WRITE]],
];

/** Returns a bucket with no limit and burst length 1. */
function emptyBucket(): LeakyBucket {
  return { avg: 0, max: 0, level: 0, burstLevel: 0, burstLength: 1 };
}

/** Returns an unlimited configuration (every burst length 1), QEMU's throttle_config_init. */
export function throttleConfigInit(): ThrottleConfig {
  const buckets: LeakyBucket[] = [];
  for (let i = 0; i < BUCKETS_COUNT; i++) buckets.push(emptyBucket());
  return { buckets, opSize: 0 };
}

/** Returns a deep copy of `cfg` (levels included). */
export function cloneThrottleConfig(cfg: ThrottleConfig): ThrottleConfig {
  return { buckets: cfg.buckets.map((b) => ({ ...b })), opSize: cfg.opSize };
}

/** Leaks `deltaNs` worth of units from the bucket: `level` at avg, `burstLevel` at max when burstLength > 1. */
export function throttleLeakBucket(bkt: LeakyBucket, deltaNs: number): void {
  const leak = (bkt.avg * deltaNs) / NANOSECONDS_PER_SECOND;
  bkt.level = Math.max(bkt.level - leak, 0);
  if (bkt.burstLength > 1) {
    const burstLeak = (bkt.max * deltaNs) / NANOSECONDS_PER_SECOND;
    bkt.burstLevel = Math.max(bkt.burstLevel - burstLeak, 0);
  }
}

/** Nanoseconds (truncated like QEMU's int64 cast) needed to leak `extra` units at `limit` per second. */
function computeWaitNs(limit: number, extra: number): number {
  return Math.trunc((extra * NANOSECONDS_PER_SECOND) / limit);
}

/**
 * Returns how many nanoseconds a request must wait because of this bucket, or
 * 0 if it may go now. The main bucket holds `max * burstLength` units (or
 * avg/10 without a burst rate); during a burst longer than one second the
 * burst bucket (max/10 units, leaking at max) also has to have room.
 */
export function throttleComputeWait(bkt: LeakyBucket): number {
  if (!bkt.avg) return 0;
  let bucketSize: number;
  let burstBucketSize: number;
  if (!bkt.max) {
    // Without a burst rate still allow 100 ms worth of I/O at once, or every
    // other request would be throttled.
    bucketSize = bkt.avg / 10;
    burstBucketSize = 0;
  } else {
    bucketSize = bkt.max * bkt.burstLength;
    burstBucketSize = bkt.max / 10;
  }
  let extra = bkt.level - bucketSize;
  if (extra > 0) return computeWaitNs(bkt.avg, extra);
  if (bkt.burstLength > 1) {
    extra = bkt.burstLevel - burstBucketSize;
    if (extra > 0) return computeWaitNs(bkt.max, extra);
  }
  return 0;
}

/** True if any bucket has an average limit, QEMU's throttle_enabled. */
export function throttleEnabled(cfg: ThrottleConfig): boolean {
  return cfg.buckets.some((b) => b.avg > 0);
}

/**
 * Returns QEMU's error message for an invalid configuration, or null if it is
 * valid. The checks and their order are those of throttle_is_valid.
 */
export function throttleConfigError(cfg: ThrottleConfig): string | null {
  const b = cfg.buckets;
  const bpsFlag = !!b[BucketType.BPS_TOTAL]!.avg && (!!b[BucketType.BPS_READ]!.avg || !!b[BucketType.BPS_WRITE]!.avg);
  const opsFlag = !!b[BucketType.OPS_TOTAL]!.avg && (!!b[BucketType.OPS_READ]!.avg || !!b[BucketType.OPS_WRITE]!.avg);
  const bpsMaxFlag = !!b[BucketType.BPS_TOTAL]!.max && (!!b[BucketType.BPS_READ]!.max || !!b[BucketType.BPS_WRITE]!.max);
  const opsMaxFlag = !!b[BucketType.OPS_TOTAL]!.max && (!!b[BucketType.OPS_READ]!.max || !!b[BucketType.OPS_WRITE]!.max);
  if (bpsFlag || opsFlag || bpsMaxFlag || opsMaxFlag) {
    return 'bps/iops/max total values and read/write values cannot be used at the same time';
  }
  if (cfg.opSize && !b[BucketType.OPS_TOTAL]!.avg && !b[BucketType.OPS_READ]!.avg && !b[BucketType.OPS_WRITE]!.avg) {
    return 'iops size requires an iops value to be set';
  }
  for (const bkt of b) {
    // QEMU keeps these as uint64, so a negative value shows up as a huge one.
    if (!inRange(bkt.avg) || !inRange(bkt.max)) {
      return `bps/iops/max values must be within [0, ${THROTTLE_VALUE_MAX}]`;
    }
    if (!bkt.burstLength) return 'the burst length cannot be 0';
    if (bkt.burstLength > 1 && !bkt.max) return 'burst length set without burst rate';
    if (bkt.max && bkt.burstLength > Math.floor(THROTTLE_VALUE_MAX / bkt.max)) {
      return 'burst length too high for this burst rate';
    }
    if (bkt.max && !bkt.avg) return 'bps_max/iops_max require corresponding bps/iops values';
    if (bkt.max && bkt.max < bkt.avg) return 'bps_max/iops_max cannot be lower than bps/iops';
  }
  return null;
}

function inRange(v: number): boolean {
  return Number.isFinite(v) && v >= 0 && v <= THROTTLE_VALUE_MAX;
}

/** Throws BlockError EINVAL with QEMU's message if `cfg` is invalid (throttle_is_valid). */
export function throttleIsValid(cfg: ThrottleConfig): void {
  const msg = throttleConfigError(cfg);
  if (msg !== null) throw new BlockError('EINVAL', msg);
}

/**
 * Builds a configuration from QAPI ThrottleLimits, starting from `base` (a
 * copy; default unlimited) and overriding only the keys present, then
 * validates it. Throws BlockError EINVAL with QEMU's messages: unknown keys,
 * non-integers, out-of-range burst lengths and everything throttleIsValid
 * rejects. Levels of the result are zero.
 */
export function throttleLimitsToConfig(limits: ThrottleLimits, base?: ThrottleConfig): ThrottleConfig {
  const cfg = base ? cloneThrottleConfig(base) : throttleConfigInit();
  const raw = limits as Readonly<Record<string, unknown>>;
  for (const key of Object.keys(raw)) {
    if (!(THROTTLE_LIMIT_KEYS as readonly string[]).includes(key)) {
      throw new BlockError('EINVAL', `Parameter '${key}' is unexpected`);
    }
  }
  const get = (key: ThrottleLimitKey): number | undefined => {
    const v = raw[key];
    if (v === undefined) return undefined;
    if (typeof v !== 'number' || !Number.isSafeInteger(v)) {
      throw new BlockError('EINVAL', `Invalid parameter type for '${key}', expected: integer`);
    }
    return v;
  };
  for (let i = 0; i < BUCKETS_COUNT; i++) {
    const v = get(BUCKET_KEYS[i]!);
    if (v !== undefined) cfg.buckets[i]!.avg = v;
  }
  for (let i = 0; i < BUCKETS_COUNT; i++) {
    const v = get(`${BUCKET_KEYS[i]!}-max` as ThrottleLimitKey);
    if (v !== undefined) cfg.buckets[i]!.max = v;
  }
  for (let i = 0; i < BUCKETS_COUNT; i++) {
    const key = `${BUCKET_KEYS[i]!}-max-length` as ThrottleLimitKey;
    const v = get(key);
    if (v === undefined) continue;
    if (v < 0 || v > THROTTLE_BURST_LENGTH_MAX) {
      throw new BlockError('EINVAL', `${key} value must be in the range [0, ${THROTTLE_BURST_LENGTH_MAX}]`);
    }
    cfg.buckets[i]!.burstLength = v;
  }
  const opSize = get('iops-size');
  if (opSize !== undefined) {
    if (opSize < 0) throw new BlockError('EINVAL', 'Property values cannot be negative');
    cfg.opSize = opSize;
  }
  for (const b of cfg.buckets) {
    b.level = 0;
    b.burstLevel = 0;
  }
  throttleIsValid(cfg);
  return cfg;
}

/** Same as throttleLimitsToConfig: QAPI ThrottleLimits keys in, validated ThrottleConfig out. */
export function throttleConfigFromLimits(limits: ThrottleLimits, base?: ThrottleConfig): ThrottleConfig {
  return throttleLimitsToConfig(limits, base);
}

/** Returns every ThrottleLimits key for `cfg`, as QEMU's throttle_config_to_limits (all keys present). */
export function throttleConfigToLimits(cfg: ThrottleConfig): Required<ThrottleLimits> {
  const out: Record<string, number> = {};
  for (let i = 0; i < BUCKETS_COUNT; i++) {
    const b = cfg.buckets[i]!;
    const stem = BUCKET_KEYS[i]!;
    out[stem] = b.avg;
    out[`${stem}-max`] = b.max;
    out[`${stem}-max-length`] = b.burstLength;
  }
  out['iops-size'] = cfg.opSize;
  const ordered: Record<string, number> = {};
  for (const k of THROTTLE_LIMIT_KEYS) ordered[k] = out[k]!;
  return ordered as Required<ThrottleLimits>;
}

/**
 * A configuration plus the time of its last leak: QEMU's ThrottleState. One is
 * shared by all members of a throttle group.
 */
export class ThrottleState {
  /** The live configuration, bucket levels included. */
  cfg: ThrottleConfig = throttleConfigInit();
  /** Time (ns) up to which the buckets have leaked. */
  previousLeak = 0;

  /** Installs a copy of `cfg` with empty buckets, leaking from `nowNs` on (QEMU's throttle_config). Does not validate. */
  config(cfg: ThrottleConfig, nowNs: number): void {
    this.cfg = cloneThrottleConfig(cfg);
    for (const b of this.cfg.buckets) {
      b.level = 0;
      b.burstLevel = 0;
    }
    this.previousLeak = nowNs;
  }

  /** Returns a copy of the live configuration (levels included). */
  getConfig(): ThrottleConfig {
    return cloneThrottleConfig(this.cfg);
  }

  /** Leaks every bucket for the time elapsed since the previous leak; time going backwards leaks nothing. */
  leak(nowNs: number): void {
    const delta = nowNs - this.previousLeak;
    this.previousLeak = nowNs;
    if (delta <= 0) return;
    for (const b of this.cfg.buckets) throttleLeakBucket(b, delta);
  }

  /**
   * Leaks up to `nowNs`, then returns how long (ns) the next request in the
   * given direction must wait: the largest wait of the four buckets that
   * apply to it, 0 if it may go now (QEMU's throttle_compute_timer).
   */
  computeWait(isWrite: boolean, nowNs: number): number {
    this.leak(nowNs);
    let maxWait = 0;
    for (const i of TO_CHECK[isWrite ? 1 : 0]!) {
      const w = throttleComputeWait(this.cfg.buckets[i]!);
      if (w > maxWait) maxWait = w;
    }
    return maxWait;
  }

  /**
   * Accounts a request that is about to run: `bytes` go into the bps buckets
   * and one operation, or bytes/opSize when opSize is set and smaller than
   * the request, into the iops buckets (QEMU's throttle_account).
   */
  account(isWrite: boolean, bytes: number): void {
    let units = 1;
    if (this.cfg.opSize && bytes > this.cfg.opSize) units = bytes / this.cfg.opSize;
    const bps = this.cfg.buckets;
    for (const [bi, oi] of TO_ACCOUNT[isWrite ? 1 : 0]!) {
      const b = bps[bi]!;
      b.level += bytes;
      if (b.burstLength > 1) b.burstLevel += bytes;
      const o = bps[oi]!;
      o.level += units;
      if (o.burstLength > 1) o.burstLevel += units;
    }
  }

  /** True if the live configuration limits anything. */
  get enabled(): boolean {
    return throttleEnabled(this.cfg);
  }
}
