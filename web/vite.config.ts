import { fileURLToPath } from 'node:url';
import { defineConfig } from 'vite';

/** Headers that make the page cross-origin isolated, which SharedArrayBuffer needs. */
const isolation = {
  'Cross-Origin-Opener-Policy': 'same-origin',
  'Cross-Origin-Embedder-Policy': 'require-corp',
};

const webRoot = fileURLToPath(new URL('.', import.meta.url));
const repoRoot = fileURLToPath(new URL('..', import.meta.url));

// The app lives in web/ but imports src/ and fetches build/qblock.wasm,
// so the dev server may serve the whole repository.
export default defineConfig({
  root: webRoot,
  server: {
    headers: isolation,
    fs: { allow: [repoRoot] },
  },
  preview: { headers: isolation },
  worker: { format: 'es' },
  // v86 is imported only by the engine test page (web/engine); bundle it at startup so a
  // first visit does not trigger a dependency re-optimisation and a full page reload mid-test.
  optimizeDeps: { include: ['v86'] },
  build: {
    outDir: fileURLToPath(new URL('../dist', import.meta.url)),
    emptyOutDir: true,
    target: 'es2022',
  },
});
