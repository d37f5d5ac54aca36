/**
 * The node graph (QEMU's block.c): a driver registry, opening nodes from
 * blockdev-style options or from a filename with probing, node names, the
 * gate through which names found inside images are opened, filter insertion,
 * node replacement, reopen transactions and closing in dependency order.
 */
import { bdrvReleaseNamedDirtyBitmaps } from './dirty-bitmap.ts';
import { BdrvChild, nodeParent, PermUpdate, childPermsFor, type ChildParent } from './child.ts';
import type { BlockDriver, ReopenState } from './driver.ts';
import { BlockError, isBlockError, toBlockError } from './errors.ts';
import { bdrvDrainedBegin, bdrvDrainedEnd, bdrvFlush, bdrvGetLength, bdrvPreadv, refreshTotalBytes } from './io.ts';
import { BlockNode } from './node.ts';
import { OPEN, PERM, ROLE, type BlockdevOptions, type DetectZeroes } from './types.ts';
import { loadKernels } from '../kernels/index.ts';

/** QEMU's BLOCK_PROBE_BUF_SIZE: how much of a file format probing reads. */
export const PROBE_BUF_SIZE = 2048;

/** Keys every node understands; the rest belong to the driver. */
const GENERIC_KEYS = new Set(['driver', 'node-name', 'read-only', 'auto-read-only', 'force-share', 'detect-zeroes', 'discard', 'cache', 'file', 'backing', 'data-file', 'filename']);

/** Where a name found inside an image is about to be opened. */
export interface ImplicitOpenRequest {
  kind: 'backing' | 'data-file';
  /** The name exactly as the image stores it. */
  name: string;
  /** Format recorded next to the name, if any. */
  format?: string;
  /** The image that names it. */
  parent: BlockNode;
}

/**
 * Decides whether and how names found inside images are opened (imago's
 * ImplicitOpenGate). Returns blockdev options for the protocol node to open,
 * or throws to refuse.
 */
export interface ImplicitOpenGate {
  resolve(req: ImplicitOpenRequest): BlockdevOptions;
}

/** A gate that refuses everything: the safe default for untrusted images. */
export const denyAllGate: ImplicitOpenGate = {
  resolve(req) {
    throw new BlockError('EACCES', `Opening the ${req.kind === 'backing' ? 'backing file' : 'data file'} '${req.name}' of '${req.parent.filename}' is not allowed`);
  },
};

/** True when `name` starts with a protocol prefix (QEMU's path_has_protocol: a colon before any slash). */
export function pathHasProtocol(name: string): boolean {
  const colon = name.indexOf(':');
  if (colon <= 0) return false;
  const slash = name.indexOf('/');
  return slash < 0 || colon < slash;
}

/** Rejects names that are JSON specs or carry a protocol prefix; the gates use it before anything is resolved. */
export function checkPlainName(req: ImplicitOpenRequest): void {
  if (req.name.startsWith('json:') || pathHasProtocol(req.name)) {
    throw new BlockError('EACCES', `Refusing to open ${req.kind === 'backing' ? 'backing file' : 'data file'} '${req.name}': only plain file names are allowed inside images`);
  }
  if (req.name.includes('\0')) throw new BlockError('EINVAL', 'Image names cannot contain NUL bytes');
}

/** Options for Graph.openImage. */
export interface OpenImageOptions {
  /** Format driver name; probed when absent. */
  format?: string;
  readOnly?: boolean;
  /** Extra options merged into the format node's options. */
  options?: BlockdevOptions;
  /** Open without the backing file (QEMU's BDRV_O_NO_BACKING). */
  noBacking?: boolean;
  nodeName?: string;
  /** Extra open flags (OPEN.*). */
  flags?: number;
}

/** Options for reopen. */
export interface ReopenOptions {
  readOnly?: boolean;
  /** Driver options to change (validated by the driver's reopenPrepare). */
  options?: Record<string, unknown>;
}

const NODE_NAME_RE = /^[A-Za-z][A-Za-z0-9_.-]*$/;

/** Ensures node names follow QEMU's id_wellformed rules. */
export function validateNodeName(name: string): void {
  if (!NODE_NAME_RE.test(name)) throw new BlockError('EINVAL', `Invalid node-name: '${name}'`);
  if (name.length > 31) throw new BlockError('EINVAL', 'Node name too long');
}

