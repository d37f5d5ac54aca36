/**
 * The inspector's state: the engine client and its inspector, the images
 * open in the engine, which one is shown, and change notifications for the
 * views. Every engine call goes through the client API (src/client), the
 * same one a third party would use; only types come from elsewhere.
 */
import { connectEngine, connectInspector, type EngineClient, type ImageSource, type ImageSummary, type InspectorClient, type OpenOptions } from '../../src/client/index.ts';
import type { BitmapView, HostExtent, ImageCapabilities, LayerFile } from '../../src/client/inspect.ts';
import type { ImageInfo } from '../../src/core/img/info.ts';
import type { BlockdevOptions } from '../../src/core/types.ts';
import { Jobs } from './jobs.ts';

/** Where an open image came from. */
export type ImageOrigin = 'demo' | 'file' | 'url' | 'opfs';

/** An image open in the engine, with what the views need about it. */
export interface OpenImage {
  id: string;
  summary: ImageSummary;
  /** What the user calls it: a file name, a URL, an OPFS path. */
  label: string;
  origin: ImageOrigin;
  /** The OPFS path of images from the library (and the demo). */
  opfsPath?: string;
  /** The URL of images read over HTTP. */
  url?: string;
  /** qemu-img info of each layer, top first. */
  info: ImageInfo[];
  caps: ImageCapabilities;
  layers: LayerFile[];
  /** The image's dirty bitmaps, live ones included. */
  bitmaps: BitmapView[];
  /** Notes shown with the image (a backing file that was not given, say). */
  notes: string[];
  /** The user's files behind an image opened from the file picker or a drop, top of the chain first. */
  files?: File[];
}

/** What the views listen to. */
export type AppEvent = 'images' | 'current' | 'library';

/** The inspector's state and its engine. */
export class App {
  readonly engine: EngineClient;
  inspector!: InspectorClient;
  readonly jobs: Jobs;
  readonly images: OpenImage[] = [];
  current: OpenImage | undefined;
  /** A message for the next Actions tab of the library image at `path` (an action that reopened it, so its view was redrawn). */
  notice: { path: string; text: string; testid: string } | undefined;
  private readonly listeners = new Map<AppEvent, Set<() => void>>();

  /** Starts the engine worker; call ready() before using the inspector. */
  constructor(jobsRoot: HTMLElement) {
    this.engine = connectEngine();
    this.jobs = new Jobs(jobsRoot);
  }

  /** Connects the inspector queries of the engine worker. */
  async ready(): Promise<void> {
    this.inspector = await connectInspector(this.engine);
  }

  /** Calls `fn` whenever `ev` happens. */
  on(ev: AppEvent, fn: () => void): void {
    let set = this.listeners.get(ev);
    if (!set) this.listeners.set(ev, (set = new Set()));
    set.add(fn);
  }

  /** Notifies the listeners of `ev`. */
  emit(ev: AppEvent): void {
    for (const fn of this.listeners.get(ev) ?? []) fn();
  }

  /** Opens an image in the engine, gathers what the views show about it, and makes it current. */
  async open(source: ImageSource, opts: OpenOptions, meta: { label: string; origin: ImageOrigin; opfsPath?: string; url?: string; notes?: string[]; files?: File[] }): Promise<OpenImage> {
    const summary = await this.engine.open(source, opts);
    try {
      const [info, caps, layers, bitmaps] = await Promise.all([this.engine.info(summary.id, true), this.inspector.capabilities(summary.id), this.inspector.layers(summary.id), this.inspector.bitmaps(summary.id)]);
      const img: OpenImage = { id: summary.id, summary, label: meta.label, origin: meta.origin, info, caps, layers, bitmaps, notes: meta.notes ?? [] };
      if (meta.opfsPath !== undefined) img.opfsPath = meta.opfsPath;
      if (meta.url !== undefined) img.url = meta.url;
      if (meta.files !== undefined) img.files = meta.files;
      this.images.push(img);
      this.emit('images');
      this.select(img);
      return img;
    } catch (e) {
      await this.engine.close(summary.id).catch(() => undefined);
      throw e;
    }
  }

