import { promises as fsp } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { BlockBackend } from '../core/block-backend.ts';
import type { BdrvChild } from '../core/child.ts';
import type { BlockDriver, CreateContext } from '../core/driver.ts';
import { BlockError } from '../core/errors.ts';
import { Graph } from '../core/graph.ts';
import { bdrvBlockStatus, bdrvCopyRange, bdrvPreadv, bdrvPwritev } from '../core/io.ts';
import type { BlockNode } from '../core/node.ts';
import { BLOCK, PERM, REQ, ROLE, type BlockdevOptions } from '../core/types.ts';
import { nodeDrivers } from '../drivers-node.ts';
import { deleteMemoryStore, memoryDriver, memoryStore } from '../protocols/memory.ts';
import { bdrvHasZeroInit, rawDriver, type RawNodeState } from './raw.ts';

let seq = 0;
const names: string[] = [];
function store(size: number, fill?: (i: number) => number): string {
  const name = `raw${seq++}`;
  names.push(name);
  const s = memoryStore(name);
  const data = new Uint8Array(size);
  if (fill) for (let i = 0; i < size; i++) data[i] = fill(i);
  s.write(0, data);
  return name;
}
afterEach(() => {
  for (const n of names.splice(0)) deleteMemoryStore(n);
});

/** A format that claims any buffer starting with "FAKE", standing in for qcow2 in probing tests. */
const fakeFormat: BlockDriver = {
  name: 'fakefmt',
  kind: 'format',
  probe: (buf) => (buf.length >= 4 && String.fromCharCode(...buf.subarray(0, 4)) === 'FAKE' ? 100 : 0),
  async open() {
    throw new BlockError('ENOTSUP', 'fake');
  },
};

function graph(): Graph {
  const g = new Graph({ drivers: [...nodeDrivers(), fakeFormat] });
  return g;
}

async function openRaw(opts: BlockdevOptions, readOnly = false): Promise<{ g: Graph; bs: BlockNode; root: BdrvChild }> {
  const g = graph();
  const bs = await g.open({ driver: 'raw', 'read-only': readOnly, ...opts });
  const perm = readOnly ? PERM.CONSISTENT_READ : PERM.CONSISTENT_READ | PERM.WRITE | PERM.RESIZE;
  const root = g.attachRoot(bs, { kind: 'job', name: 't', description: () => 'test' }, 'root', perm, PERM.ALL);
  return { g, bs, root };
}

async function code(p: Promise<unknown>): Promise<string> {
  try {
    await p;
    return 'resolved';
  } catch (e) {
    return e instanceof BlockError ? `${e.code}: ${e.message}` : String(e);
  }
}

const FAKE = new Uint8Array([0x46, 0x41, 0x4b, 0x45]);

describe('raw probing', () => {
  it('scores 1, so probing falls back to raw only when nothing else claims the file', async () => {
    expect(rawDriver.probe!(new Uint8Array(512), 'x')).toBe(1);
    const g = graph();
    expect(g.probeFormat(new Uint8Array(512), 'x')).toBe(rawDriver);
    const fake = new Uint8Array(512);
    fake.set(FAKE);
    expect(g.probeFormat(fake, 'x').name).toBe('fakefmt');
    expect(new Graph({ drivers: nodeDrivers() }).probeFormat(fake, 'x')).toBe(rawDriver);
  });

  it('a probed raw image is sector-aligned and refuses writes that make sector 0 probe as another format', async () => {
    const name = store(8192, (i) => (i % 251) + 1);
    const g = graph();
    const blk = await BlockBackend.open(g, `memory:${name}`);
    const bs = blk.bs!;
    expect(bs.drv).toBe(rawDriver);
    expect(bs.probed).toBe(true);
    expect(bs.bl.requestAlignment).toBe(512);
    // Completing the magic one byte at a time is caught on the last byte.
    await blk.pwrite(1, FAKE.subarray(1));
    expect(await code(blk.pwrite(0, FAKE.subarray(0, 1)))).toBe('EPERM: Operation not permitted');
    const sector = new Uint8Array(512);
    sector.set(FAKE);
    expect(await code(blk.pwrite(0, sector))).toBe('EPERM: Operation not permitted');
    expect((await blk.read(0, 1))[0]).toBe(1);
    // Harmless data in sector 0 and anything past it are fine.
    await blk.pwrite(0, new Uint8Array([9, 9]));
    await blk.pwrite(512, sector);
    expect([...(await blk.read(0, 2))]).toEqual([9, 9]);
    // Zero writes cannot create a magic, so they are not checked (as QEMU).
    await blk.pwriteZeroes(0, 512);
    await blk.close();
  });

  it('an explicitly given raw format has no sector-0 restriction', async () => {
    const name = store(4096);
    const blk = await BlockBackend.open(graph(), `memory:${name}`, { format: 'raw' });
    expect(blk.bs!.probed).toBe(false);
    expect(blk.bs!.bl.requestAlignment).toBe(1);
    await blk.pwrite(0, FAKE);
    expect([...memoryStore(name).pages.get(0)!.subarray(0, 4)]).toEqual([...FAKE]);
    await blk.close();
  });
});

