// The Chromium the e2e specs drive: Debian's package (installed by
// scripts/setup.mjs --test), not a Playwright-downloaded build.

/** Path of the Chromium binary; QBLOCK_CHROMIUM overrides the Debian default. */
export const CHROMIUM_PATH = process.env.QBLOCK_CHROMIUM ?? '/usr/bin/chromium';

/** Flags for running Chromium headless in containers and CI without background traffic. */
export const CHROMIUM_ARGS = [
  '--no-sandbox',
  '--disable-gpu',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
  '--no-first-run',
  '--disable-quic',
];

/** Port of the Vite dev server the specs run against; QBLOCK_E2E_PORT moves it so two runs can share a machine. */
export const E2E_PORT = Number(process.env.QBLOCK_E2E_PORT ?? 5199);

/** Base URL of that server. */
export const E2E_BASE_URL = `http://localhost:${E2E_PORT}`;
