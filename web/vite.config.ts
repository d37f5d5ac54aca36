import { fileURLToPath } from 'node:url';
import { defineConfig } from 'vite';
import { qblockInspector } from './vite-plugin.ts';

/** Headers that make the page cross-origin isolated, which SharedArrayBuffer needs. */
const isolation = {
  'Cross-Origin-Opener-Policy': 'same-origin',
  'Cross-Origin-Embedder-Policy': 'require-corp',
};

const webRoot = fileURLToPath(new URL('.', import.meta.url));
const repoRoot = fileURLToPath(new URL('..', import.meta.url));

/** Port of `npm start` (vite preview of the built app); QBLOCK_PORT moves it, e.g. for the e2e server. */
const startPort = Number(process.env.QBLOCK_PORT ?? 5173);

// The app lives in web/ but imports src/ and fetches build/qblock.wasm,
// so the dev server may serve the whole repository.
export default defineConfig({
  root: webRoot,
  // The demo images and the PWA (service worker, icons, precache list): web/vite-plugin.ts.
  plugins: [qblockInspector()],
  server: {
    // Not 5173: there `npm start` serves the built app, whose service worker would answer
    // for the dev server with its cached build.
    port: 5174,
    headers: isolation,
    fs: { allow: [repoRoot] },
  },
  preview: { headers: isolation, port: startPort, strictPort: true },
  worker: { format: 'es' },
  // v86 is imported only by the engine test page (web/engine); bundle it at startup so a
  // first visit does not trigger a dependency re-optimisation and a full page reload mid-test.
  optimizeDeps: { include: ['v86'] },
  build: {
    // QBLOCK_OUT_DIR lets the e2e server build apart from `npm start`'s dist/.
    outDir: process.env.QBLOCK_OUT_DIR ?? fileURLToPath(new URL('../dist', import.meta.url)),
    emptyOutDir: true,
    target: 'es2022',
  },
});
