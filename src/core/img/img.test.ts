/**
 * The engine operations behind qblock-img, driven the way a browser front
 * end would: a graph with the memory protocol, raw and qcow2, no CLI.
 */
import { describe, expect, it } from 'vitest';
import { BlockBackend } from '../block-backend.ts';
import { BlockError } from '../errors.ts';
import { bdrvIsAllocated } from '../io.ts';
import { Graph } from '../graph.ts';
import { nodeDrivers } from '../../drivers-node.ts';
import { runBitmapActions } from './bitmap.ts';
import { commitImage, rebaseImage } from './chain.ts';
import { checkImage } from './check.ts';
import { compareBuffers, compareImages, findNonzero } from './compare.ts';
import { convertCopy, isAllocatedSectors, isAllocatedSectorsMin } from './convert.ts';
import { CreateOptionSet, createOptionHelp, hasHelpOption, HintedError, imgCreate, isValidOptionList, splitOpts } from './create.ts';
import { ddOutputSize } from './dd.ts';
import { toolGate } from './gate.ts';
import { queryImageInfo } from './info.ts';
import { measureImage } from './measure.ts';
import { openBackend, parseJsonFilename, parseOptionString } from './open.ts';
import { reopenBackend } from './reopen.ts';
import { resizeImage, ShrinkRefused } from './resize.ts';
import { applySnapshot, createSnapshot, deleteSnapshot, listSnapshots } from './snapshot.ts';

let seq = 0;
/** A unique memory: name per test, so stores never collide. */
function mem(tag: string): string {
  return `memory:img-test-${tag}-${++seq}`;
}

function graph(): Graph {
  return new Graph({ drivers: nodeDrivers(), defaultProtocol: 'file', gate: toolGate });
}

async function rawImage(g: Graph, size: number, fill?: (blk: BlockBackend) => Promise<void>): Promise<string> {
  const name = mem('raw');
  await imgCreate(g, { filename: name, fmt: 'raw', size });
  if (fill) {
    const blk = await openBackend(g, { filename: name, format: 'raw' });
    await fill(blk);
    await blk.close();
  }
  return name;
}

describe('create', () => {
  it('prints the Formatting line from the merged option list', async () => {
    const g = graph();
    const lines: string[] = [];
    const name = mem('c');
    await imgCreate(g, { filename: name, fmt: 'raw', options: 'preallocation=full', size: 65536, onFormatting: (l) => lines.push(l) });
    expect(lines).toEqual([`Formatting '${name}', fmt=raw size=65536 preallocation=full`]);
  });

  it('refuses a second size and unknown options with QEMU messages', async () => {
    const g = graph();
    await expect(imgCreate(g, { filename: mem('c'), fmt: 'raw', options: 'size=1M', size: 1 })).rejects.toThrow('The image size must be specified only once');
    await expect(imgCreate(g, { filename: mem('c'), fmt: 'raw', options: 'foo=1', size: 1 })).rejects.toThrow("Invalid parameter 'foo'");
    await expect(imgCreate(g, { filename: mem('c'), fmt: 'raw' })).rejects.toThrow('Image creation needs a size parameter');
    await expect(imgCreate(g, { filename: mem('c'), fmt: 'raw', backingFile: 'x', size: 1 })).rejects.toThrow("Backing file not supported for file format 'raw'");
  });

  it('hints when a backing file cannot be opened', async () => {
    const g = graph();
    const e = await imgCreate(g, { filename: mem('q'), fmt: 'qcow2', backingFile: '/nonexistent-qblock-dir/missing.raw', backingFmt: 'raw' }).catch((x: unknown) => x);
    expect(e).toBeInstanceOf(HintedError);
    expect((e as HintedError).hint).toBe('Could not open backing image.\n');
  });

  it('parses option lists like QemuOpts', () => {
    expect(splitOpts('a=1,b=x,,y,c')).toEqual([['a', '1'], ['b', 'x,y'], ['c', 'on']]);
    expect(isValidOptionList('a=1,')).toBe(false);
    expect(isValidOptionList('a=x,,')).toBe(true);
    expect(isValidOptionList('')).toBe(false);
    expect(hasHelpOption('size=1,help')).toBe(true);
    expect(hasHelpOption('help=off')).toBe(false);
  });

  it('prints set values, else defaults, in declaration order', () => {
    const set = new CreateOptionSet([{ name: 'b', type: 'size' }, { name: 'a', type: 'bool', defaultValue: 'off' }], [{ name: 'b', type: 'string' }, { name: 'c', type: 'string' }]);
    set.set('b', '1k');
    set.set('c', 'x');
    expect(set.print()).toBe('b=1024 a=off c=x');
  });

  it('lists option help sorted, with the protocol options when a file is named', () => {
    const g = graph();
    expect(createOptionHelp(g, 'raw')).toBe('Supported raw options:\n  size=<size>            - Virtual disk size\n\nThe protocol level may support further options.\nSpecify the target filename to include those options.\n');
    expect(createOptionHelp(g, 'raw', 'x.raw')).toContain('  nocow=<bool (on/off)>  - Turn off copy-on-write (valid only on btrfs)\n');
  });
});

