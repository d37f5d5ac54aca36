// The browser protocols in real Chromium: OPFS through sync access handles
// in a dedicated worker (locking across pages, foreign handles, errors), HTTP
// against a cross-origin local range server, and Blob/File from the page.
// The worker is web/test/protocols-worker.ts, reached through comlink.

import type { Page } from '@playwright/test';
import type { ApiMethod, CallError, CallResult } from '../web/test/api-types.ts';
import { testPattern } from '../web/test/targets.ts';
import { expect, test } from './fixtures.ts';
import { startRangeServer, type RangeServer } from './range-server.ts';

const PAGE = '/test/protocols.html';
const MiB = 1 << 20;

/** Opens the test page and waits until its worker answers. */
async function ready(page: Page): Promise<void> {
  await page.goto(PAGE);
  await expect(page.locator('#status[data-state="ready"]')).toBeAttached({ timeout: 20_000 });
  const env = JSON.parse((await page.locator('#status').textContent()) ?? '{}') as { syncHandles?: boolean };
  expect(env.syncHandles, 'worker has FileSystemSyncAccessHandle').toBe(true);
}

/** Calls a worker API method through the page. */
function call(page: Page, method: ApiMethod, ...args: unknown[]): Promise<CallResult> {
  return page.evaluate(([m, a]) => window.qbCall(m, ...a), [method, args] as const);
}

/** Calls a method that must succeed and returns its value. */
async function ok<T = unknown>(page: Page, method: ApiMethod, ...args: unknown[]): Promise<T> {
  const r = await call(page, method, ...args);
  if (!r.ok) throw new Error(`${method}(${JSON.stringify(args)}) failed: [${r.error.code}] ${r.error.message}`);
  return r.value as T;
}

/** Calls a method that must fail and returns the error as the page saw it. */
async function fails(page: Page, method: ApiMethod, ...args: unknown[]): Promise<CallError> {
  const r = await call(page, method, ...args);
  if (r.ok) throw new Error(`${method}(${JSON.stringify(args)}) succeeded, expected an error`);
  return r.error;
}

/** A unique OPFS directory per test, so reruns and parallel workers never collide. */
function dirFor(title: string): string {
  return `e2e-${title.replace(/\W+/g, '-').slice(0, 40)}-${Date.now().toString(36)}`;
}

