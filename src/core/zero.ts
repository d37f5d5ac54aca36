/**
 * Zero detection used on the request path. Uses the wasm SIMD kernel once it
 * is loaded (src/kernels) and a word-wise scan until then.
 */

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
