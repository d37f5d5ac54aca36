/**
 * `qemu-img resize` (QEMU's img_resize after argument parsing): absolute or
 * relative new size, refusing to shrink without permission and
 * preallocation when not growing, then an exact truncate.
 */
import type { BlockBackend } from '../block-backend.ts';
import { BlockError, STRERROR, toBlockError } from '../errors.ts';
import type { PreallocMode } from '../types.ts';

/** What to do. */
export interface ResizeRequest {
  /** Size in bytes, or a delta when `relative` is ±1. */
  size: number;
  relative: -1 | 0 | 1;
  shrink: boolean;
  prealloc: PreallocMode;
  /** Receives QEMU's warning (without the "warning: " prefix) before a refused shrink. */
  warn?: (msg: string) => void;
}

/** Thrown for a refused shrink: the tool prints the message, then the warning. */
export class ShrinkRefused extends BlockError {}

/** Resizes the backend's image; throws BlockError with QEMU's message. */
export async function resizeImage(blk: BlockBackend, req: ResizeRequest): Promise<void> {
  let current: number;
  try {
    current = await blk.getLength();
  } catch (e) {
    throw new BlockError(toBlockError(e).code, `Failed to inquire current image length: ${STRERROR[toBlockError(e).code]}`);
  }
  const total = req.relative ? current + req.size * req.relative : req.size;
  if (total <= 0) throw new BlockError('EINVAL', 'New image size must be positive');
  if (total <= current && req.prealloc !== 'off') throw new BlockError('EINVAL', 'Preallocation can only be used for growing images');
  if (total < current && !req.shrink) {
    throw new ShrinkRefused('EINVAL', 'Use the --shrink option to perform a shrink operation.');
  }
  // The user expects exactly the size asked for, so the truncate is exact.
  await blk.truncate(total, { exact: true, prealloc: req.prealloc });
}

/** QEMU's warning after a refused shrink. */
export const SHRINK_WARNING =
  "Shrinking an image will delete all data beyond the shrunken image's end. Before performing such an operation, make sure there is no important data there.";
