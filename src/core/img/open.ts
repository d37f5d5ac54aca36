/**
 * Opening images the way QEMU's tools do: a plain filename (probed or with
 * a format), a `json:{...}` pseudo-filename, or an option string
 * (`--image-opts driver=raw,file.filename=x`), plus the tool-level knobs
 * (cache mode, discard, copy-on-read, force-share). Lives in core so that a
 * browser front end opens images with exactly the semantics of the CLIs.
 */
import { BlockBackend } from '../block-backend.ts';
import { BlockError, toBlockError } from '../errors.ts';
import type { Graph } from '../graph.ts';
import { OPEN, PERM, type BlockdevOptions } from '../types.ts';
import { deleteMemoryStore } from '../../protocols/memory.ts';
import { createContext } from './create.ts';

/** Cache settings a cache mode name stands for (QEMU's bdrv_parse_cache_mode). */
export interface CacheMode {
  /** O_DIRECT-like: bypass the host cache. */
  direct: boolean;
  /** Every write is followed by a flush (the backend's write cache is off). */
  writethrough: boolean;
  /** Flushes are ignored (cache=unsafe). */
  noFlush: boolean;
}

/** Parses a cache mode name ('none', 'writeback', 'writethrough', 'directsync', 'unsafe'), or undefined when it is not one. */
export function parseCacheMode(mode: string): CacheMode | undefined {
  switch (mode) {
    case 'off':
    case 'none': return { direct: true, writethrough: false, noFlush: false };
    case 'directsync': return { direct: true, writethrough: true, noFlush: false };
    case 'writeback': return { direct: false, writethrough: false, noFlush: false };
    case 'unsafe': return { direct: false, writethrough: false, noFlush: true };
    case 'writethrough': return { direct: false, writethrough: true, noFlush: false };
    default: return undefined;
  }
}

/** Parses a discard mode ('ignore'/'off' or 'unmap'/'on') into "unmap enabled", or undefined when invalid (QEMU's bdrv_parse_discard_flags). */
export function parseDiscardMode(mode: string): boolean | undefined {
  if (mode === 'off' || mode === 'ignore') return false;
  if (mode === 'on' || mode === 'unmap') return true;
  return undefined;
}

/** AIO modes QEMU accepts (QEMU's bdrv_parse_aio); Node has one engine, so they only validate. */
export const AIO_MODES = ['threads', 'native', 'io_uring'] as const;

/** Generic boolean keys QEMU converts from "on"/"off" text before the block layer sees them. */
const BOOL_KEYS = new Set(['read-only', 'auto-read-only', 'force-share', 'direct', 'no-flush']);

/** Warnings the option parser emits (QEMU's deprecated short-form booleans). */
export type WarnFn = (msg: string) => void;

/**
 * Parses a QemuOpts option string (`a=1,b.c=x`) into nested blockdev
 * options, as `--image-opts` and `open -o` do. Only values may contain a
 * comma, written `,,`; a name runs to the next '=' or ','. A bare name means
 * name=on, with QEMU's deprecation warning.
 */
export function parseOptionString(text: string, warn: WarnFn = () => undefined): BlockdevOptions {
  const flat: Record<string, string> = {};
  let i = 0;
  while (i < text.length) {
    let name = '';
    while (i < text.length && text[i] !== '=' && text[i] !== ',') name += text[i++];
    let value: string;
    if (text[i] === '=') {
      i++;
      value = '';
      while (i < text.length) {
        if (text[i] === ',') {
          if (text[i + 1] !== ',') break;
          i++;
        }
        value += text[i++];
      }
    } else {
      warn(`short-form boolean option '${name}' deprecated\nPlease use ${name}=on instead`);
      value = 'on';
    }
    flat[name] = value;
    if (text[i] === ',') i++;
  }
  return crumple(flat);
}

