/**
 * Compressed clusters (QEMU's block/qcow2-threads.c). zlib clusters are raw
 * deflate with a 4 KiB (2^12) window; zstd clusters are one zstd frame. Both
 * are followed by padding up to the next 512-byte sector, which the
 * decompressors here must ignore: fflate's streaming Inflate stops at the
 * final deflate block, and fzstd's streaming Decompress is stopped as soon as
 * the cluster is full (its one-shot decompress treats the padding as another
 * frame and throws; DecompressionStream rejects trailing bytes too).
 * A cluster is valid only if it decompresses to exactly one cluster, as in
 * QEMU's qcow2_zlib_decompress / qcow2_zstd_decompress.
 */
import { Inflate } from 'fflate';
import { Decompress } from 'fzstd';
import { deflateRaw } from 'pako';
import { BlockError } from '../../core/errors.ts';
import { COMPRESSION_TYPE } from './header.ts';

function decompressError(kind: string, detail: string): BlockError {
  return new BlockError('EIO', `qcow2: ${kind} decompression failed: ${detail}`);
}

/** Streams `src` through a decompressor into `dst`, requiring exactly dst.length bytes of output. */
function collect(kind: string, dst: Uint8Array, run: (sink: (chunk: Uint8Array) => void) => void): void {
  let pos = 0;
  let overflow = false;
  const sink = (chunk: Uint8Array): void => {
    const room = dst.length - pos;
    if (chunk.length > room) overflow = true;
    dst.set(chunk.subarray(0, Math.min(room, chunk.length)), pos);
    pos += Math.min(room, chunk.length);
  };
  try {
    run(sink);
  } catch (e) {
    // A full cluster followed by padding the decompressor chokes on is a valid cluster.
    if (pos !== dst.length || overflow) throw decompressError(kind, e instanceof Error ? e.message : String(e));
    return;
  }
  if (overflow) throw decompressError(kind, 'data larger than a cluster');
  if (pos !== dst.length) throw decompressError(kind, `${pos} bytes instead of ${dst.length}`);
}

/**
 * A native raw-deflate decoder (Node's zlib), given the compressed bytes and
 * the most output wanted: returns the decompressed bytes or throws. The
 * platform entry installs it; without one, fflate decodes everything.
 */
export type RawInflate = (src: Uint8Array, maxOutput: number) => Uint8Array;
let nativeInflate: RawInflate | undefined;

/** Installs (or with undefined removes) the native raw-deflate decoder for zlib clusters. */
export function setRawInflate(f: RawInflate | undefined): void {
  nativeInflate = f;
}

/** A native raw-deflate decoder that works asynchronously (browsers' DecompressionStream), same contract as RawInflate. */
export type RawInflateAsync = (src: Uint8Array, maxOutput: number) => Promise<Uint8Array>;
let asyncInflate: RawInflateAsync | undefined;

/** Installs (or with undefined removes) the asynchronous native decoder, used where no synchronous one is installed. */
export function setRawInflateAsync(f: RawInflateAsync | undefined): void {
  asyncInflate = f;
}

/** True when zlib clusters of this compression type should go through decompressClusterAsync (a native decoder that is only asynchronous). */
export function hasAsyncDecompress(type: number): boolean {
  return type === COMPRESSION_TYPE.ZLIB && asyncInflate !== undefined && nativeInflate === undefined;
}

/**
 * decompressCluster into a new buffer of `clusterSize` bytes through the
 * asynchronous native decoder; whatever it does not answer with exactly one
 * cluster goes to the reference path, whose verdicts and messages stand.
 * One difference is QEMU's own rule: a stream that fills the cluster and only
 * then runs out or breaks is accepted with those bytes (qcow2_decompress takes
 * Z_BUF_ERROR with a full buffer), where fflate, which holds back its last
 * output, refuses it.
 */
