/**
 * EngineClient: the page's handle on the engine worker. It starts (or
 * adopts) the dedicated worker, registers the transfer handlers, and wraps
 * the worker's API so long operations take `{ progress, signal }` (one
 * comlink proxy per job, released by the worker when the job ends), image
 * creation asks the browser to persist storage, backends come back as
 * RemoteBlockBackends, and every image is closed when the page goes away
 * (pagehide) so its locks and handles are free for the next page.
 */
import { proxy, wrap, type Endpoint, type Remote } from 'comlink';
import type { MeasureInfo } from '../core/driver.ts';
import type { CheckOutcome, CheckRepair } from '../core/img/check.ts';
import type { ImageInfo } from '../core/img/info.ts';
import type { MapEntry, MapOptions } from '../core/map.ts';
import type { OpfsEntry } from '../protocols/opfs.ts';
import type { EngineHost } from '../worker/host.ts';
import type {
  AttachOptions,
  ConvertOptions,
  CreateImageOptions,
  EngineEnv,
  ExportOptions,
  ImageSource,
  ImageSummary,
  OpenOptions,
  ProgressCallback,
  StorageReport,
} from '../worker/types.ts';
import { RemoteBlockBackend } from './backend.ts';
import { registerEngineTransferHandlers } from './transfer.ts';

/** Progress and cancellation of one long operation. */
export interface JobOptions {
  /** Called with bytes done and total, throttled by the worker. */
  progress?: ProgressCallback;
  signal?: AbortSignal;
}

/** How to connect. */
export interface ConnectOptions {
  /** An existing engine worker (or any comlink endpoint); by default a new one is started. */
  worker?: Worker | Endpoint;
  /** Close every image on pagehide (default true in pages). */
  closeOnPagehide?: boolean;
}

/** What create() reports besides creating the image. */
export interface CreateResult {
  /** navigator.storage.persist()'s answer, undefined where the page cannot ask. */
  persisted?: boolean;
}

/** Starts the default engine worker module. */
function startWorker(): Worker {
  return new Worker(new URL('../worker/engine-worker.ts', import.meta.url), { type: 'module', name: 'qblock-engine' });
}

/** The page's API to the engine worker. */
export class EngineClient {
  readonly remote: Remote<EngineHost>;
  /** The worker, when this client started it or was given one. */
  readonly worker: Worker | undefined;
  private persistAsked: Promise<boolean | undefined> | undefined;
  private readonly onPagehide = (): void => {
    // The page is going: close everything so locks and sync handles are let go at once.
    void this.remote.closeAll().catch(() => undefined);
  };

  /** Connects to the engine (see ConnectOptions). */
  constructor(opts: ConnectOptions = {}) {
    registerEngineTransferHandlers();
    const ep = opts.worker ?? startWorker();
    this.worker = typeof Worker !== 'undefined' && ep instanceof Worker ? ep : undefined;
    this.remote = wrap<EngineHost>(ep);
    const g = globalThis as { addEventListener?: (t: string, f: () => void) => void; document?: unknown };
    if ((opts.closeOnPagehide ?? true) && g.document !== undefined && g.addEventListener) g.addEventListener('pagehide', this.onPagehide);
  }

  /** What the worker can do (sync handles, locks, isolation, wasm kernels). */
  env(): Promise<EngineEnv> {
    return this.remote.env();
  }

  /** Storage usage and quota as navigator.storage.estimate() reports them in the worker. */
  estimate(): Promise<StorageReport> {
    return this.remote.estimate();
  }

  /** Asks the browser once per page to keep this origin's storage (persist() exists only on pages). */
  requestPersistence(): Promise<boolean | undefined> {
    this.persistAsked ??= (async () => {
      const storage = (globalThis as { navigator?: { storage?: StorageManager } }).navigator?.storage;
      if (typeof storage?.persist !== 'function') return undefined;
      try {
        return await storage.persist();
      } catch {
        return undefined;
      }
    })();
    return this.persistAsked;
  }

  /** Opens an image; the summary's `id` names it in the other calls. EBUSY when another tab has it open. */
  open(source: ImageSource, opts: OpenOptions = {}): Promise<ImageSummary> {
    return this.remote.open(source, opts);
  }

