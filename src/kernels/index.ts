// Loader for the wasm kernels (build/qblock.wasm) in Node and in browsers,
// with the JS reference implementations as a fallback for engines without
// wasm SIMD. Call `await loadKernels()` once, then use `kernels()`.

import { setZeroCheck } from '../core/zero.ts';
import { firstNonZeroRef, isZeroRef } from './reference.ts';
import { WasmHost } from './wasm.ts';

export { firstNonZeroRef, isZeroRef } from './reference.ts';
export { WasmHost, type QblockExports } from './wasm.ts';

/** The kernel entry points the rest of qblock calls; each takes ordinary Uint8Array views. */
export interface Kernels {
  /** True when these are the wasm kernels, false when they are the JS reference fallback. */
  readonly wasm: boolean;
  /** The wasm host (memory, scratch, raw exports), or null for the reference fallback. */
  readonly host: WasmHost | null;
  /** True when every byte of `buf` is zero. */
  isZero(buf: Uint8Array): boolean;
  /** Offset of the first non-zero byte of `buf`, or -1 when all bytes are zero. */
  firstNonZero(buf: Uint8Array): number;
}

/**
 * Bytes copied into wasm memory per kernel call. Bounds the scratch block
 * (and so linear memory growth) regardless of the caller's buffer size.
 */
export const COPY_CHUNK = 1024 * 1024;

/** Largest range passed to one kernel call for data already in wasm memory (keeps results within i32). */
const IN_PLACE_CHUNK = 1 << 30;

/** Scratch slot used by the zero-detection kernels. */
const ZERO_SLOT = 'zero';

/**
 * A minimal module whose only function returns a v128 constant: if the engine
 * validates it, it supports wasm SIMD. (type () -> v128; body v128.const 0.)
 */
const SIMD_PROBE = new Uint8Array([
  0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00,
  0x01, 0x05, 0x01, 0x60, 0x00, 0x01, 0x7b,
  0x03, 0x02, 0x01, 0x00,
  0x0a, 0x16, 0x01, 0x14, 0x00, 0xfd, 0x0c,
  0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
  0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
  0x0b,
]);

/** True when this engine can compile wasm modules that use SIMD. */
export function simdSupported(): boolean {
  try {
    return typeof WebAssembly === 'object' && WebAssembly.validate(SIMD_PROBE);
  } catch {
    return false;
  }
}

/** Where the release build of the kernels lives, relative to this module (Vite rewrites this URL in builds). */
const WASM_URL = new URL('../../build/qblock.wasm', import.meta.url);

/** True when running under Node (vitest, the CLI), false in browsers and workers. */
function isNode(): boolean {
  return typeof process !== 'undefined' && typeof process.versions === 'object' && typeof process.versions.node === 'string';
}

/** Reads the wasm bytes from disk (Node) or the network (browser). */
async function wasmBytes(): Promise<BufferSource> {
  if (isNode()) {
    // Kept out of the bundler's sight: browsers never take this branch.
    const fsName = 'node:fs/promises';
    const fs = (await import(/* @vite-ignore */ fsName)) as typeof import('node:fs/promises');
    try {
      // readFile returns a Buffer over a plain (never shared) ArrayBuffer.
      return (await fs.readFile(WASM_URL)) as Uint8Array<ArrayBuffer>;
    } catch (e) {
      throw new Error(`qblock: cannot read ${WASM_URL.href}; build it with "npm run asbuild" (${String(e)})`);
    }
  }
  const res = await fetch(WASM_URL);
  if (!res.ok) throw new Error(`qblock: fetching ${WASM_URL.href} failed: HTTP ${res.status}`);
  return res.arrayBuffer();
}

/** Kernels backed by the JS reference implementations. */
export const referenceKernels: Kernels = {
  wasm: false,
  host: null,
  isZero: isZeroRef,
  firstNonZero: firstNonZeroRef,
};

/** Kernels that run the wasm module, copying data that is not already in its memory. */
function wasmKernels(host: WasmHost): Kernels {
  const ex = host.exports;

  /**
   * Presents `buf` to `visit` as (pointer, length, offset in buf) pieces in
   * wasm memory, in order, until `visit` returns true; returns whether it did.
   * Data already in wasm memory is used in place; other data is copied
   * through the scratch block one COPY_CHUNK at a time.
   */
  const eachPiece = (buf: Uint8Array, visit: (ptr: number, len: number, off: number) => boolean): boolean => {
    const inPlace = host.contains(buf);
    const step = inPlace ? IN_PLACE_CHUNK : COPY_CHUNK;
    let off = 0;
    do {
      const part = buf.subarray(off, off + step);
      const ptr = inPlace ? part.byteOffset : host.copyIn(ZERO_SLOT, part);
      if (visit(ptr, part.length, off)) return true;
      off += step;
    } while (off < buf.length);
    return false;
  };

  return {
    wasm: true,
    host,
    isZero(buf: Uint8Array): boolean {
      return !eachPiece(buf, (ptr, len) => ex.isZero(ptr, len) === 0);
    },
    firstNonZero(buf: Uint8Array): number {
      let found = -1;
      eachPiece(buf, (ptr, len, off) => {
        const r = ex.firstNonZero(ptr, len);
        if (r < 0) return false;
        found = off + r;
        return true;
      });
      return found;
    },
  };
}

let loading: Promise<Kernels> | null = null;
let loaded: Kernels | null = null;

/**
 * Loads the kernels once (wasm if the engine supports SIMD, else the JS
 * reference) and returns them. With wasm, the request path's zero detection
 * (src/core/zero.ts) switches to the wasm kernel.
 */
export function loadKernels(): Promise<Kernels> {
  loading ??= (async () => {
    const k = simdSupported() ? wasmKernels(await WasmHost.instantiate(await wasmBytes())) : referenceKernels;
    if (k.wasm) setZeroCheck(k.isZero);
    loaded = k;
    return k;
  })().catch((e: unknown) => {
    loading = null;
    throw e;
  });
  return loading;
}

/** The loaded kernels; throws if `loadKernels()` has not resolved yet. */
export function kernels(): Kernels {
  if (!loaded) throw new Error('qblock: kernels not loaded; await loadKernels() first');
  return loaded;
}

/** True when the loaded kernels are the wasm ones; throws if `loadKernels()` has not resolved yet. */
export function usingWasm(): boolean {
  return kernels().wasm;
}