describe('info', () => {
  it('reports size, format and driver info with QAPI names', async () => {
    const g = graph();
    const name = await rawImage(g, 1 << 20);
    const blk = await openBackend(g, { filename: name, format: 'raw', readOnly: true });
    const info = await queryImageInfo(blk.bs!);
    expect(info).toMatchObject({ filename: name, format: 'raw', 'virtual-size': 1 << 20, 'dirty-flag': false });
    await blk.close();
  });

  it('includes qcow2 specific info and the backing file', async () => {
    const g = graph();
    const base = await rawImage(g, 1 << 20);
    const top = mem('top');
    await imgCreate(g, { filename: top, fmt: 'qcow2', backingFile: base, backingFmt: 'raw' });
    const blk = await openBackend(g, { filename: top, readOnly: true, noBacking: true });
    const info = await queryImageInfo(blk.bs!);
    expect(info['backing-filename']).toBe(base);
    expect(info['backing-filename-format']).toBe('raw');
    expect(info['cluster-size']).toBe(65536);
    expect(info['format-specific']?.type).toBe('qcow2');
    await blk.close();
  });
});

describe('compare', () => {
  it('finds the first differing sector', async () => {
    const g = graph();
    const a = await rawImage(g, 1 << 20);
    const b = await rawImage(g, 1 << 20, (blk) => blk.pwrite(70000, new Uint8Array([1])));
    const lines: string[] = [];
    const A = await openBackend(g, { filename: a, format: 'raw', readOnly: true });
    const B = await openBackend(g, { filename: b, format: 'raw', readOnly: true });
    expect(await compareImages({ blk: A, filename: a }, { blk: B, filename: b }, { say: (l) => lines.push(l) })).toBe(1);
    expect(lines).toEqual(['Content mismatch at offset 69632!']);
    lines.length = 0;
    expect(await compareImages({ blk: A, filename: a }, { blk: A, filename: a }, { say: (l) => lines.push(l) })).toBe(0);
    expect(lines).toEqual(['Images are identical.']);
  });

  it('compares at 512-byte granularity', () => {
    const x = new Uint8Array(2048);
    const y = new Uint8Array(2048);
    y[1500] = 1;
    expect(compareBuffers(x, y, 2048)).toEqual({ differ: false, pnum: 1024 });
    expect(findNonzero(y)).toBe(1024);
    expect(findNonzero(new Uint8Array(700))).toBe(-1);
  });
});

describe('convert', () => {
  it('copies data, skipping zero runs when the target reads as zeroes', async () => {
    const g = graph();
    const src = await rawImage(g, 4 << 20, async (blk) => {
      await blk.pwrite(0, new Uint8Array(4096).fill(7));
      await blk.pwrite(3 << 20, new Uint8Array(512).fill(9));
    });
    const dst = await rawImage(g, 4 << 20);
    const s = await openBackend(g, { filename: src, format: 'raw', readOnly: true });
    const t = await openBackend(g, { filename: dst, format: 'raw', unmap: true });
    const pct: number[] = [];
    await convertCopy({ sources: [{ blk: s, name: src }], target: t, hasZeroInit: false, targetIsNew: true, targetHasBacking: false, compressed: false, minSparse: 8, numCoroutines: 8, inOrder: true, salvage: false, quiet: true, progress: (p) => pct.push(p) });
    const out = await t.read(0, 4 << 20);
    expect(out[0]).toBe(7);
    expect(out[4095]).toBe(7);
    expect(out[4096]).toBe(0);
    expect(out[3 << 20]).toBe(9);
    expect(pct[pct.length - 1]).toBe(100);
    await s.close();
    await t.close();
  });

  it('finds allocated runs the way QEMU aligns them', () => {
    const buf = new Uint8Array(16 * 512);
    buf[3 * 512] = 1;
    expect(isAllocatedSectors(buf, 16, 0, 1)).toEqual({ data: false, pnum: 3 });
    expect(isAllocatedSectors(buf.subarray(3 * 512), 13, 3, 8)).toEqual({ data: true, pnum: 5 });
    expect(isAllocatedSectorsMin(buf.subarray(3 * 512), 13, 8, 3, 1)).toEqual({ data: true, pnum: 1 });
  });
});

