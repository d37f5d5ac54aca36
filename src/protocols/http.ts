/**
 * The `http` protocol (QEMU's block/curl.c for http:// and https://): a
 * read-only node over an image on a web server, read with single-range GETs.
 *
 * The image is cut into aligned chunks of `readahead` bytes; a read fetches
 * the chunks it touches (consecutive missing chunks in one GET), concurrent
 * reads of a chunk share one fetch, and recently used chunks stay in a
 * bounded LRU cache of `cache-size` bytes. The ETag seen at open is pinned
 * with If-Range on every later GET, so a server whose file changed answers
 * 200 with the full body instead of mixing old and new bytes, and that is
 * an error. 5xx answers, timeouts and network errors are retried with
 * exponential backoff. Messages use QEMU's words where the curl driver has
 * them (e.g. "curl driver does not support writes") so tools print the same.
 */
import type { BlockDriver } from '../core/driver.ts';
import { BlockError, type ErrnoCode } from '../core/errors.ts';
import type { BlockNode } from '../core/node.ts';
import { BLOCK, OPEN, type BlockStatus } from '../core/types.ts';
import { numberOption, sizeOption, stringOption } from './driver-opts.ts';

/** QEMU's CURL_BLOCK_OPT_READAHEAD_DEFAULT. */
export const HTTP_READAHEAD_DEFAULT = 256 * 1024;
/** QEMU's CURL_BLOCK_OPT_TIMEOUT_DEFAULT, in seconds. */
export const HTTP_TIMEOUT_DEFAULT = 5;
/** QEMU's CURL_TIMEOUT_MAX, in seconds. */
export const HTTP_TIMEOUT_MAX = 100000;
/** Attempts after the first one for a failed GET. */
export const HTTP_RETRIES_DEFAULT = 3;
/** Bytes of read-ahead chunks kept after use. */
export const HTTP_CACHE_SIZE_DEFAULT = 4 * 1024 * 1024;
/** Concurrent GETs per node, like QEMU's CURL_NUM_STATES. */
const MAX_PARALLEL = 8;
/** Largest request the generic layer hands us, and so the largest single GET (bounds memory per read). */
const MAX_TRANSFER = 32 * 1024 * 1024;
/** Chunk size when readahead is 0: reads are still fetched in whole sectors. */
const MIN_CHUNK = 512;
const BACKOFF_BASE_MS = 100;
const BACKOFF_MAX_MS = 5000;
/** A server's Retry-After is honoured up to this long, so a misconfigured server cannot park a read for hours. */
const RETRY_AFTER_MAX_MS = 30_000;

/** Counters the inspector shows for an http node. */
export interface HttpStats {
  /** HTTP requests sent, retries and the open probe included. */
  requests: number;
  /** Body bytes received. */
  bytesFetched: number;
  /** Attempts repeated after a retryable failure. */
  retries: number;
  /** Chunks a read found in the cache. */
  cacheHits: number;
  /** Chunks a read had to fetch. */
  cacheMisses: number;
  /** Chunks a read found already being fetched by another read. */
  coalesced: number;
}

/** What the driver needs from its environment; tests inject a fake sleep. */
export interface HttpEnv {
  fetch(url: string, init: RequestInit): Promise<Response>;
  /** Waits between retries. */
  sleep(ms: number): Promise<void>;
}

/** Per-node state of an http node (bs.opaque). */
export interface HttpState {
  readonly url: string;
  /** Length of the resource in bytes, from the open probe. */
  size: number;
  /** Strong ETag pinned at open (undefined when the server sent none or a weak one). */
  etag: string | undefined;
  /** Validator sent as If-Range: the strong ETag, else Last-Modified, else nothing. */
  ifRange: string | undefined;
  /** Chunk size: the readahead option, or MIN_CHUNK when that is 0. */
  readonly chunkSize: number;
  /** Seconds without progress before an attempt is abandoned; 0 = never. */
  readonly timeout: number;
  readonly retries: number;
  /** How many chunks the LRU cache holds. */
  readonly cacheChunks: number;
  readonly headers: Readonly<Record<string, string>>;
  readonly stats: HttpStats;
  /** Chunk index → data, least recently used first. */
  readonly cache: Map<number, Uint8Array>;
  /** Chunk index → its fetch in progress. */
  readonly inflight: Map<number, Promise<Uint8Array>>;
  readonly slots: Slots;
  readonly env: HttpEnv;
  /** Aborts every fetch when the node closes. */
  readonly closer: AbortController;
  closed: boolean;
}

