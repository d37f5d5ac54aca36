/**
 * `qemu-img compare` (QEMU's img_compare): walks both images by block
 * status, skips ranges that are zero in both, reads and compares the rest
 * in 2 MiB chunks at 512-byte granularity, and checks that whatever one
 * image has beyond the other's end reads as zeroes.
 */
import type { BlockBackend } from '../block-backend.ts';
import { STRERROR, toBlockError } from '../errors.ts';
import { bdrvBlockStatusAbove } from '../io.ts';
import { kernelBuffer } from '../../kernels/index.ts';
import { BLOCK } from '../types.ts';
import { firstDifferentByte, firstEqualBlock, firstNonZeroByte } from '../zero.ts';

/** Chunk size of reads (QEMU's IO_BUF_SIZE). */
export const IO_BUF_SIZE = 2 * 1024 * 1024;
const SECTOR = 512;

/** An error with the exit status qemu-img compare gives it (2 open, 3 allocation test, 4 read). */
export class CompareError extends Error {
  constructor(readonly status: number, message: string) {
    super(message);
  }
}

/** One side of a comparison. */
export interface CompareSide {
  blk: BlockBackend;
  /** Name used in messages. */
  filename: string;
}

/** Options for compareImages. */
export interface CompareOptions {
  /** Fail on size or block-status differences (-s). */
  strict?: boolean;
  /** Receives the lines qemu-img prints on stdout (without newline). */
  say?: (line: string) => void;
  /** Progress after each chunk: bytes covered, of the larger image's size. */
  progress?: (delta: number, base: number) => void;
}

/**
 * QEMU's compare_buffers: whether the first 512-byte chunk differs, and the
 * length of the prefix (in whole chunks) with the same status.
 */
export function compareBuffers(a: Uint8Array, b: Uint8Array, bytes: number): { differ: boolean; pnum: number } {
  const x = a.subarray(0, bytes);
  const y = b.subarray(0, bytes);
  const first = Math.min(bytes, SECTOR);
  const differ = firstDifferentByte(x.subarray(0, first), y.subarray(0, first)) >= 0;
  if (first === bytes) return { differ, pnum: bytes };
  // One kernel call finds where the status changes: the first equal chunk after differing ones,
  // or the chunk holding the first differing byte.
  if (differ) {
    const eq = firstEqualBlock(x, y, SECTOR);
    return { differ, pnum: eq < 0 ? bytes : eq };
  }
  const d = firstDifferentByte(x, y);
  return { differ, pnum: d < 0 ? bytes : d - (d % SECTOR) };
}

/** QEMU's find_nonzero: the offset of the first 512-byte chunk holding a non-zero byte, or -1. */
export function findNonzero(buf: Uint8Array): number {
  const i = firstNonZeroByte(buf);
  return i < 0 ? -1 : i - (i % SECTOR);
}

async function read(side: CompareSide, offset: number, buf: Uint8Array): Promise<void> {
  try {
    await side.blk.pread(offset, buf);
  } catch (e) {
    throw new CompareError(4, `Error while reading offset ${offset} of ${side.filename}: ${STRERROR[toBlockError(e).code]}`);
  }
}

async function status(side: CompareSide, offset: number, bytes: number): Promise<{ status: number; pnum: number }> {
  try {
    const st = await bdrvBlockStatusAbove(side.blk.bs!, null, false, true, offset, bytes);
    return { status: st.status, pnum: st.pnum };
  } catch {
    throw new CompareError(3, `Sector allocation test failed for ${side.filename}`);
  }
}

/** check_empty_sectors: 0 when the range reads as zeroes, else 1 after saying where it does not. */
async function checkEmpty(side: CompareSide, offset: number, bytes: number, say: (l: string) => void, scratch?: Uint8Array): Promise<number> {
  const buf = scratch && scratch.length >= bytes ? scratch.subarray(0, bytes) : new Uint8Array(bytes);
  await read(side, offset, buf);
  const idx = findNonzero(buf);
  if (idx >= 0) {
    say(`Content mismatch at offset ${offset + idx}!`);
    return 1;
  }
  return 0;
}

