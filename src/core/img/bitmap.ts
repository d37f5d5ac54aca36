/**
 * Dirty bitmap management as QEMU's QMP commands do it (blockdev.c /
 * block/monitor/bitmap-qmp-cmds.c: block-dirty-bitmap-add, -remove, -clear,
 * -enable, -disable, -merge), and `qemu-img bitmap`, which runs them in
 * command-line order on one image. Persistent bitmaps reach the image
 * through the format driver's hooks; the driver stores them on close.
 */
import { BlockError, HintedError, toBlockError } from '../errors.ts';
import {
  BITMAP_CHECK,
  bdrvClearDirtyBitmap,
  bdrvCreateDirtyBitmap,
  bdrvDirtyBitmapCheck,
  bdrvFindDirtyBitmap,
  bdrvMergeDirtyBitmap,
  bdrvReleaseDirtyBitmap,
  type BdrvDirtyBitmap,
} from '../dirty-bitmap.ts';
import { bdrvGetInfo } from '../io.ts';
import type { BlockNode } from '../node.ts';

/** One requested action, in command-line order. */
export interface BitmapAction {
  op: 'add' | 'remove' | 'clear' | 'enable' | 'disable' | 'merge';
  /** Source bitmap of a merge. */
  source?: string;
}

/** Options of runBitmapActions. */
export interface BitmapActionOptions {
  /** -g for --add (absent = the driver's default). */
  granularity?: number;
  /** The node merge sources are looked up in (-b); defaults to the image itself. */
  sourceNode?: BlockNode;
}

/** QEMU's bdrv_get_default_bitmap_granularity: the cluster size clamped to [4 KiB, 64 KiB], else 64 KiB. */
export async function defaultBitmapGranularity(bs: BlockNode): Promise<number> {
  try {
    const info = await bdrvGetInfo(bs);
    if (info.clusterSize) return Math.min(65536, Math.max(4096, info.clusterSize));
  } catch {
    // No driver information: QEMU's default.
  }
  return 65536;
}

/** The named bitmap or QEMU's "not found" error (block_dirty_bitmap_lookup). */
export function lookupDirtyBitmap(bs: BlockNode, name: string): BdrvDirtyBitmap {
  const bm = bdrvFindDirtyBitmap(bs, name);
  if (!bm) throw new BlockError('ENOENT', `Dirty bitmap '${name}' not found`);
  return bm;
}

/** block-dirty-bitmap-add: checks the name, granularity and (for persistent bitmaps) the driver, then creates it. */
export async function blockDirtyBitmapAdd(bs: BlockNode, name: string, opts: { granularity?: number; persistent?: boolean; disabled?: boolean } = {}): Promise<BdrvDirtyBitmap> {
  if (name === '') throw new BlockError('EINVAL', 'Bitmap name cannot be empty');
  let granularity = opts.granularity ?? 0;
  if (opts.granularity !== undefined) {
    if (granularity < 512 || (granularity & (granularity - 1)) !== 0 || granularity > 2 ** 31) {
      throw new BlockError('EINVAL', 'Granularity must be power of 2 and at least 512');
    }
  } else {
    granularity = await defaultBitmapGranularity(bs);
  }
  if (opts.persistent) {
    if (!bs.drv.canStoreNewDirtyBitmap) throw new BlockError('ENOTSUP', `Can't store persistent bitmaps to ${bs.displayName}: Operation not supported`);
    if (bdrvFindDirtyBitmap(bs, name)) throw new BlockError('EINVAL', `Bitmap already exists: ${name}`);
    await bs.drv.canStoreNewDirtyBitmap(bs, name, granularity);
  }
  const bm = bdrvCreateDirtyBitmap(bs, granularity, name);
  if (opts.disabled) bm.disabled = true;
  bm.persistent = opts.persistent ?? false;
  return bm;
}

/** block-dirty-bitmap-remove: a persistent bitmap leaves the image at once. */
export async function blockDirtyBitmapRemove(bs: BlockNode, name: string): Promise<void> {
  const bm = lookupDirtyBitmap(bs, name);
  bdrvDirtyBitmapCheck(bm, BITMAP_CHECK.BUSY | BITMAP_CHECK.RO);
  if (bm.persistent) await bs.drv.removePersistentDirtyBitmap?.(bs, name);
  bdrvReleaseDirtyBitmap(bm);
}

/** block-dirty-bitmap-clear. */
export function blockDirtyBitmapClear(bs: BlockNode, name: string): void {
  bdrvClearDirtyBitmap(lookupDirtyBitmap(bs, name));
}

