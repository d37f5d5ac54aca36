/**
 * Persistent dirty bitmap operations of `qemu-img bitmap`. The engine has
 * no driver hook for storing bitmaps yet (qcow2 reads the bitmap directory
 * for `info` only), so every operation fails with the error QEMU gives for
 * a driver that cannot store bitmaps, or for a bitmap that does not exist,
 * whichever QEMU would report first.
 */
import { BlockError } from '../errors.ts';
import type { BlockNode } from '../node.ts';

/** One requested action, in command-line order. */
export interface BitmapAction {
  op: 'add' | 'remove' | 'clear' | 'enable' | 'disable' | 'merge';
  /** Source bitmap of a merge. */
  source?: string;
}

/** Bitmap names the image records (from its format-specific info), for "not found" decisions. */
async function storedBitmaps(bs: BlockNode): Promise<string[]> {
  const spec = await bs.drv.getSpecificInfo?.(bs);
  const list = spec?.data.bitmaps;
  if (!Array.isArray(list)) return [];
  return list.map((b) => (b && typeof b === 'object' && 'name' in b ? String((b as { name: unknown }).name) : '')).filter((n) => n !== '');
}

/** Runs the actions on `bs`; throws at the first that fails with "Operation <op> on bitmap <name> failed: …". */
export async function runBitmapActions(bs: BlockNode, name: string, actions: BitmapAction[]): Promise<void> {
  const existing = await storedBitmaps(bs);
  for (const a of actions) {
    const fail = (msg: string): never => {
      throw new BlockError('ENOTSUP', `Operation ${a.op} on bitmap ${name} failed: ${msg}`);
    };
    if (a.op === 'add') {
      if (existing.includes(name)) fail(`Bitmap already exists: ${name}`);
      fail(`Can't store persistent bitmaps to ${bs.displayName}: Operation not supported`);
    }
    if (!existing.includes(name)) fail(`Dirty bitmap '${name}' not found`);
    fail(`the ${bs.drv.name} driver of this engine cannot modify persistent dirty bitmaps yet: Operation not supported`);
  }
}
