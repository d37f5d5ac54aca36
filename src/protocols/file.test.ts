import { promises as fsp } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { BlockBackend } from '../core/block-backend.ts';
import type { BdrvChild } from '../core/child.ts';
import type { CreateContext, ReopenState } from '../core/driver.ts';
import { BlockError } from '../core/errors.ts';
import { Graph } from '../core/graph.ts';
import { bdrvBlockStatus, bdrvFlush, bdrvGetLength, bdrvPreadv, bdrvPwriteZeroes, bdrvPwritev, bdrvTruncate, refreshTotalBytes } from '../core/io.ts';
import type { BlockNode } from '../core/node.ts';
import { BLOCK, OPEN, PERM, REQ, type BlockdevOptions } from '../core/types.ts';
import { nodeDrivers } from '../drivers-node.ts';
import { fileDriver, openError, setFileSyncIo, type FileNodeState } from './file.ts';

let dir = '';
let seq = 0;

beforeAll(async () => {
  dir = await fsp.mkdtemp(join(tmpdir(), 'qblock-file-'));
});
afterAll(async () => {
  await fsp.rm(dir, { recursive: true, force: true });
});

/** A new file in the test directory holding `content`. */
async function file(content: Uint8Array | number = 0): Promise<string> {
  const p = join(dir, `f${seq++}.img`);
  if (typeof content === 'number') {
    await fsp.writeFile(p, new Uint8Array(0));
    await fsp.truncate(p, content);
  } else {
    await fsp.writeFile(p, content);
  }
  return p;
}

async function openNode(filename: string, opts: BlockdevOptions = {}): Promise<{ g: Graph; bs: BlockNode; root: BdrvChild; st: FileNodeState }> {
  const g = new Graph({ drivers: nodeDrivers() });
  const bs = await g.open({ driver: 'file', filename, 'read-only': false, ...opts });
  const perm = bs.readOnly ? PERM.CONSISTENT_READ : PERM.CONSISTENT_READ | PERM.WRITE | PERM.RESIZE;
  const root = g.attachRoot(bs, { kind: 'job', name: 't', description: () => 'test' }, 'root', perm, PERM.ALL);
  return { g, bs, root, st: bs.state<FileNodeState>() };
}

async function code(p: Promise<unknown>): Promise<string> {
  try {
    await p;
    return 'resolved';
  } catch (e) {
    return e instanceof BlockError ? `${e.code}: ${e.message}` : String(e);
  }
}

const noCtx: CreateContext = {
  createAndOpenFile: () => Promise.reject(new Error('unused')),
  openImage: () => Promise.reject(new Error('unused')),
  close: () => Promise.resolve(),
};

async function readBack(root: BdrvChild, off: number, n: number): Promise<number[]> {
  const b = new Uint8Array(n);
  await bdrvPreadv(root, off, n, b);
  return [...b];
}

