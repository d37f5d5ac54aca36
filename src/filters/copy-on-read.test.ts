import { afterEach, describe, expect, it } from 'vitest';
import { BlockBackend } from '../core/block-backend.ts';
import type { BlockDriver } from '../core/driver.ts';
import { Graph } from '../core/graph.ts';
import { bdrvPreadv, bdrvPwritev } from '../core/io.ts';
import type { BlockNode } from '../core/node.ts';
import { BLOCK, PERM, REQ, ROLE, type BlockdevOptions } from '../core/types.ts';
import { rawDriver } from '../formats/raw.ts';
import { deleteMemoryStore, memoryDriver, memoryStore, type MemoryNodeState } from '../protocols/memory.ts';
import { blkdebugBreak, blkdebugResume, blkdebugWaitBreak } from './blkdebug.ts';
import { filterDrivers } from './index.ts';

const CLUSTER = 4096;
const SIZE = 256 * 1024;

/** What the test format keeps per node: which clusters this layer holds, and how often it was asked to write. */
interface CowState {
  allocated: Set<number>;
  size: number;
  writes: number;
  unchangedWrites: number;
}

function cow(bs: BlockNode): CowState {
  return bs.state<CowState>();
}

/**
 * A minimal backing-capable format for these tests: data sits at the same
 * offset in `file`, a Set records which 4 KiB clusters this layer holds, and
 * unallocated clusters read from the backing node (or as zeroes).
 */
const cowDriver: BlockDriver = {
  name: 'cowtest',
  kind: 'format',
  supportsBacking: true,
  runtimeOptions: [{ name: 'size', type: 'number' }],
  async open(bs, options) {
    await bs.graph.openChild(bs, (options.file ?? bs.options.file) as BlockdevOptions | string, 'file', ROLE.DATA | ROLE.METADATA | ROLE.PRIMARY);
    bs.opaque = { allocated: new Set<number>(), size: Number(options.size ?? SIZE), writes: 0, unchangedWrites: 0 } satisfies CowState;
    bs.supportedWriteFlags = REQ.WRITE_UNCHANGED;
  },
  async getLength(bs) {
    return cow(bs).size;
  },
  async getInfo() {
    return { clusterSize: CLUSTER };
  },
  async preadv(bs, offset, bytes, buf) {
    for (let pos = 0; pos < bytes; ) {
      const off = offset + pos;
      const c = Math.floor(off / CLUSTER);
      const n = Math.min(bytes - pos, (c + 1) * CLUSTER - off);
      const part = buf.subarray(pos, pos + n);
      if (cow(bs).allocated.has(c)) await bdrvPreadv(bs.file!, off, n, part);
      else if (bs.backing) await bdrvPreadv(bs.backing, off, n, part);
      else part.fill(0);
      pos += n;
    }
  },
  async pwritev(bs, offset, bytes, buf, flags) {
    const st = cow(bs);
    st.writes++;
    if (flags & REQ.WRITE_UNCHANGED) st.unchangedWrites++;
    for (let c = Math.floor(offset / CLUSTER); c * CLUSTER < offset + bytes; c++) {
      if (!st.allocated.has(c) && (offset > c * CLUSTER || offset + bytes < (c + 1) * CLUSTER)) {
        // A partial write to a new cluster first copies the rest of it from below.
        const whole = new Uint8Array(CLUSTER);
        await this.preadv!(bs, c * CLUSTER, CLUSTER, whole, 0);
        await bdrvPwritev(bs.file!, c * CLUSTER, CLUSTER, whole);
      }
      st.allocated.add(c);
    }
    await bdrvPwritev(bs.file!, offset, bytes, buf);
  },
  async blockStatus(bs, _wantZero, offset, bytes) {
    const st = cow(bs);
    const alloc = st.allocated.has(Math.floor(offset / CLUSTER));
    let end = (Math.floor(offset / CLUSTER) + 1) * CLUSTER;
    while (end < offset + bytes && st.allocated.has(end / CLUSTER) === alloc) end += CLUSTER;
    const pnum = Math.min(end, offset + bytes) - offset;
    return alloc ? { status: BLOCK.DATA | BLOCK.OFFSET_VALID, pnum, map: offset, file: bs.file!.bs } : { status: 0, pnum };
  },
};

