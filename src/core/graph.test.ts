import { describe, expect, it } from 'vitest';
import { BlockBackend } from './block-backend.ts';
import { BlockError } from './errors.ts';
import { Graph } from './graph.ts';
import { bdrvBlockStatusAbove, bdrvIsAllocatedAbove } from './io.ts';
import { BLOCK, PERM } from './types.ts';
import { testDrivers, tstore } from './testing/drivers.ts';

let seq = 0;
const uniq = (p: string): string => `${p}${seq++}`;
const graph = (): Graph => new Graph({ drivers: testDrivers(), defaultProtocol: 'tstore' });

describe('permissions', () => {
  it('reports a conflict naming both users and the permission', async () => {
    const g = graph();
    const name = uniq('p');
    const bs = await g.open({ driver: 'tstore', 'node-name': 'disk0', name, size: 4096, 'read-only': false }, 0);
    const a = new BlockBackend(g, { name: 'alpha', perm: PERM.CONSISTENT_READ | PERM.WRITE, sharedPerm: PERM.CONSISTENT_READ });
    a.insertNode(bs);
    const b = new BlockBackend(g, { name: 'beta', perm: PERM.CONSISTENT_READ | PERM.WRITE, sharedPerm: PERM.ALL });
    let e: unknown;
    try { b.insertNode(bs); } catch (x) { e = x; }
    expect(e).toBeInstanceOf(BlockError);
    expect((e as BlockError).code).toBe('EPERM');
    expect((e as BlockError).message).toBe(
      "Permission conflict on node 'disk0': permissions 'write' are both required by block device 'beta' (uses node 'disk0' as 'root' child) and unshared by block device 'alpha' (uses node 'disk0' as 'root' child).",
    );
    // The failed attach left nothing behind: a reader that shares everything still fits.
    expect(bs.parents.length).toBe(1);
    const c = new BlockBackend(g, { perm: PERM.CONSISTENT_READ, sharedPerm: PERM.ALL });
    c.insertNode(bs);
    expect(bs.parents.length).toBe(2);
    await c.close();
    await a.close();
  });

  it('refuses write permission on a read-only node', async () => {
    const g = graph();
    const bs = await g.open({ driver: 'tstore', name: uniq('ro'), size: 512 }, 0);
    expect(bs.readOnly).toBe(true);
    const b = new BlockBackend(g, { perm: PERM.CONSISTENT_READ | PERM.WRITE });
    expect(() => b.insertNode(bs)).toThrow('Block node is read-only');
  });

  it('propagates a format node user write permission down to its file', async () => {
    const g = graph();
    const blk = await BlockBackend.open(g, { driver: 'tfmt', size: 1 << 20, file: { driver: 'tstore', name: uniq('f') } });
    const file = blk.bs!.file!;
    expect(file.perm & PERM.WRITE).toBeTruthy();
    expect(file.sharedPerm & PERM.WRITE).toBe(0);
    // Another writer on the protocol node conflicts with the format's metadata writes.
    const other = new BlockBackend(g, { name: 'intruder', perm: PERM.CONSISTENT_READ | PERM.WRITE });
    expect(() => other.insertNode(file.bs)).toThrow(/permissions 'write' are both required by block device 'intruder'/);
    await blk.close();
  });
});