/** A counting semaphore: at most `n` holders at once, FIFO. */
class Slots {
  private free: number;
  private readonly waiters: Array<() => void> = [];

  constructor(n: number) {
    this.free = n;
  }

  /** Resolves with a release function once a slot is free. */
  async acquire(): Promise<() => void> {
    if (this.free > 0) this.free--;
    else await new Promise<void>((r) => this.waiters.push(r));
    let released = false;
    return () => {
      if (released) return;
      released = true;
      const next = this.waiters.shift();
      if (next) next();
      else this.free++;
    };
  }
}

/** A failed attempt: the errno to report and whether trying again may help. */
class AttemptError extends Error {
  constructor(
    readonly code: ErrnoCode,
    message: string,
    readonly retryable: boolean,
    readonly retryAfterMs?: number,
  ) {
    super(message);
  }
}

/** The http node's state; throws if `bs` is not an open http node. */
export function httpState(bs: BlockNode): HttpState {
  const s = bs.opaque as HttpState | undefined;
  if (!s || !(s.cache instanceof Map)) throw new BlockError('EINVAL', `Node '${bs.nodeName}' is not an http node`, { node: bs.nodeName });
  return s;
}

/** Counters of an http node, or undefined for other nodes (for the inspector). */
export function httpStats(bs: BlockNode): HttpStats | undefined {
  return bs.drv.name === 'http' && bs.opaque ? { ...(bs.opaque as HttpState).stats } : undefined;
}

/** Parses `Content-Range: bytes a-b/total` (total may be `*`), or the unsatisfied-range form with only a total. */
export function parseContentRange(v: string | null): { start?: number; end?: number; total?: number } | null {
  if (!v) return null;
  const m = /^\s*bytes\s+(?:(\d+)-(\d+)|\*)\/(\d+|\*)\s*$/i.exec(v);
  if (!m) return null;
  const out: { start?: number; end?: number; total?: number } = {};
  if (m[1] !== undefined && m[2] !== undefined) {
    out.start = Number(m[1]);
    out.end = Number(m[2]);
  }
  if (m[3] !== '*') out.total = Number(m[3]);
  return out;
}

/** Milliseconds a Retry-After header asks for (delta-seconds or an HTTP date), or undefined. */
function retryAfterMs(v: string | null, now = Date.now()): number | undefined {
  if (!v) return undefined;
  if (/^\s*\d+\s*$/.test(v)) return Number(v) * 1000;
  const t = Date.parse(v);
  return Number.isNaN(t) ? undefined : Math.max(0, t - now);
}

/** Error for a status we did not expect; 5xx, 408, 425 and 429 are worth retrying. */
function statusError(res: Response): AttemptError {
  const st = res.status;
  const msg = `The requested URL returned error: ${st}${res.statusText ? ` ${res.statusText}` : ''}`;
  const retryable = st >= 500 || st === 408 || st === 425 || st === 429;
  let code: ErrnoCode = 'EIO';
  if (st === 404 || st === 410) code = 'ENOENT';
  else if (st === 401 || st === 403) code = 'EACCES';
  return new AttemptError(code, msg, retryable, retryable ? retryAfterMs(res.headers.get('retry-after')) : undefined);
}

/** Stops a response body we will not read, so the connection does not download it. */
async function discardBody(res: Response): Promise<void> {
  try {
    await res.body?.cancel();
  } catch {
    // Already closed or errored: nothing left to stop.
  }
}

function errorText(e: unknown): string {
  if (e instanceof Error) {
    const cause = (e as { cause?: unknown }).cause;
    return cause instanceof Error && cause.message ? `${e.message} (${cause.message})` : e.message;
  }
  return String(e);
}

