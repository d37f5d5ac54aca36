// Shared by the launchers: wires the command to the real process (stdio, TTYs, signals, exit status).
// The commands come from the prebuilt bundle (build/cli/cli.mjs, see scripts/cli-bundle.mjs) when it
// is current, rebuilt here when stale; only when it cannot be built do the TypeScript sources run
// through tsx, which transpiles them at every start.
import { createInterface } from 'node:readline';
import { buildCliBundle, CLI_BUNDLE, cliBundleStale } from '../scripts/cli-bundle.mjs';

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
    mod = await import(CLI_BUNDLE);
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
  // Let stdout drain before exiting; pipes may still hold buffered output.
  process.exitCode = code;
  if (code >= 128) {
    // A raised signal should have ended us; if it was ignored, exit like the shell would report it.
    process.exit(code);
  }
}