export class Graph {
  readonly drivers = new Map<string, BlockDriver>();
  readonly nodes = new Map<string, BlockNode>();
  gate: ImplicitOpenGate;
  /** Protocol used for plain file names ('file' in Node, 'opfs' in the browser). */
  defaultProtocol: string;
  /** Warnings QEMU prints (e.g. when probing guessed raw). */
  onWarning: (msg: string) => void = () => undefined;
  /**
   * Where a node reports errors that happen while it closes (QEMU's
   * error_report during bdrv_close): a CLI prints them as "<program>:
   * <message>" and the close goes on like QEMU's. Without a listener the
   * close rejects with them instead, so they never vanish.
   */
  onError: ((msg: string) => void) | undefined;
  private autoNameCounter = 0;

  constructor(opts: { drivers?: BlockDriver[]; gate?: ImplicitOpenGate; defaultProtocol?: string } = {}) {
    this.gate = opts.gate ?? denyAllGate;
    this.defaultProtocol = opts.defaultProtocol ?? 'file';
    for (const d of opts.drivers ?? []) this.registerDriver(d);
  }

  /** Adds a driver; later registrations of the same name replace earlier ones. */
  registerDriver(drv: BlockDriver): void {
    this.drivers.set(drv.name, drv);
  }

  /** The driver with this format name, or ENOENT-like EINVAL with QEMU's message. */
  getDriver(name: string): BlockDriver {
    const d = this.drivers.get(name);
    if (!d) throw new BlockError('EINVAL', `Unknown driver '${name}'`);
    return d;
  }

  /** Driver for a protocol prefix such as 'http' or 'memory'. */
  findProtocol(prefix: string): BlockDriver | undefined {
    for (const d of this.drivers.values()) if (d.protocolNames?.includes(prefix)) return d;
    return undefined;
  }

  /** A node by name. */
  findNode(name: string): BlockNode | undefined {
    return this.nodes.get(name);
  }

  private newNodeName(requested: unknown): { name: string; auto: boolean } {
    if (requested !== undefined) {
      if (typeof requested !== 'string') throw new BlockError('EINVAL', "Parameter 'node-name' expects a string");
      validateNodeName(requested);
      if (this.nodes.has(requested)) throw new BlockError('EINVAL', `Duplicate nodes with node-name='${requested}'`);
      return { name: requested, auto: false };
    }
    let name: string;
    do name = `#block${String(this.autoNameCounter++).padStart(3, '0')}`;
    while (this.nodes.has(name));
    return { name, auto: true };
  }

  /**
   * Opens a node from blockdev-style options (QEMU's bdrv_open). `file`,
   * `backing` and `data-file` may be nested options or names of existing nodes.
   * Without `driver`, `filename` is opened with probing like openImage().
   */
  async open(options: BlockdevOptions, flags = 0): Promise<BlockNode> {
    if (options.driver === undefined) {
      if (typeof options.filename !== 'string') throw new BlockError('EINVAL', "Parameter 'driver' is required");
      const { filename, ...rest } = options;
      return this.openImage(filename, { options: rest, flags });
    }
    const drv = this.getDriver(String(options.driver));
    return this.openWithDriver(drv, options, flags);
  }

  private parseGeneric(options: BlockdevOptions, flags: number): { flags: number; detectZeroes: DetectZeroes; unmap: boolean } {
    if (options['read-only'] === true) flags &= ~OPEN.RDWR;
    else if (options['read-only'] === false) flags |= OPEN.RDWR;
    if (options['auto-read-only'] === true) flags |= OPEN.AUTO_RDONLY;
    const cache = options.cache;
    if (cache?.direct) flags |= OPEN.NOCACHE;
    if (cache?.['no-flush']) flags |= OPEN.NO_FLUSH;
    let unmap = (flags & OPEN.UNMAP) !== 0;
    const discard = options.discard as unknown;
    if (discard !== undefined) {
      if (discard === 'ignore' || discard === 'off') unmap = false;
      else if (discard === 'unmap' || discard === 'on') unmap = true;
      else throw new BlockError('EINVAL', 'Invalid discard option');
    }
    if (unmap) flags |= OPEN.UNMAP;
    else flags &= ~OPEN.UNMAP;
    const dz = (options['detect-zeroes'] ?? 'off') as unknown;
    if (dz !== 'off' && dz !== 'on' && dz !== 'unmap') {
      throw new BlockError('EINVAL', `Parameter 'detect-zeroes' does not accept value '${String(dz)}'`);
    }
    if (dz === 'unmap' && !unmap) {
      throw new BlockError('EINVAL', 'setting detect-zeroes to unmap is not allowed without setting discard operation to unmap');
    }
    if (options['force-share'] === true && flags & OPEN.RDWR) {
      throw new BlockError('EINVAL', 'force-share=on can only be used with read-only images');
    }
    return { flags, detectZeroes: dz, unmap };
  }

