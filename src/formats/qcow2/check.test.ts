/**
 * check and repair against `qemu-img check`: the counts we report (errors,
 * corruptions, leaks, fixed counts, allocated/fragmented/compressed and
 * total clusters, image end offset) must match QEMU's JSON for clean and
 * damaged images, and our repairs must leave images QEMU finds clean.
 */
import { closeSync, openSync, readFileSync, writeFileSync, writeSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { CHECK_FIX, type CheckResult } from '../../core/driver.ts';
import type { Qcow2State } from './index.ts';
import { openQcow2, qemuImg, qemuIo, requireQemu, run, QEMU_IMG, scratchDir } from './testing.ts';

const tmp = scratchDir();
beforeAll(() => requireQemu());
afterAll(() => tmp.cleanup());
let n = 0;

function patch(path: string, offset: number, bytes: number[]): void {
  const fd = openSync(path, 'r+');
  try {
    writeSync(fd, Uint8Array.from(bytes), 0, bytes.length, offset);
  } finally {
    closeSync(fd);
  }
}

/** qemu-img check --output=json, whatever its exit code. */
function qemuCheck(img: string, extra: string[] = []): Record<string, number> {
  let out: string;
  try {
    out = run(QEMU_IMG, ['check', '-f', 'qcow2', '--output=json', ...extra, img], tmp.dir);
  } catch (e) {
    out = String((e as { stdout?: string }).stdout ?? '');
    if (!out.trim()) throw new Error(`qemu-img check ${extra.join(' ')} printed no JSON: ${String((e as { stderr?: string }).stderr ?? e)}`);
  }
  return JSON.parse(out) as Record<string, number>;
}

/** Our result in the shape of QEMU's JSON (absent fields are zero there). */
function asJson(r: CheckResult): Record<string, number> {
  return {
    'image-end-offset': r.imageEndOffset,
    'total-clusters': r.bfi.totalClusters,
    'allocated-clusters': r.bfi.allocatedClusters,
    'fragmented-clusters': r.bfi.fragmentedClusters,
    'compressed-clusters': r.bfi.compressedClusters,
    'check-errors': r.checkErrors,
    leaks: r.leaks,
    corruptions: r.corruptions,
    'leaks-fixed': r.leaksFixed,
    'corruptions-fixed': r.corruptionsFixed,
  };
}

function pick(q: Record<string, number>): Record<string, number> {
  const keys = ['image-end-offset', 'total-clusters', 'allocated-clusters', 'fragmented-clusters', 'compressed-clusters', 'check-errors', 'leaks', 'corruptions', 'leaks-fixed', 'corruptions-fixed'];
  const out: Record<string, number> = {};
  for (const k of keys) out[k] = q[k] ?? 0;
  return out;
}

async function ourCheck(img: string, fix = 0, warnings?: string[]): Promise<CheckResult> {
  const o = await openQcow2(tmp.path(img), { readOnly: fix === 0, options: {} });
  if (warnings) o.graph.onWarning = (m) => warnings.push(m);
  try {
    return await o.bs.drv.check!(o.bs, fix);
  } finally {
    await o.close();
  }
}

function image(create: string[], size: string, ...io: string[]): string {
  const img = `c${n++}.qcow2`;
  qemuImg(tmp.dir, 'create', '-f', 'qcow2', ...create, img, size);
  if (io.length) qemuIo(tmp.dir, img, ...io);
  return img;
}

/** Offset of refcount block 0 and the refcount width of `img`. */
async function refblock0(img: string): Promise<{ block: number; bytes: number }> {
  const o = await openQcow2(tmp.path(img));
  const s = o.bs.opaque as Qcow2State;
  const r = { block: s.refcount.tableEntry(0), bytes: 2 ** s.header.refcountOrder / 8 };
  await o.close();
  return r;
}

describe('check matches qemu-img check', () => {
  const clean: Array<[string, () => string]> = [
    ['a fragmented image with zero and discarded clusters', () => image([], '8M', 'write -P 1 1M 64k', 'write -P 2 0 64k', 'write -P 3 3M 1M', 'write -z 3M 64k', 'discard 3136k 64k')],
    ['compressed clusters', () => image(['-o', 'cluster_size=4k'], '2M', 'write -c -P 1 0 4k', 'write -c -P 2 4k 4k', 'write -c -P 3 64k 4k', 'write -P 4 128k 16k')],
    ['extended L2 with subclusters', () => image(['-o', 'extended_l2=on'], '4M', 'write -P 1 2k 2k', 'write -P 2 1M 100k', 'write -z 1M 8k')],
    ['512-byte clusters and 1-bit refcounts', () => image(['-o', 'cluster_size=512,refcount_bits=1'], '1M', 'write -P 1 0 100k', 'write -P 2 500k 3k')],
    ['an internal snapshot', () => {
      const img = image(['-o', 'cluster_size=4k'], '1M', 'write -P 1 0 200k');
      qemuImg(tmp.dir, 'snapshot', '-c', 's1', img);
      qemuIo(tmp.dir, img, 'write -P 2 64k 64k');
      return img;
    }],
    ['a persistent bitmap', () => {
      const img = image([], '4M', 'write -P 1 0 1M');
      qemuImg(tmp.dir, 'bitmap', '--add', img, 'b0');
      return img;
    }],
    ['an external data file', () => image(['-o', `data_file=c${n}.data`], '4M', 'write -P 1 0 1M')],
    ['a v2 image', () => image(['-o', 'compat=0.10'], '4M', 'write -P 1 0 1M', 'write -P 2 3M 64k')],
    ['metadata preallocation', () => image(['-o', 'preallocation=metadata'], '4M')],
  ];
  for (const [name, make] of clean) {
    it(`on ${name}`, async () => {
      const img = make();
      expect(asJson(await ourCheck(img))).toEqual(pick(qemuCheck(img)));
    });
  }

  /** An image whose refcounts were damaged by `damage(refblockOffset, refcountBytes, firstDataCluster, leakedCluster)`. */
  async function damaged(damage: (block: number, bytes: number, d0: number, leaked: number) => Array<[number, number]>): Promise<string> {
    const img = image([], '4M', 'write -P 1 0 128k');
    const { block, bytes } = await refblock0(img);
    const len = readFileSync(tmp.path(img)).length;
    const leaked = len / 65536;
    // One more cluster at the end of the file, for a leak.
    writeFileSync(tmp.path(img), Buffer.concat([readFileSync(tmp.path(img)), Buffer.alloc(65536)]));
    const map = JSON.parse(qemuImg(tmp.dir, 'map', '--output=json', img)) as Array<{ offset?: number }>;
    for (const [cluster, value] of damage(block, bytes, map[0]!.offset! / 65536, leaked)) patch(tmp.path(img), block + bytes * cluster + bytes - 1, [value]);
    return img;
  }

  /** Repairs copies of `img` with qemu-img and with us; the fixed counts and the outcome must agree. */
  async function repairBoth(img: string, mode: 'leaks' | 'all'): Promise<{ ours: string; failed: boolean }> {
    const fix = mode === 'leaks' ? CHECK_FIX.LEAKS : CHECK_FIX.LEAKS | CHECK_FIX.ERRORS;
    const ours = `${img}.${mode}.ours.qcow2`;
    const theirs = `${img}.${mode}.theirs.qcow2`;
    writeFileSync(tmp.path(ours), readFileSync(tmp.path(img)));
    writeFileSync(tmp.path(theirs), readFileSync(tmp.path(img)));
    let qr: Record<string, number> | null = null;
    try {
      qr = pick(qemuCheck(theirs, ['-r', mode]));
    } catch {
      qr = null;
    }
    let r: CheckResult | null = null;
    try {
      r = await ourCheck(ours, fix);
    } catch {
      r = null;
    }
    expect(r === null, `we fail exactly when qemu-img check -r ${mode} fails`).toBe(qr === null);
    if (r && qr) expect({ leaksFixed: r.leaksFixed, corruptionsFixed: r.corruptionsFixed }).toEqual({ leaksFixed: qr['leaks-fixed'], corruptionsFixed: qr['corruptions-fixed'] });
    return { ours, failed: r === null };
  }

  it('on leaks and COPIED flags, and repairs them like qemu-img check -r', async () => {
    // A leaked cluster at the end of the file, and the first data cluster counted twice (a leak and a COPIED error).
    const img = await damaged((_b, _n, d0, leaked) => [[leaked, 1], [d0, 2]]);
    const q = pick(qemuCheck(img));
    expect([q.leaks, q.corruptions]).toEqual([2, 1]);
    const warnings: string[] = [];
    expect(asJson(await ourCheck(img, 0, warnings))).toEqual(q);
    expect(warnings).toContain(`Leaked cluster ${readFileSync(tmp.path(img)).length / 65536 - 1} refcount=1 reference=0`);
    for (const mode of ['leaks', 'all'] as const) {
      const { ours } = await repairBoth(img, mode);
      const after = pick(qemuCheck(ours));
      expect([after.leaks, after.corruptions], mode).toEqual([0, 0]);
    }
  });

  it('on a referenced cluster with refcount 0: -r leaks gives up, -r all rebuilds', async () => {
    const img = await damaged((_b, _n, d0) => [[d0 + 1, 0]]);
    const warnings: string[] = [];
    expect(asJson(await ourCheck(img, 0, warnings))).toEqual(pick(qemuCheck(img)));
    expect(warnings.some((w) => /^ERROR cluster \d+ refcount=0 reference=1$/.test(w))).toBe(true);
    expect((await repairBoth(img, 'leaks')).failed).toBe(true);
    const { ours } = await repairBoth(img, 'all');
    expect(qemuImg(tmp.dir, 'check', ours)).toMatch(/No errors were found on the image/);
  });

  it('rebuilds broken refcount structures with -r all', async () => {
    const img = image(['-o', 'cluster_size=4k'], '2M', 'write -P 1 0 300k', 'write -c -P 2 1M 4k');
    // Point the first reftable entry at an unaligned offset: the refcount block is lost.
    const o = await openQcow2(tmp.path(img));
    const reftable = (o.bs.opaque as Qcow2State).refcount.tableOffset;
    await o.close();
    patch(tmp.path(img), reftable + 7, [0x10]);
    const before = pick(qemuCheck(img));
    expect(before.corruptions).toBeGreaterThan(0);
    const r = await ourCheck(img, CHECK_FIX.LEAKS | CHECK_FIX.ERRORS);
    expect(r.corruptions).toBe(0);
    expect(r.checkErrors).toBe(0);
    expect(qemuImg(tmp.dir, 'check', img)).toMatch(/No errors were found on the image/);
    qemuImg(tmp.dir, 'convert', '-O', 'raw', img, `${img}.raw`);
    const raw = readFileSync(tmp.path(`${img}.raw`));
    expect([raw[0], raw[300 * 1024 - 1], raw[300 * 1024], raw[1024 * 1024]]).toEqual([1, 1, 0, 2]);
  });

  it('refuses to repair a read-only image', async () => {
    const img = image([], '1M');
    const o = await openQcow2(tmp.path(img));
    try {
      await expect(o.bs.drv.check!(o.bs, CHECK_FIX.LEAKS)).rejects.toThrow(/read-only/);
    } finally {
      await o.close();
    }
  });
});
