/**
 * What the browser conformance runs: target names with the shared suite's
 * groups they take, the read-only targets, and the images served over HTTP.
 * Imported both by the test worker and by the Playwright specs (in Node),
 * so it holds data and pure functions only.
 */
import type { ConformanceGroup } from '../../src/core/conformance.ts';

/** One mebibyte. */
export const MiB = 1 << 20;

/** Groups every writable, resizable target takes (as in src/core/conformance.test.ts). */
export const DATA_GROUPS: readonly ConformanceGroup[] = ['read-write', 'zero-init', 'write-zeroes', 'discard', 'flush', 'truncate', 'truncate-prealloc', 'range-checks'];

/** A target of the shared (writable) suite. */
export interface SharedTargetInfo {
  id: string;
  groups: readonly ConformanceGroup[];
}

/** Targets of the shared suite, each with the groups it takes. */
export const SHARED_TARGETS: readonly SharedTargetInfo[] = [
  { id: 'opfs', groups: DATA_GROUPS },
  { id: 'raw over opfs', groups: DATA_GROUPS },
  // Read-only stacks can only take the shared cases that never write: a zero image must read as zeroes.
  { id: 'http zero image', groups: ['zero-init'] },
  { id: 'blob zero image', groups: ['zero-init'] },
];

/** A target of the read-only cases (src/protocols/readonly-conformance.ts). */
export interface ReadOnlyTargetInfo {
  id: string;
  /** Its image is made by qemu-img in the spec (QCOW2_IMAGES), so it runs only where QEMU is installed. */
  needsQemu?: boolean;
}

/** Targets of the read-only cases. */
export const READONLY_TARGETS: readonly ReadOnlyTargetInfo[] = [
  { id: 'http' },
  { id: 'blob' },
  { id: 'qcow2 over http', needsQemu: true },
  { id: 'qcow2 compressed over http', needsQemu: true },
  { id: 'qcow2 over opfs', needsQemu: true },
];

/** QEMU-made qcow2 images the spec serves, each with its `qemu-img convert -O raw` reference next to it. */
export const QCOW2_IMAGES = {
  plain: { path: '/conf/mixed.qcow2', raw: '/conf/mixed.raw' },
  compressed: { path: '/conf/compressed.qcow2', raw: '/conf/compressed.raw' },
} as const;

/** The patterned image the read-only targets serve. */
export const PATTERN_IMAGE = { path: '/conf/pattern.img', size: 300_001, seed: 3 } as const;
/** The all-zero image for the zero-init case. */
export const ZERO_IMAGE = { path: '/conf/zero.img', size: MiB } as const;

/** Deterministic bytes (xorshift32), the same in Node and in the worker. */
export function testPattern(n: number, seed: number): Uint8Array<ArrayBuffer> {
  const out = new Uint8Array(n);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < n; i++) {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    out[i] = x & 0xff;
  }
  return out;
}
