/**
 * `qemu-img amend` dispatch: formats whose driver implements amend get the
 * options; the rest fail with QEMU's "does not support option amendment".
 */
import type { CreateOptions } from '../options.ts';
import { BlockError } from '../errors.ts';
import type { BlockNode } from '../node.ts';
import type { ProgressFn } from '../driver.ts';
import { CreateOptionSet, HintedError } from './create.ts';

/** Amends `bs` with `-o` text; throws BlockError with QEMU's messages. */
export async function amendImage(bs: BlockNode, options: string, force: boolean, progress?: ProgressFn): Promise<void> {
  const drv = bs.drv;
  if (!drv.amend) throw new BlockError('ENOTSUP', `Format driver '${drv.name}' does not support option amendment`);
  const set = new CreateOptionSet(drv.amendOptions ?? drv.createOptions);
  try {
    set.parse(options);
  } catch (e) {
    // QEMU's img_amend: when the text parses as create options, say that the option is only for creation.
    const wider = new CreateOptionSet(drv.amendOptions ?? drv.createOptions, drv.createOptions);
    try {
      wider.parse(options);
    } catch {
      throw e;
    }
    const be = e as BlockError;
    throw new HintedError(be.code, be.message, 'This option is only supported for image creation\n', e);
  }
  const opts: CreateOptions = set.toCreateOptions();
  await drv.amend(bs, opts, force, progress);
}

/** `amend -o help` for a format (QEMU's print_amend_option_help), or the error QEMU gives. */
export function amendOptionHelpError(drvName: string, hasAmend: boolean): BlockError | null {
  if (!hasAmend) return new BlockError('ENOTSUP', `Format driver '${drvName}' does not support option amendment`);
  return null;
}
