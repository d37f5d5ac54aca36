/**
 * Open-mode behaviour of the qcow2 driver: read-write opens, feature bits
 * (dirty, autoclear, bitmaps in use while open), writes refused until the write path exists,
 * format-specific info against qemu-img info, the implicit-open gate, and
 * block-status details.
 */
import { spawnSync } from 'node:child_process';
import { closeSync, openSync, readFileSync, writeSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { isBlockError } from '../../core/errors.ts';
import { Graph } from '../../core/graph.ts';
import { bdrvBlockStatus, bdrvPdiscard, bdrvPread, bdrvPwritev, bdrvPwriteZeroes, bdrvTruncate } from '../../core/io.ts';
import { BLOCK, PERM } from '../../core/types.ts';
import { fileDriver } from '../../protocols/file.ts';
import { rawDriver } from '../raw.ts';
import type { Qcow2State } from './index.ts';
import { qcow2Driver } from './index.ts';
import { newGraph, openQcow2, qemuImg, qemuIo, requireQemu, scratchDir } from './testing.ts';

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

function be64(v: bigint): number[] {
  const out: number[] = [];
  for (let i = 7; i >= 0; i--) out.push(Number((v >> BigInt(8 * i)) & 0xffn));
  return out;
}

function image(args: string[] = [], size = '2M'): string {
  const img = `d-${n++}.qcow2`;
  qemuImg(tmp.dir, 'create', '-f', 'qcow2', ...args, img, size);
  qemuIo(tmp.dir, img, 'write -P 0x42 0 64k');
  return img;
}

async function openError(img: string, readOnly: boolean): Promise<{ code: string; message: string } | null> {
  try {
    const o = await openQcow2(tmp.path(img), { readOnly });
    await o.close();
    return null;
  } catch (e) {
    if (!isBlockError(e)) throw e;
    return { code: e.code, message: e.message };
  }
}

describe('read-write opens', () => {
  it('opens a healthy image read-write and writes through every request kind', async () => {
    const img = image();
    const o = await openQcow2(tmp.path(img), { readOnly: false, options: { discard: 'unmap' } });
    try {
      expect((await bdrvPread(o.child, 0, 2))[1]).toBe(0x42);
      await bdrvPwritev(o.child, 0, 512, new Uint8Array(512).fill(7));
      await bdrvPwriteZeroes(o.child, 65536, 65536);
      await bdrvTruncate(o.child, 4 << 20, false);
      await bdrvPdiscard(o.child, 3 << 20, 65536);
      expect((await bdrvPread(o.child, 0, 2))[1]).toBe(7);
      expect((await bdrvPread(o.child, 512, 2))[1]).toBe(0x42);
    } finally {
      await o.close();
    }
    expect(qemuImg(tmp.dir, 'check', '-f', 'qcow2', img)).toMatch(/No errors were found on the image/);
    qemuImg(tmp.dir, 'convert', '-f', 'qcow2', '-O', 'raw', img, `${img}.raw`);
    const raw = readFileSync(tmp.path(`${img}.raw`));
    expect(raw.length).toBe(4 << 20);
    expect([raw[0], raw[511], raw[512], raw[65535], raw[65536]]).toEqual([7, 7, 0x42, 0x42, 0]);
  });

  it('repairs a dirty image on a read-write open and clears the dirty bit', async () => {
    const img = image(['-o', 'lazy_refcounts=on']);
    patch(tmp.path(img), 72, be64(1n));
    // Lose the refcount of the data cluster: the repair must restore it.
    const o0 = await openQcow2(tmp.path(img));
    const s0 = o0.bs.opaque as Qcow2State;
    const block = s0.refcount.tableEntry(0);
    await o0.close();
    const buf = readFileSync(tmp.path(img));
    const dataCluster = Number(JSON.parse(qemuImg(tmp.dir, 'map', '-f', 'qcow2', '--output=json', img))[0].offset) / 65536;
    patch(tmp.path(img), block + 2 * dataCluster, [0, 0]);
    expect(buf.readBigUInt64BE(72)).toBe(1n);
    expect(await openError(img, true)).toBeNull();
    const o = await openQcow2(tmp.path(img), { readOnly: false });
    expect((await o.bs.drv.getInfo!(o.bs)).isDirty).toBe(false);
    await o.close();
    expect(readFileSync(tmp.path(img)).readBigUInt64BE(72)).toBe(0n);
    expect(qemuImg(tmp.dir, 'check', '-f', 'qcow2', img)).toMatch(/No errors were found on the image/);
  });

  it('clears unknown autoclear bits on a read-write open only, keeping the image valid', async () => {
    const img = image();
    patch(tmp.path(img), 88, be64(1n << 40n));
    const ro = await openQcow2(tmp.path(img));
    await ro.close();
    expect(readFileSync(tmp.path(img)).readBigUInt64BE(88)).toBe(1n << 40n);
    const rw = await openQcow2(tmp.path(img), { readOnly: false });
    await rw.close();
    expect(readFileSync(tmp.path(img)).readBigUInt64BE(88)).toBe(0n);
    qemuImg(tmp.dir, 'check', '-f', 'qcow2', img);
    expect(qemuImg(tmp.dir, 'convert', '-f', 'qcow2', '-O', 'raw', img, `${img}.raw`)).toBe('');
    expect(readFileSync(tmp.path(`${img}.raw`))[0]).toBe(0x42);
  });

  it('keeps unknown header extensions and fields when it rewrites the header', async () => {
    const img = image();
    qemuImg(tmp.dir, 'rebase', '-u', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', img);
    const o = await openQcow2(tmp.path(img), { options: { backing: null } });
    const s = o.bs.opaque as Qcow2State;
    s.ext.unknown.push({ magic: 0x12345678, data: Uint8Array.from([1, 2, 3]) });
    s.header.unknownHeaderFields = Uint8Array.from([9, 9, 9, 9, 9, 9, 9, 9]);
    await o.close();
    // Serialise through the same code path the open uses, into the file, and have QEMU read it.
    const { serializeHeader } = await import('./header.ts');
    const buf = serializeHeader({ header: s.header, extensions: s.ext, backingFile: s.imageBackingFile!, writeDataFile: false });
    patch(tmp.path(img), 0, [...buf]);
    const i = JSON.parse(qemuImg(tmp.dir, 'info', '-f', 'qcow2', '--output=json', img)) as Record<string, unknown>;
    expect(i['backing-filename']).toBe('base.qcow2');
    expect(i['backing-filename-format']).toBe('qcow2');
    const o2 = await openQcow2(tmp.path(img), { options: { backing: null } });
    const s2 = o2.bs.opaque as Qcow2State;
    expect(s2.ext.unknown).toEqual([{ magic: 0x12345678, data: Uint8Array.from([1, 2, 3]) }]);
    expect([...s2.header.unknownHeaderFields]).toEqual([9, 9, 9, 9, 9, 9, 9, 9]);
    await o2.close();
  });

  it('opens images with persistent bitmaps read-write, marking them in use until close', async () => {
    const img = image();
    qemuImg(tmp.dir, 'bitmap', '--add', img, 'b0');
    expect(await openError(img, true)).toBeNull();
    const flags = (): unknown => (JSON.parse(qemuImg(tmp.dir, 'info', '-U', '--output=json', img)) as { 'format-specific': { data: { bitmaps: Array<{ flags: string[] }> } } })['format-specific'].data.bitmaps[0]!.flags;
    const o = await openQcow2(tmp.path(img), { readOnly: false });
    try {
      expect(o.bs.dirtyBitmaps.map((b) => b.name)).toEqual(['b0']);
      expect(flags()).toEqual(['in-use', 'auto']);
    } finally {
      await o.close();
    }
    expect(flags()).toEqual(['auto']);
  });
});

describe('info', () => {
  const variants: string[][] = [
    [],
    ['-o', 'compat=0.10'],
    ['-o', 'extended_l2=on,lazy_refcounts=on,refcount_bits=8'],
    ['-o', 'compression_type=zstd'],
    ['-o', 'data_file=INFO.data'],
    ['-o', 'data_file=INFORAW.data,data_file_raw=on'],
    ['BITMAPS'],
  ];
  for (const v of variants) {
    it(`matches qemu-img info's format-specific data for ${v.join(' ') || 'defaults'}`, async () => {
      const img = `i-${n++}.qcow2`;
      const args = v.filter((a) => a !== 'BITMAPS').map((a) => a.replace('INFO', img).replace('INFORAW', img));
      qemuImg(tmp.dir, 'create', '-f', 'qcow2', ...args, img, '3M');
      if (v.includes('BITMAPS')) {
        qemuImg(tmp.dir, 'bitmap', '--add', img, 'b0');
        qemuImg(tmp.dir, 'bitmap', '--add', '-g', '128k', '--disable', img, 'second');
      }
      const q = JSON.parse(qemuImg(tmp.dir, 'info', '-f', 'qcow2', '--output=json', img)) as { 'virtual-size': number; 'cluster-size': number; 'format-specific': unknown; 'dirty-flag': boolean };
      const o = await openQcow2(tmp.path(img));
      try {
        expect(await o.bs.drv.getSpecificInfo!(o.bs)).toEqual(q['format-specific']);
        const bdi = await o.bs.drv.getInfo!(o.bs);
        expect(bdi.clusterSize).toBe(q['cluster-size']);
        expect(bdi.isDirty).toBe(q['dirty-flag']);
        expect(o.bs.totalBytes).toBe(q['virtual-size']);
      } finally {
        await o.close();
      }
    });
  }
});

describe('block status', () => {
  it('marks compressed clusters COMPRESSED without a host offset, and data clusters with one', async () => {
    const src = image([], '1M');
    const img = `bs-${n++}.qcow2`;
    qemuImg(tmp.dir, 'convert', '-c', '-O', 'qcow2', src, img);
    const o = await openQcow2(tmp.path(img));
    try {
      const st = await bdrvBlockStatus(o.bs, true, 0, 1 << 20);
      expect(st.status & (BLOCK.DATA | BLOCK.COMPRESSED | BLOCK.OFFSET_VALID)).toBe(BLOCK.DATA | BLOCK.COMPRESSED);
      expect(st.pnum).toBe(65536);
    } finally {
      await o.close();
    }
    const p = await openQcow2(tmp.path(src));
    try {
      const st = await bdrvBlockStatus(p.bs, true, 4096, 1 << 20);
      expect(st.status & (BLOCK.DATA | BLOCK.OFFSET_VALID | BLOCK.ALLOCATED)).toBe(BLOCK.DATA | BLOCK.OFFSET_VALID | BLOCK.ALLOCATED);
      expect(st.file).toBe(p.bs.file!.bs);
      expect(st.pnum).toBe(65536 - 4096);
      expect(st.map! % 65536).toBe(4096);
    } finally {
      await p.close();
    }
  });

  it('answers for the data file node with an external data file', async () => {
    const img = `bdf-${n++}.qcow2`;
    qemuImg(tmp.dir, 'create', '-f', 'qcow2', '-o', `data_file=${img}.data`, img, '1M');
    qemuIo(tmp.dir, img, 'write -P 1 64k 64k');
    const o = await openQcow2(tmp.path(img));
    try {
      const st = await bdrvBlockStatus(o.bs, true, 65536, 65536);
      expect(st.map).toBe(65536);
      expect(st.file?.filename).toBe(tmp.path(`${img}.data`));
    } finally {
      await o.close();
    }
  });
});

describe('names inside images go through the gate', () => {
  it('refuses protocol-prefixed and json: backing names', async () => {
    for (const bad of ['nbd://localhost/x', 'json:{"driver":"file","filename":"/etc/passwd"}']) {
      const img = `g-${n++}.qcow2`;
      qemuImg(tmp.dir, 'create', '-f', 'qcow2', '-u', '-b', bad, '-F', 'raw', img, '1M');
      const e = await openError(img, true);
      expect(e?.code).toBe('EACCES');
      expect(e?.message).toMatch(/only plain file names are allowed/);
    }
  });

  it('refuses everything with the default deny-all gate', async () => {
    const base = image([], '1M');
    const img = `g-${n++}.qcow2`;
    qemuImg(tmp.dir, 'create', '-f', 'qcow2', '-b', base, '-F', 'qcow2', img, '1M');
    const graph = new Graph({ drivers: [fileDriver, rawDriver, qcow2Driver] });
    await expect(openQcow2(tmp.path(img), { graph })).rejects.toThrow(/is not allowed/);
    await graph.closeAll();
  });

  it('resolves backing names relative to the image, not the working directory', async () => {
    qemuImg(tmp.dir, 'create', '-f', 'qcow2', 'sub-base.qcow2', '1M');
    qemuIo(tmp.dir, 'sub-base.qcow2', 'write -P 0x77 0 4k');
    const img = `g-${n++}.qcow2`;
    qemuImg(tmp.dir, 'create', '-f', 'qcow2', '-b', 'sub-base.qcow2', '-F', 'qcow2', img, '1M');
    const o = await openQcow2(tmp.path(img), { graph: newGraph() });
    try {
      expect(o.bs.backingFile).toBe('sub-base.qcow2');
      expect(o.bs.backingFormat).toBe('qcow2');
      expect(o.bs.backing?.bs.filename).toBe(tmp.path('sub-base.qcow2'));
      expect((await bdrvPread(o.child, 0, 1))[0]).toBe(0x77);
    } finally {
      await o.close();
    }
  });
});

describe('runtime options', () => {
  it('accepts QEMU cache options and rejects bad combinations with QEMU messages', async () => {
    const img = image([], '64G');
    const o = await openQcow2(tmp.path(img), { options: { 'l2-cache-size': '1M', 'refcount-cache-size': '256k', 'cache-clean-interval': 0 } });
    const s = o.bs.opaque as Qcow2State;
    // 1 MiB cannot cover the 8 MiB of L2 tables of 64 GiB, so entries shrink to 4 KiB slices (read_cache_sizes).
    expect(s.l2Cache.entrySize).toBe(4096);
    expect(s.l2Cache.maxEntries).toBe(256);
    expect(s.refcountCache.maxEntries).toBe(4);
    await o.close();
    await expect(openQcow2(tmp.path(img), { options: { 'cache-size': '1M', 'l2-cache-size': '512k', 'refcount-cache-size': '512k' } })).rejects.toThrow('cache-size, l2-cache-size and refcount-cache-size may not be set at the same time');
    await expect(openQcow2(tmp.path(img), { options: { 'l2-cache-entry-size': '300' } })).rejects.toThrow('L2 cache entry size must be a power of two between 512 and the cluster size (65536)');
    await expect(openQcow2(tmp.path(img), { options: { 'overlap-check': 'bogus' } })).rejects.toThrow("Unsupported value 'bogus' for qcow2 option 'overlap-check'");
  });

  it('reads correctly with tiny L2 caches and small slices', async () => {
    const img = `tiny-${n++}.qcow2`;
    qemuImg(tmp.dir, 'create', '-f', 'qcow2', '-o', 'cluster_size=4k', img, '8M');
    qemuIo(tmp.dir, img, 'write -P 0x10 0 3M', 'write -P 0x20 5M 2M');
    const o = await openQcow2(tmp.path(img), { options: { 'l2-cache-size': '8k', 'l2-cache-entry-size': '1k' } });
    try {
      const all = new Uint8Array(8 << 20);
      await bdrvPread(o.child, 0, 8 << 20).then((b) => all.set(b));
      expect(all[3 * 1024 * 1024 - 1]).toBe(0x10);
      expect(all[3 * 1024 * 1024]).toBe(0);
      expect(all[6 * 1024 * 1024]).toBe(0x20);
      expect((o.bs.opaque as Qcow2State).l2Cache.size).toBeLessThanOrEqual(8);
    } finally {
      await o.close();
    }
  });
});

describe('reopen and cache invalidation', () => {
  it('reopens read-write only where a read-write open would succeed, and resizes caches', async () => {
    const img = image([], '64G');
    const o = await openQcow2(tmp.path(img));
    try {
      await o.graph.reopen(o.bs, { options: { 'l2-cache-size': '2M', 'l2-cache-entry-size': '8k' } });
      const s = o.bs.opaque as Qcow2State;
      expect([s.l2Cache.entrySize, s.l2Cache.maxEntries]).toEqual([8192, 256]);
      expect((await bdrvPread(o.child, 0, 1))[0]).toBe(0x42);
      await expect(o.graph.reopen(o.bs, { options: { 'l2-cache-entry-size': '100' } })).rejects.toThrow(/L2 cache entry size/);
      await expect(o.graph.reopen(o.bs, { options: { bogus: 1 } })).rejects.toThrow(/does not support the option 'bogus'/);
    } finally {
      await o.close();
    }
  });

  it('repairs a dirty lazy-refcounts image when a reopen makes it writable, before any allocation', async () => {
    // A crash after a lazy-refcounts write leaves the data cluster referenced with refcount 0.
    const dirty = `dirty-${n++}.qcow2`;
    qemuImg(tmp.dir, 'create', '-f', 'qcow2', '-o', 'lazy_refcounts=on', dirty, '1M');
    spawnSync('/usr/bin/qemu-io', ['-c', 'write -P 0x11 0 64k', '-c', 'abort', dirty], { cwd: tmp.dir });
    expect(spawnSync('/usr/bin/qemu-img', ['check', dirty], { cwd: tmp.dir }).status).not.toBe(0);
    const d = await openQcow2(tmp.path(dirty));
    try {
      await d.graph.reopen(d.bs, { readOnly: false });
      expect(d.bs.readOnly).toBe(false);
      const w = d.graph.attachRoot(d.bs, { kind: 'job', name: 'w', description: () => 'writer' }, 'w', PERM.CONSISTENT_READ | PERM.WRITE, PERM.ALL);
      // Without the repair this allocation would take the cluster guest offset 0 lives in.
      await bdrvPwritev(w, 65536, 65536, new Uint8Array(65536).fill(0x22));
      expect((await bdrvPread(d.child, 0, 65536)).every((b) => b === 0x11)).toBe(true);
      expect((await bdrvPread(d.child, 65536, 65536)).every((b) => b === 0x22)).toBe(true);
      await d.graph.detachChild(w);
    } finally {
      await d.close();
    }
    const chk = spawnSync('/usr/bin/qemu-img', ['check', dirty], { cwd: tmp.dir, encoding: 'utf8' });
    expect(chk.stdout).toContain('No errors were found on the image.');
    expect(chk.status).toBe(0);
  });

  it('sees changes another writer made after invalidateCache', async () => {
    const img = image([], '1M');
    const o = await openQcow2(tmp.path(img));
    try {
      expect((await bdrvPread(o.child, 512 * 1024, 1))[0]).toBe(0);
      qemuIo(tmp.dir, img, 'write -P 0x66 512k 64k');
      qemuImg(tmp.dir, 'resize', '-f', 'qcow2', img, '3M');
      await o.bs.drv.invalidateCache!(o.bs);
      expect(o.bs.totalBytes).toBe(3 * 1024 * 1024);
      expect((await bdrvPread(o.child, 512 * 1024, 1))[0]).toBe(0x66);
    } finally {
      await o.close();
    }
  });
});

describe('more extension cases', () => {
  it('takes an explicit data-file option over the name in the image', async () => {
    const img = `edf-${n++}.qcow2`;
    qemuImg(tmp.dir, 'create', '-f', 'qcow2', '-o', `data_file=${img}.data`, img, '1M');
    qemuIo(tmp.dir, img, 'write -P 0x99 0 4k');
    qemuImg(tmp.dir, 'convert', '-f', 'raw', '-O', 'raw', `${img}.data`, `${img}.copy`);
    const o = await openQcow2(tmp.path(img), { options: { 'data-file': { driver: 'file', filename: tmp.path(`${img}.copy`) } } });
    try {
      expect((await bdrvPread(o.child, 0, 1))[0]).toBe(0x99);
      expect((o.bs.opaque as Qcow2State).dataFile.bs.filename).toBe(tmp.path(`${img}.copy`));
    } finally {
      await o.close();
    }
    const plain = image([], '1M');
    await expect(openQcow2(tmp.path(plain), { options: { 'data-file': { driver: 'file', filename: tmp.path(`${img}.copy`) } } })).rejects.toThrow("'data-file' can only be set for images with an external data file");
  });

  it('reads the backing format extension of v2 images', async () => {
    const base = image([], '1M');
    const img = `v2b-${n++}.qcow2`;
    qemuImg(tmp.dir, 'create', '-f', 'qcow2', '-o', 'compat=0.10', '-b', base, '-F', 'qcow2', img, '1M');
    const o = await openQcow2(tmp.path(img));
    try {
      expect(o.bs.backingFormat).toBe('qcow2');
      expect((await bdrvPread(o.child, 0, 1))[0]).toBe(0x42);
    } finally {
      await o.close();
    }
  });
});
