/**
 * The http protocol against a real local server (e2e/range-server.ts on
 * 127.0.0.1): probing, chunked ranged reads, the LRU cache, coalescing,
 * If-Range pinning, retries with an injected sleep, and error mapping.
 */
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { startRangeServer, type RangeServer } from '../../e2e/range-server.ts';
import { BlockBackend } from '../core/block-backend.ts';
import { BlockError } from '../core/errors.ts';
import { Graph } from '../core/graph.ts';
import { bdrvBlockStatus } from '../core/io.ts';
import type { BlockNode } from '../core/node.ts';
import { BLOCK, OPEN } from '../core/types.ts';
import { createHttpDriver, httpState, httpStats, parseContentRange, type HttpState } from './http.ts';
import { readOnlyCases, type ReadOnlyTarget } from './readonly-conformance.ts';

let srv: RangeServer;
/** Delays the injected sleep was asked for, in order. */
let sleeps: number[];
let graph: Graph;
const backends: BlockBackend[] = [];

/** Deterministic pseudo-random bytes, so failures are reproducible. */
function pattern(n: number, seed = 1): Uint8Array {
  const out = new Uint8Array(n);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < n; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    out[i] = x & 0xff;
  }
  return out;
}

const IMG = pattern(300_000, 7);
/** The disk QEMU shows for it: lengths are whole 512-byte sectors, so 300 000 bytes are a 300 032-byte disk. */
const DISK_LEN = Math.ceil(IMG.length / 512) * 512;

beforeAll(async () => {
  srv = await startRangeServer();
});

afterAll(async () => {
  await srv.close();
});

beforeEach(() => {
  srv.reset();
  srv.put('/disk.img', IMG);
  sleeps = [];
  graph = new Graph({
    drivers: [createHttpDriver({ sleep: async (ms) => void sleeps.push(ms) })],
    defaultProtocol: 'http',
  });
});

afterEach(async () => {
  for (const b of backends.splice(0)) await b.close().catch(() => undefined);
  await graph.closeAll();
});

/** Opens an http node read-only through a BlockBackend with extra driver options. */
async function openHttp(path: string, extra: Record<string, unknown> = {}): Promise<BlockBackend> {
  const blk = await BlockBackend.open(graph, { driver: 'http', url: srv.url + path, ...extra }, { readOnly: true });
  backends.push(blk);
  return blk;
}

function nodeOf(blk: BlockBackend): BlockNode {
  const bs = blk.bs;
  if (!bs) throw new Error('backend has no node');
  return bs;
}

function state(blk: BlockBackend): HttpState {
  return httpState(nodeOf(blk));
}

/** The error a promise rejects with. */
async function rejection(p: Promise<unknown>): Promise<BlockError> {
  try {
    await p;
  } catch (e) {
    if (e instanceof BlockError) return e;
    throw e;
  }
  throw new Error('expected the promise to reject');
}

const gets = (): Array<{ range?: string; ifRange?: string; status: number }> =>
  srv.log.filter((r) => r.method === 'GET').map((r) => ({ range: r.range, ifRange: r.ifRange, status: r.status }));

