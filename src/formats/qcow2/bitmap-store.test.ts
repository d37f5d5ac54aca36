/**
 * Persistent bitmaps in qcow2 against QEMU: bitmaps we add and mark are seen
 * by QEMU with the same dirty areas (read back through qemu-nbd's dirty
 * bitmap export, QEMU's own view), bitmaps QEMU made load here with the same
 * areas, our writes keep QEMU-made autoload bitmaps up to date, the image is
 * IN_USE while open, checks clean after close, and removal, inconsistent
 * bitmaps and read-only opens behave as in QEMU.
 */
import { execFileSync } from 'node:child_process';
import { closeSync, openSync, readFileSync, writeSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { bdrvFindDirtyBitmap } from '../../core/dirty-bitmap.ts';
import { bdrvPdiscard, bdrvPwritev, bdrvPwriteZeroes, bdrvTruncate } from '../../core/io.ts';
import { PERM } from '../../core/types.ts';
import { runBitmapActions } from '../../core/img/bitmap.ts';
import type { Qcow2State } from './index.ts';
import { openQcow2, QEMU_IO, qemuImg, qemuIo, requireQemu, run, scratchDir } from './testing.ts';

const tmp = scratchDir();
beforeAll(() => requireQemu());
afterAll(() => tmp.cleanup());
let n = 0;

type Area = { offset: number; bytes: number };

/** QEMU's view of a bitmap's dirty areas: qemu-nbd exports it and qemu-img map reports dirty ranges as data: false. */
function qemuDirtyAreas(img: string, name: string): Area[] {
  const sock = tmp.path(`nbd-${n++}.sock`);
  execFileSync('qemu-nbd', ['--fork', '-r', '-B', name, '-k', sock, tmp.path(img)], { cwd: tmp.dir });
  const out = execFileSync('qemu-img', ['map', '--output=json', '--image-opts', `driver=nbd,server.type=unix,server.path=${sock},x-dirty-bitmap=qemu:dirty-bitmap:${name}`], { cwd: tmp.dir, encoding: 'utf8' });
  const map = JSON.parse(out) as Array<{ start: number; length: number; data: boolean }>;
  const areas: Area[] = [];
  for (const e of map) {
    if (e.data) continue;
    const last = areas[areas.length - 1];
    if (last && last.offset + last.bytes === e.start) last.bytes += e.length;
    else areas.push({ offset: e.start, bytes: e.length });
  }
  return areas;
}

function info(img: string): { bitmaps?: Array<{ name: string; granularity: number; flags: string[] }> } {
  const j = JSON.parse(qemuImg(tmp.dir, 'info', '-U', '--output=json', img)) as { 'format-specific': { data: { bitmaps?: Array<{ name: string; granularity: number; flags: string[] }> } } };
  return j['format-specific'].data;
}

function checkClean(img: string): void {
  const out = qemuImg(tmp.dir, 'check', img);
  expect(out).toContain('No errors were found on the image.');
  expect(out).not.toMatch(/leaked/);
}

function newImage(size = '1M', opts: string[] = []): string {
  const img = `b-${n++}.qcow2`;
  qemuImg(tmp.dir, 'create', '-q', '-f', 'qcow2', ...opts, img, size);
  return img;
}

async function ourWrites(img: string, f: (o: Awaited<ReturnType<typeof openQcow2>>) => Promise<void>, options: Record<string, unknown> = {}): Promise<void> {
  const o = await openQcow2(tmp.path(img), { readOnly: false, options });
  try {
    await f(o);
  } finally {
    await o.close();
  }
}

describe('qcow2 persistent bitmaps', () => {
  it('stores bitmaps we add and mark so that QEMU sees the same dirty areas as when it does the same', async () => {
    const ours = newImage('4M');
    const theirs = newImage('4M');
    // One session per step, as the qemu-img runs below.
    await ourWrites(ours, (o) => runBitmapActions(o.bs, 'b0', [{ op: 'add' }]));
    await ourWrites(ours, (o) => runBitmapActions(o.bs, 'fine', [{ op: 'add' }], { granularity: 4096 }));
    await ourWrites(ours, (o) => runBitmapActions(o.bs, 'off', [{ op: 'add' }, { op: 'disable' }]));
    await ourWrites(ours, async (o) => {
      await bdrvPwritev(o.child, 65536, 4096, new Uint8Array(4096).fill(1));
      await bdrvPwritev(o.child, 1000000, 70000, new Uint8Array(70000).fill(2));
      await bdrvPwriteZeroes(o.child, 2 << 20, 128 * 1024);
      await bdrvPwritev(o.child, (4 << 20) - 512, 512, new Uint8Array(512).fill(3));
    });
    qemuImg(tmp.dir, 'bitmap', '--add', theirs, 'b0');
    qemuImg(tmp.dir, 'bitmap', '--add', '-g', '4k', theirs, 'fine');
    qemuImg(tmp.dir, 'bitmap', '--add', '--disable', theirs, 'off');
    qemuIo(tmp.dir, theirs, 'write -P 1 65536 4096', 'write -P 2 1000000 70000', 'write -z 2M 128k', 'write -P 3 4193792 512');
    expect(info(ours).bitmaps).toEqual(info(theirs).bitmaps);
    checkClean(ours);
    for (const b of ['b0', 'fine', 'off']) expect(qemuDirtyAreas(ours, b)).toEqual(qemuDirtyAreas(theirs, b));
    expect(qemuDirtyAreas(ours, 'fine').length).toBeGreaterThan(0);
    expect(qemuDirtyAreas(ours, 'off')).toEqual([]);
  });

  it('loads QEMU-made bitmaps with QEMU\'s dirty areas, enabled or not, and readonly in a read-only open', async () => {
    const img = newImage('2M');
    qemuImg(tmp.dir, 'bitmap', '--add', '-g', '8k', img, 'a');
    qemuIo(tmp.dir, img, 'write 0 4k', 'write 300k 100k', 'write -z 1M 64k');
    qemuImg(tmp.dir, 'bitmap', '--add', '--disable', img, 'd');
    qemuIo(tmp.dir, img, 'write 1500k 4k');
    const o = await openQcow2(tmp.path(img));
    try {
      const a = bdrvFindDirtyBitmap(o.bs, 'a')!;
      const d = bdrvFindDirtyBitmap(o.bs, 'd')!;
      expect(a.granularity).toBe(8192);
      expect(a.enabled).toBe(true);
      expect(d.enabled).toBe(false);
      expect(a.readonly && d.readonly && a.persistent && !a.inconsistent).toBe(true);
      expect(a.dirtyAreas()).toEqual(qemuDirtyAreas(img, 'a'));
      expect(d.dirtyAreas()).toEqual([]);
    } finally {
      await o.close();
    }
    // A read-only open leaves the image as it was: not in use.
    expect(info(img).bitmaps!.map((b) => b.flags)).toEqual([['auto'], []]);
  });

  it('marks QEMU-made autoload bitmaps with our writes, zero writes and discards so QEMU sees them after close', async () => {
    const img = newImage('2M');
    const ref = newImage('2M');
    for (const i of [img, ref]) {
      qemuImg(tmp.dir, 'bitmap', '--add', i, 'auto');
      qemuImg(tmp.dir, 'bitmap', '--add', '-g', '512', '--disable', i, 'manual');
      qemuIo(tmp.dir, i, 'write 0 64k');
    }
    await ourWrites(img, async (o) => {
      // While open read-write, the image says the bitmaps are in use.
      expect(info(img).bitmaps!.map((b) => b.flags)).toEqual([['in-use', 'auto'], ['in-use']]);
      await bdrvPwritev(o.child, 700 * 1024, 1000, new Uint8Array(1000).fill(9));
      await bdrvPwriteZeroes(o.child, 1 << 20, 4096);
      await bdrvPdiscard(o.child, 1536 * 1024, 128 * 1024);
    }, { discard: 'unmap' });
    qemuIo(tmp.dir, ref, 'write -P 9 716800 1000', 'write -z 1M 4k');
    run(QEMU_IO, ['-f', 'qcow2', '-d', 'unmap', '-c', 'discard 1536k 128k', ref], tmp.dir);
    expect(info(img).bitmaps).toEqual(info(ref).bitmaps);
    checkClean(img);
    expect(qemuDirtyAreas(img, 'auto')).toEqual([{ offset: 0, bytes: 65536 }, { offset: 655360, bytes: 65536 }, { offset: 1 << 20, bytes: 65536 }, { offset: 1536 * 1024, bytes: 128 * 1024 }]);
    expect(qemuDirtyAreas(img, 'manual')).toEqual([]);
  });

  it('removes, clears, merges across images and keeps the image clean', async () => {
    const img = newImage('1M');
    const other = newImage('1M');
    qemuImg(tmp.dir, 'bitmap', '--add', '-g', '4k', other, 'src');
    qemuIo(tmp.dir, other, 'write 128k 8k');
    await ourWrites(img, async (o) => {
      await runBitmapActions(o.bs, 'x', [{ op: 'add' }]);
      await runBitmapActions(o.bs, 'y', [{ op: 'add' }]);
      await bdrvPwritev(o.child, 0, 512, new Uint8Array(512));
    });
    const src = await openQcow2(tmp.path(other));
    await ourWrites(img, async (o) => {
      await runBitmapActions(o.bs, 'x', [{ op: 'remove' }]);
      await runBitmapActions(o.bs, 'y', [{ op: 'clear' }, { op: 'merge', source: 'src' }], { sourceNode: src.bs });
      await expect(runBitmapActions(o.bs, 'x', [{ op: 'clear' }])).rejects.toThrow("Operation clear on bitmap x failed: Dirty bitmap 'x' not found");
    });
    await src.close();
    expect(info(img).bitmaps).toEqual([{ name: 'y', granularity: 65536, flags: ['auto'] }]);
    expect(qemuDirtyAreas(img, 'y')).toEqual([{ offset: 131072, bytes: 65536 }]);
    checkClean(img);
    await ourWrites(img, async (o) => runBitmapActions(o.bs, 'y', [{ op: 'remove' }]));
    expect(info(img).bitmaps).toBeUndefined();
    const hdr = readFileSync(tmp.path(img));
    // The bitmaps autoclear bit goes with the last bitmap.
    expect(hdr[95]! & 1).toBe(0);
    checkClean(img);
  });

  it('treats bitmaps left in use as inconsistent: kept untouched, refused for use, removable', async () => {
    const img = newImage('1M');
    qemuImg(tmp.dir, 'bitmap', '--add', img, 'stale');
    qemuImg(tmp.dir, 'bitmap', '--add', img, 'good');
    // Simulate a crash while open: set IN_USE in the directory entry of 'stale' (flags at +12 of the first entry).
    const o0 = await openQcow2(tmp.path(img));
    const dirOffset = (o0.bs.opaque as Qcow2State).ext.bitmaps!.directoryOffset;
    await o0.close();
    const fd = openSync(tmp.path(img), 'r+');
    writeSync(fd, Uint8Array.from([0, 0, 0, 3]), 0, 4, dirOffset + 12);
    closeSync(fd);
    expect(info(img).bitmaps!.map((b) => b.flags)).toEqual([['in-use', 'auto'], ['auto']]);
    await ourWrites(img, async (o) => {
      const stale = bdrvFindDirtyBitmap(o.bs, 'stale')!;
      expect(stale.inconsistent).toBe(true);
      await expect(runBitmapActions(o.bs, 'stale', [{ op: 'clear' }])).rejects.toThrow("Operation clear on bitmap stale failed: Bitmap 'stale' is inconsistent and cannot be used");
      await bdrvPwritev(o.child, 0, 512, new Uint8Array(512));
    });
    expect(info(img).bitmaps!.map((b) => b.flags)).toEqual([['in-use', 'auto'], ['auto']]);
    checkClean(img);
    await ourWrites(img, async (o) => runBitmapActions(o.bs, 'stale', [{ op: 'remove' }]));
    expect(info(img).bitmaps!.map((b) => b.name)).toEqual(['good']);
    expect(qemuDirtyAreas(img, 'good')).toEqual([{ offset: 0, bytes: 65536 }]);
    checkClean(img);
  });

  it('refuses what QEMU refuses when adding', async () => {
    const v2 = newImage('1M', ['-o', 'compat=0.10']);
    const img = newImage('1M');
    await ourWrites(v2, async (o) => {
      await expect(runBitmapActions(o.bs, 'b', [{ op: 'add' }])).rejects.toThrow(/^Operation add on bitmap b failed: Can't make bitmap 'b' persistent in '.*': Cannot store dirty bitmaps in qcow2 v2 files$/);
    });
    await ourWrites(img, async (o) => {
      await runBitmapActions(o.bs, 'b', [{ op: 'add' }]);
      await expect(runBitmapActions(o.bs, 'b', [{ op: 'add' }])).rejects.toThrow('Operation add on bitmap b failed: Bitmap already exists: b');
      await expect(runBitmapActions(o.bs, 'c', [{ op: 'add' }], { granularity: 1000 })).rejects.toThrow('Granularity must be power of 2 and at least 512');
      await expect(runBitmapActions(o.bs, 'x'.repeat(1024), [{ op: 'add' }])).rejects.toThrow('Name length exceeds maximum (1023 characters)');
      await expect(runBitmapActions(o.bs, '', [{ op: 'add' }])).rejects.toThrow('Bitmap name cannot be empty');
    });
    checkClean(img);
  });

  it('resizes bitmaps with the image', async () => {
    const img = newImage('1M');
    qemuImg(tmp.dir, 'bitmap', '--add', '-g', '4k', img, 'r');
    await ourWrites(img, async (o) => {
      await bdrvPwritev(o.child, 4096, 4096, new Uint8Array(4096));
      await bdrvTruncate(o.child, 2 << 20, false);
      await bdrvPwritev(o.child, (2 << 20) - 4096, 4096, new Uint8Array(4096));
    });
    checkClean(img);
    expect(qemuDirtyAreas(img, 'r')).toEqual([{ offset: 4096, bytes: 4096 }, { offset: (2 << 20) - 4096, bytes: 4096 }]);
  });

  it('stores bitmaps on a switch to read-only and marks them in use again on the way back', async () => {
    const img = newImage('1M');
    qemuImg(tmp.dir, 'bitmap', '--add', '-g', '4k', img, 'r');
    const o = await openQcow2(tmp.path(img), { readOnly: false });
    try {
      await bdrvPwritev(o.child, 0, 4096, new Uint8Array(4096).fill(1));
      // Only a reader may stay attached across the switch to read-only.
      const reader = o.graph.attachRoot(o.bs, { kind: 'job', name: 'test', description: () => 'reader' }, 'root', PERM.CONSISTENT_READ, PERM.ALL);
      await o.graph.detachChild(o.child);
      await o.graph.reopen(o.bs, { readOnly: true });
      expect(bdrvFindDirtyBitmap(o.bs, 'r')!.readonly).toBe(true);
      expect(info(img).bitmaps![0]!.flags).toEqual(['auto']);
      expect(qemuDirtyAreas(img, 'r')).toEqual([{ offset: 0, bytes: 4096 }]);
      await o.graph.reopen(o.bs, { readOnly: false });
      expect(bdrvFindDirtyBitmap(o.bs, 'r')!.readonly).toBe(false);
      expect(info(img).bitmaps![0]!.flags).toEqual(['in-use', 'auto']);
      const writer = o.graph.attachRoot(o.bs, { kind: 'job', name: 'test', description: () => 'writer' }, 'root', PERM.CONSISTENT_READ | PERM.WRITE, PERM.ALL);
      await o.graph.detachChild(reader);
      await bdrvPwritev(writer, 65536, 512, new Uint8Array(512).fill(2));
      // Dropping the last edge closes the node.
      await o.graph.detachChild(writer);
    } finally {
      await o.graph.closeAll();
    }
    expect(info(img).bitmaps![0]!.flags).toEqual(['auto']);
    expect(qemuDirtyAreas(img, 'r')).toEqual([{ offset: 0, bytes: 4096 }, { offset: 65536, bytes: 4096 }]);
    checkClean(img);
  });
});
