// The command-line tools as one plain-JavaScript bundle (build/cli/cli.cjs),
// so bin/qblock-img and bin/qblock-io start without transpiling TypeScript at
// every launch. Built with esbuild (tsx's own dependency, so always present
// where tsx is). The npm packages the engine uses go into the bundle too, so
// they share its code cache instead of each being resolved and compiled at
// start (fflate and pako alone took 25 ms); only the zstd encoder, an ES
// module loaded on first use, stays in node_modules.
// The bundle sits two directories below the root like src/kernels/index.ts,
// so `new URL('../../build/qblock.wasm', import.meta.url)` finds the kernels.
//
// It is a CommonJS function body, not a module, so the launcher can compile
// it with vm.Script and V8's code cache (build/cli/cli.cache): Node 20 has no
// compile cache for modules, and compiling the bundle and its first-run
// functions was most of a short command's start-up. The launcher supplies
// what a function body lacks: import.meta.url becomes __qblockModuleUrl and
// dynamic import() becomes __qblockImport (an ESM import done for it).
//
// A manifest beside the bundle lists its source files; the bundle is stale
// when any of them is newer than it. Plain Node, no dependency at import time.

import { existsSync, mkdirSync, readFileSync, renameSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { join, relative, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

/** Repository root (the directory above scripts/). */
const ROOT = fileURLToPath(new URL('..', import.meta.url));
/** The bundle, and the list of the files it was built from. */
export const CLI_BUNDLE = join(ROOT, 'build', 'cli', 'cli.cjs');
/** V8's code cache for the bundle, written by the launcher (V8 refuses it when the bundle changed). */
export const CLI_CODE_CACHE = join(ROOT, 'build', 'cli', 'cli.cache');
const MANIFEST = join(ROOT, 'build', 'cli', 'inputs.json');
/** Bumped when the build settings change, so older bundles count as stale. */
const FORMAT = 3;

/** True when the bundle is missing, was built with other settings, or any of its sources changed since. */
export function cliBundleStale() {
  let built;
  let manifest;
  try {
    built = statSync(CLI_BUNDLE).mtimeMs;
    manifest = JSON.parse(readFileSync(MANIFEST, 'utf8'));
  } catch {
    return true;
  }
  if (manifest.format !== FORMAT || !Array.isArray(manifest.inputs)) return true;
  for (const rel of manifest.inputs) {
    try {
      if (statSync(join(ROOT, rel)).mtimeMs > built) return true;
    } catch {
      // A source that disappeared means the tree changed under the bundle.
      return true;
    }
  }
  return false;
}

/**
 * Builds the bundle (to a temporary name, then renamed, so concurrent
 * launchers never load half a file). Resolves true on success, false (after
 * saying why on stderr when `verbose`) when esbuild is missing or fails.
 */
export async function buildCliBundle(verbose = false) {
  let esbuild;
  try {
    esbuild = await import('esbuild');
  } catch (e) {
    if (verbose) process.stderr.write(`[cli-bundle] esbuild unavailable: ${e instanceof Error ? e.message : String(e)}\n`);
    return false;
  }
  const dir = join(ROOT, 'build', 'cli');
  mkdirSync(dir, { recursive: true });
  const tmp = `${CLI_BUNDLE}.${process.pid}.tmp`;
  try {
    const result = await esbuild.build({
      stdin: {
        contents: "export { qblockImg } from './src/cli/qblock-img.ts';\nexport { qblockIo } from './src/cli/qblock-io.ts';\nexport { setFileSyncIo } from './src/protocols/file.ts';\n",
        resolveDir: ROOT,
        sourcefile: 'cli-entry.ts',
        loader: 'ts',
      },
      bundle: true,
      platform: 'node',
      format: 'cjs',
      target: 'node20',
      external: ['@hpcc-js/wasm-zstd'],
      define: { 'import.meta.url': '__qblockModuleUrl' },
      outfile: tmp,
      metafile: true,
      logLevel: 'silent',
      legalComments: 'none',
    });
    // A function body cannot import(): every dynamic import (node:fs/promises, the zstd encoder) goes through the launcher.
    const code = readFileSync(tmp, 'utf8').replace(/(?<![\w$.])import\(/g, '__qblockImport(');
    writeFileSync(tmp, code);
    const inputs = Object.keys(result.metafile.inputs)
      .filter((p) => !p.startsWith('<') && existsSync(resolve(ROOT, p)))
      .map((p) => relative(ROOT, resolve(ROOT, p)));
    // The manifest goes first: a bundle newer than its manifest's sources is what counts as fresh.
    writeFileSync(`${MANIFEST}.${process.pid}.tmp`, `${JSON.stringify({ format: FORMAT, inputs })}\n`);
    renameSync(`${MANIFEST}.${process.pid}.tmp`, MANIFEST);
    renameSync(tmp, CLI_BUNDLE);
    return true;
  } catch (e) {
    rmSync(tmp, { force: true });
    if (verbose) process.stderr.write(`[cli-bundle] build failed: ${e instanceof Error ? e.message : String(e)}\n`);
    return false;
  }
}
