/**
 * I/O statistics of a BlockBackend: QEMU's BlockAcctStats (block/accounting.c)
 * and the BlockDeviceStats it reports through query-blockstats.
 *
 * A request is accounted by taking a cookie with acctStart() when it is
 * submitted and handing it to acctDone() or acctFailed() when it completes;
 * requests rejected before any I/O (bad range, read-only) go to acctInvalid().
 * Latency histograms follow block-latency-histogram-set.
 */

import { BlockError } from './errors.ts';
import { realClock, type Clock } from './clock.ts';

/** Kinds of accounted operation (QEMU's BlockAcctType without NONE and zone append). */
export type BlockAcctType = 'read' | 'write' | 'flush' | 'unmap';

/** All accounted operation kinds. */
export const BLOCK_ACCT_TYPES: readonly BlockAcctType[] = ['read', 'write', 'flush', 'unmap'];

/** Handle of one in-flight request; `type` becomes null once it has been accounted. */
export interface BlockAcctCookie {
  bytes: number;
  startTimeNs: number;
  type: BlockAcctType | null;
}

/** QAPI BlockLatencyHistogramInfo: bins[i] counts latencies in [boundaries[i-1], boundaries[i]). */
export interface BlockLatencyHistogramInfo {
  boundaries: number[];
  bins: number[];
}

/** QAPI BlockDeviceTimedStats (reported for each configured stats interval). */
export interface BlockDeviceTimedStats {
  interval_length: number;
  min_rd_latency_ns: number;
  max_rd_latency_ns: number;
  avg_rd_latency_ns: number;
  min_wr_latency_ns: number;
  max_wr_latency_ns: number;
  avg_wr_latency_ns: number;
  min_zone_append_latency_ns: number;
  max_zone_append_latency_ns: number;
  avg_zone_append_latency_ns: number;
  min_flush_latency_ns: number;
  max_flush_latency_ns: number;
  avg_flush_latency_ns: number;
  avg_rd_queue_depth: number;
  avg_wr_queue_depth: number;
  avg_zone_append_queue_depth: number;
}

/**
 * QAPI BlockDeviceStats with QEMU's field names. Zone-append fields are always
 * 0 (no zoned devices here) but present, as QEMU ≥ 8.1 reports them.
 */
export interface BlockDeviceStats {
  rd_bytes: number;
  wr_bytes: number;
  zone_append_bytes: number;
  unmap_bytes: number;
  rd_operations: number;
  wr_operations: number;
  zone_append_operations: number;
  flush_operations: number;
  unmap_operations: number;
  rd_total_time_ns: number;
  wr_total_time_ns: number;
  zone_append_total_time_ns: number;
  flush_total_time_ns: number;
  unmap_total_time_ns: number;
  wr_highest_offset: number;
  rd_merged: number;
  wr_merged: number;
  zone_append_merged: number;
  unmap_merged: number;
  idle_time_ns?: number;
  failed_rd_operations: number;
  failed_wr_operations: number;
  failed_zone_append_operations: number;
  failed_flush_operations: number;
  failed_unmap_operations: number;
  invalid_rd_operations: number;
  invalid_wr_operations: number;
  invalid_zone_append_operations: number;
  invalid_flush_operations: number;
  invalid_unmap_operations: number;
  account_invalid: boolean;
  account_failed: boolean;
  timed_stats: BlockDeviceTimedStats[];
  rd_latency_histogram?: BlockLatencyHistogramInfo;
  wr_latency_histogram?: BlockLatencyHistogramInfo;
  zone_append_latency_histogram?: BlockLatencyHistogramInfo;
  flush_latency_histogram?: BlockLatencyHistogramInfo;
}

/** Arguments of QMP block-latency-histogram-set (without `id`). */
export interface BlockLatencyHistogramSetArgs {
  boundaries?: number[];
  'boundaries-read'?: number[];
  'boundaries-write'?: number[];
  'boundaries-flush'?: number[];
}

/** QEMU's OnOffAuto; 'auto' keeps the current value. */
export type OnOffAuto = 'on' | 'off' | 'auto';

/** Options of BlockAcctStats.setup(): the drive's stats-account-invalid / stats-account-failed. */
export interface BlockAcctSetupOptions {
  accountInvalid?: OnOffAuto | boolean;
  accountFailed?: OnOffAuto | boolean;
}

interface Histogram {
  /** Strictly increasing, all > 0; nbins - 1 of them. */
  boundaries: number[];
  bins: number[];
}

interface PerType {
  bytes: number;
  ops: number;
  invalid: number;
  failed: number;
  totalTimeNs: number;
  merged: number;
  hist: Histogram | null;
}

function zeroPerType(): PerType {
  return { bytes: 0, ops: 0, invalid: 0, failed: 0, totalTimeNs: 0, merged: 0, hist: null };
}