  /** Refreshes what is known about an open image (after a repair, say); `rerender` false leaves the views as they are. */
  async refresh(img: OpenImage, rerender = true): Promise<void> {
    const [info, caps, layers, bitmaps] = await Promise.all([this.engine.info(img.id, true), this.inspector.capabilities(img.id), this.inspector.layers(img.id), this.inspector.bitmaps(img.id)]);
    Object.assign(img, { info, caps, layers, bitmaps });
    // A repair or commit may have changed what the host clusters hold.
    this.layouts.delete(img);
    if (rerender && this.current === img) this.emit('current');
  }

  /** Shows `img`. */
  select(img: OpenImage | undefined): void {
    this.current = img;
    this.emit('current');
    this.emit('images');
  }

  /** Closes an image in the engine and forgets it. */
  async close(img: OpenImage): Promise<void> {
    const i = this.images.indexOf(img);
    if (i >= 0) this.images.splice(i, 1);
    try {
      await this.engine.close(img.id);
    } finally {
      if (this.current === img) this.select(this.images[Math.max(0, i - 1)]);
      else this.emit('images');
      this.emit('library');
    }
  }

  /** Closes and reopens an OPFS image read-write or read-only (the engine takes write permission only at open). */
  async reopen(img: OpenImage, readOnly: boolean): Promise<OpenImage> {
    if (img.opfsPath === undefined) throw new Error('Only images in the library can be reopened for writing');
    const path = img.opfsPath;
    await this.close(img);
    return this.open({ opfs: path }, { readOnly, waitBusyMs: 2000 }, { label: img.label, origin: img.origin, opfsPath: path, notes: img.notes });
  }

  private readonly layouts = new WeakMap<OpenImage, Map<number, Promise<HostExtent[]>>>();

  /**
   * What each host cluster of a layer holds, computed once per image and
   * layer as a cancellable job (the Tables and Hex tabs share it). A failed
   * or cancelled analysis is forgotten so it can be asked for again.
   */
  hostLayout(img: OpenImage, layer: number): Promise<HostExtent[]> {
    let m = this.layouts.get(img);
    if (!m) this.layouts.set(img, (m = new Map()));
    let p = m.get(layer);
    if (!p) {
      const mine = this.jobs.run(`Analyse host file of ${img.layers[layer]?.filename ?? img.label}`, (job) => this.inspector.hostLayout(img.id, layer, { progress: job.progress, signal: job.signal }), { unit: 'items' });
      m.set(layer, mine);
      mine.catch(() => m.delete(layer));
      p = mine;
    }
    return p;
  }

  /** The open image stored at an OPFS path, if any. */
  openAt(path: string): OpenImage | undefined {
    return this.images.find((i) => i.opfsPath === path);
  }
}

/** A layer the chain resolver can open: its label and its protocol options. */
interface ChainLayer {
  label: string;
  file: BlockdevOptions;
  /** How to probe it on its own (backing: null). */
  source: ImageSource;
  /** The user's file, for layers opened from files. */
  blob?: File;
}

/**
 * True for a backing name that may be looked up next to its image: a plain
 * relative name, never a protocol, an absolute path or a way up (names in
 * images are untrusted).
 */
export function plainName(name: string): boolean {
  return name !== '' && !name.includes(':') && !name.startsWith('/') && !name.split('/').includes('..');
}

/**
 * Opens an image whose backing files are not in OPFS (files the user picked,
 * URLs): each layer is probed alone to learn its format and backing name,
 * the backing is looked up with `find`, and the chain is opened as one
 * options tree. A backing file that cannot be found is left out, with a note.
 */
