// Shared Playwright fixtures. `persistentPage` runs in a persistent Chromium
// profile on disk: OPFS there is much faster than in the default incognito
// context, so use it for specs that write a lot.

import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test as base, chromium, type BrowserContext, type Page } from '@playwright/test';
import { CHROMIUM_ARGS, CHROMIUM_PATH, E2E_BASE_URL } from './chromium.ts';

export { expect } from '@playwright/test';

/** Fixtures added to Playwright's `test`. */
export interface QblockFixtures {
  /** A browser context over a fresh on-disk profile, deleted after the test. */
  persistentContext: BrowserContext;
  /** A page in `persistentContext`, with the dev server as base URL. */
  persistentPage: Page;
}

/** Playwright's `test` extended with `persistentContext` and `persistentPage`. */
export const test = base.extend<QblockFixtures>({
  // eslint-disable-next-line no-empty-pattern -- Playwright requires the destructuring pattern
  persistentContext: async ({}, use, testInfo) => {
    const dir = await mkdtemp(join(tmpdir(), 'qblock-profile-'));
    const baseURL = testInfo.project.use.baseURL ?? E2E_BASE_URL;
    const context = await chromium.launchPersistentContext(dir, {
      executablePath: CHROMIUM_PATH,
      args: CHROMIUM_ARGS,
      headless: true,
      baseURL,
    });
    try {
      await use(context);
    } finally {
      await context.close();
      await rm(dir, { recursive: true, force: true });
    }
  },
  persistentPage: async ({ persistentContext }, use) => {
    const page = persistentContext.pages()[0] ?? (await persistentContext.newPage());
    await use(page);
  },
});
