/**
 * Per-node state of an open qcow2 image (QEMU's BDRVQcow2State) and the small
 * helpers every part of the driver shares: the image lock, L2 entry access,
 * corruption signalling and the metadata overlap check.
 */
import type { BdrvChild } from '../../core/child.ts';
import { BlockError } from '../../core/errors.ts';
import type { BlockNode } from '../../core/node.ts';
import type { MetadataCache } from './cache.ts';
import type { MappingContext } from './cluster.ts';
import { tableSearchKernel } from './kernels.ts';
import { hex, INCOMPAT, type Qcow2Extensions, type Qcow2Header } from './header.ts';
import type { RefcountState } from './refcount.ts';
import type { Qcow2Snapshot } from './snapshot.ts';

/** Why a cluster is freed, which decides whether the file sees a discard (QEMU's enum qcow2_discard_type). */
export type DiscardType = 'never' | 'always' | 'request' | 'snapshot' | 'other';

/** A byte range whose reference is gone in memory but whose refcount drops only after the L2/L1 change is on disk. */
export interface PendingFree {
  offset: number;
  length: number;
  type: DiscardType;
  /** A cluster of the external data file: it has no refcount, only a discard may follow. */
  dataFile?: boolean;
}

/** A FIFO async mutex (QEMU's CoMutex s->lock). */
export class Mutex {
  private tail: Promise<void> = Promise.resolve();
  private held = false;

  /** Whether someone holds the lock. */
  get locked(): boolean {
    return this.held;
  }

  /** Runs `fn` with the lock held; callers queue in arrival order. */
  async run<T>(fn: () => Promise<T>): Promise<T> {
    const prev = this.tail;
    let release!: () => void;
    this.tail = new Promise<void>((r) => (release = r));
    await prev;
    this.held = true;
    try {
      return await fn();
    } finally {
      this.held = false;
      release();
    }
  }
}

/** Overlap-check bits (QEMU's QCow2MetadataOverlap). */
export const OL = {
  MAIN_HEADER: 1 << 0,
  ACTIVE_L1: 1 << 1,
  ACTIVE_L2: 1 << 2,
  REFCOUNT_TABLE: 1 << 3,
  REFCOUNT_BLOCK: 1 << 4,
  SNAPSHOT_TABLE: 1 << 5,
  INACTIVE_L1: 1 << 6,
  INACTIVE_L2: 1 << 7,
  BITMAP_DIRECTORY: 1 << 8,
} as const;

/** Names QEMU prints for each overlap bit, in bit order. */
export const OL_NAMES = ['qcow2_header', 'active L1 table', 'active L2 table', 'refcount table', 'refcount block', 'snapshot table', 'inactive L1 table', 'inactive L2 table', 'bitmap directory'];

/** QEMU's overlap-check templates. */
export const OL_TEMPLATES: Record<string, number> = {
  none: 0,
  constant: OL.MAIN_HEADER | OL.ACTIVE_L1 | OL.REFCOUNT_TABLE | OL.SNAPSHOT_TABLE | OL.BITMAP_DIRECTORY,
  cached: OL.MAIN_HEADER | OL.ACTIVE_L1 | OL.REFCOUNT_TABLE | OL.SNAPSHOT_TABLE | OL.BITMAP_DIRECTORY | OL.ACTIVE_L2 | OL.REFCOUNT_BLOCK | OL.INACTIVE_L1,
  all: 0x1ff,
};

/** Option names of the individual overlap checks, in bit order. */
export const OL_OPTION_NAMES = ['main-header', 'active-l1', 'active-l2', 'refcount-table', 'refcount-block', 'snapshot-table', 'inactive-l1', 'inactive-l2', 'bitmap-directory'];

/** Per-node state of an open qcow2 image. */
export interface Qcow2State {
  header: Qcow2Header;
  ext: Qcow2Extensions;
  clusterBits: number;
  clusterSize: number;
  subclusterBits: number;
  subclusterSize: number;
  subclustersPerCluster: number;
  /** L2 entries per table (l2_size). */
  l2Entries: number;
  l2EntryBytes: number;
  /** Index of the first L1 entry past the disk: the VM state area (l1_vm_state_index). */
  l1VmStateIndex: number;
  l1: Uint8Array;
  l2Cache: MetadataCache;
  refcountCache: MetadataCache;
  refcount: RefcountState;
  /** Where guest data lives: the data-file child, or bs.file. */
  dataFile: BdrvChild;
  hasDataFile: boolean;
  /** Backing file name as stored in the image (image_backing_file). */
  imageBackingFile?: string;
  snapshots: Qcow2Snapshot[];
  snapshotsSize: number;
  mapping: MappingContext;
  /** Result of QEMU's metadata-preallocation detection, computed on first block-status. */
  metadataPreallocation?: boolean;
  cleanTimer?: ReturnType<typeof setInterval>;
  lazyRefcounts: boolean;
  /** Driver options the caches were sized from, for reopen to merge changes into. */
  runtimeOptions: Record<string, unknown>;
  /** Seconds between cache cleanings (0 = never). */
  cleanInterval: number;
  /** Last decompressed cluster, keyed by its descriptor, so small sequential reads inflate once. */
  lastCompressed?: { hi: number; lo: number; data: Uint8Array };
  /** Bumped whenever compressed clusters may have changed (forgetCompressed), so a read that decoded across the change does not cache it. */
  compressedEpoch: number;

