/**
 * The BlockDriver interface (QEMU's struct BlockDriver): a table of optional
 * capabilities. A driver keeps its per-node state in `bs.opaque`. Offsets and
 * lengths are bytes; the generic request path (io.ts) has already checked,
 * aligned and split every request to the node's limits before a callback runs.
 */
import type { BlockNode } from './node.ts';
import type { BdrvChild } from './child.ts';
import type { BlockStatus, PreallocMode } from './types.ts';
import type { OptionSpec, CreateOptions } from './options.ts';

export type DriverKind = 'format' | 'protocol' | 'filter';

/** What `get_info` reports (QEMU's BlockDriverInfo). */
export interface BlockDriverInfo {
  clusterSize?: number;
  subclusterSize?: number;
  vmStateOffset?: number;
  isDirty?: boolean;
  /** True when unallocated ranges are known to read as zero. */
  unallocatedBlocksAreZero?: boolean;
}

/** Format-specific info as QEMU's ImageInfoSpecific: `{type, data}` with QEMU's JSON keys. */
export interface ImageInfoSpecific {
  type: string;
  data: Record<string, unknown>;
}

/** One internal snapshot (QEMU's QEMUSnapshotInfo). */
export interface SnapshotInfo {
  id: string;
  name: string;
  vmStateSize: number;
  dateSec: number;
  dateNsec: number;
  vmClockNsec: number;
  icount?: number;
}

/** Result of `qemu-img check` (QEMU's BdrvCheckResult). */
export interface CheckResult {
  corruptions: number;
  leaks: number;
  checkErrors: number;
  corruptionsFixed: number;
  leaksFixed: number;
  imageEndOffset: number;
  bfi: { totalClusters: number; allocatedClusters: number; fragmentedClusters: number; compressedClusters: number };
}

/** Repair modes for check (QEMU's BdrvCheckMode). */
export const CHECK_FIX = { LEAKS: 1, ERRORS: 2 } as const;

/** Result of `measure` (QEMU's BlockMeasureInfo). */
export interface MeasureInfo {
  required: number;
  fullyAllocated: number;
  bitmaps?: number;
}

/** State of one node in a reopen transaction (QEMU's BDRVReopenState). */
export interface ReopenState {
  bs: BlockNode;
  flags: number;
  readOnly: boolean;
  options: Record<string, unknown>;
  /** Driver scratch space between prepare and commit/abort. */
  opaque?: unknown;
}

/** Progress callback for long operations: done and total in arbitrary units (bytes where meaningful). */
export type ProgressFn = (done: number, total: number) => void;

/** What create() receives besides its options: a way to reach storage. */
export interface CreateContext {
  /** Creates the protocol-level file `filename` and opens it read-write as a node. */
  createAndOpenFile(filename: string, opts?: CreateOptions): Promise<BlockNode>;
  /** Opens an existing image for the backing-file checks create does. */
  openImage(filename: string, format?: string): Promise<BlockNode>;
  /** Closes a node opened through this context. */
  close(bs: BlockNode): Promise<void>;
}

export interface BlockDriver {
  /** QEMU's format_name: 'raw', 'qcow2', 'file', 'memory', 'throttle'… */
  readonly name: string;
  readonly kind: DriverKind;
  /** Filename prefix that selects this protocol ('http', 'https', 'memory', 'null-co'). */
  readonly protocolNames?: readonly string[];
  /** The driver can have a backing child (QEMU's supports_backing). */
  readonly supportsBacking?: boolean;
  /** Runtime options accepted by open() besides the generic ones. */
  readonly runtimeOptions?: readonly OptionSpec[];
  /** Options accepted by create(). */
  readonly createOptions?: readonly OptionSpec[];
  /** Options accepted by amend() (QEMU's amend_opts); required when amend is. */
  readonly amendOptions?: readonly OptionSpec[];
  /** Lengths may change under us (files on a host FS), so getLength is always asked. */
  readonly hasVariableLength?: boolean;

  /** Score 0..100 that `buf` (the first bytes of the file) is this format. */
  probe?(buf: Uint8Array, filename: string): number;
  /** Splits a protocol filename into options (`http://h/x` → {url}). */
  parseFilename?(filename: string, options: Record<string, unknown>): void;

  /** Opens the driver on `bs`; children are opened through bs.graph.openChild. */
  open(bs: BlockNode, options: Record<string, unknown>, flags: number): Promise<void>;
  close?(bs: BlockNode): Promise<void>;
  create?(filename: string, opts: CreateOptions, ctx: CreateContext, progress?: ProgressFn): Promise<void>;
  refreshLimits?(bs: BlockNode): void;
  /** Permissions this node needs on `child` given what its parents need of it; default by role. */
  childPerm?(bs: BlockNode, child: BdrvChild | null, role: number, parentPerm: number, parentShared: number): { perm: number; shared: number };