  private async openWithDriver(drv: BlockDriver, options: BlockdevOptions, flags: number): Promise<BlockNode> {
    // Drivers' hot paths call the wasm kernels once loaded; loading here means no node ever runs on the JS references by accident.
    await loadKernels();
    const g = this.parseGeneric(options, flags);
    const { name, auto } = this.newNodeName(options['node-name']);
    const driverOpts: Record<string, unknown> = {};
    for (const [k, v] of Object.entries(options)) {
      // Child specs ride along so drivers can open them; the rest of the generic keys are handled here.
      if (k === 'filename' || k === 'file' || k === 'data-file' || !GENERIC_KEYS.has(k)) driverOpts[k] = v;
    }
    if (driverOpts.filename !== undefined && drv.kind !== 'protocol' && drv.parseFilename === undefined) {
      delete driverOpts.filename;
    }
    const known = new Set(['filename', 'file', 'data-file', ...(drv.runtimeOptions ?? []).map((o) => o.name)]);
    for (const k of Object.keys(driverOpts)) {
      if (!known.has(k)) {
        throw new BlockError(
          'EINVAL',
          drv.kind === 'protocol' ? `Block protocol '${drv.name}' doesn't support the option '${k}'` : `Block format '${drv.name}' does not support the option '${k}'`,
        );
      }
    }
    if (g.flags & OPEN.COPY_ON_READ && !(g.flags & OPEN.RDWR)) {
      throw new BlockError('EINVAL', "Can't use copy-on-read on read-only device");
    }
    const bs = new BlockNode(this, drv, name, auto, g.flags, { ...options, 'node-name': name });
    bs.readOnlyExplicit = options['read-only'] === true;
    bs.detectZeroes = g.detectZeroes;
    bs.discardUnmap = g.unmap;
    if (typeof options.filename === 'string') bs.filename = options.filename;
    this.nodes.set(name, bs);
    try {
      if (g.flags & OPEN.COPY_ON_READ) bs.copyOnRead++;
      await drv.open(bs, driverOpts, g.flags);
      if (!bs.filename && bs.file) bs.filename = bs.file.bs.filename;
      this.refreshLimits(bs);
      await refreshTotalBytes(bs);
      if (drv.supportsBacking && !(g.flags & OPEN.NO_BACKING) && options.backing !== null) {
        await this.openBacking(bs, options.backing);
      }
      return bs;
    } catch (e) {
      await this.closeNode(bs).catch(() => undefined);
      throw toBlockError(e, 'EIO', name);
    }
  }

  /** Opens or attaches the backing child (QEMU's bdrv_open_backing_file), using the gate for names from the image. */
  async openBacking(bs: BlockNode, spec?: BlockdevOptions | string | null): Promise<void> {
    if (spec === null) return;
    if (spec === undefined) {
      if (!bs.backingFile) return;
      const req: ImplicitOpenRequest = { kind: 'backing', name: bs.backingFile, parent: bs };
      if (bs.backingFormat) req.format = bs.backingFormat;
      const fileOpts = this.gate.resolve(req);
      const fmt = bs.backingFormat || undefined;
      let node: BlockNode;
      try {
        node = await this.openImage(String(fileOpts.filename ?? ''), { format: fmt, readOnly: true, options: fileOpts.driver ? { file: fileOpts } : {} });
      } catch (e) {
        const be = toBlockError(e);
        throw new BlockError(be.code, `Could not open backing file: ${be.message}`, { node: bs.nodeName, cause: e });
      }
      bs.fullBackingFilename = node.filename;
      this.attachChild(bs, node, 'backing', ROLE.COW);
      return;
    }
    await this.openChild(bs, spec, 'backing', ROLE.COW, false);
  }