/** Turns dotted keys into nested objects (QEMU's qdict_crumple), converting generic booleans. */
export function crumple(flat: Record<string, unknown>): BlockdevOptions {
  const out: Record<string, unknown> = {};
  for (const [key, value] of Object.entries(flat)) {
    const parts = key.split('.');
    let node: Record<string, unknown> = out;
    for (let i = 0; i < parts.length - 1; i++) {
      const p = parts[i]!;
      const next = node[p];
      if (next === undefined) node[p] = {};
      else if (typeof next !== 'object' || next === null) throw new BlockError('EINVAL', `Cannot mix scalar and non-scalar keys: '${parts.slice(0, i + 1).join('.')}'`);
      node = node[p] as Record<string, unknown>;
    }
    const last = parts[parts.length - 1]!;
    if (typeof node[last] === 'object' && node[last] !== null) throw new BlockError('EINVAL', `Cannot mix scalar and non-scalar keys: '${key}'`);
    node[last] = BOOL_KEYS.has(last) && typeof value === 'string' ? boolText(key, value) : value;
  }
  return listify(out) as BlockdevOptions;
}

/** Dictionaries whose keys are exactly 0..n-1 become lists, as in qdict_crumple ("inject-error.0.event"). */
function listify(v: unknown): unknown {
  if (v === null || typeof v !== 'object' || Array.isArray(v)) return v;
  const o = v as Record<string, unknown>;
  const keys = Object.keys(o);
  for (const k of keys) o[k] = listify(o[k]);
  if (keys.length > 0 && keys.every((k) => /^(0|[1-9][0-9]*)$/.test(k))) {
    const n = keys.length;
    if (keys.every((k) => Number(k) < n)) return Array.from({ length: n }, (_, i) => o[String(i)]);
  }
  return o;
}

function boolText(key: string, v: string): boolean | string {
  if (v === 'on' || v === 'yes' || v === 'true') return true;
  if (v === 'off' || v === 'no' || v === 'false') return false;
  throw new BlockError('EINVAL', `Parameter '${key}' expects 'on' or 'off'`);
}

/** Flattens nested options to dotted keys (QEMU's qdict_flatten), the inverse of crumple. */
export function flatten(opts: Record<string, unknown>, prefix = '', out: Record<string, unknown> = {}): Record<string, unknown> {
  for (const [k, v] of Object.entries(opts)) {
    const key = prefix ? `${prefix}.${k}` : k;
    if (v !== null && typeof v === 'object' && !Array.isArray(v)) flatten(v as Record<string, unknown>, key, out);
    else out[key] = v;
  }
  return out;
}

/** Parses a `json:{...}` pseudo-filename into blockdev options, or returns undefined for other names. */
export function parseJsonFilename(filename: string): BlockdevOptions | undefined {
  if (!filename.startsWith('json:')) return undefined;
  let parsed: unknown;
  try {
    parsed = JSON.parse(filename.slice(5));
  } catch (e) {
    throw new BlockError('EINVAL', `Could not parse the JSON options: ${e instanceof Error ? e.message : String(e)}`);
  }
  if (parsed === null || typeof parsed !== 'object' || Array.isArray(parsed)) {
    throw new BlockError('EINVAL', 'Invalid JSON object given');
  }
  // Nested and dotted spellings mean the same; normalise through the flat form.
  const flat = flatten(parsed as Record<string, unknown>);
  for (const [k, v] of Object.entries(flat)) if (typeof v === 'number' || typeof v === 'boolean') flat[k] = v;
  return crumple(flat);
}

/** How to open one image. */
export interface ImageOpenSpec {
  /** File name, `json:{...}`, or (with imageOpts) an option string. */
  filename?: string;
  /** The filename is a QemuOpts option string (`--image-opts`). */
  imageOpts?: boolean;
  format?: string;
  readOnly?: boolean;
  /** Share every permission, so others may write meanwhile (`-U`). */
  forceShare?: boolean;
  /** Cache mode name; undefined keeps writeback. */
  cache?: string;
  /** Enable discard (QEMU's BDRV_O_UNMAP). */
  unmap?: boolean;
  copyOnRead?: boolean;
  /** Open without the backing file. */
  noBacking?: boolean;
  /** More blockdev options merged into the format node's (qemu-io `open -o`). */
  options?: BlockdevOptions;
  /**
   * Open a temporary qcow2 overlay on top of the image and use that (QEMU's
   * snapshot=on, qemu-io -s): writes go to the overlay and vanish at close.
   */
  snapshot?: boolean;
  /** AIO engine name ('threads', 'native', 'io_uring'); only validated. */
  aio?: string;
  /** Take the resize permission too (qemu-img resize). */
  resize?: boolean;
  /** Receives warnings such as "probing guessed raw". */
  onWarning?: (msg: string) => void;
  /** Receives the option parser's warnings (deprecated short-form booleans) when they print differently; defaults to onWarning. */
  onOptionWarning?: (msg: string) => void;
}