/**
 * Runs one HTTP request under a concurrency slot and an inactivity timer:
 * `use` gets the response and a `progress` callback that re-arms the timer,
 * and must consume or discard the body. Network failures and timeouts come
 * out as retryable AttemptErrors.
 */
async function attempt<T>(s: HttpState, init: RequestInit, use: (res: Response, progress: () => void) => Promise<T>): Promise<T> {
  if (s.closed) throw new BlockError('ECANCELED', 'The http node was closed');
  const release = await s.slots.acquire();
  const ctl = new AbortController();
  const onClose = (): void => ctl.abort();
  s.closer.signal.addEventListener('abort', onClose);
  let timedOut = false;
  let timer: ReturnType<typeof setTimeout> | undefined;
  const progress = (): void => {
    if (s.timeout <= 0) return;
    if (timer !== undefined) clearTimeout(timer);
    timer = setTimeout(() => {
      timedOut = true;
      ctl.abort();
    }, s.timeout * 1000);
  };
  try {
    progress();
    s.stats.requests++;
    const res = await s.env.fetch(s.url, {
      ...init,
      signal: ctl.signal,
      // The HTTP cache must not answer for the server: If-Range checks are the point.
      cache: 'no-store',
      redirect: 'follow',
    });
    return await use(res, progress);
  } catch (e) {
    if (timedOut) throw new AttemptError('EIO', `Operation timed out after ${s.timeout} seconds without data`, true);
    if (s.closed) throw new BlockError('ECANCELED', 'The http node was closed');
    if (e instanceof AttemptError || e instanceof BlockError) throw e;
    throw new AttemptError('EIO', `Network error: ${errorText(e)}`, true);
  } finally {
    if (timer !== undefined) clearTimeout(timer);
    s.closer.signal.removeEventListener('abort', onClose);
    release();
  }
}

/**
 * Runs `fn` until it succeeds, a failure is not retryable, or `s.retries`
 * retries are spent, sleeping with exponential backoff (or the server's
 * Retry-After, capped) in between. Failures become BlockErrors prefixed
 * with `what`.
 */
async function withRetries<T>(s: HttpState, what: string, fn: () => Promise<T>): Promise<T> {
  for (let n = 0; ; n++) {
    try {
      return await fn();
    } catch (e) {
      if (e instanceof BlockError) throw e;
      const a = e instanceof AttemptError ? e : new AttemptError('EIO', errorText(e), false);
      if (!a.retryable || n >= s.retries || s.closed) {
        const tries = n > 0 ? ` (after ${n + 1} attempts)` : '';
        throw new BlockError(a.code, `${what}: ${a.message}${tries}`, { cause: e });
      }
      s.stats.retries++;
      const backoff = Math.min(BACKOFF_MAX_MS, BACKOFF_BASE_MS * 2 ** n);
      await s.env.sleep(Math.max(backoff, Math.min(a.retryAfterMs ?? 0, RETRY_AFTER_MAX_MS)));
    }
  }
}

/** Captures the validators of the open probe's response and chooses what If-Range will carry. */
function pinValidators(s: HttpState, res: Response): void {
  const etag = res.headers.get('etag')?.trim();
  const strong = etag && !etag.startsWith('W/') ? etag : undefined;
  s.etag = strong;
  // RFC 9110 §13.1.5: If-Range takes a strong ETag, or failing that a date.
  s.ifRange = strong ?? res.headers.get('last-modified') ?? undefined;
}

/**
 * Finds the resource's length (QEMU's curl_open probe): a `Range: bytes=0-0`
 * GET answered 206 gives it in Content-Range; 416 on an empty resource gives a
 * Content-Range with total 0; a Content-Range without a total falls back to HEAD. A plain
 * 200 means the server ignores ranges, which we cannot work with.
 */
