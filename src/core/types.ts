/**
 * Flags, permission bits, limits and status bits of the block layer. Values
 * follow QEMU's include/block/block-common.h so traces read the same.
 */

/** Request flags (QEMU's BdrvRequestFlags). */
export const REQ = {
  COPY_ON_READ: 0x1,
  ZERO_WRITE: 0x2,
  /** A zero write may deallocate (unmap) the range instead of writing zeroes. */
  MAY_UNMAP: 0x4,
  /** Force unit access: the data is on stable storage when the request completes. */
  FUA: 0x10,
  WRITE_COMPRESSED: 0x20,
  /** The write does not change the data (copy-on-read, commit of identical data). */
  WRITE_UNCHANGED: 0x40,
  /** Serialise with every overlapping request (set by read-modify-write). */
  SERIALISING: 0x80,
  /** Fail with ENOTSUP instead of emulating a zero write with a buffer of zeroes. */
  NO_FALLBACK: 0x100,
  PREFETCH: 0x200,
  NO_WAIT: 0x400,
} as const;

/** Open flags (QEMU's BDRV_O_*). */
export const OPEN = {
  RDWR: 0x0002,
  /** Guess-free open: the format was not probed. */
  NO_BACKING: 0x0100,
  NOCACHE: 0x0020,
  CACHE_WB: 0x0040,
  NO_FLUSH: 0x0200,
  COPY_ON_READ: 0x0400,
  INACTIVE: 0x0800,
  CHECK: 0x1000,
  ALLOW_RDWR: 0x2000,
  UNMAP: 0x4000,
  PROTOCOL: 0x8000,
  NO_IO: 0x10000,
  AUTO_RDONLY: 0x20000,
} as const;

/** Permission bits (QEMU's BLK_PERM_*). */
export const PERM = {
  CONSISTENT_READ: 0x01,
  WRITE: 0x02,
  WRITE_UNCHANGED: 0x04,
  RESIZE: 0x08,
  GRAPH_MOD: 0x10,
  ALL: 0x1f,
} as const;

/** Names of permission bits as QEMU prints them in conflict errors. */
export const PERM_NAMES: ReadonlyArray<[number, string]> = [
  [PERM.CONSISTENT_READ, 'consistent read'],
  [PERM.WRITE, 'write'],
  [PERM.WRITE_UNCHANGED, 'write unchanged'],
  [PERM.RESIZE, 'resize'],
  [PERM.GRAPH_MOD, 'graph mod'],
];

/** Block status bits (QEMU's BDRV_BLOCK_*). */
export const BLOCK = {
  DATA: 0x01,
  ZERO: 0x02,
  OFFSET_VALID: 0x04,
  RAW: 0x08,
  ALLOCATED: 0x10,
  EOF: 0x20,
  RECURSE: 0x40,
  COMPRESSED: 0x80,
} as const;

/** Roles of an edge (QEMU's BdrvChildRole); several may combine. */
export const ROLE = {
  DATA: 0x01,
  METADATA: 0x02,
  FILTERED: 0x04,
  COW: 0x08,
  PRIMARY: 0x10,
  IMAGE: 0x20,
} as const;

/** Edge kinds used in options and in QEMU's child names. */
export type ChildName = 'file' | 'backing' | 'data-file' | string;

/** Transfer limits of a node (QEMU's BlockLimits), all in bytes; 0 = no limit/unset. */
export interface BlockLimits {
  /** Every request reaching the driver is aligned to this (power of two). */
  requestAlignment: number;
  maxTransfer: number;
  optTransfer: number;
  pdiscardAlignment: number;
  maxPdiscard: number;
  pwriteZeroesAlignment: number;
  maxPwriteZeroes: number;
  /** Buffer alignment the storage wants; informative in JS. */
  minMemAlignment: number;
  optMemAlignment: number;
}

/** Limits of a fresh node before its driver refreshes them. */
export function defaultLimits(): BlockLimits {
  return {
    requestAlignment: 1,
    maxTransfer: 0,
    optTransfer: 0,
    pdiscardAlignment: 0,
    maxPdiscard: 0,
    pwriteZeroesAlignment: 0,
    maxPwriteZeroes: 0,
    minMemAlignment: 1,
    optMemAlignment: 1,
  };
}

/** QEMU's BDRV_REQUEST_MAX_BYTES: INT_MAX rounded down to whole sectors; drivers never see larger requests. */
export const BDRV_REQUEST_MAX_BYTES = 0x7fffffff - 511;
/** Largest image length (QEMU aligns INT64_MAX down to 1 GiB; JS numbers stop at 2^53, so we do the same below that). */
export const BDRV_MAX_LENGTH = 2 ** 53 - 2 ** 30;

export type DetectZeroes = 'off' | 'on' | 'unmap';
export type PreallocMode = 'off' | 'metadata' | 'falloc' | 'full';
export const PREALLOC_MODES: readonly PreallocMode[] = ['off', 'metadata', 'falloc', 'full'];

/** Options as given to open: a QEMU blockdev-style tree. */
export interface BlockdevOptions {
  driver?: string;
  'node-name'?: string;
  'read-only'?: boolean;
  'auto-read-only'?: boolean;
  'force-share'?: boolean;
  'detect-zeroes'?: DetectZeroes;
  discard?: 'ignore' | 'unmap';
  cache?: { direct?: boolean; 'no-flush'?: boolean };
  /** A child: nested options, or the name of an existing node. */
  file?: BlockdevOptions | string;
  /** null opens the node without its backing file. */
  backing?: BlockdevOptions | string | null;
  'data-file'?: BlockdevOptions | string;
  [key: string]: unknown;
}

/** One extent of a block-status answer. */
export interface BlockStatus {
  /** BLOCK.* bits. */
  status: number;
  /** Bytes from the asked offset that share this status (> 0). */
  pnum: number;
  /** Host offset in `file`, valid with BLOCK.OFFSET_VALID. */
  map?: number;
  /** The node `map` refers to. */
  file?: import('./node.ts').BlockNode;
}
