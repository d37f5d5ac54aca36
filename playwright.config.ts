import { defineConfig } from '@playwright/test';
import { CHROMIUM_ARGS, CHROMIUM_PATH, E2E_BASE_URL, E2E_PORT } from './e2e/chromium.ts';
import { INSPECTOR_BASE_URL, INSPECTOR_OUT_DIR, INSPECTOR_PORT } from './e2e/inspector-server.ts';

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
  webServer: [
    {
      command: `npx vite --config web/vite.config.ts --port ${E2E_PORT} --strictPort`,
      url: E2E_BASE_URL,
      reuseExistingServer: !CI,
      timeout: 60_000,
      stdout: 'ignore',
      stderr: 'pipe',
    },
    {
      // e2e/inspector*.spec.ts: the built app exactly as the README's `npm start` serves it
      // (demo generation, vite build, vite preview), on its own port and output directory.
      command: 'npm start',
      env: { QBLOCK_PORT: String(INSPECTOR_PORT), QBLOCK_OUT_DIR: INSPECTOR_OUT_DIR },
      url: INSPECTOR_BASE_URL,
      reuseExistingServer: !CI,
      timeout: 180_000,
      stdout: 'ignore',
      stderr: 'pipe',
    },
  ],
});
