// Smoke test of the web shell: the page is cross-origin isolated and its
// worker can use OPFS sync access handles and the wasm kernels.

import type { Page } from '@playwright/test';
import type { ProbeResult } from '../web/probe-types.ts';
import { expect, test } from './fixtures.ts';

type PageProbe = ProbeResult & { pageCrossOriginIsolated: boolean; error?: string };

/** Opens the app, waits for the worker probe and returns what it reported. */
async function runProbe(page: Page): Promise<PageProbe> {
  await page.goto('/');
  await expect(page.locator('h1')).toHaveText('qblock image inspector');
  // The inspector runs the probe when its Environment panel is opened.
  await page.locator('details.env > summary').click();
  const out = page.locator('#probe[data-state="done"]');
  await expect(out).toBeAttached({ timeout: 20_000 });
  return JSON.parse((await out.textContent()) ?? '{}') as PageProbe;
}

/** Asserts every probe succeeded, showing the probe's own errors on failure. */
function expectAllGood(r: PageProbe): void {
  expect(r.error, 'worker error').toBeUndefined();
  expect(r.errors, 'probe errors').toEqual([]);
  expect(r.pageCrossOriginIsolated).toBe(true);
  expect(r.workerCrossOriginIsolated).toBe(true);
  expect(r.opfsDirectory).toBe(true);
  expect(r.opfsSyncAccessHandle).toBe(true);
  expect(r.wasmKernels).toBe(true);
}

test('worker has OPFS sync access handles, cross-origin isolation and wasm kernels', async ({ page }) => {
  expectAllGood(await runProbe(page));
});

test('persistentPage fixture runs the same probe in an on-disk profile', async ({ persistentPage }) => {
  expectAllGood(await runProbe(persistentPage));
});