  /**
   * Opens (or references) a child and attaches it under `parent` with `role`
   * (QEMU's bdrv_open_child). Children are read-only unless the parent is
   * writable and the role is not COW.
   */
  async openChild(parent: BlockNode, spec: BlockdevOptions | string | undefined, name: string, role: number, allowNone = false): Promise<BdrvChild | null> {
    if (spec === undefined) {
      if (allowNone) return null;
      throw new BlockError('EINVAL', `A block device must be specified for "${name}"`);
    }
    let node: BlockNode;
    if (typeof spec === 'string') {
      // A string child is a reference to an existing node (QEMU's bdrv_lookup_bs), never a file name.
      const existing = this.nodes.get(spec);
      if (!existing) throw new BlockError('ENOENT', `Cannot find device='${spec}' nor node-name='${spec}'`);
      node = existing;
      node.refcnt++;
    } else if (spec.driver === undefined && typeof spec.filename === 'string' && !(role & ROLE.COW)) {
      // Storage children without a driver are protocol nodes chosen by the filename, never probed (QEMU's BDRV_O_PROTOCOL).
      const { filename, ...rest } = spec;
      node = await this.openProtocol(filename, this.childFlags(parent, role, spec), rest);
    } else {
      node = await this.open(spec, this.childFlags(parent, role, spec));
    }
    try {
      return this.attachChild(parent, node, name, role);
    } catch (e) {
      await this.unref(node).catch(() => undefined);
      throw e;
    }
  }

  private childFlags(parent: BlockNode, role: number, spec?: BlockdevOptions): number {
    let f = parent.openFlags & ~(OPEN.NO_BACKING | OPEN.COPY_ON_READ | OPEN.PROTOCOL);
    if (role & ROLE.COW) f &= ~OPEN.RDWR;
    if (spec && spec['read-only'] === true) f &= ~OPEN.RDWR;
    return f;
  }

  /** Attaches `child` under `parent` as edge `name`, checking permissions across the graph; the child's reference moves to the edge. */
  attachChild(parent: BlockNode, child: BlockNode, name: string, role: number): BdrvChild {
    if (this.isAncestor(child, parent)) throw new BlockError('EINVAL', `Making '${child.nodeName}' a ${name} child of '${parent.nodeName}' would create a cycle`);
    const c = new BdrvChild(name, child, nodeParent(parent), role, 0, PERM.ALL);
    const u = new PermUpdate();
    const cum = u.cumulative(parent);
    const want = childPermsFor(parent, c, cum.perm, cum.shared, !parent.readOnly);
    c.perm = want.perm;
    c.sharedPerm = want.shared;
    u.addEdge(c);
    u.apply();
    child.parents.push(c);
    parent.children.push(c);
    if (name === 'file') parent.file = c;
    else if (name === 'backing') parent.backing = c;
    return c;
  }

  /** Attaches a non-node user (BlockBackend, job) to `bs` with the given permissions. */
  attachRoot(bs: BlockNode, parent: ChildParent, name: string, perm: number, shared: number): BdrvChild {
    const c = new BdrvChild(name, bs, parent, ROLE.DATA | ROLE.METADATA, perm, shared);
    new PermUpdate().addEdge(c).apply();
    bs.parents.push(c);
    bs.refcnt++;
    return c;
  }

  /** Changes the permissions an edge takes and shares, or throws leaving them unchanged. */
  setPerm(c: BdrvChild, perm: number, shared: number): void {
    new PermUpdate().setEdge(c, perm, shared).apply();
  }

  /** Removes an edge and drops the reference it held (QEMU's bdrv_unref_child / bdrv_root_unref_child). */
  async detachChild(c: BdrvChild): Promise<void> {
    if (c.frozen) throw new BlockError('EPERM', `Cannot remove frozen '${c.name}' link`);
    const bs = c.bs;
    const idx = bs.parents.indexOf(c);
    if (idx >= 0) bs.parents.splice(idx, 1);
    const p = c.parent.node;
    if (p) {
      const i = p.children.indexOf(c);
      if (i >= 0) p.children.splice(i, 1);
      if (p.file === c) p.file = null;
      if (p.backing === c) p.backing = null;
    }
    // Dropping a user can only loosen constraints below; recompute quietly.
    try { new PermUpdate().removeEdge(c).apply(); } catch { /* cannot fail when permissions only shrink */ }
    this.recomputeBelow(bs);
    await this.unref(bs);
  }

