/**
 * Images made by our create() must pass `qemu-img check` (no errors, no
 * leaks), report the asked values in `qemu-img info`, accept QEMU's writes,
 * and read back identically through QEMU and through us.
 */
import { readFileSync, statSync, writeFileSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { BlockError } from '../../core/errors.ts';
import { formatMapJson, mapImage } from '../../core/map.ts';
import type { CreateOptions } from '../../core/options.ts';
import { qcow2Driver } from './index.ts';
import { createContext, newGraph, openQcow2, qemuImg, qemuIo, readAll, requireQemu, scratchDir } from './testing.ts';

const tmp = scratchDir();
beforeAll(() => requireQemu());
afterAll(() => tmp.cleanup());

let n = 0;

/** Creates `name` in the scratch directory with our driver. */
async function create(name: string, opts: CreateOptions): Promise<void> {
  const graph = newGraph();
  await qcow2Driver.create!(tmp.path(name), opts, createContext(graph));
  await graph.closeAll();
}

interface InfoJson {
  'virtual-size': number;
  'cluster-size': number;
  'backing-filename'?: string;
  'backing-filename-format'?: string;
  'format-specific': { type: string; data: Record<string, unknown> };
}

function info(img: string): InfoJson {
  return JSON.parse(qemuImg(tmp.dir, 'info', '-f', 'qcow2', '-U', '--output=json', img)) as InfoJson;
}

/** qemu-img check must exit 0 and report neither corruptions nor leaks. */
function expectClean(img: string): void {
  const out = JSON.parse(qemuImg(tmp.dir, 'check', '-f', 'qcow2', '--output=json', img)) as Record<string, unknown>;
  expect(out.corruptions ?? 0).toBe(0);
  expect(out.leaks ?? 0).toBe(0);
  expect(out['check-errors']).toBe(0);
}

/** Our read of `img` equals qemu-img convert's. */
async function expectSameRead(img: string): Promise<void> {
  qemuImg(tmp.dir, 'convert', '-f', 'qcow2', '-O', 'raw', img, `${img}.raw`);
  const o = await openQcow2(tmp.path(img));
  try {
    const got = Buffer.from(await readAll(o));
    expect(got.equals(readFileSync(tmp.path(`${img}.raw`)))).toBe(true);
  } finally {
    await o.close();
  }
}

interface Combo {
  what: string;
  opts: CreateOptions;
  size?: number;
  expect: Record<string, unknown>;
  /** Map comparison is meaningless where host-file holes show up in QEMU's map. */
  map?: boolean;
}

const combos: Combo[] = [
  { what: 'defaults', opts: {}, expect: { compat: '1.1', 'compression-type': 'zlib', 'lazy-refcounts': false, 'refcount-bits': 16, corrupt: false, 'extended-l2': false } },
  { what: 'compat=0.10', opts: { compat: '0.10' }, expect: { compat: '0.10', 'compression-type': 'zlib', 'refcount-bits': 16 } },
  { what: 'compat=v3 with lazy refcounts', opts: { compat: 'v3', lazy_refcounts: 'on' }, expect: { compat: '1.1', 'lazy-refcounts': true } },
  { what: '512-byte clusters', opts: { cluster_size: '512' }, expect: { 'refcount-bits': 16 } },
  { what: '2 MiB clusters', opts: { cluster_size: '2M' }, expect: { 'refcount-bits': 16 } },
  ...[1, 2, 4, 8, 32, 64].map((b): Combo => ({ what: `refcount_bits=${b}`, opts: { refcount_bits: String(b), cluster_size: '4k' }, expect: { 'refcount-bits': b } })),
  { what: 'extended L2 entries', opts: { extended_l2: 'on' }, expect: { 'extended-l2': true } },
  { what: 'zstd compression type', opts: { compression_type: 'zstd' }, expect: { 'compression-type': 'zstd' } },
  { what: 'preallocation=metadata', opts: { preallocation: 'metadata' }, expect: {}, map: false },
  { what: 'preallocation=falloc', opts: { preallocation: 'falloc' }, expect: {}, map: false },
  { what: 'preallocation=full', opts: { preallocation: 'full', cluster_size: '4k' }, expect: {} },
  { what: 'extended L2 with preallocation=metadata', opts: { preallocation: 'metadata', extended_l2: 'on' }, expect: { 'extended-l2': true }, map: false },
  { what: 'an unaligned size', opts: {}, size: 3 * 1024 * 1024 + 1000, expect: {} },
  { what: 'a size needing several L2 tables and refcount blocks', opts: { cluster_size: '512', preallocation: 'metadata', refcount_bits: '64' }, size: 3 * 1024 * 1024, expect: { 'refcount-bits': 64 }, map: false },
];

describe('qcow2 create', () => {
  for (const c of combos) {
    it(`creates an image QEMU accepts: ${c.what}`, async () => {
      const img = `c-${n++}.qcow2`;
      const size = c.size ?? 4 * 1024 * 1024;
      await create(img, { ...c.opts, size });
      expectClean(img);
      const i = info(img);
      expect(i['virtual-size']).toBe(Math.ceil(size / 512) * 512);
      expect(i['format-specific'].data).toMatchObject(c.expect);
      // Empty image: reads as zeroes through both.
      await expectSameRead(img);
      // QEMU can write into it and the result stays consistent and readable by us.
      qemuIo(tmp.dir, img, 'write -P 0x5c 0 70k', 'write -z 1M 64k', 'write -P 0x5d 2M 4k');
      expectClean(img);
      await expectSameRead(img);
      if (c.map !== false) {
        const o = await openQcow2(tmp.path(img));
        try {
          expect(formatMapJson(await mapImage(o.bs))).toBe(qemuImg(tmp.dir, 'map', '-f', 'qcow2', '--output=json', img));
        } finally {
          await o.close();
        }
      }
    });
  }

  it('creates an overlay over a backing file, taking its size', async () => {
    const base = `base-${n++}.qcow2`;
    qemuImg(tmp.dir, 'create', '-f', 'qcow2', base, '3M');
    qemuIo(tmp.dir, base, 'write -P 0x31 0 3M');
    const img = `ov-${n++}.qcow2`;
    await create(img, { backing_file: base, backing_fmt: 'qcow2' });
    expectClean(img);
    const i = info(img);
    expect(i['virtual-size']).toBe(3 * 1024 * 1024);
    expect(i['backing-filename']).toBe(base);
    expect(i['backing-filename-format']).toBe('qcow2');
    await expectSameRead(img);
    qemuIo(tmp.dir, img, 'write -P 0x32 1M 4k');
    expectClean(img);
    await expectSameRead(img);
  });

  it('creates extended L2 overlays with metadata preallocation over a backing file', async () => {
    const base = `xbase-${n++}.qcow2`;
    qemuImg(tmp.dir, 'create', '-f', 'qcow2', base, '1M');
    qemuIo(tmp.dir, base, 'write -P 0x33 0 1M');
    const img = `xov-${n++}.qcow2`;
    await create(img, { backing_file: base, backing_fmt: 'qcow2', extended_l2: 'on', preallocation: 'metadata', size: 1024 * 1024 });
    expectClean(img);
    await expectSameRead(img);
  });

  it('creates images with an external data file, raw and not', async () => {
    for (const raw of [false, true]) {
      const img = `df-${n++}.qcow2`;
      const opts: CreateOptions = { data_file: `${img}.data`, size: 2 * 1024 * 1024 };
      if (raw) opts.data_file_raw = 'on';
      await create(img, opts);
      expectClean(img);
      const d = info(img)['format-specific'].data;
      expect(d['data-file']).toBe(`${img}.data`);
      expect(d['data-file-raw']).toBe(raw);
      expect(statSync(tmp.path(`${img}.data`)).size).toBe(2 * 1024 * 1024);
      qemuIo(tmp.dir, img, 'write -P 0x41 64k 64k');
      expectClean(img);
      await expectSameRead(img);
      if (raw) {
        // The data file alone is the disk.
        const data = readFileSync(tmp.path(`${img}.data`));
        expect(data[65536]).toBe(0x41);
      }
    }
  });

  it('refuses option combinations with QEMU messages', async () => {
    const bad: Array<[CreateOptions, string]> = [
      [{ size: 1024, compat: '0.10', lazy_refcounts: 'on' }, 'Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)'],
      [{ size: 1024, cluster_size: '1000' }, 'Cluster size must be a power of two between 512 and 2048k'],
      [{ size: 1024, cluster_size: '8k', extended_l2: 'on' }, 'Extended L2 entries are only supported with cluster sizes of at least 16384 bytes'],
      [{ size: 1024, refcount_bits: '3' }, 'Refcount width must be a power of two and may not exceed 64 bits'],
      [{ size: 1024, compat: '0.10', refcount_bits: '8' }, 'Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)'],
      [{ size: 1024, data_file_raw: 'on' }, 'data-file-raw requires data-file'],
      [{ size: 1024, backing_fmt: 'raw' }, 'Backing format cannot be used without backing file'],
      [{ size: 1024, compat: '0.10', compression_type: 'zstd' }, 'Non-zlib compression type is only supported with compatibility level 1.1 and above (use version=v3 or greater)'],
      // Create parses compat through QAPI, whose field is 'version' (qemu-img create -o compat=0.9 says so).
      [{ size: 1024, compat: '0.9' }, "Parameter 'version' does not accept value '0.9'"],
      [{}, 'Image creation needs a size parameter'],
    ];
    for (const [opts, msg] of bad) {
      await expect(create(`bad-${n++}.qcow2`, opts)).rejects.toThrow(msg);
    }
    await expect(create(`bad-${n++}.qcow2`, { size: 1024, encryption: 'on' })).rejects.toBeInstanceOf(BlockError);
  });

  it('measures like qemu-img measure', async () => {
    for (const o of [{ size: '1G' }, { size: '100M', cluster_size: '4k', refcount_bits: '1' }, { size: '64M', extended_l2: 'on', preallocation: 'full' }]) {
      const args = Object.entries(o).filter(([k]) => k !== 'size').map(([k, v]) => `${k}=${v}`).join(',');
      const q = JSON.parse(qemuImg(tmp.dir, 'measure', '-O', 'qcow2', '--output=json', '--size', o.size, ...(args ? ['-o', args] : []))) as { required: number; 'fully-allocated': number };
      const m = await qcow2Driver.measure!(o, null);
      expect({ required: m.required, full: m.fullyAllocated }).toEqual({ required: q.required, full: q['fully-allocated'] });
    }
    // Measuring a source image walks its allocation.
    const src = `msrc-${n++}.qcow2`;
    qemuImg(tmp.dir, 'create', '-f', 'qcow2', src, '8M');
    qemuIo(tmp.dir, src, 'write -P 1 0 100k', 'write -P 2 3M 1M', 'write -z 5M 1M');
    const q = JSON.parse(qemuImg(tmp.dir, 'measure', '-O', 'qcow2', '--output=json', '-f', 'qcow2', src)) as { required: number; 'fully-allocated': number };
    const o = await openQcow2(tmp.path(src));
    try {
      const m = await qcow2Driver.measure!({}, o.bs);
      expect({ required: m.required, full: m.fullyAllocated }).toEqual({ required: q.required, full: q['fully-allocated'] });
    } finally {
      await o.close();
    }
  });
});

void writeFileSync;