describe('file open', () => {
  it("reports QEMU's messages for missing files, directories and unknown options", async () => {
    const missing = join(dir, 'nope.img');
    expect(await code(openNode(missing))).toBe(`ENOENT: Could not open '${missing}': No such file or directory`);
    expect(await code(openNode(dir, { 'read-only': true }))).toBe(`EINVAL: 'file' driver requires '${dir}' to be a regular file`);
    expect(await code(openNode(dir))).toBe(`EISDIR: Could not open '${dir}': Is a directory`);
    expect(await code(openNode(await file(), { bogus: 1 }))).toBe("EINVAL: Block protocol 'file' doesn't support the option 'bogus'");
    const g = new Graph({ drivers: nodeDrivers() });
    expect(await code(g.open({ driver: 'file' }))).toBe("EINVAL: Parameter 'filename' is missing");
  });

  it('maps open errors the way file-posix does (EACCES, EROFS as EACCES)', () => {
    const acc = openError('/x', Object.assign(new Error('EACCES: permission denied'), { code: 'EACCES' }));
    expect([acc.code, acc.message]).toEqual(['EACCES', "Could not open '/x': Permission denied"]);
    const rofs = openError('/x', Object.assign(new Error('EROFS'), { code: 'EROFS' }));
    expect([rofs.code, rofs.message]).toEqual(['EACCES', "Could not open '/x': Read-only file system"]);
    const loop = openError('/x', Object.assign(new Error('ELOOP: too many'), { code: 'ELOOP' }));
    expect([loop.code, loop.message]).toEqual(['EIO', "Could not open '/x': Too many levels of symbolic links"]);
  });

  it('accepts locking and aio values QEMU accepts and rejects others', async () => {
    const p = await file(512);
    for (const locking of ['auto', 'on', 'off']) await openNode(p, { locking, aio: 'threads' });
    expect(await code(openNode(p, { locking: 'maybe' }))).toBe('EINVAL: invalid parameter value: maybe');
    expect(await code(openNode(p, { aio: 'fast' }))).toBe('EINVAL: invalid parameter value: fast');
  });

  it('strips a file: prefix and opens plain names as the default protocol', async () => {
    const p = await file(new Uint8Array([1, 2, 3]));
    const g = new Graph({ drivers: nodeDrivers() });
    const blk = await BlockBackend.open(g, `file:${p}`, { format: 'raw' });
    expect([...(await blk.read(0, 3))]).toEqual([1, 2, 3]);
    expect(blk.bs!.file!.bs.filename).toBe(p);
    await blk.close();
    expect(g.nodes.size).toBe(0);
  });
});

