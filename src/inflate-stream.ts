/**
 * Raw-deflate decoding through the platform's DecompressionStream (native
 * zlib in browsers, several times fflate's speed). A qcow2 zlib cluster is
 * followed by sector padding, which the stream rejects as junk after the
 * final block; the output that came before the rejection is the cluster,
 * and the caller judges whether it is exactly one (see compress.ts).
 */
import type { RawInflateAsync } from './formats/qcow2/compress.ts';

/** True when this platform has DecompressionStream with the deflate-raw format. */
export function streamInflateAvailable(): boolean {
  if (typeof DecompressionStream === 'undefined') return false;
  try {
    new DecompressionStream('deflate-raw');
    return true;
  } catch {
    return false;
  }
}

/**
 * Decodes `src` and returns at most `maxOutput` bytes of output (a
 * caller asking for one byte more than it wants sees an overlong stream).
 * Rejects only when the stream fails before producing anything.
 */
export const inflateRawStream: RawInflateAsync = async (src, maxOutput) => {
  const ds = new DecompressionStream('deflate-raw');
  const writer = ds.writable.getWriter();
  const reader = ds.readable.getReader();
  // The writes settle as the reader drains; their errors are the reader's too.
  // Streams take no views of shared memory.
  const chunk = src.buffer instanceof ArrayBuffer ? (src as Uint8Array<ArrayBuffer>) : new Uint8Array(src);
  writer.write(chunk).catch(() => undefined);
  writer.close().catch(() => undefined);
  const out = new Uint8Array(maxOutput);
  let pos = 0;
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      const n = Math.min(value.length, maxOutput - pos);
      out.set(value.subarray(0, n), pos);
      pos += n;
      if (pos === maxOutput) break;
    }
  } catch (e) {
    if (pos === 0) throw e;
  }
  reader.cancel().catch(() => undefined);
  return out.subarray(0, pos);
};