describe('raw window (offset/size)', () => {
  it("validates offset and size against the file with QEMU's messages", async () => {
    const name = store(8192);
    const file = { driver: 'memory', name };
    expect(await code(openRaw({ file, offset: 8193 }))).toBe('EINVAL: Offset (8193) cannot be greater than size of the containing file (8192)');
    expect(await code(openRaw({ file, offset: 4096, size: 4608 }))).toBe(
      'EINVAL: The sum of offset (4096) and size (4608) has to be smaller or equal to the  actual size of the containing file (8192)',
    );
    expect(await code(openRaw({ file, size: 1000 }))).toBe('EINVAL: Specified size is not multiple of 512');
    expect(await code(openRaw({ file, size: 'x' }))).toMatch(/^EINVAL: Parameter 'size' expects a non-negative number/);
  });

  it('opens the file child as FILTERED without a window and DATA with one', async () => {
    const a = await openRaw({ file: { driver: 'memory', size: 4096 } });
    expect(a.bs.file!.role).toBe(ROLE.FILTERED | ROLE.PRIMARY);
    const b = await openRaw({ file: { driver: 'memory', size: 4096 }, offset: 512 });
    expect(b.bs.file!.role).toBe(ROLE.DATA | ROLE.PRIMARY);
    const c = await openRaw({ file: { driver: 'memory', size: 4096 }, size: 512 });
    expect(c.bs.file!.role).toBe(ROLE.DATA | ROLE.PRIMARY);
  });

  it('maps requests into the window and never touches bytes outside it', async () => {
    const name = store(16384, () => 0x11);
    const { bs, root } = await openRaw({ file: { driver: 'memory', name }, offset: 1000, size: 4096 });
    expect(bs.totalBytes).toBe(4096);
    await bdrvPwritev(root, 0, 4096, new Uint8Array(4096).fill(0x22));
    const all = new Uint8Array(16384);
    memoryStore(name).read(0, all);
    expect(all.subarray(0, 1000).every((b) => b === 0x11)).toBe(true);
    expect(all.subarray(1000, 5096).every((b) => b === 0x22)).toBe(true);
    expect(all.subarray(5096).every((b) => b === 0x11)).toBe(true);
    const b = new Uint8Array(2);
    await bdrvPreadv(root, 4095, 1, b);
    expect(b[0]).toBe(0x22);
  });

  it('fails reads past the window with EINVAL and writes with ENOSPC', async () => {
    const name = store(16384);
    const { bs, root } = await openRaw({ file: { driver: 'memory', name }, offset: 512, size: 4096 });
    expect(await code(rawDriver.preadv!(bs, 4000, 200, new Uint8Array(200), 0))).toBe('EINVAL: Invalid argument');
    expect(await code(rawDriver.pwritev!(bs, 4096, 1, new Uint8Array(1), 0))).toBe('ENOSPC: No space left on device');
    expect(await code(rawDriver.pwriteZeroes!(bs, 0, 4097, 0))).toBe('ENOSPC: No space left on device');
    // The generic path lets a format's caller write past its end; raw stops it at the window.
    expect(await code(bdrvPwritev(root, 4096, 512, new Uint8Array(512)))).toBe('ENOSPC: No space left on device');
  });

  it('follows the file length without a size, and never exceeds a given size', async () => {
    const name = store(8192);
    const a = await openRaw({ file: { driver: 'memory', name }, offset: 1024 });
    const b = await openRaw({ file: { driver: 'memory', name }, offset: 1024, size: 4096 });
    // The file's length comes in whole sectors (QEMU's bdrv_getlength), so 20 000 bytes count as 20 480.
    memoryStore(name).resize(20000);
    expect(await rawDriver.getLength!(a.bs)).toBe(20480 - 1024);
    expect(await rawDriver.getLength!(b.bs)).toBe(4096);
    memoryStore(name).resize(3000);
    expect(await rawDriver.getLength!(b.bs)).toBe(3072 - 1024);
    memoryStore(name).resize(100);
    expect(await rawDriver.getLength!(b.bs)).toBe(0);
  });

  it('reports RAW status that resolves to the file at offset + window offset', async () => {
    const name = store(0);
    memoryStore(name).resize(1 << 20);
    memoryStore(name).write(65536 + 4096, new Uint8Array(10).fill(1));
    const { bs } = await openRaw({ file: { driver: 'memory', name }, offset: 4096 });
    const direct = await rawDriver.blockStatus!(bs, true, 100, 200);
    expect(direct).toEqual({ status: BLOCK.RAW | BLOCK.OFFSET_VALID, pnum: 200, map: 4196, file: bs.file!.bs });
    const st = await bdrvBlockStatus(bs, true, 0, 1 << 20);
    expect(st.status & (BLOCK.ZERO | BLOCK.DATA)).toBe(BLOCK.ZERO);
    expect(st.pnum).toBe(65536 - 4096);
    const d = await bdrvBlockStatus(bs, true, 65536, 100);
    expect(d.status & (BLOCK.ZERO | BLOCK.DATA | BLOCK.OFFSET_VALID)).toBe(BLOCK.DATA | BLOCK.OFFSET_VALID);
    expect(d.map).toBe(65536 + 4096);
    expect(d.file).toBe(bs.file!.bs);
  });
});

