// Each kernel against its JS reference, on the same data: the wasm kernel
// on data in linear memory (where the engine keeps caches and bitmaps), the
// reference on an ordinary JS copy (so it is not slowed by shared memory).
// Runs unchanged in Node and in the browser worker.

import { SC, type L2Geometry, type L2Scan } from '../../src/formats/qcow2/cluster.ts';
import { jsRefcountKernel } from '../../src/formats/qcow2/refcount.ts';
import type { FreeRun, Kernels, L2Run } from '../../src/kernels/index.ts';
import { interleave, rateSync, speedRow, mbps, type Row } from '../lib/harness.ts';

/** Rounds per comparison and milliseconds per round. */
export interface KernelBenchOptions {
  rounds?: number;
  minMs?: number;
}

/** Places a copy of `src` in the wasm instance's linear memory and returns the view. */
function inWasm(k: Kernels, src: Uint8Array): Uint8Array {
  const host = k.host!;
  const ptr = host.alloc(src.length);
  const view = host.view(ptr, src.length);
  view.set(src);
  return view;
}

/** Fills a buffer with bytes from a xorshift PRNG. */
function randomBytes(n: number, seed: number): Uint8Array {
  const b = new Uint8Array(n);
  let x = seed | 0 || 1;
  for (let i = 0; i < n; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    b[i] = x & 0xff;
  }
  return b;
}

/** An L2 slice of `entries` standard entries mapping contiguous (or, every other entry, scattered) 64 KiB clusters. */
function l2Slice(entries: number, fragmented: boolean, extended = false): Uint8Array {
  const es = extended ? 16 : 8;
  const b = new Uint8Array(entries * es);
  const dv = new DataView(b.buffer);
  for (let i = 0; i < entries; i++) {
    const cluster = fragmented && i % 2 ? 100000 + i : 1000 + i;
    const host = cluster * 65536;
    dv.setUint32(i * es, 0x80000000 | Math.floor(host / 2 ** 32));
    dv.setUint32(i * es + 4, host >>> 0);
    if (extended) dv.setUint32(i * es + 12, 0xffffffff);
  }
  return b;
}

