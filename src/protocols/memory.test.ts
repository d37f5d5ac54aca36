import { afterEach, describe, expect, it } from 'vitest';
import { BlockBackend } from '../core/block-backend.ts';
import type { BdrvChild } from '../core/child.ts';
import type { CreateContext } from '../core/driver.ts';
import { BlockError } from '../core/errors.ts';
import { Graph } from '../core/graph.ts';
import { bdrvBlockStatus, bdrvFlush, bdrvPdiscard, bdrvPreadv, bdrvPwriteZeroes, bdrvPwritev, bdrvTruncate } from '../core/io.ts';
import type { BlockNode } from '../core/node.ts';
import { BLOCK, PERM, REQ, type BlockdevOptions } from '../core/types.ts';
import { nodeDrivers } from '../drivers-node.ts';
import { deleteMemoryStore, hasMemoryStore, MEMORY_PAGE_SIZE, memoryDriver, memoryStore, MemoryStore, type MemoryNodeState } from './memory.ts';

const PAGE = MEMORY_PAGE_SIZE;
const TiB = 2 ** 40;
let seq = 0;
const uniq = (): string => `mt${seq++}`;
const created: string[] = [];

afterEach(() => {
  for (const n of created.splice(0)) deleteMemoryStore(n);
});

async function openNode(opts: BlockdevOptions): Promise<{ g: Graph; bs: BlockNode; root: BdrvChild; st: MemoryNodeState }> {
  const g = new Graph({ drivers: nodeDrivers() });
  const bs = await g.open({ driver: 'memory', 'read-only': false, ...opts });
  const root = g.attachRoot(bs, { kind: 'job', name: 't', description: () => 'test' }, 'root', PERM.CONSISTENT_READ | PERM.WRITE | PERM.RESIZE, PERM.ALL);
  return { g, bs, root, st: bs.state<MemoryNodeState>() };
}

async function code(p: Promise<unknown>): Promise<string> {
  try {
    await p;
    return 'resolved';
  } catch (e) {
    return e instanceof BlockError ? `${e.code}: ${e.message}` : String(e);
  }
}

const noCtx: CreateContext = {
  createAndOpenFile: () => Promise.reject(new Error('unused')),
  openImage: () => Promise.reject(new Error('unused')),
  close: () => Promise.resolve(),
};

describe('MemoryStore', () => {
  it('is sparse: a 1 TiB store costs only the pages written', () => {
    const s = new MemoryStore(null, TiB);
    s.write(TiB / 2 + 10, new Uint8Array([1, 2, 3]));
    expect(s.allocatedBytes()).toBe(PAGE);
    const b = new Uint8Array(5);
    s.read(TiB / 2 + 9, b);
    expect([...b]).toEqual([0, 1, 2, 3, 0]);
    expect(s.length).toBe(TiB);
  });

  it('grows on writes past the end and reads zeroes past EOF', () => {
    const s = new MemoryStore(null, 10);
    s.write(PAGE * 2 + 5, new Uint8Array([9]));
    expect(s.length).toBe(PAGE * 2 + 6);
    const b = new Uint8Array(4).fill(7);
    s.read(PAGE * 3, b);
    expect([...b]).toEqual([0, 0, 0, 0]);
  });

  it('shrinking zeroes the cut tail so a later grow does not resurrect data', () => {
    const s = new MemoryStore(null, 0);
    s.write(0, new Uint8Array(PAGE + 100).fill(5));
    s.resize(PAGE + 10);
    s.resize(PAGE * 3);
    const b = new Uint8Array(100);
    s.read(PAGE, b);
    expect([...b.subarray(0, 10)]).toEqual(new Array(10).fill(5));
    expect(b.subarray(10).every((x) => x === 0)).toBe(true);
    expect(s.pages.size).toBe(2);
    s.resize(10);
    expect(s.pages.size).toBe(1);
  });

  it('zero with unmap frees whole pages and zero-fills partial ones; without unmap keeps pages', () => {
    const s = new MemoryStore(null, 0);
    s.write(0, new Uint8Array(PAGE * 3).fill(1));
    s.zero(100, PAGE * 2, false);
    expect(s.pages.size).toBe(3);
    s.write(0, new Uint8Array(PAGE * 3).fill(1));
    s.zero(100, PAGE * 2, true);
    // Page 1 is wholly inside the range; pages 0 and 2 are partial.
    expect([...s.pages.keys()].sort()).toEqual([0, 2]);
    const b = new Uint8Array(PAGE * 3);
    s.read(0, b);
    expect(b.subarray(0, 100).every((x) => x === 1)).toBe(true);
    expect(b.subarray(100, PAGE * 2 + 100).every((x) => x === 0)).toBe(true);
    expect(b.subarray(PAGE * 2 + 100).every((x) => x === 1)).toBe(true);
  });

  it('finds allocation runs without walking terabyte holes', () => {
    const s = new MemoryStore(null, TiB);
    s.write(TiB - PAGE, new Uint8Array(1));
    const t0 = Date.now();
    const run = s.allocationRun(0, TiB, PAGE);
    expect(Date.now() - t0).toBeLessThan(200);
    expect(run).toEqual({ allocated: false, bytes: TiB - PAGE });
    expect(s.allocationRun(TiB - PAGE, PAGE, PAGE)).toEqual({ allocated: true, bytes: PAGE });
  });
});

