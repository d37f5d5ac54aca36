import { defineConfig } from 'vitest/config';

// Unit and property tests run in Node. Browser specs live in e2e/ and run
// under Playwright (playwright.config.ts), never here.
export default defineConfig({
  test: {
    include: ['src/**/*.test.ts', 'scripts/**/*.test.ts'],
    exclude: ['e2e/**', 'node_modules/**', 'dist/**', 'build/**'],
    testTimeout: 30_000,
    hookTimeout: 30_000,
    pool: 'forks',
  },
});