/** block-dirty-bitmap-enable / -disable. */
export function blockDirtyBitmapSetEnabled(bs: BlockNode, name: string, enabled: boolean): void {
  const bm = lookupDirtyBitmap(bs, name);
  bdrvDirtyBitmapCheck(bm, BITMAP_CHECK.ALLOW_RO);
  bm.disabled = !enabled;
}

/**
 * block-dirty-bitmap-merge with one source: the sources are merged into an
 * anonymous bitmap first, so `dst` is unchanged when a source fails.
 */
export function blockDirtyBitmapMerge(bs: BlockNode, dstName: string, srcNode: BlockNode, srcName: string): void {
  const dst = lookupDirtyBitmap(bs, dstName);
  const anon = bdrvCreateDirtyBitmap(bs, dst.granularity, null);
  try {
    const src = lookupDirtyBitmap(srcNode, srcName);
    bdrvMergeDirtyBitmap(anon, src);
    bdrvMergeDirtyBitmap(dst, anon);
  } finally {
    bdrvReleaseDirtyBitmap(anon);
  }
}

/** `prefix` + the error's message, keeping QEMU's hint when it has one (error_prepend). */
function prepend(e: unknown, prefix: string): BlockError {
  const be = toBlockError(e);
  if (be instanceof HintedError) return new HintedError(be.code, `${prefix}${be.message}`, be.hint, e);
  return new BlockError(be.code, `${prefix}${be.message}`, { cause: e });
}

/** Runs the actions of `qemu-img bitmap` on `bs` in order; throws at the first that fails with "Operation <op> on bitmap <name> failed: …". */
export async function runBitmapActions(bs: BlockNode, name: string, actions: BitmapAction[], opts: BitmapActionOptions = {}): Promise<void> {
  for (const a of actions) {
    try {
      switch (a.op) {
        case 'add': {
          const o: { granularity?: number; persistent: boolean; disabled: boolean } = { persistent: true, disabled: false };
          if (opts.granularity !== undefined) o.granularity = opts.granularity;
          await blockDirtyBitmapAdd(bs, name, o);
          break;
        }
        case 'remove': await blockDirtyBitmapRemove(bs, name); break;
        case 'clear': blockDirtyBitmapClear(bs, name); break;
        case 'enable': blockDirtyBitmapSetEnabled(bs, name, true); break;
        case 'disable': blockDirtyBitmapSetEnabled(bs, name, false); break;
        case 'merge': blockDirtyBitmapMerge(bs, name, opts.sourceNode ?? bs, a.source!); break;
      }
    } catch (e) {
      throw prepend(e, `Operation ${a.op} on bitmap ${name} failed: `);
    }
  }
}

/**
 * Refuses a bitmap copy that would meet an inconsistent bitmap, before
 * anything is created (qemu-img's convert_check_bitmaps); `tool` names the
 * program in the hint.
 */
export function convertCheckBitmaps(src: BlockNode, skipBroken: boolean, tool = 'qemu-img'): void {
  for (const bm of src.dirtyBitmaps) {
    if (!bm.persistent || bm.name === null) continue;
    if (!skipBroken && bm.inconsistent) {
      throw new HintedError('EINVAL', `Cannot copy inconsistent bitmap '${bm.name}'`, `Try --skip-broken-bitmaps, or use '${tool} bitmap --remove' to delete it\n`);
    }
  }
}

/**
 * Copies the persistent bitmaps of `src` to `dst` after a convert
 * (qemu-img's convert_copy_bitmaps), newest first as QEMU walks them: each
 * is created with the source's granularity and enablement, then filled by a
 * merge. Inconsistent bitmaps are skipped with a warning when `skipBroken`;
 * a bitmap that cannot be filled is removed again.
 */
export async function convertCopyBitmaps(src: BlockNode, dst: BlockNode, skipBroken: boolean, warn: (msg: string) => void): Promise<void> {
  for (const bm of [...src.dirtyBitmaps]) {
    if (!bm.persistent || bm.name === null) continue;
    const name = bm.name;
    if (skipBroken && bm.inconsistent) {
      warn(`Skipping inconsistent bitmap '${name}'`);
      continue;
    }
    try {
      await blockDirtyBitmapAdd(dst, name, { granularity: bm.granularity, persistent: true, disabled: !bm.enabled });
    } catch (e) {
      throw prepend(e, `Failed to create bitmap ${name}: `);
    }
    try {
      blockDirtyBitmapMerge(dst, name, src, name);
    } catch (e) {
      await blockDirtyBitmapRemove(dst, name).catch(() => undefined);
      throw prepend(e, `Failed to populate bitmap ${name}: `);
    }
  }
}