export async function decompressClusterAsync(type: number, src: Uint8Array, clusterSize: number): Promise<Uint8Array> {
  if (type === COMPRESSION_TYPE.ZLIB && asyncInflate) {
    try {
      const out = await asyncInflate(src, clusterSize + 1);
      if (out.length === clusterSize) return out;
    } catch {
      // The reference path below names the problem.
    }
  }
  const dst = new Uint8Array(clusterSize);
  decompressCluster(type, src, dst);
  return dst;
}

/**
 * The native decoder's answer when it is an exact, valid cluster, else
 * false: every other outcome (corrupt data, short or long output, padding the
 * decoder will not skip) is left to the fflate path, whose verdicts and
 * messages are the reference.
 */
function inflateNative(src: Uint8Array, dst: Uint8Array): boolean {
  if (!nativeInflate) return false;
  let out: Uint8Array;
  try {
    out = nativeInflate(src, dst.length + 1);
  } catch {
    return false;
  }
  if (out.length !== dst.length) return false;
  dst.set(out);
  return true;
}

/** Marker thrown to stop fzstd once the cluster is full. */
class ClusterFull extends Error {}

/**
 * Decompresses one compressed cluster's data `src` (including sector
 * padding) into `dst`, which is exactly one cluster. Throws EIO with a
 * message when the data is corrupt or does not fill the cluster exactly.
 */
export function decompressCluster(type: number, src: Uint8Array, dst: Uint8Array): void {
  if (type === COMPRESSION_TYPE.ZLIB) {
    if (inflateNative(src, dst)) return;
    collect('zlib', dst, (sink) => {
      const inf = new Inflate((chunk) => sink(chunk));
      inf.push(src, true);
    });
    return;
  }
  if (type === COMPRESSION_TYPE.ZSTD) {
    let got = 0;
    collect('zstd', dst, (sink) => {
      const d = new Decompress((chunk) => {
        sink(chunk);
        got += chunk.length;
        if (got >= dst.length) throw new ClusterFull();
      });
      try {
        d.push(src, true);
      } catch (e) {
        if (!(e instanceof ClusterFull)) throw e;
      }
    });
    return;
  }
  throw new BlockError('ENOTSUP', `qcow2: unknown compression type: ${type}`);
}

/** The zstd compressor (wasm), loaded on first use so readers never pay for it. */
interface ZstdCompressor {
  compress(data: Uint8Array, level?: number): Uint8Array;
}
let zstdLoad: Promise<ZstdCompressor> | undefined;

function zstd(): Promise<ZstdCompressor> {
  zstdLoad ??= import('@hpcc-js/wasm-zstd').then((m) => m.Zstd.load()).catch((e: unknown) => {
    zstdLoad = undefined;
    throw new BlockError('ENOTSUP', `qcow2: zstd compression is unavailable: ${e instanceof Error ? e.message : String(e)}`);
  });
  return zstdLoad;
}

/**
 * Compresses one cluster for writing (QEMU's qcow2_co_compress): returns the
 * compressed bytes, or null when they would not fit in `maxLen` bytes (the
 * caller then writes the cluster uncompressed, as QEMU does on -ENOMEM).
 */
export async function compressCluster(type: number, src: Uint8Array, maxLen: number): Promise<Uint8Array | null> {
  if (type === COMPRESSION_TYPE.ZLIB) {
    // QEMU: deflateInit2(Z_DEFAULT_COMPRESSION, Z_DEFLATED, -12, 9, Z_DEFAULT_STRATEGY).
    const out = deflateRaw(src, { level: -1, windowBits: 12, memLevel: 9 });
    return out.length > maxLen ? null : out;
  }
  if (type === COMPRESSION_TYPE.ZSTD) {
    // QEMU compresses with ZSTD_compressStream2 at the default level (3) into one frame.
    const out = (await zstd()).compress(src, 3);
    return out.length > maxLen ? null : out;
  }
  throw new BlockError('ENOTSUP', `qcow2: unknown compression type: ${type}`);
}
