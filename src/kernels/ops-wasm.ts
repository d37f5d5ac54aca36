// The kernel families over the wasm module. Data already in linear memory
// (metadata cache entries from the buffer pool, bitmaps, scratch) is used in
// place; other buffers are copied into a scratch block first, and back when
// the kernel changes them. Single-entry refcount get/set/add stay in JS: a
// call into wasm costs more than the access itself (the wasm versions exist
// and are tested, for callers that batch inside wasm).

import { BlockError } from '../core/errors.ts';
import { SC, type L2Geometry, type L2Scan, type SubclusterType } from '../formats/qcow2/cluster.ts';
import { checkOrder, refcountRef } from './reference-qcow2.ts';
import { firstDifferenceRef, firstNonZeroRef, isZeroRef } from './reference.ts';
import { newL2Run, type BitmapOps, type BitmapStore, type ByteOrderOps, type L2Ops, type L2Run, type RefcountOps, type ZeroOps } from './types.ts';
import type { WasmHost } from './wasm.ts';

/**
 * Bytes copied into wasm memory per kernel call. Bounds the scratch block
 * (and so linear memory growth) regardless of the caller's buffer size.
 */
export const COPY_CHUNK = 1024 * 1024;

/**
 * JS-heap buffers shorter than this are scanned in JS: copying a 512-byte
 * sector into linear memory and calling the kernel measured half the speed of
 * the JS loop, the two even out near 2 KiB, and the kernel wins above.
 */
const SMALL_COPY = 2048;

/** Largest range passed to one kernel call for data already in wasm memory (keeps results within i32). */
const IN_PLACE_CHUNK = 1 << 30;

/** Bytes of a record written by l2Scan/l2Runs (assembly/l2.ts). */
const L2_RECORD_BYTES = 32;

/** Geometry flags as assembly/l2.ts reads them. */
function packGeometry(g: L2Geometry): number {
  return g.clusterBits | (g.subclusterBits << 8) | (g.extended ? 1 << 16 : 0) | (g.hasDataFile ? 1 << 17 : 0);
}

