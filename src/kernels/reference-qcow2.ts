// JS references of the qcow2 kernels beyond what the driver defines itself:
// the driver's jsL2Kernel and jsRefcountKernel (src/formats/qcow2) are the
// references for scan, get and set; the range decode, the refcount searches
// and check's bulk operations are built on them here, entry by entry, so they
// are obviously right rather than fast.

import { jsL2Kernel, newL2Scan, SC, type SubclusterType } from '../formats/qcow2/cluster.ts';
import { jsRefcountKernel } from '../formats/qcow2/refcount.ts';
import { BlockError } from '../core/errors.ts';
import { newL2Run, type L2Ops, type L2Run, type RefcountOps } from './types.ts';

const runScan = newL2Scan();

/** Copies one scan result into a run record, with hostCluster 0 for INVALID (its value is not meaningful there). */
function toRun(rec: L2Run): void {
  const s = runScan;
  rec.type = s.type;
  rec.count = s.count;
  rec.invalidIndex = s.invalidIndex;
  rec.hostCluster = s.type === SC.INVALID ? 0 : s.hostCluster;
  rec.entryHi = s.entryHi >>> 0;
  rec.entryLo = s.entryLo >>> 0;
}

/** JS reference of L2Ops: jsL2Kernel's scan, and runs as repeated scans. */
export const l2Ref: L2Ops = {
  scan: jsL2Kernel.scan,
  runs(slice, l2Index, scIndex, nbClusters, g, out, maxRuns) {
    const perCluster = g.extended ? 32 : 1;
    let idx = 0;
    let sc = scIndex;
    let n = 0;
    while (idx < nbClusters && n < maxRuns) {
      const s = runScan;
      // Widened: TS would otherwise narrow s.type to this constant after the scan.
      s.type = SC.UNALLOCATED_PLAIN as SubclusterType;
      s.count = 0;
      s.invalidIndex = -1;
      s.hostCluster = 0;
      s.entryHi = 0;
      s.entryLo = 0;
      jsL2Kernel.scan(slice, l2Index + idx, sc, nbClusters - idx, g, s);
      const rec = (out[n] ??= newL2Run());
      toRun(rec);
      n++;
      if (s.type === SC.INVALID || s.count <= 0) break;
      const total = sc + s.count;
      idx += Math.floor(total / perCluster);
      sc = total % perCluster;
    }
    return n;
  },
};

/** Throws the reference's error for an order outside 0..6. */
export function checkOrder(order: number): void {
  if (!(order >= 0 && order <= 6 && Number.isInteger(order))) throw new BlockError('EINVAL', `Invalid refcount order ${order}`);
}

/** Whether entries `i` of `a` and `b` differ, comparing raw bytes for whole-byte widths (exact past 2^53). */
function entriesDiffer(a: Uint8Array, b: Uint8Array, i: number, order: number): boolean {
  if (order < 3) return jsRefcountKernel.get(a, i, order) !== jsRefcountKernel.get(b, i, order);
  const w = 1 << (order - 3);
  for (let k = i * w; k < (i + 1) * w; k++) if (a[k] !== b[k]) return true;
  return false;
}

/** JS reference of RefcountOps, entry by entry over jsRefcountKernel's get and set. */
export const refcountRef: RefcountOps = {
  get: (block, index, order) => jsRefcountKernel.get(block, index, order),
  set: (block, index, order, value) => jsRefcountKernel.set(block, index, order, value),
  findZero(block, from, to, order) {
    checkOrder(order);
    for (let i = from; i < to; i++) if (jsRefcountKernel.get(block, i, order) === 0) return i;
    return -1;
  },
  findNonZero(block, from, to, order) {
    checkOrder(order);
    for (let i = from; i < to; i++) if (jsRefcountKernel.get(block, i, order) !== 0) return i;
    return to;
  },
  add(block, index, order, addend, max) {
    const next = jsRefcountKernel.get(block, index, order) + addend;
    if (next < 0 || next > max) return -1;
    jsRefcountKernel.set(block, index, order, next);
    return next;
  },
  findFreeRun(block, from, to, order, want, out) {
    checkOrder(order);
    if (!(want >= 1)) throw new BlockError('EINVAL', `Free run length must be at least 1, not ${want}`);
    let runStart = -1;
    for (let i = from; i < to; i++) {
      if (jsRefcountKernel.get(block, i, order) !== 0) {
        runStart = -1;
        continue;
      }
      if (runStart < 0) runStart = i;
      if (i - runStart + 1 === want) {
        out.index = runStart;
        out.length = want;
        return runStart;
      }
    }
    out.index = runStart;
    out.length = runStart < 0 ? 0 : to - runStart;
    return runStart;
  },
  incRange(arr, start, count, order, max) {
    for (let i = start; i < start + count; i++) {
      const v = jsRefcountKernel.get(arr, i, order);
      if (v >= max) return i;
      jsRefcountKernel.set(arr, i, order, v + 1);
    }
    return -1;
  },
  compare(a, b, start, count, order, out) {
    checkOrder(order);
    let n = 0;
    for (let i = start; i < start + count && n < out.length; i++) {
      if (entriesDiffer(a, b, i, order)) out[n++] = i;
    }
    return n;
  },
  countNonZero(block, start, count, order) {
    checkOrder(order);
    let n = 0;
    for (let i = start; i < start + count; i++) if (jsRefcountKernel.get(block, i, order) !== 0) n++;
    return n;
  },
};