describe('open', () => {
  it('learns the size from a bytes=0-0 probe and pins the ETag', async () => {
    const blk = await openHttp('/disk.img');
    expect(await blk.getLength()).toBe(DISK_LEN);
    expect(srv.log).toHaveLength(1);
    expect(srv.log[0]!.range).toBe('bytes=0-0');
    const s = state(blk);
    expect(s.etag).toMatch(/^"[0-9a-f]+"$/);
    expect(s.ifRange).toBe(s.etag);
    expect(httpStats(nodeOf(blk))).toMatchObject({ requests: 1, bytesFetched: 1 });
  });

  it('opens by filename through the protocol prefix, or with filename= in blockdev options', async () => {
    const bs = await graph.openProtocol(`${srv.url}/disk.img`, 0, {});
    expect(bs.drv.name).toBe('http');
    expect(bs.totalBytes).toBe(DISK_LEN);
    expect(bs.filename).toBe(`${srv.url}/disk.img`);
    await graph.unref(bs);
    const blk = await openHttp('', { url: undefined, filename: `${srv.url}/disk.img` });
    expect(await blk.getLength()).toBe(DISK_LEN);
  });

  it('refuses read-write like QEMU unless auto-read-only is set', async () => {
    const e = await rejection(BlockBackend.open(graph, { driver: 'http', url: `${srv.url}/disk.img` }));
    expect(e.code).toBe('EACCES');
    expect(e.message).toBe('curl driver does not support writes');
    const bs = await graph.open({ driver: 'http', url: `${srv.url}/disk.img`, 'auto-read-only': true }, OPEN.RDWR);
    expect(bs.readOnly).toBe(true);
    expect(bs.openFlags & OPEN.RDWR).toBe(0);
    await graph.unref(bs);
  });

  it('fails with ENOTSUP on a server without byte ranges, without downloading the body', async () => {
    srv.put('/norange.img', IMG, { noRange: true });
    const e = await rejection(openHttp('/norange.img'));
    expect(e.code).toBe('ENOTSUP');
    expect(e.message).toContain("Server does not support 'range' (byte ranges).");
    expect(srv.log).toHaveLength(1);
  });

  it('maps 404 to ENOENT and 403 to EACCES', async () => {
    expect((await rejection(openHttp('/missing.img'))).code).toBe('ENOENT');
    srv.fault({ count: 1, status: 403 });
    const e = await rejection(openHttp('/disk.img'));
    expect(e.code).toBe('EACCES');
    expect(e.message).toContain('403');
  });

  it('opens an empty resource (416 with bytes */0)', async () => {
    srv.put('/empty.img', new Uint8Array(0));
    const blk = await openHttp('/empty.img');
    expect(await blk.getLength()).toBe(0);
  });

  it('falls back to HEAD when Content-Range has no total', async () => {
    srv.put('/unknown.img', IMG, { unknownLength: true });
    const blk = await openHttp('/unknown.img');
    expect(await blk.getLength()).toBe(DISK_LEN);
    expect(srv.log.map((r) => r.method)).toEqual(['GET', 'HEAD']);
  });

  it('validates its options with QEMU messages', async () => {
    expect((await rejection(openHttp('/disk.img', { readahead: 1000 }))).message).toBe('HTTP_READAHEAD_SIZE 1000 is not a multiple of 512');
    expect((await rejection(openHttp('/disk.img', { timeout: -1 }))).message).toBe('timeout parameter is too large or negative');
    const e = await rejection(BlockBackend.open(graph, { driver: 'http', url: 'ftp://x/y' }, { readOnly: true }));
    expect(e.code).toBe('EINVAL');
    expect(e.message).toContain("cannot handle the URL 'ftp://x/y'");
    expect((await rejection(BlockBackend.open(graph, { driver: 'http' }, { readOnly: true }))).message).toBe("curl block driver requires an 'url' option");
    expect((await rejection(openHttp('/disk.img', { sslverify: false }))).message).toBe("Block protocol 'http' doesn't support the option 'sslverify'");
  });

  it('sends extra headers on every request', async () => {
    const blk = await openHttp('/disk.img', { headers: { Authorization: 'Bearer t0k3n' } });
    await blk.read(0, 10);
    expect(srv.log.length).toBe(2);
    for (const r of srv.log) expect(r.headers.authorization).toBe('Bearer t0k3n');
    expect((await rejection(openHttp('/disk.img', { headers: { Range: 'bytes=1-2' } }))).code).toBe('EINVAL');
  });
});

