// The browser engine end to end in Debian's Chromium: the engine worker
// (src/worker) owning every node over OPFS, driven from a page through the
// client (src/client) — images created, written through BlockBackend proxies,
// reopened after a reload and downloaded for QEMU to check; overlays whose
// base is served over HTTP; one tab per image (Web Locks); the
// SharedArrayBuffer channel for an emulator's worker; v86 booting a
// nasm-built guest through the disk adapter; errors arriving with their
// codes. Everything here runs on raw images or reads qcow2 images; the specs
// that need qcow2 writes are in engine-qcow2.spec.ts.

import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Page } from '@playwright/test';
import type { CallResult } from '../web/engine/api-types.ts';
import type { ImageSummary, StorageReport } from '../src/worker/types.ts';
import {
  attach,
  bcall,
  bok,
  dirFor,
  download as downloadTo,
  enginePage,
  failure,
  fails,
  fill,
  filledSum,
  ok,
  QEMU_IMG,
  QEMU_IO,
  qemu as runQemu,
  sum,
  sumOf,
  unwrap,
} from './engine-helpers.ts';
import { expect, test } from './fixtures.ts';
import { biosImages, buildGuestDisk, GUEST_DISK_SIZE, okLine } from './guest/guest.ts';
import { startRangeServer, type RangeServer } from './range-server.ts';

const MiB = 1 << 20;

/** Writes (offset, length, byte) the round-trip test makes, as qemu-io's `write -P byte offset length`. */
const WRITES: ReadonlyArray<[number, number, number]> = [
  [0, 65536, 0x11],
  [MiB + 512, 4096, 0x22],
  [3 * MiB - 1000, 3000, 0x33],
  [2 * MiB + 7, 1, 0x44],
];

let srv: RangeServer;
let scratch: string;

test.beforeAll(async () => {
  srv = await startRangeServer();
  scratch = mkdtempSync(join(tmpdir(), 'qblock-engine-e2e-'));
  const { bios, vgaBios } = biosImages();
  srv.put('/bios.bin', bios);
  srv.put('/vgabios.bin', vgaBios);
  srv.put('/guest.img', buildGuestDisk());
  const base = new Uint8Array(2 * MiB);
  for (let i = 0; i < base.length; i++) base[i] = (i * 7 + (i >> 12)) & 0xff;
  srv.put('/base.img', base);
});

test.afterAll(async () => {
  await srv.close();
  rmSync(scratch, { recursive: true, force: true });
});

/** Runs qemu-img/qemu-io in the scratch directory. */
function qemu(tool: string, ...args: string[]): Promise<string> {
  return runQemu(scratch, tool, ...args);
}

/** Downloads OPFS image `path` through the page into the scratch directory. */
function download(page: Page, path: string, name: string): Promise<string> {
  return downloadTo(page, path, name, scratch);
}

