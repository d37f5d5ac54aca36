/**
 * The shared read-only behaviour suite run against qcow2 images whose
 * contents QEMU wrote: data, zero and unallocated clusters over a backing
 * file, extended L2 subclusters, and compressed clusters, opened read-only
 * through a BlockBackend.
 */
import { readFileSync } from 'node:fs';
import { afterAll, beforeAll, describe, it } from 'vitest';
import { BlockBackend } from '../../core/block-backend.ts';
import { readOnlyCases, type ReadOnlyTarget } from '../../protocols/readonly-conformance.ts';
import { newGraph, qemuImg, qemuIo, requireQemu, scratchDir } from './testing.ts';

const tmp = scratchDir();
afterAll(() => tmp.cleanup());

/** Makes an image with mixed content; returns its name. */
function build(kind: string): string {
  const base = `${kind}-base.qcow2`;
  qemuImg(tmp.dir, 'create', '-f', 'qcow2', base, '320k');
  qemuIo(tmp.dir, base, 'write -P 0x11 0 320k');
  const img = `${kind}.qcow2`;
  const opts = kind === 'extl2' ? ['-o', 'extended_l2=on,cluster_size=32k'] : ['-o', 'cluster_size=4k'];
  qemuImg(tmp.dir, 'create', '-f', 'qcow2', ...opts, '-b', base, '-F', 'qcow2', img, '400k');
  qemuIo(tmp.dir, img, 'write -P 0x22 1000 5000', 'write -z 40k 10k', 'write -P 0x33 100k 33k', 'discard 200k 8k', 'write -P 0x44 390k 10k');
  if (kind === 'compressed') {
    const c = `${kind}-c.qcow2`;
    qemuImg(tmp.dir, 'convert', '-c', '-f', 'qcow2', '-O', 'qcow2', '-o', 'cluster_size=4k', img, c);
    return c;
  }
  return img;
}

for (const kind of ['chain', 'extl2', 'compressed']) {
  describe(`read-only conformance over qcow2 (${kind})`, () => {
    let img = '';
    let expected = new Uint8Array(0);
    beforeAll(() => {
      requireQemu();
      img = build(kind);
      qemuImg(tmp.dir, 'convert', '-f', 'qcow2', '-O', 'raw', img, `${img}.raw`);
      expected = new Uint8Array(readFileSync(tmp.path(`${img}.raw`)));
    });
    const target: ReadOnlyTarget = {
      name: `qcow2-${kind}`,
      async open() {
        const g = newGraph();
        const blk = await BlockBackend.open(g, tmp.path(img), { format: 'qcow2', readOnly: true });
        return {
          blk,
          expected,
          async close() {
            await blk.close();
            await g.closeAll();
          },
        };
      },
    };
    for (const c of readOnlyCases()) it(c.name, () => c.run(target));
  });
}
