/**
 * Injected I/O errors: a blkdebug node under the image fails the next
 * request after each of QEMU's BLKDBG events the driver announces. The
 * workload must see the error (it is returned, not swallowed), and the image
 * left behind must be free of corruption by `qemu-img check` (leaks allowed).
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { isBlockError } from '../../core/errors.ts';
import { bdrvFlush, bdrvPreadv, bdrvTruncate } from '../../core/io.ts';
import { OPEN, PERM } from '../../core/types.ts';
import { filterDrivers } from '../../filters/index.ts';
import { newGraph, qemuImg, QEMU_IMG, QEMU_IO, requireQemu, run, scratchDir } from './testing.ts';
import { runOp, type Op } from './workload.ts';

const tmp = scratchDir();
beforeAll(() => {
  requireQemu();
  qemuImg(tmp.dir, 'create', '-f', 'qcow2', 'base.qcow2', '4M');
  run(QEMU_IO, ['-f', 'qcow2', '-c', 'write -P 0x5a 0 4M', 'base.qcow2'], tmp.dir);
});
afterAll(() => tmp.cleanup());

const K = 1024;
const M = 1024 * K;
/** Touches every metadata path: allocation with refcount block and table growth, COW from backing and compressed clusters, zeroes, discards, L1 growth, cache evictions. */
const WORKLOAD: Array<Op | { t: 'truncate'; size: number } | { t: 'read'; off: number; len: number }> = [
  // 3 MiB of data in 512-byte clusters outgrow the first refcount table (it covers 2 MiB with 64-bit refcounts).
  ...Array.from({ length: 20 }, (_, i): Op => ({ t: 'write', off: i * 192 * K, len: 150 * K, pat: i + 1 })),
  { t: 'compress', off: 3968 * K, pat: 7 },
  { t: 'write', off: 3968 * K + 100, len: 200, pat: 8 },
  { t: 'write', off: 3900 * K + 100, len: 1000, pat: 9 },
  { t: 'flush' },
  { t: 'zero', off: 64 * K, len: 8 * K, unmap: true },
  { t: 'zero', off: 256 * K, len: 4 * K, unmap: false },
  { t: 'discard', off: 512 * K, len: 16 * K },
  { t: 'read', off: 0, len: 2 * M },
  { t: 'flush' },
  { t: 'truncate', size: 6 * M },
  { t: 'write', off: 5 * M, len: 300 * K, pat: 10 },
  // Past the backing file the copy-on-write parts read as zero: the space is zeroed instead of copied.
  { t: 'write', off: 5 * M + 400 * K + 100, len: 100, pat: 11 },
  { t: 'flush' },
];

/** Events the workload must hit, so an injected error there has to reach the caller. */
const EVENTS = [
  'l1_update', 'l1_grow_alloc_table', 'l1_grow_write_table', 'l1_grow_activate_table',
  'l2_load', 'l2_update', 'l2_alloc_write', 'l2_update_compressed',
  'refblock_load', 'refblock_update', 'refblock_alloc', 'refblock_alloc_hookup', 'refblock_alloc_write',
  'refblock_alloc_write_blocks', 'refblock_alloc_write_table', 'refblock_alloc_switch_table', 'reftable_grow', 'reftable_update',
  'cluster_alloc', 'cluster_alloc_bytes', 'cluster_alloc_space',
  'write_aio', 'write_compressed', 'read_aio', 'read_backing_aio', 'read_compressed', 'cow_read', 'cow_write',
  'flush_to_os', 'flush_to_disk',
];

let n = 0;

/** Runs the workload with one inject-error rule on `event`; returns the errors the caller saw. */
async function withFault(event: string, errno: number): Promise<{ img: string; errors: string[]; warnings: string[] }> {
  const img = `f${n++}.qcow2`;
  qemuImg(tmp.dir, 'create', '-f', 'qcow2', '-o', 'cluster_size=512,refcount_bits=64', '-b', 'base.qcow2', '-F', 'qcow2', img, '4M');
  const graph = newGraph();
  const warnings: string[] = [];
  graph.onWarning = (m) => warnings.push(m);
  for (const d of filterDrivers()) graph.registerDriver(d);
  const bs = await graph.open(
    {
      driver: 'qcow2',
      discard: 'unmap',
      'l2-cache-size': '1k',
      file: { driver: 'blkdebug', image: { driver: 'file', filename: tmp.path(img) }, 'inject-error': [{ event, errno, once: true }] },
      backing: { driver: 'qcow2', file: { driver: 'file', filename: tmp.path('base.qcow2') } },
    },
    OPEN.RDWR,
  );
  const child = graph.attachRoot(bs, { kind: 'job', name: 'f', description: () => 'fault test' }, 'root', PERM.CONSISTENT_READ | PERM.WRITE | PERM.RESIZE, PERM.ALL);
  bs.refcnt--;
  const errors: string[] = [];
  const guard = async (f: () => Promise<void>): Promise<void> => {
    try {
      await f();
    } catch (e) {
      if (!isBlockError(e)) throw e;
      errors.push(`${e.code}: ${e.message}`);
    }
  };
  for (const op of WORKLOAD) {
    if (op.t === 'truncate') await guard(() => bdrvTruncate(child, op.size, false));
    else if (op.t === 'read') await guard(() => bdrvPreadv(child, op.off, op.len, new Uint8Array(op.len)));
    else await guard(() => runOp(child, op, 512));
  }
  await guard(() => bdrvFlush(bs));
  await graph.detachChild(child);
  await guard(() => graph.closeAll());
  return { img, errors, warnings };
}

/** qemu-img check's exit code and output. */
function qemuCheck(img: string): { code: number; out: string } {
  try {
    return { code: 0, out: run(QEMU_IMG, ['check', '-f', 'qcow2', img], tmp.dir) };
  } catch (e) {
    return { code: Number((e as { status?: number }).status ?? 1), out: `${String((e as { stdout?: string }).stdout ?? '')}${String((e as { stderr?: string }).stderr ?? '')}` };
  }
}

describe('injected I/O errors at every metadata update', () => {
  for (const event of EVENTS) {
    it(`${event}: the error reaches the caller and the image stays consistent`, async () => {
      const errno = event.startsWith('refblock') ? 28 : 5;
      const { img, errors } = await withFault(event, errno);
      expect(errors.length, `no request failed after ${event}`).toBeGreaterThan(0);
      expect(errors.some((e) => e.startsWith(errno === 28 ? 'ENOSPC' : 'EIO'))).toBe(true);
      const { code, out } = qemuCheck(img);
      // 0: clean; 3: leaked clusters only (what an interrupted allocation leaves).
      expect([0, 3], out).toContain(code);
    });
  }

  it('cluster_free: like QEMU, a failed free is reported and leaks, the request itself succeeds', async () => {
    const { img, warnings } = await withFault('cluster_free', 5);
    expect(warnings.some((w) => w.startsWith('qcow2_free_clusters failed'))).toBe(true);
    const { code, out } = qemuCheck(img);
    expect([0, 3], out).toContain(code);
  });
});