/**
 * Compares two images; returns qemu-img's exit status 0 (identical) or 1
 * (different), printing its messages through `say`. Throws CompareError
 * carrying status 3 or 4 for allocation-test and read failures.
 */
export async function compareImages(a: CompareSide, b: CompareSide, opts: CompareOptions = {}): Promise<number> {
  const say = opts.say ?? (() => undefined);
  const size = async (s: CompareSide): Promise<number> => {
    try {
      return await s.blk.getLength();
    } catch (e) {
      throw new CompareError(4, `Can't get size of ${s.filename}: ${STRERROR[toBlockError(e).code]}`);
    }
  };
  const size1 = await size(a);
  const size2 = await size(b);
  const total = Math.min(size1, size2);
  if (opts.strict && size1 !== size2) {
    say('Strict mode: Image size mismatch!');
    return 1;
  }
  // In linear memory when possible, so the compare and zero kernels read the chunks in place.
  const own1 = kernelBuffer(Math.min(IO_BUF_SIZE, Math.max(total, 0)));
  const own2 = kernelBuffer(own1.buf.length);
  try {
    return await compareLoop(a, b, opts, say, size1, size2, own1.buf, own2.buf);
  } finally {
    own1.release();
    own2.release();
  }
}

/** The walk of compareImages over both images, with its two read buffers. */
async function compareLoop(a: CompareSide, b: CompareSide, opts: CompareOptions, say: (l: string) => void, size1: number, size2: number, bufs1: Uint8Array, bufs2: Uint8Array): Promise<number> {
  const total = Math.min(size1, size2);
  const base = Math.max(size1, size2);
  let offset = 0;
  while (offset < total) {
    const s1 = await status(a, offset, size1 - offset);
    const s2 = await status(b, offset, size2 - offset);
    const alloc1 = (s1.status & BLOCK.ALLOCATED) !== 0;
    const alloc2 = (s2.status & BLOCK.ALLOCATED) !== 0;
    let chunk = Math.min(s1.pnum, s2.pnum, total - offset);
    if (opts.strict && s1.status !== s2.status) {
      say(`Strict mode: Offset ${offset} block status mismatch!`);
      return 1;
    }
    if (s1.status & BLOCK.ZERO && s2.status & BLOCK.ZERO) {
      // Both read as zeroes: nothing to compare.
    } else if (alloc1 === alloc2) {
      if (alloc1) {
        chunk = Math.min(chunk, IO_BUF_SIZE);
        const buf1 = bufs1.subarray(0, chunk);
        const buf2 = bufs2.subarray(0, chunk);
        // Both reads in flight at once; a failure is reported for the first image first, as reading in turn would.
        const [r1, r2] = await Promise.allSettled([read(a, offset, buf1), read(b, offset, buf2)]);
        if (r1.status === 'rejected') throw r1.reason;
        if (r2.status === 'rejected') throw r2.reason;
        const r = compareBuffers(buf1, buf2, chunk);
        if (r.differ || r.pnum !== chunk) {
          say(`Content mismatch at offset ${offset + (r.differ ? 0 : r.pnum)}!`);
          return 1;
        }
      }
    } else {
      chunk = Math.min(chunk, IO_BUF_SIZE);
      if (await checkEmpty(alloc1 ? a : b, offset, chunk, say, bufs1)) return 1;
    }
    offset += chunk;
    opts.progress?.(chunk, base);
  }
  if (size1 !== size2) {
    say('Warning: Image size mismatch!');
    const over = size1 > size2 ? a : b;
    while (offset < base) {
      const st = await status(over, offset, base - offset);
      let chunk = st.pnum;
      if (st.status & BLOCK.ALLOCATED && !(st.status & BLOCK.ZERO)) {
        chunk = Math.min(chunk, IO_BUF_SIZE);
        if (await checkEmpty(over, offset, chunk, say)) return 1;
      }
      offset += chunk;
      opts.progress?.(chunk, base);
    }
  }
  say('Images are identical.');
  return 0;
}


