/**
 * Simulated power cuts: random workloads run on images stored on the
 * `powercut` protocol (a disk with a volatile cache). At random moments of
 * each workload (random protocol writes and flushes) we take the image a
 * power cut would leave, either losing every unflushed write or keeping a
 * random subset of their sectors (a reordering cache), write it to a file,
 * and require that `qemu-img check` finds no corruption (leaks are allowed)
 * and that everything the guest had flushed reads back intact.
 */
import { readFileSync, writeFileSync } from 'node:fs';
import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { bdrvFlush, bdrvTruncate } from '../../core/io.ts';
import { OPEN, PERM } from '../../core/types.ts';
import { newPowercutStore, deletePowercutStore, powercutDriver, type CrashModel } from '../../core/testing/powercut.ts';
import { forEachImageInShell, newGraph, openQcow2, qemuImg, QEMU_IMG, QEMU_IO, requireQemu, run, scratchDir } from './testing.ts';
import { applyToModel, opsArb, runOp, type Op } from './workload.ts';
import { prng } from './fuzz.ts';

const tmp = scratchDir();
beforeAll(() => requireQemu());
afterAll(() => tmp.cleanup());

/** A crash image waiting to be checked. */
interface Cut {
  file: string;
  model: CrashModel;
  /** Guest contents at the last completed flush before the cut. */
  flushed: Uint8Array;
  /** Ranges written (or being written) since that flush, as [offset, length]: they may read either way. */
  touched: Array<[number, number]>;
  workload: string;
}

interface Variant {
  name: string;
  create: string[];
  size: number;
  clusterSize: number;
  workloads: number;
  backing?: boolean;
  compress?: boolean;
  /** Grow the image a third of the way through the workload and shrink it back at two thirds. */
  resize?: boolean;
}

const M = 1024 * 1024;
const VARIANTS: Variant[] = [
  { name: 'defaults, 64k clusters', create: [], size: 2 * M, clusterSize: 65536, workloads: 4 },
  { name: '512-byte clusters, 64-bit refcounts (refcount blocks and table grow), resized', create: ['-o', 'cluster_size=512,refcount_bits=64'], size: 2 * M, clusterSize: 512, workloads: 4, resize: true },
  { name: 'extended L2 with a backing file', create: ['-o', 'extended_l2=on,cluster_size=16k'], size: 2 * M, clusterSize: 16384, workloads: 3, backing: true },
  { name: 'lazy refcounts', create: ['-o', 'lazy_refcounts=on,cluster_size=4k'], size: 2 * M, clusterSize: 4096, workloads: 3 },
  { name: 'compat=0.10, 4k clusters, resized', create: ['-o', 'compat=0.10,cluster_size=4k'], size: 2 * M, clusterSize: 4096, workloads: 3, resize: true },
];

let counter = 0;
const cuts: Cut[] = [];

/** Runs `ops` on a fresh image of `v` over a powercut store, collecting crash images at random events. */
async function collect(v: Variant, ops: Op[], seed: number): Promise<void> {
  const id = counter++;
  const base = `pc${id}.base`;
  const img = `pc${id}.qcow2`;
  let initial = new Uint8Array(v.size);
  if (v.backing) {
    qemuImg(tmp.dir, 'create', '-f', 'qcow2', base, String(v.size));
    run(QEMU_IO, ['-f', 'qcow2', '-c', `write -P 0x55 0 ${v.size / 2}`, '-c', `write -P 0x66 ${v.size * 0.75} 100k`, base], tmp.dir);
    qemuImg(tmp.dir, 'create', '-f', 'qcow2', ...v.create, '-b', base, '-F', 'qcow2', img, String(v.size));
    qemuImg(tmp.dir, 'convert', '-O', 'raw', img, `${img}.raw`);
    initial = new Uint8Array(readFileSync(tmp.path(`${img}.raw`)));
  } else {
    qemuImg(tmp.dir, 'create', '-f', 'qcow2', ...v.create, img, String(v.size));
  }
  const name = `pc${id}`;
  const store = newPowercutStore(name, readFileSync(tmp.path(img)));
  const random = prng(seed);
  let model = initial.slice();
  let flushed = initial.slice();
  let touched: Array<[number, number]> = [];
  const workload = `${v.name} seed=${seed}`;
  let k = 0;
  store.onEvent = (st) => {
    if (random() > 0.3) return;
    const m: CrashModel = k++ % 2 === 0 ? 'torn' : 'drop';
    const file = `${name}.cut${k}.qcow2`;
    writeFileSync(tmp.path(file), st.crashImage(m, random));
    // `flushed` is replaced, never changed, at each flush, so cuts can share it.
    cuts.push({ file, model: m, flushed, touched: touched.slice(), workload });
  };
  const graph = newGraph();
  graph.registerDriver(powercutDriver);
  const opts: Record<string, unknown> = { driver: 'qcow2', discard: 'unmap', file: { driver: 'powercut', name } };
  if (v.backing) opts.backing = { driver: 'qcow2', file: { driver: 'file', filename: tmp.path(base) } };
  const bs = await graph.open(opts, OPEN.RDWR);
  const child = graph.attachRoot(bs, { kind: 'job', name: 'pc', description: () => 'power cut test' }, 'root', PERM.CONSISTENT_READ | PERM.WRITE | PERM.RESIZE, PERM.ALL);
  bs.refcnt--;
  try {
    for (let i = 0; i < ops.length; i++) {
      const op = ops[i]!;
      if (v.resize && i === Math.floor(ops.length / 3)) {
        // Grow (a new L1 table is switched in), later shrink back (L2 tables dropped, the file tail cut).
        touched.push([v.size, v.size]);
        await bdrvTruncate(child, 2 * v.size, false);
        const grown = new Uint8Array(2 * v.size);
        grown.set(model);
        model = grown;
      }
      if (v.resize && i === Math.floor((2 * ops.length) / 3)) {
        touched.push([v.size, v.size]);
        await bdrvTruncate(child, v.size, false);
        model = model.slice(0, v.size);
      }
      if (op.t === 'flush') {
        await bdrvFlush(bs);
        flushed = model.slice();
        touched = [];
        continue;
      }
      touched.push([op.off, op.t === 'compress' ? v.clusterSize : op.len]);
      await runOp(child, op, v.clusterSize);
      applyToModel(model, op, v.clusterSize);
    }
    await bdrvFlush(bs);
  } finally {
    store.onEvent = undefined;
    await graph.detachChild(child);
    await graph.closeAll();
    deletePowercutStore(name);
  }
}

