/**
 * `qemu-img dd` copy loop (QEMU's img_dd after option parsing): the output
 * size follows dd(1)'s count and skip, quirks included (count limits the
 * input size before skip is subtracted), and data is copied in bs-sized
 * blocks.
 */
import type { BlockBackend } from '../block-backend.ts';
import { BlockError, STRERROR, toBlockError } from '../errors.ts';

/** dd operands after parsing. */
export interface DdParams {
  /** Block size (bs=), default 512. */
  bs: number;
  /** Blocks to copy (count=), undefined for all. */
  count?: number;
  /** Blocks to skip at the start of input (skip=). */
  skip?: number;
}

/** The output image size dd creates for an input of `inSize` bytes. */
export function ddOutputSize(inSize: number, p: DdParams): { size: number; outSize: number; skipBeyond: boolean } {
  let size = inSize;
  if (p.count !== undefined && p.count <= Number.MAX_SAFE_INTEGER / p.bs && p.count * p.bs < size) size = p.count * p.bs;
  const skip = p.skip ?? 0;
  const skipBeyond = p.skip !== undefined && (skip > Number.MAX_SAFE_INTEGER / p.bs || size < p.bs * skip);
  return { size, outSize: skipBeyond ? 0 : size - p.bs * skip, skipBeyond };
}

/** Copies blocks from `src` to `dst` as img_dd does; throws BlockError with QEMU's message. */
export async function ddCopy(src: BlockBackend, dst: BlockBackend, p: DdParams, size: number, skipBeyond: boolean): Promise<void> {
  let inPos = skipBeyond ? size : (p.skip ?? 0) * p.bs;
  let outPos = 0;
  const buf = new Uint8Array(p.bs);
  while (inPos < size) {
    const bytes = inPos + p.bs > size ? size - inPos : p.bs;
    const chunk = buf.subarray(0, bytes);
    try {
      await src.pread(inPos, chunk);
    } catch (e) {
      throw new BlockError(toBlockError(e).code, `error while reading from input image file: ${STRERROR[toBlockError(e).code]}`);
    }
    inPos += bytes;
    try {
      await dst.pwrite(outPos, chunk);
    } catch (e) {
      throw new BlockError(toBlockError(e).code, `error while writing to output image file: ${STRERROR[toBlockError(e).code]}`);
    }
    outPos += bytes;
  }
}
