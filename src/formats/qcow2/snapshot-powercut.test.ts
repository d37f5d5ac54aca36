/**
 * Simulated power cuts during internal snapshot operations: random guest
 * workloads with snapshot create, apply and delete in between run on the
 * `powercut` protocol; at random writes and flushes we take the image a cut
 * would leave (unflushed writes dropped, or a random subset of their sectors
 * kept) and ask `qemu-img check` about it.
 *
 * What may be found: leaks, and one kind of COPIED disagreement. A snapshot
 * changes the refcount of every cluster the active tables reach and, with
 * it, their COPIED flags, which live in other sectors; the write order lets
 * only "COPIED clear at refcount 1" be seen (a needless copy-on-write, which
 * `qemu-img check -r all` repairs), never COPIED set on a shared cluster and
 * never a refcount below the references. So every ERROR line must be of that
 * kind, a repair must leave the image clean, the data flushed before the cut
 * must read back (except during an apply, which replaces the disk), and a
 * snapshot the crash image lists must hold what it held when it was taken.
 */
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { bdrvFlush } from '../../core/io.ts';
import { applySnapshot, createSnapshot, deleteSnapshot } from '../../core/img/snapshot.ts';
import { OPEN, PERM } from '../../core/types.ts';
import { deletePowercutStore, newPowercutStore, powercutDriver, type CrashModel } from '../../core/testing/powercut.ts';
import { forEachImageInShell, newGraph, qemuImg, QEMU_IMG, requireQemu, scratchDir } from './testing.ts';
import { applyToModel, opsArb, runOp } from './workload.ts';
import { prng } from './fuzz.ts';

const tmp = scratchDir();
beforeAll(() => requireQemu());
afterAll(() => tmp.cleanup());

interface Cut {
  file: string;
  model: CrashModel;
  flushed: Uint8Array;
  touched: Array<[number, number]>;
  /** Snapshots that may be listed, with their contents. */
  snaps: Map<string, Uint8Array>;
  workload: string;
}

interface Variant {
  name: string;
  create: string[];
  size: number;
  clusterSize: number;
  workloads: number;
}

const M = 1024 * 1024;
const VARIANTS: Variant[] = [
  { name: 'defaults, 64k clusters', create: [], size: 2 * M, clusterSize: 65536, workloads: 2 },
  { name: '512-byte clusters, 64-bit refcounts', create: ['-o', 'cluster_size=512,refcount_bits=64'], size: M, clusterSize: 512, workloads: 2 },
  { name: 'compat=0.10, 4k clusters', create: ['-o', 'compat=0.10,cluster_size=4k'], size: 2 * M, clusterSize: 4096, workloads: 2 },
  { name: 'lazy refcounts, 4k clusters', create: ['-o', 'lazy_refcounts=on,cluster_size=4k'], size: 2 * M, clusterSize: 4096, workloads: 2 },
  { name: 'extended L2, 16k clusters', create: ['-o', 'extended_l2=on,cluster_size=16k'], size: 2 * M, clusterSize: 16384, workloads: 1 },
];

let counter = 0;
const cuts: Cut[] = [];