async function probe(s: HttpState): Promise<void> {
  const what = 'CURL: Error opening file';
  const noRange = "Server does not support 'range' (byte ranges).";
  const viaGet = await withRetries(s, what, () =>
    attempt(s, { method: 'GET', headers: { ...s.headers, Range: 'bytes=0-0' } }, async (res) => {
      if (res.status === 206) {
        const cr = parseContentRange(res.headers.get('content-range'));
        const body = new Uint8Array(await res.arrayBuffer());
        s.stats.bytesFetched += body.length;
        pinValidators(s, res);
        return cr?.total;
      }
      if (res.status === 416) {
        await discardBody(res);
        const cr = parseContentRange(res.headers.get('content-range'));
        if (cr?.total !== undefined && cr.total === 0) {
          pinValidators(s, res);
          return 0;
        }
        return undefined;
      }
      if (res.status === 200) {
        await discardBody(res);
        // An empty resource needs no ranges, whatever the server supports.
        if (res.headers.get('content-length') === '0') return 0;
        throw new AttemptError('ENOTSUP', noRange, false);
      }
      await discardBody(res);
      throw statusError(res);
    }),
  );
  if (viaGet !== undefined) {
    s.size = viaGet;
    return;
  }
  s.size = await withRetries(s, what, () =>
    attempt(s, { method: 'HEAD', headers: { ...s.headers } }, async (res) => {
      await discardBody(res);
      if (!res.ok) throw statusError(res);
      const ranges = (res.headers.get('accept-ranges') ?? '').toLowerCase();
      if (!ranges.split(',').some((t) => t.trim() === 'bytes')) throw new AttemptError('ENOTSUP', noRange, false);
      const len = res.headers.get('content-length');
      if (len === null || !/^\d+$/.test(len.trim())) throw new AttemptError('EIO', "Server didn't report file size.", false);
      pinValidators(s, res);
      return Number(len);
    }),
  );
}

/** The message for a resource that no longer matches what was opened. */
function changedMessage(s: HttpState, detail: string): string {
  const tag = s.etag ? `ETag ${s.etag}` : s.ifRange ? `Last-Modified ${s.ifRange}` : `length ${s.size}`;
  return `'${s.url}' changed on the server since it was opened (${tag}): ${detail}; reopen the image to read the new version`;
}

/**
 * Fetches chunks [first, last] with one ranged GET and returns one buffer
 * per chunk (separate buffers, so the cache can drop them one by one).
 */
function fetchRun(s: HttpState, first: number, last: number): Promise<Uint8Array[]> {
  const C = s.chunkSize;
  const start = first * C;
  const end = Math.min(s.size, (last + 1) * C); // exclusive
  const headers: Record<string, string> = { ...s.headers, Range: `bytes=${start}-${end - 1}` };
  if (s.ifRange !== undefined) headers['If-Range'] = s.ifRange;
  const what = `Failed to read bytes ${start}-${end - 1} of '${s.url}'`;
  return withRetries(s, what, () =>
    attempt(s, { method: 'GET', headers }, async (res, progress) => {
      if (res.status === 200) {
        await discardBody(res);
        if (s.ifRange !== undefined) throw new AttemptError('EIO', changedMessage(s, 'the server answered an If-Range request with the whole resource'), false);
        throw new AttemptError('EIO', 'the server ignored the Range header and sent the whole resource', false);
      }
      if (res.status === 416) {
        await discardBody(res);
        throw new AttemptError('EIO', changedMessage(s, `it no longer has byte ${start}`), false);
      }
      if (res.status !== 206) {
        await discardBody(res);
        throw statusError(res);
      }
      const cr = parseContentRange(res.headers.get('content-range'));
      if (!cr || cr.start !== start || cr.end !== end - 1) {
        await discardBody(res);
        throw new AttemptError('EIO', `the server answered bytes ${cr?.start ?? '?'}-${cr?.end ?? '?'} instead of ${start}-${end - 1}`, false);
      }
      if (cr.total !== undefined && cr.total !== s.size) {
        await discardBody(res);
        throw new AttemptError('EIO', changedMessage(s, `its length is now ${cr.total}`), false);
      }
      const etag = res.headers.get('etag')?.trim();
      if (s.etag !== undefined && etag && etag !== s.etag) {
        await discardBody(res);
        throw new AttemptError('EIO', changedMessage(s, `the server now sends ETag ${etag}`), false);
      }
      const enc = res.headers.get('content-encoding');
      if (enc && enc.toLowerCase() !== 'identity') {
        await discardBody(res);
        throw new AttemptError('EIO', `the server encoded a byte range (Content-Encoding: ${enc}), so its offsets cannot be trusted`, false);
      }
      const chunks: Uint8Array[] = [];
      for (let c = first; c <= last; c++) chunks.push(new Uint8Array(Math.min(C, end - c * C)));
      const expected = end - start;
      let got = 0;
      const put = (piece: Uint8Array): void => {
        let off = 0;
        while (off < piece.length) {
          const k = Math.floor(got / C);
          const into = got - k * C;
          const chunk = chunks[k]!;
          const n = Math.min(piece.length - off, chunk.length - into);
          chunk.set(piece.subarray(off, off + n), into);
          off += n;
          got += n;
        }
      };
      if (res.body) {
        const reader = res.body.getReader();
        for (;;) {
          const { done, value } = await reader.read();
          if (done) break;
          progress();
          s.stats.bytesFetched += value.length;
          if (got + value.length > expected) {
            await reader.cancel().catch(() => undefined);
            throw new AttemptError('EIO', `the server sent more than the ${expected} bytes asked for`, false);
          }
          put(value);
        }
      } else {
        const all = new Uint8Array(await res.arrayBuffer());
        s.stats.bytesFetched += all.length;
        if (all.length > expected) throw new AttemptError('EIO', `the server sent more than the ${expected} bytes asked for`, false);
        put(all);
      }
      if (got !== expected) throw new AttemptError('EIO', `the response ended after ${got} of ${expected} bytes`, true);
      return chunks;
    }),
  );
}