describe('graph', () => {
  it('names nodes automatically and validates given names', async () => {
    const g = graph();
    const a = await g.open({ driver: 'tstore', name: uniq('n') });
    expect(a.nodeName).toMatch(/^#block\d{3}$/);
    await expect(g.open({ driver: 'tstore', 'node-name': '1bad', name: uniq('n') })).rejects.toThrow("Invalid node-name: '1bad'");
    await g.open({ driver: 'tstore', 'node-name': 'same', name: uniq('n') });
    await expect(g.open({ driver: 'tstore', 'node-name': 'same', name: uniq('n') })).rejects.toThrow("Duplicate nodes with node-name='same'");
    await expect(g.open({ driver: 'tstore', name: uniq('n'), bogus: 1 })).rejects.toThrow("Block protocol 'tstore' doesn't support the option 'bogus'");
  });

  it('rejects detect-zeroes=unmap without discard=unmap', async () => {
    const g = graph();
    await expect(g.open({ driver: 'tstore', name: uniq('dz'), 'detect-zeroes': 'unmap' })).rejects.toThrow(
      'setting detect-zeroes to unmap is not allowed without setting discard operation to unmap',
    );
  });

  it('inserts and removes a filter above a node without disturbing its users', async () => {
    const g = graph();
    const blk = await BlockBackend.open(g, { driver: 'tstore', 'node-name': 'base', name: uniq('flt'), size: 8192 });
    await blk.pwrite(0, new Uint8Array(512).fill(7));
    const base = blk.bs!;
    const f = await g.insertFilter(base, { driver: 'tfilter', 'node-name': 'flt' });
    expect(blk.bs).toBe(f);
    expect(f.file!.bs).toBe(base);
    expect((await blk.read(0, 512))[100]).toBe(7);
    await blk.pwrite(512, new Uint8Array(512).fill(9));
    await g.removeFilter(f);
    expect(blk.bs).toBe(base);
    expect(g.findNode('flt')).toBeUndefined();
    expect((await blk.read(512, 512))[0]).toBe(9);
    await blk.close();
    expect(g.nodes.size).toBe(0);
  });

  it('keeps the old state when a reopen fails', async () => {
    const g = graph();
    const name = uniq('re');
    const blk = await BlockBackend.open(g, { driver: 'tfmt', 'node-name': 'top', size: 65536, file: { driver: 'tstore', name, 'node-name': 'proto' } }, { readOnly: true });
    const top = blk.bs!;
    const proto = top.file!.bs;
    expect(top.readOnly && proto.readOnly).toBe(true);
    const before = { perm: top.file!.perm, shared: top.file!.sharedPerm };
    tstore(name).failReopen = true;
    await expect(g.reopen(top, { readOnly: false })).rejects.toThrow('injected reopen failure');
    expect(top.readOnly).toBe(true);
    expect(proto.readOnly).toBe(true);
    expect({ perm: top.file!.perm, shared: top.file!.sharedPerm }).toEqual(before);
    tstore(name).failReopen = false;
    await g.reopen(top, { readOnly: false });
    expect(top.readOnly).toBe(false);
    expect(proto.readOnly).toBe(false);
    expect(top.file!.perm & PERM.WRITE).toBeTruthy();
    await blk.close();
  });

  it('refuses to make a node read-only while a writer uses it', async () => {
    const g = graph();
    const blk = await BlockBackend.open(g, { driver: 'tstore', name: uniq('w'), size: 512 });
    await expect(g.reopen(blk.bs!, { readOnly: true })).rejects.toThrow('Cannot make block node read-only, there is a writer on it');
    expect(blk.bs!.readOnly).toBe(false);
    await blk.close();
  });

  it('opens names from inside images only through the gate', async () => {
    const g = graph();
    const name = uniq('gate');
    await expect(g.open({ driver: 'tfmt', 'backing-name': 'base.img', file: { driver: 'tstore', name } })).rejects.toThrow(/backing file 'base.img'.*not allowed/);
    const seen: string[] = [];
    g.gate = {
      resolve(req) {
        seen.push(`${req.kind}:${req.name}`);
        return { driver: 'tstore', filename: `tstore:${req.name}` };
      },
    };
    const bs = await g.open({ driver: 'tfmt', 'backing-name': 'base.img', 'backing-fmt': 'tstore', file: { driver: 'tstore', name } });
    expect(seen).toEqual(['backing:base.img']);
    expect(bs.backing?.bs.readOnly).toBe(true);
    await g.unref(bs);
  });

  it('closes parents before children and leaves no nodes', async () => {
    const g = graph();
    const order: string[] = [];
    const blk = await BlockBackend.open(g, { driver: 'tfmt', 'node-name': 'fmt', size: 65536, file: { driver: 'tstore', 'node-name': 'proto', name: uniq('c') } });
    const fmt = blk.bs!;
    const proto = fmt.file!.bs;
    const wrap = (n: typeof fmt): void => {
      const d = n.drv;
      (n as { drv: typeof d }).drv = { ...d, close: async () => { order.push(n.nodeName); } };
    };
    wrap(fmt);
    wrap(proto);
    await blk.close();
    expect(order).toEqual(['fmt', 'proto']);
    expect(g.nodes.size).toBe(0);
  });
});

describe('block status through a backing chain', () => {
  it('reports allocation depth and falls through unallocated layers', async () => {
    const g = graph();
    g.gate = { resolve: (req) => ({ driver: 'tstore', filename: `tstore:${req.name}` }) };
    const baseName = uniq('base');
    const base = await BlockBackend.open(g, { driver: 'tfmt', 'node-name': 'b', size: 4 * 65536, file: { driver: 'tstore', name: baseName } });
    await base.pwrite(65536, new Uint8Array(65536).fill(1));
    const top = await BlockBackend.open(g, { driver: 'tfmt', 'node-name': 't', size: 4 * 65536, file: { driver: 'tstore', name: uniq('top') }, backing: 'b' });
    await top.pwrite(3 * 65536, new Uint8Array(100).fill(2));
    const t = top.bs!;
    expect(await bdrvIsAllocatedAbove(t, null, false, 0, 65536)).toEqual({ depth: 0, pnum: 65536 });
    expect(await bdrvIsAllocatedAbove(t, null, false, 65536, 65536)).toEqual({ depth: 2, pnum: 65536 });
    expect(await bdrvIsAllocatedAbove(t, null, false, 3 * 65536, 65536)).toEqual({ depth: 1, pnum: 65536 });
    const st = await bdrvBlockStatusAbove(t, null, false, true, 65536, 3 * 65536);
    expect(st.status & BLOCK.DATA).toBeTruthy();
    expect(st.file).toBe(base.bs!.file!.bs);
    const last = await bdrvBlockStatusAbove(t, null, false, true, 3 * 65536, 65536);
    expect(last.status & BLOCK.EOF).toBeTruthy();
    expect((await top.read(65536, 4))[0]).toBe(1);
    await top.close();
    await base.close();
  });
});

describe('reopen of children', () => {
  it('makes the file writable again after -r then -w, but keeps a child the user opened read-only', async () => {
    const g = graph();
    const blk = await BlockBackend.open(g, { driver: 'tfmt', size: 65536, file: { driver: 'tstore', name: uniq('rr') } }, { readOnly: true });
    const top = blk.bs!;
    await g.reopen(top, { readOnly: false });
    await g.reopen(top, { readOnly: true });
    await g.reopen(top, { readOnly: false });
    expect(top.file!.bs.readOnly).toBe(false);
    await blk.close();
    const pinned = await g.open({ driver: 'tfmt', size: 65536, file: { driver: 'tstore', name: uniq('pin'), 'read-only': true } });
    await g.reopen(pinned, { readOnly: false }).catch(() => undefined);
    expect(pinned.file!.bs.readOnly).toBe(true);
    await g.unref(pinned);
  });

  it('opens a storage child given only a filename as a protocol node, without probing', async () => {
    const g = graph();
    const bs = await g.open({ driver: 'tfmt', size: 65536, file: { filename: `tstore:${uniq('fn')}` } });
    expect(bs.file!.bs.drv.name).toBe('tstore');
    await g.unref(bs);
  });

  it("refuses copy-on-read on a read-only device with QEMU's message", async () => {
    const g = graph();
    await expect(g.open({ driver: 'tstore', name: uniq('cor') }, 0x0400)).rejects.toThrow("Can't use copy-on-read on read-only device");
  });
});