  /** Creates an image in OPFS (any format and create options), asking for persistent storage first. */
  async create(path: string, opts: CreateImageOptions = {}, job: JobOptions = {}): Promise<CreateResult> {
    const persisted = await this.requestPersistence();
    await this.remote.create(path, opts, job.progress ? proxy(job.progress) : undefined, job.signal);
    return persisted === undefined ? {} : { persisted };
  }

  /** Lists an OPFS directory ('' = root). */
  list(dir = '', recursive = false): Promise<OpfsEntry[]> {
    return this.remote.list(dir, recursive);
  }

  /** Removes an OPFS image (EBUSY while open anywhere). */
  remove(path: string, recursive = false): Promise<void> {
    return this.remote.remove(path, recursive);
  }

  /** Renames an OPFS image. */
  rename(from: string, to: string): Promise<void> {
    return this.remote.rename(from, to);
  }

  /** Attaches a BlockBackend to an open image. */
  async attach(id: string, opts: AttachOptions = {}): Promise<RemoteBlockBackend> {
    return new RemoteBlockBackend(await this.remote.attach(id, opts));
  }

  /** qemu-img info of the image (and with `chain`, of its backing images). */
  info(id: string, chain = false): Promise<ImageInfo[]> {
    return this.remote.info(id, chain);
  }

  /** qemu-img map of the image. */
  map(id: string, opts: MapOptions = {}): Promise<MapEntry[]> {
    return this.remote.map(id, opts);
  }

  /** qemu-img check of the image (QAPI's ImageCheck), repairing 'leaks' or 'all' when asked. */
  check(id: string, repair?: CheckRepair): Promise<CheckOutcome> {
    return this.remote.check(id, repair);
  }

  /** qemu-img convert of an open image into a new OPFS image; resolves with its virtual size. */
  convert(id: string, targetPath: string, opts: ConvertOptions = {}, job: JobOptions = {}): Promise<number> {
    return this.remote.convert(id, targetPath, opts, job.progress ? proxy(job.progress) : undefined, job.signal);
  }

  /** An open image converted to `opts.format` (default raw) as a File, for a download. */
  exportImage(id: string, opts: ExportOptions = {}, job: JobOptions = {}): Promise<File> {
    return this.remote.exportImage(id, opts, job.progress ? proxy(job.progress) : undefined, job.signal);
  }

  /** qemu-img measure for a new image of `format`, optionally holding a copy of image `srcId`. */
  measure(format: string, options: Record<string, string | number | boolean> = {}, srcId?: string): Promise<MeasureInfo> {
    return this.remote.measure(format, options, srcId);
  }

  /** The stored bytes of an OPFS image as a File, for a download (open images are flushed first). */
  exportFile(path: string, opts: ExportOptions = {}): Promise<File> {
    return this.remote.exportFile(path, opts);
  }

  /** The guest-visible bytes of an open image as a stream, pulled 1 MiB at a time. */
  exportRaw(id: string, job: JobOptions = {}): Promise<ReadableStream<Uint8Array>> {
    return this.remote.exportRaw(id, job.progress ? proxy(job.progress) : undefined, job.signal);
  }

  /** Copies a File/Blob or URL into a new OPFS file byte for byte; returns its size. */
  importImage(source: { blob: Blob } | { url: string }, path: string, job: JobOptions = {}): Promise<number> {
    return this.remote.importImage(source, path, job.progress ? proxy(job.progress) : undefined, job.signal);
  }

  /** Closes an image and its backends. */
  close(id: string): Promise<void> {
    return this.remote.close(id);
  }

  /** Closes every image. */
  closeAll(): Promise<void> {
    return this.remote.closeAll();
  }

  /** Closes everything, then stops the worker this client started. */
  async terminate(): Promise<void> {
    const g = globalThis as { removeEventListener?: (t: string, f: () => void) => void };
    g.removeEventListener?.('pagehide', this.onPagehide);
    try {
      await this.remote.closeAll();
    } finally {
      this.worker?.terminate();
    }
  }
}

/** Starts the engine worker (or adopts `opts.worker`) and returns its client. */
export function connectEngine(opts: ConnectOptions = {}): EngineClient {
  return new EngineClient(opts);
}