const stores: string[] = [];
const cleanups: Array<() => Promise<void>> = [];

afterEach(async () => {
  for (const f of cleanups.splice(0).reverse()) await f();
  for (const s of stores.splice(0)) deleteMemoryStore(s);
});

let seq = 0;
/** A named memory store of SIZE bytes filled with `fill(offset)` in [from, to). */
function store(fill: (i: number) => number, from = 0, to = SIZE): string {
  const name = `cor-test-${seq++}`;
  stores.push(name);
  const s = memoryStore(name);
  const bytes = new Uint8Array(SIZE);
  for (let i = from; i < to; i++) bytes[i] = fill(i);
  s.write(0, bytes);
  return name;
}

const pattern = (i: number): number => (i * 7 + 3) & 0xff;

function newGraph(): Graph {
  return new Graph({ drivers: [memoryDriver, rawDriver, cowDriver, ...filterDrivers()] });
}

async function backend(graph: Graph, options: BlockdevOptions): Promise<BlockBackend> {
  const blk = await BlockBackend.open(graph, options);
  blk.setOnError('report', 'report');
  cleanups.push(async () => {
    await blk.close();
    await graph.closeAll();
  });
  return blk;
}

/** copy-on-read over `top` (cowtest, empty file) over `base` (memory with the pattern). */
async function corStack(extra: Record<string, unknown> = {}): Promise<{ blk: BlockBackend; graph: Graph; top: BlockNode; base: BlockNode }> {
  const graph = newGraph();
  const baseName = store(pattern);
  const blk = await backend(graph, {
    driver: 'copy-on-read',
    ...extra,
    file: {
      driver: 'cowtest',
      'node-name': 'top',
      file: { driver: 'memory', size: SIZE },
      backing: { driver: 'memory', 'node-name': 'base', name: baseName },
    },
  });
  return { blk, graph, top: graph.findNode('top')!, base: graph.findNode('base')! };
}

function expectPattern(buf: Uint8Array, offset: number): void {
  for (let i = 0; i < buf.length; i++) {
    if (buf[i] !== pattern(offset + i)) throw new Error(`byte ${offset + i} is ${buf[i]}, expected ${pattern(offset + i)}`);
  }
}

