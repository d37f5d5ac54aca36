// Where e2e/inspector*.spec.ts find the inspector: the built app served by
// `npm start` (vite build + vite preview), started by playwright.config.ts.

import { fileURLToPath } from 'node:url';
import { E2E_PORT } from './chromium.ts';

/** Port of the inspector's server: QBLOCK_E2E_INSPECTOR_PORT, else just below the dev server's. */
export const INSPECTOR_PORT = Number(process.env.QBLOCK_E2E_INSPECTOR_PORT ?? E2E_PORT - 1);

/** Base URL of the built inspector. */
export const INSPECTOR_BASE_URL = `http://localhost:${INSPECTOR_PORT}`;

/** Build output of the test server, apart from `npm start`'s dist/ so both can run at once. */
export const INSPECTOR_OUT_DIR = fileURLToPath(new URL(`../build/e2e-dist-${INSPECTOR_PORT}`, import.meta.url));
