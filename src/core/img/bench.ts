/**
 * `qemu-img bench` (QEMU's img_bench): a fixed number of reads or writes of
 * one buffer size, `depth` in flight, stepping through the image and
 * wrapping at its end, optionally flushing every `flushInterval` requests
 * (draining first unless `noDrain`).
 */
import type { BlockBackend } from '../block-backend.ts';
import { BlockError, STRERROR, toBlockError } from '../errors.ts';

/** Benchmark parameters. */
export interface BenchParams {
  count: number;
  depth: number;
  offset: number;
  bufSize: number;
  step: number;
  write: boolean;
  pattern: number;
  flushInterval: number;
  noDrain: boolean;
}

/** Runs the benchmark; rejects with "Failed request: …" or "Failed flush request: …" on the first error. */
export async function runBench(blk: BlockBackend, p: BenchParams): Promise<void> {
  const imageSize = await blk.getLength();
  const buf = new Uint8Array(p.bufSize).fill(p.write ? p.pattern : 0);
  let offset = p.offset;
  let remaining = p.count;
  let sinceFlush = 0;
  let failed: unknown = null;
  const inFlight = new Set<Promise<void>>();
  const issue = (): void => {
    const off = offset;
    remaining--;
    const op = p.write ? blk.pwrite(off, buf) : blk.pread(off, new Uint8Array(p.bufSize));
    const t: Promise<void> = op.catch((e: unknown) => {
      failed ??= new BlockError(toBlockError(e).code, `Failed request: ${STRERROR[toBlockError(e).code]}`);
    }).finally(() => inFlight.delete(t));
    inFlight.add(t);
    offset = imageSize > 0 ? (offset + p.step) % imageSize : 0;
  };
  while ((remaining > 0 || inFlight.size > 0) && failed === null) {
    while (remaining > 0 && inFlight.size < p.depth) {
      if (p.flushInterval && sinceFlush >= p.flushInterval) break;
      issue();
      sinceFlush++;
    }
    if (p.flushInterval && sinceFlush >= p.flushInterval) {
      if (!p.noDrain) await Promise.all([...inFlight]);
      try {
        await blk.flush();
      } catch (e) {
        failed ??= new BlockError(toBlockError(e).code, `Failed flush request: ${STRERROR[toBlockError(e).code]}`);
      }
      sinceFlush = 0;
      continue;
    }
    if (inFlight.size > 0) await Promise.race([...inFlight]);
  }
  if (failed !== null) throw failed;
}