describe('copy-on-read', () => {
  it('copies what a read fetched from the backing file into the top layer', async () => {
    const { blk, top, base } = await corStack();
    const baseStats = base.state<MemoryNodeState>().stats;
    const buf = await blk.read(5000, 6000);
    expectPattern(buf, 5000);
    // Whole clusters around the request were copied up with WRITE_UNCHANGED.
    expect([...cow(top).allocated].sort((a, b) => a - b)).toEqual([1, 2]);
    expect(cow(top).unchangedWrites).toBeGreaterThan(0);
    const topFile = top.file!.bs.state<MemoryNodeState>().store;
    const copied = new Uint8Array(2 * CLUSTER);
    topFile.read(CLUSTER, copied);
    expectPattern(copied, CLUSTER);

    // A second read is served by the top layer: the backing file is not read again, nothing is written.
    const readsBefore = baseStats.reads;
    const writesBefore = cow(top).writes;
    expectPattern(await blk.read(5000, 6000), 5000);
    expect(baseStats.reads).toBe(readsBefore);
    expect(cow(top).writes).toBe(writesBefore);
  });

  it('copies only what was missing when part of the range is already in the top layer', async () => {
    const { blk, top } = await corStack();
    await blk.pwrite(CLUSTER, new Uint8Array(CLUSTER).fill(0xee));
    const writes = cow(top).writes;
    const buf = await blk.read(0, 3 * CLUSTER);
    expectPattern(buf.subarray(0, CLUSTER), 0);
    expect(buf.subarray(CLUSTER, 2 * CLUSTER).every((b) => b === 0xee)).toBe(true);
    expectPattern(buf.subarray(2 * CLUSTER), 2 * CLUSTER);
    expect([...cow(top).allocated].sort((a, b) => a - b)).toEqual([0, 1, 2]);
    // Two separate unallocated clusters, one copy each; the guest's data was left alone.
    expect(cow(top).writes - writes).toBe(2);
  });

  it('passes writes, zero writes and discards through', async () => {
    const { blk, top } = await corStack();
    await blk.pwrite(100, new Uint8Array([1, 2, 3]));
    expect([...(await blk.read(99, 5))]).toEqual([pattern(99), 1, 2, 3, pattern(103)]);
    await blk.pwriteZeroes(8192, 4096);
    expect((await blk.read(8192, 4096)).every((b) => b === 0)).toBe(true);
    expect(cow(top).allocated.has(2)).toBe(true);
    await blk.pdiscard(0, 4096);
  });

  it('takes WRITE_UNCHANGED on its child even for readers, and nothing else beyond its parents', async () => {
    const { blk } = await corStack();
    const child = blk.bs!.file!;
    expect(child.perm & PERM.WRITE_UNCHANGED).toBeTruthy();
    expect(child.perm & PERM.CONSISTENT_READ).toBeTruthy();
    expect(child.sharedPerm & PERM.WRITE_UNCHANGED).toBeTruthy();
  });

  it('reads without the filter do not copy', async () => {
    const graph = newGraph();
    const baseName = store(pattern);
    const blk = await backend(graph, {
      driver: 'cowtest',
      file: { driver: 'memory', size: SIZE },
      backing: { driver: 'memory', name: baseName },
    });
    expectPattern(await blk.read(0, 3 * CLUSTER), 0);
    expect(cow(blk.bs!).allocated.size).toBe(0);
  });

  it('announces cor_write to a blkdebug node below the top layer', async () => {
    const graph = newGraph();
    const baseName = store(pattern);
    const blk = await backend(graph, {
      driver: 'copy-on-read',
      file: {
        driver: 'cowtest',
        'node-name': 'top',
        file: { driver: 'blkdebug', 'node-name': 'dbg', image: { driver: 'memory', size: SIZE } },
        backing: { driver: 'memory', name: baseName },
      },
    });
    const dbg = graph.findNode('dbg')!;
    blkdebugBreak(dbg, 'cor_write', 'cor');
    // cor_write is announced on the top node; it walks down its file child to blkdebug.
    const r = blk.read(0, 100);
    await blkdebugWaitBreak(dbg, 'cor');
    blkdebugResume(dbg, 'cor');
    expectPattern(await r, 0);
  });

  it('is refused on a read-only image, which could not take the copies', async () => {
    const graph = newGraph();
    await expect(graph.open({ driver: 'copy-on-read', 'read-only': true, file: { driver: 'memory' } })).rejects.toThrow('Block node is read-only');
    expect(graph.nodes.size).toBe(0);
  });
});

