// Loader for the wasm kernels (build/qblock.wasm) in Node and in browsers,
// with the JS reference implementations as the fallback for engines without
// wasm SIMD. `await loadKernels()` once (opening a node in a Graph does it),
// then use `kernels()`. Loading installs the wasm kernels where the engine
// calls them: the request path's zero check (src/core/zero.ts), the qcow2 L2
// and refcount kernels (setQcow2Kernels) and, with a shared memory, the
// metadata cache's entry buffers (so caches live in linear memory).

import { setBitmapKernel } from '../core/hbitmap.ts';
import { setZeroCheck, setZeroScan } from '../core/zero.ts';
import { setCacheBufferAllocator } from '../formats/qcow2/cache.ts';
import { jsQcow2Kernels, setQcow2Kernels } from '../formats/qcow2/kernels.ts';
import { wasmBitmapOps, wasmByteOrderOps, wasmL2Ops, wasmRefcountOps, wasmZeroOps } from './ops-wasm.ts';
import { LinearBufferPool } from './pool.ts';
import { bitmapRef } from './reference-bitmap.ts';
import { l2Ref, refcountRef } from './reference-qcow2.ts';
import { byteOrderRef, firstDifferenceRef, firstEqualBlockRef, firstNonZeroRef, firstZeroBlockRef, isZeroRef } from './reference.ts';
import type { BitmapOps, ByteOrderOps, L2Ops, RefcountOps, ZeroOps } from './types.ts';
import { WasmHost } from './wasm.ts';

export { firstDifferenceRef, firstEqualBlockRef, firstNonZeroRef, firstZeroBlockRef, isZeroRef, byteOrderRef } from './reference.ts';
export { l2Ref, refcountRef } from './reference-qcow2.ts';
export { bitmapRef } from './reference-bitmap.ts';
export { COPY_CHUNK } from './ops-wasm.ts';
export { LinearBufferPool, type PoolStats } from './pool.ts';
export { WasmHost, type QblockExports } from './wasm.ts';
export type * from './types.ts';

/** The kernel entry points the rest of qblock calls; each takes ordinary Uint8Array views. */
export interface Kernels extends ZeroOps {
  /** True when these are the wasm kernels, false when they are the JS reference fallback. */
  readonly wasm: boolean;
  /** The wasm host (memory, scratch, raw exports), or null for the reference fallback. */
  readonly host: WasmHost | null;
  /** qcow2 L2 decoding (installed as the driver's L2 kernel). */
  readonly l2: L2Ops;
  /** Refcount access, searches and check's bulk operations (installed as the driver's refcount kernel). */
  readonly refcount: RefcountOps;
  /** Dirty bitmaps (the bits of src/core/hbitmap.ts). */
  readonly bitmap: BitmapOps;
  /** Byte-order helpers for big-endian tables. */
  readonly byteorder: ByteOrderOps;
  /** Cache entry buffers in linear memory, or null (reference kernels, or no shared memory). */
  readonly pool: LinearBufferPool | null;
}

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
async function wasmBytes(): Promise<Uint8Array> {
  if (isNode()) {
    // Kept out of the bundler's sight: browsers never take this branch.
    const fsName = 'node:fs/promises';
    const fs = (await import(/* @vite-ignore */ fsName)) as typeof import('node:fs/promises');
    try {
      return await fs.readFile(WASM_URL);
    } catch (e) {
      throw new Error(`qblock: cannot read ${WASM_URL.href}; build it with "npm run asbuild" (${String(e)})`);
    }
  }
  const res = await fetch(WASM_URL);
  if (!res.ok) throw new Error(`qblock: fetching ${WASM_URL.href} failed: HTTP ${res.status}`);
  return new Uint8Array(await res.arrayBuffer());
}

/** Kernels backed by the JS reference implementations. */
export const referenceKernels: Kernels = {
  wasm: false,
  host: null,
  isZero: isZeroRef,
  firstNonZero: firstNonZeroRef,
  firstZeroBlock: firstZeroBlockRef,
  firstDifference: firstDifferenceRef,
  firstEqualBlock: firstEqualBlockRef,
  l2: l2Ref,
  refcount: refcountRef,
  bitmap: bitmapRef,
  byteorder: byteOrderRef,
  pool: null,
};

