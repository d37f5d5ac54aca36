/**
 * The engine worker's host: one Graph that owns every node of the page,
 * images opened by source (OPFS path, Blob/File, URL, blockdev options),
 * BlockBackends attached to them and handed out as comlink proxies, OPFS
 * image management, and the long operations (import, export, convert) run
 * as jobs with one progress sink and an AbortSignal each.
 *
 * This is glue: image information, maps, creation and the like are the
 * engine's (src/core/img, src/core/map.ts); the host only finds the nodes,
 * runs them in the worker and shapes the answers for structured clone.
 */
import { proxy, transfer, type ProxyMarked } from 'comlink';
import { BlockBackend } from '../core/block-backend.ts';
import type { MeasureInfo } from '../core/driver.ts';
import { BlockError, isBlockError, toBlockError } from '../core/errors.ts';
import { checkPlainName, Graph, type ImplicitOpenGate } from '../core/graph.ts';
import { checkImage, type CheckOutcome, type CheckRepair } from '../core/img/check.ts';
import { convertCopy } from '../core/img/convert.ts';
import { HintedError, imgCreate, type ImgCreateRequest } from '../core/img/create.ts';
import { pathCombine } from '../core/img/gate.ts';
import { queryImageInfo, type ImageInfo } from '../core/img/info.ts';
import { measureImage, type MeasureRequest } from '../core/img/measure.ts';
import { bdrvFlush, bdrvGetLength } from '../core/io.ts';
import { mapImage, type MapEntry, type MapOptions } from '../core/map.ts';
import type { BlockNode } from '../core/node.ts';
import { OPEN, PERM, type BlockdevOptions } from '../core/types.ts';
import { browserDrivers } from '../drivers-browser.ts';
import { usingWasm } from '../kernels/index.ts';
import { opfsCanonicalPath, opfsList, opfsRemove, opfsRename, opfsSyncAvailable, type OpfsEntry } from '../protocols/opfs.ts';
import { BackendService, proxied } from './backend-service.ts';
import { InspectService } from './inspect.ts';
import { Job, JobBackend, runJob, type ProgressSink } from './jobs.ts';
import type { AttachOptions, ChainEntry, ConvertOptions, CreateImageOptions, EngineEnv, ExportOptions, ImageSource, ImageSummary, OpenOptions, StorageReport } from './types.ts';

/** Bytes moved per request by the copy loops (import, export). */
const COPY_CHUNK = 1 << 20;
/** Pause between retries while an image is busy elsewhere. */
const BUSY_RETRY_MS = 100;

/** The protocol node at the bottom of `bs`'s file chain. */
export function protocolOf(bs: BlockNode): BlockNode {
  let n = bs;
  while (n.drv.kind !== 'protocol') {
    const next = n.file?.bs ?? n.primaryChild?.bs;
    if (!next) break;
    n = next;
  }
  return n;
}

/**
 * The gate for names found inside images opened by the worker: plain names
 * resolved next to the image in OPFS, and nothing else. Images that are not
 * in OPFS (URLs, Blobs) have no directory to resolve against, so their
 * overlays name the base explicitly in OpenOptions.backing.
 */
export const opfsGate: ImplicitOpenGate = {
  resolve(req) {
    checkPlainName(req);
    const proto = protocolOf(req.parent);
    if (proto.drv.name !== 'opfs') {
      throw new BlockError(
        'EACCES',
        `Cannot open the ${req.kind === 'backing' ? 'backing file' : 'data file'} '${req.name}' of '${req.parent.filename}': ` +
          'it is not in OPFS, so give the backing image explicitly (OpenOptions.backing)',
      );
    }
    return { driver: 'opfs', filename: opfsCanonicalPath(pathCombine(proto.filename, req.name)) };
  },
};

/** Options for a host (tests swap the drivers and the gate). */
export interface EngineHostOptions {
  /** Default: browserDrivers(). */
  drivers?: ReturnType<typeof browserDrivers>;
  /** Default: opfsGate. */
  gate?: ImplicitOpenGate;
  /** Protocol for plain names; default 'opfs'. */
  defaultProtocol?: string;
}

