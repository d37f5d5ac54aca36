// The web inspector as a newcomer gets it from `npm start` (the built app,
// served by playwright.config.ts's second web server): the demo on first
// load, images made by qemu-img opened from a file input and compared with
// qemu-img info/map, OPFS create/check/convert/download against qemu-img
// convert, offline reloads through the service worker, a cancellable large
// convert, a 1 TiB allocation map, URLs, keyboard use and phone layout.

import { spawnSync } from 'node:child_process';
import { readFileSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { expect, test } from './fixtures.ts';
import { collectErrors, createImage, mapEntries, openInspector, run, shot, tab, tempDir, unique } from './inspector-helpers.ts';
import { INSPECTOR_BASE_URL } from './inspector-server.ts';

test.use({ baseURL: INSPECTOR_BASE_URL });

test('npm start serves the inspector on the demo: header, chain picture and allocation map', async ({ page }, testInfo) => {
  const errors = collectErrors(page);
  await page.setViewportSize({ width: 1280, height: 800 });
  await openInspector(page);
  await expect(page.getByTestId('image-title')).toHaveText('demo/overlay.qcow2');
  // Header fields, decoded from the image file by the engine.
  await expect(page.locator('[data-testid="header-fields"] [data-field="magic"]')).toHaveText('0x514649fb');
  await expect(page.locator('[data-testid="header-fields"] [data-field="size"]')).toHaveText('67108864');
  // The chain picture: the overlay and its base.
  await expect(page.locator('[data-testid="chain"] figure')).toHaveCount(2);
  await expect(page.locator('[data-testid="chain"] figure').nth(1)).toContainText('demo/base.qcow2');
  // Snapshot, bitmaps and the GPT the demo generator wrote.
  await expect(page.getByTestId('snapshots')).toContainText('installed');
  await expect(page.getByTestId('bitmaps')).toContainText('backup-0');
  await expect(page.getByTestId('partitions')).toContainText('EFI System');
  await expect(page.getByTestId('partitions')).toContainText('Linux filesystem');
  await shot(page, testInfo, 'demo-overview-1280x800');
  await shot(page, testInfo, 'demo-overview-1280x800-full', true);

  await tab(page, 'Allocation map');
  await expect(page.locator('[data-testid="map-status"][data-state="done"]')).toBeAttached({ timeout: 20_000 });
  const legend = page.getByTestId('map-legend');
  for (const kind of ['data', 'compressed', 'zero', 'backing layer 1', 'unallocated']) {
    expect(Number(await legend.locator(`li[data-cat="${kind}"]`).getAttribute('data-bytes')), kind).toBeGreaterThan(0);
  }
  expect(Number(await page.getByTestId('alloc-canvas').getAttribute('data-cells'))).toBe(1024);
  await shot(page, testInfo, 'demo-map-1280x800');

  // Tables: the L1 entry leads to its L2 table, whose entries lead to the hex view of the host file.
  await tab(page, 'Tables');
  await page.getByRole('button', { name: 'Show the L2 table of L1 entry 0' }).click();
  const l2 = page.getByTestId('l2-table');
  await expect(l2.locator('.t-compressed').first()).toBeVisible();
  await expect(l2.locator('.t-zero').first()).toBeVisible();
  await expect(page.getByTestId('refcounts').locator('.rc-n').first()).toBeVisible();
  await page.getByTestId('analyse-host').click();
  await expect(page.getByTestId('host-layout')).toContainText('Snapshot table');
  await expect(page.getByTestId('host-layout')).toContainText('Bitmap directory');
  await shot(page, testInfo, 'demo-tables-1280x800');
  const firstNormal = l2.locator('tr', { has: page.locator('.t-normal') }).first();
  const host = (await firstNormal.locator('td').nth(3).textContent())!.trim();
  await firstNormal.getByRole('button', { name: `Host bytes at ${host}` }).click();
  await expect(page.locator('#tabpanel[data-tab="Hex"]')).toBeVisible();
  await expect(page.getByTestId('hex-dump')).toHaveAttribute('data-mode', 'host');
  await expect(page.getByTestId('hex-dump')).toContainText('qblock demo | ov');
  await expect(page.getByTestId('hex-mapping')).toContainText('Guest data for guest');
  await shot(page, testInfo, 'demo-hex-host-1280x800');
  await tab(page, 'Actions');
  await shot(page, testInfo, 'demo-actions-1280x800');
  // Installable: Chromium finds nothing missing in the manifest, icons and service worker.
  const cdp = await page.context().newCDPSession(page);
  const { installabilityErrors } = (await cdp.send('Page.getInstallabilityErrors')) as { installabilityErrors: Array<{ errorId: string }> };
  // 'in-incognito' is about Playwright's throwaway profile, not the app.
  expect(installabilityErrors.filter((e) => e.errorId !== 'in-incognito')).toEqual([]);
  expect(errors).toEqual([]);
});

test('phone-sized viewport: the demo reads on 390x844', async ({ page }, testInfo) => {
  const errors = collectErrors(page);
  await page.setViewportSize({ width: 390, height: 844 });
  await openInspector(page);
  await expect(page.getByTestId('image-title')).toHaveText('demo/overlay.qcow2');
  // Nothing wider than the screen: the page never scrolls sideways.
  expect(await page.evaluate(() => document.documentElement.scrollWidth)).toBeLessThanOrEqual(390);
  await shot(page, testInfo, 'demo-overview-390x844');
  await tab(page, 'Allocation map');
  await expect(page.locator('[data-testid="map-status"][data-state="done"]')).toBeAttached({ timeout: 20_000 });
  expect(await page.evaluate(() => document.documentElement.scrollWidth)).toBeLessThanOrEqual(390);
  await shot(page, testInfo, 'demo-map-390x844');
  await tab(page, 'Hex');
  await expect(page.getByTestId('hex-dump')).toContainText('0000000000');
  expect(await page.evaluate(() => document.documentElement.scrollWidth)).toBeLessThanOrEqual(390);
  await shot(page, testInfo, 'demo-hex-390x844');
  expect(errors).toEqual([]);
});

test('an image made by qemu-img, opened with the file input, matches qemu-img info and map', async ({ page }, testInfo) => {
  const errors = collectErrors(page);
  const dir = tempDir();
  try {
    run('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=131072,lazy_refcounts=on,refcount_bits=32', 'base.qcow2', '100M'], dir);
    run('qemu-io', ['-f', 'qcow2', '-c', 'write -q -P 0xab 0 1M', '-c', 'write -q -P 0x5a 20M 384k', '-c', 'write -q -c -P 0x11 40M 512k', 'base.qcow2'], dir);
    run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', '-o', 'cluster_size=65536', 'overlay.qcow2'], dir);
    run('qemu-io', ['-f', 'qcow2', '-c', 'write -q -P 0xcd 512k 1M', '-c', 'write -q -z 20M 128k', '-c', 'write -q -c -P 0x22 60M 256k', 'overlay.qcow2'], dir);
    await openInspector(page);

    for (const [files, top] of [[['base.qcow2'], 'base.qcow2'], [['overlay.qcow2', 'base.qcow2'], 'overlay.qcow2']] as const) {
      await page.locator('#file-input').setInputFiles(files.map((f) => join(dir, f)));
      await expect(page.getByTestId('image-title')).toHaveText(top);
      const info = JSON.parse(run('qemu-img', ['info', '--output=json', join(dir, top)])) as Record<string, unknown> & { 'format-specific': { data: Record<string, unknown> } };
      const summary = page.getByTestId('image-summary');
      expect(JSON.parse((await summary.locator('[data-key="virtual-size"]').getAttribute('data-value')) ?? 'null')).toBe(info['virtual-size']);
      expect(JSON.parse((await summary.locator('[data-key="cluster-size"]').getAttribute('data-value')) ?? 'null')).toBe(info['cluster-size']);
      expect(JSON.parse((await summary.locator('[data-key="format"]').getAttribute('data-value')) ?? 'null')).toBe(info.format);
      const spec = await page.locator('[data-testid="format-specific"] [data-key^="fs:"]').evaluateAll((els) =>
        Object.fromEntries(els.map((el) => [(el as HTMLElement).dataset.key!.slice(3), JSON.parse((el as HTMLElement).dataset.value!) as unknown])),
      );
      expect(spec).toEqual(info['format-specific'].data);
      if (top === 'overlay.qcow2') await expect(page.locator('[data-testid="chain"] figure')).toHaveCount(2);
      const qemuMap = JSON.parse(run('qemu-img', ['map', '--output=json', join(dir, top)])) as unknown[];
      expect(await mapEntries(page)).toEqual(qemuMap);
      await shot(page, testInfo, `qemu-${top.replace('.', '-')}-map`);
      await tab(page, 'Overview');
    }
    // Compare the two open images (the chain and its base alone) as qemu-img compare does.
    await tab(page, 'Actions');
    await page.locator('#compare-with').selectOption({ label: 'base.qcow2' });
    await page.getByRole('button', { name: 'Compare', exact: true }).click();
    const qemuCompare = spawnSync('qemu-img', ['compare', join(dir, 'overlay.qcow2'), join(dir, 'base.qcow2')], { encoding: 'utf8' }).stdout.trim();
    await expect(page.getByTestId('compare-result')).toHaveText(qemuCompare);
    await expect(page.getByTestId('compare-result')).toHaveAttribute('data-identical', 'false');
    expect(errors).toEqual([]);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('an image dropped on the page opens read-only; a library copy of it can be repaired', async ({ page }) => {
  const errors = collectErrors(page);
  const dir = tempDir();
  try {
    run('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', 'dropped.qcow2', '8M'], dir);
    run('qemu-io', ['-f', 'qcow2', '-c', 'write -q -P 0x33 64k 64k', 'dropped.qcow2'], dir);
    await openInspector(page);
    const bytes = readFileSync(join(dir, 'dropped.qcow2')).toString('base64');
    const dt = await page.evaluateHandle((b64) => {
      const data = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
      const t = new DataTransfer();
      t.items.add(new File([data], 'dropped.qcow2'));
      return t;
    }, bytes);
    await page.dispatchEvent('main', 'dragenter', { dataTransfer: dt });
    await expect(page.locator('#drop-overlay')).toBeVisible();
    await page.dispatchEvent('main', 'drop', { dataTransfer: dt });
    await expect(page.locator('#drop-overlay')).toBeHidden();
    await expect(page.getByTestId('image-title')).toHaveText('dropped.qcow2');
    await expect(page.locator('.pill', { hasText: 'read-only' })).toBeVisible();
    await expect(page.getByTestId('image-summary').locator('[data-key="cluster-size"]')).toHaveAttribute('data-value', '4096');
    // To change it, copy it into the library (the dropped file itself is never written), reopen for writing, repair.
    await tab(page, 'Actions');
    await expect(page.getByRole('button', { name: 'Repair leaks' })).toBeDisabled();
    await page.getByTestId('copy-into-library').click();
    await expect(page.getByTestId('image-title')).toHaveText('imports/dropped/dropped.qcow2');
    await tab(page, 'Actions');
    await page.getByTestId('reopen').click();
    await expect(page.locator('.pill', { hasText: 'read-write' })).toBeVisible();
    await tab(page, 'Actions');
    await page.getByRole('button', { name: 'Repair leaks' }).click();
    await expect(page.getByTestId('check-verdict')).toHaveText('No errors were found on the image.');
    expect(errors).toEqual([]);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('create in OPFS, check, convert to raw and download: identical to qemu-img convert', async ({ page }, testInfo) => {
  const errors = collectErrors(page);
  const dir = tempDir();
  try {
    await openInspector(page);
    const name = unique('fresh');
    await createImage(page, name, '24M');
    await tab(page, 'Actions');
    await page.getByRole('button', { name: 'Check', exact: true }).click();
    await expect(page.getByTestId('check-verdict')).toHaveText('No errors were found on the image.');
    await page.locator('#convert-format').selectOption('raw');
    const [raw] = await Promise.all([page.waitForEvent('download'), page.getByTestId('convert').click()]);
    expect(raw.suggestedFilename()).toBe(name.replace(/\.qcow2$/, '.raw'));
    await raw.saveAs(join(dir, 'ui.raw'));
    await expect(page.getByTestId('convert-done')).toBeVisible();
    // The image file itself, from the library, for qemu-img to convert.
    const [img] = await Promise.all([page.waitForEvent('download'), page.getByRole('button', { name: `Download ${name}` }).click()]);
    await img.saveAs(join(dir, 'image.qcow2'));
    run('qemu-img', ['check', join(dir, 'image.qcow2')]);
    run('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', join(dir, 'image.qcow2'), join(dir, 'qemu.raw')]);
    const ours = readFileSync(join(dir, 'ui.raw'));
    const theirs = readFileSync(join(dir, 'qemu.raw'));
    expect(ours.length).toBe(24 * 1024 * 1024);
    expect(ours.equals(theirs)).toBe(true);
    await shot(page, testInfo, 'create-check-convert');
    // Rename and delete from the library (closing the image first, as an open image is locked).
    await page.getByRole('button', { name: `Close ${name}` }).click();
    await page.getByRole('button', { name: `Rename ${name}` }).click();
    await page.getByRole('textbox', { name: `New name for ${name}` }).fill(`renamed-${name}`);
    await page.getByRole('button', { name: 'Rename', exact: true }).click();
    await expect(page.getByRole('button', { name: `Open renamed-${name}` })).toBeVisible();
    await page.getByRole('button', { name: `Delete renamed-${name}` }).click();
    await page.getByRole('button', { name: 'Delete', exact: true }).click();
    await expect(page.getByRole('button', { name: `Open renamed-${name}` })).toHaveCount(0);
    await expect(page.getByTestId('library-list')).not.toContainText(name);
    expect(errors).toEqual([]);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('imported into the library, an overlay is committed into its base as qemu-img commit does', async ({ page }, testInfo) => {
  const errors = collectErrors(page);
  const dir = tempDir();
  try {
    run('qemu-img', ['create', '-q', '-f', 'qcow2', 'base.qcow2', '32M'], dir);
    run('qemu-io', ['-f', 'qcow2', '-c', 'write -q -P 0x41 0 2M', '-c', 'write -q -P 0x42 8M 1M', 'base.qcow2'], dir);
    run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'overlay.qcow2'], dir);
    run('qemu-io', ['-f', 'qcow2', '-c', 'write -q -P 0x61 1M 2M', '-c', 'write -q -z 8M 64k', '-c', 'write -q -P 0x63 20M 128k', 'overlay.qcow2'], dir);
    await openInspector(page);
    await page.locator('#import-input').setInputFiles([join(dir, 'base.qcow2'), join(dir, 'overlay.qcow2')]);
    await expect(page.getByRole('button', { name: 'Open overlay.qcow2' })).toBeVisible({ timeout: 20_000 });
    await page.getByRole('button', { name: 'Open overlay.qcow2' }).click();
    await expect(page.getByTestId('image-title')).toHaveText('overlay.qcow2');
    await expect(page.locator('[data-testid="chain"] figure')).toHaveCount(2);
    await tab(page, 'Actions');
    await expect(page.getByRole('button', { name: 'Commit' })).toBeDisabled();
    await page.getByTestId('reopen').click();
    await expect(page.locator('.pill', { hasText: 'read-write' })).toBeVisible();
    await tab(page, 'Actions');
    await page.getByRole('button', { name: 'Commit' }).click();
    await expect(page.getByText('Image committed')).toBeVisible({ timeout: 20_000 });
    const [dl] = await Promise.all([page.waitForEvent('download'), page.getByRole('button', { name: 'Download base.qcow2' }).click()]);
    await dl.saveAs(join(dir, 'ours.qcow2'));
    run('qemu-img', ['commit', '-q', '-d', 'overlay.qcow2'], dir);
    run('qemu-img', ['check', join(dir, 'ours.qcow2')]);
    expect(run('qemu-img', ['compare', '-f', 'qcow2', '-F', 'qcow2', join(dir, 'ours.qcow2'), join(dir, 'base.qcow2')]).trim()).toBe('Images are identical.');
    await shot(page, testInfo, 'commit');
    expect(errors).toEqual([]);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('after one visit the app loads offline and opens an OPFS image', async ({ page, context }, testInfo) => {
  const errors = collectErrors(page);
  await openInspector(page);
  await page.waitForFunction(() => navigator.serviceWorker.controller !== null, undefined, { timeout: 30_000 });
  await expect(page.getByTestId('offline-badge')).toHaveText('✓ works offline');
  await context.setOffline(true);
  const fromSw: string[] = [];
  page.on('response', (r) => {
    if (r.fromServiceWorker()) fromSw.push(new URL(r.url()).pathname);
  });
  await page.reload();
  await expect(page.locator('body[data-ready="true"]')).toBeAttached({ timeout: 30_000 });
  expect(fromSw).toContain('/');
  await expect(page.getByTestId('image-title')).toHaveText('demo/overlay.qcow2');
  await expect(page.locator('[data-testid="header-fields"] [data-field="magic"]')).toHaveText('0x514649fb');
  // Another image of the library, opened while offline (the overlay holds its base open, so close it first).
  await page.getByRole('button', { name: 'Close demo/overlay.qcow2' }).click();
  await page.getByRole('button', { name: 'Open demo/base.qcow2' }).click();
  await expect(page.getByTestId('image-title')).toHaveText('demo/base.qcow2');
  await tab(page, 'Allocation map');
  await expect(page.locator('[data-testid="map-status"][data-state="done"]')).toBeAttached({ timeout: 20_000 });
  await shot(page, testInfo, 'offline-reload');
  await context.setOffline(false);
  expect(errors).toEqual([]);
});

test('a convert of a large image shows progress moving and can be cancelled', async ({ persistentPage: page }, testInfo) => {
  const errors = collectErrors(page);
  await openInspector(page);
  const name = unique('large');
  // Metadata preallocation maps every cluster, so convert has to read all of them (an empty image converts at once).
  await createImage(page, name, '4G', 'qcow2', { preallocation: 'metadata' });
  await tab(page, 'Actions');
  let downloaded = false;
  page.on('download', () => (downloaded = true));
  await page.getByTestId('convert').click();
  const job = page.locator('.job[data-state="running"]', { hasText: `Convert ${name} to raw` });
  await expect(job).toBeVisible();
  const seen: number[] = [];
  for (let i = 0; i < 100 && seen.length < 3; i++) {
    const done = Number((await job.getAttribute('data-done')) ?? '0');
    if (done > 0 && done !== seen[seen.length - 1]) seen.push(done);
    await page.waitForTimeout(100);
  }
  expect(seen.length, `progress values seen: ${seen.join(', ')}`).toBeGreaterThanOrEqual(3);
  expect(seen).toEqual([...seen].sort((a, b) => a - b));
  expect(seen[seen.length - 1]!).toBeLessThan(4 * 1024 ** 3);
  await shot(page, testInfo, 'convert-progress');
  await job.getByRole('button', { name: `Cancel Convert ${name} to raw` }).click();
  await expect(page.locator('.job[data-state="cancelled"]', { hasText: `Convert ${name} to raw` })).toBeVisible();
  await expect(page.getByTestId('convert-cancelled')).toBeVisible();
  expect(downloaded).toBe(false);
  expect(errors).toEqual([]);
});

test('the allocation map of a 1 TiB image draws from block status at once', async ({ persistentPage: page }, testInfo) => {
  const errors = collectErrors(page);
  await openInspector(page);
  const name = unique('huge');
  await createImage(page, name, '1T');
  const t0 = Date.now();
  await tab(page, 'Allocation map');
  await expect(page.locator('[data-testid="map-status"][data-state="done"]')).toBeAttached({ timeout: 30_000 });
  const elapsed = Date.now() - t0;
  await expect(page.getByTestId('map-legend').locator('li[data-cat="unallocated"]')).toHaveAttribute('data-bytes', String(2 ** 40));
  expect(Number(await page.getByTestId('alloc-canvas').getAttribute('data-cells'))).toBeGreaterThan(1000);
  // Zooming in to one cluster per cell and reading a cell with the keyboard.
  await page.getByTestId('alloc-canvas').focus();
  await page.keyboard.press('Enter');
  await page.keyboard.press('Enter');
  await page.keyboard.press('Enter');
  await page.keyboard.press('ArrowRight');
  await expect(page.getByTestId('cell-details')).toContainText('unallocated');
  testInfo.annotations.push({ type: 'map-time-ms', description: String(elapsed) });
  await shot(page, testInfo, 'map-1TiB');
  expect(errors).toEqual([]);
});

test('an image over HTTP shows the bytes fetched, its chain resolved next to it', async ({ page }, testInfo) => {
  const errors = collectErrors(page);
  await openInspector(page);
  await page.locator('#url-input').fill(`${INSPECTOR_BASE_URL}/demo/overlay.qcow2`);
  await page.getByRole('button', { name: 'Open URL' }).click();
  await expect(page.getByTestId('image-title')).toHaveText('overlay.qcow2');
  await expect(page.locator('[data-testid="chain"] figure')).toHaveCount(2);
  const fetched = page.getByTestId('bytes-fetched');
  await expect(fetched).toBeVisible();
  const n = Number(/\((\d+) bytes\)|^(\d+) bytes/.exec((await fetched.textContent()) ?? '')?.slice(1).find(Boolean) ?? 'NaN');
  expect(n).toBeGreaterThan(0);
  const total = Number(JSON.parse(readFileSync(new URL('../web/public/demo/demo.json', import.meta.url), 'utf8')).files.reduce((a: number, f: { size: number }) => a + f.size, 0));
  expect(n).toBeLessThan(total);
  await tab(page, 'Hex');
  await page.locator('#hex-offset').fill('0xa00000');
  await page.getByRole('button', { name: 'Go' }).click();
  await expect(page.getByTestId('hex-dump')).toContainText('qblock demo | ov');
  await expect(page.getByTestId('hex-mapping')).toContainText('data in the image');
  await shot(page, testInfo, 'url-hex');
  expect(errors).toEqual([]);
});

test('keyboard: tabs, the map and the hex view work without a mouse', async ({ page }) => {
  const errors = collectErrors(page);
  await openInspector(page);
  await page.getByRole('tab', { name: 'Overview' }).focus();
  await page.keyboard.press('ArrowRight');
  await expect(page.getByRole('tab', { name: 'Allocation map' })).toBeFocused();
  await expect(page.locator('#tabpanel[data-tab="Allocation map"]')).toBeVisible();
  await expect(page.locator('[data-testid="map-status"][data-state="done"]')).toBeAttached({ timeout: 20_000 });
  await page.getByTestId('alloc-canvas').focus();
  await page.keyboard.press('ArrowRight');
  await expect(page.getByTestId('cell-details')).toContainText('Guest 0x00010000');
  await page.keyboard.press('h');
  await expect(page.locator('#tabpanel[data-tab="Hex"]')).toBeVisible();
  await expect(page.getByTestId('hex-dump')).toHaveAttribute('data-offset', String(0x10000));
  // The skip link comes first, then the file picker.
  await page.locator('a.skip').focus();
  await page.keyboard.press('Tab');
  expect(await page.evaluate(() => document.activeElement?.id)).toBe('file-input');
  expect(errors).toEqual([]);
});

test('the demo generator writes what the README promises', () => {
  const demo = JSON.parse(readFileSync(new URL('../web/public/demo/demo.json', import.meta.url), 'utf8')) as { generator: string; byQemu: string[]; files: Array<{ name: string }> };
  expect(demo.generator).toBe('engine');
  // Snapshot and bitmaps included: QEMU's tools did nothing.
  expect(demo.byQemu).toEqual([]);
  const dir = new URL('../web/public/demo/', import.meta.url).pathname;
  const info = JSON.parse(run('qemu-img', ['info', '--output=json', '--backing-chain', join(dir, 'overlay.qcow2')])) as Array<{ filename: string }>;
  expect(info).toHaveLength(2);
  for (const f of demo.files) run('qemu-img', ['check', join(dir, f.name)]);
});
