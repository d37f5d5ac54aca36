// The inspector's actions that change library images, checked against
// QEMU's tools on the downloaded files: a safe and an unsafe rebase onto
// another library image (compared with qemu-img rebase of the same images),
// a commit that empties the overlay (compared with qemu-img commit),
// internal snapshots created, applied and deleted (qemu-img snapshot -l and
// -a on the downloads), and a dirty bitmap added, dirtied by writes, shown
// over the allocation map and stored so qemu-img info lists it.

import { copyFileSync, mkdirSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { expect, test } from './fixtures.ts';
import {
  collectErrors,
  createImage,
  downloadLibraryFile,
  importAndOpenForWriting,
  openInspector,
  qemuCheck,
  qemuInfo,
  qemuMapNoOffsets,
  reopenForWriting,
  run,
  shot,
  tab,
  tempDir,
  unique,
} from './inspector-helpers.ts';
import { INSPECTOR_BASE_URL } from './inspector-server.ts';

test.use({ baseURL: INSPECTOR_BASE_URL });

/** Three images: two different bases and an overlay over the first, with data in all of them. */
function makeChain(dir: string): void {
  run('qemu-img', ['create', '-q', '-f', 'qcow2', 'base1.qcow2', '32M'], dir);
  run('qemu-io', ['-f', 'qcow2', '-c', 'write -q -P 0x41 0 2M', '-c', 'write -q -P 0x42 8M 1M', '-c', 'write -q -P 0x43 16M 192k', 'base1.qcow2'], dir);
  run('qemu-img', ['create', '-q', '-f', 'qcow2', 'base2.qcow2', '32M'], dir);
  run('qemu-io', ['-f', 'qcow2', '-c', 'write -q -P 0x41 0 1M', '-c', 'write -q -P 0x52 8M 512k', '-c', 'write -q -P 0x53 24M 64k', 'base2.qcow2'], dir);
  run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'base1.qcow2', '-F', 'qcow2', 'overlay.qcow2'], dir);
  run('qemu-io', ['-f', 'qcow2', '-c', 'write -q -P 0x61 1536k 1M', '-c', 'write -q -z 8M 64k', '-c', 'write -q -P 0x63 20M 128k', 'overlay.qcow2'], dir);
}

