// The inspector's worker service through comlink in Node (the browser runs
// it in the engine worker; see e2e/inspector.spec.ts): qcow2 header, tables
// and host layout of an image QEMU wrote, host bytes, the partition table,
// capabilities with their reasons, and compare against qemu-img compare,
// with progress and cancellation.

import { spawnSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { connectInspector, type InspectorClient } from '../client/inspect.ts';
import { EngineClient } from '../client/engine.ts';
import { BlockError } from '../core/errors.ts';
import { denyAllGate } from '../core/graph.ts';
import { qcow2Driver } from '../formats/qcow2/index.ts';
import { QEMU_IMG, qemuImg, qemuIo, requireQemu, scratchDir } from '../formats/qcow2/testing.ts';
import { rawDriver } from '../formats/raw.ts';
import { blobDriver } from '../protocols/blob.ts';
import { memoryDriver } from '../protocols/memory.ts';
import { exposeEngine } from './index.ts';

const tmp = scratchDir();
let client: EngineClient;
let inspector: InspectorClient;
let ports: MessageChannel;

beforeAll(() => {
  requireQemu();
  qemuImg(tmp.dir, 'create', '-q', '-f', 'qcow2', 'a.qcow2', '16M');
  qemuIo(tmp.dir, 'a.qcow2', 'write -q -P 7 0 128k', 'write -q -c -P 8 1M 64k', 'write -q -z 2M 64k');
  qemuImg(tmp.dir, 'create', '-q', '-f', 'qcow2', 'c.qcow2', '16M');
  qemuImg(tmp.dir, 'bitmap', '--add', 'c.qcow2', 'b0');
  qemuImg(tmp.dir, 'bitmap', '--add', '-g', '1M', 'c.qcow2', 'big');
  qemuImg(tmp.dir, 'bitmap', '--add', 'c.qcow2', 'off');
  qemuImg(tmp.dir, 'bitmap', '--disable', 'c.qcow2', 'off');
  qemuIo(tmp.dir, 'c.qcow2', 'write -q -P 1 1M 128k', 'write -q -P 2 5M 4k');
  qemuImg(tmp.dir, 'create', '-q', '-f', 'qcow2', 'b.qcow2', '16M');
  qemuIo(tmp.dir, 'b.qcow2', 'write -q -P 7 0 128k', 'write -q -P 8 1M 64k', 'write -q -P 9 5M 512');
});
afterAll(() => tmp.cleanup());

beforeEach(async () => {
  ports = new MessageChannel();
  exposeEngine(ports.port1, { drivers: [memoryDriver, blobDriver, rawDriver, qcow2Driver], gate: denyAllGate, defaultProtocol: 'memory' });
  client = new EngineClient({ worker: ports.port2, closeOnPagehide: false });
  inspector = await connectInspector(client);
});

afterEach(async () => {
  inspector.dispose();
  await client.closeAll();
  ports.port1.close();
  ports.port2.close();
});

/** Opens a file of the scratch directory as a Blob image. */
async function openBlob(name: string): Promise<string> {
  const s = await client.open({ blob: new Blob([readFileSync(tmp.path(name))]) });
  return s.id;
}

describe('inspector service', () => {
  it('decodes the header, L1, L2, refcounts and host layout of a QEMU image', async () => {
    const id = await openBlob('a.qcow2');
    const hv = await inspector.header(id);
    expect(hv.virtualSize).toBe(16 << 20);
    expect(hv.clusterSize).toBe(65536);
    const l1 = await inspector.l1(id, 0, 10);
    expect(l1).toHaveLength(1);
    const l2 = await inspector.l2(id, 0, 0, 40);
    expect(l2[0]!.type).toBe('normal');
    expect(l2[16]!.type).toBe('compressed');
    expect(l2[32]!.type).toBe('zero');
    const map = JSON.parse(qemuImg(tmp.dir, 'map', '--output=json', 'a.qcow2')) as Array<{ start: number; offset?: number }>;
    expect(l2[0]!.hostOffset).toBe(map[0]!.offset);
    expect((await inspector.refcounts(id, l2[0]!.hostOffset! / 65536, 1))[0]).toBe(1);
    const ticks: number[] = [];
    const layout = await inspector.hostLayout(id, 0, { progress: (d) => ticks.push(d) });
    expect(layout.find((x) => x.kind === 'data')?.guestOffset).toBe(0);
    expect(layout.some((x) => x.kind === 'compressed')).toBe(true);
    // The host bytes are the file's bytes.
    const file = readFileSync(tmp.path('a.qcow2'));
    const bytes = await inspector.readHost(id, 65536, 4096);
    expect(Buffer.from(bytes).equals(file.subarray(65536, 65536 + 4096))).toBe(true);
    const layers = await inspector.layers(id);
    expect(layers).toEqual([expect.objectContaining({ layer: 0, format: 'qcow2', protocol: 'blob' })]);
    // The engine may count the file in whole sectors, as QEMU does; reads stop at the length it counts.
    const fileLength = layers[0]!.fileLength;
    expect(fileLength - file.length).toBeGreaterThanOrEqual(0);
    expect(fileLength - file.length).toBeLessThan(512);
    expect(await inspector.readHost(id, fileLength - 10, 100)).toHaveLength(10);
  });

  it('says what the engine can do, and why not', async () => {
    const id = await openBlob('a.qcow2');
    const caps = await inspector.capabilities(id);
    expect(caps.tables.ok).toBe(true);
    expect(caps.check.ok).toBe(true);
    expect(caps.repair).toEqual({ ok: false, reason: expect.stringMatching(/only images in the library are changed/) });
    expect(caps.convert.qcow2?.ok).toBe(true);
    expect(caps.convert.raw?.ok).toBe(true);
    expect(caps.commit).toEqual({ ok: false, reason: 'The image has no backing file to commit into' });
    expect((await inspector.formats()).map((f) => f.name).sort()).toEqual(['qcow2', 'raw']);
    expect(await inspector.httpStats(id)).toBeUndefined();
    const raw = await client.open({ blob: new Blob([new Uint8Array(1 << 20)]) }, { format: 'raw' });
    const rc = await inspector.capabilities(raw.id);
    expect(rc.tables).toEqual({ ok: false, reason: 'raw images have no L1/L2 or refcount tables' });
    await expect(inspector.header(raw.id)).rejects.toMatchObject({ code: 'ENOTSUP' });
  });

  it('lists bitmaps and reads their dirty areas as QEMU stored them', async () => {
    const id = await openBlob('c.qcow2');
    expect(await inspector.bitmaps(id)).toEqual([
      { name: 'b0', granularity: 65536, flags: ['auto'], inFile: true },
      { name: 'big', granularity: 1 << 20, flags: ['auto'], inFile: true },
      { name: 'off', granularity: 65536, flags: [], inFile: true },
    ]);
    expect(await inspector.bitmapDirty(id, 'b0')).toEqual({ name: 'b0', granularity: 65536, flags: ['auto'], runs: [[1 << 20, 128 << 10], [5 << 20, 64 << 10]], dirtyBytes: 192 << 10, truncated: false });
    const big = await inspector.bitmapDirty(id, 'big');
    expect([big.runs, big.dirtyBytes]).toEqual([[[1 << 20, 1 << 20], [5 << 20, 1 << 20]], 2 << 20]);
    const off = await inspector.bitmapDirty(id, 'off');
    expect([off.runs, off.dirtyBytes, off.flags]).toEqual([[], 0, []]);
    await expect(inspector.bitmapDirty(id, 'nope')).rejects.toMatchObject({ code: 'ENOENT', message: "Dirty bitmap 'nope' not found" });
  });

  it('refuses to change images outside the library, with the code and reason crossing to the page', async () => {
    const id = await openBlob('c.qcow2');
    const caps = await inspector.capabilities(id);
    for (const k of ['snapshots', 'bitmaps', 'write', 'rebase'] as const) expect(caps[k]).toEqual({ ok: false, reason: expect.stringMatching(/only images in the library are changed/) });
    for (const call of [() => inspector.snapshotCreate(id, 's'), () => inspector.snapshotApply(id, 's'), () => inspector.snapshotDelete(id, 's'), () => inspector.bitmap(id, 'b1', [{ op: 'add' }])]) {
      const err = await call().catch((e: unknown) => e);
      expect(err).toBeInstanceOf(BlockError);
      expect(err).toMatchObject({ code: 'EACCES', message: expect.stringMatching(/changes the image, and only images in the library are changed/) });
    }
    expect(await inspector.snapshots(id)).toEqual([]);
  });

  it('reads the partition table of the guest disk', async () => {
    const disk = new Uint8Array(8 << 20);
    disk[446 + 4] = 0x83;
    new DataView(disk.buffer).setUint32(446 + 8, 2048, true);
    new DataView(disk.buffer).setUint32(446 + 12, 4096, true);
    disk[510] = 0x55;
    disk[511] = 0xaa;
    const s = await client.open({ blob: new Blob([disk]) }, { format: 'raw' });
    const pt = await inspector.partitions(s.id);
    expect(pt?.scheme).toBe('mbr');
    expect(pt?.partitions.map((p) => [p.start, p.size, p.typeName])).toEqual([[2048 * 512, 4096 * 512, 'Linux']]);
    expect(await inspector.partitions(await openBlob('a.qcow2'))).toBeNull();
  });

  it('compares images as qemu-img compare does, and can be cancelled', async () => {
    const a = await openBlob('a.qcow2');
    const b = await openBlob('b.qcow2');
    const a2 = await openBlob('a.qcow2');
    const same = await inspector.compare(a, a2);
    expect(same).toEqual({ identical: true, lines: ['Images are identical.'] });
    const diff = await inspector.compare(a, b);
    // qemu-img compare exits 1 for different images; its stdout is what we want.
    const theirs = spawnSync(QEMU_IMG, ['compare', '-f', 'qcow2', '-F', 'qcow2', 'a.qcow2', 'b.qcow2'], { cwd: tmp.dir, encoding: 'utf8' }).stdout.trim();
    expect(diff.identical).toBe(false);
    expect(diff.lines.join('\n')).toBe(theirs);
    const ctrl = new AbortController();
    ctrl.abort();
    const err = await inspector.compare(a, b, { signal: ctrl.signal }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(BlockError);
    expect((err as BlockError).code).toBe('ECANCELED');
  });
});
