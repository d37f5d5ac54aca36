/**
 * BlockBackend: the user's handle on a graph (QEMU's block-backend.c). It
 * checks byte ranges, queues requests while drained or stopped, throttles,
 * accounts, applies the error policy, and owns the root edge's permissions.
 */
import { BlockAcctStats, type BlockAcctType, type BlockAcctCookie } from './accounting.ts';
import type { ChildParent, BdrvChild } from './child.ts';
import { BlockError, isBlockError, throwIfAborted, toBlockError, type ErrnoCode } from './errors.ts';
import type { Graph, OpenImageOptions } from './graph.ts';
import {
  bdrvDrainedBegin,
  bdrvDrainedEnd,
  bdrvFlush,
  bdrvGetLength,
  bdrvGetLengthSync,
  bdrvPdiscard,
  bdrvPreadv,
  bdrvPwritev,
  bdrvTruncate,
} from './io.ts';
import type { BlockNode } from './node.ts';
import { throttleGroups, type ThrottleGroupMember, type ThrottleGroupRegistry } from './throttle-group.ts';
import type { ThrottleLimits } from './throttle.ts';
import { OPEN, PERM, REQ, type BlockdevOptions, type PreallocMode } from './types.ts';

/** What the backend does when a request fails (QEMU's BlockdevOnError). */
export type ErrorPolicy = 'report' | 'ignore' | 'stop' | 'enospc';
/** The action taken for one error (QEMU's BlockErrorAction). */
export type ErrorAction = 'report' | 'ignore' | 'stop';
/** Device I/O status (QEMU's BlockDeviceIoStatus). */
export type IoStatus = 'ok' | 'failed' | 'nospace';

/** Per-request options. */
export interface RequestOptions {
  /** REQ.* flags. */
  flags?: number;
  signal?: AbortSignal;
}

/** Payload of the 'io-error' event (QEMU's BLOCK_IO_ERROR). */
export interface IoErrorEvent {
  device: string;
  nodeName: string;
  operation: 'read' | 'write';
  action: ErrorAction;
  nospace: boolean;
  reason: string;
  code: ErrnoCode;
}

/** Events a backend emits. */
export interface BackendEvents {
  'io-error': IoErrorEvent;
  /** The medium changed: inserted (true) or removed (false). */
  'media-change': { load: boolean };
  /** The guest/user was asked to release the medium (eject while locked). */
  'eject-request': { force: boolean };
  'tray-moved': { open: boolean };
  resize: { size: number };
  /** The backend stopped on an error and waits for resume(). */
  stop: IoErrorEvent;
  resume: Record<string, never>;
}

type Listener<T> = (ev: T) => void;

/** Options for BlockBackend.open. */
export interface BackendOpenOptions extends OpenImageOptions {
  name?: string;
  allowWriteBeyondEof?: boolean;
  /** Share every permission with other users (qemu-img -U semantics come from force-share instead). */
  shareAll?: boolean;
  /** Take RESIZE too (qemu-img resize, qemu-io truncate). */
  resize?: boolean;
}

const allBackends = new Set<BlockBackend>();

export class BlockBackend {
  readonly graph: Graph;
  /** The backend's name ('' when anonymous), used in events and permission errors. */
  readonly name: string;
  private root: BdrvChild | null = null;
  private perm: number;
  private sharedPerm: number;

  /** Requests between entry and completion, queued ones included. */
  inFlight = 0;
  private idleWaiters: Array<() => void> = [];
  /** >0 while a drained section covers the root; new requests wait. */
  quiesceCounter = 0;
  /** When true, requests do not queue while drained (QEMU's disable_request_queuing; jobs' own backends). */
  disableRequestQueuing = false;
  private queued: Array<() => void> = [];

  allowWriteBeyondEof = false;
  /** False = writethrough: every write carries FUA (QEMU's enable_write_cache). */
  enableWriteCache = true;

  readErrorPolicy: ErrorPolicy = 'report';
  writeErrorPolicy: ErrorPolicy = 'enospc';
  /** Only updated when enabled, as QEMU's iostatus. */
  iostatusEnabled = true;
  iostatus: IoStatus = 'ok';
  /** True after an error with action 'stop', until resume(). */
  stopped = false;
  private resumeWaiters: Array<() => void> = [];