  private recomputeBelow(bs: BlockNode): void {
    const u = new PermUpdate();
    const cum = u.cumulative(bs);
    for (const ch of bs.children) {
      const want = childPermsFor(bs, ch, cum.perm, cum.shared, !bs.readOnly);
      u.setEdge(ch, want.perm, want.shared);
    }
    try { u.apply(); } catch { /* shrinking */ }
  }

  private isAncestor(maybeAncestor: BlockNode, of: BlockNode): boolean {
    if (maybeAncestor === of) return true;
    for (const c of maybeAncestor.children) if (this.isAncestor(c.bs, of)) return true;
    return false;
  }

  /** Drops a reference; closes the node and then its children when the last one goes. */
  async unref(bs: BlockNode): Promise<void> {
    if (--bs.refcnt > 0) return;
    await this.closeNode(bs);
  }

  private async closeNode(bs: BlockNode): Promise<void> {
    if (bs.closing) return;
    await bdrvDrainedBegin(bs).catch(() => undefined);
    // QEMU's bdrv_close flushes before the driver closes, and ignores the result: what the driver
    // then writes (bitmaps, the clean bit) follows a durable image, and its own errors are its to report.
    if (!bs.readOnly) await bdrvFlush(bs).catch(() => undefined);
    let first: unknown;
    try {
      await bs.drv.close?.(bs);
    } catch (e) { first = e; }
    bdrvReleaseNamedDirtyBitmaps(bs);
    bs.closing = true;
    for (const c of [...bs.children].reverse()) {
      try { await this.detachChild(c); } catch (e) { first ??= e; }
    }
    bdrvDrainedEnd(bs);
    if (this.nodes.get(bs.nodeName) === bs) this.nodes.delete(bs.nodeName);
    if (first !== undefined) throw toBlockError(first);
  }

  /** Merges limits from data children and lets the driver adjust them (QEMU's bdrv_refresh_limits). */
  refreshLimits(bs: BlockNode): void {
    const bl = bs.bl;
    for (const c of bs.children) {
      if (!(c.role & (ROLE.DATA | ROLE.FILTERED | ROLE.COW))) continue;
      const cb = c.bs.bl;
      bl.optTransfer = Math.max(bl.optTransfer, cb.optTransfer);
      if (cb.maxTransfer) bl.maxTransfer = bl.maxTransfer ? Math.min(bl.maxTransfer, cb.maxTransfer) : cb.maxTransfer;
      bl.minMemAlignment = Math.max(bl.minMemAlignment, cb.minMemAlignment);
      bl.optMemAlignment = Math.max(bl.optMemAlignment, cb.optMemAlignment);
    }
    bs.drv.refreshLimits?.(bs);
  }

  /** Opens a protocol node for `filename` (prefix-selected or the default protocol). */
  async openProtocol(filename: string, flags: number, extra: BlockdevOptions): Promise<BlockNode> {
    let drv: BlockDriver | undefined;
    const opts: Record<string, unknown> = { ...extra };
    if (pathHasProtocol(filename)) {
      const prefix = filename.slice(0, filename.indexOf(':'));
      drv = this.findProtocol(prefix);
      if (!drv) throw new BlockError('EINVAL', `Unknown protocol '${prefix}'`);
    } else {
      drv = this.getDriver(this.defaultProtocol);
    }
    if (drv.parseFilename) drv.parseFilename(filename, opts);
    else opts.filename = filename;
    opts.driver = drv.name;
    return this.openWithDriver(drv, opts as BlockdevOptions, flags | OPEN.PROTOCOL);
  }

  /** Picks the best format for the first bytes of a file (QEMU's bdrv_probe_all); raw when nothing claims it. */
  probeFormat(buf: Uint8Array, filename: string): BlockDriver {
    let best: BlockDriver | undefined;
    let bestScore = 0;
    for (const d of this.drivers.values()) {
      if (d.kind !== 'format' || !d.probe) continue;
      const score = d.probe(buf, filename);
      if (score > bestScore) { bestScore = score; best = d; }
    }
    return best ?? this.getDriver('raw');
  }