/**
 * Opens an image and returns a backend on it, with QEMU's semantics for
 * json: names, option strings and cache modes. Throws BlockError with
 * QEMU's message; callers add their tool's prefix.
 */
export async function openBackend(graph: Graph, spec: ImageOpenSpec): Promise<BlockBackend> {
  if (spec.snapshot) return openWithTempOverlay(graph, spec);
  let flags = spec.readOnly ? 0 : OPEN.RDWR;
  let writethrough = false;
  const generic: BlockdevOptions = {};
  if (spec.cache !== undefined) {
    const c = parseCacheMode(spec.cache);
    if (!c) throw new BlockError('EINVAL', `Invalid cache option: ${spec.cache}`);
    writethrough = c.writethrough;
    if (c.direct || c.noFlush) generic.cache = { direct: c.direct, 'no-flush': c.noFlush };
  }
  if (spec.unmap) flags |= OPEN.UNMAP;
  if (spec.copyOnRead) flags |= OPEN.COPY_ON_READ;
  if (spec.noBacking) flags |= OPEN.NO_BACKING;
  if (spec.forceShare) generic['force-share'] = true;

  const prevWarn = graph.onWarning;
  // QEMU warns about a guessed raw format only when the image is opened writable (raw_open).
  graph.onWarning = spec.onWarning && !spec.readOnly ? spec.onWarning : () => undefined;
  let blk: BlockBackend;
  try {
    let target: string | BlockdevOptions;
    if (spec.imageOpts) {
      target = { ...parseOptionString(spec.filename ?? '', spec.onOptionWarning ?? spec.onWarning), ...generic, ...(spec.options ?? {}) };
    } else if (spec.filename?.startsWith('json:')) {
      const j = parseJsonFilename(spec.filename)!;
      target = { ...j, ...generic, ...(spec.options ?? {}) };
      if (spec.format !== undefined) target.driver = spec.format;
    } else if (spec.filename === undefined) {
      target = { ...generic, ...(spec.options ?? {}) };
      if (spec.format !== undefined) target.driver = spec.format;
    } else {
      target = spec.filename;
    }
    if (typeof target !== 'string') {
      if (target.driver === undefined && target.file === undefined && target.filename === undefined) {
        throw new BlockError('EINVAL', 'Must specify either driver or file');
      }
      if (target.driver === undefined && typeof target.file === 'string' && !graph.findNode(target.file)) {
        // The file child is opened first, and a string names an existing node (QEMU's bdrv_lookup_bs).
        throw new BlockError('ENOENT', `Cannot find device='${target.file}' nor node-name='${target.file}'`);
      }
      if (target.driver === undefined && target.filename === undefined && typeof target.file === 'object') {
        // Only the protocol is given: probe the format on top of it, like bdrv_open with a bare file child.
        const file = target.file;
        const { file: _f, ...rest } = target;
        target = { ...rest, filename: String(file.filename ?? '') };
        target.file = file;
      }
    }
    if (typeof target !== 'string') target = withProtocolDrivers(graph, target);
    if (spec.aio === 'native' && !(spec.cache && parseCacheMode(spec.cache)?.direct)) {
      // file-posix's check; Node has one I/O engine, but the option's rules stay QEMU's.
      throw new BlockError('EINVAL', 'aio=native was specified, but it requires cache.direct=on, which was not specified.');
    }
    if (spec.copyOnRead && spec.readOnly) throw new BlockError('EINVAL', "Can't use copy-on-read on read-only device");
    const requested = (flags & OPEN.RDWR) !== 0;
    const openOpts = typeof target === 'string'
      ? { format: spec.format, readOnly: !requested, flags, options: { ...generic, ...(spec.options ?? {}) }, resize: spec.resize ?? true }
      : { readOnly: !requested, flags, resize: spec.resize ?? true };
    blk = await BlockBackend.open(graph, target, openOpts);
    const bs = blk.bs!;
    if (requested && bs.readOnly && !(bs.openFlags & OPEN.AUTO_RDONLY)) {
      // QEMU's tools take the write permission from the flags they asked for, so a
      // read-only=on inside the options is a conflict, not a silent downgrade.
      await blk.close();
      throw new BlockError('EPERM', 'Block node is read-only');
    }
  } catch (e) {
    throw toBlockError(e);
  } finally {
    graph.onWarning = prevWarn;
  }
  if (writethrough) blk.setEnableWriteCache(false);
  // QEMU applies rerror/werror only for guest devices; the tools' requests just fail.
  blk.setOnError('report', 'report');
  return blk;
}