test.describe('opfs protocol', () => {
  test('create, write, read, flush, truncate and reopen RO/RW through a BlockBackend', async ({ persistentPage: page }, info) => {
    await ready(page);
    const dir = dirFor(info.title);
    await ok(page, 'create', `${dir}/a.img`, MiB);
    expect(await ok(page, 'open', 'a', { driver: 'opfs', filename: `${dir}/a.img` })).toBe(MiB);
    // A fresh image reads as zeroes; written data reads back, also across unaligned edges.
    expect(await ok(page, 'read', 'a', 0, 16)).toEqual(new Array(16).fill(0));
    await ok(page, 'writePattern', 'a', 12_345, 200_000, 5);
    expect(await ok(page, 'checkPattern', 'a', 12_345, 200_000, 5)).toBe(true);
    expect(await ok(page, 'read', 'a', 12_344, 1)).toEqual([0]);
    await ok(page, 'flush', 'a');
    // The emulator's channel hands over views of SharedArrayBuffers; the sync handle takes them directly.
    expect(await ok(page, 'sharedBufferRoundTrip', 'a', 300_001, 70_000, 6)).toBe(true);
    // Growing reads as zero; shrinking cuts.
    await ok(page, 'truncate', 'a', 2 * MiB);
    expect(await ok(page, 'length', 'a')).toBe(2 * MiB);
    expect(await ok(page, 'read', 'a', 2 * MiB - 8, 8)).toEqual(new Array(8).fill(0));
    await ok(page, 'truncate', 'a', 100_000);
    // QEMU counts lengths in whole sectors: the file is cut to 100 000 bytes, the disk is 100 352 with a zero tail.
    expect(await ok(page, 'length', 'a')).toBe(100_352);
    const kept = testPattern(200_000, 5).subarray(100_000 - 12_345 - 16, 100_000 - 12_345);
    expect(await ok(page, 'read', 'a', 100_000 - 16, 16)).toEqual(Array.from(kept));
    expect(await ok(page, 'read', 'a', 100_000, 352)).toEqual(new Array(352).fill(0));
    // Read-only and back: the handle stays, only the mode changes.
    expect(await ok(page, 'reopen', 'a', true)).toBe(true);
    const e = await fails(page, 'writePattern', 'a', 0, 10, 1);
    expect(['EPERM', 'EACCES']).toContain(e.code);
    expect(await ok(page, 'reopen', 'a', false)).toBe(false);
    await ok(page, 'writePattern', 'a', 0, 10, 1);
    expect(await ok(page, 'checkPattern', 'a', 0, 10, 1)).toBe(true);
    await ok(page, 'close', 'a');

    // The data survived close: reopen by plain name (default protocol opfs) with the raw format.
    expect(await ok(page, 'open', 'b', `${dir}/a.img`, { format: 'raw' })).toBe(100_352);
    expect(await ok(page, 'checkPattern', 'b', 0, 10, 1)).toBe(true);
    await ok(page, 'close', 'b');
    await ok(page, 'remove', dir, true);
  });

  test('open errors: missing file, create option, path checks', async ({ persistentPage: page }, info) => {
    await ready(page);
    const dir = dirFor(info.title);
    const missing = await fails(page, 'open', 'm', { driver: 'opfs', filename: `${dir}/missing.img` });
    expect(missing.code).toBe('ENOENT');
    expect(missing.message).toContain(`Could not open '${dir}/missing.img': No such file or directory`);
    expect(await ok(page, 'open', 'c', { driver: 'opfs', filename: `opfs:${dir}/sub/new.img`, create: true })).toBe(0);
    await ok(page, 'truncate', 'c', 5000);
    await ok(page, 'writePattern', 'c', 0, 5000, 9);
    expect(await ok(page, 'checkPattern', 'c', 0, 5000, 9)).toBe(true);
    await ok(page, 'close', 'c');
    expect((await fails(page, 'open', 'x', { driver: 'opfs', filename: `${dir}/../escape.img` })).code).toBe('EINVAL');
    await ok(page, 'remove', dir, true);
  });

  test('list, rename and remove images; busy while open', async ({ persistentPage: page }, info) => {
    await ready(page);
    const dir = dirFor(info.title);
    await ok(page, 'create', `${dir}/one.img`, 4096);
    await ok(page, 'create', `${dir}/two.img`, 65536);
    await ok(page, 'open', 'one', { driver: 'opfs', filename: `${dir}/one.img` });
    type Entry = { path: string; size?: number; open?: boolean; kind: string };
    let list = await ok<Entry[]>(page, 'list', dir);
    expect(list.map((e) => [e.path, e.kind, e.open])).toEqual([
      [`${dir}/one.img`, 'file', true],
      [`${dir}/two.img`, 'file', false],
    ]);
    expect(list.find((e) => e.path.endsWith('two.img'))!.size).toBe(65536);
    // Chromium still reports the size of a file whose sync handle is open.
    expect(list.find((e) => e.path.endsWith('one.img'))!.size).toBe(4096);
    // An open image can be neither renamed nor removed.
    expect((await fails(page, 'rename', `${dir}/one.img`, `${dir}/uno.img`)).code).toBe('EBUSY');
    expect((await fails(page, 'remove', `${dir}/one.img`)).code).toBe('EBUSY');
    await ok(page, 'close', 'one');
    expect((await fails(page, 'rename', `${dir}/one.img`, `${dir}/two.img`)).code).toBe('EEXIST');
    await ok(page, 'rename', `${dir}/one.img`, `${dir}/moved/uno.img`);
    list = await ok<Entry[]>(page, 'list', dir, true);
    expect(list.map((e) => e.path)).toEqual([`${dir}/moved`, `${dir}/moved/uno.img`, `${dir}/two.img`]);
    expect(list.find((e) => e.path.endsWith('uno.img'))!.size).toBe(4096);
    await ok(page, 'remove', `${dir}/two.img`);
    expect((await fails(page, 'remove', `${dir}/two.img`)).code).toBe('ENOENT');
    await ok(page, 'remove', dir, true);
    expect((await fails(page, 'list', dir)).code).toBe('ENOENT');
  });

  test('a second opener in another page gets EBUSY until the owner closes', async ({ persistentContext }, info) => {
    const a = persistentContext.pages()[0] ?? (await persistentContext.newPage());
    const b = await persistentContext.newPage();
    await ready(a);
    await ready(b);
    const file = `${dirFor(info.title)}/x.img`;
    await ok(a, 'create', file, MiB);
    await ok(a, 'open', 'x', { driver: 'opfs', filename: file });

    const busy = await fails(b, 'open', 'x', { driver: 'opfs', filename: file });
    expect(busy.blockError, 'the BlockError crossed comlink as a BlockError').toBe(true);
    expect(busy.code).toBe('EBUSY');
    expect(busy.message).toContain(`'${file}'`);
    expect(busy.message).toContain('open elsewhere');
    // The same graph cannot open it twice either (QEMU's image locking).
    expect((await fails(a, 'open', 'x2', { driver: 'opfs', filename: file })).code).toBe('EBUSY');

    await ok(a, 'close', 'x');
    expect(await ok(b, 'open', 'x', { driver: 'opfs', filename: file })).toBe(MiB);
    expect((await fails(a, 'open', 'x', { driver: 'opfs', filename: file })).code).toBe('EBUSY');

    // A page that goes away without closing releases the file with its worker.
    await b.close();
    await expect
      .poll(async () => (await call(a, 'open', 'x', { driver: 'opfs', filename: file })).ok, { timeout: 10_000 })
      .toBe(true);
    await ok(a, 'close', 'x');
    await ok(a, 'remove', file.split('/')[0]!, true);
  });

  test('a sync handle held outside qblock makes open fail with EBUSY', async ({ persistentPage: page }, info) => {
    await ready(page);
    const name = `${dirFor(info.title)}.img`;
    await ok(page, 'holdRaw', name);
    const e = await fails(page, 'open', 'r', { driver: 'opfs', filename: name });
    expect(e.code).toBe('EBUSY');
    expect(e.message).toContain(name);
    await ok(page, 'releaseRaw', name);
    expect(await ok(page, 'open', 'r', { driver: 'opfs', filename: name })).toBe(0);
    await ok(page, 'close', 'r');
    await ok(page, 'remove', name);
  });

  test('outside a dedicated worker, open fails with ENOTSUP', async ({ page }) => {
    await ready(page);
    const r = await page.evaluate(() => window.qbOpenOpfsOnMainThread('main-thread.img'));
    expect(r.ok).toBe(false);
    if (r.ok) return;
    expect(r.error.code).toBe('ENOTSUP');
    expect(r.error.message).toContain('dedicated worker');
  });

  test('growing past the quota fails with ENOSPC', async ({ persistentPage: page }, info) => {
    await ready(page);
    const name = `${dirFor(info.title)}.img`;
    await ok(page, 'create', name, 4096);
    await ok(page, 'open', 'q', { driver: 'opfs', filename: name });
    // 32 TiB is beyond any origin quota; OPFS charges the logical size, so the resize itself is refused.
    const e = await fails(page, 'truncate', 'q', 2 ** 45);
    expect(e.code).toBe('ENOSPC');
    expect(await ok(page, 'length', 'q')).toBe(4096);
    await ok(page, 'close', 'q');
    await ok(page, 'remove', name);
  });
});

