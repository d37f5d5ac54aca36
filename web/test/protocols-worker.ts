/**
 * Dedicated module worker behind web/test/protocols.html: it owns a Graph
 * with the browser drivers and exposes, through comlink, what the e2e specs
 * drive — backends opened by id, OPFS file helpers, and the conformance
 * cases run against OPFS, HTTP and Blob targets. Errors cross as BlockErrors
 * with their codes (see comlink-errors.ts).
 */
import * as Comlink from 'comlink';
import { BlockBackend } from '../../src/core/block-backend.ts';
import type { CreateContext } from '../../src/core/driver.ts';
import { conformanceCases, type ConformanceTarget } from '../../src/core/conformance.ts';
import { BlockError } from '../../src/core/errors.ts';
import { Graph } from '../../src/core/graph.ts';
import { PERM, type BlockdevOptions } from '../../src/core/types.ts';
import { browserDrivers } from '../../src/drivers-browser.ts';
import { httpStats, type HttpStats } from '../../src/protocols/http.ts';
import { opfsDriver, opfsList, opfsRemove, opfsRename, opfsSyncAvailable, type OpfsEntry } from '../../src/protocols/opfs.ts';
import { readOnlyCases, type ReadOnlyTarget } from '../../src/protocols/readonly-conformance.ts';
import { registerBlockErrorTransfer } from './comlink-errors.ts';
import { MiB, PATTERN_IMAGE, QCOW2_IMAGES, SHARED_TARGETS, testPattern, ZERO_IMAGE } from './targets.ts';

registerBlockErrorTransfer();

/** Outcome of one conformance case. */
export interface CaseResult {
  ok: boolean;
  ms: number;
  error?: string;
}

const graph = new Graph({ drivers: browserDrivers(), defaultProtocol: 'opfs' });
const backends = new Map<string, BlockBackend>();
/** Raw sync handles held without qblock's lock, to play a foreign user of a file. */
const rawHandles = new Map<string, { close(): void }>();
let httpBase = '';
/** Protocol create() gets no use of the context; formats would. */
const noContext: CreateContext = {
  createAndOpenFile: () => Promise.reject(new BlockError('ENOTSUP', 'not available in the test worker')),
  openImage: () => Promise.reject(new BlockError('ENOTSUP', 'not available in the test worker')),
  close: () => Promise.resolve(),
};
let fileSeq = 0;

function backend(id: string): BlockBackend {
  const b = backends.get(id);
  if (!b) throw new BlockError('EINVAL', `No backend '${id}' is open in this worker`);
  return b;
}

/** A target that creates a fresh 1 MiB OPFS file per image and removes it on close. */
function opfsTarget(id: string, groups: ConformanceTarget['groups'], wrap: (filename: string) => BlockdevOptions): ConformanceTarget {
  return {
    name: id,
    groups,
    async open() {
      const filename = `conformance/${id.replace(/\W+/g, '-')}-${Date.now()}-${fileSeq++}.img`;
      await opfsDriver.create!(filename, { size: MiB }, noContext);
      const g = new Graph({ drivers: browserDrivers(), defaultProtocol: 'opfs' });
      const blk = await BlockBackend.open(g, wrap(filename));
      return {
        blk,
        async close() {
          await blk.close();
          await g.closeAll();
          if (g.nodes.size !== 0) throw new Error(`${id}: nodes left open after close`);
          await opfsRemove(filename);
        },
      };
    },
  };
}

/** A target over a read-only stack opened from `options`, for the shared cases that only read. */
function readOnlySharedTarget(id: string, groups: ConformanceTarget['groups'], options: () => BlockdevOptions): ConformanceTarget {
  return {
    name: id,
    groups,
    async open() {
      const g = new Graph({ drivers: browserDrivers() });
      const blk = await BlockBackend.open(g, options(), { readOnly: true });
      return {
        blk,
        async close() {
          await blk.close();
          await g.closeAll();
        },
      };
    },
  };
}

function sharedTarget(id: string): ConformanceTarget {
  const info = SHARED_TARGETS.find((t) => t.id === id);
  if (!info) throw new Error(`unknown target '${id}'`);
  switch (id) {
    case 'opfs':
      return opfsTarget(id, info.groups, (filename) => ({ driver: 'opfs', filename, discard: 'unmap' }));
    case 'raw over opfs':
      return opfsTarget(id, info.groups, (filename) => ({ driver: 'raw', discard: 'unmap', file: { driver: 'opfs', filename } }));
    case 'http zero image':
      return readOnlySharedTarget(id, info.groups, () => ({ driver: 'http', url: httpBase + ZERO_IMAGE.path }));
    case 'blob zero image':
      return readOnlySharedTarget(id, info.groups, () => ({ driver: 'blob', blob: new Blob([new Uint8Array(ZERO_IMAGE.size)]) }));
    default:
      throw new Error(`target '${id}' has no factory`);
  }
}

