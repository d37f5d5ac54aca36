/**
 * `qemu-img check` plumbing (QEMU's collect_image_check): run the format
 * driver's consistency check, optionally repairing, and report the result
 * as QAPI's ImageCheck. Formats without a check answer ENOTSUP, which the
 * tool turns into "This image format does not support checks" and exit 63.
 */
import type { CheckResult, ProgressFn } from '../driver.ts';
import { CHECK_FIX } from '../driver.ts';
import { BlockError } from '../errors.ts';
import type { BlockNode } from '../node.ts';

/** QEMU's ImageCheck (QAPI); optional members are present only when non-zero. */
export interface ImageCheck {
  filename: string;
  format: string;
  'check-errors': number;
  'image-end-offset'?: number;
  corruptions?: number;
  leaks?: number;
  'corruptions-fixed'?: number;
  'leaks-fixed'?: number;
  'total-clusters'?: number;
  'allocated-clusters'?: number;
  'fragmented-clusters'?: number;
  'compressed-clusters'?: number;
}

/** Repair requested with `-r`. */
export type CheckRepair = 'leaks' | 'all' | undefined;

/** QEMU's bdrv_check: the driver's check, ENOTSUP when it has none. */
export async function bdrvCheck(bs: BlockNode, fix: number, progress?: ProgressFn): Promise<CheckResult> {
  if (!bs.drv.check) throw new BlockError('ENOTSUP', 'This image format does not support checks', { node: bs.nodeName });
  return bs.drv.check(bs, fix, progress);
}

function toImageCheck(r: CheckResult, filename: string, format: string): ImageCheck {
  const c: ImageCheck = { filename, format, 'check-errors': r.checkErrors };
  const opt = (k: keyof ImageCheck, v: number): void => {
    if (v !== 0) (c as unknown as Record<string, number>)[k] = v;
  };
  opt('corruptions', r.corruptions);
  opt('leaks', r.leaks);
  opt('corruptions-fixed', r.corruptionsFixed);
  opt('leaks-fixed', r.leaksFixed);
  opt('image-end-offset', r.imageEndOffset);
  opt('total-clusters', r.bfi.totalClusters);
  opt('allocated-clusters', r.bfi.allocatedClusters);
  opt('fragmented-clusters', r.bfi.fragmentedClusters);
  opt('compressed-clusters', r.bfi.compressedClusters);
  return c;
}

/** What checkImage found: the final report and, when repairs happened, what was repaired first. */
export interface CheckOutcome {
  check: ImageCheck;
  /** Set when the first pass repaired something and a second pass produced `check`. */
  repaired?: { leaksFixed: number; corruptionsFixed: number };
}

/**
 * Checks (and with `repair`, repairs) `bs`, then re-checks after repairs the
 * way qemu-img does so the report describes the repaired image. `progress`
 * follows the first pass (the one that may repair).
 */
export async function checkImage(bs: BlockNode, filename: string, repair: CheckRepair, progress?: ProgressFn): Promise<CheckOutcome> {
  const fix = repair === 'all' ? CHECK_FIX.LEAKS | CHECK_FIX.ERRORS : repair === 'leaks' ? CHECK_FIX.LEAKS : 0;
  const first = toImageCheck(await bdrvCheck(bs, fix, progress), filename, bs.drv.name);
  const leaksFixed = first['leaks-fixed'] ?? 0;
  const corruptionsFixed = first['corruptions-fixed'] ?? 0;
  if (!leaksFixed && !corruptionsFixed) return { check: first };
  const second = toImageCheck(await bdrvCheck(bs, 0), filename, bs.drv.name);
  if (leaksFixed) second['leaks-fixed'] = leaksFixed;
  if (corruptionsFixed) second['corruptions-fixed'] = corruptionsFixed;
  return { check: second, repaired: { leaksFixed, corruptionsFixed } };
}
