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
  build: {
    outDir: fileURLToPath(new URL('../dist', import.meta.url)),
    emptyOutDir: true,
    target: 'es2022',
  },
});