/** Zero detection over wasm. */
export function wasmZeroOps(host: WasmHost): ZeroOps {
  const ex = host.exports;
  // The buffer of the last view found in linear memory. Callers scan views of
  // one buffer over and over (the cache pool's, a bitmap's), so one identity
  // test usually answers contains() without the call. When memory is not
  // shared a buffer once in it stays "in it" after growth detaches it, which
  // is harmless: a detached view has length 0 and byteOffset 0, and the
  // kernels read nothing for a length of 0.
  let lastIn: ArrayBufferLike | null = null;
  /** True when `buf` is a view into linear memory (host.contains, with the identity fast path). */
  const inMemory = (buf: ArrayBufferView): boolean => {
    const b = buf.buffer;
    if (b === lastIn) return true;
    if (!host.contains(buf)) return false;
    lastIn = b;
    return true;
  };

  /**
   * Presents `buf` to `visit` as (pointer, length, offset in buf) pieces in
   * wasm memory, in order, until `visit` returns true; returns whether it did.
   * Data already in wasm memory is used in place; other data is copied
   * through the scratch block one COPY_CHUNK at a time.
   */
  const eachPiece = (buf: Uint8Array, visit: (ptr: number, len: number, off: number) => boolean): boolean => {
    const inPlace = inMemory(buf);
    const step = inPlace ? IN_PLACE_CHUNK : COPY_CHUNK;
    let off = 0;
    do {
      const part = buf.subarray(off, off + step);
      const ptr = inPlace ? part.byteOffset : host.copyIn('zero', part);
      if (visit(ptr, part.length, off)) return true;
      off += step;
    } while (off < buf.length);
    return false;
  };

  /** Cheap JS look at the first bytes of buf[from, end): data that is not zero usually says so at once, which saves copying a whole chunk. */
  const headHasData = (buf: Uint8Array, from = 0, end = buf.length): boolean => {
    const n = Math.min(end, from + 16);
    for (let i = from; i < n; i++) if (buf[i] !== 0) return true;
    return false;
  };

  const isZero = (buf: Uint8Array): boolean => {
    // In place and small enough for one call: no closures, no subarray.
    if (buf.length <= IN_PLACE_CHUNK && inMemory(buf)) return ex.isZero(buf.byteOffset, buf.length) !== 0;
    if (buf.length < SMALL_COPY) return isZeroRef(buf);
    if (headHasData(buf)) return false;
    return !eachPiece(buf, (ptr, len) => ex.isZero(ptr, len) === 0);
  };

  return {
    isZero,
    firstNonZero(buf) {
      if (buf.length <= IN_PLACE_CHUNK && inMemory(buf)) return ex.firstNonZero(buf.byteOffset, buf.length);
      if (buf.length < SMALL_COPY) return firstNonZeroRef(buf);
      let found = -1;
      eachPiece(buf, (ptr, len, off) => {
        const r = ex.firstNonZero(ptr, len);
        if (r < 0) return false;
        found = off + r;
        return true;
      });
      return found;
    },
    firstDifference(a, b) {
      const n = Math.min(a.length, b.length);
      if (n < SMALL_COPY) return firstDifferenceRef(a, b);
      for (let off = 0; off < n; off += COPY_CHUNK) {
        const len = Math.min(COPY_CHUNK, n - off);
        const pa = inMemory(a) ? a.byteOffset + off : host.copyIn('cmp-a', a.subarray(off, off + len));
        const pb = inMemory(b) ? b.byteOffset + off : host.copyIn('cmp-b', b.subarray(off, off + len));
        const r = ex.firstDifference(pa, pb, len);
        if (r >= 0) return off + r;
      }
      return -1;
    },
    firstEqualBlock(a, b, unit) {
      if (!(unit > 0)) return -1;
      const n = Math.min(a.length, b.length);
      // Whole units per piece so block boundaries stay at multiples of unit.
      const step = unit >= COPY_CHUNK ? unit : Math.floor(COPY_CHUNK / unit) * unit;
      for (let off = 0; off < n; off += step) {
        const len = Math.min(step, n - off);
        const pa = inMemory(a) ? a.byteOffset + off : host.copyIn('cmp-a', a.subarray(off, off + len));
        const pb = inMemory(b) ? b.byteOffset + off : host.copyIn('cmp-b', b.subarray(off, off + len));
        const r = ex.firstEqualBlock(pa, pb, len, unit);
        if (r >= 0) return off + r;
      }
      return -1;
    },
    firstZeroBlock(buf, unit) {
      if (!(unit > 0)) return -1;
      if (inMemory(buf)) return ex.firstZeroBlock(buf.byteOffset, buf.length, unit);
      // A block whose first bytes hold data is not zero, and real data nearly always says so at
      // once: blocks are ruled out here in JS, and only those starting with zeroes are checked
      // whole, so a chunk of data without zero blocks (convert's common case) is never copied in.
      for (let off = 0; off < buf.length; off += unit) {
        const end = Math.min(off + unit, buf.length);
        if (!headHasData(buf, off, end) && isZero(buf.subarray(off, end))) return off;
      }
      return -1;
    },
  };
}