  preadv?(bs: BlockNode, offset: number, bytes: number, buf: Uint8Array, flags: number, signal?: AbortSignal): Promise<void>;
  /**
   * preadv done on the calling thread when the storage can (memory, OPFS sync
   * handles, files in synchronous mode, qcow2 over those with the mapping
   * cached): true when `buf` holds the bytes, false (having done nothing) when
   * only preadv can serve the request. Same bytes, errors and statistics as
   * preadv; it lets a cached read pass every layer without a promise hop.
   */
  preadvSync?(bs: BlockNode, offset: number, bytes: number, buf: Uint8Array): boolean;
  pwritev?(bs: BlockNode, offset: number, bytes: number, buf: Uint8Array, flags: number, signal?: AbortSignal): Promise<void>;
  pwritevCompressed?(bs: BlockNode, offset: number, bytes: number, buf: Uint8Array): Promise<void>;
  /** Zero the range without a buffer; may unmap with REQ.MAY_UNMAP; ENOTSUP asks for the fallback. */
  pwriteZeroes?(bs: BlockNode, offset: number, bytes: number, flags: number): Promise<void>;
  pdiscard?(bs: BlockNode, offset: number, bytes: number): Promise<void>;
  /** Status of [offset, offset+bytes): one extent starting at offset. */
  blockStatus?(bs: BlockNode, wantZero: boolean, offset: number, bytes: number): Promise<BlockStatus>;
  /** Push cached data out of the driver (to the OS / child). */
  flushToOs?(bs: BlockNode): Promise<void>;
  /** Make everything written so far durable. */
  flushToDisk?(bs: BlockNode): Promise<void>;
  truncate?(bs: BlockNode, offset: number, exact: boolean, prealloc: PreallocMode, flags: number): Promise<void>;
  getLength?(bs: BlockNode): Promise<number>;
  /** getLength answered without I/O (same value and side effects), or undefined when only the async form can answer; lets the fast read path skip a turn. */
  getLengthSync?(bs: BlockNode): number | undefined;
  getAllocatedFileSize?(bs: BlockNode): Promise<number>;
  measure?(opts: CreateOptions, src: BlockNode | null): Promise<MeasureInfo>;
  copyRangeFrom?(bs: BlockNode, src: BdrvChild, srcOffset: number, dst: BdrvChild, dstOffset: number, bytes: number, readFlags: number, writeFlags: number): Promise<void>;
  copyRangeTo?(bs: BlockNode, src: BdrvChild, srcOffset: number, dst: BdrvChild, dstOffset: number, bytes: number, readFlags: number, writeFlags: number): Promise<void>;

  snapshotCreate?(bs: BlockNode, sn: SnapshotInfo): Promise<void>;
  snapshotGoto?(bs: BlockNode, idOrName: string): Promise<void>;
  snapshotDelete?(bs: BlockNode, id: string | undefined, name: string | undefined): Promise<void>;
  snapshotList?(bs: BlockNode): Promise<SnapshotInfo[]>;
  /** Switches a read-only node to a snapshot's tables until it is closed (QEMU's bdrv_snapshot_load_tmp); ENOENT when no snapshot matches both given keys. */
  snapshotLoadTmp?(bs: BlockNode, id: string | undefined, name: string | undefined): Promise<void>;
  saveVmstate?(bs: BlockNode, buf: Uint8Array, pos: number): Promise<void>;
  loadVmstate?(bs: BlockNode, buf: Uint8Array, pos: number): Promise<void>;

  getInfo?(bs: BlockNode): Promise<BlockDriverInfo>;
  getSpecificInfo?(bs: BlockNode): Promise<ImageInfoSpecific | undefined>;
  changeBackingFile?(bs: BlockNode, backingFile: string, backingFmt: string | undefined): Promise<void>;
  /** Checks (and with `fix`, repairs) the image; `progress` may be told how far it is. */
  check?(bs: BlockNode, fix: number, progress?: ProgressFn): Promise<CheckResult>;
  amend?(bs: BlockNode, opts: CreateOptions, force: boolean, progress?: ProgressFn): Promise<void>;
  /**
   * Drops every guest cluster of the active layer so the image reads through
   * to its backing file again (QEMU's bdrv_make_empty); snapshots keep theirs.
   */
  makeEmpty?(bs: BlockNode): Promise<void>;
  /** True when a freshly created image reads as zeroes everywhere. */
  hasZeroInit?(bs: BlockNode): boolean;

  /** Whether the image can hold persistent dirty bitmaps at all (QEMU's bdrv_supports_persistent_dirty_bitmap). */
  supportsPersistentDirtyBitmap?(bs: BlockNode): boolean;
  /** Throws QEMU's message unless a new persistent bitmap `name` could be stored (bdrv_co_can_store_new_dirty_bitmap). */
  canStoreNewDirtyBitmap?(bs: BlockNode, name: string, granularity: number): Promise<void>;
  /** Removes the named persistent bitmap from the image now; a missing one is not an error (bdrv_co_remove_persistent_dirty_bitmap). */
  removePersistentDirtyBitmap?(bs: BlockNode, name: string): Promise<void>;

  drainBegin?(bs: BlockNode): void;
  drainEnd?(bs: BlockNode): void;
  reopenPrepare?(state: ReopenState): Promise<void>;
  reopenCommit?(state: ReopenState): void;
  reopenAbort?(state: ReopenState): void;
  /**
   * After every node of the reopen committed and the permissions apply (QEMU's
   * bdrv_reopen_commit_post). The reopen has taken effect; an error thrown here
   * (a failed repair) is reported as the reopen's error.
   */
  reopenCommitPost?(state: ReopenState): Promise<void>;
  /** Drop cached metadata (after another process may have changed the file). */
  invalidateCache?(bs: BlockNode): Promise<void>;
  /**
   * A debug event (QEMU's bdrv_co_debug_event / BLKDBG_EVENT) reached this node;
   * only blkdebug listens. May suspend (breakpoints) or reject (injected errors).
   */
  debugEvent?(bs: BlockNode, event: string): Promise<void>;
}