async function collect(v: Variant, ops: ReturnType<typeof opsArb> extends fc.Arbitrary<infer T> ? T : never, seed: number): Promise<void> {
  const id = counter++;
  const img = `sp${id}.qcow2`;
  qemuImg(tmp.dir, 'create', '-q', '-f', 'qcow2', ...v.create, img, String(v.size));
  const name = `sp${id}`;
  const store = newPowercutStore(name, readFileSync(tmp.path(img)));
  const random = prng(seed);
  let model = new Uint8Array(v.size);
  let flushed = model.slice();
  let touched: Array<[number, number]> = [];
  const snaps = new Map<string, Uint8Array>();
  const workload = `${v.name} seed=${seed}`;
  let k = 0;
  store.onEvent = (st) => {
    if (random() > 0.25) return;
    const m: CrashModel = k++ % 2 === 0 ? 'torn' : 'drop';
    const file = `${name}.cut${k}.qcow2`;
    writeFileSync(tmp.path(file), st.crashImage(m, random));
    cuts.push({ file, model: m, flushed, touched: touched.slice(), snaps: new Map(snaps), workload });
  };
  const graph = newGraph();
  graph.registerDriver(powercutDriver);
  const bs = await graph.open({ driver: 'qcow2', discard: 'unmap', file: { driver: 'powercut', name } }, OPEN.RDWR);
  const child = graph.attachRoot(bs, { kind: 'job', name: 'spc', description: () => 'snapshot power cut test' }, 'root', PERM.CONSISTENT_READ | PERM.WRITE | PERM.RESIZE, PERM.ALL);
  bs.refcnt--;
  const at = (f: number): number => Math.floor(ops.length * f);
  try {
    for (let i = 0; i < ops.length; i++) {
      if (i === at(0.2)) {
        // The snapshot may or may not exist after a cut inside create; if it does, it must be whole.
        snaps.set('a', model.slice());
        await createSnapshot(bs, 'a');
        flushed = model.slice();
        touched = [];
      }
      if (i === at(0.45)) {
        snaps.set('b', model.slice());
        await createSnapshot(bs, 'b');
        flushed = model.slice();
        touched = [];
      }
      if (i === at(0.65)) {
        // Applying replaces the whole disk: until it is done, the disk may read as either.
        touched = [[0, v.size]];
        await applySnapshot(bs, 'a');
        model = snaps.get('a')!.slice();
        flushed = model.slice();
        touched = [];
      }
      if (i === at(0.85)) {
        await deleteSnapshot(bs, 'b');
        snaps.delete('b');
        flushed = model.slice();
        touched = [];
      }
      const op = ops[i]!;
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

/** check, the active disk and both snapshots (absent ones fail harmlessly) per crash image, four at a time. */
function checkAll(files: string[]): Promise<void> {
  const q = QEMU_IMG;
  return forEachImageInShell(tmp.dir, files, `${q} check -f qcow2 "{}" > "{}.check" 2>&1; echo $? > "{}.rc"; ${q} convert -f qcow2 -O raw "{}" "{}.raw" 2>> "{}.check"; ${q} convert -f qcow2 -O raw -l snapshot.name=a "{}" "{}.a" 2>/dev/null; ${q} convert -f qcow2 -O raw -l snapshot.name=b "{}" "{}.b" 2>/dev/null; true`);
}

/** The ERROR lines that are not the harmless COPIED disagreement (flag clear, refcount 1). */
function harmfulErrors(out: string): string[] {
  const bad: string[] = [];
  for (const line of out.split('\n')) {
    if (!/^ERROR/.test(line)) continue;
    const m = /^ERROR OFLAG_COPIED (?:data|L2) cluster: (?:l1_index=\d+ l1_entry|l2_entry)=([0-9a-f]+) refcount=(\d+)$/.exec(line);
    if (m && m[2] === '1' && BigInt(`0x${m[1]}`) < 0x8000000000000000n) continue;
    bad.push(line);
  }
  return bad;
}

function verifyData(c: Cut): string | null {
  const buf = readFileSync(tmp.path(`${c.file}.raw`));
  const ranges = [...c.touched].sort((a, b) => a[0] - b[0]);
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
  for (const [off, l] of ranges) {
    const bad = gap(Math.min(off, want.length));
    if (bad) return bad;
    pos = Math.max(pos, off + l);
  }
  const bad = gap(want.length);
  if (bad) return bad;
  for (const name of ['a', 'b']) {
    const f = tmp.path(`${c.file}.${name}`);
    if (!existsSync(f)) continue;
    const want = c.snaps.get(name);
    if (!want) return `snapshot ${name} is listed but was never taken or was already deleted`;
    if (!readFileSync(f).equals(Buffer.from(want.buffer, want.byteOffset, want.byteLength))) return `snapshot ${name} does not hold what it held when taken`;
  }
  return null;
}

describe('power cuts during snapshot create, apply and delete', () => {
  it('leave at most leaks and COPIED-clear disagreements, which a repair clears; flushed data and snapshots survive', async () => {
    let seed = 7;
    for (const v of VARIANTS) {
      const arb = opsArb({ size: v.size, clusterSize: v.clusterSize, compress: true, discard: true }, 20, 40);
      for (const ops of fc.sample(arb, { numRuns: v.workloads, seed: 777 + seed })) await collect(v, ops, seed++);
    }
    await checkAll(cuts.map((c) => c.file));
    const failures: string[] = [];
    const toRepair: Cut[] = [];
    for (const c of cuts) {
      const rc = Number(readFileSync(tmp.path(`${c.file}.rc`), 'utf8').trim());
      const out = readFileSync(tmp.path(`${c.file}.check`), 'utf8');
      if (rc !== 0 && rc !== 3) {
        const bad = harmfulErrors(out);
        if (rc !== 2 || bad.length > 0) {
          failures.push(`${c.workload} ${c.file} (${c.model}): qemu-img check exit ${rc}: ${(bad.join('\n') || out).slice(0, 400)}`);
          continue;
        }
        toRepair.push(c);
      }
      const bad = verifyData(c);
      if (bad) failures.push(`${c.workload} ${c.file} (${c.model}): ${bad}`);
    }
    for (const c of toRepair.slice(0, 8)) {
      qemuImg(tmp.dir, 'check', '-q', '-r', 'all', c.file);
      expect(qemuImg(tmp.dir, 'check', c.file)).toMatch(/No errors were found on the image/);
    }
    console.log(`snapshot power cuts: ${cuts.length} crash images, ${toRepair.length} with COPIED-clear disagreements only`);
    expect(cuts.length).toBeGreaterThan(100);
    expect(failures.slice(0, 5)).toEqual([]);
  }, 300_000);
});