/** L2 decoding over wasm. */
export function wasmL2Ops(host: WasmHost): L2Ops {
  const ex = host.exports;

  /** Pointer of the `nb` entries from `l2Index` of `slice`, copying them into scratch unless the slice is in wasm memory. */
  const entriesPtr = (slice: Uint8Array, l2Index: number, nb: number, entrySize: number): number => {
    if (host.contains(slice)) return slice.byteOffset + l2Index * entrySize;
    return host.copyIn('l2', slice.subarray(l2Index * entrySize, (l2Index + nb) * entrySize));
  };

  /** Entries from `l2Index` to the end of the slice, the most a call may read. */
  const clamp = (slice: Uint8Array, l2Index: number, nb: number, entrySize: number): number => {
    const room = Math.floor(slice.length / entrySize) - l2Index;
    return nb > room ? room : nb;
  };

  return {
    scan(slice: Uint8Array, l2Index: number, scIndex: number, nbClusters: number, g: L2Geometry, out: L2Scan): void {
      const entrySize = g.extended ? 16 : 8;
      const nb = clamp(slice, l2Index, nbClusters, entrySize);
      if (nb <= 0) {
        out.count = 0;
        return;
      }
      ex.l2Scan(entriesPtr(slice, l2Index, nb, entrySize), l2Index, scIndex, nb, packGeometry(g), host.results);
      const r = host.resI32();
      const type = r[0]! as SubclusterType;
      out.type = type;
      out.count = r[1]!;
      out.invalidIndex = r[2]!;
      out.entryHi = r[3]! >>> 0;
      out.entryLo = r[4]! >>> 0;
      // Like the reference, an invalid first entry leaves hostCluster as it was.
      if (type !== SC.INVALID || out.invalidIndex !== l2Index) out.hostCluster = host.resF64()[3]!;
    },
    runs(slice: Uint8Array, l2Index: number, scIndex: number, nbClusters: number, g: L2Geometry, out: L2Run[], maxRuns: number): number {
      const entrySize = g.extended ? 16 : 8;
      const nb = clamp(slice, l2Index, nbClusters, entrySize);
      if (nb <= 0 || maxRuns <= 0) return 0;
      const outPtr = host.scratch('l2runs', maxRuns * L2_RECORD_BYTES);
      // Allocate before taking the entries pointer: scratch may grow memory.
      const ptr = entriesPtr(slice, l2Index, nb, entrySize);
      const n = ex.l2Runs(ptr, l2Index, scIndex, nb, packGeometry(g), outPtr, maxRuns);
      const mem = host.bytes();
      const i32 = new Int32Array(mem.buffer, outPtr, n * (L2_RECORD_BYTES / 4));
      const f64 = new Float64Array(mem.buffer, outPtr, n * (L2_RECORD_BYTES / 8));
      for (let k = 0; k < n; k++) {
        const rec = (out[k] ??= newL2Run());
        const b = k * (L2_RECORD_BYTES / 4);
        rec.type = i32[b]! as SubclusterType;
        rec.count = i32[b + 1]!;
        rec.invalidIndex = i32[b + 2]!;
        rec.entryHi = i32[b + 3]! >>> 0;
        rec.entryLo = i32[b + 4]! >>> 0;
        rec.hostCluster = rec.type === SC.INVALID ? 0 : f64[k * (L2_RECORD_BYTES / 8) + 3]!;
      }
      return n;
    },
  };
}

/** Byte range [from, to) of whole 64-bit words covering entries [start, end) of width 2^order, as the kernels read them. */
function wordSpan(start: number, end: number, order: number): [number, number] {
  const firstBit = start * 2 ** order;
  const endBit = end * 2 ** order;
  return [Math.floor(firstBit / 64) * 8, Math.ceil(endBit / 64) * 8];
}

