/**
 * Random guest workloads for the qcow2 write-path tests: fast-check
 * generators of writes, zero writes (with and without unmap), discards,
 * compressed writes and flushes; a runner that applies them through the
 * generic request path; the equivalent qemu-io script for a raw reference
 * image; and an in-memory model of what the disk must read. Not a test file.
 */
import fc from 'fast-check';
import type { BdrvChild } from '../../core/child.ts';
import { bdrvFlush, bdrvPdiscard, bdrvPwriteCompressed, bdrvPwritev, bdrvPwriteZeroes } from '../../core/io.ts';
import { REQ } from '../../core/types.ts';

/** One guest operation. */
export type Op =
  | { t: 'write'; off: number; len: number; pat: number }
  | { t: 'zero'; off: number; len: number; unmap: boolean }
  | { t: 'discard'; off: number; len: number }
  | { t: 'compress'; off: number; pat: number }
  | { t: 'flush' };

/** What the generator needs to know about the image. */
export interface WorkloadGeometry {
  size: number;
  clusterSize: number;
  /** Compressed writes are possible (no data file, no preallocation). */
  compress: boolean;
  /** Discards may be generated (they must read back as zeroes: v3, or no backing file). */
  discard: boolean;
  /** Clusters already allocated before the workload (compressed writes avoid them). */
  allocatedBefore?: (cluster: number) => boolean;
}

/** A fast-check arbitrary of `min`..`max` operations for `g`. Offsets favour cluster edges, where the interesting cases are. */
export function opsArb(g: WorkloadGeometry, min = 5, max = 40): fc.Arbitrary<Op[]> {
  const cs = g.clusterSize;
  const clusters = Math.floor(g.size / cs);
  const sector = fc.integer({ min: 0, max: g.size / 512 - 1 });
  const edge = fc.oneof(
    sector.map((s) => s * 512),
    fc.integer({ min: 0, max: clusters - 1 }).chain((c) => fc.integer({ min: -2, max: 2 }).map((d) => Math.min(g.size - 512, Math.max(0, c * cs + d * 512)))),
  );
  const len = (off: number): fc.Arbitrary<number> =>
    fc.oneof(fc.integer({ min: 1, max: 8 }).map((n) => n * 512), fc.integer({ min: 1, max: 3 }).map((n) => n * cs), fc.integer({ min: 1, max: 40 }).map((n) => n * 512)).map((l) => Math.min(l, g.size - off));
  const write = edge.chain((off) => len(off).chain((l) => fc.integer({ min: 1, max: 255 }).map((pat): Op => ({ t: 'write', off, len: l, pat }))));
  const zero = edge.chain((off) => len(off).chain((l) => fc.boolean().map((unmap): Op => ({ t: 'zero', off, len: l, unmap }))));
  const discard = fc.integer({ min: 0, max: clusters - 1 }).chain((c) => fc.integer({ min: 1, max: 3 }).map((n): Op => ({ t: 'discard', off: c * cs, len: Math.min(n, clusters - c) * cs })));
  const compress = fc.integer({ min: 0, max: clusters - 1 }).chain((c) => fc.integer({ min: 1, max: 255 }).map((pat): Op => ({ t: 'compress', off: c * cs, pat })));
  const flush = fc.constant<Op>({ t: 'flush' });
  const kinds: Array<{ weight: number; arbitrary: fc.Arbitrary<Op> }> = [
    { weight: 6, arbitrary: write },
    { weight: 2, arbitrary: zero },
    { weight: 1, arbitrary: flush },
  ];
  if (g.discard) kinds.push({ weight: 2, arbitrary: discard });
  if (g.compress) kinds.push({ weight: 2, arbitrary: compress });
  return fc.array(fc.oneof(...kinds), { minLength: min, maxLength: max }).map((ops) => legalise(g, ops));
}

/** Drops compressed writes QEMU would refuse: onto clusters that may already have a host cluster. */
function legalise(g: WorkloadGeometry, ops: Op[]): Op[] {
  const cs = g.clusterSize;
  const touched = new Set<number>();
  const out: Op[] = [];
  for (const op of ops) {
    if (op.t === 'compress') {
      const c = op.off / cs;
      if (touched.has(c) || g.allocatedBefore?.(c)) continue;
    }
    out.push(op);
    if (op.t !== 'flush') {
      const len = op.t === 'compress' ? cs : op.len;
      for (let c = Math.floor(op.off / cs); c * cs < op.off + len; c++) touched.add(c);
    }
  }
  return out;
}

/** Fills the pattern buffer a qemu-io `write -P pat` writes. */
function pattern(len: number, pat: number): Uint8Array {
  return new Uint8Array(len).fill(pat);
}

/** Applies `op` to the model of the disk. */
export function applyToModel(model: Uint8Array, op: Op, cs: number): void {
  switch (op.t) {
    case 'write': model.fill(op.pat, op.off, op.off + op.len); break;
    case 'zero': model.fill(0, op.off, op.off + op.len); break;
    case 'discard': model.fill(0, op.off, op.off + op.len); break;
    case 'compress': model.fill(op.pat, op.off, Math.min(model.length, op.off + cs)); break;
    default: break;
  }
}

/** Runs `op` through the generic request path on `child` (opened with discard=unmap). */
export async function runOp(child: BdrvChild, op: Op, cs: number): Promise<void> {
  switch (op.t) {
    case 'write': await bdrvPwritev(child, op.off, op.len, pattern(op.len, op.pat)); break;
    case 'zero': await bdrvPwriteZeroes(child, op.off, op.len, op.unmap ? REQ.MAY_UNMAP : 0); break;
    case 'discard': await bdrvPdiscard(child, op.off, op.len); break;
    case 'compress': {
      const len = Math.min(cs, child.bs.totalBytes - op.off);
      await bdrvPwriteCompressed(child, op.off, pattern(len, op.pat));
      break;
    }
    case 'flush': await bdrvFlush(child.bs); break;
  }
}

/** The qemu-io commands that give a raw image the same contents (discards and zero writes become zero writes). */
export function qemuIoScript(ops: Op[], cs: number, size: number): string[] {
  const out: string[] = [];
  for (const op of ops) {
    switch (op.t) {
      case 'write': out.push(`write -P ${op.pat} ${op.off} ${op.len}`); break;
      case 'zero': out.push(`write -z ${op.off} ${op.len}`); break;
      case 'discard': out.push(`write -z ${op.off} ${op.len}`); break;
      case 'compress': out.push(`write -P ${op.pat} ${op.off} ${Math.min(cs, size - op.off)}`); break;
      case 'flush': out.push('flush'); break;
    }
  }
  return out;
}

/** Short text of a workload for failure messages. */
export function describeOps(ops: Op[]): string {
  return ops.map((o) => (o.t === 'flush' ? 'flush' : `${o.t}@${o.off}${'len' in o ? `+${o.len}` : ''}${'pat' in o ? `=${o.pat}` : ''}${o.t === 'zero' && o.unmap ? ' unmap' : ''}`)).join('; ');
}
