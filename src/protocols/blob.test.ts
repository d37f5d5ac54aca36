/**
 * The blob protocol in Node (Blob and File are global there too): reads
 * slice the blob, past EOF reads zero, writes are refused like QEMU's
 * read-only protocols, and options are checked.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { BlockBackend } from '../core/block-backend.ts';
import { BlockError } from '../core/errors.ts';
import { Graph } from '../core/graph.ts';
import { bdrvBlockStatus } from '../core/io.ts';
import { BLOCK, OPEN } from '../core/types.ts';
import { blobDriver, type BlobState } from './blob.ts';
import { readOnlyCases, type ReadOnlyTarget } from './readonly-conformance.ts';

const graph = new Graph({ drivers: [blobDriver], defaultProtocol: 'blob' });
const data = Uint8Array.from({ length: 10_000 }, (_, i) => (i * 31 + 7) & 0xff);

afterEach(async () => {
  for (const b of BlockBackend.all()) await b.close().catch(() => undefined);
  await graph.closeAll();
});

async function rejection(p: Promise<unknown>): Promise<BlockError> {
  try {
    await p;
  } catch (e) {
    if (e instanceof BlockError) return e;
    throw e;
  }
  throw new Error('expected a rejection');
}

describe('blob protocol', () => {
  it('reads slices of a Blob and zeroes past its end', async () => {
    const blk = await BlockBackend.open(graph, { driver: 'blob', blob: new Blob([data]) }, { readOnly: true });
    // 10 000 bytes are a 10 240-byte disk: QEMU keeps lengths in whole sectors.
    expect(await blk.getLength()).toBe(10_240);
    expect(await blk.read(0, 10)).toEqual(data.subarray(0, 10));
    expect(await blk.read(9000, 1000)).toEqual(data.subarray(9000));
    const tail = await blk.read(9900, 340);
    expect(tail.subarray(0, 100)).toEqual(data.subarray(9900));
    expect(tail.subarray(100).every((b) => b === 0)).toBe(true);
    const bs = blk.bs!;
    // Only the stored bytes are read from the Blob; the sector's tail is zero-filled.
    expect((bs.opaque as BlobState).bytesRead).toBe(1110);
    const st = await bdrvBlockStatus(bs, true, 0, 100);
    expect(st.status & (BLOCK.DATA | BLOCK.OFFSET_VALID)).toBe(BLOCK.DATA | BLOCK.OFFSET_VALID);
  });

  it('names the node after a File', async () => {
    const blk = await BlockBackend.open(graph, { driver: 'blob', blob: new File([data], 'disk.img') }, { readOnly: true });
    expect(blk.bs!.filename).toBe('disk.img');
  });

  it('refuses read-write unless auto-read-only', async () => {
    const e = await rejection(BlockBackend.open(graph, { driver: 'blob', blob: new Blob([data]) }));
    expect(e.code).toBe('EACCES');
    expect(e.message).toBe('blob driver does not support writes');
    const bs = await graph.open({ driver: 'blob', blob: new Blob([data]), 'auto-read-only': true }, OPEN.RDWR);
    expect(bs.readOnly).toBe(true);
    await graph.unref(bs);
  });

  it('requires a Blob object', async () => {
    expect((await rejection(BlockBackend.open(graph, { driver: 'blob', blob: 'nope' }, { readOnly: true }))).code).toBe('EINVAL');
    expect((await rejection(BlockBackend.open(graph, { driver: 'blob' }, { readOnly: true }))).code).toBe('EINVAL');
  });
});

describe('read-only conformance over blob', () => {
  const image = Uint8Array.from({ length: 300_001 }, (_, i) => (i * 131 + (i >>> 9)) & 0xff);
  const target: ReadOnlyTarget = {
    name: 'blob',
    async open() {
      const g = new Graph({ drivers: [blobDriver] });
      const blk = await BlockBackend.open(g, { driver: 'blob', blob: new Blob([image]) }, { readOnly: true });
      return {
        blk,
        expected: image,
        async close() {
          await blk.close();
          await g.closeAll();
        },
      };
    },
  };
  for (const c of readOnlyCases()) it(c.name, () => c.run(target));
});