/** Refcount access over wasm. */
export function wasmRefcountOps(host: WasmHost): RefcountOps {
  const ex = host.exports;

  /**
   * Runs `fn` with a pointer and index shift such that entry i of `block` is
   * entry (i - shift) at the pointer: the block itself when it is in wasm
   * memory, else a scratch copy of the words covering [start, end) (copied
   * back afterwards when `write`).
   */
  const withBlock = <T>(slot: string, block: Uint8Array, start: number, end: number, order: number, write: boolean, fn: (ptr: number, shift: number) => T): T => {
    if (host.contains(block)) return fn(block.byteOffset, 0);
    const [a, b] = wordSpan(start, end, order);
    const part = block.subarray(a, Math.min(b, block.length));
    const ptr = host.scratch(slot, b - a);
    const mem = host.bytes();
    mem.set(part, ptr);
    const shift = (a * 8) / 2 ** order;
    const r = fn(ptr, shift);
    if (write) block.set(host.bytes().subarray(ptr, ptr + part.length), a);
    return r;
  };

  return {
    // One entry is cheaper to reach from JS than through a call into wasm
    // (measured: the bench's "refcount get" line), wherever the block lives.
    get: refcountRef.get,
    set: refcountRef.set,
    add: refcountRef.add,
    findZero(block, from, to, order) {
      checkOrder(order);
      if (from >= to) return -1;
      return withBlock('rc-a', block, from, to, order, false, (ptr, shift) => {
        const r = ex.rcFindZero(ptr, from - shift, to - shift, order);
        return r < 0 ? -1 : r + shift;
      });
    },
    findNonZero(block, from, to, order) {
      checkOrder(order);
      if (from >= to) return to;
      return withBlock('rc-a', block, from, to, order, false, (ptr, shift) => ex.rcFindNonZero(ptr, from - shift, to - shift, order) + shift);
    },
    findFreeRun(block, from, to, order, want, out) {
      checkOrder(order);
      if (!(want >= 1)) throw new BlockError('EINVAL', `Free run length must be at least 1, not ${want}`);
      if (from >= to) {
        out.index = -1;
        out.length = 0;
        return -1;
      }
      const w = Math.min(want, 0xffffffff);
      return withBlock('rc-a', block, from, to, order, false, (ptr, shift) => {
        const r = ex.rcFindFreeRun(ptr, from - shift, to - shift, order, w, host.results);
        out.index = r < 0 ? -1 : r + shift;
        out.length = host.resI32()[0]!;
        return out.index;
      });
    },
    incRange(arr, start, count, order, max) {
      checkOrder(order);
      if (count <= 0) return -1;
      return withBlock('rc-a', arr, start, start + count, order, true, (ptr, shift) => {
        const r = ex.rcIncRange(ptr, start - shift, count, order, max);
        return r < 0 ? -1 : r + shift;
      });
    },
    compare(a, b, start, count, order, out) {
      checkOrder(order);
      if (count <= 0 || out.length === 0) return 0;
      const max = out.length;
      const outPtr = host.scratch('rc-out', max * 4);
      return withBlock('rc-a', a, start, start + count, order, false, (pa, shiftA) =>
        withBlock('rc-b', b, start, start + count, order, false, (pb, shiftB) => {
          // Both copies start at the same word, so one shift serves both; in place the shifts are 0.
          let ptrA = pa;
          let ptrB = pb;
          let shift = shiftA;
          if (shiftA !== shiftB) {
            // One is in place (shift 0), the other copied: address the in-place one from the copy's first word.
            const bytes = (Math.max(shiftA, shiftB) * 2 ** order) / 8;
            if (shiftA === 0) ptrA += bytes;
            else ptrB += bytes;
            shift = Math.max(shiftA, shiftB);
          }
          const n = ex.rcCompare(ptrA, ptrB, start - shift, count, order, outPtr, max);
          const idx = new Uint32Array(host.bytes().buffer, outPtr, n);
          for (let i = 0; i < n; i++) out[i] = idx[i]! + shift;
          return n;
        }),
      );
    },
    countNonZero(block, start, count, order) {
      checkOrder(order);
      if (count <= 0) return 0;
      return withBlock('rc-a', block, start, start + count, order, false, (ptr, shift) => ex.rcCountNonZero(ptr, start - shift, count, order));
    },
  };
}

/** A bitmap in wasm memory: level 0 (bits) and level 1 (one bit per non-zero level-0 word). */
interface WasmBitmapStore extends BitmapStore {
  readonly l0: number;
  readonly l1: number;
  readonly words: number;
  /** Set by dispose, so a second dispose or a late finalizer does not free twice. */
  freed: boolean;
}

/** Bytes for `words` 64-bit words, rounded up to whole 16-byte vectors (the kernels load two words at a time). */
function vectorBytes(words: number): number {
  return Math.max(16, Math.ceil(words / 2) * 16);
}

