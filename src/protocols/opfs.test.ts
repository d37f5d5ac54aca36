/**
 * What of the opfs protocol runs in Node: path handling, and the clear
 * ENOTSUP where sync access handles do not exist. The driver's I/O, locking
 * and errors run in Chromium (e2e/protocols.spec.ts, e2e/conformance.spec.ts).
 */
import { describe, expect, it } from 'vitest';
import { BlockError } from '../core/errors.ts';
import { Graph } from '../core/graph.ts';
import { opfsCanonicalPath, opfsDriver, opfsPathSegments, opfsSyncAvailable } from './opfs.ts';

describe('opfs paths', () => {
  it('strips the prefix and empty or dot segments', () => {
    expect(opfsPathSegments('opfs:images/disk.qcow2')).toEqual(['images', 'disk.qcow2']);
    expect(opfsCanonicalPath('/a//./b/c.img')).toBe('a/b/c.img');
    expect(opfsCanonicalPath('OPFS:///x.img')).toBe('x.img');
  });

  it("refuses '..' and empty paths", () => {
    for (const bad of ['a/../b', '..', '', 'opfs:', '/./']) {
      expect(() => opfsPathSegments(bad), bad).toThrow(BlockError);
    }
  });

  it('parses filenames into the canonical filename option', () => {
    const o: Record<string, unknown> = {};
    opfsDriver.parseFilename!('opfs:/dir/./x.img', o);
    expect(o).toEqual({ filename: 'dir/x.img' });
  });
});

describe('opfs outside a dedicated worker', () => {
  it('fails to open with ENOTSUP', async () => {
    expect(opfsSyncAvailable()).toBe(false);
    const g = new Graph({ drivers: [opfsDriver], defaultProtocol: 'opfs' });
    const e = await g.openProtocol('x.img', 0, {}).catch((err: unknown) => err);
    expect(e).toBeInstanceOf(BlockError);
    expect((e as BlockError).code).toBe('ENOTSUP');
    expect((e as BlockError).message).toContain('dedicated worker');
    expect(g.nodes.size).toBe(0);
  });
});
