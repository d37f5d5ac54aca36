/**
 * qcow2 amend (QEMU's qcow2_amend_options) on images QEMU made: every
 * option, every refcount width conversion with data and internal snapshots,
 * and the refusals with QEMU's messages. After each change `qemu-img check`
 * must be clean and `qemu-img compare` must find the active layer (and each
 * snapshot) unchanged against a copy taken before.
 */
import { copyFileSync, readFileSync, writeFileSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { amendImage } from '../../core/img/amend.ts';
import { HintedError } from '../../core/img/create.ts';
import { openQcow2, qemuImg, qemuIo, requireQemu, scratchDir, qemuSame } from './testing.ts';

const tmp = scratchDir();
beforeAll(() => requireQemu());
afterAll(() => tmp.cleanup());
let n = 0;
const WIDTHS = [1, 2, 4, 8, 16, 32, 64];

function info(img: string): Record<string, unknown> {
  return JSON.parse(qemuImg(tmp.dir, 'info', '--output=json', '-U', img)) as Record<string, unknown>;
}

function specific(img: string): Record<string, unknown> {
  return (info(img)['format-specific'] as { data: Record<string, unknown> }).data;
}

function checkClean(img: string): void {
  expect(qemuImg(tmp.dir, 'check', img)).toMatch(/No errors were found on the image/);
}

/** Guest bytes of snapshot `sn` of `img`. */
function snapshotBytes(img: string, sn: string): Buffer {
  const out = `${img}.${sn}.${n++}.raw`;
  qemuImg(tmp.dir, 'convert', '-U', '-l', sn, '-O', 'raw', img, out);
  return readFileSync(tmp.path(out));
}

/**
 * A 4 MiB image with data, zero clusters, compressed clusters (several share
 * a host cluster, so its refcount exceeds 1) and, optionally, two snapshots
 * between writes.
 */
function dataImage(opts: string[], snapshots: boolean, compressed = true): string {
  const img = `a${n++}.qcow2`;
  qemuImg(tmp.dir, 'create', '-q', '-f', 'qcow2', ...opts, img, '4M');
  qemuIo(tmp.dir, img, 'write -P 1 0 1M', 'write -z 1M 128k', compressed ? 'write -c -P 2 2M 64k' : 'write -P 2 2M 64k', 'write -P 3 3M 4k');
  if (snapshots) {
    qemuImg(tmp.dir, 'snapshot', '-c', 's1', img);
    qemuIo(tmp.dir, img, 'write -P 4 64k 64k', 'write -z 0 64k', 'write -P 5 3584k 128k');
    qemuImg(tmp.dir, 'snapshot', '-c', 's2', img);
    qemuIo(tmp.dir, img, 'write -P 6 512k 8k');
  }
  return img;
}

/** Amends `img` with `-o` text through the engine, as qblock-img amend does. */
async function amend(img: string, options: string, force = false): Promise<void> {
  const o = await openQcow2(tmp.path(img), { readOnly: false });
  try {
    await amendImage(o.bs, options, force);
  } finally {
    await o.close();
  }
}

/** Runs `fn` on a copy and checks that the copy is clean, reads the same and keeps every snapshot's data. */
async function preserving(img: string, snapshots: string[], fn: (copy: string) => Promise<void>): Promise<string> {
  const copy = `${img}.c${n++}.qcow2`;
  copyFileSync(tmp.path(img), tmp.path(copy));
  await fn(copy);
  checkClean(copy);
  expect(qemuSame(tmp.dir, img, copy)).toBe(true);
  for (const sn of snapshots) expect(snapshotBytes(copy, sn).equals(snapshotBytes(img, sn))).toBe(true);
  return copy;
}

describe('qcow2 amend: refcount_bits', () => {
  for (const snapshots of [false, true]) {
    it(`converts from 16 bits to every width and back, ${snapshots ? 'with QEMU-made snapshots' : 'with data'}`, async () => {
      const img = dataImage([], snapshots);
      const sns = snapshots ? ['s1', 's2'] : [];
      for (const w of WIDTHS) {
        if (snapshots && w === 1) {
          // Clusters shared with snapshots have refcounts of 2 and more, which one bit cannot hold.
          const copy = `${img}.one.qcow2`;
          copyFileSync(tmp.path(img), tmp.path(copy));
          await expect(amend(copy, 'refcount_bits=1')).rejects.toThrow(/^Cannot decrease refcount entry width to 1 bits: Cluster at offset 0x[0-9a-f]+ has a refcount of \d+$/);
          checkClean(copy);
          expect(specific(copy)['refcount-bits']).toBe(16);
          continue;
        }
        const copy = await preserving(img, sns, (c) => amend(c, `refcount_bits=${w}`));
        expect(specific(copy)['refcount-bits']).toBe(w);
        // And back to 16, from the new width.
        const back = await preserving(copy, sns, (c) => amend(c, 'refcount_bits=16'));
        expect(specific(back)['refcount-bits']).toBe(16);
      }
    });
  }

  it('converts between every pair of widths from images QEMU created with them', async () => {
    for (const from of WIDTHS) {
      // No compressed clusters: with 4k clusters many of them share a host cluster, which 1-bit refcounts cannot count.
      const img = dataImage(['-o', `refcount_bits=${from},cluster_size=4k`], false, false);
      for (const to of WIDTHS) {
        if (to === from) continue;
        const copy = await preserving(img, [], (c) => amend(c, `refcount_bits=${to}`));
        expect(specific(copy)['refcount-bits']).toBe(to);
        // The image stays writable in its new width.
        qemuIo(tmp.dir, copy, 'write -P 9 2M 128k');
        checkClean(copy);
      }
    }
  }, 120_000);

  it('grows the refcount structures when narrow refcount blocks cover few clusters', async () => {
    const img = `wide${n++}.qcow2`;
    qemuImg(tmp.dir, 'create', '-q', '-f', 'qcow2', '-o', 'cluster_size=512', img, '8M');
    qemuIo(tmp.dir, img, 'write -P 1 0 6M');
    const copy = await preserving(img, [], (c) => amend(c, 'refcount_bits=64'));
    expect(specific(copy)['refcount-bits']).toBe(64);
  });
});

describe('qcow2 amend: compat', () => {
  it('downgrades to 0.10, expanding zero clusters, and upgrades back', async () => {
    const img = dataImage([], true);
    const v2 = await preserving(img, ['s1', 's2'], (c) => amend(c, 'compat=0.10'));
    expect(specific(v2).compat).toBe('0.10');
    // v2 has no zero flag: nothing may read as a zero cluster any more.
    expect(qemuImg(tmp.dir, 'map', '--output=json', v2)).not.toMatch(/"zero": true, "data": false, "offset"/);
    const v3 = await preserving(v2, ['s1', 's2'], (c) => amend(c, 'compat=1.1'));
    expect(specific(v3).compat).toBe('1.1');
  });

  it('upgrades a v2 image whose snapshot entries have no extra data, rewriting the table in the v3 layout', async () => {
    const img = `old${n++}.qcow2`;
    qemuImg(tmp.dir, 'create', '-q', '-f', 'qcow2', '-o', 'compat=0.10', img, '1M');
    qemuIo(tmp.dir, img, 'write -P 1 0 64k');
    qemuImg(tmp.dir, 'snapshot', '-c', 'old', img);
    qemuIo(tmp.dir, img, 'write -P 2 0 64k');
    // Strip the entry's extra data, as programs older than QEMU 1.1 wrote v2 snapshots.
    const bytes = readFileSync(tmp.path(img));
    const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    const at = Number(dv.getBigUint64(64));
    const extra = dv.getUint32(at + 36);
    const idLen = dv.getUint16(at + 12);
    const nameLen = dv.getUint16(at + 14);
    const strings = Buffer.from(bytes.subarray(at + 40 + extra, at + 40 + extra + idLen + nameLen));
    bytes.fill(0, at + 40, at + 40 + extra + idLen + nameLen);
    strings.copy(bytes, at + 40);
    dv.setUint32(at + 36, 0);
    writeFileSync(tmp.path(img), bytes);
    checkClean(img);
    const before = snapshotBytes(img, 'old');
    const copy = await preserving(img, ['old'], (c) => amend(c, 'compat=1.1'));
    expect(specific(copy).compat).toBe('1.1');
    expect(snapshotBytes(copy, 'old').equals(before)).toBe(true);
    expect(qemuImg(tmp.dir, 'snapshot', '-l', copy)).toMatch(/\bold\b/);
  });

  it('turns zero clusters over a backing file into zeroed data clusters', async () => {
    const base = `base${n++}.qcow2`;
    const top = `top${n++}.qcow2`;
    qemuImg(tmp.dir, 'create', '-q', '-f', 'qcow2', base, '1M');
    qemuIo(tmp.dir, base, 'write -P 7 0 1M');
    qemuImg(tmp.dir, 'create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', top);
    qemuIo(tmp.dir, top, 'write -z 0 64k', 'write -P 8 64k 64k', 'write -z 512k 128k');
    const copy = await preserving(top, [], (c) => amend(c, 'compat=0.10'));
    expect(specific(copy).compat).toBe('0.10');
    const raw = `${copy}.raw`;
    qemuImg(tmp.dir, 'convert', '-O', 'raw', copy, raw);
    const bytes = readFileSync(tmp.path(raw));
    expect(bytes.subarray(0, 65536).every((b) => b === 0)).toBe(true);
    expect(bytes.subarray(512 * 1024, 640 * 1024).every((b) => b === 0)).toBe(true);
  });

  it('drops lazy refcounts and a zlib-switchable zstd type on the way down', async () => {
    const lazy = dataImage(['-o', 'lazy_refcounts=on'], false);
    const a = await preserving(lazy, [], (c) => amend(c, 'compat=0.10'));
    expect(specific(a).compat).toBe('0.10');
    const zstd = `z${n++}.qcow2`;
    qemuImg(tmp.dir, 'create', '-q', '-f', 'qcow2', '-o', 'compression_type=zstd', zstd, '1M');
    qemuIo(tmp.dir, zstd, 'write -P 1 0 64k');
    const b = await preserving(zstd, [], (c) => amend(c, 'compat=0.10'));
    expect(specific(b)['compression-type']).toBe('zlib');
  });

  it('refuses what v2 cannot hold, with QEMU messages, and changes nothing', async () => {
    const cases: Array<[string[], string, string]> = [
      [['-o', 'extended_l2=on'], 'compat=0.10', 'Cannot downgrade an image with incompatible features 0x10 set'],
      [['-o', 'refcount_bits=8'], 'compat=0.10', 'compat=0.10 requires refcount_bits=16'],
      [['-o', 'data_file=df.data'], 'compat=0.10', 'Cannot downgrade an image with a data file'],
      [[], 'compat=0.10,refcount_bits=8', 'Refcount widths other than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)'],
      [[], 'compat=0.10,lazy_refcounts=on', 'Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)'],
      [[], 'compat=2.0', 'Unknown compatibility level 2.0'],
    ];
    for (const [create, options, message] of cases) {
      const img = `e${n++}.qcow2`;
      qemuImg(tmp.dir, 'create', '-q', '-f', 'qcow2', ...create, img, '1M');
      qemuIo(tmp.dir, img, 'write -P 1 0 64k');
      const before = `${img}.before.qcow2`;
      copyFileSync(tmp.path(img), tmp.path(before));
      await expect(amend(img, options)).rejects.toThrow(message);
      checkClean(img);
      expect(specific(img).compat).toBe('1.1');
      expect(qemuSame(tmp.dir, img, before)).toBe(true);
    }
    const zstd = `z${n++}.qcow2`;
    qemuImg(tmp.dir, 'create', '-q', '-f', 'qcow2', '-o', 'compression_type=zstd', zstd, '1M');
    qemuIo(tmp.dir, zstd, 'write -c -P 1 0 64k');
    await expect(amend(zstd, 'compat=0.10')).rejects.toThrow('Cannot downgrade an image with zstd compression type and existing compressed clusters');
    checkClean(zstd);
  });

  it('refuses to downgrade when a snapshot has another disk size', async () => {
    const img = dataImage([], true);
    qemuImg(tmp.dir, 'resize', img, '8M');
    await expect(amend(img, 'compat=0.10')).rejects.toThrow('Internal snapshots prevent downgrade of image');
    checkClean(img);
  });
});

describe('qcow2 amend: other options', () => {
  it('switches lazy refcounts on and off', async () => {
    const img = dataImage([], false);
    const on = await preserving(img, [], (c) => amend(c, 'lazy_refcounts=on'));
    expect(specific(on)['lazy-refcounts']).toBe(true);
    qemuIo(tmp.dir, on, 'write -P 3 0 64k');
    const off = await preserving(on, [], (c) => amend(c, 'lazy_refcounts=off'));
    expect(specific(off)['lazy-refcounts']).toBe(false);
    expect(info(off)['dirty-flag']).toBe(false);
  });

  it('resizes, growing and shrinking, also with snapshots', async () => {
    const img = dataImage([], true);
    const grown = `${img}.grown.qcow2`;
    copyFileSync(tmp.path(img), tmp.path(grown));
    await amend(grown, 'size=8M');
    checkClean(grown);
    expect(info(grown)['virtual-size']).toBe(8 * 1024 * 1024);
    // Snapshots read as QEMU reads them after QEMU's own amend.
    const theirs = `${img}.theirs.qcow2`;
    copyFileSync(tmp.path(img), tmp.path(theirs));
    qemuImg(tmp.dir, 'amend', '-o', 'size=8M', theirs);
    expect(qemuSame(tmp.dir, grown, theirs)).toBe(true);
    for (const sn of ['s1', 's2']) expect(snapshotBytes(grown, sn).equals(snapshotBytes(theirs, sn))).toBe(true);
    const shrunk = `${img}.shrunk.qcow2`;
    copyFileSync(tmp.path(img), tmp.path(shrunk));
    await amend(shrunk, 'size=2M', true);
    checkClean(shrunk);
    expect(info(shrunk)['virtual-size']).toBe(2 * 1024 * 1024);
    const v2 = `v2${n++}.qcow2`;
    qemuImg(tmp.dir, 'create', '-q', '-f', 'qcow2', '-o', 'compat=0.10', v2, '1M');
    qemuImg(tmp.dir, 'snapshot', '-c', 's', v2);
    await expect(amend(v2, 'size=2M')).rejects.toThrow("Can't resize a v2 image which has snapshots");
  });

  it('renames the data file and clears data_file_raw, refusing to set it', async () => {
    const img = `df${n++}.qcow2`;
    qemuImg(tmp.dir, 'create', '-q', '-f', 'qcow2', '-o', `data_file=${img}.data,data_file_raw=on`, img, '1M');
    qemuIo(tmp.dir, img, 'write -P 4 0 64k');
    await amend(img, 'data_file_raw=off');
    expect(specific(img)['data-file-raw']).toBe(false);
    await expect(amend(img, 'data_file_raw=on')).rejects.toThrow('data-file-raw cannot be set on existing images');
    copyFileSync(tmp.path(`${img}.data`), tmp.path(`${img}.moved`));
    await amend(img, `data_file=${img}.moved`);
    expect(specific(img)['data-file']).toBe(`${img}.moved`);
    checkClean(img);
    const plain = dataImage([], false);
    await expect(amend(plain, 'data_file=x')).rejects.toThrow('data-file can only be set for images that use an external data file');
  });

  it('accepts the backing file it has and refuses another with the rebase hint', async () => {
    const base = `b${n++}.qcow2`;
    const top = `t${n++}.qcow2`;
    qemuImg(tmp.dir, 'create', '-q', '-f', 'qcow2', base, '1M');
    qemuImg(tmp.dir, 'create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', top);
    await amend(top, `backing_file=${base},backing_fmt=qcow2`);
    const err = await amend(top, 'backing_file=other.qcow2,backing_fmt=qcow2').catch((e: unknown) => e);
    expect(err).toBeInstanceOf(HintedError);
    expect((err as HintedError).message).toBe('Cannot amend the backing file');
    expect((err as HintedError).hint).toBe("You can use 'qblock-img rebase' instead.\n");
    expect(info(top)['backing-filename']).toBe(base);
  });

  it('names the options that only create takes, and refuses encryption options', async () => {
    const img = dataImage([], false);
    for (const o of ['cluster_size=4k', 'preallocation=metadata', 'extended_l2=on', 'compression_type=zstd', 'encrypt.format=luks']) {
      const err = await amend(img, o).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(HintedError);
      expect((err as HintedError).message).toBe(`Invalid parameter '${o.slice(0, o.indexOf('='))}'`);
      expect((err as HintedError).hint).toBe('This option is only supported for image creation\n');
    }
    await expect(amend(img, 'bogus=1')).rejects.toThrow("Invalid parameter 'bogus'");
    await expect(amend(img, 'encrypt.state=active')).rejects.toThrow("Can't amend encryption options - encryption not present");
    await expect(amend(img, 'refcount_bits=3')).rejects.toThrow('Refcount width must be a power of two and may not exceed 64 bits');
    checkClean(img);
  });
});