/** Dirty bitmap operations over wasm; bitmaps live in linear memory and are freed by dispose or, failing that, by the garbage collector. */
export function wasmBitmapOps(host: WasmHost): BitmapOps {
  const ex = host.exports;
  const registry = new FinalizationRegistry<[number, number]>(([l0, l1]) => {
    host.free(l0);
    host.free(l1);
  });

  const st = (s: BitmapStore): WasmBitmapStore => {
    const w = s as WasmBitmapStore;
    if (typeof w.l0 !== 'number' || w.freed) throw new BlockError('EINVAL', 'Bitmap was not created by the wasm kernel or was disposed');
    return w;
  };

  const checkChunk = (s: BitmapStore, startBit: number, nbits: number): void => {
    if (startBit % 64 !== 0 || startBit < 0 || nbits < 0 || startBit + nbits > s.nbits) {
      throw new BlockError('EINVAL', `Bitmap serialisation range ${startBit}+${nbits} is not 64-bit aligned inside ${s.nbits} bits`);
    }
  };

  return {
    create(nbits) {
      if (!(nbits >= 1 && Number.isSafeInteger(nbits))) throw new BlockError('EINVAL', `Bitmap size ${nbits} must be a positive integer`);
      const words = Math.ceil(nbits / 64);
      const b0 = vectorBytes(words);
      const b1 = vectorBytes(Math.ceil(words / 64));
      const l0 = host.alloc(b0);
      const l1 = host.alloc(b1);
      // Blocks may come back from a free list with old contents.
      const mem = host.bytes();
      mem.fill(0, l0, l0 + b0);
      mem.fill(0, l1, l1 + b1);
      const s: WasmBitmapStore = { nbits, l0, l1, words, freed: false };
      registry.register(s, [l0, l1], s);
      return s;
    },
    dispose(s) {
      const w = st(s);
      w.freed = true;
      registry.unregister(w);
      host.free(w.l0);
      host.free(w.l1);
    },
    set(s, start, count) {
      const w = st(s);
      return ex.hbSet(w.l0, w.l1, start, count);
    },
    reset(s, start, count) {
      const w = st(s);
      return ex.hbReset(w.l0, w.l1, start, count);
    },
    get(s, bit) {
      return ex.hbGet(st(s).l0, bit) === 1;
    },
    count(s, start, count) {
      return ex.hbCount(st(s).l0, start, count);
    },
    nextDirty(s, start, end) {
      const w = st(s);
      return ex.hbNextDirty(w.l0, w.l1, start, end);
    },
    nextZero(s, start, end) {
      return ex.hbNextZero(st(s).l0, start, end);
    },
    dirtyRuns(s, start, end, out) {
      const w = st(s);
      const max = Math.floor(out.length / 2);
      if (max === 0) return 0;
      const outPtr = host.scratch('hb-runs', max * 16);
      const n = ex.hbDirtyRuns(w.l0, w.l1, start, end, outPtr, max);
      out.set(new Float64Array(host.bytes().buffer, outPtr, 2 * n));
      return n;
    },
    merge(dst, src) {
      const d = st(dst);
      const s = st(src);
      if (d.nbits !== s.nbits) throw new BlockError('EINVAL', 'Bitmaps of different sizes cannot be merged');
      return ex.hbMerge(d.l0, d.l1, s.l0, s.l1, d.words);
    },
    serialize(s, startBit, nbits, out) {
      const w = st(s);
      checkChunk(s, startBit, nbits);
      const bytes = Math.ceil(nbits / 64) * 8;
      if (out.length < bytes) throw new BlockError('EINVAL', `Serialising ${nbits} bits needs ${bytes} bytes`);
      if (host.contains(out)) return ex.hbSerialize(w.l0, startBit, nbits, out.byteOffset);
      const ptr = host.scratch('hb-io', bytes);
      ex.hbSerialize(w.l0, startBit, nbits, ptr);
      out.set(host.bytes().subarray(ptr, ptr + bytes));
      return bytes;
    },
    deserialize(s, startBit, nbits, src) {
      const w = st(s);
      checkChunk(s, startBit, nbits);
      const bytes = Math.ceil(nbits / 64) * 8;
      if (src.length < bytes) throw new BlockError('EINVAL', `Deserialising ${nbits} bits needs ${bytes} bytes`);
      const ptr = host.contains(src) ? src.byteOffset : host.copyIn('hb-io', src.subarray(0, bytes));
      return ex.hbDeserialize(w.l0, w.l1, startBit, nbits, ptr);
    },
    tableScan(s, chunkBits, out) {
      const w = st(s);
      if (!(chunkBits > 0 && chunkBits % 64 === 0)) throw new BlockError('EINVAL', `Bitmap chunk of ${chunkBits} bits is not a multiple of 64`);
      const chunks = Math.ceil(s.nbits / chunkBits);
      const ptr = host.scratch('hb-io', chunks);
      const n = ex.hbTableScan(w.l0, w.l1, s.nbits, chunkBits, ptr);
      out.set(host.bytes().subarray(ptr, ptr + chunks));
      return n;
    },
  };
}