/** Looks a chunk up in the cache and marks it most recently used. */
function cacheGet(s: HttpState, idx: number): Uint8Array | undefined {
  const d = s.cache.get(idx);
  if (d) {
    s.cache.delete(idx);
    s.cache.set(idx, d);
  }
  return d;
}

/** Adds a chunk, evicting the least recently used ones beyond capacity. */
function cachePut(s: HttpState, idx: number, d: Uint8Array): void {
  if (s.cacheChunks <= 0) return;
  s.cache.delete(idx);
  s.cache.set(idx, d);
  while (s.cache.size > s.cacheChunks) {
    const oldest = s.cache.keys().next().value as number;
    s.cache.delete(oldest);
  }
}

/** Starts fetching chunks [first, last] and registers each as in flight until it lands in the cache. */
function startRun(s: HttpState, first: number, last: number): void {
  const run = fetchRun(s, first, last);
  for (let c = first; c <= last; c++) {
    const p = run.then((chunks) => chunks[c - first]!);
    // A reader may have gone (aborted); the fetch still fills the cache, and must not be an unhandled rejection.
    p.catch(() => undefined);
    s.inflight.set(c, p);
    p.then(
      (d) => {
        if (s.inflight.get(c) === p) s.inflight.delete(c);
        if (!s.closed) cachePut(s, c, d);
      },
      () => {
        if (s.inflight.get(c) === p) s.inflight.delete(c);
      },
    );
  }
}

/** Resolves like `p`, or rejects with ECANCELED as soon as `signal` fires. */
function abortable<T>(p: Promise<T>, signal: AbortSignal | undefined): Promise<T> {
  if (!signal) return p;
  if (signal.aborted) return Promise.reject(new BlockError('ECANCELED'));
  return new Promise<T>((resolve, reject) => {
    const onAbort = (): void => reject(new BlockError('ECANCELED'));
    signal.addEventListener('abort', onAbort, { once: true });
    p.then(
      (v) => {
        signal.removeEventListener('abort', onAbort);
        resolve(v);
      },
      (e: unknown) => {
        signal.removeEventListener('abort', onAbort);
        reject(e);
      },
    );
  });
}

