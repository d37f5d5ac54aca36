/**
 * A tiny static HTTP server for testing the `http` protocol: single byte
 * ranges (RFC 9110 §14), strong ETags with If-Range, HEAD, CORS (so a page on
 * the Vite server can fetch cross-origin under COEP), and fault injection
 * (failing status codes, dropped connections, stalled bodies) for the next N
 * requests. It binds to 127.0.0.1 only and serves in-memory files plus,
 * optionally, a directory read range by range.
 *
 * In-process: `const srv = await startRangeServer(); srv.put('/a.img', bytes)`.
 * Standalone: `npx tsx e2e/range-server.ts --root DIR [--port N]`.
 */
import { createHash } from 'node:crypto';
import { open, stat } from 'node:fs/promises';
import { createServer, type IncomingHttpHeaders, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo, Socket } from 'node:net';
import { join, normalize, sep } from 'node:path';
import { pathToFileURL } from 'node:url';

/** How a served file answers, besides its bytes. */
export interface FileOptions {
  /** ETag to send; default: a strong tag derived from the content. null sends none. */
  etag?: string | null;
  /** Send the ETag as weak (W/"…"), which If-Range never matches. */
  weakEtag?: boolean;
  /** Last-Modified to send; default: the time of put(). null sends none. */
  lastModified?: Date | null;
  /** Ignore Range and answer every GET with the whole body (a server without byte ranges). */
  noRange?: boolean;
  /** Report an unknown complete length (`Content-Range: bytes a-b/*`). */
  unknownLength?: boolean;
  contentType?: string;
}

interface Entry extends FileOptions {
  data: Uint8Array;
  etagValue: string | null;
  modified: Date | null;
}

/** A file found for a request: its answer options, length and a way to read a range of it. */
interface Found extends FileOptions {
  size: number;
  etagValue: string | null;
  modified: Date | null;
  readRange(start: number, end: number): Promise<Uint8Array>;
}

/** A fault applied to the next `count` matching GET/HEAD requests (preflights are never faulted). */
export interface Fault {
  count: number;
  /** Only requests for this path; every path when absent. */
  path?: string;
  /** Answer with this status and a short text body. */
  status?: number;
  /** Retry-After header value (seconds) sent with `status`. */
  retryAfter?: number;
  /** Destroy the connection without answering (a network error for the client). */
  drop?: boolean;
  /** Send the headers and part of the body, then go silent until the client gives up. */
  stall?: boolean;
  /** Delay the answer by this many ms (the request is then served normally). */
  delayMs?: number;
}

/** One request as the server saw it. */
export interface RequestRecord {
  method: string;
  path: string;
  range?: string;
  ifRange?: string;
  status: number;
  /** Body bytes sent. */
  bytes: number;
  fault?: 'status' | 'drop' | 'stall' | 'delay';
  /** Request headers, names in lower case. */
  headers: IncomingHttpHeaders;
}

/** Options for startRangeServer. */
export interface RangeServerOptions {
  /** Port to bind on 127.0.0.1; 0 (default) picks a free one. */
  port?: number;
  /** Directory served for paths that were not put() in memory. */
  root?: string;
}

/** A running server. */
export interface RangeServer {
  /** Base URL without a trailing slash, e.g. http://127.0.0.1:41234. */
  readonly url: string;
  readonly port: number;
  /** Every GET/HEAD answered (OPTIONS preflights are not recorded), oldest first. */
  readonly log: RequestRecord[];
  /** Serves `data` at `path`, replacing what was there; the default ETag follows the content. */
  put(path: string, data: Uint8Array, opts?: FileOptions): void;
  /** Stops serving `path` (later requests get 404). */
  remove(path: string): void;
  /** Queues a fault for the next matching requests. */
  fault(f: Fault): void;
  /** Drops queued faults and clears the log. */
  reset(): void;
  /** Stops the server, closing open connections. */
  close(): Promise<void>;
}

const EXPOSED = ['Content-Range', 'Content-Length', 'ETag', 'Last-Modified', 'Accept-Ranges', 'Retry-After', 'Content-Type'];

/** Strong ETag from content, so equal bytes give equal tags and any change gives a new one. */
function contentEtag(data: Uint8Array): string {
  return `"${createHash('sha1').update(data).digest('hex').slice(0, 20)}"`;
}

type ByteRange = { start: number; end: number } | 'unsatisfiable' | null;