/** Fetches a whole file from the range server (reference images and files to import). */
async function fetchBytes(path: string): Promise<Uint8Array<ArrayBuffer>> {
  const res = await fetch(httpBase + path, { cache: 'no-store' });
  if (!res.ok) throw new Error(`GET ${path}: ${res.status}`);
  return new Uint8Array(await res.arrayBuffer());
}

/** Copies a file from the range server into OPFS (through the opfs protocol) and returns its OPFS path. */
async function importToOpfs(path: string): Promise<string> {
  const data = await fetchBytes(path);
  const filename = `conformance/import-${Date.now()}-${fileSeq++}${path.slice(path.lastIndexOf('.'))}`;
  const g = new Graph({ drivers: browserDrivers() });
  const blk = await BlockBackend.open(g, { driver: 'opfs', filename, create: true });
  try {
    await blk.truncate(data.length);
    await blk.pwrite(0, data);
    await blk.flush();
  } finally {
    await blk.close();
    await g.closeAll();
  }
  return filename;
}

/** Per target: what to open and the bytes it must read as, computed once per worker. */
const readOnlySetups = new Map<string, Promise<{ target: string | BlockdevOptions; format?: string; expected: Uint8Array }>>();

function readOnlySetup(id: string): Promise<{ target: string | BlockdevOptions; format?: string; expected: Uint8Array }> {
  let p = readOnlySetups.get(id);
  if (p) return p;
  p = (async () => {
    switch (id) {
      case 'http':
        return {
          target: { driver: 'http', url: httpBase + PATTERN_IMAGE.path, readahead: 65536 },
          expected: testPattern(PATTERN_IMAGE.size, PATTERN_IMAGE.seed),
        };
      case 'blob': {
        const expected = testPattern(PATTERN_IMAGE.size, PATTERN_IMAGE.seed);
        return { target: { driver: 'blob', blob: new Blob([expected]) }, expected };
      }
      case 'qcow2 over http':
      case 'qcow2 compressed over http': {
        const img = id.includes('compressed') ? QCOW2_IMAGES.compressed : QCOW2_IMAGES.plain;
        return { target: httpBase + img.path, format: 'qcow2', expected: await fetchBytes(img.raw) };
      }
      case 'qcow2 over opfs':
        return { target: await importToOpfs(QCOW2_IMAGES.plain.path), format: 'qcow2', expected: await fetchBytes(QCOW2_IMAGES.plain.raw) };
      default:
        throw new Error(`unknown read-only target '${id}'`);
    }
  })();
  readOnlySetups.set(id, p);
  // A failed setup is retried by the next case rather than remembered.
  p.catch(() => readOnlySetups.delete(id));
  return p;
}

function readOnlyTarget(id: string): ReadOnlyTarget {
  return {
    name: id,
    async open() {
      const setup = await readOnlySetup(id);
      const g = new Graph({ drivers: browserDrivers(), defaultProtocol: 'opfs' });
      const opts: { readOnly: boolean; format?: string } = { readOnly: true };
      if (setup.format !== undefined) opts.format = setup.format;
      const blk = await BlockBackend.open(g, setup.target, opts);
      return {
        blk,
        expected: setup.expected,
        async close() {
          await blk.close();
          await g.closeAll();
        },
      };
    },
  };
}

function describeError(e: unknown): string {
  if (e instanceof Error) {
    const code = (e as { code?: unknown }).code;
    return `${code ? `[${String(code)}] ` : ''}${e.message}`;
  }
  return String(e);
}

async function timed(fn: () => Promise<void>): Promise<CaseResult> {
  const t0 = performance.now();
  try {
    await fn();
    return { ok: true, ms: performance.now() - t0 };
  } catch (e) {
    return { ok: false, ms: performance.now() - t0, error: describeError(e) };
  }
}