/** An image the host holds open for the page. */
interface HeldImage {
  node: BlockNode;
  backends: Set<BackendService>;
}

/** A BlockError carrying QEMU's hint line (qemu-img prints it after the message) keeps it in the message for the page. */
function withHint(e: unknown): BlockError {
  if (e instanceof HintedError && e.hint) return new BlockError(e.code, `${e.message}\n${e.hint}`.trimEnd(), { cause: e });
  return toBlockError(e);
}

/** True once the wasm kernels serve (false while they load, or when the JS fallback does). */
function wasmLoaded(): boolean {
  try {
    return usingWasm();
  } catch {
    return false;
  }
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/** Turns create options into qemu-img's `-o` text (commas in values doubled, QemuOpts' escape). */
export function optionText(opts: Record<string, string | number | boolean>): string {
  return Object.entries(opts)
    .map(([k, v]) => `${k}=${typeof v === 'boolean' ? (v ? 'on' : 'off') : String(v).replace(/,/g, ',,')}`)
    .join(',');
}

/** The engine worker's API object (exposed with comlink by ./index.ts). */
export class EngineHost {
  readonly graph: Graph;
  private readonly images = new Map<string, HeldImage>();

  /** Builds the host's graph. */
  constructor(opts: EngineHostOptions = {}) {
    this.graph = new Graph({ drivers: opts.drivers ?? browserDrivers(), gate: opts.gate ?? opfsGate, defaultProtocol: opts.defaultProtocol ?? 'opfs' });
  }

  /** What this worker can do (sync handles, locks, isolation, wasm kernels). */
  env(): EngineEnv {
    const g = globalThis as { crossOriginIsolated?: boolean; navigator?: { locks?: unknown } };
    return {
      syncHandles: opfsSyncAvailable(),
      locks: typeof g.navigator?.locks !== 'undefined',
      crossOriginIsolated: g.crossOriginIsolated === true,
      sharedArrayBuffer: typeof SharedArrayBuffer === 'function',
      wasmKernels: wasmLoaded(),
    };
  }

  /** navigator.storage.estimate() (and persisted()) as seen from the worker. */
  async estimate(): Promise<StorageReport> {
    const storage = (globalThis as { navigator?: { storage?: StorageManager } }).navigator?.storage;
    if (!storage?.estimate) throw new BlockError('ENOTSUP', 'navigator.storage.estimate() is not available here');
    const est = await storage.estimate();
    const out: StorageReport = { usage: est.usage ?? 0, quota: est.quota ?? 0 };
    if (typeof storage.persisted === 'function') out.persisted = await storage.persisted();
    return out;
  }

  private held(id: string): HeldImage {
    const h = this.images.get(id);
    if (!h) throw new BlockError('EINVAL', `No image with id '${id}' is open in the engine`, { node: id });
    return h;
  }

  /** The node of an open image (for in-worker callers and tests). */
  node(id: string): BlockNode {
    return this.held(id).node;
  }

  private async openOnce(source: ImageSource, opts: OpenOptions): Promise<BlockNode> {
    const isRemote = 'blob' in source || 'url' in source;
    const readOnly = opts.readOnly ?? isRemote;
    const flags = readOnly ? 0 : OPEN.RDWR;
    const extra: BlockdevOptions = { ...(opts.options ?? {}) };
    if (opts.backing !== undefined) extra.backing = opts.backing;
    if ('options' in source) {
      const o: BlockdevOptions = { ...source.options, ...extra };
      if (opts.format !== undefined) o.driver = opts.format;
      if (opts.nodeName !== undefined) o['node-name'] = opts.nodeName;
      if (o['read-only'] === undefined) o['read-only'] = readOnly;
      return this.graph.open(o, flags);
    }
    let filename: string;
    if ('opfs' in source) {
      filename = opfsCanonicalPath(source.opfs);
      extra.file = { driver: 'opfs', filename };
    } else if ('blob' in source) {
      if (!(source.blob instanceof Blob)) throw new BlockError('EINVAL', "ImageSource 'blob' must be a Blob or File");
      filename = source.blob instanceof File && source.blob.name ? source.blob.name : 'blob';
      extra.file = { driver: 'blob', blob: source.blob };
    } else if ('url' in source) {
      filename = source.url;
    } else {
      throw new BlockError('EINVAL', 'An image source is one of {opfs}, {blob}, {url} or {options}');
    }
    const o: { format?: string; readOnly: boolean; options: BlockdevOptions; nodeName?: string; flags: number } = { readOnly, options: extra, flags };
    if (opts.format !== undefined) o.format = opts.format;
    if (opts.nodeName !== undefined) o.nodeName = opts.nodeName;
    return this.graph.openImage(filename, o);
  }

  /**
   * Opens an image and keeps it open under its node name, which the result
   * carries as `id`. EBUSY when another tab or worker has it open (retried
   * for waitBusyMs when given).
   */
  async open(source: ImageSource, opts: OpenOptions = {}): Promise<ImageSummary> {
    const deadline = Date.now() + (opts.waitBusyMs ?? 0);
    let bs: BlockNode;
    for (;;) {
      try {
        bs = await this.openOnce(source, opts);
        break;
      } catch (e) {
        if (isBlockError(e, 'EBUSY') && Date.now() < deadline) {
          await sleep(BUSY_RETRY_MS);
          continue;
        }
        throw toBlockError(e);
      }
    }
    this.images.set(bs.nodeName, { node: bs, backends: new Set() });
    return this.summary(bs);
  }

  /** Describes an open image: names, format, size and backing chain. */
  async summary(bs: BlockNode): Promise<ImageSummary> {
    const chain: ChainEntry[] = [];
    for (let n = bs.backing?.bs; n; n = n.backing?.bs) chain.push({ node: n.nodeName, filename: n.filename, format: n.drv.name });
    return { id: bs.nodeName, filename: bs.filename, format: bs.drv.name, virtualSize: await bdrvGetLength(bs), readOnly: bs.readOnly, backingChain: chain };
  }

  /** Ids of the images this host holds open. */
  openImages(): string[] {
    return [...this.images.keys()];
  }

  /**
   * Creates an image at an OPFS path with any create options, exactly as
   * qemu-img create does (the engine's imgCreate: option parsing, size from
   * the backing file, backing checks).
   */
  async create(path: string, opts: CreateImageOptions = {}, progress?: ProgressSink, signal?: AbortSignal): Promise<void> {
    const filename = opfsCanonicalPath(path);
    await runJob(progress, signal, 1, async (job) => {
      const req: ImgCreateRequest = {
        filename,
        fmt: opts.format ?? 'raw',
        progress: (done, total) => {
          job.total = total;
          job.report(done);
        },
      };
      if (opts.size !== undefined) req.size = opts.size;
      if (opts.backingFile !== undefined) req.backingFile = opts.backingFile;
      if (opts.backingFmt !== undefined) req.backingFmt = opts.backingFmt;
      if (opts.options !== undefined && Object.keys(opts.options).length > 0) req.options = optionText(opts.options);
      if (opts.noBackingCheck) req.noBacking = true;
      try {
        await imgCreate(this.graph, req);
      } catch (e) {
        throw withHint(e);
      }
    });
  }

  /** Lists a directory of OPFS ('' = root) with sizes and open state. */
  list(dir = '', recursive = false): Promise<OpfsEntry[]> {
    return opfsList(dir, { recursive });
  }

  /** Removes an OPFS file (or a directory with recursive); EBUSY while open anywhere. */
  remove(path: string, recursive = false): Promise<void> {
    return opfsRemove(path, { recursive });
  }

  /** Renames an OPFS file; EBUSY while either name is open, EEXIST when the target exists. */
  rename(from: string, to: string): Promise<void> {
    return opfsRename(from, to);
  }

  /**
   * Attaches a BlockBackend to an open image and returns it as a comlink
   * proxy: read (and unless read-only, write and resize) permission, with
   * the given error policies and write cache mode.
   */
  attach(id: string, opts: AttachOptions = {}): BackendService & ProxyMarked {
    const h = this.held(id);
    const bs = h.node;
    const readOnly = opts.readOnly === true || bs.readOnly;
    const perm = readOnly ? PERM.CONSISTENT_READ : PERM.CONSISTENT_READ | PERM.WRITE | PERM.RESIZE;
    const blk = new BlockBackend(this.graph, { name: opts.name ?? '', perm, sharedPerm: PERM.ALL });
    try {
      blk.insertNode(bs);
    } catch (e) {
      void blk.close();
      throw toBlockError(e);
    }
    blk.setOnError(opts.rerror ?? 'report', opts.werror ?? 'enospc');
    if (opts.writeCache === false) blk.setEnableWriteCache(false);
    if (opts.allowWriteBeyondEof) blk.allowWriteBeyondEof = true;
    const svc = new BackendService(blk, (s) => h.backends.delete(s));
    h.backends.add(svc);
    return proxied(svc);
  }

  /** QEMU's image info for the image and, with `chain`, each backing image below it (qemu-img info --backing-chain). */
  async info(id: string, chain = false): Promise<ImageInfo[]> {
    const out: ImageInfo[] = [];
    for (let n: BlockNode | undefined = this.node(id); n; n = chain ? n.backing?.bs : undefined) out.push(await queryImageInfo(n));
    return out;
  }

  /** The allocation map (qemu-img map) of the image. */
  map(id: string, opts: MapOptions = {}): Promise<MapEntry[]> {
    return mapImage(this.node(id), opts);
  }

  /**
   * Consistency check of the image as qemu-img check reports it (QAPI's
   * ImageCheck), repairing leaks or everything when asked; ENOTSUP for
   * formats that have no check.
   */
  async check(id: string, repair?: CheckRepair): Promise<CheckOutcome> {
    const bs = this.node(id);
    return checkImage(bs, bs.filename, repair);
  }

  /**
   * Space a new image of `format` with create `options` needs (qemu-img
   * measure), for `options.size` bytes or to hold a copy of image `srcId`.
   */
  async measure(format: string, options: Record<string, string | number | boolean> = {}, srcId?: string): Promise<MeasureInfo> {
    const req: MeasureRequest = { fmt: format, source: srcId !== undefined ? this.node(srcId) : null };
    const { size, ...rest } = options;
    if (typeof size === 'number') req.size = size;
    else if (size !== undefined) rest.size = size;
    if (Object.keys(rest).length > 0) req.options = optionText(rest);
    return measureImage(this.graph, req);
  }

  /**
   * Converts an open image into a new OPFS image of another format (qemu-img
   * convert: the engine's create and copy loop, zero runs of 4 KiB and more
   * left sparse). Progress counts guest bytes; a cancelled or failed convert
   * removes the half-written target. Returns the target's size.
   */
  async convert(id: string, targetPath: string, opts: ConvertOptions = {}, progress?: ProgressSink, signal?: AbortSignal): Promise<number> {
    const bs = this.node(id);
    const target = opfsCanonicalPath(targetPath);
    const fmt = opts.format ?? 'raw';
    const total = await bdrvGetLength(bs);
    return runJob(progress, signal, total, async (job) => {
      const src = new JobBackend(this.graph, job);
      src.insertNode(bs);
      let out: BlockBackend | undefined;
      let created = false;
      try {
        const req: ImgCreateRequest = { filename: target, fmt, size: total };
        if (opts.options !== undefined && Object.keys(opts.options).length > 0) req.options = optionText(opts.options);
        await imgCreate(this.graph, req).catch((e: unknown) => Promise.reject(withHint(e)));
        created = true;
        out = await BlockBackend.open(this.graph, target, { format: fmt, resize: false, options: { discard: 'unmap' } });
        await convertCopy({
          sources: [{ blk: src, name: bs.filename }],
          target: out,
          hasZeroInit: false,
          targetIsNew: true,
          targetHasBacking: false,
          compressed: opts.compressed ?? false,
          minSparse: 8,
          numCoroutines: 8,
          inOrder: true,
          salvage: false,
          quiet: true,
          progress: (pct) => job.report(Math.round((pct / 100) * total)),
        });
        await out.flush();
        return total;
      } catch (e) {
        if (out) {
          await out.close().catch(() => undefined);
          out = undefined;
        }
        if (created) await opfsRemove(target).catch(() => undefined);
        throw toBlockError(e);
      } finally {
        await out?.close().catch(() => undefined);
        await src.close().catch(() => undefined);
      }
    });
  }

  /**
   * An open image converted to `format` as a File for a download: 'raw' is
   * streamed into the File's bytes by the browser, other formats go through
   * a temporary OPFS image (removed when the File has been made).
   */
  async exportImage(id: string, opts: ExportOptions = {}, progress?: ProgressSink, signal?: AbortSignal): Promise<File> {
    const fmt = opts.format ?? 'raw';
    const name = opts.name ?? `${this.node(id).filename.split('/').pop() ?? 'image'}.${fmt}`;
    const tmp = `.qblock-export/${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 8)}.${fmt}`;
    await this.convert(id, tmp, { format: fmt }, progress, signal);
    try {
      const f = await this.exportFile(tmp, { name });
      // Copy the bytes out before the temporary file goes: a File of a removed OPFS file cannot be read.
      return new File([await f.arrayBuffer()], name, { type: 'application/octet-stream' });
    } finally {
      await opfsRemove(tmp).catch(() => undefined);
    }
  }

  /** Flushes every open image whose storage is the OPFS file `path`, so its bytes are complete on disk. */
  private async flushImagesOn(path: string): Promise<void> {
    for (const h of this.images.values()) {
      for (let n: BlockNode | undefined = h.node; n; n = n.backing?.bs) {
        if (protocolOf(n).drv.name === 'opfs' && protocolOf(n).filename === path && !n.readOnly) await bdrvFlush(h.node);
      }
    }
  }

  /**
   * The stored bytes of an OPFS image as a File (a download of the image
   * as it is, in its own format). Images open in this worker are flushed
   * first; writing to the image later makes the File unreadable, as a
   * File of a changed file is.
   */
  async exportFile(path: string, opts: ExportOptions = {}): Promise<File> {
    const p = opfsCanonicalPath(path);
    await this.flushImagesOn(p);
    const segs = p.split('/');
    let dir = await navigator.storage.getDirectory();
    try {
      for (const s of segs.slice(0, -1)) dir = await dir.getDirectoryHandle(s);
      const fh = await dir.getFileHandle(segs[segs.length - 1]!);
      const f = await fh.getFile();
      return new File([f], opts.name ?? segs[segs.length - 1]!, { type: 'application/octet-stream' });
    } catch (e) {
      throw toBlockError(e, 'EIO');
    }
  }

  /**
   * The guest-visible bytes of an open image as a stream (what
   * `qemu-img convert -O raw` would write), read 1 MiB at a time as the
   * consumer pulls; progress counts bytes handed out.
   */
  async exportRaw(id: string, progress?: ProgressSink, signal?: AbortSignal): Promise<ReadableStream<Uint8Array>> {
    const bs = this.node(id);
    const blk = new BlockBackend(this.graph, { perm: PERM.CONSISTENT_READ, sharedPerm: PERM.ALL });
    blk.insertNode(bs);
    let total: number;
    try {
      total = await blk.getLength();
    } catch (e) {
      await blk.close().catch(() => undefined);
      throw toBlockError(e);
    }
    const job = new Job(progress, signal, total);
    let pos = 0;
    let closed = false;
    const end = async (ok: boolean): Promise<void> => {
      if (closed) return;
      closed = true;
      if (ok) job.finish();
      else job.release();
      await blk.close().catch(() => undefined);
    };
    const stream = new ReadableStream<Uint8Array>(
      {
        async pull(ctrl) {
          try {
            if (pos >= total) {
              ctrl.close();
              await end(true);
              return;
            }
            const n = Math.min(COPY_CHUNK, total - pos);
            const chunk = await blk.read(pos, n, signal ? { signal } : {});
            pos += n;
            ctrl.enqueue(chunk);
            await job.step(pos);
          } catch (e) {
            ctrl.error(toBlockError(e));
            await end(false);
          }
        },
        async cancel() {
          await end(false);
        },
      },
      { highWaterMark: 1 },
    );
    return transfer(stream, [stream as unknown as Transferable]);
  }

  /**
   * Copies a File/Blob or the resource at a URL byte for byte into a new
   * OPFS file (the image keeps its format). A failed or cancelled import
   * leaves no file behind.
   */
  async importImage(source: { blob: Blob } | { url: string }, path: string, progress?: ProgressSink, signal?: AbortSignal): Promise<number> {
    const dst = opfsCanonicalPath(path);
    const srcOpts: BlockdevOptions = 'blob' in source ? { driver: 'blob', blob: source.blob } : { driver: 'http', url: source.url };
    const src = await BlockBackend.open(this.graph, srcOpts, { readOnly: true });
    let out: BlockBackend | undefined;
    try {
      const total = await src.getLength();
      const opfs = this.graph.getDriver('opfs');
      await opfs.create!(dst, { size: 0 }, { createAndOpenFile: () => Promise.reject(new BlockError('ENOTSUP')), openImage: () => Promise.reject(new BlockError('ENOTSUP')), close: () => Promise.resolve() });
      out = await BlockBackend.open(this.graph, { driver: 'opfs', filename: dst }, { allowWriteBeyondEof: true });
      const dstBlk = out;
      await runJob(progress, signal, total, async (job) => {
        await dstBlk.truncate(total);
        for (let pos = 0; pos < total; ) {
          const n = Math.min(COPY_CHUNK, total - pos);
          const buf = await src.read(pos, n, signal ? { signal } : {});
          await dstBlk.pwrite(pos, buf);
          pos += n;
          await job.step(pos);
        }
        await dstBlk.flush();
      });
      return total;
    } catch (e) {
      if (out) {
        await out.close().catch(() => undefined);
        out = undefined;
        await opfsRemove(dst).catch(() => undefined);
      }
      throw toBlockError(e);
    } finally {
      await src.close().catch(() => undefined);
      await out?.close().catch(() => undefined);
    }
  }

  private inspectService: InspectService | undefined;

  /** The inspector's queries over this host's images (./inspect.ts), as a comlink proxy. */
  inspector(): InspectService & ProxyMarked {
    this.inspectService ??= new InspectService(this);
    return proxy(this.inspectService);
  }

  /** Closes an image: its backends first (flushed), then the node and whatever only it used. */
  async close(id: string): Promise<void> {
    const h = this.held(id);
    this.images.delete(id);
    let first: unknown;
    for (const b of [...h.backends]) {
      try {
        await b.close();
      } catch (e) {
        first ??= e;
      }
    }
    try {
      if (!h.node.readOnly) await bdrvFlush(h.node).catch(() => undefined);
      await this.graph.unref(h.node);
    } catch (e) {
      first ??= e;
    }
    if (first !== undefined) throw toBlockError(first);
  }

  /** Closes every image and backend (the page is going away); errors are collected, the first one thrown. */
  async closeAll(): Promise<void> {
    let first: unknown;
    for (const id of [...this.images.keys()]) {
      try {
        await this.close(id);
      } catch (e) {
        first ??= e;
      }
    }
    await this.graph.closeAll().catch((e: unknown) => (first ??= e));
    if (first !== undefined) throw toBlockError(first);
  }
}
