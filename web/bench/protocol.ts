/**
 * Messages between the benchmark page and its workers, and what the page
 * exposes to the Node driver (bench/browser.ts).
 */
import type { Report, Row } from '../../bench/lib/harness.ts';

/** Where the driver put the test images (URLs the dev server serves) and how long to run. */
export interface BenchConfig {
  /** Base URL of the images made by bench/browser.ts (ends with '/'). */
  images: string;
  /** Size in MiB of the data images. */
  dataMiB: number;
  quick: boolean;
}

/** Page → bench worker: run the engine-side suites. */
export interface EngineSuiteRequest {
  kind: 'engine-suites';
  config: BenchConfig;
}

/** Bench worker → page: progress or the result. */
export type EngineSuiteMessage = { kind: 'log'; text: string } | { kind: 'rows'; rows: Row[] } | { kind: 'error'; message: string };

/** Page → SAB worker: time QD1 reads over a channel, and the bare Atomics round trip between two workers. */
export interface SabRequest {
  kind: 'sab';
  channel: SharedArrayBuffer;
  /** Control words and data for the bare round trip with the pong worker. */
  ping: SharedArrayBuffer;
  minMs: number;
  rounds: number;
}

/** SAB worker → page: ops/s of each. */
export interface SabResult {
  kind: 'sab-result';
  channel: number;
  bare: number;
}

/** What the page leaves on window for the driver. */
export interface BenchWindow {
  qblockBench?: { done: boolean; report?: Report; error?: string };
}