describe('file I/O', () => {
  it('zero-fills reads past EOF and grows on writes past EOF', async () => {
    const p = await file(new Uint8Array([9, 9, 9]));
    const { bs, root } = await openNode(p);
    const buf = new Uint8Array(8).fill(0xee);
    await fileDriver.preadv!(bs, 1, 8, buf, 0);
    expect([...buf]).toEqual([9, 9, 0, 0, 0, 0, 0, 0]);
    await bdrvPwritev(root, 10, 2, new Uint8Array([5, 6]));
    expect((await fsp.stat(p)).size).toBe(12);
    expect(await readBack(root, 0, 12)).toEqual([9, 9, 9, 0, 0, 0, 0, 0, 0, 0, 5, 6]);
  });

  it('zero writes past EOF extend the file sparsely; inside the file they fall back to a buffer', async () => {
    const p = await file(new Uint8Array(4096).fill(7));
    const { root, st } = await openNode(p);
    await bdrvPwriteZeroes(root, 8192, 1 << 20, REQ.MAY_UNMAP);
    expect((await fsp.stat(p)).size).toBe(8192 + (1 << 20));
    expect(st.stats.zeroWrites).toBe(1);
    // Sparse: far less than the megabyte is allocated (st_blocks).
    expect((await fsp.stat(p)).blocks * 512).toBeLessThan(1 << 19);
    await bdrvPwriteZeroes(root, 100, 200);
    expect(st.stats.zeroWrites).toBe(1);
    expect(st.stats.writes).toBe(1);
    const b = await readBack(root, 98, 204);
    expect(b.slice(0, 2)).toEqual([7, 7]);
    expect(b.slice(2, 202).every((x) => x === 0)).toBe(true);
    expect(b.slice(202)).toEqual([7, 7]);
    expect(await code(bdrvPwriteZeroes(root, 0, 512, REQ.NO_FALLBACK))).toMatch(/^ENOTSUP/);
  });

  it('discard is advisory: accepted, data stays', async () => {
    const p = await file(new Uint8Array(4096).fill(7));
    const g = new Graph({ drivers: nodeDrivers() });
    const blk = await BlockBackend.open(g, { driver: 'file', filename: p, discard: 'unmap' });
    await blk.pdiscard(0, 4096);
    expect((await blk.read(0, 4096)).every((x) => x === 7)).toBe(true);
    await blk.close();
  });

  it('reports DATA|OFFSET_VALID for the whole file, mapping to itself', async () => {
    const p = await file(100_000);
    const { bs } = await openNode(p);
    const st = await bdrvBlockStatus(bs, true, 4096, 1 << 20);
    expect(st.status).toBe(BLOCK.DATA | BLOCK.OFFSET_VALID | BLOCK.ALLOCATED);
    expect(st.pnum).toBe(100_000 - 4096);
    expect(st.map).toBe(4096);
    expect(st.file).toBe(bs);
    // The disk is 100 352 bytes (whole sectors); past the file's end file-posix reports a zero hole.
    const tail = await bdrvBlockStatus(bs, true, 100_000, 1 << 20);
    expect(tail.status).toBe(BLOCK.ZERO | BLOCK.OFFSET_VALID | BLOCK.ALLOCATED | BLOCK.EOF);
    expect(tail.pnum).toBe(352);
    expect(tail.map).toBe(100_000);
  });

  it('flush calls datasync once per dirty generation', async () => {
    const p = await file(512);
    const { bs, root, st } = await openNode(p);
    await bdrvPwritev(root, 0, 3, new Uint8Array([1, 2, 3]));
    await bdrvFlush(bs);
    await bdrvFlush(bs);
    expect(st.stats.flushes).toBe(1);
  });

  it('fails every flush after a failed datasync, as file-posix does', async () => {
    const p = await file(512);
    const { bs, root, st } = await openNode(p);
    const fh = (st.handle as unknown as { fh: { datasync: () => Promise<void> } }).fh;
    fh.datasync = () => Promise.reject(Object.assign(new Error('EIO'), { code: 'EIO' }));
    await bdrvPwritev(root, 0, 1, new Uint8Array([1]));
    expect(await code(bdrvFlush(bs))).toBe('EIO: Input/output error');
    fh.datasync = () => Promise.resolve();
    await bdrvPwritev(root, 0, 1, new Uint8Array([1]));
    expect(await code(bdrvFlush(bs))).toBe('EIO: Input/output error');
  });

  it('runs requests concurrently on the handle (no global lock)', async () => {
    const p = await file(1 << 20);
    const { root, st } = await openNode(p);
    const fh = (st.handle as unknown as { fh: { write: (...a: unknown[]) => Promise<unknown> } }).fh;
    const orig = fh.write.bind(fh);
    let inFlight = 0;
    let peak = 0;
    fh.write = async (...a: unknown[]) => {
      peak = Math.max(peak, ++inFlight);
      try {
        return await orig(...a);
      } finally {
        inFlight--;
      }
    };
    await Promise.all(Array.from({ length: 8 }, (_, i) => bdrvPwritev(root, i * 4096, 4096, new Uint8Array(4096).fill(i + 1))));
    expect(peak).toBeGreaterThan(1);
    expect((await readBack(root, 7 * 4096, 1))[0]).toBe(8);
  });

  it('caches the length like QEMU (read at open and truncate, grown by our writes), not per request', async () => {
    const p = await file(4096);
    const { bs, root } = await openNode(p);
    await bdrvPwritev(root, 8000, 100, new Uint8Array(100));
    // Lengths are whole sectors in QEMU: the file is 8100 bytes, the node 8192.
    expect((await fsp.stat(p)).size).toBe(8100);
    expect(await bdrvGetLength(bs)).toBe(8192);
    await fsp.truncate(p, 20000);
    expect(await bdrvGetLength(bs)).toBe(8192);
    expect(await refreshTotalBytes(bs)).toBe(20480);
  });

  it('reports the allocated size from st_blocks', async () => {
    const p = await file(1 << 20);
    const { bs, root } = await openNode(p);
    const before = await fileDriver.getAllocatedFileSize!(bs);
    await bdrvPwritev(root, 0, 65536, new Uint8Array(65536).fill(1));
    await bdrvFlush(bs);
    expect(await fileDriver.getAllocatedFileSize!(bs)).toBeGreaterThanOrEqual(before + 65536);
    expect(fileDriver.hasZeroInit!(bs)).toBe(true);
  });
});