describe('reads', () => {
  it('reads ranges across chunk boundaries and past EOF like the file', async () => {
    const blk = await openHttp('/disk.img', { readahead: 4096 });
    const cases: Array<[number, number]> = [
      [0, 1],
      [4095, 2],
      [4000, 10_000],
      [123_457, 4096 * 3 + 17],
      [IMG.length - 5, 5],
      [8192, 4096],
    ];
    for (const [off, len] of cases) {
      expect(await blk.read(off, len), `read ${off}+${len}`).toEqual(IMG.subarray(off, off + len));
    }
    // Every GET after the probe asks for whole, aligned chunks (the last one ends at EOF).
    for (const g of gets().slice(1)) {
      const m = /^bytes=(\d+)-(\d+)$/.exec(g.range ?? '')!;
      const a = Number(m[1]);
      const b = Number(m[2]) + 1;
      expect(a % 4096).toBe(0);
      expect(b % 4096 === 0 || b === IMG.length).toBe(true);
      expect(g.ifRange).toBe(state(blk).etag);
      expect(g.status).toBe(206);
    }
  });

  it('random reads match the source', async () => {
    const blk = await openHttp('/disk.img', { readahead: 8192, 'cache-size': 3 * 8192 });
    let seed = 42;
    const rnd = (n: number): number => {
      seed = (seed * 1103515245 + 12345) & 0x7fffffff;
      return seed % n;
    };
    for (let i = 0; i < 200; i++) {
      const off = rnd(IMG.length);
      const len = 1 + rnd(Math.min(40_000, IMG.length - off));
      const got = await blk.read(off, len);
      if (got.some((v, k) => v !== IMG[off + k])) throw new Error(`mismatch at read ${off}+${len}`);
    }
    expect(state(blk).cache.size).toBeLessThanOrEqual(3);
  });

  it('reads ahead a whole chunk and serves later reads in it from the cache', async () => {
    const blk = await openHttp('/disk.img', { readahead: 65536 });
    await blk.read(100, 512);
    await blk.read(63_000, 5000); // spills into chunk 1
    await blk.read(1000, 4096); // chunk 0 again: cached
    expect(gets().slice(1).map((g) => g.range)).toEqual(['bytes=0-65535', 'bytes=65536-131071']);
    const st = httpStats(nodeOf(blk))!;
    expect(st.cacheMisses).toBe(2);
    expect(st.cacheHits).toBe(2);
  });

  it('fetches consecutive missing chunks in one GET', async () => {
    const blk = await openHttp('/disk.img', { readahead: 4096 });
    await blk.read(4096, 10); // chunk 1 cached
    srv.reset();
    await blk.read(0, 5 * 4096); // chunks 0, 2, 3, 4 missing
    expect(gets().map((g) => g.range)).toEqual(['bytes=0-4095', 'bytes=8192-20479']);
  });

  it('keeps the cache bounded (LRU) and refetches evicted chunks', async () => {
    const blk = await openHttp('/disk.img', { readahead: 4096, 'cache-size': 2 * 4096 });
    await blk.read(0, 1); // chunk 0
    await blk.read(4096, 1); // chunk 1
    await blk.read(0, 1); // chunk 0 becomes most recent
    await blk.read(8192, 1); // chunk 2 evicts chunk 1
    expect([...state(blk).cache.keys()]).toEqual([0, 2]);
    srv.reset();
    await blk.read(0, 1);
    expect(gets()).toHaveLength(0);
    await blk.read(4096, 1);
    expect(gets().map((g) => g.range)).toEqual(['bytes=4096-8191']);
    // A read larger than the cache still returns all its data.
    expect(await blk.read(0, 10 * 4096)).toEqual(IMG.subarray(0, 10 * 4096));
    expect(state(blk).cache.size).toBe(2);
  });

  it('with cache-size 0 refetches every time', async () => {
    const blk = await openHttp('/disk.img', { readahead: 4096, 'cache-size': 0 });
    await blk.read(0, 10);
    await blk.read(0, 10);
    expect(gets().slice(1)).toHaveLength(2);
  });

  it('coalesces concurrent reads of the same chunk into one GET', async () => {
    const blk = await openHttp('/disk.img', { readahead: 65536 });
    srv.fault({ count: 1, delayMs: 150 });
    const reads = await Promise.all([blk.read(0, 100), blk.read(1000, 100), blk.read(60_000, 4000), blk.read(70_000, 10)]);
    expect(reads[0]).toEqual(IMG.subarray(0, 100));
    expect(reads[2]).toEqual(IMG.subarray(60_000, 64_000));
    expect(reads[3]).toEqual(IMG.subarray(70_000, 70_010));
    expect(gets().slice(1).map((g) => g.range).sort()).toEqual(['bytes=0-65535', 'bytes=65536-131071']);
    expect(httpStats(nodeOf(blk))!.coalesced).toBe(2);
  });

  it('counts requests and bytes fetched', async () => {
    const blk = await openHttp('/disk.img', { readahead: 4096 });
    await blk.read(0, 3 * 4096);
    await blk.read(IMG.length - 10, 10);
    const last = IMG.length - Math.floor((IMG.length - 1) / 4096) * 4096;
    expect(httpStats(nodeOf(blk))).toMatchObject({ requests: 3, bytesFetched: 1 + 3 * 4096 + last });
    const served = srv.log.reduce((n, r) => n + r.bytes, 0);
    expect(httpStats(nodeOf(blk))!.bytesFetched).toBe(served);
  });

  it('reports block status DATA|OFFSET_VALID', async () => {
    const blk = await openHttp('/disk.img');
    const bs = nodeOf(blk);
    const st = await bdrvBlockStatus(bs, true, 1000, 5000);
    expect(st.status & (BLOCK.DATA | BLOCK.OFFSET_VALID)).toBe(BLOCK.DATA | BLOCK.OFFSET_VALID);
    expect(st.status & BLOCK.ZERO).toBe(0);
    expect(st.map).toBe(1000);
    expect(st.pnum).toBe(5000);
  });

  it('an aborted read rejects with ECANCELED while its fetch still fills the cache', async () => {
    const blk = await openHttp('/disk.img', { readahead: 4096 });
    srv.fault({ count: 1, delayMs: 100 });
    const ctl = new AbortController();
    const p = blk.read(0, 100, { signal: ctl.signal });
    setTimeout(() => ctl.abort(), 20);
    expect((await rejection(p)).code).toBe('ECANCELED');
    await new Promise((r) => setTimeout(r, 200));
    expect(state(blk).cache.has(0)).toBe(true);
  });
});