  /** Serialises every metadata update (QEMU's s->lock). */
  lock: Mutex;
  /** Lowest cluster index that may be free (free_cluster_index). */
  freeClusterIndex: number;
  /** Next byte for a compressed cluster inside a partly used host cluster (free_byte_offset); 0 = none. */
  freeByteOffset: number;
  /** References dropped in memory; their refcounts fall at the next writeback, after the tables that held them are on disk. */
  pendingFrees: PendingFree[];
  /** L1 indices changed in memory and not yet on disk. */
  l1Dirty: Set<number>;
  /** pass-discard-request / -snapshot / -other. */
  discardPassthrough: { request: boolean; snapshot: boolean; other: boolean };
  /** OL.* bits checked before every write to the image file. */
  overlapCheck: number;
  /** Set once a corruption was signalled on a writable image: every later request fails (QEMU drops bs->drv). */
  broken: boolean;
  /** We set the dirty bit on disk (lazy refcounts) and must clear it on a clean close. */
  dirtyMarked: boolean;
  /** A writeback in progress, so cache pressure inside it does not start another. */
  committing: boolean;
  /** The node, for messages and header writes from helpers. */
  bs: BlockNode;
}

/** Drops the decompressed-cluster cache after compressed clusters may have changed. */
export function forgetCompressed(s: Qcow2State): void {
  delete s.lastCompressed;
  s.compressedEpoch++;
}

/** The state of an open node, or ENOMEDIUM. */
export function state(bs: BlockNode): Qcow2State {
  const s = bs.opaque as Qcow2State | undefined;
  if (!s) throw new BlockError('ENOMEDIUM', undefined, { node: bs.nodeName });
  return s;
}

/** QEMU's qcow2_signal_corruption message on the read side: the request fails with EIO. */
export function corruption(bs: BlockNode, message: string): BlockError {
  return new BlockError('EIO', `qcow2: Image is corrupt: ${message}`, { node: bs.nodeName });
}

// ---------------------------------------------------------------------------
// Raw table access. Entries are big-endian 64-bit words split in two halves
// so flags (bit 63 COPIED, bit 62 COMPRESSED, bit 0 ZERO) stay plain numbers.

/** High 32 bits of the entry at byte offset `o`. */
export function hiWord(b: Uint8Array, o: number): number {
  return ((b[o]! << 24) >>> 0) + ((b[o + 1]! << 16) | (b[o + 2]! << 8) | b[o + 3]!);
}

/** Low 32 bits of the entry at byte offset `o`. */
export function loWord(b: Uint8Array, o: number): number {
  return hiWord(b, o + 4);
}

/** Stores a 64-bit entry from its halves. */
export function setWords(b: Uint8Array, o: number, hi: number, lo: number): void {
  b[o] = hi >>> 24; b[o + 1] = (hi >>> 16) & 0xff; b[o + 2] = (hi >>> 8) & 0xff; b[o + 3] = hi & 0xff;
  b[o + 4] = lo >>> 24; b[o + 5] = (lo >>> 16) & 0xff; b[o + 6] = (lo >>> 8) & 0xff; b[o + 7] = lo & 0xff;
}

/** COPIED flag in the high word: the cluster's refcount is exactly 1. */
export const HI_COPIED = 0x80000000;
/** COMPRESSED flag in the high word of an L2 entry. */
export const HI_COMPRESSED = 0x40000000;
/** Low-word bit of the v3 zero flag (standard L2 entries only). */
export const LO_ZERO = 1;

/** Splits a byte offset into entry halves, with flag bits or-ed into the high half. */
export function offsetWords(offset: number, hiFlags = 0): [number, number] {
  return [(Math.floor(offset / 0x100000000) | hiFlags) >>> 0, offset >>> 0];
}

/** Host offset of a standard entry (L2E_OFFSET_MASK / L1E_OFFSET_MASK), or -1 past 2^53. */
export function entryOffset(hi: number, lo: number): number {
  const h = hi & 0x00ffffff;
  if (h >= 0x200000) return -1;
  return h * 0x100000000 + ((lo & 0xfffffe00) >>> 0);
}