function fromOnOffAuto(v: OnOffAuto | boolean | undefined, def: boolean): boolean {
  if (v === undefined || v === 'auto') return def;
  if (v === 'on' || v === true) return true;
  if (v === 'off' || v === false) return false;
  throw new BlockError('EINVAL', `Invalid parameter '${String(v)}'`);
}

/** Checks histogram boundaries as block_latency_histogram_set does; returns a copy or null if invalid. */
function checkBoundaries(boundaries: readonly number[]): number[] | null {
  if (!Array.isArray(boundaries) || boundaries.length === 0) return null;
  let prev = 0;
  for (const v of boundaries) {
    if (typeof v !== 'number' || !Number.isSafeInteger(v) || v <= prev) return null;
    prev = v;
  }
  return [...boundaries];
}

/** Index of the bin for `latency`: 0 below boundaries[0], n for >= boundaries[n-1]. */
function binIndex(boundaries: readonly number[], latency: number): number {
  let lo = 0;
  let hi = boundaries.length;
  // first index whose boundary is > latency
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if (boundaries[mid]! <= latency) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

/**
 * Per-backend I/O statistics: counts, bytes, time, failures, invalid requests,
 * merges, idle time and optional latency histograms, per operation type.
 */
export class BlockAcctStats {
  private readonly perType: Record<BlockAcctType, PerType> = {
    read: zeroPerType(),
    write: zeroPerType(),
    flush: zeroPerType(),
    unmap: zeroPerType(),
  };
  private lastAccessTimeNs: number | null = null;
  /** Whether invalid requests count as activity for idle_time_ns (default true). */
  accountInvalid = true;
  /** Whether failed requests count in *_total_time_ns and idle_time_ns (default true). */
  accountFailed = true;

  /** Creates empty statistics timed by `clock` (default: the real clock). */
  constructor(readonly clock: Clock = realClock) {}

  /** Applies stats-account-invalid / stats-account-failed ('auto' or absent keeps the current value). */
  setup(opts: BlockAcctSetupOptions): void {
    this.accountInvalid = fromOnOffAuto(opts.accountInvalid, this.accountInvalid);
    this.accountFailed = fromOnOffAuto(opts.accountFailed, this.accountFailed);
  }

  /** Starts timing a request of `bytes` bytes and returns its cookie (block_acct_start). */
  acctStart(type: BlockAcctType, bytes: number): BlockAcctCookie {
    this.counts(type);
    return { bytes, startTimeNs: this.clock.now(), type };
  }

  /** The counters of `type`; EINVAL for anything but the four known types. */
  private counts(type: BlockAcctType): PerType {
    if (!Object.hasOwn(this.perType, type)) throw new BlockError('EINVAL', `Invalid accounting type '${String(type)}'`);
    return this.perType[type];
  }

  /** Accounts a successful request; a cookie already accounted is ignored (block_acct_done). */
  acctDone(cookie: BlockAcctCookie): void {
    this.accountOne(cookie, false);
  }

  /**
   * Accounts a failed request: failed_*_operations always, its latency in the
   * histogram always, in total time and idle time only if accountFailed.
   */
  acctFailed(cookie: BlockAcctCookie): void {
    this.accountOne(cookie, true);
  }

  /**
   * Counts a request rejected before any I/O: invalid_*_operations, and it
   * resets the idle time if accountInvalid. No time is accounted.
   */
  acctInvalid(type: BlockAcctType): void {
    this.counts(type).invalid++;
    if (this.accountInvalid) this.lastAccessTimeNs = this.clock.now();
  }

  /** Adds `numRequests` to *_merged (requests merged into others before submission). */
  acctMergeDone(type: BlockAcctType, numRequests: number): void {
    this.counts(type).merged += numRequests;
  }

  private accountOne(cookie: BlockAcctCookie, failed: boolean): void {
    const type = cookie.type;
    if (type === null) return;
    const now = this.clock.now();
    const latency = Math.max(0, now - cookie.startTimeNs);
    const t = this.perType[type];
    if (failed) {
      t.failed++;
    } else {
      t.bytes += cookie.bytes;
      t.ops++;
    }
    if (t.hist !== null) t.hist.bins[binIndex(t.hist.boundaries, latency)]!++;
    if (!failed || this.accountFailed) {
      t.totalTimeNs += latency;
      this.lastAccessTimeNs = now;
    }
    cookie.type = null;
  }

  /** Nanoseconds since the last accounted activity, or undefined if there was none. */
  idleTimeNs(): number | undefined {
    return this.lastAccessTimeNs === null ? undefined : this.clock.now() - this.lastAccessTimeNs;
  }

  /**
   * Enables (or resets) the latency histogram of one type with the given bin
   * boundaries in ns: at least one, each a positive integer greater than the
   * previous one. Bins are [0, b0), [b0, b1), …, [bn-1, ∞). Throws EINVAL
   * otherwise, as block_latency_histogram_set returns -EINVAL.
   */
  setLatencyHistogram(type: BlockAcctType, boundaries: readonly number[]): void {
    const b = checkBoundaries(boundaries);
    if (b === null) throw new BlockError('EINVAL');
    this.counts(type).hist = { boundaries: b, bins: new Array<number>(b.length + 1).fill(0) };
  }

  /** Disables every latency histogram (block_latency_histograms_clear). */
  clearLatencyHistograms(): void {
    for (const t of BLOCK_ACCT_TYPES) this.perType[t].hist = null;
  }

  /** Copy of one type's histogram, or undefined if it is disabled. */
  getLatencyHistogram(type: BlockAcctType): BlockLatencyHistogramInfo | undefined {
    const h = this.perType[type].hist;
    return h === null ? undefined : { boundaries: [...h.boundaries], bins: [...h.bins] };
  }

  /**
   * QMP block-latency-histogram-set for device `id`: no boundaries at all
   * clears every histogram; `boundaries` applies to read, write and flush
   * unless a per-type list overrides it. Throws EINVAL "Device 'id' set read
   * boundaries fail" (write, flush likewise), stopping at the first failure
   * as QEMU does (earlier types stay set).
   */
  blockLatencyHistogramSet(id: string, args: BlockLatencyHistogramSetArgs): void {
    const { boundaries } = args;
    const perType: [BlockAcctType, string, number[] | undefined][] = [
      ['read', 'read', args['boundaries-read']],
      ['write', 'write', args['boundaries-write']],
      ['flush', 'flush', args['boundaries-flush']],
    ];
    if (boundaries === undefined && perType.every(([, , v]) => v === undefined)) {
      this.clearLatencyHistograms();
      return;
    }
    for (const [type, label, own] of perType) {
      const list = own ?? boundaries;
      if (list === undefined) continue;
      const b = checkBoundaries(list);
      if (b === null) throw new BlockError('EINVAL', `Device '${id}' set ${label} boundaries fail`);
      this.perType[type].hist = { boundaries: b, bins: new Array<number>(b.length + 1).fill(0) };
    }
  }

  /** Raw per-type counters (for tests and debugging). */
  counters(type: BlockAcctType): Readonly<Omit<PerType, 'hist'>> {
    const { hist: _hist, ...rest } = this.perType[type];
    return rest;
  }

  /**
   * The statistics as QAPI BlockDeviceStats (query-blockstats `stats`).
   * `wrHighestOffset` belongs to the node, not to the backend's accounting,
   * so the caller supplies it (default 0). timed_stats is always empty:
   * stats-intervals are not implemented.
   */
  query(opts: { wrHighestOffset?: number } = {}): BlockDeviceStats {
    const r = this.perType.read;
    const w = this.perType.write;
    const f = this.perType.flush;
    const u = this.perType.unmap;
    const out: BlockDeviceStats = {
      rd_bytes: r.bytes,
      wr_bytes: w.bytes,
      zone_append_bytes: 0,
      unmap_bytes: u.bytes,
      rd_operations: r.ops,
      wr_operations: w.ops,
      zone_append_operations: 0,
      flush_operations: f.ops,
      unmap_operations: u.ops,
      rd_total_time_ns: r.totalTimeNs,
      wr_total_time_ns: w.totalTimeNs,
      zone_append_total_time_ns: 0,
      flush_total_time_ns: f.totalTimeNs,
      unmap_total_time_ns: u.totalTimeNs,
      wr_highest_offset: opts.wrHighestOffset ?? 0,
      rd_merged: r.merged,
      wr_merged: w.merged,
      zone_append_merged: 0,
      unmap_merged: u.merged,
      failed_rd_operations: r.failed,
      failed_wr_operations: w.failed,
      failed_zone_append_operations: 0,
      failed_flush_operations: f.failed,
      failed_unmap_operations: u.failed,
      invalid_rd_operations: r.invalid,
      invalid_wr_operations: w.invalid,
      invalid_zone_append_operations: 0,
      invalid_flush_operations: f.invalid,
      invalid_unmap_operations: u.invalid,
      account_invalid: this.accountInvalid,
      account_failed: this.accountFailed,
      timed_stats: [],
    };
    const idle = this.idleTimeNs();
    if (idle !== undefined) out.idle_time_ns = idle;
    const rh = this.getLatencyHistogram('read');
    if (rh) out.rd_latency_histogram = rh;
    const wh = this.getLatencyHistogram('write');
    if (wh) out.wr_latency_histogram = wh;
    const fh = this.getLatencyHistogram('flush');
    if (fh) out.flush_latency_histogram = fh;
    return out;
  }

  /** Same as query() with no options; lets JSON.stringify print QEMU's fields. */
  toJSON(): BlockDeviceStats {
    return this.query();
  }
}
