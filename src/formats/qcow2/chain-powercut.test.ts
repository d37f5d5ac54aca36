/**
 * Power cuts during the metadata rewrites of amend, make-empty and backing
 * file changes: each operation runs on a QEMU-made image stored on the
 * `powercut` protocol, and at every write and flush it issues we take the
 * image a power cut would leave: all unflushed writes lost, a random subset
 * of them kept whole (a reordering cache that writes each request
 * atomically), and — where the operation never rewrites the header in a new
 * layout — a random subset of their sectors kept. (A header rewrite is one
 * write, as in QEMU; a disk that tears it can mix two header layouts, which
 * neither engine survives.) Every such image must be free of
 * corruption for `qemu-img check` (leaks allowed) — or, where the operation
 * had set the dirty bit to say so, be repaired by a read-write open — and,
 * for operations that must not change guest data, read exactly as before.
 */
import { execFileSync } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { BlockNode } from '../../core/node.ts';
import { OPEN, PERM } from '../../core/types.ts';
import { deletePowercutStore, newPowercutStore, powercutDriver, type CrashModel, type PowercutStore } from '../../core/testing/powercut.ts';
import { amendImage } from '../../core/img/amend.ts';
import { INCOMPAT, parseHeader } from './header.ts';
import { newGraph, openQcow2, qemuImg, qemuIo, QEMU_IMG, requireQemu, scratchDir } from './testing.ts';
import { prng } from './fuzz.ts';

const tmp = scratchDir();
beforeAll(() => requireQemu());
afterAll(() => tmp.cleanup());
let n = 0;

/** `qemu-img check` exit status (0 clean, 3 leaks only, 2 corruption, 1 error) and output. */
function check(file: string): { rc: number; out: string } {
  try {
    return { rc: 0, out: execFileSync(QEMU_IMG, ['check', '-f', 'qcow2', file], { cwd: tmp.dir, encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] }) };
  } catch (e) {
    const x = e as { status?: number; stdout?: string; stderr?: string };
    return { rc: x.status ?? -1, out: `${x.stdout ?? ''}${x.stderr ?? ''}` };
  }
}

/** Guest bytes of `file` as QEMU reads them (with its backing chain). */
function guest(file: string): Buffer {
  const out = `${file}.${n++}.raw`;
  qemuImg(tmp.dir, 'convert', '-f', 'qcow2', '-O', 'raw', file, out);
  return readFileSync(tmp.path(out));
}

interface Scenario {
  name: string;
  /** Makes `img` (and whatever it needs) with QEMU's tools. */
  make: (img: string) => void;
  /** The operation under test, on the open node. */
  run: (bs: BlockNode) => Promise<void>;
  /** Whether guest data must read the same at every cut. */
  keepsData: boolean;
  backing?: string;
  /** The operation rewrites the header in a new layout, so a torn header write is out of scope. */
  relayout?: boolean;
}

type Model = CrashModel | 'reorder';

/** The durable bytes plus a random subset of the pending operations, each applied whole, in issue order. */
function reorderedImage(store: PowercutStore, random: () => number): Uint8Array {
  let img = new Uint8Array(store.durable.length);
  store.durable.read(0, img);
  for (const op of store.pending) {
    if (random() < 0.5) continue;
    if (op.kind === 'truncate') {
      const t = new Uint8Array(op.length);
      t.set(img.subarray(0, Math.min(op.length, img.length)));
      img = t;
      continue;
    }
    const end = op.offset + (op.kind === 'write' ? op.data.length : op.bytes);
    if (end > img.length) {
      const t = new Uint8Array(end);
      t.set(img);
      img = t;
    }
    if (op.kind === 'write') img.set(op.data, op.offset);
    else img.fill(0, op.offset, end);
  }
  return img;
}

