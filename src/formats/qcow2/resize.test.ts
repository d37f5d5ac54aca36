/**
 * Resize (grow with L1 growth, shrink), the metadata overlap check, and
 * concurrent allocating writes, each against QEMU's result.
 */
import { closeSync, openSync, readFileSync, writeSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { bdrvFlush, bdrvPread, bdrvPwritev, bdrvTruncate } from '../../core/io.ts';
import { REQ } from '../../core/types.ts';
import type { Qcow2State } from './index.ts';
import { openQcow2, qemuImg, qemuIo, readAll, requireQemu, scratchDir } from './testing.ts';

const tmp = scratchDir();
beforeAll(() => requireQemu());
afterAll(() => tmp.cleanup());
let n = 0;
const K = 1024;
const M = 1024 * K;

function raw(img: string): Buffer {
  qemuImg(tmp.dir, 'convert', '-O', 'raw', img, `${img}.raw`);
  return readFileSync(tmp.path(`${img}.raw`));
}

function infoOf(img: string): Record<string, unknown> {
  return JSON.parse(qemuImg(tmp.dir, 'info', '--output=json', img)) as Record<string, unknown>;
}

describe('resize', () => {
  const cases: Array<[string, string[], string, number]> = [
    ['grows with L1 growth (512-byte clusters)', ['-o', 'cluster_size=512'], '4M', 12 * M],
    ['grows a v2 image', ['-o', 'compat=0.10'], '4M', 64 * M],
    ['shrinks, dropping L2 tables and the file tail', ['-o', 'cluster_size=4k'], '4M', 1 * M + 4096 + 512],
    ['shrinks an extended L2 image to a partial cluster', ['-o', 'extended_l2=on'], '4M', 1 * M + 3 * 512],
    ['shrinks to one sector', [], '4M', 512],
  ];
  for (const [name, create, size, to] of cases) {
    it(`${name} like qemu-img resize`, async () => {
      const ours = `r${n++}.qcow2`;
      const theirs = `r${n++}.qcow2`;
      for (const img of [ours, theirs]) {
        qemuImg(tmp.dir, 'create', '-f', 'qcow2', ...create, img, size);
        qemuIo(tmp.dir, img, 'write -P 1 0 300k', 'write -P 2 1M 100k', 'write -c -P 3 1536k 64k', 'write -P 4 3M 1M');
      }
      qemuImg(tmp.dir, 'resize', ...(to < Number.parseInt(size, 10) * M ? ['--shrink'] : []), '-f', 'qcow2', theirs, String(to));
      const o = await openQcow2(tmp.path(ours), { readOnly: false });
      try {
        await bdrvTruncate(o.child, to, false);
        expect(o.bs.totalBytes).toBe(to);
        // Writes land beyond the old end after growing.
        if (to > 4 * M) await bdrvPwritev(o.child, to - 4096, 4096, new Uint8Array(4096).fill(9));
      } finally {
        await o.close();
      }
      if (to > 4 * M) qemuIo(tmp.dir, theirs, `write -P 9 ${to - 4096} 4096`);
      expect(qemuImg(tmp.dir, 'check', ours)).toMatch(/No errors were found on the image/);
      expect(infoOf(ours)['virtual-size']).toBe(to);
      expect(raw(ours).equals(raw(theirs))).toBe(true);
      // A shrink gives the dropped clusters back to the file system, as QEMU does.
      if (to < 4 * M) expect(readFileSync(tmp.path(ours)).length).toBeLessThanOrEqual(readFileSync(tmp.path(theirs)).length);
    });
  }

  it('refuses unaligned sizes, v2 images with snapshots, and preallocated shrinking with QEMU messages', async () => {
    const img = `r${n++}.qcow2`;
    qemuImg(tmp.dir, 'create', '-f', 'qcow2', '-o', 'compat=0.10', img, '1M');
    qemuImg(tmp.dir, 'snapshot', '-c', 's', img);
    const o = await openQcow2(tmp.path(img), { readOnly: false });
    try {
      await expect(bdrvTruncate(o.child, 1000, false)).rejects.toThrow('The new size must be a multiple of 512');
      await expect(bdrvTruncate(o.child, 2 * M, false)).rejects.toThrow("Can't resize a v2 image which has snapshots");
    } finally {
      await o.close();
    }
    // v3 snapshots record their own disk size: QEMU 7.2 resizes such images both ways, and so do we.
    const v3 = `r${n++}.qcow2`;
    const theirs = `r${n++}.qcow2`;
    for (const i of [v3, theirs]) {
      qemuImg(tmp.dir, 'create', '-f', 'qcow2', i, '1M');
      qemuIo(tmp.dir, i, 'write -P 1 0 1M');
      qemuImg(tmp.dir, 'snapshot', '-c', 's', i);
      qemuIo(tmp.dir, i, 'write -P 2 512k 64k');
    }
    qemuImg(tmp.dir, 'resize', theirs, '2M');
    qemuImg(tmp.dir, 'resize', '--shrink', theirs, '768k');
    const o3 = await openQcow2(tmp.path(v3), { readOnly: false });
    try {
      await bdrvTruncate(o3.child, 2 * M, false);
      await bdrvTruncate(o3.child, 768 * K, false);
    } finally {
      await o3.close();
    }
    expect(qemuImg(tmp.dir, 'check', v3)).toMatch(/No errors were found on the image/);
    expect(raw(v3).equals(raw(theirs))).toBe(true);
    qemuImg(tmp.dir, 'convert', '-l', 's', '-O', 'raw', v3, `${v3}.s.raw`);
    qemuImg(tmp.dir, 'convert', '-l', 's', '-O', 'raw', theirs, `${theirs}.s.raw`);
    expect(readFileSync(tmp.path(`${v3}.s.raw`)).equals(readFileSync(tmp.path(`${theirs}.s.raw`)))).toBe(true);
    const img2 = `r${n++}.qcow2`;
    qemuImg(tmp.dir, 'create', '-f', 'qcow2', img2, '1M');
    const o2 = await openQcow2(tmp.path(img2), { readOnly: false });
    try {
      await expect(bdrvTruncate(o2.child, 512 * K, false, 'metadata')).rejects.toThrow("Preallocation can't be used for shrinking an image");
      await bdrvTruncate(o2.child, 2 * M, false, 'metadata');
    } finally {
      await o2.close();
    }
    expect(qemuImg(tmp.dir, 'check', img2)).toMatch(/No errors were found on the image/);
  });

  it('zeroes the area a shrink left behind when growing with ZERO_WRITE', async () => {
    const img = `r${n++}.qcow2`;
    qemuImg(tmp.dir, 'create', '-f', 'qcow2', img, '1M');
    qemuIo(tmp.dir, img, 'write -P 5 0 1M');
    const o = await openQcow2(tmp.path(img), { readOnly: false });
    try {
      await bdrvTruncate(o.child, 512 * K + 512, false);
      await bdrvTruncate(o.child, 1 * M, false, 'off', REQ.ZERO_WRITE);
      const all = await readAll(o);
      expect(all[512 * K + 511]).toBe(5);
      expect(all.subarray(512 * K + 512).every((b) => b === 0)).toBe(true);
    } finally {
      await o.close();
    }
    expect(qemuImg(tmp.dir, 'check', img)).toMatch(/No errors were found/);
  });
});

describe('metadata overlap check', () => {
  it("marks the image corrupt with QEMU's message instead of writing over the L1 table", async () => {
    const img = `ov${n++}.qcow2`;
    qemuImg(tmp.dir, 'create', '-f', 'qcow2', img, '1M');
    qemuIo(tmp.dir, img, 'write -P 1 0 64k');
    const o0 = await openQcow2(tmp.path(img));
    const s0 = o0.bs.opaque as Qcow2State;
    const l1 = s0.header.l1TableOffset;
    const l2 = Number(BigInt.asUintN(56, readFileSync(tmp.path(img)).readBigUInt64BE(l1)) & 0xfffffffffffe00n);
    await o0.close();
    // The first L2 entry now points at the L1 table (QEMU's iotest 060), COPIED so it is written in place.
    const fd = openSync(tmp.path(img), 'r+');
    const entry = Buffer.alloc(8);
    entry.writeBigUInt64BE((1n << 63n) | BigInt(l1));
    writeSync(fd, entry, 0, 8, l2);
    closeSync(fd);
    const o = await openQcow2(tmp.path(img), { readOnly: false });
    const warnings: string[] = [];
    o.graph.onWarning = (m) => warnings.push(m);
    try {
      await expect(bdrvPwritev(o.child, 0, 512, new Uint8Array(512).fill(2))).rejects.toThrow(
        'qcow2: Marking image as corrupt: Preventing invalid write on metadata (overlaps with active L1 table); further corruption events will be suppressed',
      );
      await expect(bdrvPread(o.child, 0, 512)).resolves.toBeDefined();
      await expect(bdrvPwritev(o.child, 65536, 512, new Uint8Array(512))).rejects.toMatchObject({ code: 'EIO' });
    } finally {
      await o.close();
    }
    expect(warnings).toHaveLength(1);
    expect((infoOf(img)['format-specific'] as { data: { corrupt: boolean } }).data.corrupt).toBe(true);
    await expect(openQcow2(tmp.path(img), { readOnly: false })).rejects.toThrow('qcow2: Image is corrupt; cannot be opened read/write');
  });
});

describe('metadata overlap check on refcount blocks', () => {
  it('catches a write over a refcount block named anywhere in the used part of the table, also after the table changes', async () => {
    const img = `ovr${n++}.qcow2`;
    qemuImg(tmp.dir, 'create', '-f', 'qcow2', img, '1M');
    qemuIo(tmp.dir, img, 'write -P 1 0 64k');
    const bytes = readFileSync(tmp.path(img));
    const reftable = Number(bytes.readBigUInt64BE(48));
    const refblock = Number(bytes.readBigUInt64BE(reftable));
    const l1 = Number(bytes.readBigUInt64BE(40));
    const l2 = Number(BigInt.asUintN(56, bytes.readBigUInt64BE(l1)) & 0xfffffffffffe00n);
    // The first L2 entry now points at the refcount block, COPIED so the write goes there in place.
    const fd = openSync(tmp.path(img), 'r+');
    const entry = Buffer.alloc(8);
    entry.writeBigUInt64BE((1n << 63n) | BigInt(refblock));
    writeSync(fd, entry, 0, 8, l2);
    closeSync(fd);
    const o = await openQcow2(tmp.path(img), { readOnly: false });
    o.graph.onWarning = () => undefined;
    const s = o.bs.opaque as Qcow2State;
    try {
      // The searched part is the table up to its last block, and it follows in-memory table changes.
      expect(s.refcount.usedTable().length).toBe(8);
      const last = s.refcount.tableSize - 1;
      s.refcount.setTableEntry(last, 0x7fff0000);
      expect(s.refcount.usedTable().length).toBe(8 * (last + 1));
      s.refcount.setTableEntry(last, 0);
      expect(s.refcount.usedTable().length).toBe(8);
      await expect(bdrvPwritev(o.child, 0, 512, new Uint8Array(512).fill(2))).rejects.toThrow(
        'qcow2: Marking image as corrupt: Preventing invalid write on metadata (overlaps with refcount block); further corruption events will be suppressed',
      );
    } finally {
      await o.close();
    }
  });
});

describe('concurrent writes', () => {
  it('allocating writes racing into the same clusters all land (COW from a backing file)', async () => {
    const base = `cb${n++}.qcow2`;
    const img = `cc${n++}.qcow2`;
    qemuImg(tmp.dir, 'create', '-f', 'qcow2', base, '2M');
    qemuIo(tmp.dir, base, 'write -P 0x33 0 2M');
    qemuImg(tmp.dir, 'create', '-f', 'qcow2', '-o', 'cluster_size=4k', '-b', base, '-F', 'qcow2', img);
    const o = await openQcow2(tmp.path(img), { readOnly: false });
    const model = new Uint8Array(2 * M).fill(0x33);
    try {
      // 512-byte pieces in random order, 8 per 4 KiB cluster, all in flight at once.
      const pieces = Array.from({ length: 1024 }, (_, i) => i * 2 * 512 + (i % 3) * 512).filter((off) => off + 512 <= 2 * M);
      for (let i = pieces.length - 1; i > 0; i--) {
        const j = (i * 7919) % (i + 1);
        [pieces[i], pieces[j]] = [pieces[j]!, pieces[i]!];
      }
      await Promise.all(
        pieces.map((off) => {
          const v = (off / 512) % 251 + 1;
          model.fill(v, off, off + 512);
          return bdrvPwritev(o.child, off, 512, new Uint8Array(512).fill(v));
        }),
      );
      await bdrvFlush(o.bs);
      expect(Buffer.from(await readAll(o)).equals(Buffer.from(model))).toBe(true);
    } finally {
      await o.close();
    }
    expect(qemuImg(tmp.dir, 'check', img)).toMatch(/No errors were found/);
    expect(raw(img).equals(Buffer.from(model))).toBe(true);
  });
});

describe('concurrent reads and writes with a tiny L2 cache', () => {
  it('reads never fail for want of cache room while writes hold dirty tables, and everything lands', async () => {
    const img = `tc${n++}.qcow2`;
    qemuImg(tmp.dir, 'create', '-f', 'qcow2', '-o', 'cluster_size=512', img, '4M');
    const o = await openQcow2(tmp.path(img), { readOnly: false, options: { 'l2-cache-size': '1k' } });
    const model = new Uint8Array(4 * M);
    try {
      const jobs: Array<Promise<unknown>> = [];
      for (let i = 0; i < 400; i++) {
        // Spread over many L2 tables (each covers 32 KiB here) so the two-entry cache keeps evicting.
        const off = ((i * 7919) % 8000) * 512;
        if (i % 3 === 0) {
          jobs.push(bdrvPread(o.child, off, 512));
        } else {
          const v = (i % 250) + 1;
          model.fill(v, off, off + 512);
          jobs.push(bdrvPwritev(o.child, off, 512, new Uint8Array(512).fill(v)));
        }
      }
      await Promise.all(jobs);
      await bdrvFlush(o.bs);
      expect(Buffer.from(await readAll(o)).equals(Buffer.from(model))).toBe(true);
    } finally {
      await o.close();
    }
    expect(qemuImg(tmp.dir, 'check', img)).toMatch(/No errors were found/);
    expect(raw(img).equals(Buffer.from(model))).toBe(true);
  });
});

describe('discard passthrough', () => {
  /** Runs write, discard and zero-with-unmap on an image in a memory store; returns the discards that reached the store. */
  async function fileDiscards(options: Record<string, unknown>): Promise<number> {
    const { memoryDriver, memoryStore, deleteMemoryStore } = await import('../../protocols/memory.ts');
    const { newGraph: graphWith } = await import('./testing.ts');
    const { OPEN, PERM } = await import('../../core/types.ts');
    const img = `pd${n++}.qcow2`;
    qemuImg(tmp.dir, 'create', '-f', 'qcow2', img, '4M');
    const bytes = readFileSync(tmp.path(img));
    const name = `pd-${n}`;
    const store = memoryStore(name);
    store.resize(bytes.length);
    store.write(0, bytes);
    const graph = graphWith();
    graph.registerDriver(memoryDriver);
    const bs = await graph.open({ driver: 'qcow2', discard: 'unmap', ...options, file: { driver: 'memory', name } }, OPEN.RDWR);
    const child = graph.attachRoot(bs, { kind: 'job', name: 'pd', description: () => 'discard test' }, 'root', PERM.CONSISTENT_READ | PERM.WRITE, PERM.ALL);
    bs.refcnt--;
    const fileNode = bs.file!.bs;
    try {
      await bdrvPwritev(child, 0, 256 * K, new Uint8Array(256 * K).fill(1));
      await bdrvFlush(bs);
      const { bdrvPdiscard, bdrvPwriteZeroes } = await import('../../core/io.ts');
      await bdrvPdiscard(child, 0, 64 * K);
      await bdrvPwriteZeroes(child, 128 * K, 64 * K, REQ.MAY_UNMAP);
      await bdrvFlush(bs);
      return (fileNode.opaque as { stats: { discards: number } }).stats.discards;
    } finally {
      await graph.detachChild(child);
      await graph.closeAll();
      deleteMemoryStore(name);
    }
  }

  it('passes guest discards to the file by default (pass-discard-request) and not when disabled', async () => {
    expect(await fileDiscards({})).toBe(2);
    expect(await fileDiscards({ 'pass-discard-request': false })).toBe(0);
  });
});
