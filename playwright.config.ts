import { defineConfig } from '@playwright/test';
import { CHROMIUM_ARGS, CHROMIUM_PATH, E2E_BASE_URL, E2E_PORT } from './e2e/chromium.ts';

const CI = !!process.env.CI;

// Browser specs in e2e/, against the Vite dev server, in Debian's Chromium.
// scripts/test.mjs reads the JSON report to count results.
export default defineConfig({
  testDir: 'e2e',
  testMatch: '**/*.spec.ts',
  // Keep artifacts apart from test-results/*.json: Playwright empties outputDir.
  outputDir: 'test-results/playwright-artifacts',
  timeout: 60_000,
  fullyParallel: false,
  forbidOnly: CI,
  retries: 0,
  workers: 2,
  reporter: [['list'], ['json', { outputFile: 'test-results/playwright.json' }]],
  use: {
    baseURL: E2E_BASE_URL,
    browserName: 'chromium',
    headless: true,
    launchOptions: { executablePath: CHROMIUM_PATH, args: CHROMIUM_ARGS },
    trace: 'retain-on-failure',
  },
  projects: [{ name: 'chromium' }],
  webServer: {
    command: `npx vite --config web/vite.config.ts --port ${E2E_PORT} --strictPort`,
    url: E2E_BASE_URL,
    reuseExistingServer: !CI,
    timeout: 60_000,
    stdout: 'ignore',
    stderr: 'pipe',
  },
});