describe('copy-on-read: bottom', () => {
  /** cor → top → mid (holds [64K,128K)) → base (pattern everywhere). */
  async function threeLayers(extra: Record<string, unknown>): Promise<{ blk: BlockBackend; graph: Graph; top: BlockNode; mid: BlockNode }> {
    const graph = newGraph();
    const baseName = store(pattern);
    const midFile = store(() => 0x55, 65536, 131072);
    const mid = await graph.open({ driver: 'cowtest', 'node-name': 'mid', file: { driver: 'memory', name: midFile }, backing: { driver: 'memory', name: baseName } });
    for (let c = 16; c < 32; c++) cow(mid).allocated.add(c);
    const blk = await backend(graph, {
      driver: 'copy-on-read',
      ...extra,
      file: { driver: 'cowtest', 'node-name': 'top', file: { driver: 'memory', size: SIZE }, backing: 'mid' },
    });
    await graph.unref(mid);
    return { blk, graph, top: graph.findNode('top')!, mid };
  }

  it('copies data allocated down to bottom, and leaves data from below it in place', async () => {
    const { blk, top } = await threeLayers({ bottom: 'mid' });
    const buf = await blk.read(0, 131072);
    expectPattern(buf.subarray(0, 65536), 0);
    expect(buf.subarray(65536).every((b) => b === 0x55)).toBe(true);
    const alloc = [...cow(top).allocated].sort((a, b) => a - b);
    expect(alloc).toEqual(Array.from({ length: 16 }, (_, i) => 16 + i));
  });

  it('without bottom copies from every layer', async () => {
    const { blk, top } = await threeLayers({});
    await blk.read(0, 131072);
    expect(cow(top).allocated.size).toBe(32);
  });

  it('with bottom = the top image itself copies nothing', async () => {
    const { blk, top } = await threeLayers({ bottom: 'top' });
    await blk.read(0, 131072);
    expect(cow(top).allocated.size).toBe(0);
  });

  it('freezes the chain down to bottom while open', async () => {
    const { blk, graph, top } = await threeLayers({ bottom: 'mid' });
    await expect(graph.detachChild(top.backing!)).rejects.toThrow("Cannot remove frozen 'backing' link");
    await blk.close();
    expect(top.backing?.frozen ?? false).toBe(false);
  });

  it('rejects a bottom that does not exist, is a filter, or is not in the chain', async () => {
    const graph = newGraph();
    cleanups.push(() => graph.closeAll());
    const rw = { 'read-only': false };
    await expect(graph.open({ driver: 'copy-on-read', ...rw, bottom: 'nope', file: { driver: 'memory' } })).rejects.toThrow("Bottom node 'nope' not found");
    const f = await graph.open({ driver: 'blkdebug', 'node-name': 'flt', image: { driver: 'memory' } });
    await expect(graph.open({ driver: 'copy-on-read', ...rw, bottom: 'flt', file: { driver: 'memory' } })).rejects.toThrow("Bottom node 'flt' is a filter");
    const other = await graph.open({ driver: 'memory', 'node-name': 'elsewhere' });
    await expect(graph.open({ driver: 'copy-on-read', ...rw, bottom: 'elsewhere', file: { driver: 'memory' } })).rejects.toThrow(
      "Bottom node 'elsewhere' is not in the backing chain",
    );
    // Failed opens leave nothing behind, and the would-be bottom keeps only its own reference.
    expect([...graph.nodes.values()].some((n) => n.drv.name === 'copy-on-read')).toBe(false);
    expect(other.refcnt).toBe(1);
    await graph.unref(f);
    await graph.unref(other);
  });
});

describe('copy-on-read: insertFilter / removeFilter', () => {
  it('can be put above a live image and taken away again', async () => {
    const graph = newGraph();
    const baseName = store(pattern);
    const blk = await backend(graph, { driver: 'cowtest', 'node-name': 'top', file: { driver: 'memory', size: SIZE }, backing: { driver: 'memory', name: baseName } });
    const top = graph.findNode('top')!;
    const cor = await graph.insertFilter(top, { driver: 'copy-on-read', 'node-name': 'cor' });
    expect(blk.bs).toBe(cor);
    await blk.read(0, 100);
    expect(cow(top).allocated.has(0)).toBe(true);
    await graph.removeFilter(cor);
    expect(blk.bs).toBe(top);
    expect(graph.findNode('cor')).toBeUndefined();
    await blk.read(CLUSTER * 10, 100);
    expect(cow(top).allocated.has(10)).toBe(false);
  });
});