describe('dd, measure, resize, check', () => {
  it('sizes dd output with qemu-img dd quirks', () => {
    expect(ddOutputSize(1 << 20, { bs: 65536, count: 1, skip: 1 })).toEqual({ size: 65536, outSize: 0, skipBeyond: false });
    expect(ddOutputSize(1 << 20, { bs: 512, skip: 300 }).outSize).toBe(894976);
    expect(ddOutputSize(1 << 20, { bs: 65536, skip: 100 }).skipBeyond).toBe(true);
  });

  it('measures raw like QEMU', async () => {
    const g = graph();
    expect(await measureImage(g, { fmt: 'raw', size: 1000 })).toMatchObject({ required: 1024, fullyAllocated: 1024 });
  });

  it('refuses to shrink without permission', async () => {
    const g = graph();
    const name = await rawImage(g, 1 << 20);
    const blk = await openBackend(g, { filename: name, format: 'raw', resize: true });
    await expect(resizeImage(blk, { size: 512 << 10, relative: 0, shrink: false, prealloc: 'off' })).rejects.toBeInstanceOf(ShrinkRefused);
    await resizeImage(blk, { size: 1 << 20, relative: 1, shrink: false, prealloc: 'off' });
    expect(await blk.getLength()).toBe(2 << 20);
    await expect(resizeImage(blk, { size: 3 << 20, relative: -1, shrink: true, prealloc: 'off' })).rejects.toThrow('New image size must be positive');
    await blk.close();
  });

  it('reports that raw has no checks', async () => {
    const g = graph();
    const name = await rawImage(g, 65536);
    const blk = await openBackend(g, { filename: name, format: 'raw', readOnly: true });
    await expect(checkImage(blk.bs!, name, undefined)).rejects.toMatchObject({ code: 'ENOTSUP' });
    await blk.close();
  });
});