/** Runs `qemu-img check` (JSON) and `qemu-img convert -O raw` on every crash image. */
function checkAll(files: string[]): Promise<void> {
  return forEachImageInShell(tmp.dir, files, `${QEMU_IMG} check -f qcow2 --output=json "{}" > "{}.check" 2>&1; echo $? > "{}.rc"; ${QEMU_IMG} convert -f qcow2 -O raw "{}" "{}.raw" 2>> "{}.check"`);
}

/** Compares the guest contents QEMU reads from the crash image with what was flushed. */
function verifyData(c: Cut): string | null {
  let buf: Uint8Array;
  try {
    buf = readFileSync(tmp.path(`${c.file}.raw`));
  } catch {
    return `qemu-img convert could not read the image: ${readFileSync(tmp.path(`${c.file}.check`), 'utf8').slice(0, 300)}`;
  }
  // Compare the gaps between the ranges touched since the flush, a whole gap at a time.
  const ranges = [...c.touched].sort((a, b) => a[0] - b[0]);
  // Around a resize the disk may end either side of the new size; compare what both have.
  const len = Math.min(buf.length, c.flushed.length);
  const got = Buffer.from(buf.buffer, buf.byteOffset, len);
  const want = Buffer.from(c.flushed.buffer, c.flushed.byteOffset, len);
  let pos = 0;
  const gap = (end: number): string | null => {
    if (end > pos && got.compare(want, pos, end, pos, end) !== 0) {
      let i = pos;
      while (got[i] === want[i]) i++;
      return `flushed byte ${i} reads ${got[i]} instead of ${want[i]}`;
    }
    return null;
  };
  for (const [off, len] of ranges) {
    const bad = gap(Math.min(off, want.length));
    if (bad) return bad;
    pos = Math.max(pos, off + len);
  }
  return gap(want.length);
}

describe('power cuts at random points of random workloads', () => {
  it('never leave a corrupt image, and flushed data survives', async () => {
    let seed = 1;
    const t0 = Date.now();
    for (const v of VARIANTS) {

      const arb = opsArb({ size: v.size, clusterSize: v.clusterSize, compress: v.compress ?? !v.backing, discard: true }, 30, 60);
      const samples = fc.sample(arb, { numRuns: v.workloads, seed: 4242 + seed });
      for (const ops of samples) await collect(v, ops, seed++);
    }
    const t1 = Date.now();
    await checkAll(cuts.map((c) => c.file));
    const t2 = Date.now();
    const failures: string[] = [];
    for (const c of cuts) {
      const rc = Number(readFileSync(tmp.path(`${c.file}.rc`), 'utf8').trim());
      // 0: clean, 3: leaks only. 2 means corruption, 1 a check error.
      if (rc !== 0 && rc !== 3) {
        failures.push(`${c.workload} ${c.file} (${c.model}): qemu-img check exit ${rc}: ${readFileSync(tmp.path(`${c.file}.check`), 'utf8').slice(0, 400)}`);
        continue;
      }
      const bad = verifyData(c);
      if (bad) failures.push(`${c.workload} ${c.file} (${c.model}): ${bad}`);
    }
    console.log(`power cuts: ${cuts.length} crash images; workloads ${t1 - t0} ms, qemu-img ${t2 - t1} ms, compare ${Date.now() - t2} ms`);
    expect(failures.slice(0, 5)).toEqual([]);

  }, 180_000);

  it('repairs a crash image of a lazy-refcount workload on a read-write open', async () => {
    const lazy = cuts.filter((c) => c.workload.startsWith('lazy refcounts')).slice(0, 6);
    expect(lazy.length).toBeGreaterThan(0);
    for (const c of lazy) {
      const copy = `${c.file}.rw.qcow2`;
      writeFileSync(tmp.path(copy), readFileSync(tmp.path(c.file)));
      const o = await openQcow2(tmp.path(copy), { readOnly: false });
      await o.close();
      expect(qemuImg(tmp.dir, 'check', copy)).toMatch(/No errors were found on the image/);
    }
  });
});