  readonly stats: BlockAcctStats;
  private throttle: ThrottleGroupMember | null = null;
  private readonly throttleRegistry: ThrottleGroupRegistry;

  /** Removable-media state (QEMU's BlockDevOps callbacks' view). */
  removable = false;
  trayOpen = false;
  mediumLocked = false;

  private readonly listeners = new Map<keyof BackendEvents, Set<Listener<never>>>();

  /** Creates an empty backend that will take `perm` and share `sharedPerm` on its root (QEMU's blk_new). */
  constructor(graph: Graph, opts: { name?: string; perm?: number; sharedPerm?: number; stats?: BlockAcctStats; throttleRegistry?: ThrottleGroupRegistry } = {}) {
    this.graph = graph;
    this.name = opts.name ?? '';
    this.perm = opts.perm ?? PERM.CONSISTENT_READ;
    this.sharedPerm = opts.sharedPerm ?? PERM.ALL;
    this.stats = opts.stats ?? new BlockAcctStats();
    this.throttleRegistry = opts.throttleRegistry ?? throttleGroups;
    allBackends.add(this);
  }

  /**
   * Opens an image (filename with optional format, or blockdev options) and
   * returns a backend on it with read (and, unless read-only, write and
   * resize) permission (QEMU's blk_new_open).
   */
  static async open(graph: Graph, target: string | BlockdevOptions, opts: BackendOpenOptions = {}): Promise<BlockBackend> {
    const readOnly = opts.readOnly ?? false;
    let flags = (opts.flags ?? 0) | (readOnly ? 0 : OPEN.RDWR);
    if (readOnly) flags &= ~OPEN.RDWR;
    let bs: BlockNode;
    if (typeof target === 'string') {
      bs = await graph.openImage(target, { ...opts, readOnly, flags });
    } else {
      bs = await graph.open({ ...target, 'read-only': target['read-only'] ?? readOnly }, flags);
    }
    let perm = PERM.CONSISTENT_READ;
    if (!bs.readOnly) perm |= PERM.WRITE | (opts.resize !== false ? PERM.RESIZE : 0);
    const blk = new BlockBackend(graph, { name: opts.name ?? '', perm, sharedPerm: PERM.ALL });
    if (opts.allowWriteBeyondEof) blk.allowWriteBeyondEof = true;
    try {
      blk.insertNode(bs);
    } catch (e) {
      allBackends.delete(blk);
      await graph.unref(bs);
      throw e;
    }
    // insertNode took its own reference; drop the one open() returned.
    await graph.unref(bs);
    return blk;
  }

  /** All live backends (QEMU's blk_all_next). */
  static all(): BlockBackend[] {
    return [...allBackends];
  }

  /** Drains every backend (QEMU's blk_drain_all / bdrv_drain_all). */
  static async drainAll(): Promise<void> {
    await Promise.all([...allBackends].map((b) => b.drain()));
  }

  /** The root node, or null when no medium is inserted. */
  get bs(): BlockNode | null {
    return this.root?.bs ?? null;
  }

  /** The root edge (for code that issues node-level requests with the backend's permissions). */
  get rootChild(): BdrvChild | null {
    return this.root;
  }

  private parentDesc(): ChildParent {
    const self = this;
    return {
      kind: 'backend',
      get name() { return self.name; },
      description: () => (self.name ? `block device '${self.name}'` : 'a block device'),
      drainedBegin: () => self.rootDrainedBegin(),
      drainedEnd: () => self.rootDrainedEnd(),
      resized: () => {
        if (self.root) self.emit('resize', { size: self.root.bs.totalBytes });
      },
    };
  }

  /** Attaches `bs` as the root, taking this backend's permissions (QEMU's blk_insert_bs). */
  insertNode(bs: BlockNode): void {
    if (this.root) throw new BlockError('EBUSY', 'A medium is already inserted', { node: this.name });
    this.root = this.graph.attachRoot(bs, this.parentDesc(), 'root', this.perm, this.sharedPerm);
    if (bs.quiesceCounter > 0) this.quiesceCounter++;
    if (this.removable) this.emit('media-change', { load: true });
  }