test.describe('http protocol', () => {
  let srv: RangeServer;
  const IMG = testPattern(700_000, 11);

  test.beforeAll(async () => {
    srv = await startRangeServer();
  });
  test.afterAll(async () => {
    await srv.close();
  });
  test.beforeEach(() => {
    srv.reset();
    srv.put('/img.raw', IMG);
  });

  test('reads a cross-origin image with ranged GETs and counts what it fetched', async ({ page }) => {
    await ready(page);
    const url = `${srv.url}/img.raw`;
    // 700 000 bytes are a 700 416-byte disk (whole sectors, as in QEMU).
    expect(await ok(page, 'open', 'h', { driver: 'http', url, readahead: 65536 }, { readOnly: true })).toBe(700_416);
    const got = await ok<number[]>(page, 'read', 'h', 100_000, 150_000);
    expect(Buffer.from(got).equals(Buffer.from(IMG.subarray(100_000, 250_000)))).toBe(true);
    const stats = await ok<{ requests: number; bytesFetched: number }>(page, 'stats', 'h');
    // The probe, then chunks 1..3 (bytes 65536..262143) in one GET.
    expect(stats.requests).toBe(2);
    expect(stats.bytesFetched).toBe(1 + 3 * 65536);
    const gets = srv.log.filter((r) => r.method === 'GET');
    expect(gets.map((r) => r.range)).toEqual(['bytes=0-0', 'bytes=65536-262143']);
    // The pinned ETag went out as If-Range, which makes the browser preflight (CORS) — and that worked.
    expect(gets[1]!.ifRange).toMatch(/^"/);
    await ok(page, 'close', 'h');
  });

  test('is read-only, retries 503 and refuses a changed resource', async ({ page }) => {
    await ready(page);
    const url = `${srv.url}/img.raw`;
    const rw = await fails(page, 'open', 'h', { driver: 'http', url });
    expect(rw.code).toBe('EACCES');
    expect(rw.message).toBe('curl driver does not support writes');

    await ok(page, 'open', 'h', url, { readOnly: true, format: 'raw' });
    srv.fault({ count: 2, status: 503 });
    const got = await ok<number[]>(page, 'read', 'h', 300_000, 10);
    expect(got).toEqual(Array.from(IMG.subarray(300_000, 300_010)));
    expect((await ok<{ retries: number }>(page, 'stats', 'h')).retries).toBe(2);

    srv.put('/img.raw', testPattern(IMG.length, 12));
    const changed = await fails(page, 'read', 'h', 600_000, 10);
    expect(changed.code).toBe('EIO');
    expect(changed.message).toContain('changed on the server');
    await ok(page, 'close', 'h');
  });

  test('a server without byte ranges is refused with ENOTSUP', async ({ page }) => {
    await ready(page);
    srv.put('/plain.raw', IMG, { noRange: true });
    const e = await fails(page, 'open', 'p', { driver: 'http', url: `${srv.url}/plain.raw` }, { readOnly: true });
    expect(e.code).toBe('ENOTSUP');
    expect(e.message).toContain("Server does not support 'range' (byte ranges).");
  });
});

test.describe('blob protocol', () => {
  test('reads a File handed from the page to the worker', async ({ page }) => {
    await ready(page);
    const bytes = Array.from(testPattern(100_000, 21));
    const r = await page.evaluate(([b]) => window.qbOpenFile('f', b, 'disk.img'), [bytes] as const);
    // 100 000 bytes are a 100 352-byte disk (whole sectors, as in QEMU) whose tail reads as zeroes.
    expect(r).toEqual({ ok: true, value: 100_352 });
    expect(await ok(page, 'read', 'f', 99_990, 10)).toEqual(bytes.slice(99_990));
    expect(await ok(page, 'read', 'f', 100_000, 352)).toEqual(new Array(352).fill(0));
    const w = await fails(page, 'writePattern', 'f', 0, 10, 1);
    expect(['EPERM', 'EACCES']).toContain(w.code);
    await ok(page, 'close', 'f');
  });
});