/** Raw L1 entry `i` as halves. */
export function l1Words(s: Qcow2State, i: number): [number, number] {
  return [hiWord(s.l1, 8 * i), loWord(s.l1, 8 * i)];
}

/** Stores an L1 entry in memory and marks its sector for writeback. */
export function setL1(s: Qcow2State, i: number, offset: number, copied: boolean): void {
  const [hi, lo] = offsetWords(offset, copied && offset !== 0 ? HI_COPIED : 0);
  setWords(s.l1, 8 * i, hi, lo);
  s.l1Dirty.add(i);
}

// ---------------------------------------------------------------------------
// Metadata overlap check (QEMU's qcow2_check_metadata_overlap, 'cached' level)

/** L1E_OFFSET_MASK (bits 9..55) and the refcount table's offset mask (bits 9..63) as 32-bit halves. */
const L1E_MASK_HI = 0x00ffffff;
const L1E_MASK_LO = 0xfffffe00;
const REFT_MASK_LO = 0xfffffe00;

function overlapsWith(offset: number, size: number, start: number, len: number): boolean {
  return len > 0 && offset < start + len && start < offset + size;
}

/**
 * The OL bit of the first metadata structure that [offset, offset+size)
 * overlaps, ignoring the kinds in `ign`; 0 when the write is safe. Inactive
 * L2 tables would need reads, so they are checked only with the 'all' level
 * from the snapshot L1 tables the caller supplies.
 */
export function metadataOverlap(s: Qcow2State, ign: number, offset: number, size: number, inactiveL1s?: Uint8Array[]): number {
  const chk = s.overlapCheck & ~ign;
  if (size === 0 || chk === 0) return 0;
  const cs = s.clusterSize;
  if (chk & OL.MAIN_HEADER && offset < cs) return OL.MAIN_HEADER;
  // Align to clusters: metadata is cluster-granular, so a write into any part of its cluster counts.
  const end = Math.ceil((offset + size) / cs) * cs;
  offset = Math.floor(offset / cs) * cs;
  size = end - offset;
  const h = s.header;
  if (chk & OL.ACTIVE_L1 && overlapsWith(offset, size, h.l1TableOffset, h.l1Size * 8)) return OL.ACTIVE_L1;
  if (chk & OL.REFCOUNT_TABLE && overlapsWith(offset, size, s.refcount.tableOffset, s.refcount.table.length)) return OL.REFCOUNT_TABLE;
  if (chk & OL.SNAPSHOT_TABLE && overlapsWith(offset, size, h.snapshotsOffset, s.snapshotsSize)) return OL.SNAPSHOT_TABLE;
  if (chk & OL.INACTIVE_L1) {
    for (const sn of s.snapshots) if (overlapsWith(offset, size, sn.l1TableOffset, sn.l1Size * 8)) return OL.INACTIVE_L1;
  }
  // A table of one cluster at o overlaps [offset, offset+size) when o lies in [offset-cs+1, offset+size):
  // one kernel search over the whole L1 or refcount table instead of a decode per entry.
  const lo = Math.max(1, offset - cs + 1);
  const hi = offset + size;
  const find = tableSearchKernel();
  if (chk & OL.ACTIVE_L2 && find.findInRange(s.l1.subarray(0, 8 * s.mapping.l1Size), L1E_MASK_HI, L1E_MASK_LO, lo, hi) >= 0) return OL.ACTIVE_L2;
  if (chk & OL.REFCOUNT_BLOCK && find.findInRange(s.refcount.usedTable(), 0xffffffff, REFT_MASK_LO, lo, hi) >= 0) return OL.REFCOUNT_BLOCK;
  if (chk & OL.BITMAP_DIRECTORY && s.ext.bitmaps && overlapsWith(offset, size, s.ext.bitmaps.directoryOffset, s.ext.bitmaps.directorySize)) {
    return OL.BITMAP_DIRECTORY;
  }
  if (chk & OL.INACTIVE_L2 && inactiveL1s) {
    for (const l1 of inactiveL1s) if (find.findInRange(l1, L1E_MASK_HI, L1E_MASK_LO, lo, hi) >= 0) return OL.INACTIVE_L2;
  }
  return 0;
}

/** Name of the lowest set overlap bit, as QEMU prints it. */
export function overlapName(bit: number): string {
  return OL_NAMES[31 - Math.clz32(bit & -bit)] ?? 'metadata';
}

/** Describes an offset for messages (QEMU's %#" PRIx64). */
export function hexOffset(n: number): string {
  return hex(n);
}

/** Whether the header says the image is corrupt. */
export function isMarkedCorrupt(s: Qcow2State): boolean {
  return (s.header.incompatibleFeatures & INCOMPAT.CORRUPT) !== 0n;
}