/** Kernels that run on `host`'s wasm instance. */
export function wasmKernels(host: WasmHost): Kernels {
  const zero = wasmZeroOps(host);
  return {
    wasm: true,
    host,
    isZero: zero.isZero,
    firstNonZero: zero.firstNonZero,
    firstZeroBlock: zero.firstZeroBlock,
    firstDifference: zero.firstDifference,
    firstEqualBlock: zero.firstEqualBlock,
    l2: wasmL2Ops(host),
    refcount: wasmRefcountOps(host),
    bitmap: wasmBitmapOps(host),
    byteorder: wasmByteOrderOps(host),
    pool: host.shared ? new LinearBufferPool(host) : null,
  };
}

/** Compiles and instantiates a fresh wasm instance (its own memory) and returns kernels over it; `shared` forces the memory kind. */
export async function instantiateKernels(shared?: boolean): Promise<Kernels> {
  return wasmKernels(await WasmHost.instantiate(await wasmBytes(), shared === undefined ? {} : { shared }));
}

/**
 * Makes `k` the implementation the engine calls: the zero check and scans, the qcow2 L2
 * and refcount kernels, the bitmap kernel of new HBitmaps, and the cache
 * entry allocator (linear memory when `k` has a pool, the JS heap otherwise).
 * loadKernels does this; benchmarks call it to compare implementations.
 */
export function installKernels(k: Kernels): void {
  setZeroCheck(k.isZero);
  setZeroScan({ firstNonZero: k.firstNonZero, firstZeroBlock: k.firstZeroBlock, firstDifference: k.firstDifference, firstEqualBlock: k.firstEqualBlock });
  setBitmapKernel(k.bitmap);
  setQcow2Kernels(k.wasm ? { l2: k.l2, refcount: k.refcount, tables: k.byteorder } : jsQcow2Kernels);
  const pool = k.pool;
  setCacheBufferAllocator(pool ? (size) => pool.allocate(size) : (size) => new Uint8Array(size));
}

let loading: Promise<Kernels> | null = null;
let loaded: Kernels | null = null;

/**
 * Loads the kernels once (wasm if the engine supports SIMD, else the JS
 * reference), installs them (installKernels) and returns them. Rejects when
 * the engine has SIMD but the module cannot be loaded: a missing build is an
 * error, not a reason to run the reference silently.
 */
export function loadKernels(): Promise<Kernels> {
  loading ??= (async () => {
    const k = simdSupported() ? await instantiateKernels() : referenceKernels;
    installKernels(k);
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

/** The loaded kernels, or the JS reference when loadKernels() has not resolved (for code that may run before it, such as tests of core pieces). */
export function currentKernels(): Kernels {
  return loaded ?? referenceKernels;
}

/** A buffer from kernelBuffer, with what returns it. */
export interface KernelBuffer {
  buf: Uint8Array;
  /** Gives the memory back; the buffer must not be used afterwards. */
  release(): void;
}

/**
 * A working buffer of `bytes` that the zero and compare kernels scan in place:
 * in linear memory when it is shared (views of shared memory survive its
 * growth), else ordinary memory, which they copy in piece by piece. For the
 * bulk loops (convert, compare) whose every chunk is scanned.
 */
export function kernelBuffer(bytes: number): KernelBuffer {
  const host = loaded?.host;
  if (host?.shared && bytes > 0) {
    let ptr: number;
    try {
      ptr = host.alloc(bytes);
    } catch {
      // Linear memory is full: ordinary memory works too, the kernels just copy from it.
      return { buf: new Uint8Array(bytes), release: () => undefined };
    }
    let live = true;
    return {
      buf: host.view(ptr, bytes),
      release: () => {
        if (live) host.free(ptr);
        live = false;
      },
    };
  }
  return { buf: new Uint8Array(bytes), release: () => undefined };
}

/** True when the loaded kernels are the wasm ones; throws if `loadKernels()` has not resolved yet. */
export function usingWasm(): boolean {
  return kernels().wasm;
}
