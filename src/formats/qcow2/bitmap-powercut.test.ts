/**
 * Power cuts while persistent bitmaps change: an image with QEMU-made
 * bitmaps is opened read-write on the `powercut` protocol (IN_USE is set in
 * place), a bitmap is added, data written, a bitmap removed, and the image
 * closed (bitmaps stored: data, tables, directory, header, frees). At every
 * write and flush the image a power cut would leave is kept, with the cache
 * lost or torn; QEMU must open each one (a bitmap directory it refuses would
 * make the image unusable) and find no corruption, only leaks.
 */
import { readFileSync, writeFileSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { bdrvFlush, bdrvPwritev } from '../../core/io.ts';
import { runBitmapActions } from '../../core/img/bitmap.ts';
import { deletePowercutStore, newPowercutStore, powercutDriver, type CrashModel } from '../../core/testing/powercut.ts';
import { OPEN, PERM } from '../../core/types.ts';
import { forEachImageInShell, newGraph, QEMU_IMG, qemuImg, qemuIo, requireQemu, scratchDir } from './testing.ts';
import { prng } from './fuzz.ts';

const tmp = scratchDir();
beforeAll(() => requireQemu());
afterAll(() => tmp.cleanup());

describe('power cuts during bitmap updates', () => {
  it('leave images QEMU opens, with leaks at most', async () => {
    const img = 'pcb.qcow2';
    qemuImg(tmp.dir, 'create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4k', img, '1M');
    qemuImg(tmp.dir, 'bitmap', '--add', '-g', '512', img, 'b0');
    qemuIo(tmp.dir, img, 'write 0 4k', 'write 500k 12k');
    qemuImg(tmp.dir, 'bitmap', '--add', '--disable', img, 'b1');
    const store = newPowercutStore('pcb', readFileSync(tmp.path(img)));
    const random = prng(7);
    const files: string[] = [];
    store.onEvent = (st) => {
      for (const m of ['drop', 'torn'] as CrashModel[]) {
        const f = `pcb.cut${files.length}.qcow2`;
        writeFileSync(tmp.path(f), st.crashImage(m, random));
        files.push(f);
      }
    };
    const graph = newGraph();
    graph.registerDriver(powercutDriver);
    const bs = await graph.open({ driver: 'qcow2', file: { driver: 'powercut', name: 'pcb' } }, OPEN.RDWR);
    const child = graph.attachRoot(bs, { kind: 'job', name: 'pc', description: () => 'power cut test' }, 'root', PERM.CONSISTENT_READ | PERM.WRITE, PERM.ALL);
    bs.refcnt--;
    try {
      await runBitmapActions(bs, 'n', [{ op: 'add' }], { granularity: 4096 });
      await bdrvPwritev(child, 64 * 1024, 8192, new Uint8Array(8192).fill(3));
      await bdrvFlush(bs);
      await runBitmapActions(bs, 'b1', [{ op: 'remove' }]);
      await bdrvPwritev(child, 900 * 1024, 4096, new Uint8Array(4096).fill(4));
    } finally {
      await graph.detachChild(child);
      store.onEvent = undefined;
      writeFileSync(tmp.path('pcb.final.qcow2'), store.crashImage('drop', random));
      await graph.closeAll();
      deletePowercutStore('pcb');
    }
    files.push('pcb.final.qcow2');
    expect(files.length).toBeGreaterThan(20);
    await forEachImageInShell(tmp.dir, files, `${QEMU_IMG} check -f qcow2 "{}" > "{}.check" 2>&1; echo $? > "{}.rc"; ${QEMU_IMG} info -f qcow2 "{}" > "{}.info" 2>&1; echo $? > "{}.irc"`);
    const failures: string[] = [];
    for (const f of files) {
      const rc = Number(readFileSync(tmp.path(`${f}.rc`), 'utf8').trim());
      const irc = Number(readFileSync(tmp.path(`${f}.irc`), 'utf8').trim());
      if (rc !== 0 && rc !== 3) failures.push(`${f}: check exit ${rc}: ${readFileSync(tmp.path(`${f}.check`), 'utf8').slice(0, 300)}`);
      if (irc !== 0) failures.push(`${f}: info exit ${irc}: ${readFileSync(tmp.path(`${f}.info`), 'utf8').slice(0, 300)}`);
    }
    expect(failures.slice(0, 5)).toEqual([]);
    // The completed run leaves exactly the new set of bitmaps, not in use, and a clean image.
    const final = readFileSync(tmp.path('pcb.final.qcow2.info'), 'utf8');
    expect(final).toMatch(/name: b0/);
    expect(final).toMatch(/name: n/);
    expect(final).not.toMatch(/name: b1|in-use/);
    expect(readFileSync(tmp.path('pcb.final.qcow2.check'), 'utf8')).toMatch(/No errors were found on the image/);
  }, 120_000);
});
