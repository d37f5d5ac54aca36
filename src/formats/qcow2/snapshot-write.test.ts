/**
 * Internal snapshots written by this engine, checked by QEMU: create, apply
 * and delete with writes in between, over cluster sizes, refcount widths,
 * v2/v3 and extended L2; after every step `qemu-img check` must be clean and
 * the active disk and every snapshot (read by QEMU with `convert -l`) must
 * hold what a model says. Also the other direction (QEMU's snapshots applied
 * and deleted here), QEMU's refusals, the VM state area, and a fast-check
 * model test of random write/snapshot sequences.
 */
import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { bdrvFlush, bdrvPreadv, bdrvPwritev } from '../../core/io.ts';
import { applySnapshot, createSnapshot, deleteSnapshot, listSnapshots } from '../../core/img/snapshot.ts';
import { loadVmstate, saveVmstate } from '../../core/img/vmstate.ts';
import { BlockBackend } from '../../core/block-backend.ts';
import { newGraph, openQcow2, qemuImg, qemuIo, QEMU_IMG, readAll, requireQemu, scratchDir, type OpenedImage } from './testing.ts';
import type { Qcow2Snapshot } from './snapshot.ts';
import type { Qcow2State } from './state.ts';
import { applyToModel, describeOps, opsArb, runOp, type Op } from './workload.ts';

const tmp = scratchDir();
beforeAll(() => requireQemu());
afterAll(() => tmp.cleanup());

const K = 1024;
const M = 1024 * K;
let n = 0;

/** `qemu-img check` output and exit status (0 clean, 2 corrupt, 3 leaks). */
function check(img: string): { rc: number; out: string } {
  try {
    return { rc: 0, out: execFileSync(QEMU_IMG, ['check', img], { cwd: tmp.dir, encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] }) };
  } catch (e) {
    const x = e as { status: number; stdout: string; stderr: string };
    return { rc: x.status, out: `${x.stdout}${x.stderr}` };
  }
}

function expectClean(img: string): void {
  const r = check(img);
  expect(r.out, r.out).toMatch(/No errors were found on the image/);
  expect(r.rc).toBe(0);
}

/** The guest contents QEMU reads: the active disk, or snapshot `name`. */
function qemuRead(img: string, name?: string): Buffer {
  const out = `${img}.${name ?? 'active'}.raw`;
  const args = ['convert', '-f', 'qcow2', '-O', 'raw'];
  if (name !== undefined) args.push('-l', `snapshot.name=${name}`);
  qemuImg(tmp.dir, ...args, img, out);
  return readFileSync(tmp.path(out));
}

function same(a: Uint8Array, b: Uint8Array): boolean {
  return Buffer.from(a.buffer, a.byteOffset, a.byteLength).equals(Buffer.from(b.buffer, b.byteOffset, b.byteLength));
}

async function write(o: OpenedImage, model: Uint8Array, off: number, len: number, pat: number): Promise<void> {
  await bdrvPwritev(o.child, off, len, new Uint8Array(len).fill(pat));
  model.fill(pat, off, off + len);
}

interface Variant {
  name: string;
  opts: string;
  size: number;
  cs: number;
}

const VARIANTS: Variant[] = [
  { name: 'defaults (64k clusters, 16-bit refcounts, v3)', opts: '', size: 4 * M, cs: 65536 },
  { name: '512-byte clusters, 64-bit refcounts', opts: 'cluster_size=512,refcount_bits=64', size: 512 * K, cs: 512 },
  { name: '4k clusters, 4-bit refcounts', opts: 'cluster_size=4k,refcount_bits=4', size: 2 * M, cs: 4096 },
  { name: '4k clusters, 8-bit refcounts, compat=0.10', opts: 'cluster_size=4k,compat=0.10', size: 2 * M, cs: 4096 },
  { name: '32k clusters, extended L2', opts: 'cluster_size=32k,extended_l2=on', size: 4 * M, cs: 32768 },
  { name: '1k clusters, 32-bit refcounts, lazy refcounts', opts: 'cluster_size=1k,refcount_bits=32,lazy_refcounts=on', size: 1 * M, cs: 1024 },
];