  /** Detaches the root and drops its reference (QEMU's blk_remove_bs). */
  async removeNode(): Promise<void> {
    const c = this.root;
    if (!c) return;
    await this.drain();
    if (this.throttle) this.disableThrottling();
    this.root = null;
    if (c.bs.quiesceCounter > 0 && this.quiesceCounter > 0) this.rootDrainedEnd();
    await this.graph.detachChild(c);
    if (this.removable) this.emit('media-change', { load: false });
  }

  /** Changes the permissions taken and shared on the root; on failure nothing changes (QEMU's blk_set_perm). */
  setPerm(perm: number, sharedPerm: number): void {
    if (this.root) this.graph.setPerm(this.root, perm, sharedPerm);
    this.perm = perm;
    this.sharedPerm = sharedPerm;
  }

  /** Permissions currently taken and shared. */
  getPerm(): { perm: number; sharedPerm: number } {
    return { perm: this.perm, sharedPerm: this.sharedPerm };
  }

  /** True when a medium is inserted and the tray is closed (QEMU's blk_is_available). */
  isAvailable(): boolean {
    return this.root !== null && !this.trayOpen;
  }

  /** True when the root node is read-only. */
  isReadOnly(): boolean {
    return this.root ? this.root.bs.readOnly : false;
  }

  // -------------------------------------------------------------------------
  // Events

  /** Subscribes to an event; returns an unsubscribe function. */
  on<K extends keyof BackendEvents>(ev: K, fn: Listener<BackendEvents[K]>): () => void {
    let s = this.listeners.get(ev);
    if (!s) this.listeners.set(ev, (s = new Set()));
    s.add(fn as Listener<never>);
    return () => s!.delete(fn as Listener<never>);
  }

  private emit<K extends keyof BackendEvents>(ev: K, payload: BackendEvents[K]): void {
    const s = this.listeners.get(ev);
    if (!s) return;
    for (const fn of s) (fn as Listener<BackendEvents[K]>)(payload);
  }

  // -------------------------------------------------------------------------
  // In-flight, drain, queuing

  private incInFlight(): void {
    this.inFlight++;
  }

  private decInFlight(): void {
    if (--this.inFlight === 0) {
      const w = this.idleWaiters;
      this.idleWaiters = [];
      for (const f of w) f();
    }
  }

  private rootDrainedBegin(): void {
    if (this.quiesceCounter++ === 0) this.throttle?.drainBegin();
  }

  private rootDrainedEnd(): void {
    if (this.quiesceCounter <= 0) return;
    if (--this.quiesceCounter === 0) {
      this.throttle?.drainEnd();
      this.wakeQueued();
    }
  }

  private wakeQueued(): void {
    const q = this.queued;
    this.queued = [];
    for (const f of q) f();
  }

  /** Waits while drained or stopped; in-flight stays counted so drain sees queued requests finish first (QEMU's blk_wait_while_drained). */
  /** Whether new requests must wait (drained and queuing, or stopped by the error policy). */
  private isBlocked(): boolean {
    return (this.quiesceCounter > 0 && !this.disableRequestQueuing) || this.stopped;
  }

  private async waitWhileBlocked(): Promise<void> {
    while (this.isBlocked()) {
      // A queued request is not "in flight" for drain purposes.
      this.decInFlight();
      await new Promise<void>((r) => (this.stopped ? this.resumeWaiters : this.queued).push(r));
      this.incInFlight();
    }
  }

  /** Waits for every request on this backend and below it to finish (QEMU's blk_drain). */
  async drain(): Promise<void> {
    const bs = this.bs;
    if (bs) await bdrvDrainedBegin(bs);
    else this.quiesceCounter++;
    try {
      while (this.inFlight > 0) await new Promise<void>((r) => this.idleWaiters.push(r));
    } finally {
      if (bs && this.bs === bs) bdrvDrainedEnd(bs);
      else this.rootDrainedEnd();
    }
  }

