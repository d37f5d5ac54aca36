/**
 * Zero detection used on the request path. Uses the wasm SIMD kernel once it
 * is loaded (src/kernels) and a word-wise scan until then.
 */

import { firstDifferenceRef, firstEqualBlockRef, firstNonZeroRef, firstZeroBlockRef } from '../kernels/reference.ts';

/** A zero-check implementation: returns true when every byte is 0. */
export type ZeroCheck = (buf: Uint8Array) => boolean;

/** Word-wise reference scan, correct for any alignment. */
export function isZeroBufferJs(buf: Uint8Array): boolean {
  const len = buf.length;
  let i = 0;
  const head = (8 - (buf.byteOffset & 7)) & 7;
  for (; i < head && i < len; i++) if (buf[i] !== 0) return false;
  const words = (len - i) >>> 3;
  if (words > 0) {
    const w = new BigUint64Array(buf.buffer, buf.byteOffset + i, words);
    for (let k = 0; k < words; k++) if (w[k] !== 0n) return false;
    i += words << 3;
  }
  for (; i < len; i++) if (buf[i] !== 0) return false;
  return true;
}

let impl: ZeroCheck = isZeroBufferJs;

/** True when every byte of `buf` is zero. */
export function isZeroBuffer(buf: Uint8Array): boolean {
  return impl(buf);
}

/** Installs a faster implementation (the wasm kernel); the kernels module calls this on load. */
export function setZeroCheck(fn: ZeroCheck): void {
  impl = fn;
}

/** Scans that find where data and zeroes (or equal and different bytes) start in one call, instead of one call per sector. */
export interface ZeroScan {
  /** Offset of the first non-zero byte of `buf`, or -1. */
  firstNonZero(buf: Uint8Array): number;
  /** Offset of the first all-zero `unit`-byte block of `buf` (blocks at multiples of unit; the last may be short), or -1. */
  firstZeroBlock(buf: Uint8Array, unit: number): number;
  /** Offset of the first byte where `a` and `b` differ over their common length, or -1. */
  firstDifference(a: Uint8Array, b: Uint8Array): number;
  /** Offset of the first `unit`-byte block where `a` and `b` are equal, or -1. */
  firstEqualBlock(a: Uint8Array, b: Uint8Array, unit: number): number;
}

let scan: ZeroScan = { firstNonZero: firstNonZeroRef, firstZeroBlock: firstZeroBlockRef, firstDifference: firstDifferenceRef, firstEqualBlock: firstEqualBlockRef };

/** Offset of the first non-zero byte of `buf`, or -1 when it is all zero (convert -S, compare, map). */
export function firstNonZeroByte(buf: Uint8Array): number {
  return scan.firstNonZero(buf);
}

/** Offset of the first all-zero `unit`-byte block of `buf`, or -1 when every block holds data (convert -S). */
export function firstZeroBlock(buf: Uint8Array, unit: number): number {
  return scan.firstZeroBlock(buf, unit);
}

/** Offset of the first byte where `a` and `b` differ, or -1 when they are equal (compare). */
export function firstDifferentByte(a: Uint8Array, b: Uint8Array): number {
  return scan.firstDifference(a, b);
}

/** Offset of the first `unit`-byte block where `a` and `b` are equal, or -1 when every block differs (compare's differing runs). */
export function firstEqualBlock(a: Uint8Array, b: Uint8Array, unit: number): number {
  return scan.firstEqualBlock(a, b, unit);
}

/** Installs faster scans (the wasm kernels); the kernels module calls this on load. */
export function setZeroScan(s: ZeroScan): void {
  scan = s;
}