describe('memory driver', () => {
  it('shares named stores between opens and keeps them until deleteMemoryStore', async () => {
    const name = uniq();
    created.push(name);
    const a = await BlockBackend.open(new Graph({ drivers: nodeDrivers() }), { driver: 'memory', name, size: 8192 });
    const b = await BlockBackend.open(new Graph({ drivers: nodeDrivers() }), `memory:${name}`, { format: 'raw' });
    await a.pwrite(100, new Uint8Array([4, 5, 6]));
    expect([...(await b.read(100, 3))]).toEqual([4, 5, 6]);
    expect(await b.getLength()).toBe(8192);
    await a.close();
    await b.close();
    expect(hasMemoryStore(name)).toBe(true);
    expect(memoryStore(name).length).toBe(8192);
    expect(deleteMemoryStore(name)).toBe(true);
    expect(hasMemoryStore(name)).toBe(false);
  });

  it('size only shapes a new store; an existing store keeps its length', async () => {
    const name = uniq();
    created.push(name);
    memoryStore(name).write(0, new Uint8Array(300));
    const { bs } = await openNode({ name, size: 1 << 20 });
    // 300 stored bytes, a 512-byte (one sector) node as in QEMU.
    expect(memoryStore(name).length).toBe(300);
    expect(bs.totalBytes).toBe(512);
  });

  it('anonymous stores are private to their node', async () => {
    const a = await openNode({ size: 4096 });
    const b = await openNode({ size: 4096 });
    await bdrvPwritev(a.root, 0, 1, new Uint8Array([1]));
    const x = new Uint8Array(1);
    await bdrvPreadv(b.root, 0, 1, x);
    expect(x[0]).toBe(0);
  });

  it('accepts sizes as text and rejects alignments that are not powers of two', async () => {
    const { bs } = await openNode({ size: '64k' });
    expect(bs.totalBytes).toBe(65536);
    expect(await code(openNode({ align: 3 }))).toMatch(/^EINVAL: Parameter 'align' must be a power of two/);
    expect(await code(openNode({ bogus: 1 }))).toBe("EINVAL: Block protocol 'memory' doesn't support the option 'bogus'");
  });

  it('with align=4096 the driver only ever sees aligned requests', async () => {
    const { root, st } = await openNode({ size: 1 << 20, align: 4096 });
    expect(root.bs.bl.requestAlignment).toBe(4096);
    const seen: Array<[number, number]> = [];
    const orig = st.store.write.bind(st.store);
    st.store.write = (off, data) => {
      seen.push([off, data.length]);
      orig(off, data);
    };
    await bdrvPwritev(root, 4095, 2, new Uint8Array([1, 2]));
    expect(seen.every(([o, n]) => o % 4096 === 0 && n % 4096 === 0)).toBe(true);
    const b = new Uint8Array(4);
    await bdrvPreadv(root, 4094, 4, b);
    expect([...b]).toEqual([0, 1, 2, 0]);
  });

  it('reports unwritten pages as ZERO without DATA and written pages as DATA, with map and file', async () => {
    const { bs, root } = await openNode({ size: TiB });
    await bdrvPwritev(root, PAGE * 3 + 7, 10, new Uint8Array(10).fill(1));
    let st = await bdrvBlockStatus(bs, true, 0, TiB);
    expect(st.status & (BLOCK.DATA | BLOCK.ZERO | BLOCK.OFFSET_VALID)).toBe(BLOCK.ZERO | BLOCK.OFFSET_VALID);
    expect(st.pnum).toBe(PAGE * 3);
    expect(st.map).toBe(0);
    expect(st.file).toBe(bs);
    st = await bdrvBlockStatus(bs, true, PAGE * 3 + 100, TiB);
    expect(st.status & (BLOCK.DATA | BLOCK.ZERO | BLOCK.OFFSET_VALID)).toBe(BLOCK.DATA | BLOCK.OFFSET_VALID);
    expect(st.pnum).toBe(PAGE - 100);
    expect(st.map).toBe(PAGE * 3 + 100);
    st = await bdrvBlockStatus(bs, true, PAGE * 4, TiB);
    expect(st.pnum).toBe(TiB - PAGE * 4);
    expect(st.status & BLOCK.EOF).toBe(BLOCK.EOF);
  });

  it('zero writes with MAY_UNMAP free pages; without it they keep them; NO_FALLBACK is native', async () => {
    const { root, st } = await openNode({ size: PAGE * 4 });
    await bdrvPwritev(root, 0, PAGE * 4, new Uint8Array(PAGE * 4).fill(3));
    await bdrvPwriteZeroes(root, 0, PAGE * 2, REQ.NO_FALLBACK);
    expect(st.store.allocatedBytes()).toBe(PAGE * 4);
    await bdrvPwriteZeroes(root, 0, PAGE * 2, REQ.MAY_UNMAP | REQ.NO_FALLBACK);
    expect(st.store.allocatedBytes()).toBe(PAGE * 2);
    expect(st.stats.zeroWrites).toBe(2);
    expect(st.stats.writes).toBe(1);
  });

  it('discard frees pages and zeroes the range, only when opened with discard=unmap', async () => {
    const plain = await openNode({ size: PAGE * 2 });
    await bdrvPwritev(plain.root, 0, PAGE * 2, new Uint8Array(PAGE * 2).fill(3));
    await bdrvPdiscard(plain.root, 0, PAGE);
    expect(plain.st.stats.discards).toBe(0);
    const u = await openNode({ size: PAGE * 2, discard: 'unmap' });
    await bdrvPwritev(u.root, 0, PAGE * 2, new Uint8Array(PAGE * 2).fill(3));
    await bdrvPdiscard(u.root, 10, PAGE + 10);
    expect(u.st.stats.discards).toBe(1);
    expect(u.st.store.allocatedBytes()).toBe(PAGE * 2);
    await bdrvPdiscard(u.root, 0, PAGE * 2);
    expect(u.st.store.allocatedBytes()).toBe(0);
    expect(u.st.store.length).toBe(PAGE * 2);
  });

  it('truncate follows file-posix: preallocation allocates, refuses shrinking and metadata', async () => {
    const { root, st } = await openNode({ size: PAGE });
    await bdrvTruncate(root, PAGE * 3, true, 'full');
    expect(st.store.allocatedBytes()).toBe(PAGE * 2);
    expect(root.bs.totalBytes).toBe(PAGE * 3);
    await bdrvTruncate(root, PAGE * 4, true, 'falloc');
    expect(st.store.allocatedBytes()).toBe(PAGE * 3);
    expect(await code(bdrvTruncate(root, PAGE, true, 'full'))).toBe('ENOTSUP: Cannot use preallocation for shrinking files');
    expect(await code(bdrvTruncate(root, PAGE * 8, true, 'metadata'))).toBe('ENOTSUP: Unsupported preallocation mode: metadata');
    await bdrvTruncate(root, 100, true, 'off');
    // The store is cut to exactly 100 bytes; the node counts whole sectors.
    expect(st.store.length).toBe(100);
    expect(root.bs.totalBytes).toBe(512);
    expect(st.stats.truncates).toBe(3);
  });

  it('counts flushes that reach the driver', async () => {
    const { bs, root, st } = await openNode({ size: 4096 });
    await bdrvFlush(bs);
    // Nothing written since open: the generic layer skips the flush.
    expect(st.stats.flushes).toBe(0);
    await bdrvPwritev(root, 0, 1, new Uint8Array([1]));
    await bdrvFlush(bs);
    await bdrvFlush(bs);
    expect(st.stats.flushes).toBe(1);
    expect(st.stats.bytesWritten).toBe(1);
  });

  it('has zero init and reports allocated bytes', async () => {
    const { bs, root } = await openNode({ size: TiB });
    expect(memoryDriver.hasZeroInit!(bs)).toBe(true);
    expect(await memoryDriver.getAllocatedFileSize!(bs)).toBe(0);
    await bdrvPwritev(root, 5, 1, new Uint8Array([1]));
    expect(await memoryDriver.getAllocatedFileSize!(bs)).toBe(PAGE);
  });

  it('create makes an empty named store of the size rounded to sectors, replacing old contents', async () => {
    const name = uniq();
    created.push(name);
    memoryStore(name).write(0, new Uint8Array([1, 2, 3]));
    await memoryDriver.create!(`memory:${name}`, { size: 1000 }, noCtx);
    const s = memoryStore(name);
    expect(s.length).toBe(1024);
    expect(s.allocatedBytes()).toBe(0);
    await memoryDriver.create!(`memory://${name}`, { size: '128k', preallocation: 'full' }, noCtx);
    expect(s.allocatedBytes()).toBe(2 * PAGE);
    expect(await code(memoryDriver.create!('memory:', { size: 1 }, noCtx))).toMatch(/^EINVAL: A name is required/);
    expect(await code(memoryDriver.create!(`memory:${name}`, { size: 1, preallocation: 'metadata' }, noCtx))).toBe('ENOTSUP: Unsupported preallocation mode: metadata');
    expect(await code(memoryDriver.create!(`memory:${name}`, { size: 1, preallocation: 'bogus' }, noCtx))).toBe('EINVAL: invalid parameter value: bogus');
  });
});