  /** Begins a drained section on the root (new requests queue until drainedEnd). */
  async drainedBegin(): Promise<void> {
    const bs = this.bs;
    if (bs) await bdrvDrainedBegin(bs);
    else this.rootDrainedBegin();
    while (this.inFlight > 0) await new Promise<void>((r) => this.idleWaiters.push(r));
  }

  /** Ends a section begun with drainedBegin. */
  drainedEnd(): void {
    const bs = this.bs;
    if (bs) bdrvDrainedEnd(bs);
    else this.rootDrainedEnd();
  }

  // -------------------------------------------------------------------------
  // Error policy

  /** Sets the per-direction error policies (QEMU's rerror/werror). */
  setOnError(read: ErrorPolicy, write: ErrorPolicy): void {
    this.readErrorPolicy = read;
    this.writeErrorPolicy = write;
  }

  /** The action for an error in one direction (QEMU's blk_get_error_action). */
  getErrorAction(isRead: boolean, code: ErrnoCode): ErrorAction {
    const p = isRead ? this.readErrorPolicy : this.writeErrorPolicy;
    switch (p) {
      case 'enospc': return code === 'ENOSPC' ? 'stop' : 'report';
      case 'stop': return 'stop';
      case 'report': return 'report';
      case 'ignore': return 'ignore';
    }
  }

  /** Resets iostatus to ok (QEMU's blk_iostatus_reset). */
  iostatusReset(): void {
    this.iostatus = 'ok';
  }

  /** Continues after a stop: iostatus is reset and paused requests are retried (QEMU's `cont`). */
  resume(): void {
    if (!this.stopped) return;
    this.stopped = false;
    this.iostatusReset();
    const w = this.resumeWaiters;
    this.resumeWaiters = [];
    this.emit('resume', {});
    for (const f of w) f();
  }

  private reportError(isRead: boolean, e: BlockError, action: ErrorAction): void {
    if (action === 'stop') {
      this.stopped = true;
      if (this.iostatusEnabled && this.iostatus === 'ok') this.iostatus = e.code === 'ENOSPC' ? 'nospace' : 'failed';
    }
    const ev: IoErrorEvent = {
      device: this.name,
      nodeName: this.bs?.nodeName ?? '',
      operation: isRead ? 'read' : 'write',
      action,
      nospace: e.code === 'ENOSPC',
      reason: e.message,
      code: e.code,
    };
    this.emit('io-error', ev);
    if (action === 'stop') this.emit('stop', ev);
  }

  // -------------------------------------------------------------------------
  // Request helpers

  /** Validates a request; returns a promise only when the length check needs the driver's asynchronous answer. */
  private checkByteRequest(offset: number, bytes: number): Promise<void> | undefined {
    if (!Number.isInteger(offset) || !Number.isInteger(bytes)) throw new BlockError('EINVAL', 'Offset and length must be integers', { node: this.name });
    if (bytes < 0 || offset < 0) throw new BlockError('EINVAL', `Negative ${offset < 0 ? 'offset' : 'length'}`, { node: this.name });
    if (!this.isAvailable()) throw new BlockError('ENOMEDIUM', undefined, { node: this.name });
    if (!this.allowWriteBeyondEof) {
      const bs = this.root!.bs;
      const now = bdrvGetLengthSync(bs);
      if (now === undefined) {
        return bdrvGetLength(bs).then((len) => {
          if (offset > len || len - offset < bytes) throw new BlockError('EIO', undefined, { node: this.name });
        });
      }
      if (offset > now || now - offset < bytes) throw new BlockError('EIO', undefined, { node: this.name });
    }
    return undefined;
  }