const api = {
  /** What this context offers. */
  env(): { syncHandles: boolean; locks: boolean; crossOriginIsolated: boolean } {
    return { syncHandles: opfsSyncAvailable(), locks: typeof navigator.locks !== 'undefined', crossOriginIsolated: self.crossOriginIsolated };
  },

  /** Sets the base URL of the range server the http targets read from. */
  configure(opts: { httpBase: string }): void {
    httpBase = opts.httpBase.replace(/\/$/, '');
  },

  /** Runs one case of the shared suite against a target from SHARED_TARGETS. */
  runSharedCase(targetId: string, caseName: string): Promise<CaseResult> {
    const c = conformanceCases().find((k) => k.name === caseName);
    if (!c) return Promise.resolve({ ok: false, ms: 0, error: `no shared case named '${caseName}'` });
    return timed(() => c.run(sharedTarget(targetId)));
  },

  /** Runs one read-only case against 'http' or 'blob'. */
  runReadOnlyCase(targetId: string, caseName: string): Promise<CaseResult> {
    const c = readOnlyCases().find((k) => k.name === caseName);
    if (!c) return Promise.resolve({ ok: false, ms: 0, error: `no read-only case named '${caseName}'` });
    return timed(() => c.run(readOnlyTarget(targetId)));
  },

  /** Opens a backend as `id` from a filename or blockdev options; returns its length. */
  async open(id: string, target: string | BlockdevOptions, opts: { readOnly?: boolean; format?: string } = {}): Promise<number> {
    if (backends.has(id)) throw new BlockError('EINVAL', `Backend '${id}' is already open`);
    const o: { readOnly?: boolean; format?: string } = {};
    if (opts.readOnly !== undefined) o.readOnly = opts.readOnly;
    if (opts.format !== undefined) o.format = opts.format;
    const blk = await BlockBackend.open(graph, target, o);
    backends.set(id, blk);
    return blk.getLength();
  },

  /** Opens a read-only backend over a Blob or File handed over from the page. */
  async openBlob(id: string, blob: Blob): Promise<number> {
    return api.open(id, { driver: 'blob', blob }, { readOnly: true });
  },

  /** Closes backend `id` and the nodes only it used. */
  async close(id: string): Promise<void> {
    const blk = backend(id);
    backends.delete(id);
    await blk.close();
    await graph.closeAll();
  },

  async write(id: string, offset: number, data: Uint8Array): Promise<void> {
    await backend(id).pwrite(offset, data);
  },

  async read(id: string, offset: number, length: number): Promise<Uint8Array> {
    return backend(id).read(offset, length);
  },

  /** Writes testPattern(length, seed) at offset (so big writes need not cross the page). */
  async writePattern(id: string, offset: number, length: number, seed: number): Promise<void> {
    await backend(id).pwrite(offset, testPattern(length, seed));
  },

  /** Whether [offset, offset+length) holds testPattern(length, seed). */
  async checkPattern(id: string, offset: number, length: number, seed: number): Promise<boolean> {
    const got = await backend(id).read(offset, length);
    const want = testPattern(length, seed);
    return got.every((b, i) => b === want[i]);
  },

  /**
   * Writes testPattern(length, seed) at offset from a SharedArrayBuffer view and reads it back into
   * another one (what the emulator's SAB channel does); returns whether the bytes matched.
   */
  async sharedBufferRoundTrip(id: string, offset: number, length: number, seed: number): Promise<boolean> {
    const src = new Uint8Array(new SharedArrayBuffer(length + 8), 8, length);
    src.set(testPattern(length, seed));
    await backend(id).pwrite(offset, src);
    const dst = new Uint8Array(new SharedArrayBuffer(length + 16), 16, length);
    await backend(id).pread(offset, dst);
    return dst.every((b, i) => b === src[i]);
  },

  async flush(id: string): Promise<void> {
    await backend(id).flush();
  },

  async truncate(id: string, size: number): Promise<void> {
    await backend(id).truncate(size);
  },

  async length(id: string): Promise<number> {
    return backend(id).getLength();
  },

  /**
   * Reopens the backend's node read-only or read-write (QEMU's bdrv_reopen),
   * dropping the backend's write permission first or taking it back after,
   * as a device switching to read-only would.
   */
  async reopen(id: string, readOnly: boolean): Promise<boolean> {
    const blk = backend(id);
    const bs = blk.bs;
    if (!bs) throw new BlockError('ENOMEDIUM');
    const { sharedPerm } = blk.getPerm();
    if (readOnly) {
      blk.setPerm(PERM.CONSISTENT_READ, sharedPerm);
      await graph.reopen(bs, { readOnly });
    } else {
      await graph.reopen(bs, { readOnly });
      blk.setPerm(PERM.CONSISTENT_READ | PERM.WRITE | PERM.RESIZE, sharedPerm);
    }
    return bs.readOnly;
  },

  /** Counters of the http node under backend `id` (found through file children). */
  stats(id: string): HttpStats | undefined {
    for (let bs = backend(id).bs; bs; bs = bs.file?.bs ?? null) {
      const st = httpStats(bs);
      if (st) return st;
    }
    return undefined;
  },

  /** Creates (or empties) an OPFS image of `size` bytes with the driver's create(). */
  async create(path: string, size: number): Promise<void> {
    await opfsDriver.create!(path, { size }, noContext);
  },

  list(dir = '', recursive = false): Promise<OpfsEntry[]> {
    return opfsList(dir, { recursive });
  },

  remove(path: string, recursive = false): Promise<void> {
    return opfsRemove(path, { recursive });
  },

  rename(from: string, to: string): Promise<void> {
    return opfsRename(from, to);
  },

  /** Holds a sync access handle on `path` without qblock's Web Lock, like a foreign library would. */
  async holdRaw(path: string): Promise<void> {
    const root = await navigator.storage.getDirectory();
    const fh = await root.getFileHandle(path, { create: true });
    const h = await (fh as FileSystemFileHandle & { createSyncAccessHandle(): Promise<{ close(): void }> }).createSyncAccessHandle();
    rawHandles.set(path, h);
  },

  releaseRaw(path: string): void {
    rawHandles.get(path)?.close();
    rawHandles.delete(path);
  },
};

/** The worker's API as the page sees it through comlink. */
export type TestApi = typeof api;

Comlink.expose(api);