/**
 * Parses a Range header against a length: one `bytes=a-b`, `bytes=a-` or
 * `bytes=-n`. Returns null when the header is absent, malformed or asks for
 * several ranges — the server then ignores it and sends everything, which
 * RFC 9110 allows.
 */
export function parseRange(header: string | undefined, size: number): ByteRange {
  if (!header) return null;
  const m = /^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$/i.exec(header);
  if (!m || (m[1] === '' && m[2] === '')) return null;
  if (m[1] === '') {
    const n = Number(m[2]);
    if (n === 0) return 'unsatisfiable';
    return { start: Math.max(0, size - n), end: size - 1 };
  }
  const start = Number(m[1]);
  let end = m[2] === '' ? size - 1 : Number(m[2]);
  if (m[2] !== '' && end < start) return null;
  if (start >= size) return 'unsatisfiable';
  if (end >= size) end = size - 1;
  return { start, end };
}

/** RFC 9110 §13.1.5: If-Range holds only for an exactly equal strong ETag or an exactly equal HTTP date. */
function ifRangeHolds(ifRange: string, e: { etagValue: string | null; weakEtag?: boolean; modified: Date | null }): boolean {
  const v = ifRange.trim();
  if (v.startsWith('"') || v.startsWith('W/')) {
    return !v.startsWith('W/') && !e.weakEtag && e.etagValue !== null && v === e.etagValue;
  }
  return e.modified !== null && v === e.modified.toUTCString();
}