test.describe('engine worker', () => {
  test('creates an image in OPFS, writes through a proxy, reopens after a reload; the download equals the qemu-io reference', async ({ persistentPage: page }, info) => {
    await enginePage(page);
    const dir = dirFor(info.title);
    const path = `${dir}/disk.img`;
    const created = await ok<{ persisted?: boolean }>(page, 'create', path, { format: 'raw', size: 4 * MiB });
    // The page asked for persistent storage (headless Chromium answers either way).
    expect(typeof created.persisted).toBe('boolean');
    const est = await ok<StorageReport>(page, 'estimate');
    expect(est.quota).toBeGreaterThan(0);
    expect(est.usage).toBeGreaterThanOrEqual(0);
    const img = await ok<ImageSummary>(page, 'open', { opfs: path }, { format: 'raw' });
    expect(img).toMatchObject({ format: 'raw', virtualSize: 4 * MiB, readOnly: false, backingChain: [] });
    await attach(page, 'd', img.id, { name: 'disk0' });
    // Pipelined: every write is issued before the first one completes.
    await Promise.all(WRITES.map(([o, l, b]) => fill(page, 'd', o, l, b)));
    for (const [o, l, b] of WRITES) expect(await sum(page, 'd', o, l)).toBe(filledSum(l, b));
    await bok(page, 'd', 'flush');
    const st = await bok<{ wr_operations: number; flush_operations: number }>(page, 'd', 'stats');
    expect(st.wr_operations).toBe(WRITES.length);
    expect(st.flush_operations).toBeGreaterThanOrEqual(1);

    // Reload without closing: pagehide lets go of the image, the new page opens it within seconds.
    await page.reload();
    await enginePage(page);
    const t0 = Date.now();
    const again = await ok<ImageSummary>(page, 'open', { opfs: path }, { format: 'raw', waitBusyMs: 5000 });
    expect(Date.now() - t0).toBeLessThan(3000);
    await attach(page, 'd', again.id);
    for (const [o, l, b] of WRITES) expect(await sum(page, 'd', o, l)).toBe(filledSum(l, b));
    expect(await sum(page, 'd', 65536, 512)).toBe(filledSum(512, 0));

    // The stored file, downloaded, is what qemu-io makes of the same writes.
    const got = await download(page, path, 'disk.img');
    // The guest-visible bytes also stream out of the worker (a transferred ReadableStream), with progress.
    const raw = unwrap<{ bytes: number; sum: number; reports: Array<[number, number]> }>(await page.evaluate((id) => window.qe.rawStream(id), again.id), 'rawStream');
    expect(raw.bytes).toBe(4 * MiB);
    expect(raw.sum).toBe(sumOf(new Uint8Array(readFileSync(got)), 0, 4 * MiB));
    expect(raw.reports[0]).toEqual([0, 4 * MiB]);
    expect(raw.reports.at(-1)).toEqual([4 * MiB, 4 * MiB]);
    const ref = join(scratch, `ref-${Date.now()}.img`);
    await qemu(QEMU_IMG, 'create', '-q', '-f', 'raw', ref, String(4 * MiB));
    await qemu(QEMU_IO, '-f', 'raw', ...WRITES.flatMap(([o, l, b]) => ['-c', `write -q -P ${b} ${o} ${l}`]), ref);
    expect((await qemu(QEMU_IMG, 'compare', '-f', 'raw', '-F', 'raw', got, ref)).trim()).toBe('Images are identical.');
    await ok(page, 'close', again.id);
    await ok(page, 'remove', dir, true);
  });

  test('creates a qcow2 image and reopens it read-only; qemu-img checks the download', async ({ persistentPage: page }, info) => {
    await enginePage(page);
    const dir = dirFor(info.title);
    const path = `${dir}/new.qcow2`;
    await ok(page, 'create', path, { format: 'qcow2', size: 64 * MiB, options: { cluster_size: 65536 } });
    const img = await ok<ImageSummary>(page, 'open', { opfs: path }, { readOnly: true });
    expect(img).toMatchObject({ format: 'qcow2', virtualSize: 64 * MiB, readOnly: true });
    const [inf] = await ok<Array<Record<string, unknown>>>(page, 'info', img.id);
    expect(inf).toMatchObject({ format: 'qcow2', 'virtual-size': 64 * MiB, 'cluster-size': 65536 });
    await attach(page, 'q', img.id);
    expect(await sum(page, 'q', 0, 65536)).toBe(filledSum(65536, 0));
    // Read-only: a write is refused with a code.
    const e = failure(await page.evaluate(() => window.qe.fill('q', 0, 512, 1)), 'write to a read-only image');
    expect(e.blockError).toBe(true);
    expect(['EPERM', 'EACCES', 'EROFS']).toContain(e.code);
    const map = await ok<Array<{ data: boolean; zero: boolean }>>(page, 'map', img.id);
    expect(map.every((m) => !m.data)).toBe(true);
    // measure: an empty 64 MiB qcow2 needs only metadata; a copy of this image needs no more.
    const m = await ok<{ required: number; fullyAllocated: number }>(page, 'measure', 'qcow2', { size: 64 * MiB });
    expect(m.required).toBeGreaterThan(0);
    expect(m.required).toBeLessThan(MiB);
    expect(m.fullyAllocated).toBeGreaterThan(64 * MiB);
    const mc = await ok<{ required: number }>(page, 'measure', 'qcow2', {}, img.id);
    expect(mc.required).toBe(m.required);
    const got = await download(page, path, 'new.qcow2');
    expect(await qemu(QEMU_IMG, 'check', '-f', 'qcow2', got)).toContain('No errors were found on the image.');
    const ref = join(scratch, `ref-${Date.now()}.qcow2`);
    await qemu(QEMU_IMG, 'create', '-q', '-f', 'qcow2', ref, String(64 * MiB));
    expect((await qemu(QEMU_IMG, 'compare', '-f', 'qcow2', '-F', 'qcow2', got, ref)).trim()).toBe('Images are identical.');
    await ok(page, 'close', img.id);
    await ok(page, 'remove', dir, true);
  });

  test('a qcow2 overlay in OPFS over a base served with range requests records its backing and reads the base', async ({ persistentPage: page }, info) => {
    await enginePage(page);
    const dir = dirFor(info.title);
    const path = `${dir}/overlay.qcow2`;
    const baseUrl = `${srv.url}/base.img`;
    const base = new Uint8Array(await (await fetch(baseUrl)).arrayBuffer());
    // The size comes from the base, which create opens over HTTP.
    await ok(page, 'create', path, { format: 'qcow2', backingFile: baseUrl, backingFmt: 'raw' });
    // Names inside images are opened only as OPFS names next to them: a URL base must be given explicitly.
    const refused = await fails(page, 'open', { opfs: path }, { readOnly: true });
    expect(refused.code).toBe('EACCES');
    expect(refused.message).toContain(baseUrl);
    srv.reset();
    const img = await ok<ImageSummary>(page, 'open', { opfs: path }, { readOnly: true, backing: { driver: 'raw', file: { driver: 'http', url: baseUrl } } });
    expect(img).toMatchObject({ format: 'qcow2', virtualSize: 2 * MiB, backingChain: [{ format: 'raw' }] });
    const [top] = await ok<Array<Record<string, unknown>>>(page, 'info', img.id);
    expect(top).toMatchObject({ 'backing-filename': baseUrl, 'backing-filename-format': 'raw' });
    await attach(page, 'o', img.id);
    for (const [o, l] of [[0, 4096], [MiB - 100, 5000], [2 * MiB - 512, 512]] as const) expect(await sum(page, 'o', o, l)).toBe(sumOf(base, o, l));
    // The base was read with range requests and never written.
    expect(srv.log.some((r) => r.method === 'GET' && r.status === 206)).toBe(true);
    expect(srv.log.every((r) => r.method === 'GET' || r.method === 'HEAD')).toBe(true);
    const got = await download(page, path, 'overlay.qcow2');
    expect(await qemu(QEMU_IMG, 'info', '--output=json', '-U', got)).toContain(`"backing-filename": "${baseUrl}"`);
    expect(await qemu(QEMU_IMG, 'check', '-f', 'qcow2', got)).toContain('No errors were found on the image.');
    await ok(page, 'close', img.id);
    await ok(page, 'remove', dir, true);
  });

  test('one tab per image: a second page gets EBUSY naming the image until the first closes it', async ({ persistentPage: page, persistentContext }, info) => {
    await enginePage(page);
    const dir = dirFor(info.title);
    const path = `${dir}/shared.img`;
    await ok(page, 'create', path, { format: 'raw', size: MiB });
    const img = await ok<ImageSummary>(page, 'open', { opfs: path }, { format: 'raw' });
    const other = await persistentContext.newPage();
    await enginePage(other);
    const busy = await fails(other, 'open', { opfs: path }, { format: 'raw' });
    expect(busy.blockError).toBe(true);
    expect(busy.code).toBe('EBUSY');
    expect(busy.message).toContain(`'${path}'`);
    expect(busy.message).toContain('open elsewhere');
    // The list shows it open; removing it is refused too.
    const list = await ok<Array<{ path: string; open?: boolean }>>(other, 'list', dir);
    expect(list).toEqual([expect.objectContaining({ path, open: true })]);
    expect((await fails(other, 'remove', path)).code).toBe('EBUSY');
    expect((await fails(other, 'rename', path, `${dir}/renamed.img`)).code).toBe('EBUSY');
    await ok(page, 'close', img.id);
    // Closed: it can be renamed (and back).
    await ok(other, 'rename', path, `${dir}/renamed.img`);
    expect((await ok<Array<{ path: string }>>(other, 'list', dir)).map((e) => e.path)).toEqual([`${dir}/renamed.img`]);
    await ok(other, 'rename', `${dir}/renamed.img`, path);
    const mine = await ok<ImageSummary>(other, 'open', { opfs: path }, { format: 'raw' });
    expect(mine.virtualSize).toBe(MiB);
    // And now the first page is the one that waits.
    expect((await fails(page, 'open', { opfs: path }, { format: 'raw' })).code).toBe('EBUSY');
    await ok(other, 'close', mine.id);
    await other.close();
    await ok(page, 'remove', dir, true);
  });

  test('an emulator-style worker reads and writes synchronously through the SharedArrayBuffer channel', async ({ persistentPage: page }, info) => {
    const env = await enginePage(page);
    expect(env.crossOriginIsolated).toBe(true);
    expect(await page.evaluate(() => self.crossOriginIsolated)).toBe(true);
    const dir = dirFor(info.title);
    const path = `${dir}/chan.img`;
    await ok(page, 'create', path, { format: 'raw', size: 4 * MiB });
    const img = await ok<ImageSummary>(page, 'open', { opfs: path }, { format: 'raw' });
    await attach(page, 'c', img.id);
    await fill(page, 'c', 0, 200_000, 0x5a);
    // A 64 KiB channel splits the 200 000-byte requests into several round trips.
    const r = unwrap<Array<{ ok: boolean; value?: number; bytes?: number[]; code?: string }>>(
      await page.evaluate(([MiB]) =>
        window.qe.channel(
          'c',
          [
            { op: 'length' },
            { op: 'read', offset: 0, length: 200_000 },
            { op: 'write', offset: MiB + 3, length: 200_000, fill: 0xc3 },
            { op: 'flush' },
            { op: 'read', offset: MiB + 3, length: 200_000 },
            { op: 'read', offset: 8 * MiB, length: 512 },
          ],
          65536,
        ), [MiB] as const,
      ),
      'channel',
    );
    expect(r[0]).toEqual({ ok: true, value: 4 * MiB });
    expect(r[1]).toMatchObject({ ok: true, value: filledSum(200_000, 0x5a) });
    expect(r[2]).toEqual({ ok: true, value: 200_000 });
    expect(r[4]).toMatchObject({ ok: true, value: filledSum(200_000, 0xc3), bytes: new Array(16).fill(0xc3) });
    // Past the end: the error arrives in the emulator's worker with its code.
    expect(r[5]).toMatchObject({ ok: false, code: 'EIO' });
    // The proxy sees exactly what the channel wrote.
    expect(await sum(page, 'c', MiB + 3, 200_000)).toBe(filledSum(200_000, 0xc3));
    expect(await sum(page, 'c', MiB + 2, 1)).toBe(filledSum(1, 0));
    await ok(page, 'close', img.id);
    await ok(page, 'remove', dir, true);
  });

  test('v86 boots the nasm guest from an OPFS image through the disk adapter; after a reload it sees its own write', async ({ persistentPage: page }, info) => {
    test.setTimeout(120_000);
    await enginePage(page);
    const dir = dirFor(info.title);
    const path = `${dir}/guest.img`;
    const guestUrl = `${srv.url}/guest.img`;
    const served = new Uint8Array(await (await fetch(guestUrl)).arrayBuffer());
    const imp = unwrap<{ size: number; reports: Array<[number, number]> }>(await page.evaluate(([u, p]) => window.qe.importUrl(u, p), [guestUrl, path] as const), 'import');
    expect(imp.size).toBe(GUEST_DISK_SIZE);
    expect(imp.reports[0]).toEqual([0, GUEST_DISK_SIZE]);
    expect(imp.reports.at(-1)).toEqual([GUEST_DISK_SIZE, GUEST_DISK_SIZE]);
    const boot = async (): Promise<string> => {
      const img = await ok<ImageSummary>(page, 'open', { opfs: path }, { format: 'raw', waitBusyMs: 5000 });
      await attach(page, 'g', img.id);
      const r: CallResult = await page.evaluate(
        ([b, v]) => window.qe.bootV86('g', { biosUrl: b, vgaBiosUrl: v, timeoutMs: 60_000 }),
        [`${srv.url}/bios.bin`, `${srv.url}/vgabios.bin`] as const,
      );
      return unwrap<string>(r, 'bootV86');
    };
    expect(await boot()).toBe(okLine(1));
    await page.reload();
    await enginePage(page);
    expect(await boot()).toBe(okLine(2));
    // The served base is untouched: the guest wrote to the OPFS image only.
    const after = new Uint8Array(await (await fetch(guestUrl)).arrayBuffer());
    expect(Buffer.compare(Buffer.from(after), Buffer.from(served))).toBe(0);
    await page.evaluate(() => window.qe.call('closeAll'));
    await ok(page, 'remove', dir, true);
  });

  test('errors arrive with their codes: EINVAL, ECANCELED, and ENOSPC from a filled quota under both error policies', async ({ persistentPage: page, persistentContext }, info) => {
    await enginePage(page);
    const dir = dirFor(info.title);
    // EINVAL: a bad node name, a bad path, a negative offset.
    const path = `${dir}/q.img`;
    await ok(page, 'create', path, { format: 'raw', size: MiB });
    const badName = await fails(page, 'open', { opfs: path }, { format: 'raw', nodeName: '1bad' });
    expect(badName).toMatchObject({ blockError: true, code: 'EINVAL', message: "Invalid node-name: '1bad'" });
    expect((await fails(page, 'open', { opfs: '../escape.img' })).code).toBe('EINVAL');
    const img = await ok<ImageSummary>(page, 'open', { opfs: path }, { format: 'raw' });
    await attach(page, 'r', img.id, { name: 'vd-r', werror: 'report' });
    const neg = failure(await bcall(page, 'r', 'pwriteZeroes', -1, 512), 'negative offset');
    expect(neg).toMatchObject({ blockError: true, code: 'EINVAL', node: 'vd-r' });
    // ECANCELED: an import aborted after its first progress report leaves no file.
    srv.put('/big.img', new Uint8Array(16 * MiB).fill(1));
    const cancelled = failure(await page.evaluate(([u, p]) => window.qe.importAbort(u, p), [`${srv.url}/big.img`, `${dir}/big.img`] as const), 'aborted import');
    expect(cancelled).toMatchObject({ blockError: true, code: 'ECANCELED' });
    expect((await ok<Array<{ path: string }>>(page, 'list', dir)).map((e) => e.path)).toEqual([path]);

    // ENOSPC: shrink the origin's quota so that growing the image cannot fit. OPFS charges a file's
    // logical size, so growth (a write past the end here; qcow2 allocations in real use) is what fails.
    const cdp = await persistentContext.newCDPSession(page);
    const origin = new URL(page.url()).origin;
    const est = await ok<StorageReport>(page, 'estimate');
    await cdp.send('Storage.overrideQuotaForOrigin', { origin, quotaSize: est.usage + 2 * MiB });
    let restored = false;
    const restore = async (): Promise<void> => {
      if (restored) return;
      restored = true;
      await cdp.send('Storage.overrideQuotaForOrigin', { origin });
    };
    try {
      await bok(page, 'r', 'close');
      await attach(page, 'g', img.id, { name: 'vd-g', werror: 'report', allowWriteBeyondEof: true });
      await fill(page, 'g', 0, 4096, 0x77);
      const nospc = failure(await page.evaluate((o) => window.qe.fill('g', o, 4096, 0x66), 64 * MiB), 'write past the quota');
      expect(nospc).toMatchObject({ blockError: true, code: 'ENOSPC' });
      expect(nospc.message).toContain('quota');
      expect(await bok(page, 'g', 'getLength')).toBe(MiB);
      await bok(page, 'g', 'close');

      // The default policy (werror=enospc) stops the write and tells the page; resume() retries it once there is room.
      await attach(page, 's', img.id, { name: 'vd-s', allowWriteBeyondEof: true });
      const pending = page.evaluate((o) => window.qe.fill('s', o, 4096, 0x66), 64 * MiB);
      await expect.poll(async () => (await bok<{ stopped: boolean }>(page, 's', 'errorPolicy')).stopped, { timeout: 10_000 }).toBe(true);
      expect(await bok(page, 's', 'errorPolicy')).toEqual({ rerror: 'report', werror: 'enospc', iostatus: 'nospace', stopped: true });
      const evs = await page.evaluate(() => window.qe.events('s'));
      expect(evs.map((e) => e.type)).toEqual(['io-error', 'stop']);
      expect(evs[0]).toMatchObject({ event: { device: 'vd-s', operation: 'write', action: 'stop', nospace: true, code: 'ENOSPC' } });
      await restore();
      await bok(page, 's', 'resume');
      unwrap(await pending, 'the resumed write');
      expect(await bok(page, 's', 'getLength')).toBe(64 * MiB + 4096);
      // Nothing was lost or mixed up on the way.
      expect(await sum(page, 's', 0, 4096)).toBe(filledSum(4096, 0x77));
      expect(await sum(page, 's', 64 * MiB, 4096)).toBe(filledSum(4096, 0x66));
      expect(await sum(page, 's', MiB, 4096)).toBe(filledSum(4096, 0));
    } finally {
      await restore();
    }
    await page.evaluate(() => window.qe.call('closeAll'));
    await ok(page, 'remove', dir, true);
  });
});