describe('raw resize, info, create, measure', () => {
  it('truncates through to the file (shifted by offset) and refuses with a fixed size', async () => {
    const name = store(8192);
    const a = await openRaw({ file: { driver: 'memory', name }, offset: 1024 });
    const blk = new BlockBackend(a.g, { perm: PERM.CONSISTENT_READ | PERM.WRITE | PERM.RESIZE });
    blk.insertNode(a.bs);
    await blk.truncate(10_000);
    expect(memoryStore(name).length).toBe(11_024);
    // The file is 11 024 bytes, which QEMU counts as 11 264 (whole sectors), less the offset.
    expect(await blk.getLength()).toBe(10_240);
    const b = await openRaw({ file: { driver: 'memory', name }, size: 4096 });
    const blk2 = new BlockBackend(b.g, { perm: PERM.CONSISTENT_READ | PERM.WRITE | PERM.RESIZE });
    blk2.insertNode(b.bs);
    expect(await code(blk2.truncate(8192))).toBe('ENOTSUP: Cannot resize fixed-size raw disks');
  });

  it('takes WRITE and RESIZE on the file only when its users do', async () => {
    const ro = await openRaw({ file: { driver: 'memory', size: 4096 } }, true);
    expect(ro.bs.file!.perm & (PERM.WRITE | PERM.RESIZE)).toBe(0);
    const g = graph();
    const bs = await g.open({ driver: 'raw', 'read-only': false, file: { driver: 'memory', size: 4096 } });
    expect(bs.file!.perm & (PERM.WRITE | PERM.RESIZE)).toBe(0);
    const root = g.attachRoot(bs, { kind: 'job', name: 'w', description: () => 'writer' }, 'root', PERM.CONSISTENT_READ | PERM.WRITE, PERM.ALL);
    expect(bs.file!.perm & (PERM.WRITE | PERM.RESIZE)).toBe(PERM.WRITE);
    g.setPerm(root, PERM.CONSISTENT_READ | PERM.WRITE | PERM.RESIZE, PERM.ALL);
    expect(bs.file!.perm & (PERM.WRITE | PERM.RESIZE)).toBe(PERM.WRITE | PERM.RESIZE);
  });

  it('passes supported flags, zero init and info through from the file', async () => {
    const m = await openRaw({ file: { driver: 'memory', size: 4096 } });
    expect(m.bs.supportedZeroFlags & REQ.MAY_UNMAP).toBe(REQ.MAY_UNMAP);
    expect(m.bs.supportedWriteFlags & REQ.FUA).toBe(REQ.FUA);
    expect(rawDriver.hasZeroInit!(m.bs)).toBe(true);
    expect(bdrvHasZeroInit(m.bs)).toBe(true);
    expect(await rawDriver.getInfo!(m.bs)).toEqual({});
    const n = await openRaw({ file: { driver: 'null-co', size: 4096 } });
    expect(rawDriver.hasZeroInit!(n.bs)).toBe(false);
    expect(await code(rawDriver.getInfo!(n.bs))).toBe('ENOTSUP: Operation not supported');
    // Through a filter without get_info (blkdebug) to the protocol below, as QEMU's bdrv_get_info does.
    const f = await openRaw({ file: { driver: 'blkdebug', image: { driver: 'memory', size: 4096 } } });
    expect(await rawDriver.getInfo!(f.bs)).toEqual({});
    expect(n.bs.supportedZeroFlags & REQ.MAY_UNMAP).toBe(0);
  });

  it('measures size rounded up to sectors, or the source length (itself whole sectors)', async () => {
    expect(await rawDriver.measure!({ size: 1000 }, null)).toEqual({ required: 1024, fullyAllocated: 1024 });
    expect(await rawDriver.measure!({ size: '1M' }, null)).toEqual({ required: 1 << 20, fullyAllocated: 1 << 20 });
    const src = await openRaw({ file: { driver: 'memory', size: 12345 } });
    expect(await rawDriver.measure!({}, src.bs)).toEqual({ required: 12800, fullyAllocated: 12800 });
  });

  it('create hands the work to the protocol through the create context', async () => {
    const name = `rawc${seq++}`;
    names.push(name);
    const g = graph();
    const opened: BlockNode[] = [];
    const ctx: CreateContext = {
      async createAndOpenFile(filename, opts) {
        await memoryDriver.create!(filename, opts ?? {}, ctx);
        const bs = await g.openImage(filename, { format: 'memory' });
        opened.push(bs);
        return bs;
      },
      openImage: () => Promise.reject(new Error('unused')),
      async close(bs) {
        await g.unref(bs);
      },
    };
    await rawDriver.create!(`memory:${name}`, { size: 100_000 }, ctx);
    expect(memoryStore(name).length).toBe(100_352);
    expect(opened).toHaveLength(1);
    expect(g.nodes.size).toBe(0);
    const p = join(await fsp.mkdtemp(join(tmpdir(), 'qblock-raw-')), 'x.img');
    const fileCtx: CreateContext = {
      async createAndOpenFile(filename, opts) {
        await nodeDrivers().find((d) => d.name === 'file')!.create!(filename, opts ?? {}, fileCtx);
        return g.openImage(filename, { format: 'file' });
      },
      openImage: () => Promise.reject(new Error('unused')),
      close: (bs) => g.unref(bs),
    };
    await rawDriver.create!(p, { size: 4096, preallocation: 'full' }, fileCtx);
    expect((await fsp.stat(p)).size).toBe(4096);
    await fsp.rm(p);
  });
});

