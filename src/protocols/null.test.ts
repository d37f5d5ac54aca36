import { describe, expect, it } from 'vitest';
import { BlockBackend } from '../core/block-backend.ts';
import { BlockError } from '../core/errors.ts';
import { Graph } from '../core/graph.ts';
import { bdrvBlockStatus } from '../core/io.ts';
import { BLOCK, type BlockdevOptions } from '../core/types.ts';
import { nodeDrivers } from '../drivers-node.ts';
import { NULL_DEFAULT_SIZE, nullCoDriver, type NullNodeState } from './null.ts';

async function open(opts: BlockdevOptions | string): Promise<BlockBackend> {
  const g = new Graph({ drivers: nodeDrivers() });
  return typeof opts === 'string' ? BlockBackend.open(g, opts, { format: 'null-co' }) : BlockBackend.open(g, { driver: 'null-co', ...opts });
}

async function code(p: Promise<unknown>): Promise<string> {
  try {
    await p;
    return 'resolved';
  } catch (e) {
    return e instanceof BlockError ? `${e.code}: ${e.message}` : String(e);
  }
}

describe('null-co', () => {
  it('is 1 GiB by default and takes size as a number or text', async () => {
    expect(NULL_DEFAULT_SIZE).toBe(2 ** 30);
    expect(await (await open({})).getLength()).toBe(2 ** 30);
    expect(await (await open({ size: '64M' })).getLength()).toBe(64 << 20);
    // Lengths are whole sectors: qemu-io -c length on null-co size=12345 prints 12.500 KiB (12 800 bytes).
    expect(await (await open({ size: 12345 })).getLength()).toBe(12_800);
  });

  it('leaves the read buffer untouched unless read-zeroes is on', async () => {
    const blk = await open({});
    const buf = new Uint8Array(4096).fill(0xa5);
    await blk.pread(100, buf);
    expect(buf.every((b) => b === 0xa5)).toBe(true);
    const z = await open({ 'read-zeroes': 'on' });
    await z.pread(100, buf);
    expect(buf.every((b) => b === 0)).toBe(true);
  });

  it('accepts and drops writes, counting them', async () => {
    const blk = await open({ 'read-zeroes': true });
    await blk.pwrite(0, new Uint8Array(512).fill(1));
    expect((await blk.read(0, 512)).every((b) => b === 0)).toBe(true);
    const st = blk.bs!.state<NullNodeState>();
    expect(st.stats.writes).toBe(1);
    expect(st.stats.reads).toBe(1);
    await blk.flush();
    expect(st.stats.flushes).toBe(1);
  });

  it('reports OFFSET_VALID only, plus ZERO with read-zeroes, mapping to itself', async () => {
    const blk = await open({});
    let st = await bdrvBlockStatus(blk.bs!, true, 4096, 8192);
    expect(st.status & ~BLOCK.EOF).toBe(BLOCK.OFFSET_VALID);
    expect(st.map).toBe(4096);
    expect(st.file).toBe(blk.bs);
    expect(st.pnum).toBe(8192);
    const z = await open({ 'read-zeroes': true });
    st = await bdrvBlockStatus(z.bs!, true, 0, 512);
    expect(st.status & ~BLOCK.EOF).toBe(BLOCK.OFFSET_VALID | BLOCK.ZERO | BLOCK.ALLOCATED);
    expect(await nullCoDriver.getAllocatedFileSize!(z.bs!)).toBe(0);
  });

  it('delays requests by latency-ns and rejects negative latencies', async () => {
    const blk = await open({ 'latency-ns': 30_000_000 });
    const t0 = Date.now();
    await blk.pread(0, new Uint8Array(1));
    expect(Date.now() - t0).toBeGreaterThanOrEqual(25);
    expect(await code(open({ 'latency-ns': -1 }))).toBe('EINVAL: latency-ns is invalid');
  });

  it('cancels a delayed request when its signal aborts', async () => {
    const blk = await open({ 'latency-ns': 5_000_000_000 });
    const ac = new AbortController();
    const p = code(blk.pread(0, new Uint8Array(1), { signal: ac.signal }));
    setTimeout(() => ac.abort(), 10);
    expect(await p).toMatch(/^ECANCELED/);
  });

  it("accepts only the filename 'null-co://'", async () => {
    expect(await (await open('null-co://')).getLength()).toBe(2 ** 30);
    expect(await code(open('null-co://x'))).toBe("EINVAL: The only allowed filename for this driver is 'null-co://'");
  });

  it('null-aio behaves the same under its own name', async () => {
    const g = new Graph({ drivers: nodeDrivers() });
    const blk = await BlockBackend.open(g, 'null-aio://', { format: 'null-aio' });
    expect(blk.bs!.drv.name).toBe('null-aio');
    expect(blk.bs!.filename).toBe('null-aio://');
  });
});
