#!/usr/bin/env node
// Prepares this checkout for `npm test` (--test) or `npm start` (--web).
// Plain Node, no dependencies, so it runs before `npm install` has.
//
//   --test  system packages the test suites need (Debian: chromium, qemu-utils,
//           nasm, seabios; installed with apt-get when running as root),
//           node_modules, and the wasm kernels
//   --web   node_modules and the wasm kernels
//   both    the command-line bundle bin/qblock-img and bin/qblock-io start from
//           (build/cli/cli.cjs; scripts/cli-bundle.mjs)
//
// Fast when nothing is missing: one dpkg-query call and a few stat()s.

import { spawnSync } from 'node:child_process';
import { accessSync, constants, existsSync, readdirSync, statSync } from 'node:fs';
import { delimiter, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { buildCliBundle, cliBundleStale } from './cli-bundle.mjs';

/** Repository root (the directory above scripts/). */
export const ROOT = fileURLToPath(new URL('..', import.meta.url));

/** Debian packages the tests need, each with the commands it must provide (seabios provides firmware files only). */
export const SYSTEM_PACKAGES = {
  chromium: { commands: ['chromium'], files: [] },
  'qemu-utils': { commands: ['qemu-img', 'qemu-io'], files: [] },
  nasm: { commands: ['nasm'], files: [] },
  seabios: { commands: [], files: ['/usr/share/seabios/bios.bin'] },
};

/** Release build of the kernels, and what it is built from. */
export const WASM_OUT = join(ROOT, 'build', 'qblock.wasm');
const WASM_SOURCES = [join(ROOT, 'assembly'), join(ROOT, 'asconfig.json')];

/** Prints a line prefixed with the script name to stderr. */
function say(msg) {
  process.stderr.write(`[setup] ${msg}\n`);
}

/** Full path of `cmd` on PATH, or null (the `command -v` check without spawning a shell). */
export function which(cmd) {
  for (const dir of (process.env.PATH ?? '').split(delimiter)) {
    if (!dir) continue;
    const p = join(dir, cmd);
    try {
      accessSync(p, constants.X_OK);
      if (statSync(p).isFile()) return p;
    } catch {
      // not here
    }
  }
  return null;
}

/** Set of the given Debian packages that dpkg reports installed, or null when dpkg-query is unavailable. */
function dpkgInstalled(names) {
  if (!which('dpkg-query')) return null;
  const r = spawnSync('dpkg-query', ['-W', '-f=${Package} ${db:Status-Abbrev}\n', ...names], { encoding: 'utf8' });
  if (r.error) return null;
  const ok = new Set();
  for (const line of (r.stdout ?? '').split('\n')) {
    const [pkg, status] = line.trim().split(/\s+/);
    // Package names may carry an architecture suffix (chromium:amd64).
    if (pkg && status === 'ii') ok.add(pkg.split(':')[0]);
  }
  return ok;
}

/** Names of the system packages that are missing (not installed, or their commands/files absent). */
export function missingSystemPackages() {
  const names = Object.keys(SYSTEM_PACKAGES);
  const installed = dpkgInstalled(names);
  return names.filter((name) => {
    const { commands, files } = SYSTEM_PACKAGES[name];
    if (installed && !installed.has(name)) return true;
    return commands.some((c) => !which(c)) || files.some((f) => !existsSync(f));
  });
}

/** Runs a command with inherited stdio; returns its exit status (1 if it could not start). */
function run(cmd, args, env = {}) {
  const r = spawnSync(cmd, args, { cwd: ROOT, stdio: 'inherit', env: { ...process.env, ...env } });
  if (r.error) {
    say(`cannot run ${cmd}: ${r.error.message}`);
    return 1;
  }
  return r.status ?? 1;
}

/** Installs missing system packages with apt-get when root; returns false (after saying what to do) when it cannot. */
export function ensureSystemPackages() {
  const missing = missingSystemPackages();
  if (missing.length === 0) return true;
  const isRoot = typeof process.getuid === 'function' && process.getuid() === 0;
  if (!which('apt-get')) {
    say(`missing system packages: ${missing.join(' ')}; this is not a Debian-like system, install their equivalents by hand`);
    return false;
  }
  if (!isRoot) {
    say(`missing system packages: ${missing.join(' ')}`);
    say(`install them with: sudo apt-get install -y ${missing.join(' ')}`);
    return false;
  }
  say(`installing ${missing.join(' ')} with apt-get`);
  const env = { DEBIAN_FRONTEND: 'noninteractive' };
  if (run('apt-get', ['update'], env) !== 0) {
    say('apt-get update failed');
    return false;
  }
  if (run('apt-get', ['install', '-y', ...missing], env) !== 0) {
    say('apt-get install failed');
    return false;
  }
  const still = missingSystemPackages();
  if (still.length > 0) {
    say(`still missing after apt-get install: ${still.join(' ')}`);
    return false;
  }
  return true;
}

/** Runs `npm install` if node_modules or the tools the scripts call are missing; returns false if it fails. */
export function ensureNodeModules() {
  const bins = ['vitest', 'playwright', 'tsc', 'vite', 'asc'];
  if (bins.every((b) => existsSync(join(ROOT, 'node_modules', '.bin', b)))) return true;
  say('node_modules incomplete; running npm install');
  const npm = process.platform === 'win32' ? 'npm.cmd' : 'npm';
  return run(npm, ['install']) === 0;
}

/** Newest modification time (ms) among the files under `paths`, recursing into directories. */
function newestMtime(paths) {
  let newest = 0;
  for (const p of paths) {
    let st;
    try {
      st = statSync(p);
    } catch {
      continue;
    }
    if (st.isDirectory()) {
      newest = Math.max(newest, newestMtime(readdirSync(p).map((e) => join(p, e))));
    } else {
      newest = Math.max(newest, st.mtimeMs);
    }
  }
  return newest;
}

/** True when build/qblock.wasm is missing or older than assembly/ or asconfig.json. */
export function wasmStale() {
  if (!existsSync(WASM_OUT)) return true;
  return statSync(WASM_OUT).mtimeMs < newestMtime(WASM_SOURCES);
}

/** Builds the release wasm (`asc assembly/index.ts --target release`) when stale; returns false if the build fails. */
export function ensureWasm() {
  if (!wasmStale()) return true;
  say('building wasm kernels (asc assembly/index.ts --target release)');
  const asc = join(ROOT, 'node_modules', '.bin', process.platform === 'win32' ? 'asc.cmd' : 'asc');
  const status = existsSync(asc)
    ? run(asc, ['assembly/index.ts', '--target', 'release'])
    : run(process.platform === 'win32' ? 'npx.cmd' : 'npx', ['asc', 'assembly/index.ts', '--target', 'release']);
  if (status !== 0 || !existsSync(WASM_OUT)) {
    say('wasm build failed');
    return false;
  }
  return true;
}

/** Builds the command-line bundle when stale; returns false if the build fails (the launchers then fall back to tsx). */
export async function ensureCliBundle() {
  if (!cliBundleStale()) return true;
  say('bundling the command-line tools (build/cli/cli.cjs)');
  return buildCliBundle(true);
}

/** Entry point: applies the steps selected by --test / --web and exits non-zero if one fails. */
async function main(argv) {
  const test = argv.includes('--test');
  const web = argv.includes('--web');
  if (!test && !web) {
    say('usage: node scripts/setup.mjs [--test] [--web]');
    process.exit(2);
  }
  let ok = true;
  if (test) ok = ensureSystemPackages() && ok;
  ok = ensureNodeModules() && ok;
  ok = ok && ensureWasm();
  ok = ok && (await ensureCliBundle());
  process.exit(ok ? 0 : 1);
}

if (process.argv[1] && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  await main(process.argv.slice(2));
}
