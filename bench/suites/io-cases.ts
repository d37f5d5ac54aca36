// The I/O cases of "qcow2 vs the raw storage underneath", shared by the Node
// runner (memory, Node files) and the browser worker (OPFS): the same guest
// bytes through qcow2 over a protocol and straight through that protocol.

import type { BlockBackend } from '../../src/core/block-backend.ts';
import type { BlockdevOptions } from '../../src/core/types.ts';
import { cpuNow, interleave, mbps, now, speedRow, type Row } from '../lib/harness.ts';

/** A place images can be put for a case: returns the protocol options to open the copy stored under `key`. */
export interface Storage {
  name: string;
  /** Stores a copy of the image `source` (a path in Node, a URL in the browser) under `key`. */
  load(key: string, source: string): Promise<BlockdevOptions>;
  /** Removes what load stored. */
  cleanup(): Promise<void>;
}

/** The images the cases need, as sources for Storage.load. */
export interface IoSources {
  /** Random data, raw, and the same converted to qcow2 (64 KiB clusters). */
  raw: string;
  qcow2: string;
  /** Text-like data, raw, and the same converted to compressed qcow2. */
  text: string;
  comp: string;
  /** Empty images of the same virtual size, for allocating writes. */
  emptyRaw: string;
  emptyQcow2: string;
}

/** How to run the cases. */
export interface IoCaseOptions {
  rounds: number;
  /** Opens a backend on blockdev options (a fresh graph each time). */
  open(options: BlockdevOptions, readOnly: boolean): Promise<BlockBackend>;
  /** Milliseconds per timed round; default 400. */
  minMs?: number;
}

/** Deterministic 4 KiB-aligned offsets below `limit`. */
function offsets(n: number, limit: number, seed: number): number[] {
  let x = seed | 0 || 1;
  const out: number[] = [];
  const slots = Math.floor(limit / 4096);
  for (let i = 0; i < n; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    out.push(((x >>> 0) % slots) * 4096);
  }
  return out;
}

/**
 * Rate of `op(i)` calls (awaited one at a time) over at least `minMs` of the
 * CPU clock (process CPU time in Node, every thread counted, so a thread-pool
 * read costs what it costs; wall time in browsers): on a shared machine wall
 * time mostly measures how often the scheduler let us run.
 */
async function qd1Rate(op: (i: number) => Promise<void>, minMs: number): Promise<number> {
  let i = 0;
  const start = cpuNow();
  let elapsed = 0;
  do {
    // Several requests between clock reads keep the clock out of the measurement.
    for (let k = 0; k < 16; k++) await op(i++);
    elapsed = cpuNow() - start;
  } while (elapsed < minMs);
  return (i * 1000) / elapsed;
}

