/**
 * `qemu-img measure` (QEMU's bdrv_measure): how large a new image of the
 * output format would be, for a given size or for copying a source image.
 */
import type { MeasureInfo } from '../driver.ts';
import { BlockError } from '../errors.ts';
import type { Graph } from '../graph.ts';
import type { BlockNode } from '../node.ts';
import { CreateOptionSet } from './create.ts';

/** What to measure. */
export interface MeasureRequest {
  /** Output format (qemu-img's default is raw). */
  fmt: string;
  /** `-o` text for the output format. */
  options?: string;
  /** Virtual size (--size) when there is no source. */
  size?: number;
  /** Source image. */
  source?: BlockNode | null;
}

/** Thrown when `-o` text does not parse; qemu-img adds "Invalid options for file format '…'". */
export class MeasureOptionsError extends BlockError {}

/** Measures per QEMU's bdrv_measure, with the file protocol's options merged in as qemu-img does. */
export async function measureImage(graph: Graph, req: MeasureRequest): Promise<MeasureInfo> {
  const drv = graph.drivers.get(req.fmt);
  if (!drv) throw new BlockError('EINVAL', `Unknown file format '${req.fmt}'`);
  if (!drv.createOptions) throw new BlockError('ENOTSUP', `Format driver '${drv.name}' does not support image creation`);
  const file = graph.drivers.get(graph.defaultProtocol);
  const opts = new CreateOptionSet(drv.createOptions, file?.createOptions);
  if (req.options !== undefined) {
    try {
      opts.parse(req.options);
    } catch (e) {
      throw new MeasureOptionsError('EINVAL', e instanceof Error ? e.message : String(e));
    }
  }
  if (req.size !== undefined) opts.setNumber('size', req.size);
  if (!drv.measure) throw new BlockError('ENOTSUP', `Block driver '${drv.name}' does not support size measurement`);
  return drv.measure(opts.toCreateOptions(), req.source ?? null);
}