  /**
   * Runs one request through queuing, checks, throttling, accounting and the
   * error policy. `op` is retried after resume() when the policy stops.
   */
  private async run(type: BlockAcctType, isRead: boolean, offset: number, bytes: number, signal: AbortSignal | undefined, check: boolean, op: () => Promise<void>): Promise<void> {
    this.incInFlight();
    try {
      throwIfAborted(signal);
      if (this.isBlocked()) await this.waitWhileBlocked();
      if (check) {
        try {
          const pending = this.checkByteRequest(offset, bytes);
          if (pending) await pending;
        } catch (e) {
          this.stats.acctInvalid(type);
          throw e;
        }
      } else if (!this.isAvailable()) {
        throw new BlockError('ENOMEDIUM', undefined, { node: this.name });
      }
      // Timed from before throttling: QEMU's devices start accounting before the request reaches the backend.
      let cookie: BlockAcctCookie = this.stats.acctStart(type, bytes);
      if (this.throttle && (type === 'read' || type === 'write')) {
        // Throttled requests stay in flight: a drain disables the limits and waits for them, as QEMU does.
        await this.throttle.intercept(bytes, type === 'write', signal);
      }
      for (let attempt = 0; ; attempt++) {
        throwIfAborted(signal);
        if (attempt > 0) cookie = this.stats.acctStart(type, bytes);
        try {
          await op();
          this.stats.acctDone(cookie);
          return;
        } catch (e0) {
          const e = toBlockError(e0, 'EIO', this.bs?.nodeName);
          this.stats.acctFailed(cookie);
          if (e.code === 'ECANCELED') throw e;
          const action = type === 'unmap' ? 'report' : this.getErrorAction(isRead, e.code);
          this.reportError(isRead, e, action);
          if (action === 'report') throw e;
          if (action === 'ignore') return;
          await this.waitWhileBlocked();
        }
      }
    } finally {
      this.decInFlight();
    }
  }

  private writeFlags(flags: number): number {
    return this.enableWriteCache ? flags : flags | REQ.FUA;
  }

  // -------------------------------------------------------------------------
  // I/O

  /** Reads buf.length bytes at offset into buf (QEMU's blk_co_preadv). */
  pread(offset: number, buf: Uint8Array, opts: RequestOptions = {}): Promise<void> {
    return this.run('read', true, offset, buf.length, opts.signal, true, () => bdrvPreadv(this.root!, offset, buf.length, buf, opts.flags ?? 0, opts.signal));
  }

  /** Reads `length` bytes at offset into a new buffer. */
  async read(offset: number, length: number, opts: RequestOptions = {}): Promise<Uint8Array> {
    if (!Number.isInteger(length) || length < 0) throw new BlockError('EINVAL', 'Negative length', { node: this.name });
    const buf = new Uint8Array(length);
    await this.pread(offset, buf, opts);
    return buf;
  }

  /** Writes buf at offset (QEMU's blk_co_pwritev). */
  pwrite(offset: number, buf: Uint8Array, opts: RequestOptions = {}): Promise<void> {
    return this.run('write', false, offset, buf.length, opts.signal, true, () => bdrvPwritev(this.root!, offset, buf.length, buf, this.writeFlags(opts.flags ?? 0), opts.signal));
  }

  /** Zeroes a range; REQ.MAY_UNMAP allows deallocation, REQ.NO_FALLBACK forbids emulation (QEMU's blk_co_pwrite_zeroes). */
  pwriteZeroes(offset: number, bytes: number, opts: RequestOptions = {}): Promise<void> {
    return this.run('write', false, offset, bytes, opts.signal, true, () => bdrvPwritev(this.root!, offset, bytes, null, this.writeFlags((opts.flags ?? 0) | REQ.ZERO_WRITE), opts.signal));
  }

  /** Writes a compressed, cluster-aligned range (QEMU's blk_co_pwrite_compressed). */
  pwriteCompressed(offset: number, buf: Uint8Array, opts: RequestOptions = {}): Promise<void> {
    return this.run('write', false, offset, buf.length, opts.signal, true, () => bdrvPwritev(this.root!, offset, buf.length, buf, REQ.WRITE_COMPRESSED, opts.signal));
  }

  /** Discards a range (advisory; QEMU's blk_co_pdiscard). */
  pdiscard(offset: number, bytes: number, opts: RequestOptions = {}): Promise<void> {
    return this.run('unmap', false, offset, bytes, opts.signal, true, () => bdrvPdiscard(this.root!, offset, bytes));
  }

  /** Makes all completed writes durable (QEMU's blk_co_flush). */
  flush(opts: RequestOptions = {}): Promise<void> {
    return this.run('flush', false, 0, 0, opts.signal, false, () => bdrvFlush(this.root!.bs));
  }

