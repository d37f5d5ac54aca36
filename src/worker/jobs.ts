/**
 * Plumbing for the worker's long operations: progress reports that do not
 * flood the message channel, yielding to the event loop so cancellations and
 * pipelined requests get a turn, and releasing the caller's progress proxy.
 *
 * Why yield: OPFS sync handles make every driver call complete in microtasks,
 * so a copy loop over OPFS would never let the worker's event loop run, and
 * the AbortSignal's port message (or any other request) would wait until the
 * whole job ended.
 */
import { releaseProxy } from 'comlink';
import { BlockBackend, type RequestOptions } from '../core/block-backend.ts';
import { throwIfAborted } from '../core/errors.ts';
import type { Graph } from '../core/graph.ts';
import { PERM } from '../core/types.ts';
import type { ProgressCallback } from './types.ts';

/** How often a job lets the event loop run, in ms of work. */
const YIELD_EVERY_MS = 16;
/** Least time between two progress messages, in ms. */
const PROGRESS_EVERY_MS = 50;

/** Resolves on a fresh macrotask (a MessageChannel message: setTimeout(0) is clamped to 4 ms once nested). */
export function yieldToEventLoop(): Promise<void> {
  if (typeof MessageChannel === 'undefined') return new Promise((r) => setTimeout(r, 0));
  return new Promise((resolve) => {
    const { port1, port2 } = new MessageChannel();
    port1.onmessage = () => {
      port1.close();
      resolve();
    };
    port2.postMessage(null);
    port2.close();
  });
}

/** A progress sink as the worker receives it: the caller's function, possibly a comlink proxy of it. */
export type ProgressSink = ProgressCallback | undefined;

/**
 * One job's bookkeeping: `step(done)` reports progress (throttled), checks
 * the signal and yields when the job has run long enough; `finish()` sends
 * the final report and releases the caller's progress proxy.
 */
export class Job {
  private lastReport = 0;
  private lastYield = Date.now();
  private released = false;

  /** Starts a job of `total` bytes reporting to `progress` and stopping when `signal` fires. */
  constructor(
    private readonly progress: ProgressSink,
    private readonly signal: AbortSignal | undefined,
    public total: number,
  ) {
    this.send(0, true);
  }

  private send(done: number, force: boolean): void {
    if (!this.progress) return;
    const now = Date.now();
    if (!force && now - this.lastReport < PROGRESS_EVERY_MS) return;
    this.lastReport = now;
    try {
      // A comlink proxy returns a promise; a failed report must not fail the job.
      const r: unknown = this.progress(done, this.total);
      if (r instanceof Promise) r.catch(() => undefined);
    } catch {
      // The page may be gone; the job still finishes.
    }
  }

  /** Reports `done` bytes (throttled) without yielding, for callbacks that cannot wait. */
  report(done: number): void {
    this.send(done, false);
  }

  /** Throws ECANCELED when aborted and yields to the event loop every few ms, without reporting. */
  async tick(): Promise<void> {
    throwIfAborted(this.signal);
    if (Date.now() - this.lastYield >= YIELD_EVERY_MS) {
      await yieldToEventLoop();
      this.lastYield = Date.now();
      throwIfAborted(this.signal);
    }
  }

  /** Reports `done` bytes, throws ECANCELED when aborted, and yields to the event loop every few ms. */
  async step(done: number): Promise<void> {
    this.send(done, false);
    throwIfAborted(this.signal);
    if (Date.now() - this.lastYield >= YIELD_EVERY_MS) {
      await yieldToEventLoop();
      this.lastYield = Date.now();
      throwIfAborted(this.signal);
    }
  }

  /** Sends the last report (done = total on success) and releases the progress proxy. */
  finish(done = this.total): void {
    if (this.released) return;
    this.send(done, true);
    this.release();
  }

  /** Releases the progress proxy without a final report (after a failure). */
  release(): void {
    if (this.released) return;
    this.released = true;
    const p = this.progress as (ProgressCallback & { [releaseProxy]?: () => void }) | undefined;
    try {
      p?.[releaseProxy]?.();
    } catch {
      // Already released or not a proxy.
    }
  }
}

/** Runs `body` as a job: the Job is finished on success and released on failure. */
export async function runJob<T>(progress: ProgressSink, signal: AbortSignal | undefined, total: number, body: (job: Job) => Promise<T>): Promise<T> {
  throwIfAborted(signal);
  const job = new Job(progress, signal, total);
  try {
    const out = await body(job);
    job.finish();
    return out;
  } catch (e) {
    job.release();
    throw e;
  }
}

/**
 * A read-only BlockBackend for a job's source whose reads first give the
 * job a tick: the engine's copy loops (convert) then notice an abort and let
 * the worker's event loop run, without knowing about jobs.
 */
export class JobBackend extends BlockBackend {
  /** A backend taking read permission and sharing everything, as a job's source does. */
  constructor(
    graph: Graph,
    private readonly job: Job,
  ) {
    super(graph, { perm: PERM.CONSISTENT_READ, sharedPerm: PERM.ALL });
  }

  /** Ticks the job, then reads as BlockBackend.pread does. */
  override async pread(offset: number, buf: Uint8Array, opts: RequestOptions = {}): Promise<void> {
    await this.job.tick();
    return super.pread(offset, buf, opts);
  }
}
