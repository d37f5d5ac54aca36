// The launchers end to end: bin/qblock-img started as a user starts it (from
// the prebuilt bundle, with synchronous file I/O; and through tsx when the
// bundle is refused), on an image with data, zero and compressed clusters,
// against Debian's qemu-img on the same files.

import { execFileSync, spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { buildCliBundle, CLI_CODE_CACHE, cliBundleStale } from './cli-bundle.mjs';

const ROOT = fileURLToPath(new URL('..', import.meta.url));
const BIN = join(ROOT, 'bin', 'qblock-img');

let dir = '';
let img = '';

/** Runs a tool and returns what a user sees. */
function run(tool: 'qemu-img' | 'qblock-img', args: string[], env: Record<string, string> = {}): { status: number; stdout: string; stderr: string } {
  const r = tool === 'qemu-img'
    ? spawnSync('qemu-img', args, { encoding: 'utf8' })
    : spawnSync(process.execPath, [BIN, ...args], { encoding: 'utf8', env: { ...process.env, ...env } });
  return { status: r.status ?? -1, stdout: r.stdout, stderr: r.stderr };
}

beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), 'qblock-launcher-'));
  img = join(dir, 'mixed.qcow2');
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', img, '8M']);
  execFileSync('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x5a 0 1M', '-c', 'write -z 1M 512k', '-c', 'write -c -P 0x61 2M 512k', '-c', 'write -P 7 3M 64k', img], { stdio: 'ignore' });
  if (cliBundleStale()) expect(await buildCliBundle(true)).toBe(true);
});

afterAll(() => {
  if (dir) rmSync(dir, { recursive: true, force: true });
});

describe('bin/qblock-img from the bundle', () => {
  it('is current after a build', () => {
    expect(cliBundleStale()).toBe(false);
  });

  for (const args of [['check'], ['map', '--output=json'], ['map']]) {
    it(`${args.join(' ')} prints what qemu-img prints`, () => {
      const theirs = run('qemu-img', [...args, img]);
      const ours = run('qblock-img', [...args, img]);
      expect({ status: ours.status, stdout: ours.stdout, stderr: ours.stderr }).toEqual({ status: theirs.status, stdout: theirs.stdout, stderr: theirs.stderr.replace(/qemu-img/g, 'qblock-img') });
    });
  }

  it('convert -O raw and -O qcow2 give images qemu-img finds identical and consistent; compare agrees', () => {
    for (const fmt of ['raw', 'qcow2']) {
      const out = join(dir, `out.${fmt}`);
      const r = run('qblock-img', ['convert', '-O', fmt, img, out]);
      expect(r).toEqual({ status: 0, stdout: '', stderr: '' });
      expect(run('qemu-img', ['compare', img, out])).toMatchObject({ status: 0, stdout: 'Images are identical.\n' });
      if (fmt === 'qcow2') expect(run('qemu-img', ['check', out]).status).toBe(0);
      const theirs = run('qemu-img', ['compare', img, out]);
      expect(run('qblock-img', ['compare', img, out])).toEqual(theirs);
    }
    execFileSync('qemu-io', ['-f', 'raw', '-c', 'write -P 1 3M 512', join(dir, 'out.raw')], { stdio: 'ignore' });
    const theirs = run('qemu-img', ['compare', img, join(dir, 'out.raw')]);
    expect(theirs.status).toBe(1);
    expect(run('qblock-img', ['compare', img, join(dir, 'out.raw')])).toEqual(theirs);
  });

  it('stores V8\'s code cache after a run, starts from it, and replaces a cache V8 refuses', () => {
    const theirs = run('qemu-img', ['check', img]);
    rmSync(CLI_CODE_CACHE, { force: true });
    expect(run('qblock-img', ['check', img])).toEqual(theirs);
    const written = readFileSync(CLI_CODE_CACHE);
    expect(written.length).toBeGreaterThan(10000);
    expect(run('qblock-img', ['check', img])).toEqual(theirs);
    // A cache for other code (here: garbage) is refused by V8; the run is unaffected and the cache is rewritten.
    writeFileSync(CLI_CODE_CACHE, new Uint8Array(4096).fill(0x55));
    expect(run('qblock-img', ['check', img])).toEqual(theirs);
    expect(readFileSync(CLI_CODE_CACHE).subarray(0, 64)).not.toEqual(new Uint8Array(64).fill(0x55));
  });

  it('dynamic imports work inside the bundle (the zstd encoder loads on first use)', () => {
    const out = join(dir, 'zstd.qcow2');
    const r = run('qblock-img', ['convert', '-c', '-O', 'qcow2', '-o', 'compression_type=zstd', img, out]);
    expect(r).toEqual({ status: 0, stdout: '', stderr: '' });
    expect(run('qemu-img', ['compare', img, out])).toMatchObject({ status: 0, stdout: 'Images are identical.\n' });
    expect(run('qemu-img', ['check', out]).status).toBe(0);
  });

  it('falls back to the TypeScript sources through tsx when told not to use the bundle', () => {
    const theirs = run('qemu-img', ['check', img]);
    const ours = run('qblock-img', ['check', img], { QBLOCK_CLI_NO_BUNDLE: '1' });
    expect(ours).toEqual(theirs);
  });
});