describe('raw reopen', () => {
  it('changes offset and size atomically and keeps them on failure', async () => {
    const name = store(8192, (i) => i & 0xff);
    const { g, bs, root } = await openRaw({ file: { driver: 'memory', name }, offset: 0 });
    await g.reopen(bs, { options: { offset: 256, size: 1024 } });
    expect(bs.state<RawNodeState>()).toEqual({ offset: 256, size: 1024, hasSize: true });
    const b = new Uint8Array(1);
    await bdrvPreadv(root, 1, 1, b);
    expect(b[0]).toBe(1);
    expect(await code(g.reopen(bs, { options: { size: 100 } }))).toBe('EINVAL: Specified size is not multiple of 512');
    expect(bs.state<RawNodeState>()).toEqual({ offset: 256, size: 1024, hasSize: true });
  });
});

describe('raw debug events', () => {
  it('announces read_aio and write_aio on its file so blkdebug rules fire', async () => {
    const name = store(4096);
    const g = new Graph({ drivers: nodeDrivers() });
    const blk = await BlockBackend.open(g, {
      driver: 'raw',
      file: { driver: 'blkdebug', image: { driver: 'memory', name }, 'inject-error': [{ event: 'read_aio', errno: 28, once: true }, { event: 'write_aio', errno: 5, once: true }] },
    });
    await expect(blk.read(0, 512)).rejects.toMatchObject({ code: 'ENOSPC' });
    expect((await blk.read(0, 512)).length).toBe(512);
    await expect(blk.pwrite(0, new Uint8Array(512))).rejects.toMatchObject({ code: 'EIO' });
    await blk.pwrite(0, new Uint8Array(512));
    await blk.close();
  });
});

describe('copy offloading', () => {
  it('copies raw-over-memory to raw-over-memory through the drivers, honouring raw offsets', async () => {
    const a = store(8192, (i) => (i * 7) & 0xff);
    const b = store(8192);
    const g = new Graph({ drivers: nodeDrivers() });
    const src = await BlockBackend.open(g, { driver: 'raw', offset: 1024, file: { driver: 'memory', name: a } }, { readOnly: true });
    const dst = await BlockBackend.open(g, { driver: 'raw', file: { driver: 'memory', name: b } });
    await bdrvCopyRange(src.rootChild!, 0, dst.rootChild!, 512, 2048);
    const got = await dst.read(512, 2048);
    const want = (await src.read(0, 2048));
    expect(Buffer.compare(Buffer.from(got), Buffer.from(want))).toBe(0);
    expect(want[0]).toBe((1024 * 7) & 0xff);
    await src.close();
    await dst.close();
  });

  it('answers ENOTSUP when the pair cannot offload, so callers fall back', async () => {
    const a = store(4096);
    const g = new Graph({ drivers: nodeDrivers() });
    const src = await BlockBackend.open(g, { driver: 'null-co', size: 4096 }, { readOnly: true });
    const dst = await BlockBackend.open(g, { driver: 'memory', name: a });
    await expect(bdrvCopyRange(src.rootChild!, 0, dst.rootChild!, 0, 512)).rejects.toMatchObject({ code: 'ENOTSUP' });
    await src.close();
    await dst.close();
  });
});