  /**
   * Opens an image by filename (QEMU's bdrv_open with a filename): the
   * protocol node first, then the format given or probed on top of it.
   */
  async openImage(filename: string, opts: OpenImageOptions = {}): Promise<BlockNode> {
    let flags = opts.flags ?? 0;
    const extra = { ...(opts.options ?? {}) };
    if (extra['read-only'] !== undefined) flags = extra['read-only'] ? flags & ~OPEN.RDWR : flags | OPEN.RDWR;
    if (opts.readOnly !== undefined) flags = opts.readOnly ? flags & ~OPEN.RDWR : flags | OPEN.RDWR;
    if (opts.noBacking) flags |= OPEN.NO_BACKING;
    // The protocol node inherits the cache options like any storage child (QEMU's bdrv_inherited_options copies cache.*).
    if (extra.cache?.direct) flags |= OPEN.NOCACHE;
    if (extra.cache?.['no-flush']) flags |= OPEN.NO_FLUSH;
    const fileSpec = extra.file;
    delete extra.file;
    let proto: BlockNode;
    if (fileSpec !== undefined && typeof fileSpec === 'object') {
      proto = await this.open({ ...fileSpec, filename: fileSpec.filename ?? filename }, flags & ~OPEN.NO_BACKING);
    } else {
      proto = await this.openProtocol(filename, flags & ~OPEN.NO_BACKING, {});
    }
    let fmt = opts.format;
    let probed = false;
    try {
      if (fmt) {
        const drv = this.getDriver(fmt);
        if (drv.kind === 'protocol') {
          if (opts.nodeName) {
            validateNodeName(opts.nodeName);
            this.nodes.delete(proto.nodeName);
            proto.nodeName = opts.nodeName;
            proto.autoNamed = false;
            this.nodes.set(proto.nodeName, proto);
          }
          // The caller gets the protocol node itself; keep the reference the finally below drops.
          proto.refcnt++;
          return proto;
        }
      } else {
        fmt = await this.probeNode(proto, filename);
        probed = true;
        if (fmt === 'raw') {
          this.onWarning(
            `Image format was not specified for '${filename}' and probing guessed raw.\n` +
              '         Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.\n' +
              "         Specify the 'raw' format explicitly to remove the restrictions.",
          );
        }
      }
      const options: BlockdevOptions = { ...extra, driver: fmt, file: proto.nodeName };
      if (opts.nodeName) options['node-name'] = opts.nodeName;
      const bs = await this.openWithDriver(this.getDriver(fmt), options, flags);
      bs.probed = probed;
      // Drivers size their limits by `probed` (raw makes probed images sector-aligned), so refresh now it is known.
      if (probed) this.refreshLimits(bs);
      if (!bs.filename) bs.filename = proto.filename;
      return bs;
    } finally {
      // The format node took its own reference on the protocol node.
      await this.unref(proto);
    }
  }

  /** Reads the first bytes of a protocol node and names the format they look like. */
  async probeNode(proto: BlockNode, filename: string): Promise<string> {
    const len = await bdrvGetLength(proto);
    if (len === 0) return 'raw';
    const n = Math.min(PROBE_BUF_SIZE, len);
    const buf = new Uint8Array(PROBE_BUF_SIZE);
    const probeChild = new BdrvChild('probe', proto, { kind: 'job', name: 'probe', description: () => 'format probing' }, ROLE.DATA, PERM.CONSISTENT_READ, PERM.ALL);
    try {
      await bdrvPreadv(probeChild, 0, n, buf);
    } catch (e) {
      throw new BlockError(toBlockError(e).code, `Could not read image for determining its format: ${toBlockError(e).message}`);
    }
    return this.probeFormat(buf.subarray(0, n), filename).name;
  }

  /**
   * Replaces `from` by `to` for every parent of `from` (QEMU's bdrv_replace_node),
   * except edges coming from `to` itself or from nodes below it. All or nothing.
   */
  replaceNode(from: BlockNode, to: BlockNode): void {
    const moved = from.parents.filter((p) => !(p.parent.node && this.isAncestor(to, p.parent.node)));
    for (const p of moved) {
      if (p.frozen) throw new BlockError('EPERM', `Cannot change '${p.name}' link to '${to.nodeName}'`);
    }
    const move = (edges: BdrvChild[], a: BlockNode, b: BlockNode): void => {
      for (const p of edges) {
        a.parents.splice(a.parents.indexOf(p), 1);
        b.parents.push(p);
        p.bs = b;
      }
    };
    move(moved, from, to);
    try {
      const u = new PermUpdate();
      for (const p of moved) u.setEdge(p, p.perm, p.sharedPerm);
      u.apply();
    } catch (e) {
      move(moved, to, from);
      throw e;
    }
    to.refcnt += moved.length;
    from.refcnt -= moved.length;
    this.recomputeBelow(from);
  }

