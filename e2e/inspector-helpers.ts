// Helpers shared by the inspector specs (e2e/inspector*.spec.ts): commands
// for QEMU's tools, console-error collection, and driving the app's tabs,
// library form and downloads.

import { spawnSync } from 'node:child_process';
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Page, TestInfo } from '@playwright/test';
import { expect } from './fixtures.ts';
import { INSPECTOR_BASE_URL } from './inspector-server.ts';

/** Runs a command and returns its stdout; throws with stderr when it fails. */
export function run(cmd: string, args: string[], cwd?: string): string {
  const r = spawnSync(cmd, args, { encoding: 'utf8', cwd });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')}: ${r.stderr || r.stdout}`);
  return r.stdout;
}

/** A fresh temporary directory (the test removes it). */
export function tempDir(): string {
  return mkdtempSync(join(tmpdir(), 'qblock-inspector-'));
}

/** Console errors and uncaught exceptions of a page, collected from now on. */
export function collectErrors(page: Page): string[] {
  const errors: string[] = [];
  page.on('console', (m) => {
    if (m.type() === 'error') errors.push(`console: ${m.text()}`);
  });
  page.on('pageerror', (e) => errors.push(`pageerror: ${e.message}`));
  return errors;
}

/** Opens the inspector and waits until it has started (demo opened, library listed). */
export async function openInspector(page: Page): Promise<void> {
  await page.goto(`${INSPECTOR_BASE_URL}/`);
  await expect(page.locator('body[data-ready="true"]')).toBeAttached({ timeout: 30_000 });
}

/** Attaches a screenshot to the report (and keeps it in the test's output directory). */
export async function shot(page: Page, testInfo: TestInfo, name: string, fullPage = false): Promise<void> {
  const path = testInfo.outputPath(`${name}.png`);
  await page.screenshot({ path, fullPage });
  await testInfo.attach(name, { path, contentType: 'image/png' });
}

/** Switches to a tab by name. */
export async function tab(page: Page, name: string): Promise<void> {
  await page.getByRole('tab', { name }).click();
  await expect(page.locator(`#tabpanel[data-tab="${name}"]`)).toBeVisible();
}

/** Creates an image with the library's form; the inspector opens it when done. */
export async function createImage(page: Page, name: string, size: string, format = 'qcow2', options: Record<string, string> = {}): Promise<void> {
  const details = page.getByTestId('create-details');
  if (!(await details.evaluate((d) => (d as HTMLDetailsElement).open))) await details.locator(':scope > summary').click();
  await page.locator('#create-format').selectOption(format);
  await page.locator('#create-name').fill(name);
  await page.locator('#create-size').fill(size);
  for (const [k, v] of Object.entries(options)) await page.locator(`#create-${k}`).selectOption(v);
  await page.getByTestId('create-form').getByRole('button', { name: 'Create' }).click();
  await expect(page.getByTestId('create-done')).toContainText(`Created ${name}`, { timeout: 20_000 });
  await expect(page.getByTestId('image-title')).toHaveText(name, { timeout: 20_000 });
}

/** A unique image name per run, so persistent profiles and reruns never collide. */
export function unique(stem: string, ext = 'qcow2'): string {
  return `${stem}-${Date.now().toString(36)}${Math.random().toString(36).slice(2, 6)}.${ext}`;
}

/** The map entries the inspector lists, in qemu-img map's JSON fields (QEMU 7.2 prints no "compressed"). */
export async function mapEntries(page: Page): Promise<Array<Record<string, unknown>>> {
  await tab(page, 'Allocation map');
  await expect(page.locator('[data-testid="map-status"][data-state="done"]')).toBeAttached({ timeout: 30_000 });
  await expect(page.getByTestId('map-entries')).toHaveAttribute('data-complete', 'true');
  const rows = await page.locator('[data-testid="map-entries"] tr[data-entry]').evaluateAll((trs) => trs.map((tr) => (tr as HTMLElement).dataset.entry ?? '{}'));
  return rows.map((r) => {
    const e = JSON.parse(r) as Record<string, unknown>;
    delete e.compressed;
    return e;
  });
}


/** Downloads a library file with its Download button and saves it at `to`. */
export async function downloadLibraryFile(page: Page, path: string, to: string): Promise<void> {
  const [dl] = await Promise.all([page.waitForEvent('download'), page.getByRole('button', { name: `Download ${path}`, exact: true }).click()]);
  await dl.saveAs(to);
}

/** Imports files into the library's top level and opens `open` read-write (Actions tab, Reopen for writing). */
export async function importAndOpenForWriting(page: Page, files: string[], open: string): Promise<void> {
  await page.locator('#import-input').setInputFiles(files);
  for (const f of files) await expect(page.getByRole('button', { name: `Open ${f.split('/').pop()!}`, exact: true })).toBeVisible({ timeout: 20_000 });
  await page.getByRole('button', { name: `Open ${open}`, exact: true }).click();
  await expect(page.getByTestId('image-title')).toHaveText(open);
  await reopenForWriting(page);
}

/** Reopens the current library image read-write from the Actions tab and comes back to it. */
export async function reopenForWriting(page: Page): Promise<void> {
  await tab(page, 'Actions');
  await page.getByTestId('reopen').click();
  await expect(page.locator('.pill', { hasText: 'read-write' })).toBeVisible();
  await tab(page, 'Actions');
}

/** qemu-img info --output=json of a file. */
export function qemuInfo(file: string): Record<string, unknown> & { 'format-specific'?: { data: Record<string, unknown> } } {
  return JSON.parse(run('qemu-img', ['info', '--output=json', file])) as Record<string, unknown> & { 'format-specific'?: { data: Record<string, unknown> } };
}

/** qemu-img map --output=json of a file without host offsets (where clusters land may differ; what maps where must not). */
export function qemuMapNoOffsets(file: string): Array<Record<string, unknown>> {
  return (JSON.parse(run('qemu-img', ['map', '--output=json', file])) as Array<Record<string, unknown>>).map(({ offset: _o, ...rest }) => rest);
}

/** Runs `qemu-img check` and returns its exit status and output (0 = clean). */
export function qemuCheck(file: string): { status: number; out: string } {
  const r = spawnSync('qemu-img', ['check', file], { encoding: 'utf8' });
  return { status: r.status ?? -1, out: `${r.stdout}${r.stderr}` };
}
