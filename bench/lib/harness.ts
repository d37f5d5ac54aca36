// What every benchmark reports: a row comparing qblock with a baseline
// measured in the same run, the ratio between them, and the target it is
// held to. Also the timing helpers (interleaved rounds, medians) and the
// table printer shared by the Node and browser runners.
//
// Ratios read the same way everywhere: above 1 means qblock is better.
// For speeds that is qblock's rate over the baseline's; for memory it is the
// baseline's bytes over qblock's.

/** One measured quantity. */
export interface Measure {
  /** What was measured, e.g. "qcow2 over file" or "qemu-img convert". */
  label: string;
  value: number;
  /** 'MB/s', 'ops/s', 's', 'MiB', 'GB/s'. */
  unit: string;
}

/** One line of the table. */
export interface Row {
  group: string;
  name: string;
  ours: Measure | null;
  baseline: Measure | null;
  /** qblock relative to the baseline, above 1 = qblock better; null when not measured. */
  ratio: number | null;
  /** The target in words ("≥ 0.85×", "≥ 1.0×", "< 40 MiB"), if the issue sets one. */
  target?: string;
  /** Whether the target is met (undefined when there is no target or no figure). */
  met?: boolean;
  /** Why there is no figure ("not available yet: …"), or extra context. */
  note?: string;
}

/** A whole run, as written to JSON. */
export interface Report {
  runner: 'node' | 'browser';
  startedAt: string;
  environment: Record<string, string | number | boolean>;
  rows: Row[];
}

/** Monotonic clock in milliseconds (performance.now exists in Node and browsers). */
export function now(): number {
  return performance.now();
}

let cpuClock: () => number = now;

/**
 * Sets the clock rateSync uses for CPU-bound kernels. The Node runner passes
 * process CPU time: on a busy machine wall time mostly measures how often the
 * scheduler let us run. Browsers have no CPU clock and keep wall time.
 */
export function setCpuClock(fn: () => number): void {
  cpuClock = fn;
}

/** The clock setCpuClock chose (process CPU time in Node, wall time in browsers), for rates measured outside rateSync. */
export function cpuNow(): number {
  return cpuClock();
}

/** Median of a non-empty list. */
export function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}

/**
 * Operations per second of `fn` (which performs `opsPerCall` operations per
 * call): calls it until at least `minMs` have passed and divides.
 */
export async function rate(fn: () => unknown, opsPerCall = 1, minMs = 200): Promise<number> {
  let calls = 0;
  const start = now();
  let elapsed = 0;
  do {
    const r = fn();
    if (r instanceof Promise) await r;
    calls++;
    elapsed = now() - start;
  } while (elapsed < minMs);
  return (calls * opsPerCall * 1000) / elapsed;
}

/** Synchronous variant of rate for kernels, timed on the CPU clock (setCpuClock): no await per call, so the loop adds only a function call. */
export function rateSync(fn: () => unknown, opsPerCall = 1, minMs = 200): number {
  let calls = 0;
  const start = cpuClock();
  let elapsed = 0;
  // Check the clock every few calls: cheap kernels take well under a microsecond.
  let batch = 1;
  do {
    for (let i = 0; i < batch; i++) fn();
    calls += batch;
    elapsed = cpuClock() - start;
    if (elapsed < minMs / 20) batch = Math.min(batch * 2, 1 << 16);
  } while (elapsed < minMs);
  return (calls * opsPerCall * 1000) / elapsed;
}

/**
 * Measures ours and the baseline in alternating rounds and returns the pair
 * of the round whose ratio is the median: each round's two runs see the
 * machine in the same state, so a paired ratio cancels drift (a neighbour's
 * load, the host's memory bandwidth) that would skew independent medians.
 */
export async function interleave(rounds: number, ours: () => Promise<number> | number, baseline: () => Promise<number> | number): Promise<[number, number]> {
  const pairs: [number, number][] = [];
  for (let i = 0; i < rounds; i++) {
    // Alternate who goes first as well.
    if (i % 2 === 0) {
      const a = await ours();
      pairs.push([a, await baseline()]);
    } else {
      const b = await baseline();
      pairs.push([await ours(), b]);
    }
  }
  pairs.sort((x, y) => x[0] / x[1] - y[0] / y[1]);
  return pairs[(pairs.length - 1) >> 1]!;
}

/** A row comparing two rates (higher is better). */
export function speedRow(group: string, name: string, ours: Measure, baseline: Measure, minRatio?: number, note?: string): Row {
  const ratio = ours.value / baseline.value;
  const row: Row = { group, name, ours, baseline, ratio };
  if (minRatio !== undefined) {
    row.target = `≥ ${minRatio}×`;
    row.met = ratio >= minRatio;
  }
  if (note) row.note = note;
  return row;
}

/** A row comparing two durations (lower is better); the ratio is baseline time over ours. */
export function timeRow(group: string, name: string, oursSeconds: Measure, baselineSeconds: Measure, minRatio?: number, note?: string): Row {
  const ratio = baselineSeconds.value / oursSeconds.value;
  const row: Row = { group, name, ours: oursSeconds, baseline: baselineSeconds, ratio };
  if (minRatio !== undefined) {
    row.target = `≥ ${minRatio}×`;
    row.met = ratio >= minRatio;
  }
  if (note) row.note = note;
  return row;
}

/** A row for something that cannot be measured yet, saying why instead of printing a number. */
export function unavailableRow(group: string, name: string, why: string, target?: string): Row {
  const row: Row = { group, name, ours: null, baseline: null, ratio: null, note: why };
  if (target) row.target = target;
  return row;
}

/** Formats a number with about three significant digits. */
export function fmt(v: number): string {
  if (!Number.isFinite(v)) return String(v);
  const a = Math.abs(v);
  if (a >= 1000) return Math.round(v).toLocaleString('en-US');
  if (a >= 100) return v.toFixed(0);
  if (a >= 10) return v.toFixed(1);
  if (a >= 1) return v.toFixed(2);
  return v.toPrecision(2);
}

/** Renders the rows as a fixed-width text table (also valid Markdown). */
export function table(rows: Row[]): string {
  const head = ['group', 'benchmark', 'qblock', 'baseline', 'ratio', 'target', 'note'];
  const cells = rows.map((r) => [
    r.group,
    r.name,
    r.ours ? `${fmt(r.ours.value)} ${r.ours.unit}` : '—',
    r.baseline ? `${fmt(r.baseline.value)} ${r.baseline.unit} (${r.baseline.label})` : '—',
    r.ratio === null ? '—' : `${fmt(r.ratio)}×`,
    r.target ? `${r.target}${r.met === undefined ? '' : r.met ? ' ✓' : ' ✗'}` : '',
    r.note ?? '',
  ]);
  const widths = head.map((h, i) => Math.max(h.length, ...cells.map((c) => c[i]!.length)));
  const line = (c: string[]): string => `| ${c.map((x, i) => x.padEnd(widths[i]!)).join(' | ')} |`;
  return [line(head), `|${widths.map((w) => '-'.repeat(w + 2)).join('|')}|`, ...cells.map(line)].join('\n');
}

/** MB/s for `bytes` moved at `opsPerSec` operations per second of `bytesPerOp` each. */
export function mbps(opsPerSec: number, bytesPerOp: number): number {
  return (opsPerSec * bytesPerOp) / 1e6;
}