/** Reads [offset, offset+bytes) through the chunk cache into `buf`. */
async function httpRead(s: HttpState, offset: number, bytes: number, buf: Uint8Array, signal?: AbortSignal): Promise<void> {
  const end = Math.min(offset + bytes, s.size);
  if (end < offset + bytes) buf.fill(0, Math.max(0, end - offset), bytes);
  if (end <= offset) return;
  const C = s.chunkSize;
  const first = Math.floor(offset / C);
  const last = Math.floor((end - 1) / C);
  const maxRun = Math.max(1, Math.floor(MAX_TRANSFER / C));
  // Everything up to the awaits runs synchronously, so no chunk is evicted or lands between the loops.
  let runStart = -1;
  for (let c = first; c <= last + 1; c++) {
    const cached = c <= last && s.cache.has(c);
    const sharing = c <= last && !cached && s.inflight.has(c);
    if (sharing) s.stats.coalesced++;
    if (c <= last && !cached && !sharing) {
      s.stats.cacheMisses++;
      if (runStart < 0) runStart = c;
      if (c - runStart + 1 >= maxRun) {
        startRun(s, runStart, c);
        runStart = -1;
      }
    } else if (runStart >= 0) {
      startRun(s, runStart, c - 1);
      runStart = -1;
    }
  }
  const waits: Array<Promise<void>> = [];
  const copy = (c: number, d: Uint8Array): void => {
    const cs = c * C;
    const a = Math.max(offset, cs);
    const b = Math.min(end, cs + C);
    if (cs + d.length < b) throw new BlockError('EIO', `Short chunk ${c} of '${s.url}'`);
    buf.set(d.subarray(a - cs, b - cs), a - offset);
  };
  for (let c = first; c <= last; c++) {
    const hit = cacheGet(s, c);
    if (hit) {
      s.stats.cacheHits++;
      copy(c, hit);
      continue;
    }
    const p = s.inflight.get(c);
    if (!p) throw new BlockError('EIO', `Chunk ${c} of '${s.url}' is neither cached nor being fetched`);
    waits.push(p.then((d) => copy(c, d)));
  }
  if (waits.length > 0) {
    await abortable(Promise.all(waits), signal);
  }
}

function parseHeaders(v: unknown): Record<string, string> {
  if (v === undefined || v === null) return {};
  let obj: unknown = v;
  if (typeof v === 'string') {
    try {
      obj = JSON.parse(v) as unknown;
    } catch {
      throw new BlockError('EINVAL', "Parameter 'headers' expects an object or JSON text of header names and values");
    }
  }
  if (typeof obj !== 'object' || obj === null || Array.isArray(obj)) {
    throw new BlockError('EINVAL', "Parameter 'headers' expects an object of header names and values");
  }
  const out: Record<string, string> = {};
  for (const [k, val] of Object.entries(obj as Record<string, unknown>)) {
    if (typeof val !== 'string') throw new BlockError('EINVAL', `Header '${k}' must have a string value`);
    const lk = k.toLowerCase();
    if (lk === 'range' || lk === 'if-range') throw new BlockError('EINVAL', `Header '${k}' is set by the http driver and cannot be given`);
    out[k] = val;
  }
  return out;
}

const defaultEnv: HttpEnv = {
  // Looked up at call time so a test can replace globalThis.fetch.
  fetch: (url, init) => globalThis.fetch(url, init),
  sleep: (ms) => new Promise((r) => setTimeout(r, ms)),
};