test('rebase of a library overlay onto another base, safe and unsafe, matches qemu-img rebase', async ({ page }, testInfo) => {
  const errors = collectErrors(page);
  const dir = tempDir();
  try {
    makeChain(dir);
    const ui = join(dir, 'ui');
    mkdirSync(ui);
    for (const f of ['base1.qcow2', 'base2.qcow2']) copyFileSync(join(dir, f), join(ui, f));
    await openInspector(page);
    await importAndOpenForWriting(page, ['base1.qcow2', 'base2.qcow2', 'overlay.qcow2'].map((f) => join(dir, f)), 'overlay.qcow2');
    // Safe rebase onto base2: what differs between the bases is copied into the overlay first.
    await page.locator('#rebase-onto').selectOption('base2.qcow2');
    await page.getByRole('button', { name: 'Rebase', exact: true }).click();
    await expect(page.getByTestId('rebase-done')).toHaveText('Rebased onto base2.qcow2.', { timeout: 30_000 });
    await tab(page, 'Overview');
    await expect(page.locator('[data-testid="chain"] figure').nth(1)).toContainText('base2.qcow2');
    await shot(page, testInfo, 'rebased-overview');
    await downloadLibraryFile(page, 'overlay.qcow2', join(ui, 'overlay.qcow2'));
    run('qemu-img', ['rebase', '-q', '-b', 'base2.qcow2', '-F', 'qcow2', 'overlay.qcow2'], dir);
    expect(qemuCheck(join(ui, 'overlay.qcow2')).status).toBe(0);
    const ours = qemuInfo(join(ui, 'overlay.qcow2'));
    expect(ours['backing-filename']).toBe('base2.qcow2');
    expect(ours['backing-filename-format']).toBe('qcow2');
    expect(run('qemu-img', ['compare', join(ui, 'overlay.qcow2'), join(dir, 'overlay.qcow2')]).trim()).toBe('Images are identical.');
    expect(qemuMapNoOffsets(join(ui, 'overlay.qcow2'))).toEqual(qemuMapNoOffsets(join(dir, 'overlay.qcow2')));

    // Unsafe rebase back onto base1: only the name changes, so the guest now sees base1 below the overlay.
    await tab(page, 'Actions');
    await page.locator('#rebase-onto').selectOption('base1.qcow2');
    await page.getByTestId('rebase-unsafe').check();
    await page.getByRole('button', { name: 'Rebase', exact: true }).click();
    await expect(page.getByTestId('rebase-done')).toHaveText('Rebased onto base1.qcow2 (unsafe: only the name was changed).', { timeout: 30_000 });
    await downloadLibraryFile(page, 'overlay.qcow2', join(ui, 'overlay.qcow2'));
    run('qemu-img', ['rebase', '-q', '-u', '-b', 'base1.qcow2', '-F', 'qcow2', 'overlay.qcow2'], dir);
    expect(qemuCheck(join(ui, 'overlay.qcow2')).status).toBe(0);
    expect(qemuInfo(join(ui, 'overlay.qcow2'))['backing-filename']).toBe('base1.qcow2');
    expect(run('qemu-img', ['compare', join(ui, 'overlay.qcow2'), join(dir, 'overlay.qcow2')]).trim()).toBe('Images are identical.');
    expect(errors).toEqual([]);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('commit that empties the overlay matches qemu-img commit', async ({ page }, testInfo) => {
  const errors = collectErrors(page);
  const dir = tempDir();
  try {
    makeChain(dir);
    const ui = join(dir, 'ui');
    mkdirSync(ui);
    await openInspector(page);
    await importAndOpenForWriting(page, ['base1.qcow2', 'overlay.qcow2'].map((f) => join(dir, f)), 'overlay.qcow2');
    await page.getByTestId('commit-empty').check();
    await page.getByRole('button', { name: 'Commit', exact: true }).click();
    await expect(page.getByTestId('commit-done')).toHaveText('Image committed; the overlay was emptied.', { timeout: 30_000 });
    await shot(page, testInfo, 'committed-emptied');
    await downloadLibraryFile(page, 'base1.qcow2', join(ui, 'base1.qcow2'));
    await downloadLibraryFile(page, 'overlay.qcow2', join(ui, 'overlay.qcow2'));
    run('qemu-img', ['commit', '-q', 'overlay.qcow2'], dir);
    for (const f of ['base1.qcow2', 'overlay.qcow2']) expect(qemuCheck(join(ui, f)).status, f).toBe(0);
    expect(run('qemu-img', ['compare', '-f', 'qcow2', '-F', 'qcow2', join(ui, 'base1.qcow2'), join(dir, 'base1.qcow2')]).trim()).toBe('Images are identical.');
    expect(run('qemu-img', ['compare', join(ui, 'overlay.qcow2'), join(dir, 'overlay.qcow2')]).trim()).toBe('Images are identical.');
    // Emptied: the overlay holds nothing itself any more, as after QEMU's commit (its own layer maps as QEMU's does).
    const top = (f: string): Array<Record<string, unknown>> => qemuMapNoOffsets(f).filter((e) => e.depth === 0);
    expect(top(join(ui, 'overlay.qcow2'))).toEqual(top(join(dir, 'overlay.qcow2')));
    expect(top(join(ui, 'overlay.qcow2')).filter((e) => e.present === true)).toEqual([]);
    // The allocation map of the still-open overlay shows it too: everything comes from the base.
    await tab(page, 'Allocation map');
    await expect(page.locator('[data-testid="map-status"][data-state="done"]')).toBeAttached({ timeout: 20_000 });
    await expect(page.getByTestId('map-legend').locator('li[data-cat="data"]')).toHaveCount(0);
    expect(errors).toEqual([]);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('snapshots: create, apply and delete on a library image, as qemu-img snapshot sees them', async ({ page }, testInfo) => {
  const errors = collectErrors(page);
  const dir = tempDir();
  try {
    await openInspector(page);
    const name = unique('snap');
    await createImage(page, name, '8M');
    await reopenForWriting(page);
    const write = async (pattern: string): Promise<void> => {
      await page.locator('#write-offset').fill('64k');
      await page.locator('#write-length').fill('128k');
      await page.locator('#write-pattern').fill(pattern);
      await page.getByTestId('write-card').getByRole('button', { name: 'Write' }).click();
      await expect(page.getByTestId('write-done')).toContainText(`write -P ${pattern}`);
    };
    const snapshot = async (tag: string): Promise<void> => {
      await page.locator('#snapshot-name').fill(tag);
      await page.getByRole('button', { name: 'Create snapshot' }).click();
      await expect(page.getByTestId('snapshot-done')).toHaveText(`Created snapshot '${tag}'.`);
    };
    await write('0x11');
    await snapshot('first');
    await write('0x22');
    await snapshot('second');
    await expect(page.getByTestId('snapshot-list')).toContainText('first');
    await expect(page.getByTestId('snapshot-list')).toContainText('second');
    await shot(page, testInfo, 'snapshots');
    await downloadLibraryFile(page, name, join(dir, 'two.qcow2'));
    const listed = run('qemu-img', ['snapshot', '-l', join(dir, 'two.qcow2')]);
    expect(listed).toMatch(/\bfirst\b/);
    expect(listed).toMatch(/\bsecond\b/);
    expect(qemuCheck(join(dir, 'two.qcow2')).status).toBe(0);

    // Apply the first: the disk reads as it was then, exactly as qemu-img snapshot -a makes it.
    await page.getByRole('button', { name: 'Apply snapshot first' }).click();
    await expect(page.getByTestId('snapshot-done')).toHaveText("Reverted to snapshot 'first'.");
    await downloadLibraryFile(page, name, join(dir, 'applied.qcow2'));
    copyFileSync(join(dir, 'two.qcow2'), join(dir, 'qemu-applied.qcow2'));
    run('qemu-img', ['snapshot', '-a', 'first', join(dir, 'qemu-applied.qcow2')]);
    expect(run('qemu-img', ['compare', join(dir, 'applied.qcow2'), join(dir, 'qemu-applied.qcow2')]).trim()).toBe('Images are identical.');
    run('qemu-io', ['-f', 'qcow2', '-r', '-c', 'read -q -P 0x11 64k 128k', join(dir, 'applied.qcow2')]);
    expect(qemuCheck(join(dir, 'applied.qcow2')).status).toBe(0);

    // Delete the second: qemu-img lists only the first, and the image stays clean.
    await page.getByRole('button', { name: 'Delete snapshot second' }).click();
    await expect(page.getByTestId('snapshot-done')).toHaveText("Deleted snapshot 'second'.");
    await expect(page.getByTestId('snapshot-list')).not.toContainText('second');
    await downloadLibraryFile(page, name, join(dir, 'one.qcow2'));
    const after = run('qemu-img', ['snapshot', '-l', join(dir, 'one.qcow2')]);
    expect(after).toMatch(/\bfirst\b/);
    expect(after).not.toMatch(/\bsecond\b/);
    expect(qemuCheck(join(dir, 'one.qcow2')).status).toBe(0);
    expect(errors).toEqual([]);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('a dirty bitmap: added, dirtied by writes, shown over the map, stored for qemu-img', async ({ page }, testInfo) => {
  const errors = collectErrors(page);
  const dir = tempDir();
  try {
    await openInspector(page);
    const name = unique('bitmap');
    await createImage(page, name, '16M');
    await reopenForWriting(page);
    await page.locator('#bitmap-name').fill('b0');
    await page.locator('#bitmap-granularity').selectOption('65536');
    await page.getByRole('button', { name: 'Add bitmap' }).click();
    await expect(page.getByTestId('bitmap-done')).toHaveText("Added bitmap 'b0'.");
    await expect(page.getByTestId('bitmap-list')).toContainText('b0');
    // Two writes: 128 KiB at 1 MiB and one byte range inside the granule at 5 MiB.
    for (const [off, len] of [['1M', '128k'], ['5M', '4k']] as const) {
      await page.locator('#write-offset').fill(off);
      await page.locator('#write-length').fill(len);
      await page.getByTestId('write-card').getByRole('button', { name: 'Write' }).click();
      await expect(page.getByTestId('write-done')).toContainText(`${len === '128k' ? '128 KiB' : '4 KiB'}`);
    }
    // The dirty areas over the map: first from the open image's own bitmap, then, reopened read-only
    // (the image is closed first, which stores the bitmap), from the image file.
    const status = page.getByTestId('bitmap-overlay-status');
    for (const mode of ['read-write', 'read-only']) {
      if (mode === 'read-only') {
        await tab(page, 'Actions');
        await page.getByTestId('reopen').click();
        await expect(page.locator('.pill', { hasText: 'read-only' })).toBeVisible();
      }
      await tab(page, 'Overview');
      await page.getByRole('button', { name: 'Show bitmap b0 on the map' }).click();
      await expect(page.locator('#tabpanel[data-tab="Allocation map"]')).toBeVisible();
      await expect(status).toHaveAttribute('data-state', 'done', { timeout: 20_000 });
      await expect(status, mode).toHaveAttribute('data-dirty-bytes', String(128 * 1024 + 64 * 1024));
      // 64 KiB clusters, one cell each: two cells at 1 MiB and one at 5 MiB.
      await expect(page.getByTestId('alloc-canvas')).toHaveAttribute('data-dirty-cells', '3');
      await shot(page, testInfo, `bitmap-overlay-${mode}`);
    }
    await downloadLibraryFile(page, name, join(dir, 'bm.qcow2'));
    const info = qemuInfo(join(dir, 'bm.qcow2'));
    expect(info['format-specific']?.data.bitmaps).toEqual([{ name: 'b0', granularity: 65536, flags: ['auto'] }]);
    expect(qemuCheck(join(dir, 'bm.qcow2')).status).toBe(0);
    expect(errors).toEqual([]);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("the demo's bitmaps show their dirty areas over the allocation map", async ({ page }, testInfo) => {
  const errors = collectErrors(page);
  await page.setViewportSize({ width: 1280, height: 800 });
  await openInspector(page);
  await expect(page.getByTestId('image-title')).toHaveText('demo/overlay.qcow2');
  await tab(page, 'Allocation map');
  await expect(page.locator('[data-testid="map-status"][data-state="done"]')).toBeAttached({ timeout: 20_000 });
  // The demo writes 512 KiB at 40 MiB and 64 KiB at 9 MiB + 64 KiB after adding the bitmaps.
  await page.getByTestId('bitmap-overlay').selectOption('backup-0');
  const status = page.getByTestId('bitmap-overlay-status');
  await expect(status).toHaveAttribute('data-dirty-bytes', String(512 * 1024 + 64 * 1024), { timeout: 20_000 });
  expect(Number(await page.getByTestId('alloc-canvas').getAttribute('data-dirty-cells'))).toBe(9);
  await shot(page, testInfo, 'demo-bitmap-overlay-1280x800');
  // 1 MiB granules: each write dirties a whole one.
  await page.getByTestId('bitmap-overlay').selectOption('migration');
  await expect(status).toHaveAttribute('data-dirty-bytes', String(2 * 1024 * 1024), { timeout: 20_000 });
  // Keyboard: the overlay select and the map are reachable and the cell under the cursor says whether it is dirty.
  await page.getByTestId('alloc-canvas').focus();
  await page.keyboard.press('ArrowRight');
  await expect(page.getByTestId('cell-dirty')).toHaveText("Clean in bitmap 'migration'");
  await page.getByTestId('bitmap-overlay').selectOption('');
  await expect(page.getByTestId('alloc-canvas')).not.toHaveAttribute('data-dirty-cells');
  await page.setViewportSize({ width: 390, height: 844 });
  await page.getByTestId('bitmap-overlay').selectOption('backup-0');
  await expect(status).toHaveAttribute('data-state', 'done');
  expect(await page.evaluate(() => document.documentElement.scrollWidth)).toBeLessThanOrEqual(390);
  await shot(page, testInfo, 'demo-bitmap-overlay-390x844');
  // The Actions tab with its new cards fits a phone too; on the read-only demo the changing actions say why they are off.
  await tab(page, 'Actions');
  await expect(page.getByTestId('snapshots-card')).toContainText('reopen it for writing');
  await expect(page.getByTestId('bitmaps-card').getByRole('button', { name: 'Add bitmap' })).toBeDisabled();
  expect(await page.evaluate(() => document.documentElement.scrollWidth)).toBeLessThanOrEqual(390);
  await shot(page, testInfo, 'demo-actions-390x844', true);
  // Keyboard: the bitmap card's button works with Enter and lands on the map with the overlay chosen.
  await page.getByRole('button', { name: 'Show bitmap backup-0 on the map' }).focus();
  await page.keyboard.press('Enter');
  await expect(page.locator('#tabpanel[data-tab="Allocation map"]')).toBeVisible();
  await expect(page.getByTestId('bitmap-overlay')).toHaveValue('backup-0');
  expect(errors).toEqual([]);
});

test('a rebase of a large overlay shows progress moving and can be cancelled, leaving the image as it was', async ({ persistentPage: page }, testInfo) => {
  const errors = collectErrors(page);
  await openInspector(page);
  const base = unique('big-base');
  const overlay = unique('big-overlay');
  await createImage(page, base, '16G');
  // The base is closed so the overlay's create can open it to check it.
  await page.getByRole('button', { name: `Close ${base}` }).click();
  await createImage(page, overlay, '16G', 'qcow2', { backing_file: base });
  await reopenForWriting(page);
  // Safe rebase onto no backing file: every 2 MiB of the 16 GiB is read from the old base and compared.
  await page.locator('#rebase-onto').selectOption('');
  await page.getByRole('button', { name: 'Rebase', exact: true }).click();
  const job = page.locator('.job[data-state="running"]', { hasText: `Rebase ${overlay}` });
  await expect(job).toBeVisible();
  const seen: number[] = [];
  for (let i = 0; i < 100 && seen.length < 3; i++) {
    const done = Number((await job.getAttribute('data-done')) ?? '0');
    if (done > 0 && done !== seen[seen.length - 1]) seen.push(done);
    await page.waitForTimeout(100);
  }
  expect(seen.length, `progress values seen: ${seen.join(', ')}`).toBeGreaterThanOrEqual(3);
  expect(seen).toEqual([...seen].sort((a, b) => a - b));
  await shot(page, testInfo, 'rebase-progress');
  await job.getByRole('button', { name: `Cancel Rebase ${overlay}` }).click();
  await expect(page.locator('.job[data-state="cancelled"]', { hasText: `Rebase ${overlay}` })).toBeVisible();
  await expect(page.getByTestId('rebase-cancelled')).toBeVisible();
  // Cancelled before the header was rewritten: the overlay still names its base.
  await tab(page, 'Overview');
  await expect(page.getByTestId('image-summary').locator('[data-key="backing-filename"]')).toHaveAttribute('data-value', JSON.stringify(base));
  expect(errors).toEqual([]);
});