describe('snapshots this engine writes, as QEMU sees them', () => {
  for (const v of VARIANTS) {
    it(`create, apply and delete with writes between: ${v.name}`, async () => {
      const img = `v${n++}.qcow2`;
      qemuImg(tmp.dir, 'create', '-f', 'qcow2', ...(v.opts ? ['-o', v.opts] : []), img, String(v.size));
      const model = new Uint8Array(v.size);
      const snaps = new Map<string, Uint8Array>();
      let o = await openQcow2(tmp.path(img), { readOnly: false });
      try {
        await write(o, model, 0, 3 * v.cs + 512, 0x11);
        await write(o, model, v.size - v.cs, v.cs, 0x12);
        await createSnapshot(o.bs, 'one');
        snaps.set('one', model.slice());
        // Partial overwrite of shared clusters: copy-on-write must keep 'one' intact.
        await write(o, model, v.cs / 2, v.cs, 0x21);
        await write(o, model, v.size / 2, 2 * v.cs, 0x22);
        await createSnapshot(o.bs, 'two');
        snaps.set('two', model.slice());
        await write(o, model, 0, 512, 0x31);
        await bdrvFlush(o.bs);
        expect((await listSnapshots(o.bs)).map((s) => `${s.id}:${s.name}`)).toEqual(['1:one', '2:two']);
        expect(same(await readAll(o), model)).toBe(true);
      } finally {
        await o.close();
      }
      expectClean(img);
      expect(same(qemuRead(img), model)).toBe(true);
      for (const [name, want] of snaps) expect(same(qemuRead(img, name), want), name).toBe(true);

      o = await openQcow2(tmp.path(img), { readOnly: false });
      try {
        await applySnapshot(o.bs, 'one');
        model.set(snaps.get('one')!);
        expect(same(await readAll(o), model)).toBe(true);
        await write(o, model, v.cs, v.cs, 0x41);
        await deleteSnapshot(o.bs, 'two');
        snaps.delete('two');
        await write(o, model, v.size / 2, 512, 0x42);
        await createSnapshot(o.bs, 'three');
        snaps.set('three', model.slice());
        expect((await listSnapshots(o.bs)).map((s) => `${s.id}:${s.name}`)).toEqual(['1:one', '2:three']);
      } finally {
        await o.close();
      }
      expectClean(img);
      expect(same(qemuRead(img), model)).toBe(true);
      for (const [name, want] of snaps) expect(same(qemuRead(img, name), want), name).toBe(true);

      o = await openQcow2(tmp.path(img), { readOnly: false });
      try {
        await deleteSnapshot(o.bs, 'one');
        await applySnapshot(o.bs, '2');
        model.set(snaps.get('three')!);
        await deleteSnapshot(o.bs, 'three');
        expect(same(await readAll(o), model)).toBe(true);
      } finally {
        await o.close();
      }
      expectClean(img);
      expect(same(qemuRead(img), model)).toBe(true);
      // With every snapshot gone, the active tables own their clusters again: QEMU sees no leaks and no COPIED errors.
      expect(qemuImg(tmp.dir, 'snapshot', '-l', img)).toBe('');
    });
  }

  it('applies and deletes snapshots QEMU made, and QEMU applies and deletes ours', async () => {
    const img = `x${n++}.qcow2`;
    qemuImg(tmp.dir, 'create', '-f', 'qcow2', '-o', 'cluster_size=4k', img, '1M');
    qemuIo(tmp.dir, img, 'write -P 1 0 64k', 'write -c -P 9 128k 4k');
    qemuImg(tmp.dir, 'snapshot', '-c', 'q1', img);
    qemuIo(tmp.dir, img, 'write -P 2 4k 8k');
    const q1 = qemuRead(img, 'q1');
    const active = qemuRead(img);
    let o = await openQcow2(tmp.path(img), { readOnly: false });
    try {
      await createSnapshot(o.bs, 'ours');
      await applySnapshot(o.bs, 'q1');
      expect(same(await readAll(o), q1)).toBe(true);
      await bdrvPwritev(o.child, 0, 512, new Uint8Array(512).fill(5));
    } finally {
      await o.close();
    }
    expectClean(img);
    expect(same(qemuRead(img, 'ours'), active)).toBe(true);
    // QEMU applies ours, then deletes QEMU's; we read and delete the rest.
    qemuImg(tmp.dir, 'snapshot', '-a', 'ours', img);
    expect(same(qemuRead(img), active)).toBe(true);
    qemuImg(tmp.dir, 'snapshot', '-d', 'q1', img);
    expectClean(img);
    o = await openQcow2(tmp.path(img), { readOnly: false });
    try {
      expect(same(await readAll(o), active)).toBe(true);
      await deleteSnapshot(o.bs, 'ours');
    } finally {
      await o.close();
    }
    expectClean(img);
    expect(same(qemuRead(img), active)).toBe(true);
  });

  it('snapshots an overlay: unallocated clusters keep reading from the backing file in the snapshot', async () => {
    const base = `b${n++}.qcow2`;
    const img = `t${n++}.qcow2`;
    qemuImg(tmp.dir, 'create', '-f', 'qcow2', base, '1M');
    qemuIo(tmp.dir, base, 'write -P 0x55 0 1M');
    qemuImg(tmp.dir, 'create', '-f', 'qcow2', '-o', 'cluster_size=16k', '-b', base, '-F', 'qcow2', img);
    qemuIo(tmp.dir, img, 'write -P 0x66 64k 20k');
    const before = qemuRead(img);
    const o = await openQcow2(tmp.path(img), { readOnly: false });
    try {
      await createSnapshot(o.bs, 'over');
      // Partial writes into unallocated clusters copy from the backing file; into shared ones, from the shared cluster.
      await bdrvPwritev(o.child, 1000 * 512, 4096, new Uint8Array(4096).fill(0x77));
      await bdrvPwritev(o.child, 70 * K, 4096, new Uint8Array(4096).fill(0x78));
      await applySnapshot(o.bs, 'over');
      expect(same(await readAll(o), before)).toBe(true);
      await bdrvPwritev(o.child, 0, 512, new Uint8Array(512).fill(0x79));
    } finally {
      await o.close();
    }
    expectClean(img);
    expect(same(qemuRead(img, 'over'), before)).toBe(true);
    const after = Buffer.from(before);
    after.fill(0x79, 0, 512);
    expect(same(qemuRead(img), after)).toBe(true);
  });

  it('resizes to the snapshot size on apply (v3), as QEMU 7.2 does', async () => {
    const img = `r${n++}.qcow2`;
    qemuImg(tmp.dir, 'create', '-f', 'qcow2', img, '1M');
    qemuIo(tmp.dir, img, 'write -P 3 0 1M');
    let o = await openQcow2(tmp.path(img), { readOnly: false });
    try {
      await createSnapshot(o.bs, 'small');
    } finally {
      await o.close();
    }
    qemuImg(tmp.dir, 'resize', img, '3M');
    qemuIo(tmp.dir, img, 'write -P 4 2M 64k');
    o = await openQcow2(tmp.path(img), { readOnly: false });
    try {
      await createSnapshot(o.bs, 'big');
      await applySnapshot(o.bs, 'small');
      expect(o.bs.totalBytes).toBe(M);
      expect(same(await readAll(o), new Uint8Array(M).fill(3))).toBe(true);
      await applySnapshot(o.bs, 'big');
      expect(o.bs.totalBytes).toBe(3 * M);
    } finally {
      await o.close();
    }
    expectClean(img);
    const want = new Uint8Array(3 * M);
    want.fill(3, 0, M);
    want.fill(4, 2 * M, 2 * M + 64 * K);
    expect(same(qemuRead(img), want)).toBe(true);
  });

  it('fails like QEMU: missing snapshots, data files, refcount overflow, too many snapshots, read-only images', async () => {
    const img = `e${n++}.qcow2`;
    qemuImg(tmp.dir, 'create', '-f', 'qcow2', img, '1M');
    let o = await openQcow2(tmp.path(img), { readOnly: false });
    try {
      await expect(applySnapshot(o.bs, 'nope')).rejects.toThrow("Could not apply snapshot 'nope': Failed to load snapshot: No such file or directory");
      await expect(deleteSnapshot(o.bs, 'nope')).rejects.toThrow("Could not delete snapshot 'nope': snapshot not found");
      // Duplicate names are accepted by qemu-img; ids keep counting from the largest.
      await createSnapshot(o.bs, 'dup');
      await createSnapshot(o.bs, 'dup');
      await createSnapshot(o.bs, 'x'.repeat(300));
      const list = await listSnapshots(o.bs);
      expect(list.map((s) => s.id)).toEqual(['1', '2', '3']);
      expect(list[2]!.name).toBe('x'.repeat(255));
      expect(list[0]!.icount).toBe(0);
    } finally {
      await o.close();
    }
    expectClean(img);
    o = await openQcow2(tmp.path(img), { readOnly: true });
    try {
      await expect(createSnapshot(o.bs, 'ro')).rejects.toMatchObject({ code: 'EACCES' });
      await expect(applySnapshot(o.bs, 'dup')).rejects.toMatchObject({ code: 'EACCES' });
    } finally {
      await o.close();
    }

    const df = `d${n++}.qcow2`;
    qemuImg(tmp.dir, 'create', '-f', 'qcow2', '-o', `data_file=${df}.data`, df, '1M');
    o = await openQcow2(tmp.path(df), { readOnly: false });
    try {
      await expect(createSnapshot(o.bs, 's')).rejects.toThrow("Could not create snapshot 's': -95 (Operation not supported)");
      await expect(applySnapshot(o.bs, 's')).rejects.toThrow("Could not apply snapshot 's': Failed to load snapshot: Operation not supported");
      expect(await listSnapshots(o.bs)).toEqual([]);
    } finally {
      await o.close();
    }

    const r1 = `o${n++}.qcow2`;
    qemuImg(tmp.dir, 'create', '-f', 'qcow2', '-o', 'refcount_bits=1', r1, '1M');
    qemuIo(tmp.dir, r1, 'write -P 1 0 64k');
    o = await openQcow2(tmp.path(r1), { readOnly: false });
    try {
      await expect(createSnapshot(o.bs, 's')).rejects.toThrow("Could not create snapshot 's': -22 (Invalid argument)");
      // Nothing changed: the data is still written in place.
      await bdrvPwritev(o.child, 0, 512, new Uint8Array(512).fill(2));
    } finally {
      await o.close();
    }
    // QEMU leaks the L1 copy here; we give it back.
    expectClean(r1);
    expect(qemuRead(r1)[0]).toBe(2);

    // Applying raises the snapshot's refcounts before the old tree's drop: with 2-bit refcounts and two snapshots
    // of the same clusters that overflows, in QEMU too, and nothing changes.
    const r2 = `o${n++}.qcow2`;
    qemuImg(tmp.dir, 'create', '-f', 'qcow2', '-o', 'cluster_size=4k,refcount_bits=2', r2, '1M');
    qemuIo(tmp.dir, r2, 'write -P 1 0 64k');
    o = await openQcow2(tmp.path(r2), { readOnly: false });
    try {
      await createSnapshot(o.bs, 'one');
      await createSnapshot(o.bs, 'two');
      await expect(applySnapshot(o.bs, 'one')).rejects.toThrow("Could not apply snapshot 'one': Failed to load snapshot: Invalid argument");
      await expect(createSnapshot(o.bs, 'three')).rejects.toThrow("Could not create snapshot 'three': -22 (Invalid argument)");
      await deleteSnapshot(o.bs, 'two');
      await applySnapshot(o.bs, 'one');
      await bdrvPwritev(o.child, 0, 512, new Uint8Array(512).fill(2));
    } finally {
      await o.close();
    }
    expectClean(r2);
    expect(qemuRead(r2, 'one')[0]).toBe(1);
  });

  it('refuses a snapshot beyond QCOW_MAX_SNAPSHOTS or past the table size limit with EFBIG, changing nothing', async () => {
    const img = `m${n++}.qcow2`;
    qemuImg(tmp.dir, 'create', '-f', 'qcow2', img, '1M');
    qemuIo(tmp.dir, img, 'write -P 1 0 64k');
    const o = await openQcow2(tmp.path(img), { readOnly: false });
    try {
      const s = o.bs.opaque as Qcow2State;
      // Entries only in memory: the refusals must come before anything reaches the file.
      const fake = (name: string): Qcow2Snapshot => ({ l1TableOffset: 0, l1Size: 0, id: '1', name, diskSize: M, vmStateSize: 0, dateSec: 0, dateNsec: 0, vmClockNsec: 0, extraDataSize: 24, unknownExtraData: new Uint8Array(0) });
      s.snapshots = Array.from({ length: 65536 }, () => fake('a'));
      await expect(createSnapshot(o.bs, 'one-too-many')).rejects.toThrow("Could not create snapshot 'one-too-many': -27 (File too large)");
      // 1200 names of 60000 bytes pass QCOW_MAX_SNAPSHOTS_SIZE (64 MiB): the new table cannot be written.
      s.snapshots = Array.from({ length: 1200 }, () => fake('n'.repeat(60000)));
      await expect(createSnapshot(o.bs, 'big')).rejects.toThrow("Could not create snapshot 'big': -27 (File too large)");
      s.snapshots = [];
      await bdrvPwritev(o.child, 0, 512, new Uint8Array(512).fill(2));
    } finally {
      await o.close();
    }
    // The failed create gave back the refcounts it had raised: the write above went in place, nothing leaked.
    expectClean(img);
    expect(qemuRead(img)[0]).toBe(2);
  });
});