/** Makes an http driver using `env` for fetch and sleep (defaults: the global fetch and setTimeout). */
export function createHttpDriver(env: Partial<HttpEnv> = {}): BlockDriver {
  const e: HttpEnv = { ...defaultEnv, ...env };
  return {
    name: 'http',
    kind: 'protocol',
    protocolNames: ['http', 'https'],
    runtimeOptions: [
      { name: 'url', type: 'string', help: 'URL of the image (http:// or https://)' },
      { name: 'readahead', type: 'size', help: 'Chunk size in which the image is fetched and cached', defaultValue: '256k' },
      { name: 'timeout', type: 'number', help: 'Seconds without data before a request is abandoned (0 = never)', defaultValue: '5' },
      { name: 'retries', type: 'number', help: 'Retries of a request that failed with 5xx, a timeout or a network error', defaultValue: '3' },
      { name: 'cache-size', type: 'size', help: 'Bytes of fetched chunks kept for later reads', defaultValue: '4M' },
      { name: 'headers', type: 'string', help: 'Extra request headers: an object, or its JSON text' },
    ],

    parseFilename(filename, options) {
      options.url = filename;
    },

    async open(bs, options, flags) {
      // QEMU's bdrv_apply_auto_read_only with the curl driver's message.
      if (flags & OPEN.RDWR) {
        if (!(flags & OPEN.AUTO_RDONLY)) throw new BlockError('EACCES', 'curl driver does not support writes', { node: bs.nodeName });
        bs.readOnly = true;
        bs.openFlags &= ~OPEN.RDWR;
      }
      const readahead = sizeOption(options, 'readahead', HTTP_READAHEAD_DEFAULT);
      if (readahead % 512 !== 0) throw new BlockError('EINVAL', `HTTP_READAHEAD_SIZE ${readahead} is not a multiple of 512`);
      const timeout = numberOption(options, 'timeout', HTTP_TIMEOUT_DEFAULT);
      if (timeout < 0 || timeout > HTTP_TIMEOUT_MAX) throw new BlockError('EINVAL', 'timeout parameter is too large or negative');
      const retries = numberOption(options, 'retries', HTTP_RETRIES_DEFAULT);
      if (retries < 0 || retries > 100) throw new BlockError('EINVAL', "Parameter 'retries' must be between 0 and 100");
      const cacheSize = sizeOption(options, 'cache-size', HTTP_CACHE_SIZE_DEFAULT);
      // `filename` is what QEMU's parse_filename would have turned into `url` (blockdev options with filename=).
      const url = stringOption(options, 'url') ?? stringOption(options, 'filename');
      if (url === undefined) throw new BlockError('EINVAL', "curl block driver requires an 'url' option");
      if (!/^https?:\/\//i.test(url)) {
        throw new BlockError('EINVAL', `http curl driver cannot handle the URL '${url}' (does not start with 'http://' or 'https://')`);
      }
      const chunkSize = readahead > 0 ? readahead : MIN_CHUNK;
      const s: HttpState = {
        url,
        size: 0,
        etag: undefined,
        ifRange: undefined,
        chunkSize,
        timeout,
        retries,
        cacheChunks: Math.floor(cacheSize / chunkSize),
        headers: parseHeaders(options.headers),
        stats: { requests: 0, bytesFetched: 0, retries: 0, cacheHits: 0, cacheMisses: 0, coalesced: 0 },
        cache: new Map(),
        inflight: new Map(),
        slots: new Slots(MAX_PARALLEL),
        env: e,
        closer: new AbortController(),
        closed: false,
      };
      bs.opaque = s;
      if (!bs.filename) bs.filename = url;
      await probe(s);
    },

    async close(bs) {
      const s = bs.opaque as HttpState | undefined;
      if (!s) return;
      s.closed = true;
      s.closer.abort();
      s.cache.clear();
      s.inflight.clear();
    },

    refreshLimits(bs) {
      const s = httpState(bs);
      bs.bl.optTransfer = s.chunkSize;
      bs.bl.maxTransfer = Math.max(MAX_TRANSFER, s.chunkSize);
    },

    async getLength(bs) {
      return httpState(bs).size;
    },

    async preadv(bs, offset, bytes, buf, _flags, signal) {
      try {
        await httpRead(httpState(bs), offset, bytes, buf, signal);
      } catch (err) {
        if (err instanceof BlockError && err.node === undefined) throw new BlockError(err.code, err.message, { node: bs.nodeName, cause: err });
        throw err;
      }
    },

    async blockStatus(bs, _wantZero, offset, bytes): Promise<BlockStatus> {
      return { status: BLOCK.DATA | BLOCK.OFFSET_VALID, pnum: bytes, map: offset, file: bs };
    },

    async invalidateCache(bs) {
      // The resource may have changed on purpose: forget chunks and pin what the server has now.
      const s = httpState(bs);
      s.cache.clear();
      await probe(s);
      bs.totalBytes = s.size;
    },
  };
}

/** The http/https protocol driver with the global fetch. */
export const httpDriver: BlockDriver = createHttpDriver();
