/**
 * BlockNode: QEMU's BlockDriverState. A driver instance plus its edges, limits,
 * tracked requests and the counters the generic request path keeps.
 */
import type { BlockDriver } from './driver.ts';
import type { BdrvChild } from './child.ts';
import type { Graph } from './graph.ts';
import type { BdrvDirtyBitmap } from './dirty-bitmap.ts';
import { BlockError } from './errors.ts';
import { defaultLimits, OPEN, type BlockLimits, type DetectZeroes } from './types.ts';

/** A request in flight on a node, kept for serialisation (QEMU's BdrvTrackedRequest). */
export interface TrackedRequest {
  readonly seq: number;
  offset: number;
  bytes: number;
  /** Range other requests must not overlap while this one is serialising. */
  overlapOffset: number;
  overlapBytes: number;
  serialising: boolean;
  isWrite: boolean;
  /** Created only when another request has to wait for this one, so the common path allocates no promise. */
  done: Promise<void> | null;
  resolve: (() => void) | null;
  finished: boolean;
}

/** Called before every write reaches the driver; may throw to fail the write (QEMU's before_write_notifiers). */
export type BeforeWriteHook = (bs: BlockNode, offset: number, bytes: number, flags: number) => void | Promise<void>;

/** Operations op blockers guard (QEMU's BlockOpType, the ones that mean something here). */
export type BlockOp = 'backup-source' | 'backup-target' | 'change' | 'commit-source' | 'commit-target' | 'dataplane' | 'drive-del' | 'eject' | 'external-snapshot' | 'internal-snapshot' | 'internal-snapshot-delete' | 'mirror-source' | 'mirror-target' | 'resize' | 'stream' | 'replace';

export class BlockNode {
  nodeName: string;
  /** True when the name was made up by the graph (QEMU's '#blockNNN'). */
  autoNamed: boolean;
  readonly drv: BlockDriver;
  readonly graph: Graph;
  /** Driver state. */
  opaque: unknown = undefined;

  /** Edges to children, in attach order. */
  readonly children: BdrvChild[] = [];
  /** Edges from parents (nodes or backends) to this node. */
  readonly parents: BdrvChild[] = [];
  file: BdrvChild | null = null;
  backing: BdrvChild | null = null;

  refcnt = 1;
  readOnly: boolean;
  openFlags: number;
  /** Options the node was opened with (after defaults), as QEMU keeps bs->options. */
  options: Record<string, unknown>;
  /** The user-visible filename (QEMU's bs->filename). */
  filename = '';
  /** Backing file name recorded in the image header, as written there. */
  backingFile = '';
  backingFormat = '';
  /** Backing file name resolved against the image's location. */
  fullBackingFilename = '';
  /** The user asked for read-only when opening this node; a reopen of a parent does not make it writable. */
  readOnlyExplicit = false;
  /** Whether the format was given rather than probed (probed raw refuses writes to sector 0). */
  probed = false;
  encrypted = false;
  /** Length in bytes, cached by refreshTotalBytes(). */
  totalBytes = 0;

  bl: BlockLimits = defaultLimits();
  /** REQ.* flags the driver honours natively on writes. */
  supportedWriteFlags = 0;
  /** REQ.* flags the driver honours natively on zero writes. */
  supportedZeroFlags = 0;
  supportedTruncateFlags = 0;

  readonly trackedRequests = new Set<TrackedRequest>();
  nextRequestSeq = 0;
  inFlight = 0;
  quiesceCounter = 0;
  /** Resolvers waiting for inFlight to reach zero. */
  inFlightWaiters: Array<() => void> = [];
  /** Incremented by every write; flush compares it with flushedGen to skip needless I/O. */
  writeGen = 0;
  flushedGen = 0;
  /** A flush in progress, shared by flushes that arrive meanwhile. */
  activeFlush: Promise<void> | null = null;
  /** Highest byte offset written (QEMU's wr_highest_offset). */
  wrHighestOffset = 0;
  /** Offset above which a write fires onWriteThreshold once; 0 = disabled. */
  writeThreshold = 0;
  onWriteThreshold: ((bs: BlockNode, exceededBy: number) => void) | null = null;
  readonly beforeWriteHooks: BeforeWriteHook[] = [];
  detectZeroes: DetectZeroes = 'off';
  /** Copy-on-read nesting count (QEMU's copy_on_read). */
  copyOnRead = 0;
  /** Pass discards to the driver (discard=unmap); otherwise they are ignored. */
  discardUnmap = false;
  readonly opBlockers = new Map<BlockOp, Set<string>>();
  /** Node is being closed; new requests fail. */
  closing = false;
  /** Dirty bitmaps every completed write marks while enabled, newest first (QEMU's bs->dirty_bitmaps). */
  readonly dirtyBitmaps: BdrvDirtyBitmap[] = [];

  constructor(graph: Graph, drv: BlockDriver, nodeName: string, autoNamed: boolean, flags: number, options: Record<string, unknown>) {
    this.graph = graph;
    this.drv = drv;
    this.nodeName = nodeName;
    this.autoNamed = autoNamed;
    this.openFlags = flags;
    this.readOnly = (flags & OPEN.RDWR) === 0;
    this.options = options;
  }

  /** The child that holds this node's data when it is a filter or raw-like format (QEMU's bdrv_filter_or_cow_child / primary child). */
  get primaryChild(): BdrvChild | null {
    return this.file ?? this.children.find((c) => c.name === 'file') ?? null;
  }

  /** The child a filter forwards to (null for non-filters). */
  get filteredChild(): BdrvChild | null {
    if (this.drv.kind !== 'filter') return null;
    return this.file ?? this.children.find((c) => c.name === 'file' || c.name === 'image') ?? null;
  }

  /** QEMU's bdrv_get_device_or_node_name for messages. */
  get displayName(): string {
    for (const p of this.parents) {
      if (p.parent.kind === 'backend' && p.parent.name) return p.parent.name;
    }
    return this.nodeName;
  }

  /** Blocks `op` for `reason` until unblockOp(op, reason). */
  blockOp(op: BlockOp, reason: string): void {
    let s = this.opBlockers.get(op);
    if (!s) this.opBlockers.set(op, (s = new Set()));
    s.add(reason);
  }

  /** Removes a blocker added with blockOp. */
  unblockOp(op: BlockOp, reason: string): void {
    this.opBlockers.get(op)?.delete(reason);
  }

  /** Throws EBUSY with the blocker's reason if `op` is blocked (QEMU's bdrv_op_is_blocked). */
  checkOp(op: BlockOp): void {
    const s = this.opBlockers.get(op);
    if (s && s.size > 0) {
      const reason = s.values().next().value as string;
      throw new BlockError('EBUSY', `Node '${this.nodeName}' is busy: ${reason}`, { node: this.nodeName });
    }
  }

  /** Typed access to driver state for drivers that own it. */
  state<S>(): S {
    return this.opaque as S;
  }

  /** Resolves when no request is in flight on this node. */
  waitIdle(): Promise<void> {
    if (this.inFlight === 0) return Promise.resolve();
    return new Promise((resolve) => this.inFlightWaiters.push(resolve));
  }

  /** Marks a request started (QEMU's bdrv_inc_in_flight). */
  incInFlight(): void {
    this.inFlight++;
  }

  /** Marks a request finished and wakes drain waiters at zero. */
  decInFlight(): void {
    this.inFlight--;
    if (this.inFlight === 0 && this.inFlightWaiters.length > 0) {
      const w = this.inFlightWaiters;
      this.inFlightWaiters = [];
      for (const f of w) f();
    }
  }
}