export async function openChain(app: App, top: ChainLayer, find: (name: string, of: ChainLayer) => ChainLayer | undefined, meta: { label: string; origin: ImageOrigin; url?: string }): Promise<OpenImage> {
  const notes: string[] = [];
  const files: File[] = [];
  const probe = async (l: ChainLayer): Promise<{ format: string; backing?: string }> => {
    const s = await app.engine.open(l.source, { backing: null, readOnly: true });
    try {
      const [info] = await app.engine.info(s.id);
      const out: { format: string; backing?: string } = { format: s.format };
      const b = info?.['backing-filename'];
      if (b) out.backing = b;
      return out;
    } finally {
      await app.engine.close(s.id);
    }
  };
  const build = async (l: ChainLayer, depth: number): Promise<BlockdevOptions> => {
    if (l.blob) files.push(l.blob);
    const p = await probe(l);
    const o: BlockdevOptions = { driver: p.format, file: l.file, 'read-only': true };
    if (p.backing === undefined) return o;
    const next = depth < 16 && plainName(p.backing) ? find(p.backing, l) : undefined;
    if (next) {
      o.backing = await build(next, depth + 1);
    } else {
      o.backing = null;
      notes.push(`The backing file '${p.backing}' of ${l.label} was not given, so this chain stops at ${l.label}: clusters it does not hold read as zeroes here. Open it together with its backing files to see the whole chain.`);
    }
    return o;
  };
  const options = await build(top, 0);
  const m: { label: string; origin: ImageOrigin; url?: string; notes: string[]; files?: File[] } = { label: meta.label, origin: meta.origin, notes };
  if (meta.url !== undefined) m.url = meta.url;
  if (files.length) m.files = files;
  return app.open({ options }, { readOnly: true }, m);
}

/** Opens files the user picked or dropped: overlays find their backing files among them by name. */
export async function openFiles(app: App, files: File[]): Promise<OpenImage[]> {
  const layers = files.map((f): ChainLayer => ({ label: f.name, file: { driver: 'blob', blob: f }, source: { blob: f }, blob: f }));
  const byName = new Map(layers.map((l) => [l.label, l]));
  const find = (name: string): ChainLayer | undefined => byName.get(name.split('/').pop() ?? name);
  // Files some other file names as its backing file are opened as part of that chain, not alone.
  const referenced = new Set<string>();
  if (layers.length > 1) {
    for (const l of layers) {
      const s = await app.engine.open(l.source, { backing: null, readOnly: true });
      try {
        const b = (await app.engine.info(s.id))[0]?.['backing-filename'];
        const hit = b ? find(b) : undefined;
        if (hit && hit !== l) referenced.add(hit.label);
      } finally {
        await app.engine.close(s.id);
      }
    }
  }
  const out: OpenImage[] = [];
  for (const l of layers) if (!referenced.has(l.label)) out.push(await openChain(app, l, find, { label: l.label, origin: 'file' }));
  return out;
}

/**
 * Copies the files behind a file-opened image into the library, in a
 * directory of their own so the chain's names still resolve, and opens the
 * copy: the way to change an image without touching the user's own file.
 */
export async function copyIntoLibrary(app: App, img: OpenImage): Promise<OpenImage> {
  const files = img.files ?? [];
  if (files.length === 0) throw new Error(`${img.label} was not opened from files`);
  const taken = new Set((await app.engine.list('', true)).map((e) => e.path));
  const stem = files[0]!.name.replace(/\.[^.]*$/, '') || 'image';
  let dir = `imports/${stem}`;
  for (let i = 2; taken.has(dir); i++) dir = `imports/${stem}-${i}`;
  for (const f of files) {
    await app.jobs.run(`Copy ${f.name} into the library`, (job) => app.engine.importImage({ blob: f }, `${dir}/${f.name}`, { progress: job.progress, signal: job.signal }));
  }
  app.emit('library');
  const path = `${dir}/${files[0]!.name}`;
  return app.open({ opfs: path }, { readOnly: true }, { label: path, origin: 'opfs', opfsPath: path });
}

/** Opens an image over HTTP; backing files named inside it are fetched next to it (plain names only). */
export async function openUrl(app: App, url: string): Promise<OpenImage> {
  const layer = (u: string): ChainLayer => ({ label: u, file: { driver: 'http', url: u }, source: { url: u } });
  const label = decodeURIComponent(new URL(url).pathname.split('/').pop() || url);
  return openChain(app, layer(url), (name, of) => layer(new URL(name, (of.file as { url: string }).url).href), { label, origin: 'url', url });
}
