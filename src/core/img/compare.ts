/**
 * `qemu-img compare` (QEMU's img_compare): walks both images by block
 * status, skips ranges that are zero in both, reads and compares the rest
 * in 2 MiB chunks at 512-byte granularity, and checks that whatever one
 * image has beyond the other's end reads as zeroes.
 */
import type { BlockBackend } from '../block-backend.ts';
import { STRERROR, toBlockError } from '../errors.ts';
import { bdrvBlockStatusAbove } from '../io.ts';
import { BLOCK } from '../types.ts';
import { isZeroBuffer } from '../zero.ts';

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
  const eq = (from: number, to: number): boolean => {
    for (let i = from; i < to; i++) if (a[i] !== b[i]) return false;
    return true;
  };
  let i = Math.min(bytes, SECTOR);
  const differ = !eq(0, i);
  while (i < bytes) {
    const len = Math.min(bytes - i, SECTOR);
    if (!eq(i, i + len) !== differ) break;
    i += len;
  }
  return { differ, pnum: i };
}

/** QEMU's find_nonzero: the offset of the first 512-byte chunk holding a non-zero byte, or -1. */
export function findNonzero(buf: Uint8Array): number {
  const n = buf.length;
  const end = n - (n % SECTOR);
  let i = 0;
  for (; i < end; i += SECTOR) if (!isZeroBuffer(buf.subarray(i, i + SECTOR))) return i;
  if (i < n && !isZeroBuffer(buf.subarray(i, n))) return i;
  return -1;
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
async function checkEmpty(side: CompareSide, offset: number, bytes: number, say: (l: string) => void): Promise<number> {
  const buf = new Uint8Array(bytes);
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
  const base = Math.max(size1, size2);
  if (opts.strict && size1 !== size2) {
    say('Strict mode: Image size mismatch!');
    return 1;
  }
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
        const buf1 = new Uint8Array(chunk);
        const buf2 = new Uint8Array(chunk);
        await read(a, offset, buf1);
        await read(b, offset, buf2);
        const r = compareBuffers(buf1, buf2, chunk);
        if (r.differ || r.pnum !== chunk) {
          say(`Content mismatch at offset ${offset + (r.differ ? 0 : r.pnum)}!`);
          return 1;
        }
      }
    } else {
      chunk = Math.min(chunk, IO_BUF_SIZE);
      if (await checkEmpty(alloc1 ? a : b, offset, chunk, say)) return 1;
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