describe('VM state', () => {
  it('lives past the disk at QEMU\'s offset and reads back; QEMU reads what we wrote', async () => {
    const img = `s${n++}.qcow2`;
    qemuImg(tmp.dir, 'create', '-f', 'qcow2', '-o', 'cluster_size=4k', img, '1M');
    const o = await openQcow2(tmp.path(img), { readOnly: false });
    try {
      await saveVmstate(o.bs, new Uint8Array(10 * K).fill(7), 2 * K);
      const back = new Uint8Array(12 * K);
      await loadVmstate(o.bs, back, 0);
      expect(back.subarray(0, 2 * K).every((b) => b === 0)).toBe(true);
      expect(back.subarray(2 * K).every((b) => b === 7)).toBe(true);
      // The guest disk is untouched.
      const disk = new Uint8Array(M);
      await bdrvPreadv(o.child, 0, M, disk);
      expect(disk.every((b) => b === 0)).toBe(true);
    } finally {
      await o.close();
    }
    expectClean(img);
    execFileSync('qemu-io', ['-f', 'qcow2', '-c', 'read -b -P 7 2048 10240', '-c', 'read -b -P 0 0 2048', img], { cwd: tmp.dir });
  });
});

describe('random writes and snapshot operations against a model', () => {
  type SnapOp = { t: 'create'; name: string } | { t: 'apply'; pick: number } | { t: 'delete'; pick: number };
  type Step = { op: Op } | { snap: SnapOp };

  it('reads like the model, and QEMU finds the image clean and the snapshots intact', async () => {
    const size = 256 * K;
    const cs = 4096;
    const snapArb = fc.oneof(
      fc.constantFrom('a', 'b', 'c').map((name): SnapOp => ({ t: 'create', name })),
      fc.nat(7).map((pick): SnapOp => ({ t: 'apply', pick })),
      fc.nat(7).map((pick): SnapOp => ({ t: 'delete', pick })),
    );
    const stepsArb = (ccs: number): fc.Arbitrary<Step[]> => fc
      .tuple(opsArb({ size, clusterSize: ccs, compress: true, discard: true }, 10, 30), fc.array(fc.tuple(fc.nat(40), snapArb), { minLength: 3, maxLength: 10 }))
      .map(([ops, snaps]) => {
        const steps: Step[] = ops.map((op) => ({ op }));
        for (const [at, snap] of snaps) steps.splice(Math.min(at, steps.length), 0, { snap });
        return steps;
      });
    let runs = 0;
    await fc.assert(
      fc.asyncProperty(fc.constantFrom('refcount_bits=16', 'refcount_bits=4', 'compat=0.10', 'extended_l2=on,cluster_size=16k').chain((o) => stepsArb(o.includes('16k') ? 16384 : cs).map((st) => [o, st] as const)), async ([opts, steps]) => {
        const ccs = opts.includes('16k') ? 16384 : cs;
        const img = `f${n++}.qcow2`;
        qemuImg(tmp.dir, 'create', '-q', '-f', 'qcow2', '-o', opts.includes('cluster_size') ? opts : `${opts},cluster_size=4k`, img, String(size));
        let model = new Uint8Array(size);
        const snaps: Array<{ name: string; data: Uint8Array }> = [];
        const o = await openQcow2(tmp.path(img), { readOnly: false, options: { discard: 'unmap' } });
        const log: string[] = [];
        try {
          for (const st of steps) {
            if ('op' in st) {
              log.push(describeOps([st.op]));
              await runOp(o.child, st.op, ccs);
              applyToModel(model, st.op, ccs);
              continue;
            }
            const sn = st.snap;
            log.push(JSON.stringify(sn));
            if (sn.t === 'create') {
              // Unique names: qemu-img deletes by name, and the first of equal names would win.
              const name = `${sn.name}${log.length}`;
              await createSnapshot(o.bs, name);
              snaps.push({ name, data: model.slice() });
            } else if (snaps.length > 0) {
              const i = sn.pick % snaps.length;
              const target = snaps[i]!;
              if (sn.t === 'apply') {
                // Apply takes an id or a name: use the id, which QEMU tries first.
                await applySnapshot(o.bs, (await listSnapshots(o.bs))[i]!.id);
                model = target.data.slice();
              } else {
                await deleteSnapshot(o.bs, target.name);
                snaps.splice(i, 1);
              }
            }
          }
          expect(same(await readAll(o), model), log.join('; ')).toBe(true);
        } finally {
          await o.close();
        }
        const r = check(img);
        expect(r.rc, `${opts}: ${log.join('; ')}\n${r.out}`).toBe(0);
        expect(same(qemuRead(img), model), log.join('; ')).toBe(true);
        const list = qemuImg(tmp.dir, 'snapshot', '-l', img).split('\n').slice(2).filter((l) => l.trim()).map((l) => l.split(/\s+/)[0]!);
        expect(list.length).toBe(snaps.length);
        for (let i = 0; i < snaps.length; i++) {
          // convert -l snapshot.id reads by id, so equal names cannot hide a wrong snapshot.
          const out = `${img}.${i}.raw`;
          qemuImg(tmp.dir, 'convert', '-f', 'qcow2', '-O', 'raw', '-l', `snapshot.id=${list[i]}`, img, out);
          expect(same(readFileSync(tmp.path(out)), snaps[i]!.data), `snapshot ${i}: ${log.join('; ')}`).toBe(true);
        }
        runs++;
      }),
      { numRuns: 25, seed: 20261121 },
    );
    expect(runs).toBe(25);
  }, 240_000);
});

