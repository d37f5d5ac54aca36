/**
 * Differential tests: images written by QEMU 7.2 (qemu-img, qemu-io) read
 * through our driver must match `qemu-img convert -O raw` byte for byte, and
 * mapImage must print what `qemu-img map --output=json` prints.
 */
import { readFileSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { formatMapJson, mapImage } from '../../core/map.ts';
import { openQcow2, qemuImg, qemuIo, readAll, requireQemu, scratchDir } from './testing.ts';

const tmp = scratchDir();
beforeAll(() => requireQemu());
afterAll(() => tmp.cleanup());

let counter = 0;
/** A fresh image name in the scratch directory. */
function name(base: string): string {
  return `${base}-${counter++}.qcow2`;
}

/** Compares our full read and map of `img` with QEMU's. */
async function expectSameAsQemu(img: string, opts: { map?: boolean } = {}): Promise<void> {
  requireQemu();
  const raw = `${img}.raw`;
  qemuImg(tmp.dir, 'convert', '-f', 'qcow2', '-O', 'raw', img, raw);
  const expected = readFileSync(tmp.path(raw));
  const o = await openQcow2(tmp.path(img));
  try {
    const got = await readAll(o);
    expect(got.length).toBe(expected.length);
    // Compare in chunks so a mismatch reports where, not a giant diff.
    for (let off = 0; off < got.length; off += 65536) {
      const a = Buffer.from(got.subarray(off, off + 65536));
      const b = expected.subarray(off, off + 65536);
      if (!a.equals(b)) expect({ offset: off, equal: false }).toEqual({ offset: off, equal: true });
    }
    if (opts.map !== false) {
      const ours = formatMapJson(await mapImage(o.bs));
      const theirs = qemuImg(tmp.dir, 'map', '-f', 'qcow2', '--output=json', img);
      expect(ours).toBe(theirs);
    }
  } finally {
    await o.close();
  }
}

describe('qcow2 read path against QEMU', () => {
  it('reads a default image with data, zero writes and discards', async () => {
    const img = name('basic');
    qemuImg(tmp.dir, 'create', '-f', 'qcow2', img, '8M');
    qemuIo(tmp.dir, img, 'write -P 0x11 0 64k', 'write -P 0x22 100k 300k', 'write -P 0x33 1M 1M', 'write -z 1536k 128k', 'discard 1280k 64k', 'write -P 0x44 8380416 4096');
    await expectSameAsQemu(img);
  });

  it('reads an image whose size is not cluster aligned', async () => {
    const img = name('unaligned');
    qemuImg(tmp.dir, 'create', '-f', 'qcow2', img, '1000448');
    qemuIo(tmp.dir, img, 'write -P 0x5a 900k 77312');
    await expectSameAsQemu(img);
  });

  for (const cs of ['512', '4k', '64k', '2M']) {
    it(`reads cluster size ${cs}`, async () => {
      const img = name(`cs${cs}`);
      qemuImg(tmp.dir, 'create', '-f', 'qcow2', '-o', `cluster_size=${cs}`, img, '6M');
      qemuIo(tmp.dir, img, 'write -P 0x61 0 3k', 'write -P 0x62 1030k 70k', 'write -z 2M 1M', 'write -P 0x63 4095k 2M');
      await expectSameAsQemu(img);
    });
  }

  for (const bits of [1, 2, 4, 8, 16, 32, 64]) {
    it(`reads refcount_bits=${bits}`, async () => {
      const img = name(`rc${bits}`);
      qemuImg(tmp.dir, 'create', '-f', 'qcow2', '-o', `refcount_bits=${bits}`, img, '4M');
      qemuIo(tmp.dir, img, 'write -P 0x71 0 200k', 'write -P 0x72 3M 512k');
      await expectSameAsQemu(img);
      // Check refcounts agree with what the image references: QEMU's check sees no leaks or errors.
      const o = await openQcow2(tmp.path(img));
      try {
        const s = o.bs.opaque as import('./index.ts').Qcow2State;
        expect(await s.refcount.get(0)).toBe(1);
        let referenced = 0;
        for (let c = 0; c < 20; c++) if ((await s.refcount.get(c)) > 0) referenced++;
        expect(referenced).toBeGreaterThan(3);
      } finally {
        await o.close();
      }
    });
  }

  it('reads compat=0.10 (v2) images', async () => {
    const img = name('v2');
    qemuImg(tmp.dir, 'create', '-f', 'qcow2', '-o', 'compat=0.10', img, '4M');
    qemuIo(tmp.dir, img, 'write -P 0x81 0 100k', 'write -z 1M 64k', 'write -P 0x82 2M 64k');
    await expectSameAsQemu(img);
  });

  for (const ct of ['zlib', 'zstd']) {
    it(`reads ${ct}-compressed clusters`, async () => {
      const src = name(`csrc-${ct}`);
      qemuImg(tmp.dir, 'create', '-f', 'qcow2', src, '3M');
      qemuIo(tmp.dir, src, 'write -P 0x91 0 1M', 'write -P 0x92 1536k 4k', 'write -P 0x93 2M 1M');
      const img = name(`comp-${ct}`);
      qemuImg(tmp.dir, 'convert', '-c', '-f', 'qcow2', '-O', 'qcow2', '-o', `compression_type=${ct}`, src, img);
      await expectSameAsQemu(img);
    });
  }

  it('reads compressed clusters with random (incompressible and mixed) data', async () => {
    const src = name('crand');
    qemuImg(tmp.dir, 'create', '-f', 'qcow2', '-o', 'cluster_size=4k', src, '1M');
    // qemu-io's -P writes a pattern; a random file converted in makes mixed clusters.
    const rnd = tmp.path('random.bin');
    const data = new Uint8Array(1 << 20);
    for (let i = 0; i < data.length; i++) data[i] = i % 3 === 0 ? (i * 2654435761) >>> 24 : i & 0x0f;
    (await import('node:fs')).writeFileSync(rnd, data);
    const img = name('crand-c');
    qemuImg(tmp.dir, 'convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', 'cluster_size=4k', 'random.bin', img);
    await expectSameAsQemu(img);
  });

  it('reads through a backing chain, including a shorter backing file', async () => {
    const base = name('base');
    qemuImg(tmp.dir, 'create', '-f', 'qcow2', base, '2M');
    qemuIo(tmp.dir, base, 'write -P 0xa1 0 2M');
    const mid = name('mid');
    qemuImg(tmp.dir, 'create', '-f', 'qcow2', '-b', base, '-F', 'qcow2', mid, '4M');
    qemuIo(tmp.dir, mid, 'write -P 0xa2 64k 64k', 'write -z 256k 64k', 'write -P 0xa3 3M 64k');
    const top = name('top');
    qemuImg(tmp.dir, 'create', '-f', 'qcow2', '-b', mid, '-F', 'qcow2', top, '6M');
    qemuIo(tmp.dir, top, 'write -P 0xa4 0 4k', 'discard 64k 64k', 'write -P 0xa5 5M 4k');
    await expectSameAsQemu(top);
    await expectSameAsQemu(mid);
  });

  it('reads extended L2 images with subcluster writes, zeroes and discards', async () => {
    const base = name('xbase');
    qemuImg(tmp.dir, 'create', '-f', 'qcow2', base, '2M');
    qemuIo(tmp.dir, base, 'write -P 0xb1 0 2M');
    const img = name('xl2');
    qemuImg(tmp.dir, 'create', '-f', 'qcow2', '-o', 'extended_l2=on,cluster_size=64k', '-b', base, '-F', 'qcow2', img, '2M');
    qemuIo(tmp.dir, img, 'write -P 0xb2 2k 2k', 'write -P 0xb3 10k 6k', 'write -z 20k 4k', 'write -P 0xb4 64k 64k', 'write -z 70k 2k', 'discard 128k 64k', 'write -P 0xb5 300k 1k');
    await expectSameAsQemu(img);
    const nob = name('xl2nob');
    qemuImg(tmp.dir, 'create', '-f', 'qcow2', '-o', 'extended_l2=on,cluster_size=32k', nob, '1M');
    qemuIo(tmp.dir, nob, 'write -P 0xb6 1k 1k', 'write -z 33k 2k', 'write -P 0xb7 200k 100k');
    await expectSameAsQemu(nob);
  });

  it('reads images with an external data file, raw and not raw', async () => {
    const img = name('df');
    qemuImg(tmp.dir, 'create', '-f', 'qcow2', '-o', `data_file=${img}.data`, img, '2M');
    qemuIo(tmp.dir, img, 'write -P 0xc1 0 64k', 'write -P 0xc2 1M 128k', 'write -z 1536k 64k');
    await expectSameAsQemu(img);
    const rawImg = name('dfraw');
    qemuImg(tmp.dir, 'create', '-f', 'qcow2', '-o', `data_file=${rawImg}.data,data_file_raw=on`, rawImg, '2M');
    qemuIo(tmp.dir, rawImg, 'write -P 0xc3 4k 64k', 'write -P 0xc4 1M 4k');
    await expectSameAsQemu(rawImg);
  });

  it('reads preallocated images (metadata, falloc, full)', async () => {
    for (const mode of ['metadata', 'falloc', 'full']) {
      const img = name(`pre-${mode}`);
      qemuImg(tmp.dir, 'create', '-f', 'qcow2', '-o', `preallocation=${mode}`, img, '2M');
      qemuIo(tmp.dir, img, 'write -P 0xd1 64k 64k', 'write -z 256k 64k');
      // Host-file holes make qemu-img map print zero:true where our file protocol cannot see them.
      await expectSameAsQemu(img, { map: mode === 'full' });
    }
  });

  it('reads images with internal snapshots', async () => {
    const img = name('snap');
    qemuImg(tmp.dir, 'create', '-f', 'qcow2', img, '2M');
    qemuIo(tmp.dir, img, 'write -P 0xe1 0 1M');
    qemuImg(tmp.dir, 'snapshot', '-c', 'first', img);
    qemuIo(tmp.dir, img, 'write -P 0xe2 512k 64k');
    qemuImg(tmp.dir, 'snapshot', '-c', 'second', img);
    qemuIo(tmp.dir, img, 'write -P 0xe3 0 4k');
    await expectSameAsQemu(img);
    const o = await openQcow2(tmp.path(img));
    try {
      const list = await o.bs.drv.snapshotList!(o.bs);
      expect(list.map((s) => s.name)).toEqual(['first', 'second']);
    } finally {
      await o.close();
    }
  });

  it('reads images with persistent bitmaps read-only', async () => {
    const img = name('bitmap');
    qemuImg(tmp.dir, 'create', '-f', 'qcow2', img, '1M');
    qemuImg(tmp.dir, 'bitmap', '--add', img, 'b0');
    qemuIo(tmp.dir, img, 'write -P 0xf1 0 64k');
    await expectSameAsQemu(img);
  });
});