describe('capabilities the engine lacks', () => {
  it('gives QEMU messages for raw snapshots; qcow2 creates, applies and deletes them', async () => {
    const g = graph();
    const raw = await rawImage(g, 65536);
    const r = await openBackend(g, { filename: raw, format: 'raw' });
    await expect(createSnapshot(r.bs!, 's1')).rejects.toThrow("Could not create snapshot 's1': -95 (Operation not supported)");
    await expect(applySnapshot(r.bs!, 's1')).rejects.toThrow("Could not apply snapshot 's1': Block driver does not support snapshots");
    await expect(deleteSnapshot(r.bs!, 's1')).rejects.toThrow("Could not delete snapshot 's1': snapshot not found");
    expect(await listSnapshots(r.bs!)).toEqual([]);
    await r.close();
    const q = mem('q');
    await imgCreate(g, { filename: q, fmt: 'qcow2', size: 1 << 20 });
    const blk = await openBackend(g, { filename: q });
    // qcow2 keeps internal snapshots: create, apply and delete work.
    await createSnapshot(blk.bs!, 's1');
    expect((await listSnapshots(blk.bs!)).map((s) => [s.id, s.name])).toEqual([['1', 's1']]);
    await applySnapshot(blk.bs!, 's1');
    await deleteSnapshot(blk.bs!, 's1');
    expect(await listSnapshots(blk.bs!)).toEqual([]);
    await blk.close();
  });

  it('commits without -d by emptying the top, which then reads through to the base', async () => {
    const g = graph();
    const base = await rawImage(g, 1 << 20);
    const top = mem('top');
    await imgCreate(g, { filename: top, fmt: 'qcow2', backingFile: base, backingFmt: 'raw' });
    const blk = await openBackend(g, { filename: top });
    await blk.pwrite(4096, new Uint8Array(512).fill(3));
    await commitImage(blk, { filename: top });
    // The top no longer holds the cluster: the bytes come from the base, where the commit put them.
    expect((await bdrvIsAllocated(blk.bs!, 0, 65536)).allocated).toBe(false);
    expect((await blk.read(4096, 1))[0]).toBe(3);
    await blk.close();
    const b = await openBackend(g, { filename: base, format: 'raw', readOnly: true });
    expect((await b.read(4096, 1))[0]).toBe(3);
    await b.close();
  });

  it('commits with -d and leaves the top as it was', async () => {
    const g = graph();
    const base = await rawImage(g, 1 << 20);
    const top = mem('top');
    await imgCreate(g, { filename: top, fmt: 'qcow2', backingFile: base, backingFmt: 'raw' });
    const blk = await openBackend(g, { filename: top });
    await blk.pwrite(4096, new Uint8Array(512).fill(3));
    await commitImage(blk, { filename: top, drop: true });
    expect((await bdrvIsAllocated(blk.bs!, 0, 65536)).allocated).toBe(true);
    await blk.close();
    const b = await openBackend(g, { filename: base, format: 'raw', readOnly: true });
    expect((await b.read(4096, 1))[0]).toBe(3);
    await b.close();
  });

  it('rebases a qcow2 overlay in unsafe mode by rewriting its backing file reference', async () => {
    const g = graph();
    const base = await rawImage(g, 1 << 20);
    const other = await rawImage(g, 1 << 20);
    const top = mem('top');
    await imgCreate(g, { filename: top, fmt: 'qcow2', backingFile: base, backingFmt: 'raw' });
    const blk = await openBackend(g, { filename: top });
    await rebaseImage(g, blk, { backing: other, backingFmt: 'raw', unsafe: true, filename: top });
    await blk.close();
    const again = await openBackend(g, { filename: top, readOnly: true });
    expect(again.bs!.backingFile).toBe(other);
    expect(again.bs!.backingFormat).toBe('raw');
    await again.close();
  });

  it('says why bitmap operations fail', async () => {
    const g = graph();
    const raw = await rawImage(g, 65536);
    const blk = await openBackend(g, { filename: raw, format: 'raw' });
    await expect(runBitmapActions(blk.bs!, 'b0', [{ op: 'add' }])).rejects.toThrow(/^Operation add on bitmap b0 failed: Can't store persistent bitmaps to .*: Operation not supported$/);
    await expect(runBitmapActions(blk.bs!, 'b0', [{ op: 'remove' }])).rejects.toThrow("Dirty bitmap 'b0' not found");
    await blk.close();
  });
});

describe('open', () => {
  it('crumples option strings into nested options and lists', () => {
    expect(parseOptionString('driver=raw,file.filename=x,,y,file.inject-error.0.event=read_aio,read-only=on')).toEqual({
      driver: 'raw',
      file: { filename: 'x,y', 'inject-error': [{ event: 'read_aio' }] },
      'read-only': true,
    });
    const warnings: string[] = [];
    expect(parseOptionString('foo', (w) => warnings.push(w))).toEqual({ foo: 'on' });
    expect(warnings).toEqual(["short-form boolean option 'foo' deprecated\nPlease use foo=on instead"]);
  });

  it('reads json: names in nested and dotted spellings', () => {
    expect(parseJsonFilename('json:{"driver":"raw","file.filename":"a"}')).toEqual({ driver: 'raw', file: { filename: 'a' } });
    expect(parseJsonFilename('plain')).toBeUndefined();
    expect(() => parseJsonFilename('json:[1]')).toThrow(BlockError);
  });

  it('refuses read-only=on when the tool asked for write access', async () => {
    const g = graph();
    const name = await rawImage(g, 65536);
    await expect(openBackend(g, { imageOpts: true, filename: `driver=raw,file.driver=memory,file.filename=${name},read-only=on` })).rejects.toThrow('Block node is read-only');
  });

  it('opens a discardable overlay in snapshot mode', async () => {
    const g = graph();
    const name = await rawImage(g, 1 << 20);
    const blk = await openBackend(g, { filename: name, format: 'raw', snapshot: true });
    await blk.pwrite(0, new Uint8Array(4096).fill(5));
    expect((await blk.read(0, 1))[0]).toBe(5);
    await blk.close();
    const again = await openBackend(g, { filename: name, format: 'raw', readOnly: true });
    expect((await again.read(0, 1))[0]).toBe(0);
    await again.close();
  });

  it('refuses options a driver cannot change on reopen', async () => {
    const g = graph();
    const name = await rawImage(g, 65536);
    const blk = await openBackend(g, { filename: name, format: 'raw' });
    await expect(reopenBackend(blk, { options: { foo: 'bar' } })).rejects.toThrow("Cannot change the option 'foo'");
    await reopenBackend(blk, { readOnly: true });
    expect(blk.bs!.readOnly).toBe(true);
    await blk.close();
  });
});
