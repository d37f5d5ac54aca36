/**
 * Backing file changes and emptying (qcow2_change_backing_file,
 * qcow2_make_empty) on images QEMU made, checked with qemu-img: the header
 * reads back as written, check is clean, and content compares as expected.
 */
import { readFileSync, statSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { bdrvIsAllocated } from '../../core/io.ts';
import { EXT, parseExtensions, parseHeader, extensionsEnd } from './header.ts';
import { canRebuildEmpty } from './make-empty.ts';
import { state } from './state.ts';
import { openQcow2, qemuImg, qemuIo, requireQemu, scratchDir, qemuSame } from './testing.ts';

const tmp = scratchDir();
beforeAll(() => requireQemu());
afterAll(() => tmp.cleanup());
let n = 0;
const name = (tag: string): string => `${tag}-${n++}.qcow2`;

function info(img: string): Record<string, unknown> {
  return JSON.parse(qemuImg(tmp.dir, 'info', '--output=json', '-U', img)) as Record<string, unknown>;
}

/** qemu-img check finds nothing wrong; the backing file named in the image need not exist. */
function checkClean(img: string): void {
  const spec = JSON.stringify({ driver: 'qcow2', file: { driver: 'file', filename: tmp.path(img) }, backing: null });
  expect(qemuImg(tmp.dir, 'check', `json:${spec}`)).toMatch(/No errors were found on the image/);
}

/** Extension magics in the order the first cluster holds them. */
function extensionMagics(img: string): number[] {
  const first = readFileSync(tmp.path(img)).subarray(0, 65536);
  const h = parseHeader(first);
  const out: number[] = [];
  const dv = new DataView(first.buffer, first.byteOffset, first.byteLength);
  for (let off = h.headerLength; off < extensionsEnd(h);) {
    const magic = dv.getUint32(off);
    const len = dv.getUint32(off + 4);
    if (magic === 0) break;
    out.push(magic);
    off += 8 + ((len + 7) & ~7);
  }
  void parseExtensions;
  return out;
}

describe('qcow2 changeBackingFile', () => {
  it('writes the name and the backing-format extension, keeping the other extensions', async () => {
    const base = name('base');
    const top = name('top');
    qemuImg(tmp.dir, 'create', '-q', '-f', 'qcow2', base, '1M');
    qemuImg(tmp.dir, 'create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', top);
    const o = await openQcow2(tmp.path(top), { readOnly: false, options: { backing: null } });
    try {
      await o.bs.drv.changeBackingFile!(o.bs, 'other-name.raw', 'raw');
    } finally {
      await o.close();
    }
    const i = info(top);
    expect(i['backing-filename']).toBe('other-name.raw');
    expect(i['backing-filename-format']).toBe('raw');
    expect(extensionMagics(top)).toEqual([EXT.BACKING_FORMAT, EXT.FEATURE_TABLE]);
    checkClean(top);
  });

  it('removes the backing file and its format', async () => {
    const base = name('base');
    const top = name('top');
    qemuImg(tmp.dir, 'create', '-q', '-f', 'qcow2', base, '1M');
    qemuImg(tmp.dir, 'create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', top);
    const o = await openQcow2(tmp.path(top), { readOnly: false, options: { backing: null } });
    try {
      await o.bs.drv.changeBackingFile!(o.bs, '', undefined);
      expect(o.bs.backingFile).toBe('');
    } finally {
      await o.close();
    }
    const i = info(top);
    expect(i['backing-filename']).toBeUndefined();
    expect(extensionMagics(top)).toEqual([EXT.FEATURE_TABLE]);
    const h = parseHeader(readFileSync(tmp.path(top)).subarray(0, 65536));
    expect(h.backingFileOffset).toBe(0);
    expect(h.backingFileSize).toBe(0);
    checkClean(top);
  });

  it('stores names up to 1023 bytes and refuses longer ones', async () => {
    const top = name('long');
    qemuImg(tmp.dir, 'create', '-q', '-f', 'qcow2', top, '1M');
    const o = await openQcow2(tmp.path(top), { readOnly: false });
    const long = 'd/'.repeat(300) + 'x'.repeat(1023 - 600);
    try {
      await o.bs.drv.changeBackingFile!(o.bs, long, 'raw');
      await expect(o.bs.drv.changeBackingFile!(o.bs, `${long}y`, 'raw')).rejects.toMatchObject({ code: 'EINVAL' });
    } finally {
      await o.close();
    }
    expect(info(top)['backing-filename']).toBe(long);
    checkClean(top);
  });

  it('fails with ENOSPC and leaves the header alone when the name does not fit in the first cluster', async () => {
    const top = name('small');
    qemuImg(tmp.dir, 'create', '-q', '-f', 'qcow2', '-u', '-o', 'cluster_size=512', '-b', 'b.raw', '-F', 'raw', top, '1M');
    const before = readFileSync(tmp.path(top)).subarray(0, 512);
    const o = await openQcow2(tmp.path(top), { readOnly: false, options: { backing: null } });
    try {
      await expect(o.bs.drv.changeBackingFile!(o.bs, 'n'.repeat(400), 'raw')).rejects.toMatchObject({ code: 'ENOSPC' });
      expect(state(o.bs).imageBackingFile).toBe('b.raw');
    } finally {
      await o.close();
    }
    expect(Buffer.compare(readFileSync(tmp.path(top)).subarray(0, 512), before)).toBe(0);
    expect(info(top)['backing-filename']).toBe('b.raw');
  });

  it('refuses a backing file for an image whose raw data file must stand alone', async () => {
    const top = name('dfr');
    qemuImg(tmp.dir, 'create', '-q', '-f', 'qcow2', '-o', `data_file=${top}.data,data_file_raw=on`, top, '1M');
    const o = await openQcow2(tmp.path(top), { readOnly: false });
    try {
      await expect(o.bs.drv.changeBackingFile!(o.bs, 'b.raw', 'raw')).rejects.toMatchObject({ code: 'EINVAL' });
      // Removing one stays allowed.
      await o.bs.drv.changeBackingFile!(o.bs, '', undefined);
    } finally {
      await o.close();
    }
    checkClean(top);
  });
});

describe('qcow2 makeEmpty', () => {
  /** Makes base ← top with data and zeroes in the top; returns the names. */
  function chain(topOpts: string[] = [], writes = ['write -P 2 64k 64k', 'write -z 256k 64k', 'write -P 3 900k 4k']): { base: string; top: string; ref: string } {
    const base = name('base');
    const top = name('top');
    qemuImg(tmp.dir, 'create', '-q', '-f', 'qcow2', base, '1M');
    qemuIo(tmp.dir, base, 'write -P 1 0 1M');
    qemuImg(tmp.dir, 'create', '-q', '-f', 'qcow2', ...topOpts, '-b', base, '-F', 'qcow2', top);
    qemuIo(tmp.dir, top, ...writes);
    return { base, top, ref: base };
  }

  async function empty(top: string): Promise<boolean> {
    const o = await openQcow2(tmp.path(top), { readOnly: false });
    let fast: boolean;
    try {
      fast = canRebuildEmpty(state(o.bs));
      await o.bs.drv.makeEmpty!(o.bs);
      for (let off = 0; off < o.bs.totalBytes;) {
        const r = await bdrvIsAllocated(o.bs, off, o.bs.totalBytes - off);
        expect(r.allocated).toBe(false);
        off += r.pnum;
      }
    } finally {
      await o.close();
    }
    return fast;
  }

  it('rebuilds a plain v3 overlay in place and cuts the file', async () => {
    const { top, base } = chain();
    expect(await empty(top)).toBe(true);
    checkClean(top);
    expect(qemuSame(tmp.dir, top, base)).toBe(true);
    // Header, refcount table, refcount block and the L1 table are all that is left.
    expect(statSync(tmp.path(top)).size).toBe(4 * 65536);
    expect(qemuImg(tmp.dir, 'map', '--output=json', top)).not.toMatch(/"depth": 0/);
    // The image is fully usable afterwards.
    qemuIo(tmp.dir, top, 'write -P 7 0 4k');
    checkClean(top);
  });

  it('keeps a set dirty bit with lazy refcounts and clears its own', async () => {
    const { top, base } = chain(['-o', 'lazy_refcounts=on']);
    expect(await empty(top)).toBe(true);
    expect((info(top)['dirty-flag'] as boolean | undefined) ?? false).toBe(false);
    checkClean(top);
    expect(qemuSame(tmp.dir, top, base)).toBe(true);
  });

  it('discards instead when QEMU-made snapshots hold clusters, and the snapshot keeps its data', async () => {
    const { top, base } = chain();
    qemuImg(tmp.dir, 'snapshot', '-c', 's1', top);
    qemuIo(tmp.dir, top, 'write -P 4 0 64k', 'write -z 64k 64k');
    qemuImg(tmp.dir, 'convert', '-l', 's1', '-O', 'raw', top, `${top}.s1.raw`);
    expect(await empty(top)).toBe(false);
    checkClean(top);
    expect(qemuSame(tmp.dir, top, base)).toBe(true);
    qemuImg(tmp.dir, 'convert', '-l', 's1', '-O', 'raw', top, `${top}.s1.after.raw`);
    expect(readFileSync(tmp.path(`${top}.s1.after.raw`)).equals(readFileSync(tmp.path(`${top}.s1.raw`)))).toBe(true);
  });

  it('empties v2 images, extended L2 images with partial subclusters, and compressed clusters', async () => {
    const cases: Array<[string[], string[], boolean]> = [
      [['-o', 'compat=0.10'], ['write -P 2 64k 64k', 'write -P 3 900k 4k'], false],
      [['-o', 'extended_l2=on'], ['write -P 2 4k 8k', 'write -z 70k 6k', 'write -P 3 300k 2k'], true],
      [[], ['write -c -P 2 0 64k', 'write -c -P 3 256k 64k', 'write -P 4 512k 4k'], true],
    ];
    for (const [opts, writes, fast] of cases) {
      const { top, base } = chain(opts, writes);
      expect(await empty(top)).toBe(fast);
      checkClean(top);
      expect(qemuSame(tmp.dir, top, base)).toBe(true);
    }
  });

  it('discards when the L1 table does not fit in one refcount block with the header and tables', async () => {
    const img = name('bigl1');
    qemuImg(tmp.dir, 'create', '-q', '-f', 'qcow2', '-o', 'cluster_size=512', img, '1G');
    qemuIo(tmp.dir, img, 'write -P 2 0 300k', 'write -P 3 900M 4k');
    expect(await empty(img)).toBe(false);
    checkClean(img);
    expect(qemuImg(tmp.dir, 'map', '--output=json', img)).not.toMatch(/"data": true/);
  });
});
