/**
 * `qemu-img amend` dispatch: formats whose driver implements amend get the
 * options; the rest fail with QEMU's "does not support option amendment".
 */
import type { CreateOptions } from '../options.ts';
import { BlockError } from '../errors.ts';
import type { BlockNode } from '../node.ts';
import type { ProgressFn } from '../driver.ts';
import { CreateOptionSet } from './create.ts';

/** Amends `bs` with `-o` text; throws BlockError with QEMU's messages. */
export async function amendImage(bs: BlockNode, options: string, force: boolean, progress?: ProgressFn): Promise<void> {
  const drv = bs.drv;
  if (!drv.amend) throw new BlockError('ENOTSUP', `Format driver '${drv.name}' does not support option amendment`);
  const set = new CreateOptionSet(drv.createOptions);
  set.parse(options);
  const opts: CreateOptions = set.toCreateOptions();
  await drv.amend(bs, opts, force, progress);
}

/** `amend -o help` for a format (QEMU's print_amend_option_help), or the error QEMU gives. */
export function amendOptionHelpError(drvName: string, hasAmend: boolean): BlockError | null {
  if (!hasAmend) return new BlockError('ENOTSUP', `Format driver '${drvName}' does not support option amendment`);
  return null;
}