/** Starts a range server on 127.0.0.1. */
export async function startRangeServer(opts: RangeServerOptions = {}): Promise<RangeServer> {
  const files = new Map<string, Entry>();
  const faults: Fault[] = [];
  const log: RequestRecord[] = [];
  const sockets = new Set<Socket>();

  const takeFault = (path: string): Fault | undefined => {
    const i = faults.findIndex((f) => f.count > 0 && (f.path === undefined || f.path === path));
    if (i < 0) return undefined;
    const f = faults[i]!;
    if (--f.count <= 0) faults.splice(i, 1);
    return f;
  };

  /** Looks up `path` in memory, then under root (reading only the needed range later). */
  const lookup = async (path: string): Promise<Found | null> => {
    const mem = files.get(path);
    if (mem) return { ...mem, size: mem.data.length, readRange: async (a, b) => mem.data.subarray(a, b + 1) };
    if (!opts.root) return null;
    const full = normalize(join(opts.root, decodeURIComponent(path)));
    if (!full.startsWith(normalize(opts.root + sep))) return null;
    let st;
    try {
      st = await stat(full);
    } catch {
      return null;
    }
    if (!st.isFile()) return null;
    const size = st.size;
    return {
      size,
      etagValue: `"${size.toString(16)}-${Math.floor(st.mtimeMs).toString(16)}"`,
      modified: st.mtime,
      readRange: async (a, b) => {
        const fh = await open(full, 'r');
        try {
          const buf = new Uint8Array(b - a + 1);
          await fh.read(buf, 0, buf.length, a);
          return buf;
        } finally {
          await fh.close();
        }
      },
    };
  };

  const cors = (req: IncomingMessage, res: ServerResponse): void => {
    res.setHeader('Access-Control-Allow-Origin', '*');
    res.setHeader('Access-Control-Expose-Headers', EXPOSED.join(', '));
    // Pages under COEP: require-corp may embed this too; CORS fetches do not need it.
    res.setHeader('Cross-Origin-Resource-Policy', 'cross-origin');
    if (req.headers['access-control-request-private-network']) res.setHeader('Access-Control-Allow-Private-Network', 'true');
  };

  const handle = async (req: IncomingMessage, res: ServerResponse): Promise<void> => {
    const method = req.method ?? 'GET';
    const path = new URL(req.url ?? '/', 'http://x').pathname;
    cors(req, res);
    if (method === 'OPTIONS') {
      res.setHeader('Access-Control-Allow-Methods', 'GET, HEAD, OPTIONS');
      res.setHeader('Access-Control-Allow-Headers', req.headers['access-control-request-headers'] ?? 'Range, If-Range');
      res.setHeader('Access-Control-Max-Age', '600');
      res.writeHead(204).end();
      return;
    }
    const rec: RequestRecord = { method, path, status: 0, bytes: 0, headers: req.headers };
    const range = req.headers.range;
    const ifRange = req.headers['if-range'];
    if (range !== undefined) rec.range = range;
    if (typeof ifRange === 'string') rec.ifRange = ifRange;
    log.push(rec);

    if (method !== 'GET' && method !== 'HEAD') {
      rec.status = 405;
      res.writeHead(405, { Allow: 'GET, HEAD, OPTIONS' }).end();
      return;
    }
    const fault = takeFault(path);
    if (fault?.delayMs) {
      rec.fault = 'delay';
      await new Promise((r) => setTimeout(r, fault.delayMs));
    }
    if (fault?.drop) {
      rec.fault = 'drop';
      req.socket.destroy();
      return;
    }
    if (fault?.status) {
      rec.fault = 'status';
      rec.status = fault.status;
      const h: Record<string, string> = { 'Content-Type': 'text/plain' };
      if (fault.retryAfter !== undefined) h['Retry-After'] = String(fault.retryAfter);
      res.writeHead(fault.status, h).end(method === 'HEAD' ? undefined : `injected ${fault.status}\n`);
      return;
    }

    const e = await lookup(path);
    if (!e) {
      rec.status = 404;
      res.writeHead(404, { 'Content-Type': 'text/plain' }).end(method === 'HEAD' ? undefined : 'not found\n');
      return;
    }
    const size = e.size;
    const headers: Record<string, string> = { 'Content-Type': e.contentType ?? 'application/octet-stream' };
    if (e.etagValue !== null) headers.ETag = e.weakEtag ? `W/${e.etagValue}` : e.etagValue;
    if (e.modified !== null) headers['Last-Modified'] = e.modified.toUTCString();
    headers['Accept-Ranges'] = e.noRange ? 'none' : 'bytes';

    let r = e.noRange ? null : parseRange(range, size);
    if (r !== null && typeof ifRange === 'string' && !ifRangeHolds(ifRange, e)) r = null;
    if (r === 'unsatisfiable') {
      rec.status = 416;
      res.writeHead(416, { ...headers, 'Content-Range': `bytes */${size}`, 'Content-Length': '0' }).end();
      return;
    }
    const start = r ? r.start : 0;
    const end = r ? r.end : size - 1;
    const len = Math.max(0, end - start + 1);
    rec.status = r ? 206 : 200;
    if (r) headers['Content-Range'] = `bytes ${start}-${end}/${e.unknownLength ? '*' : size}`;
    headers['Content-Length'] = String(len);
    res.writeHead(rec.status, headers);
    if (method === 'HEAD' || len === 0) {
      res.end();
      return;
    }
    const body = await e.readRange(start, end);
    if (fault?.stall) {
      rec.fault = 'stall';
      // Half the body, then silence; the client's inactivity timeout must fire.
      const half = body.subarray(0, Math.floor(body.length / 2));
      res.write(half);
      rec.bytes = half.length;
      return;
    }
    rec.bytes = body.length;
    res.end(body);
  };

  const server: Server = createServer((req, res) => {
    handle(req, res).catch((err: unknown) => {
      if (!res.headersSent) res.writeHead(500, { 'Content-Type': 'text/plain' });
      res.end(String(err));
    });
  });
  server.on('connection', (s) => {
    sockets.add(s);
    s.on('close', () => sockets.delete(s));
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(opts.port ?? 0, '127.0.0.1', () => resolve());
  });
  const port = (server.address() as AddressInfo).port;

  return {
    url: `http://127.0.0.1:${port}`,
    port,
    log,
    put(path, data, fo = {}) {
      files.set(path, {
        ...fo,
        data,
        etagValue: fo.etag === null ? null : (fo.etag ?? contentEtag(data)),
        modified: fo.lastModified === null ? null : (fo.lastModified ?? new Date(Math.floor(Date.now() / 1000) * 1000)),
      });
    },
    remove(path) {
      files.delete(path);
    },
    fault(f) {
      faults.push({ ...f });
    },
    reset() {
      faults.length = 0;
      log.length = 0;
    },
    close() {
      for (const s of sockets) s.destroy();
      return new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}

/** Command-line entry: serve a directory until killed. */
async function main(argv: string[]): Promise<void> {
  let root: string | undefined;
  let port = 0;
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === '--root') root = argv[++i];
    else if (argv[i] === '--port') port = Number(argv[++i]);
  }
  if (!root) {
    process.stderr.write('usage: tsx e2e/range-server.ts --root DIR [--port N]\n');
    process.exit(2);
  }
  const srv = await startRangeServer({ root, port });
  process.stdout.write(`range server: ${srv.url} serving ${root}\n`);
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  void main(process.argv.slice(2));
}