const scenarios: Scenario[] = [
  {
    name: 'refcount width 16 → 2 with snapshots',
    make: (img) => {
      qemuImg(tmp.dir, 'create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4k', img, '2M');
      qemuIo(tmp.dir, img, 'write -P 1 0 1M', 'write -z 1M 64k');
      qemuImg(tmp.dir, 'snapshot', '-c', 's1', img);
      qemuIo(tmp.dir, img, 'write -P 2 0 64k');
    },
    run: (bs) => amendImage(bs, 'refcount_bits=2', false),
    keepsData: true,
  },
  {
    name: 'refcount width 16 → 64 (more refcount blocks than before)',
    make: (img) => {
      qemuImg(tmp.dir, 'create', '-q', '-f', 'qcow2', '-o', 'cluster_size=512', img, '1M');
      qemuIo(tmp.dir, img, 'write -P 1 0 640k');
    },
    run: (bs) => amendImage(bs, 'refcount_bits=64', false),
    keepsData: true,
  },
  {
    name: 'compat=0.10 with zero clusters over a backing file and a snapshot',
    backing: 'pcbase.qcow2',
    make: (img) => {
      qemuImg(tmp.dir, 'create', '-q', '-f', 'qcow2', '-b', 'pcbase.qcow2', '-F', 'qcow2', img);
      qemuIo(tmp.dir, img, 'write -P 3 0 128k', 'write -z 256k 128k');
      qemuImg(tmp.dir, 'snapshot', '-c', 's1', img);
      qemuIo(tmp.dir, img, 'write -z 0 64k', 'write -z 512k 64k');
    },
    run: (bs) => amendImage(bs, 'compat=0.10', false),
    keepsData: true,
    relayout: true,
  },
  {
    name: 'make empty, rebuilding in place',
    backing: 'pcbase.qcow2',
    make: (img) => {
      qemuImg(tmp.dir, 'create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4k', '-b', 'pcbase.qcow2', '-F', 'qcow2', img);
      qemuIo(tmp.dir, img, 'write -P 4 0 300k', 'write -z 512k 64k');
    },
    run: (bs) => bs.drv.makeEmpty!(bs),
    keepsData: false,
  },
  {
    name: 'make empty by discarding, with a snapshot',
    backing: 'pcbase.qcow2',
    make: (img) => {
      qemuImg(tmp.dir, 'create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4k', '-b', 'pcbase.qcow2', '-F', 'qcow2', img);
      qemuIo(tmp.dir, img, 'write -P 4 0 300k');
      qemuImg(tmp.dir, 'snapshot', '-c', 's1', img);
      qemuIo(tmp.dir, img, 'write -P 5 64k 64k');
    },
    run: (bs) => bs.drv.makeEmpty!(bs),
    keepsData: false,
  },
  {
    name: 'backing file change',
    backing: 'pcbase.qcow2',
    make: (img) => {
      qemuImg(tmp.dir, 'create', '-q', '-f', 'qcow2', '-b', 'pcbase.qcow2', '-F', 'qcow2', img);
      qemuIo(tmp.dir, img, 'write -P 6 0 64k');
    },
    run: (bs) => bs.drv.changeBackingFile!(bs, 'pcbase.qcow2', 'qcow2'),
    keepsData: true,
    relayout: true,
  },
];

describe('power cuts during qcow2 metadata rewrites', () => {
  beforeAll(() => {
    qemuImg(tmp.dir, 'create', '-q', '-f', 'qcow2', 'pcbase.qcow2', '1M');
    qemuIo(tmp.dir, 'pcbase.qcow2', 'write -P 9 0 1M');
  });

  for (const sc of scenarios) {
    it(`${sc.name}: no cut leaves corruption`, async () => {
      const id = n++;
      const img = `pc${id}.qcow2`;
      sc.make(img);
      const before = guest(img);
      const store = newPowercutStore(`chain-pc${id}`, readFileSync(tmp.path(img)));
      const random = prng(id + 1);
      const cuts: Array<{ file: string; model: Model }> = [];
      const models: Model[] = sc.relayout ? ['drop', 'reorder'] : ['drop', 'reorder', 'torn'];
      store.onEvent = (st) => {
        for (const model of models) {
          const file = `pc${id}.cut${cuts.length}.qcow2`;
          writeFileSync(tmp.path(file), model === 'reorder' ? reorderedImage(st, random) : st.crashImage(model, random));
          cuts.push({ file, model });
        }
      };
      const graph = newGraph();
      graph.registerDriver(powercutDriver);
      const opts: Record<string, unknown> = { driver: 'qcow2', file: { driver: 'powercut', name: `chain-pc${id}` } };
      if (sc.backing) opts.backing = { driver: 'qcow2', file: { driver: 'file', filename: tmp.path(sc.backing) } };
      const bs = await graph.open(opts, OPEN.RDWR);
      const child = graph.attachRoot(bs, { kind: 'job', name: 'pc', description: () => 'power cut test' }, 'root', PERM.CONSISTENT_READ | PERM.WRITE | PERM.RESIZE, PERM.ALL);
      bs.refcnt--;
      try {
        await sc.run(bs);
      } finally {
        store.onEvent = undefined;
        await graph.detachChild(child);
        await graph.closeAll();
      }
      const final = new Uint8Array(store.durable.length);
      store.durable.read(0, final);
      writeFileSync(tmp.path(`pc${id}.final.qcow2`), final);
      deletePowercutStore(`chain-pc${id}`);
      expect(cuts.length).toBeGreaterThanOrEqual(models.length);
      const failures: string[] = [];
      for (const c of [...cuts, { file: `pc${id}.final.qcow2`, model: 'drop' as Model }]) {
        const h = parseHeader(readFileSync(tmp.path(c.file)).subarray(0, 512 * 1024));
        let r = check(c.file);
        if ((h.incompatibleFeatures & INCOMPAT.DIRTY) !== 0n) {
          // The operation declared the refcounts stale: the next read-write open repairs them, as QEMU's does.
          const o = await openQcow2(tmp.path(c.file), { readOnly: false });
          await o.close();
          r = check(c.file);
          if (r.rc !== 0) failures.push(`${c.file} (${c.model}), dirty: not clean after the repairing open: ${r.out.slice(0, 300)}`);
          continue;
        }
        if (r.rc !== 0 && r.rc !== 3) {
          failures.push(`${c.file} (${c.model}): qemu-img check exit ${r.rc}: ${r.out.slice(0, 300)}`);
          continue;
        }
        if (sc.keepsData && !guest(c.file).equals(before)) failures.push(`${c.file} (${c.model}): guest data changed`);
      }
      expect(failures.slice(0, 5)).toEqual([]);
      expect(check(`pc${id}.final.qcow2`).rc).toBe(0);
    }, 120_000);
  }
});