/**
 * Gives storage children (file, data-file, a filter's image) that name no driver their protocol
 * driver, as QEMU opens those children as protocols (never probing a format
 * inside them): the prefix's protocol, or the graph's default for plain names.
 */
function withProtocolDrivers(graph: Graph, opts: BlockdevOptions): BlockdevOptions {
  const out: BlockdevOptions = { ...opts };
  // blkdebug's and blkverify's images are protocol-level children too.
  for (const key of ['file', 'data-file', 'image', 'test', 'raw'] as const) {
    const child = out[key];
    if (child === undefined || typeof child !== 'object' || child === null) continue;
    const c = { ...(child as BlockdevOptions) };
    if (c.driver === undefined && typeof c.filename === 'string') {
      const name = c.filename;
      const colon = name.indexOf(':');
      const slash = name.indexOf('/');
      const prefix = colon > 0 && (slash < 0 || colon < slash) ? name.slice(0, colon) : undefined;
      const drv = prefix !== undefined ? graph.findProtocol(prefix) : graph.drivers.get(graph.defaultProtocol);
      if (drv) {
        c.driver = drv.name;
        if (drv.parseFilename) {
          const parsed: Record<string, unknown> = {};
          drv.parseFilename(name, parsed);
          Object.assign(c, parsed);
        }
      }
    }
    out[key] = withProtocolDrivers(graph, c);
  }
  return out;
}

let tempCounter = 0;

/**
 * QEMU's bdrv_append_temp_snapshot: the image is opened read-only, like a
 * backing file, and a new qcow2 image of the same size is put on top of it.
 * The overlay lives in a private memory store whose name is forgotten as
 * soon as it is open, so it disappears with the node (QEMU unlinks its
 * temporary file the same way).
 */
async function openWithTempOverlay(graph: Graph, spec: ImageOpenSpec): Promise<BlockBackend> {
  const qcow2 = graph.drivers.get('qcow2');
  const mem = graph.findProtocol('memory');
  if (!qcow2?.create || !mem) throw new BlockError('ENOTSUP', "snapshot mode needs the 'qcow2' format and the 'memory' protocol, which this graph lacks");
  const base = await openBackend(graph, { ...spec, snapshot: false, readOnly: true });
  const baseBs = base.bs!;
  baseBs.refcnt++;
  await base.close();
  const name = `memory:qblock-snapshot-${++tempCounter}-${Math.random().toString(36).slice(2)}`;
  try {
    const size = baseBs.totalBytes;
    await qcow2.create(name, { size }, createContext(graph));
    const rw = !spec.readOnly;
    const overlay = await graph.open({ driver: 'qcow2', file: { driver: mem.name, filename: name }, backing: baseBs.nodeName }, (rw ? OPEN.RDWR : 0) | (spec.unmap ? OPEN.UNMAP : 0));
    const blk = new BlockBackend(graph, { perm: PERM.CONSISTENT_READ | (rw ? PERM.WRITE | PERM.RESIZE : 0), sharedPerm: PERM.ALL });
    try {
      blk.insertNode(overlay);
    } finally {
      await graph.unref(overlay);
    }
    blk.setOnError('report', 'report');
    return blk;
  } finally {
    deleteMemoryStore(name.slice('memory:'.length));
    await graph.unref(baseBs);
  }
}

/** Requests `perm` in addition to what the backend holds (QEMU's blk_set_perm in qemu-io's command()). */
export function addBackendPerm(blk: BlockBackend, perm: number): void {
  const cur = blk.getPerm();
  if ((perm & ~cur.perm) === 0) return;
  blk.setPerm(cur.perm | perm, cur.sharedPerm);
}

export { PERM };