describe('validators', () => {
  it('a changed resource (new ETag) fails reads with EIO instead of mixing data', async () => {
    const blk = await openHttp('/disk.img', { readahead: 4096 });
    const etag = state(blk).etag;
    await blk.read(0, 100);
    srv.put('/disk.img', pattern(IMG.length, 99));
    // Cached data is still the old version; an uncached chunk must not be read from the new one.
    expect(await blk.read(0, 100)).toEqual(IMG.subarray(0, 100));
    const e = await rejection(blk.read(50_000, 100));
    expect(e.code).toBe('EIO');
    expect(e.message).toContain('changed on the server');
    expect(e.message).toContain(etag!);
    const g = gets().at(-1)!;
    expect(g.ifRange).toBe(etag);
    expect(g.status).toBe(200);
    // Not retried: a changed resource stays changed.
    expect(sleeps).toEqual([]);
  });

  it('pins Last-Modified when the ETag is weak', async () => {
    const t0 = new Date('2024-01-02T03:04:05Z');
    srv.put('/weak.img', IMG, { weakEtag: true, lastModified: t0 });
    const blk = await openHttp('/weak.img', { readahead: 4096 });
    expect(state(blk).etag).toBeUndefined();
    expect(state(blk).ifRange).toBe(t0.toUTCString());
    expect(await blk.read(10, 10)).toEqual(IMG.subarray(10, 20));
    srv.put('/weak.img', IMG, { weakEtag: true, lastModified: new Date('2024-02-02T03:04:05Z') });
    const e = await rejection(blk.read(40_000, 10));
    expect(e.code).toBe('EIO');
    expect(e.message).toContain('changed on the server');
  });

  it('without validators, a change of length is still caught', async () => {
    srv.put('/plain.img', IMG, { etag: null, lastModified: null });
    const blk = await openHttp('/plain.img', { readahead: 4096 });
    expect(state(blk).ifRange).toBeUndefined();
    expect(await blk.read(0, 10)).toEqual(IMG.subarray(0, 10));
    srv.put('/plain.img', pattern(IMG.length + 4096), { etag: null, lastModified: null });
    const e = await rejection(blk.read(8192, 10));
    expect(e.code).toBe('EIO');
    expect(e.message).toContain(`its length is now ${IMG.length + 4096}`);
  });

  it('invalidateCache pins the new version', async () => {
    const blk = await openHttp('/disk.img', { readahead: 4096 });
    await blk.read(0, 10);
    const v2 = pattern(200_000, 5);
    srv.put('/disk.img', v2);
    const bs = nodeOf(blk);
    await bs.drv.invalidateCache!(bs);
    expect(await blk.getLength()).toBe(v2.length);
    expect(await blk.read(0, 10)).toEqual(v2.subarray(0, 10));
  });
});