describe('snapshots and requests in flight', () => {
  it('a snapshot holds the writes issued before it and none issued after (the node is drained)', async () => {
    const img = `c${n++}.qcow2`;
    qemuImg(tmp.dir, 'create', '-f', 'qcow2', '-o', 'cluster_size=4k', img, '1M');
    // Allocated clusters take writes in place, without the image lock: the drain must keep them out of the snapshot.
    qemuIo(tmp.dir, img, 'write -P 0 0 1M');
    const graph = newGraph();
    const blk = await BlockBackend.open(graph, { driver: 'qcow2', file: { driver: 'file', filename: tmp.path(img) } });
    const spots = Array.from({ length: 64 }, (_, i) => i * 16 * K + (i % 7) * 512);
    try {
      const before = spots.map((off) => blk.pwrite(off, new Uint8Array(4 * K).fill(1)));
      const snap = createSnapshot(blk.bs!, 'mid');
      const after = spots.map((off) => blk.pwrite(off + 512, new Uint8Array(512).fill(2)));
      await Promise.all([...before, snap, ...after]);
    } finally {
      await blk.close();
    }
    expectClean(img);
    const s = qemuRead(img, 'mid');
    const a = qemuRead(img);
    for (const off of spots) {
      expect(s.subarray(off, off + 4 * K).every((b) => b === 1), `snapshot at ${off}`).toBe(true);
      expect(a[off]).toBe(1);
      expect(a.subarray(off + 512, off + 1024).every((b) => b === 2), `active at ${off}`).toBe(true);
    }
  });
});