  /** Opens a filter from `options` with `file` = bs and puts it in bs's place above it. */
  async insertFilter(bs: BlockNode, options: BlockdevOptions): Promise<BlockNode> {
    const filter = await this.open({ ...options, file: bs.nodeName }, bs.openFlags & ~OPEN.PROTOCOL);
    if (filter.drv.kind !== 'filter') {
      await this.unref(filter);
      throw new BlockError('EINVAL', `'${filter.drv.name}' is not a filter driver`);
    }
    try {
      this.replaceNode(bs, filter);
    } catch (e) {
      await this.unref(filter);
      throw e;
    }
    // The node's parents now hold the filter; the filter's open reference is theirs.
    filter.refcnt--;
    return filter;
  }

  /** Removes a filter node, reconnecting its parents to its filtered child. */
  async removeFilter(filter: BlockNode): Promise<void> {
    const child = filter.filteredChild?.bs;
    if (filter.drv.kind !== 'filter' || !child) throw new BlockError('EINVAL', `Node '${filter.nodeName}' is not a filter`);
    filter.refcnt++;
    this.replaceNode(filter, child);
    await this.unref(filter);
  }

  /**
   * Reopens `bs` and the children that inherit its options (file, data-file,
   * filtered; not backing) with new flags: every driver prepares, permissions
   * are checked, then all commit, or all abort and nothing changes.
   */
  async reopen(bs: BlockNode, ro: ReopenOptions): Promise<void> {
    const queue: ReopenState[] = [];
    const visit = (n: BlockNode, readOnly: boolean, options: Record<string, unknown>): void => {
      if (queue.some((q) => q.bs === n)) return;
      const flags = readOnly ? n.openFlags & ~OPEN.RDWR : n.openFlags | OPEN.RDWR;
      queue.push({ bs: n, flags, readOnly, options });
      for (const c of n.children) {
        if (c.role & ROLE.COW) continue;
        visit(c.bs, readOnly, {});
      }
    };
    visit(bs, ro.readOnly ?? bs.readOnly, ro.options ?? {});
    for (const q of queue) {
      if (q.bs.readOnlyExplicit && !q.readOnly && q.bs !== bs) {
        // A child explicitly opened read-only keeps that.
        q.readOnly = true;
        q.flags &= ~OPEN.RDWR;
      }
    }
    const prepared: ReopenState[] = [];
    try {
      for (const q of queue) {
        await bdrvDrainedBegin(q.bs);
        try {
          if (q.bs.drv.reopenPrepare) await q.bs.drv.reopenPrepare(q);
          else if (Object.keys(q.options).length > 0) {
            throw new BlockError('ENOTSUP', `Block format '${q.bs.drv.name}' used by node '${q.bs.nodeName}' does not support reopening files`);
          }
        } finally {
          bdrvDrainedEnd(q.bs);
        }
        prepared.push(q);
      }
      const u = new PermUpdate();
      for (const q of queue) u.setReadOnly(q.bs, q.readOnly);
      for (const q of queue) {
        const cum = u.cumulative(q.bs);
        for (const c of q.bs.children) {
          const saved = q.bs.readOnly;
          const want = childPermsFor(q.bs, c, cum.perm, cum.shared, !q.readOnly);
          q.bs.readOnly = saved;
          u.setEdge(c, want.perm, want.shared);
        }
      }
      u.apply();
    } catch (e) {
      for (const q of prepared.reverse()) {
        try { q.bs.drv.reopenAbort?.(q); } catch { /* abort must not fail */ }
      }
      throw isBlockError(e) ? e : toBlockError(e);
    }
    for (const q of queue) {
      q.bs.drv.reopenCommit?.(q);
      q.bs.readOnly = q.readOnly;
      q.bs.openFlags = q.flags;
      q.bs.options = { ...q.bs.options, ...q.options, 'read-only': q.readOnly };
    }
    for (const q of queue) await q.bs.drv.reopenCommitPost?.(q);
  }

  /** Closes every node that has no parents left (QEMU's bdrv_close_all for our graph). */
  async closeAll(): Promise<void> {
    for (let guard = 0; guard < 10000 && this.nodes.size > 0; guard++) {
      const roots = [...this.nodes.values()].filter((n) => n.parents.length === 0);
      if (roots.length === 0) break;
      for (const r of roots) {
        r.refcnt = 1;
        await this.unref(r);
      }
    }
  }
}