describe('file I/O with synchronous system calls (setFileSyncIo, as qblock-img runs)', () => {
  it('reads, zero-fills past EOF, writes and grows exactly as the thread-pool path does, small and large', async () => {
    const data = new Uint8Array(600 * 1024);
    for (let i = 0; i < data.length; i++) data[i] = (i * 31 + 7) & 0xff;
    const results: number[][][] = [];
    for (const sync of [false, true]) {
      setFileSyncIo(sync);
      try {
        const p = await file(data);
        const { bs, root, g } = await openNode(p);
        const small = new Uint8Array(8).fill(0xee);
        await fileDriver.preadv!(bs, data.length - 3, 8, small, 0);
        // 512 KiB: above the synchronous limit, so the thread pool serves it even in sync mode.
        const big = new Uint8Array(512 * 1024);
        await bdrvPreadv(root, 4096, big.length, big);
        await bdrvPwritev(root, data.length + 10, 2, new Uint8Array([5, 6]));
        await bdrvPwritev(root, 100, 300 * 1024, data.subarray(0, 300 * 1024));
        const grown = (await fsp.stat(p)).size;
        const back = await readBack(root, data.length - 4, 16);
        const mid = await readBack(root, 100 + 1000, 64);
        results.push([[...small], [...big.subarray(0, 64)], [...big.subarray(big.length - 64)], [grown], back, mid]);
        expect(Buffer.from(big).equals(Buffer.from(data.subarray(4096, 4096 + big.length)))).toBe(true);
        await g.closeAll();
      } finally {
        setFileSyncIo(false);
      }
    }
    expect(results[1]).toEqual(results[0]);
    expect(results[1]![0]).toEqual([...data.subarray(data.length - 3), 0, 0, 0, 0, 0]);
  });

  it('reports read and write errors with the same codes', async () => {
    setFileSyncIo(true);
    try {
      const p = await file(new Uint8Array(4096));
      const { bs } = await openNode(p, { 'read-only': true });
      expect(await code(fileDriver.pwritev!(bs, 0, 512, new Uint8Array(512), 0))).toMatch(/^EBADF|^EACCES|^EPERM|^EIO/);
      setFileSyncIo(false);
      const again = await code(fileDriver.pwritev!(bs, 0, 512, new Uint8Array(512), 0));
      setFileSyncIo(true);
      expect(await code(fileDriver.pwritev!(bs, 0, 512, new Uint8Array(512), 0))).toBe(again);
    } finally {
      setFileSyncIo(false);
    }
  });
});

describe('file truncate and create', () => {
  it('truncates with off/full/falloc and refuses metadata and preallocated shrinking', async () => {
    const p = await file(new Uint8Array(1000).fill(3));
    const { root } = await openNode(p);
    await bdrvTruncate(root, 500, true, 'off');
    expect((await fsp.stat(p)).size).toBe(500);
    await bdrvTruncate(root, 1 << 20, true, 'full');
    expect((await fsp.stat(p)).size).toBe(1 << 20);
    expect((await fsp.stat(p)).blocks * 512).toBeGreaterThanOrEqual((1 << 20) - 4096);
    await bdrvTruncate(root, 2 << 20, true, 'falloc');
    expect((await fsp.stat(p)).blocks * 512).toBeGreaterThanOrEqual((2 << 20) - 4096);
    const tail = await readBack(root, 499, 3);
    expect(tail).toEqual([3, 0, 0]);
    expect(await code(bdrvTruncate(root, 3 << 20, true, 'metadata'))).toBe('ENOTSUP: Unsupported preallocation mode: metadata');
    expect(await code(bdrvTruncate(root, 100, true, 'full'))).toBe('ENOTSUP: Cannot use preallocation for shrinking files');
    expect((await fsp.stat(p)).size).toBe(2 << 20);
  });

  it('create and truncate from empty allocate the first block, as file-posix does (qemu-img info: disk size 4 KiB)', async () => {
    const p = join(dir, `c${seq++}.img`);
    await fileDriver.create!(p, { size: '1M' }, noCtx);
    const st = await fsp.stat(p);
    expect(st.size).toBe(1 << 20);
    expect(st.blocks * 512).toBeGreaterThanOrEqual(4096);
    // From empty to less than 4 KiB, one 512-byte sector is written, which extends the file (qemu-io truncate 100 makes 512 bytes).
    const q = await file(0);
    const { root } = await openNode(q);
    await bdrvTruncate(root, 100, true, 'off');
    expect((await fsp.stat(q)).size).toBe(512);
    // Growing a non-empty file allocates nothing.
    await bdrvTruncate(root, 1 << 20, true, 'off');
    expect((await fsp.stat(q)).blocks * 512).toBeLessThan(65536);
  });

  it('create makes or clears a file of the size rounded to sectors, with preallocation', async () => {
    const p = join(dir, `c${seq++}.img`);
    await fileDriver.create!(p, { size: 1000 }, noCtx);
    expect((await fsp.stat(p)).size).toBe(1024);
    await fsp.writeFile(p, new Uint8Array(2048).fill(1));
    await fileDriver.create!(`file:${p}`, { size: '4k', preallocation: 'full' }, noCtx);
    const data = await fsp.readFile(p);
    expect(data.length).toBe(4096);
    expect(data.every((b) => b === 0)).toBe(true);
    expect(await code(fileDriver.create!(p, { size: 1, preallocation: 'bogus' }, noCtx))).toBe('EINVAL: invalid parameter value: bogus');
    expect(await code(fileDriver.create!(p, { size: 512, preallocation: 'metadata' }, noCtx))).toBe('ENOTSUP: Unsupported preallocation mode: metadata');
    const bad = join(dir, 'no-such-dir', 'x.img');
    expect(await code(fileDriver.create!(bad, { size: 512 }, noCtx))).toBe(`ENOENT: Could not create '${bad}': No such file or directory`);
  });
});