describe('retries', () => {
  it('retries 503 with exponential backoff, then succeeds', async () => {
    const blk = await openHttp('/disk.img', { readahead: 4096 });
    srv.fault({ count: 3, status: 503 });
    expect(await blk.read(5000, 100)).toEqual(IMG.subarray(5000, 5100));
    expect(sleeps).toEqual([100, 200, 400]);
    expect(httpStats(nodeOf(blk))).toMatchObject({ retries: 3, requests: 5 });
    expect(gets().slice(1).map((g) => g.status)).toEqual([503, 503, 503, 206]);
  });

  it('gives up after the configured retries with EIO', async () => {
    const blk = await openHttp('/disk.img', { readahead: 4096, retries: 2 });
    srv.fault({ count: 10, status: 502 });
    const e = await rejection(blk.read(0, 10));
    expect(e.code).toBe('EIO');
    expect(e.message).toContain('502');
    expect(e.message).toContain('after 3 attempts');
    expect(sleeps).toEqual([100, 200]);
    // A later read, once the server recovered, works.
    srv.reset();
    expect(await blk.read(0, 10)).toEqual(IMG.subarray(0, 10));
  });

  it('honours Retry-After (capped) and retries the open probe too', async () => {
    srv.fault({ count: 1, status: 429, retryAfter: 2 });
    const blk = await openHttp('/disk.img');
    expect(await blk.getLength()).toBe(DISK_LEN);
    expect(sleeps).toEqual([2000]);
    srv.fault({ count: 1, status: 503, retryAfter: 3600 });
    await blk.read(0, 1);
    expect(sleeps).toEqual([2000, 30_000]);
  });

  it('does not retry 4xx answers', async () => {
    const blk = await openHttp('/disk.img', { readahead: 4096 });
    srv.fault({ count: 1, status: 404 });
    expect((await rejection(blk.read(0, 10))).code).toBe('ENOENT');
    expect(sleeps).toEqual([]);
  });

  it('retries dropped connections', async () => {
    const blk = await openHttp('/disk.img', { readahead: 4096 });
    srv.fault({ count: 2, drop: true });
    expect(await blk.read(10_000, 10)).toEqual(IMG.subarray(10_000, 10_010));
    expect(httpStats(nodeOf(blk))!.retries).toBe(2);
  });

  it('abandons a stalled response after the timeout and retries', async () => {
    const blk = await openHttp('/disk.img', { readahead: 65536, timeout: 1 });
    srv.fault({ count: 1, stall: true });
    const t0 = Date.now();
    expect(await blk.read(0, 65536)).toEqual(IMG.subarray(0, 65536));
    expect(Date.now() - t0).toBeGreaterThanOrEqual(900);
    expect(httpStats(nodeOf(blk))!.retries).toBe(1);
  });

  it('close aborts fetches in flight', async () => {
    const blk = await openHttp('/disk.img', { readahead: 4096 });
    srv.fault({ count: 1, delayMs: 300 });
    const s = state(blk);
    const p = blk.read(0, 10).catch((e: unknown) => e);
    await new Promise((r) => setTimeout(r, 50));
    // Close the node directly (the backend would wait for the read to drain first).
    const bs = nodeOf(blk);
    await bs.drv.close!(bs);
    const e = await p;
    expect(e).toBeInstanceOf(BlockError);
    expect((e as BlockError).code).toBe('ECANCELED');
    expect(s.closed).toBe(true);
  });
});

describe('parseContentRange', () => {
  it('parses the forms servers send', () => {
    expect(parseContentRange('bytes 0-0/1234')).toEqual({ start: 0, end: 0, total: 1234 });
    expect(parseContentRange('bytes 10-19/*')).toEqual({ start: 10, end: 19 });
    expect(parseContentRange('bytes */0')).toEqual({ total: 0 });
    expect(parseContentRange('items 0-1/2')).toBeNull();
    expect(parseContentRange(null)).toBeNull();
  });
});

describe('read-only conformance over http', () => {
  const target: ReadOnlyTarget = {
    name: 'http',
    async open() {
      const g = new Graph({ drivers: [createHttpDriver()] });
      const blk = await BlockBackend.open(g, { driver: 'http', url: `${srv.url}/disk.img`, readahead: 65536 }, { readOnly: true });
      return {
        blk,
        expected: IMG,
        async close() {
          await blk.close();
          await g.closeAll();
        },
      };
    },
  };
  for (const c of readOnlyCases()) it(c.name, () => c.run(target));
});
