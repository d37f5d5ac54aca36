/**
 * `qblock-img convert` of a multi-GiB sparse image reads only what is
 * allocated: every byte the file protocol reads is counted, and the total
 * must stay near the allocated data plus metadata, not the virtual size.
 * The output is judged by `qemu-img compare` against the source.
 */
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { BlockDriver } from '../core/driver.ts';
import { Graph } from '../core/graph.ts';
import { toolGate } from '../core/img/gate.ts';
import { nodeDrivers } from '../drivers-node.ts';
import { qblockImg } from './qblock-img.ts';
import { BufferedIO } from './runtime.ts';

const GiB = 1024 ** 3;
const MiB = 1024 ** 2;
const dir = mkdtempSync(join(tmpdir(), 'qblock-sparse-convert-'));
const src = join(dir, 'sparse.qcow2');

function run(cmd: string, args: string[]): void {
  const r = spawnSync(cmd, args, { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} failed (is qemu-utils installed? run npm test): ${r.stderr}`);
}

beforeAll(() => {
  run('qemu-img', ['create', '-q', '-f', 'qcow2', src, '8G']);
  // 4 MiB of data spread over the disk, plus a zero cluster range and a compressed write.
  run('qemu-io', ['-c', 'write -P 0x11 0 1M', '-c', 'write -P 0x22 3G 1M', '-c', 'write -P 0x33 7G 1M', '-c', 'write -z 5G 64M', '-c', 'write -c -P 0x44 8180M 1M', src]);
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** A CLI host whose graph counts the bytes the file protocol reads. */
class CountingIO extends BufferedIO {
  bytesRead = 0;
  makeGraph(): Graph {
    const drivers = nodeDrivers().map((d): BlockDriver => {
      if (d.name !== 'file' || !d.preadv) return d;
      const inner = d.preadv.bind(d);
      return {
        ...d,
        preadv: (bs, offset, bytes, buf, flags, signal) => {
          this.bytesRead += bytes;
          return inner(bs, offset, bytes, buf, flags, signal);
        },
      };
    });
    return new Graph({ drivers, defaultProtocol: 'file', gate: toolGate });
  }
}

describe('qblock-img convert of a sparse 8 GiB image', () => {
  for (const fmt of ['raw', 'qcow2']) {
    it(`-O ${fmt} reads only the allocated ranges and the result compares identical`, async () => {
      const out = join(dir, `out.${fmt}`);
      const io = new CountingIO('');
      const status = await qblockImg(['convert', '-O', fmt, src, out], io);
      expect(io.err).toBe('');
      expect(status).toBe(0);
      // 4 MiB of guest data plus L1/L2/refcount metadata; reading the whole disk would be 8 GiB.
      expect(io.bytesRead).toBeGreaterThanOrEqual(3 * MiB);
      expect(io.bytesRead).toBeLessThan(16 * MiB);
      // The written image is sparse too: far fewer blocks on disk than its size.
      expect(statSync(out).blocks * 512).toBeLessThan(64 * MiB);
      const cmp = spawnSync('qemu-img', ['compare', '-f', 'qcow2', '-F', fmt, src, out], { encoding: 'utf8' });
      expect(cmp.stdout + cmp.stderr).toBe('Images are identical.\n');
      expect(cmp.status).toBe(0);
      if (fmt === 'raw') expect(statSync(out).size).toBe(8 * GiB);
    }, 120_000);
  }
});