/** Byte-order helpers over wasm (copying buffers that are not in linear memory). */
export function wasmByteOrderOps(host: WasmHost): ByteOrderOps {
  const ex = host.exports;
  const swap = (buf: Uint8Array, width: number, fn: (ptr: number, count: number) => void): void => {
    const count = Math.floor(buf.length / width);
    if (count === 0) return;
    if (host.contains(buf)) {
      fn(buf.byteOffset, count);
      return;
    }
    for (let off = 0; off < count * width; off += COPY_CHUNK) {
      const part = buf.subarray(off, Math.min(off + COPY_CHUNK, count * width));
      const ptr = host.copyIn('bo', part);
      fn(ptr, part.length / width);
      part.set(host.bytes().subarray(ptr, ptr + part.length));
    }
  };
  return {
    swap16: (buf) => swap(buf, 2, ex.swap16),
    swap32: (buf) => swap(buf, 4, ex.swap32),
    swap64: (buf) => swap(buf, 8, ex.swap64),
    decodeBe64(src, dst, maskHi, maskLo) {
      const count = dst.length;
      if (count === 0) return 0;
      const out = host.contains(dst) ? dst.byteOffset : host.scratch('bo-f64', count * 8);
      const inp = host.contains(src) ? src.byteOffset : host.copyIn('bo', src.subarray(0, count * 8));
      const bad = ex.decodeBe64(inp, out, count, maskHi >>> 0, maskLo >>> 0);
      if (!host.contains(dst)) dst.set(new Float64Array(host.bytes().buffer, out, count));
      return bad;
    },
    findInRange(table, maskHi, maskLo, lo, hi) {
      const count = Math.floor(table.length / 8);
      if (count === 0 || !(hi > lo)) return -1;
      // The kernel compares signed: a value with bit 63 set is negative, below any lo >= 0, so never found, as in the reference.
      if (lo < 0) lo = 0;
      const mh = maskHi >>> 0;
      if (host.contains(table)) return ex.findBe64InRange(table.byteOffset, count, mh, maskLo >>> 0, lo, hi);
      for (let i = 0; i < count; i += COPY_CHUNK / 8) {
        const n = Math.min(COPY_CHUNK / 8, count - i);
        const r = ex.findBe64InRange(host.copyIn('bo', table.subarray(8 * i, 8 * (i + n))), n, mh, maskLo >>> 0, lo, hi);
        if (r >= 0) return i + r;
      }
      return -1;
    },
    encodeBe64(src, dst) {
      const count = src.length;
      if (count === 0) return;
      const inp = host.contains(src) ? src.byteOffset : host.scratch('bo-f64', count * 8);
      if (!host.contains(src)) new Float64Array(host.bytes().buffer, inp, count).set(src);
      const out = host.contains(dst) ? dst.byteOffset : host.scratch('bo', count * 8);
      ex.encodeBe64(inp, out, count);
      if (!host.contains(dst)) dst.set(host.bytes().subarray(out, out + count * 8));
    },
  };
}