  /** Resizes the image (QEMU's blk_truncate). */
  async truncate(size: number, opts: { exact?: boolean; prealloc?: PreallocMode; flags?: number; signal?: AbortSignal } = {}): Promise<void> {
    if (!this.isAvailable()) throw new BlockError('ENOMEDIUM', 'No medium inserted', { node: this.name });
    this.incInFlight();
    try {
      await this.waitWhileBlocked();
      throwIfAborted(opts.signal);
      await bdrvTruncate(this.root!, size, opts.exact ?? true, opts.prealloc ?? 'off', opts.flags ?? 0);
    } finally {
      this.decInFlight();
    }
  }

  /** Length of the medium in bytes (QEMU's blk_getlength). */
  async getLength(): Promise<number> {
    if (!this.isAvailable()) throw new BlockError('ENOMEDIUM', undefined, { node: this.name });
    return bdrvGetLength(this.root!.bs);
  }

  // -------------------------------------------------------------------------
  // Write cache, throttling

  /** Toggles the write cache; off means writethrough (FUA on every write). */
  setEnableWriteCache(on: boolean): void {
    this.enableWriteCache = on;
  }

  /** Joins throttle group `group` (created unlimited if new) and optionally sets its limits (QEMU's blk_io_limits_enable). */
  enableThrottling(group: string, limits?: ThrottleLimits): void {
    if (this.throttle) {
      if (this.throttle.groupName === group) {
        if (limits) this.throttle.setLimits(limits);
        return;
      }
      this.disableThrottling();
    }
    this.throttle = this.throttleRegistry.register(group);
    if (limits) this.throttle.setLimits(limits);
    if (this.quiesceCounter > 0) this.throttle.drainBegin();
  }

  /** Leaves the throttle group (QEMU's blk_io_limits_disable). */
  disableThrottling(): void {
    if (!this.throttle) return;
    if (this.quiesceCounter > 0) this.throttle.drainEnd();
    this.throttle.unregister();
    this.throttle = null;
  }

  /** The throttle group member, when throttled. */
  get throttleMember(): ThrottleGroupMember | null {
    return this.throttle;
  }

  // -------------------------------------------------------------------------
  // Removable media

  /** Opens the tray (ejecting is refused with EBUSY while the medium is locked unless forced; QEMU's eject semantics). */
  openTray(force = false): void {
    if (!this.removable) throw new BlockError('ENOTSUP', `Device '${this.name}' is not removable`);
    if (this.mediumLocked && !force) {
      this.emit('eject-request', { force });
      throw new BlockError('EBUSY', `Device '${this.name}' is locked and force was not specified, wait for tray to open and try again`);
    }
    if (this.trayOpen) return;
    this.trayOpen = true;
    this.emit('tray-moved', { open: true });
  }

  /** Closes the tray. */
  closeTray(): void {
    if (!this.removable) throw new BlockError('ENOTSUP', `Device '${this.name}' is not removable`);
    if (!this.trayOpen) return;
    this.trayOpen = false;
    this.emit('tray-moved', { open: false });
  }

  /** Locks or unlocks the medium (the guest's prevent-removal). */
  lockMedium(locked: boolean): void {
    this.mediumLocked = locked;
  }

  /** Opens the tray and removes the medium (QEMU's eject). */
  async eject(force = false): Promise<void> {
    this.openTray(force);
    await this.removeNode();
  }

  /** Replaces the medium with `bs` (QEMU's blockdev-change-medium): open tray, swap, close tray. */
  async changeMedium(bs: BlockNode, force = false): Promise<void> {
    this.openTray(force);
    await this.removeNode();
    this.insertNode(bs);
    this.closeTray();
  }

  /** Removes the medium and forgets the backend. */
  async close(): Promise<void> {
    try {
      await this.removeNode();
    } finally {
      this.disableThrottling();
      allBackends.delete(this);
    }
  }
}

/** Narrows unknown errors for callers that want the code. */
export function errorCode(e: unknown): ErrnoCode | undefined {
  return isBlockError(e) ? e.code : undefined;
}
