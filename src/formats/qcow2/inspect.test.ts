/**
 * The inspector's view of qcow2 images QEMU wrote: header fields and feature
 * bits against qemu-img info, L1/L2 entries and the host layout against
 * qemu-img map's host offsets, refcounts against what check counts, and the
 * extended-L2 subcluster bitmaps.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { hostLayout, inspectHeader, readHeader, readL1, readL2, readRefcounts } from './inspect.ts';
import { openQcow2, qemuImg, qemuIo, requireQemu, scratchDir } from './testing.ts';

const tmp = scratchDir();
beforeAll(() => requireQemu());
afterAll(() => tmp.cleanup());

interface QemuMapEntry {
  start: number;
  length: number;
  depth: number;
  present: boolean;
  zero: boolean;
  data: boolean;
  offset?: number;
}

describe('qcow2 inspector', () => {
  it('decodes the header as qemu-img info reports it', async () => {
    qemuImg(tmp.dir, 'create', '-q', '-f', 'qcow2', '-o', 'cluster_size=131072,lazy_refcounts=on,refcount_bits=8,compression_type=zstd', 'h.qcow2', '300M');
    const info = JSON.parse(qemuImg(tmp.dir, 'info', '--output=json', 'h.qcow2')) as { 'virtual-size': number; 'cluster-size': number };
    const o = await openQcow2(tmp.path('h.qcow2'));
    try {
      const hv = await inspectHeader(o.bs.file!);
      expect(hv.virtualSize).toBe(info['virtual-size']);
      expect(hv.clusterSize).toBe(info['cluster-size']);
      expect(hv.refcountBits).toBe(8);
      expect(hv.compressionType).toBe('zstd');
      expect(hv.l2Coverage).toBe((131072 / 8) * 131072);
      expect(hv.fields.find((f) => f.name === 'magic')?.value).toBe('0x514649fb');
      expect(hv.fields.find((f) => f.name === 'size')?.value).toBe(String(300 * 1024 * 1024));
      // Lazy refcounts (compatible bit 0) and the zstd compression type (incompatible bit 3), named from the image's table.
      expect(hv.features.map((f) => `${f.kind}:${f.bit}:${f.name}`).sort()).toEqual(['compatible:0:lazy refcounts', 'incompatible:3:compression type']);
      expect(hv.extensions.map((e) => e.name)).toContain('feature name table');
    } finally {
      await o.close();
    }
  });

  it('finds every mapped cluster in the L2 tables and the host layout at the offsets qemu-img map gives', async () => {
    qemuImg(tmp.dir, 'create', '-q', '-f', 'qcow2', 'm.qcow2', '64M');
    qemuIo(tmp.dir, 'm.qcow2', 'write -q -P 1 0 192k', 'write -q -z 1M 128k', 'write -q -c -P 2 4M 256k', 'write -q -P 3 40M 64k');
    const map = JSON.parse(qemuImg(tmp.dir, 'map', '--output=json', 'm.qcow2')) as QemuMapEntry[];
    const o = await openQcow2(tmp.path('m.qcow2'));
    try {
      const { header } = await readHeader(o.bs.file!);
      const [l1] = await readL1(o.bs.file!, header, 0, 1);
      expect(l1!.l2Offset).toBeGreaterThan(0);
      expect(l1!.copied).toBe(true);
      const l2 = await readL2(o.bs.file!, header, 0, 0, header.size / 65536);
      for (const e of map.filter((m) => m.data && m.offset !== undefined)) {
        for (let g = e.start; g < e.start + e.length; g += 65536) {
          const entry = l2[g / 65536]!;
          expect(entry.type).toBe('normal');
          expect(entry.hostOffset).toBe(e.offset! + (g - e.start));
        }
      }
      expect(l2[1024 * 1024 / 65536]!.type).toBe('zero');
      expect(l2.filter((e) => e.type === 'compressed')).toHaveLength(4);
      const layout = await hostLayout(o.bs.file!);
      for (const e of map.filter((m) => m.data && m.offset !== undefined)) {
        const run = layout.find((x) => x.kind === 'data' && x.start <= e.offset! && e.offset! < x.start + x.length)!;
        expect(run.guestOffset! + (e.offset! - run.start)).toBe(e.start);
      }
      expect(layout.filter((x) => x.kind === 'compressed').length).toBeGreaterThan(0);
      for (const kind of ['header', 'l1', 'l2', 'refcount-table', 'refcount-block']) expect(layout.some((x) => x.kind === kind), kind).toBe(true);
      expect(layout.some((x) => x.kind === 'leaked')).toBe(false);
      // Every cluster of the file is accounted for, in order.
      let pos = 0;
      for (const x of layout) {
        expect(x.start).toBe(pos);
        pos += x.length;
      }
      // Data clusters are referenced once; a host cluster holding four compressed clusters four times.
      const rc = await readRefcounts(o.bs.file!, header, 0, Math.ceil(pos / 65536));
      const dataCluster = map.find((m) => m.data && m.offset !== undefined)!.offset! / 65536;
      expect(rc[dataCluster]).toBe(1);
      expect(Math.max(...rc)).toBe(4);
    } finally {
      await o.close();
    }
  });

  it('marks snapshot-only clusters and snapshot tables, and shared clusters count twice', async () => {
    qemuImg(tmp.dir, 'create', '-q', '-f', 'qcow2', 's.qcow2', '8M');
    qemuIo(tmp.dir, 's.qcow2', 'write -q -P 1 0 128k');
    qemuImg(tmp.dir, 'snapshot', '-c', 'one', 's.qcow2');
    qemuIo(tmp.dir, 's.qcow2', 'write -q -P 2 0 64k');
    const o = await openQcow2(tmp.path('s.qcow2'));
    try {
      const layout = await hostLayout(o.bs.file!);
      const kinds = new Set(layout.map((x) => x.kind));
      for (const k of ['snapshot-table', 'snapshot-l1', 'snapshot-data', 'data']) expect(kinds.has(k as never), k).toBe(true);
      const { header } = await readHeader(o.bs.file!);
      const l2 = await readL2(o.bs.file!, header, 0, 0, 2);
      const rc = await readRefcounts(o.bs.file!, header, 0, 64);
      // Cluster 0 was rewritten after the snapshot (its own copy); cluster 1 is still shared with the snapshot.
      expect(rc[l2[0]!.hostOffset! / 65536]).toBe(1);
      expect(rc[l2[1]!.hostOffset! / 65536]).toBe(2);
      expect(l2[1]!.copied).toBe(false);
    } finally {
      await o.close();
    }
  });

  it('shows extended L2 subcluster bitmaps', async () => {
    qemuImg(tmp.dir, 'create', '-q', '-f', 'qcow2', '-o', 'extended_l2=on', 'x.qcow2', '4M');
    qemuIo(tmp.dir, 'x.qcow2', 'write -q -P 1 0 4k', 'write -q -z 65536 64k');
    const o = await openQcow2(tmp.path('x.qcow2'));
    try {
      const hv = await inspectHeader(o.bs.file!);
      expect(hv.extendedL2).toBe(true);
      expect(hv.subclusterSize).toBe(2048);
      const { header } = await readHeader(o.bs.file!);
      const [first, second] = await readL2(o.bs.file!, header, 0, 0, 2);
      expect(first!.type).toBe('normal');
      expect(first!.allocBitmap).toBe(0b11);
      expect(second!.type).toBe('zero');
      expect(second!.zeroBitmap).toBe(0xffffffff);
    } finally {
      await o.close();
    }
  });
});