describe('file reopen', () => {
  it('switches between read-only and read-write handles through graph.reopen', async () => {
    const p = await file(4096);
    const g = new Graph({ drivers: nodeDrivers() });
    const bs = await g.open({ driver: 'file', filename: p, 'read-only': true });
    const st = bs.state<FileNodeState>();
    expect(st.handle.writable).toBe(false);
    await g.reopen(bs, { readOnly: false });
    expect(bs.readOnly).toBe(false);
    expect(st.handle.writable).toBe(true);
    const root = g.attachRoot(bs, { kind: 'job', name: 't', description: () => 'test' }, 'root', PERM.CONSISTENT_READ | PERM.WRITE, PERM.ALL);
    await bdrvPwritev(root, 0, 2, new Uint8Array([1, 2]));
    expect([...(await fsp.readFile(p)).subarray(0, 2)]).toEqual([1, 2]);
    await g.detachChild(root);
    await g.reopen(bs, { readOnly: true });
    expect(st.handle.writable).toBe(false);
  });

  it('keeps the old handle open for requests in flight and closes it after them', async () => {
    const p = await file(new Uint8Array(4096).fill(4));
    const { bs, root, st } = await openNode(p);
    const old = st.handle;
    const reading = readBack(root, 0, 4096);
    const rs: ReopenState = { bs, flags: bs.openFlags & ~OPEN.RDWR, readOnly: true, options: {} };
    await fileDriver.reopenPrepare!(rs);
    fileDriver.reopenCommit!(rs);
    expect(st.handle).not.toBe(old);
    expect((await reading).every((x) => x === 4)).toBe(true);
    await new Promise((r) => setTimeout(r, 10));
    expect(old.fh.fd).toBe(-1);
  });

  it('abort closes the prepared handle and leaves the node as it was', async () => {
    const p = await file(512);
    const { bs, st } = await openNode(p);
    const old = st.handle;
    const rs: ReopenState = { bs, flags: bs.openFlags & ~OPEN.RDWR, readOnly: true, options: {} };
    await fileDriver.reopenPrepare!(rs);
    const prepared = rs.opaque as { fh: { fd: number } };
    fileDriver.reopenAbort!(rs);
    await new Promise((r) => setTimeout(r, 10));
    expect(st.handle).toBe(old);
    expect(prepared.fh.fd).toBe(-1);
    expect(old.fh.fd).not.toBe(-1);
  });

  it('refuses to change options it cannot change', async () => {
    const p = await file(512);
    const { bs } = await openNode(p);
    const rs: ReopenState = { bs, flags: bs.openFlags, readOnly: false, options: { filename: '/elsewhere' } };
    expect(await code(fileDriver.reopenPrepare!(rs))).toBe("EINVAL: Cannot change the option 'filename'");
    await fileDriver.reopenPrepare!({ ...rs, options: { filename: `file:${p}`, locking: 'off' } });
  });
});
