// Shared by the launchers: wires the command to the real process (stdio, TTYs, signals, exit status).
// The commands come from the prebuilt bundle (build/cli/cli.cjs, see scripts/cli-bundle.mjs) when it
// is current, rebuilt here when stale; only when it cannot be built do the TypeScript sources run
// through tsx, which transpiles them at every start.
import { readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname } from 'node:path';
import { createInterface } from 'node:readline';
import { pathToFileURL } from 'node:url';
import { Script } from 'node:vm';
import { buildCliBundle, CLI_BUNDLE, CLI_CODE_CACHE, cliBundleStale } from '../scripts/cli-bundle.mjs';

/** The compiled bundle when V8 should store its code cache after the command (none was there, or it was refused). */
let cacheToWrite = null;

/**
 * Runs the bundle's function body, compiled with V8's code cache when one is
 * there: parsing and compiling the bundle and the functions a command first
 * runs is then skipped (about half of a short command's time).
 */
function loadBundle() {
  const source = readFileSync(CLI_BUNDLE, 'utf8');
  let cachedData;
  try {
    cachedData = readFileSync(CLI_CODE_CACHE);
  } catch {
    cachedData = undefined;
  }
  const wrapper = `(function (exports, require, module, __filename, __dirname, __qblockModuleUrl, __qblockImport) {${source}\n})`;
  const script = new Script(wrapper, { filename: CLI_BUNDLE, cachedData });
  if (!cachedData || script.cachedDataRejected) cacheToWrite = script;
  const module = { exports: {} };
  const url = pathToFileURL(CLI_BUNDLE).href;
  script.runInThisContext()(module.exports, createRequire(CLI_BUNDLE), module, CLI_BUNDLE, dirname(CLI_BUNDLE), url, (spec) => import(spec));
  return module.exports;
}

/** Stores the code cache once the command has run, so it holds the functions the command compiled; a read-only install just goes without. */
function storeCodeCache() {
  if (!cacheToWrite) return;
  const tmp = `${CLI_CODE_CACHE}.${process.pid}.tmp`;
  try {
    writeFileSync(tmp, cacheToWrite.createCachedData());
    renameSync(tmp, CLI_CODE_CACHE);
  } catch {
    rmSync(tmp, { force: true });
  }
  cacheToWrite = null;
}

/**
 * The command's entry point: from the bundle when possible, else from the sources through tsx.
 * qblock-img does its file I/O with synchronous system calls: the process does nothing else
 * while a request waits, and a cached read costs a tenth of a thread-pool round trip.
 * qblock-io keeps the thread pool, whose completion order its aio_* commands show.
 */
async function loadMain(name) {
  let mod;
  let file;
  if (!process.env.QBLOCK_CLI_NO_BUNDLE && (!cliBundleStale() || (await buildCliBundle()))) {
    mod = loadBundle();
    file = mod;
  } else {
    const { register } = await import('tsx/esm/api');
    register();
    mod = name === 'qblock-img' ? await import('../src/cli/qblock-img.ts') : await import('../src/cli/qblock-io.ts');
    file = await import('../src/protocols/file.ts');
  }
  if (name === 'qblock-img') file.setFileSyncIo(true);
  return name === 'qblock-img' ? mod.qblockImg : mod.qblockIo;
}

/** Runs `name` (qblock-img or qblock-io) with `args` and exits with its status. */
export async function run(name, args) {
  const main = await loadMain(name);
  const io = {
    stdout: (s) => process.stdout.write(s),
    stderr: (s) => process.stderr.write(s),
    stderrIsTTY: Boolean(process.stderr.isTTY),
    stdinIsTTY: Boolean(process.stdin.isTTY),
    stdinLines: () => createInterface({ input: process.stdin, terminal: false })[Symbol.asyncIterator](),
    raise: (sig) => {
      process.kill(process.pid, sig);
    },
  };
  let code;
  try {
    code = await main(args, io);
  } catch (e) {
    process.stderr.write(`${name}: internal error: ${e instanceof Error ? e.stack : String(e)}\n`);
    code = 1;
  }
  storeCodeCache();
  // Let stdout drain before exiting; pipes may still hold buffered output.
  process.exitCode = code;
  if (code >= 128) {
    // A raised signal should have ended us; if it was ignored, exit like the shell would report it.
    process.exit(code);
  }
}