/** Kernel-vs-reference rows for every kernel family. */
export async function kernelRows(wasm: Kernels, ref: Kernels, opts: KernelBenchOptions = {}): Promise<Row[]> {
  const rounds = opts.rounds ?? 5;
  const minMs = opts.minMs ?? 150;
  const rows: Row[] = [];
  const G = 'kernel vs reference';
  const pair = async (name: string, unit: 'ops/s' | 'MB/s', bytesPerOp: number, w: () => unknown, r: () => unknown, target?: number, note?: string): Promise<void> => {
    // Results must agree, or the comparison means nothing.
    const wv = w();
    const rv = r();
    if (JSON.stringify(wv) !== JSON.stringify(rv)) throw new Error(`${name}: wasm ${JSON.stringify(wv)} != reference ${JSON.stringify(rv)}`);
    const [a, b] = await interleave(rounds, () => rateSync(w, 1, minMs), () => rateSync(r, 1, minMs));
    const conv = (x: number): number => (unit === 'MB/s' ? mbps(x, bytesPerOp) : x);
    rows.push(speedRow(G, name, { label: 'wasm', value: conv(a), unit }, { label: 'JS reference', value: conv(b), unit }, target, note));
  };

  // Zero detection, at the sizes the engine checks: a 4 KiB write, a 64 KiB cluster, a 1 MiB convert chunk.
  const MiB = 1 << 20;
  for (const [size, label, target] of [[4096, '4 KiB', undefined], [65536, '64 KiB (one cluster)', 10], [MiB, '1 MiB', undefined]] as const) {
    const js = new Uint8Array(size);
    const w = inWasm(wasm, js);
    await pair(`isZero, ${label} of zeroes in linear memory`, 'MB/s', size, () => wasm.isZero(w), () => ref.isZero(js), target);
  }
  const zeroJs = new Uint8Array(MiB);
  await pair('isZero, 1 MiB JS buffer (copied in)', 'MB/s', MiB, () => wasm.isZero(zeroJs), () => ref.isZero(zeroJs), undefined, 'includes the copy into linear memory');
  const blocks = randomBytes(MiB, 7);
  blocks.fill(0, MiB - 4096);
  const blocksWasm = inWasm(wasm, blocks);
  await pair('firstZeroBlock, 255 data blocks then a zero one', 'MB/s', MiB, () => wasm.firstZeroBlock(blocksWasm, 4096), () => ref.firstZeroBlock(blocks, 4096));

  // compare: two 1 MiB buffers that differ only in their last byte.
  const cmpA = randomBytes(MiB, 11);
  const cmpB = cmpA.slice();
  cmpB[MiB - 1] ^= 1;
  const cmpAW = inWasm(wasm, cmpA);
  const cmpBW = inWasm(wasm, cmpB);
  await pair('firstDifference, 1 MiB buffers differing at the end (compare)', 'MB/s', MiB, () => wasm.firstDifference(cmpAW, cmpBW), () => ref.firstDifference(cmpA, cmpB));
  await pair('firstDifference, same buffers on the JS heap (copied in)', 'MB/s', MiB, () => wasm.firstDifference(cmpA, cmpB), () => ref.firstDifference(cmpA, cmpB));

  // L2 decoding.
  const g: L2Geometry = { clusterBits: 16, subclusterBits: 16, extended: false, hasDataFile: false };
  const gx: L2Geometry = { clusterBits: 16, subclusterBits: 11, extended: true, hasDataFile: false };
  const contig = l2Slice(512, false);
  const contigW = inWasm(wasm, contig);
  const sw: L2Scan = { type: SC.UNALLOCATED_PLAIN, count: 0, invalidIndex: -1, hostCluster: 0, entryHi: 0, entryLo: 0 };
  const sr: L2Scan = { ...sw };
  const scanOut = (s: L2Scan): [number, number, number] => [s.type, s.count, s.hostCluster];
  await pair('L2 scan: 1 MiB read over 64 KiB clusters (16 entries)', 'ops/s', 0, () => (wasm.l2.scan(contigW, 100, 0, 16, g, sw), scanOut(sw)), () => (ref.l2.scan(contig, 100, 0, 16, g, sr), scanOut(sr)));
  const table = l2Slice(8192, false);
  const tableW = inWasm(wasm, table);
  await pair('L2 scan: whole 64 KiB table (8192 entries)', 'ops/s', 0, () => (wasm.l2.scan(tableW, 0, 0, 8192, g, sw), scanOut(sw)), () => (ref.l2.scan(table, 0, 0, 8192, g, sr), scanOut(sr)));
  const frag = l2Slice(512, true);
  const fragW = inWasm(wasm, frag);
  const rw: L2Run[] = [];
  const rr: L2Run[] = [];
  await pair('L2 runs: 1 MiB over 16 fragmented clusters, one call', 'ops/s', 0, () => wasm.l2.runs(fragW, 100, 0, 16, g, rw, 64), () => ref.l2.runs(frag, 100, 0, 16, g, rr, 64));
  const ext = l2Slice(512, false, true);
  const extW = inWasm(wasm, ext);
  await pair('L2 scan: extended entries, 16 clusters', 'ops/s', 0, () => (wasm.l2.scan(extW, 100, 3, 16, gx, sw), scanOut(sw)), () => (ref.l2.scan(ext, 100, 3, 16, gx, sr), scanOut(sr)));
  const l2copied = l2Slice(512, false);
  await pair('L2 scan: 16 entries of a JS-heap slice (copied in)', 'ops/s', 0, () => (wasm.l2.scan(l2copied, 100, 0, 16, g, sw), scanOut(sw)), () => (ref.l2.scan(l2copied, 100, 0, 16, g, sr), scanOut(sr)), undefined, 'the path without the cache pool');

  // Refcounts: a 64 KiB block of 16-bit refcounts, every cluster used but the last few.
  const order = 4;
  const block = new Uint8Array(65536);
  for (let i = 0; i < 32768 - 40; i++) jsRefcountKernel.set(block, i, order, 1 + (i % 3));
  const blockW = inWasm(wasm, block);
  let gi = 0;
  const ex = wasm.host!.exports;
  await pair('refcount get: a wasm call vs JS, one 16-bit entry', 'ops/s', 0, () => ex.rcGet(blockW.byteOffset, (gi = (gi + 7919) & 32767), order), () => ref.refcount.get(block, gi, order), undefined, 'the engine reads/writes single entries in JS (ops-wasm.ts)');
  await pair('refcount findZero over a full 64 KiB block', 'ops/s', 0, () => wasm.refcount.findZero(blockW, 0, 32768, order), () => ref.refcount.findZero(block, 0, 32768, order));
  const fw: FreeRun = { index: 0, length: 0 };
  const fr: FreeRun = { index: 0, length: 0 };
  await pair('refcount findFreeRun of 32 clusters', 'ops/s', 0, () => (wasm.refcount.findFreeRun(blockW, 0, 32768, order, 32, fw), fw.index), () => (ref.refcount.findFreeRun(block, 0, 32768, order, 32, fr), fr.index));
  await pair('refcount countNonZero, 64 KiB block', 'ops/s', 0, () => wasm.refcount.countNonZero(blockW, 0, 32768, order), () => ref.refcount.countNonZero(block, 0, 32768, order));
  const other = block.slice();
  const otherW = inWasm(wasm, other);
  const cmpW = new Uint32Array(16);
  const cmpR = new Uint32Array(16);
  await pair('refcount compare (check), equal 64 KiB blocks', 'ops/s', 0, () => wasm.refcount.compare(blockW, otherW, 0, 32768, order, cmpW), () => ref.refcount.compare(block, other, 0, 32768, order, cmpR));
  // check's rebuild: one increment per referenced cluster range, over a 1M-cluster array.
  const arr = new Uint8Array(2 * MiB);
  const arrW = inWasm(wasm, arr);
  await pair('refcount incRange, 4096 clusters (check rebuild)', 'ops/s', 0, () => {
    wasm.refcount.incRange(arrW, 5000, 4096, order, 65535);
    return wasm.refcount.incRange(arrW, 5000, 4096, order, 1) >= 0;
  }, () => {
    ref.refcount.incRange(arr, 5000, 4096, order, 65535);
    return ref.refcount.incRange(arr, 5000, 4096, order, 1) >= 0;
  });

  // Dirty bitmaps: 2^24 bits (1 TiB at 64 KiB granularity).
  const nbits = 2 ** 24;
  const bw = wasm.bitmap.create(nbits);
  const br = ref.bitmap.create(nbits);
  try {
    for (const b of [[bw, wasm], [br, ref]] as const) {
      b[1].bitmap.set(b[0], 12345, 1000);
      b[1].bitmap.set(b[0], nbits - 10, 3);
    }
    await pair('bitmap nextDirty across 2^24 sparse bits', 'ops/s', 0, () => wasm.bitmap.nextDirty(bw, 20000, nbits), () => ref.bitmap.nextDirty(br, 20000, nbits));
    await pair('bitmap count, 2^24 bits', 'ops/s', 0, () => wasm.bitmap.count(bw, 0, nbits), () => ref.bitmap.count(br, 0, nbits));
    await pair('bitmap set+reset 1M-bit range', 'ops/s', 0, () => [wasm.bitmap.set(bw, 1 << 22, 1 << 20), wasm.bitmap.reset(bw, 1 << 22, 1 << 20)], () => [ref.bitmap.set(br, 1 << 22, 1 << 20), ref.bitmap.reset(br, 1 << 22, 1 << 20)]);
    const chunksW = new Uint8Array(nbits / (65536 * 8));
    const chunksR = new Uint8Array(nbits / (65536 * 8));
    await pair('bitmap qcow2 table scan, 64 KiB clusters', 'ops/s', 0, () => wasm.bitmap.tableScan(bw, 65536 * 8, chunksW), () => ref.bitmap.tableScan(br, 65536 * 8, chunksR));
    const ser = new Uint8Array(65536);
    const serW = inWasm(wasm, ser);
    await pair('bitmap serialize one 64 KiB cluster', 'MB/s', 65536, () => wasm.bitmap.serialize(bw, 0, 65536 * 8, serW), () => ref.bitmap.serialize(br, 0, 65536 * 8, ser));
    const bw2 = wasm.bitmap.create(nbits);
    const br2 = ref.bitmap.create(nbits);
    wasm.bitmap.set(bw2, 777, 5);
    ref.bitmap.set(br2, 777, 5);
    await pair('bitmap merge of a sparse 2^24-bit bitmap', 'ops/s', 0, () => wasm.bitmap.merge(bw, bw2), () => ref.bitmap.merge(br, br2));
    wasm.bitmap.dispose(bw2);
  } finally {
    wasm.bitmap.dispose(bw);
  }

  // Byte order: a 512 KiB L1 table (65536 entries, a 32 TiB disk at 64 KiB clusters).
  const l1 = randomBytes(65536 * 8, 3);
  const l1W = inWasm(wasm, l1);
  const dstW = new Float64Array(65536);
  const dstR = new Float64Array(65536);
  await pair('decodeBe64: L1 table of 65536 entries', 'MB/s', l1.length, () => wasm.byteorder.decodeBe64(l1W, dstW, 0x00ffffff, 0xfffffe00), () => ref.byteorder.decodeBe64(l1, dstR, 0x00ffffff, 0xfffffe00));
  // The metadata overlap check's search: does any refcount block (8192-entry table) lie in the cluster a write touches?
  const reft = new Uint8Array(8192 * 8);
  const rdv = new DataView(reft.buffer);
  for (let i = 0; i < 8192; i++) if (i < 100) rdv.setUint32(8 * i + 4, (1000 + i) * 65536);
  const reftW = inWasm(wasm, reft);
  await pair('findInRange: overlap check over an 8192-entry refcount table', 'ops/s', 0, () => wasm.byteorder.findInRange(reftW, 0x00ffffff, 0xfffffe00, 5000 * 65536, 5001 * 65536), () => ref.byteorder.findInRange(reft, 0x00ffffff, 0xfffffe00, 5000 * 65536, 5001 * 65536));
  await pair('findInRange, same table on the JS heap (copied in)', 'ops/s', 0, () => wasm.byteorder.findInRange(reft, 0x00ffffff, 0xfffffe00, 5000 * 65536, 5001 * 65536), () => ref.byteorder.findInRange(reft, 0x00ffffff, 0xfffffe00, 5000 * 65536, 5001 * 65536));
  const sw64 = randomBytes(MiB, 5);
  const sw64W = inWasm(wasm, sw64);
  await pair('swap64 in place, 1 MiB', 'MB/s', MiB, () => (wasm.byteorder.swap64(sw64W), 0), () => (ref.byteorder.swap64(sw64), 0));
  return rows;
}