/** Every qcow2-vs-raw row for one storage. */
export async function ioCases(st: Storage, src: IoSources, dataBytes: number, o: IoCaseOptions): Promise<Row[]> {
  const G = `qcow2 vs raw (${st.name})`;
  const minMs = o.minMs ?? 400;
  const rows: Row[] = [];
  const rawOpts = await st.load('raw', src.raw);
  const qcowOpts = await st.load('qcow2', src.qcow2);
  const raw = await o.open(rawOpts, true);
  const qcow = await o.open({ driver: 'qcow2', file: qcowOpts }, true);
  try {
    // Same bytes both ways, or the comparison is void.
    const a = await raw.read(dataBytes - 65536, 65536);
    const b = await qcow.read(dataBytes - 65536, 65536);
    if (a.some((x, i) => x !== b[i])) throw new Error(`${st.name}: qcow2 and raw images differ`);

    const offs = offsets(1 << 16, dataBytes, 42);
    const buf4k = new Uint8Array(4096);
    const read4k = (blk: BlockBackend) => (i: number) => blk.pread(offs[i & 0xffff]!, buf4k);
    // Warm the metadata cache and the storage's own cache first.
    for (let i = 0; i < 2000; i++) {
      await read4k(raw)(i);
      await read4k(qcow)(i);
    }
    const [q4, r4] = await interleave(o.rounds, () => qd1Rate(read4k(qcow), minMs), () => qd1Rate(read4k(raw), minMs));
    rows.push(speedRow(G, 'cached 4 KiB random reads, QD1', { label: 'qcow2', value: q4, unit: 'ops/s' }, { label: 'raw', value: r4, unit: 'ops/s' }, 0.85));

    const buf1m = new Uint8Array(1 << 20);
    const chunks = Math.floor(dataBytes / (1 << 20));
    const read1m = (blk: BlockBackend) => (i: number) => blk.pread((i % chunks) * (1 << 20), buf1m);
    const [q1, r1] = await interleave(o.rounds, () => qd1Rate(read1m(qcow), minMs), () => qd1Rate(read1m(raw), minMs));
    rows.push(speedRow(G, '1 MiB sequential reads', { label: 'qcow2', value: mbps(q1, 1 << 20), unit: 'MB/s' }, { label: 'raw', value: mbps(r1, 1 << 20), unit: 'MB/s' }, 0.95));
  } finally {
    await raw.close();
    await qcow.close();
  }

  // Allocating sequential writes: fresh images each round, flushed at the end.
  const data = new Uint8Array(1 << 20);
  for (let i = 0; i < data.length; i += 4) data[i] = (i * 2654435761) >>> 24 || 1;
  const writeAll = async (fresh: BlockdevOptions, format: 'raw' | 'qcow2'): Promise<number> => {
    const blk = await o.open(format === 'qcow2' ? { driver: 'qcow2', file: fresh } : fresh, false);
    try {
      const t = now();
      for (let off = 0; off < dataBytes; off += data.length) await blk.pwrite(off, data);
      await blk.flush();
      return mbps((dataBytes / data.length) * (1000 / (now() - t)), data.length);
    } finally {
      await blk.close();
    }
  };
  const [qa, ra] = await interleave(
    o.rounds,
    async () => writeAll(await st.load('fresh-qcow2', src.emptyQcow2), 'qcow2'),
    async () => writeAll(await st.load('fresh-raw', src.emptyRaw), 'raw'),
  );
  rows.push(speedRow(G, 'allocating 1 MiB sequential writes + flush', { label: 'qcow2', value: qa, unit: 'MB/s' }, { label: 'raw', value: ra, unit: 'MB/s' }));

  // Overwrites of allocated data: 4 KiB random writes, flushed at the end of each round.
  const overRaw = await o.open(await st.load('over-raw', src.raw), false);
  const overQcow = await o.open({ driver: 'qcow2', file: await st.load('over-qcow2', src.qcow2) }, false);
  try {
    const offs = offsets(1 << 16, dataBytes, 7);
    const w4k = data.subarray(0, 4096);
    const overwrite = (blk: BlockBackend) => async (): Promise<number> => {
      const r = await qd1Rate((i) => blk.pwrite(offs[i & 0xffff]!, w4k), minMs);
      await blk.flush();
      return r;
    };
    for (let i = 0; i < 500; i++) {
      await overRaw.pwrite(offs[i]!, w4k);
      await overQcow.pwrite(offs[i]!, w4k);
    }
    const [qo, ro] = await interleave(o.rounds, overwrite(overQcow), overwrite(overRaw));
    rows.push(speedRow(G, '4 KiB random overwrites, QD1', { label: 'qcow2', value: qo, unit: 'ops/s' }, { label: 'raw', value: ro, unit: 'ops/s' }));
  } finally {
    await overRaw.close();
    await overQcow.close();
  }

  // Compressed clusters: 1 MiB sequential reads, each inflating 16 clusters, against the same bytes raw.
  const text = await o.open(await st.load('text', src.text), true);
  const comp = await o.open({ driver: 'qcow2', file: await st.load('comp', src.comp) }, true);
  try {
    const buf = new Uint8Array(1 << 20);
    const chunks = Math.floor(dataBytes / buf.length);
    const seq = (blk: BlockBackend) => (i: number) => blk.pread((i % chunks) * buf.length, buf);
    const [qc, rc] = await interleave(o.rounds, () => qd1Rate(seq(comp), minMs), () => qd1Rate(seq(text), minMs));
    rows.push(speedRow(G, 'compressed 1 MiB sequential reads', { label: 'qcow2 (zlib)', value: mbps(qc, 1 << 20), unit: 'MB/s' }, { label: 'raw', value: mbps(rc, 1 << 20), unit: 'MB/s' }, undefined, 'inflate-bound'));
  } finally {
    await text.close();
    await comp.close();
  }
  return rows;
}
