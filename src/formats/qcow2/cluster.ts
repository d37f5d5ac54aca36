/**
 * Guest-to-host mapping (QEMU's block/qcow2-cluster.c, read side): L1 → L2
 * slice → subcluster type and host offset, for standard and extended L2
 * entries. The scan over one L2 slice is the L2Kernel, a pure function of the
 * slice bytes so a wasm kernel can replace it; everything around it (L1, the
 * cache, corruption checks) stays here.
 */
import { BlockError } from '../../core/errors.ts';
import { hex } from './header.ts';

/** Subcluster types, as QEMU's QCow2SubclusterType (standard L2 entries use one subcluster per cluster). */
export const SC = {
  UNALLOCATED_PLAIN: 0,
  /** Extended L2: the cluster has a host offset but this subcluster is not allocated (reads from backing). */
  UNALLOCATED_ALLOC: 1,
  ZERO_PLAIN: 2,
  /** Reads as zero but has (or keeps) a host cluster: "preallocated zero cluster". */
  ZERO_ALLOC: 3,
  NORMAL: 4,
  COMPRESSED: 5,
  INVALID: 6,
} as const;
export type SubclusterType = (typeof SC)[keyof typeof SC];

/** Entry flag bits in the high word of an L2/L1 entry. */
const HI_COPIED = 0x80000000;
const HI_COMPRESSED = 0x40000000;
/** L2E_OFFSET_MASK split into 32-bit halves: bits 9..55. */
const HI_OFFSET_MASK = 0x00ffffff;
const LO_OFFSET_MASK = 0xfffffe00;
/** Offsets from 2^53 up cannot be addressed with JS numbers; they are corrupt for us. */
const HI_OFFSET_LIMIT = 0x200000;

/** What the L2 kernel needs to know about the image. */
export interface L2Geometry {
  clusterBits: number;
  subclusterBits: number;
  /** Extended L2 entries (16 bytes, with the allocation/zero bitmap). */
  extended: boolean;
  /** External data file: offset 0 with the COPIED flag is a valid data cluster. */
  hasDataFile: boolean;
}

/** Result of one L2Kernel scan; reused between calls to avoid allocation on the hot path. */
export interface L2Scan {
  /** Type of the first subcluster. */
  type: SubclusterType;
  /** Subclusters from the starting one that share type and contiguity; 0 with type INVALID on a bad entry. */
  count: number;
  /** Index (in the slice) of the invalid entry when type is INVALID. */
  invalidIndex: number;
  /** Host cluster offset of the first entry (types with a host cluster); -1 if it is at or past 2^53. */
  hostCluster: number;
  /** The first entry's raw words (the compressed descriptor for COMPRESSED). */
  entryHi: number;
  entryLo: number;
}

/** Creates an empty scan result. */
export function newL2Scan(): L2Scan {
  return { type: SC.UNALLOCATED_PLAIN, count: 0, invalidIndex: -1, hostCluster: 0, entryHi: 0, entryLo: 0 };
}

/** The hot loop over an L2 slice. */
export interface L2Kernel {
  /**
   * Classifies the subcluster `scIndex` of entry `l2Index` in `slice` and counts
   * how many subclusters from there, over at most `nbClusters` entries, have
   * the same type and (for types with a host cluster) contiguous host offsets
   * (QEMU's count_contiguous_subclusters). Compressed clusters count one
   * cluster at most.
   */
  scan(slice: Uint8Array, l2Index: number, scIndex: number, nbClusters: number, g: L2Geometry, out: L2Scan): void;
}

function be32(b: Uint8Array, o: number): number {
  return ((b[o]! << 24) >>> 0) + ((b[o + 1]! << 16) | (b[o + 2]! << 8) | b[o + 3]!);
}

/** Cluster-level classification of an entry (QEMU's qcow2_get_cluster_type folded into subcluster types). */
function classify(hi: number, lo: number, bmHi: number, bmLo: number, sc: number, g: L2Geometry): SubclusterType {
  if (hi & HI_COMPRESSED) return SC.COMPRESSED;
  const hasOffset = (hi & HI_OFFSET_MASK) !== 0 || (lo & LO_OFFSET_MASK) !== 0;
  if (!g.extended) {
    if (lo & 1) return hasOffset ? SC.ZERO_ALLOC : SC.ZERO_PLAIN;
    if (!hasOffset) {
      // Offset 0 is a real cluster in an external data file; COPIED disambiguates.
      return g.hasDataFile && hi & HI_COPIED ? SC.NORMAL : SC.UNALLOCATED_PLAIN;
    }
    return SC.NORMAL;
  }
  const allocated = hasOffset || (g.hasDataFile && (hi & HI_COPIED) !== 0);
  const zeroBit = sc >= 0 ? (bmHi >>> sc) & 1 : 0;
  const allocBit = sc >= 0 ? (bmLo >>> sc) & 1 : 0;
  if (allocated) {
    if ((bmHi & bmLo) !== 0) return SC.INVALID;
    if (zeroBit) return SC.ZERO_ALLOC;
    if (allocBit) return SC.NORMAL;
    return SC.UNALLOCATED_ALLOC;
  }
  if (bmLo !== 0) return SC.INVALID;
  return zeroBit ? SC.ZERO_PLAIN : SC.UNALLOCATED_PLAIN;
}

/** Number of trailing one bits of a 32-bit value (cto32). */
function cto32(v: number): number {
  let n = 0;
  v >>>= 0;
  while (n < 32 && (v & 1)) { v >>>= 1; n++; }
  return n;
}

/** Number of trailing zero bits of a 32-bit value (ctz32; 32 for 0). */
function ctz32(v: number): number {
  v >>>= 0;
  if (v === 0) return 32;
  return 31 - Math.clz32(v & -v);
}

/** Mask of bits [0, n) for n in 0..32. */
function lowMask(n: number): number {
  return n >= 32 ? 0xffffffff : ((1 << n) - 1) >>> 0;
}

/** QEMU's qcow2_get_subcluster_range_type: run length inside one entry from subcluster `from`, or -1 if invalid. */
function rangeInEntry(type: SubclusterType, bmHi: number, bmLo: number, from: number, perCluster: number, g: L2Geometry): number {
  if (type === SC.INVALID) return -1;
  if (!g.extended || type === SC.COMPRESSED) return perCluster - from;
  switch (type) {
    case SC.NORMAL:
      return cto32((bmLo | lowMask(from)) >>> 0) - from;
    case SC.ZERO_PLAIN:
    case SC.ZERO_ALLOC:
      return cto32((bmHi | lowMask(from)) >>> 0) - from;
    default:
      return ctz32(((bmHi | bmLo) & ~lowMask(from)) >>> 0) - from;
  }
}

/** The JS reference implementation of L2Kernel. */
export const jsL2Kernel: L2Kernel = {
  scan(slice, l2Index, scIndex, nbClusters, g, out) {
    const entrySize = g.extended ? 16 : 8;
    const perCluster = g.extended ? 32 : 1;
    const clusterSize = 2 ** g.clusterBits;
    let count = 0;
    let expectedType: SubclusterType = SC.NORMAL;
    let checkOffset = false;
    let expected = 0;
    for (let i = 0; i < nbClusters; i++) {
      const o = (l2Index + i) * entrySize;
      const hi = be32(slice, o);
      const lo = be32(slice, o + 4);
      const bmHi = g.extended ? be32(slice, o + 8) : 0;
      const bmLo = g.extended ? be32(slice, o + 12) : 0;
      const first = i === 0 ? scIndex : 0;
      const type = classify(hi, lo, bmHi, bmLo, first, g);
      const n = rangeInEntry(type, bmHi, bmLo, first, perCluster, g);
      if (n < 0) {
        if (i === 0) {
          out.type = SC.INVALID;
          out.count = 0;
          out.invalidIndex = l2Index;
          out.entryHi = hi;
          out.entryLo = lo;
          return;
        }
        // QEMU reports the invalid entry even when it would only end the run.
        out.type = SC.INVALID;
        out.count = 0;
        out.invalidIndex = l2Index + i;
        return;
      }
      const hostHi = hi & HI_OFFSET_MASK;
      const host = hostHi >= HI_OFFSET_LIMIT ? -1 : hostHi * 0x100000000 + ((lo & LO_OFFSET_MASK) >>> 0);
      if (i === 0) {
        out.type = type;
        out.entryHi = hi;
        out.entryLo = lo;
        out.invalidIndex = -1;
        out.hostCluster = type === SC.NORMAL || type === SC.ZERO_ALLOC || type === SC.UNALLOCATED_ALLOC ? host : 0;
        if (type === SC.COMPRESSED) {
          out.count = n;
          return;
        }
        expectedType = type;
        expected = host;
        checkOffset = type === SC.NORMAL || type === SC.ZERO_ALLOC || type === SC.UNALLOCATED_ALLOC;
      } else if (type !== expectedType) {
        break;
      } else if (checkOffset) {
        expected += clusterSize;
        if (host !== expected) break;
      }
      count += n;
      if (first + n < perCluster) break;
    }
    out.count = count;
  },
};

/**
 * jsL2Kernel.scan of exactly one standard (non-extended) entry, straight-line:
 * the mapping of a request inside one cluster, the commonest there is, where
 * the general loop and the wasm call's fixed cost both outweigh two loads.
 */
export function scanOneStandard(slice: Uint8Array, l2Index: number, hasDataFile: boolean, out: L2Scan): void {
  const o = l2Index * 8;
  const hi = ((slice[o]! << 24) | (slice[o + 1]! << 16) | (slice[o + 2]! << 8) | slice[o + 3]!) >>> 0;
  const lo = ((slice[o + 4]! << 24) | (slice[o + 5]! << 16) | (slice[o + 6]! << 8) | slice[o + 7]!) >>> 0;
  out.entryHi = hi;
  out.entryLo = lo;
  out.invalidIndex = -1;
  out.count = 1;
  const hostHi = hi & HI_OFFSET_MASK;
  const hostLo = (lo & LO_OFFSET_MASK) >>> 0;
  if (hi & HI_COMPRESSED) {
    out.type = SC.COMPRESSED;
    out.hostCluster = 0;
    return;
  }
  const hasOffset = hostHi !== 0 || hostLo !== 0;
  let type: SubclusterType;
  if (lo & 1) type = hasOffset ? SC.ZERO_ALLOC : SC.ZERO_PLAIN;
  else if (hasOffset) type = SC.NORMAL;
  else type = hasDataFile && hi & HI_COPIED ? SC.NORMAL : SC.UNALLOCATED_PLAIN;
  out.type = type;
  out.hostCluster = type === SC.NORMAL || type === SC.ZERO_ALLOC ? (hostHi >= HI_OFFSET_LIMIT ? -1 : hostHi * 0x100000000 + hostLo) : 0;
}

let kernel: L2Kernel = jsL2Kernel;

/** The L2 kernel in use. */
export function l2Kernel(): L2Kernel {
  return kernel;
}

/** Installs a faster L2 kernel (wasm); it must agree with jsL2Kernel. */
export function setL2Kernel(k: L2Kernel): void {
  kernel = k;
}

/** What the mapping needs from the driver state. */
export interface MappingContext {
  geometry: L2Geometry;
  version: number;
  /** L1 table as on disk. */
  l1: Uint8Array;
  l1Size: number;
  /** Entries per L2 slice (the L2 cache entry size / entry bytes). */
  l2SliceEntries: number;
  /** L2 entries per table. */
  l2Entries: number;
  /**
   * Loads (through the cache) the L2 slice at host offset `offset`; on a cache
   * miss it refuses a slice past the end of the file with `describe()`.
   */
  loadL2Slice(offset: number, describe: () => string): Uint8Array | Promise<Uint8Array>;
  /** The cached L2 slice at host offset `offset`, counted as a use, or undefined (then loadL2Slice loads it). */
  lookupL2Slice?(offset: number): Uint8Array | undefined;
  /** Builds the error for a corruption (QEMU's qcow2_signal_corruption, fatal). */
  corruption(message: string): BlockError;
}

/** One mapped extent: where `bytes` guest bytes from `offset` live. */
export interface HostMapping {
  type: SubclusterType;
  /** Bytes from the asked offset with this mapping (> 0). */
  bytes: number;
  /** Host offset of the asked guest offset (types with a host cluster), else 0. */
  hostOffset: number;
  /** Compressed descriptor for COMPRESSED: raw entry words. */
  entryHi: number;
  entryLo: number;
}

/** Host cluster offset stored in L1 entry `i` (L1E_OFFSET_MASK), or -1 past 2^53. */
export function l1Entry(l1: Uint8Array, i: number): number {
  const hi = be32(l1, 8 * i) & HI_OFFSET_MASK;
  const lo = be32(l1, 8 * i + 4) & LO_OFFSET_MASK;
  if (hi >= HI_OFFSET_LIMIT) return -1;
  return hi * 0x100000000 + (lo >>> 0);
}

const scanScratch = newL2Scan();

/** Creates an empty mapping result for mapExtent. */
export function newHostMapping(): HostMapping {
  return { type: SC.UNALLOCATED_PLAIN, bytes: 0, hostOffset: 0, entryHi: 0, entryLo: 0 };
}

/**
 * QEMU's qcow2_get_host_offset into `out`: maps guest `offset` for up to
 * `bytes` bytes to a subcluster type, host offset and the length that shares
 * them (never crossing an L2 slice). With the L2 slice cached (or no L2 table)
 * the answer is there on return and the result is undefined; on a cache miss
 * the returned promise fills `out` once the slice is loaded. Corrupt metadata
 * throws (or rejects with) the error from ctx.corruption with QEMU's wording.
 */
export function mapExtent(ctx: MappingContext, offset: number, bytes: number, out: HostMapping): Promise<void> | undefined {
  const g = ctx.geometry;
  // Cluster bits are at most 21, so the shift is exact.
  // Every divisor below is a power of two, so floor-division and subtraction are exact; they are
  // used instead of % because offsets past 2^31 are doubles, where % is a slow library call.
  const clusterSize = 1 << g.clusterBits;
  const clusterIndex = Math.floor(offset / clusterSize);
  const offsetInCluster = offset - clusterIndex * clusterSize;
  const sliceEntries = ctx.l2SliceEntries;
  const sliceIndex = clusterIndex - Math.floor(clusterIndex / sliceEntries) * sliceEntries;
  let needed = bytes + offsetInCluster;
  const available = (ctx.l2SliceEntries - sliceIndex) * clusterSize;
  if (needed > available) needed = available;
  out.type = SC.UNALLOCATED_PLAIN;
  out.hostOffset = 0;
  out.entryHi = 0;
  out.entryLo = 0;
  const l1Index = Math.floor(clusterIndex / ctx.l2Entries);
  if (l1Index < ctx.l1Size) {
    const l2Offset = l1Entry(ctx.l1, l1Index);
    if (l2Offset !== 0) {
      if (l2Offset < 0 || l2Offset !== Math.floor(l2Offset / clusterSize) * clusterSize) {
        throw ctx.corruption(`L2 table offset ${l2Offset < 0 ? 'beyond 2^53' : hex(l2Offset)} unaligned (L1 index: ${hex(l1Index)})`);
      }
      const l2Index = clusterIndex - l1Index * ctx.l2Entries;
      const entryBytes = g.extended ? 16 : 8;
      const sliceOffset = l2Offset + (l2Index - sliceIndex) * entryBytes;
      // Cache hits come back synchronously; only misses pay for a continuation.
      const loaded = ctx.lookupL2Slice?.(sliceOffset) ?? ctx.loadL2Slice(sliceOffset, () => `L2 table offset ${hex(l2Offset)} beyond the end of the image file (L1 index: ${hex(l1Index)})`);
      if (loaded instanceof Uint8Array) {
        scanSlice(ctx, loaded, offset, offsetInCluster, sliceIndex, needed, l2Offset, out);
        return undefined;
      }
      return loaded.then((slice) => scanSlice(ctx, slice, offset, offsetInCluster, sliceIndex, needed, l2Offset, out));
    }
  }
  out.bytes = needed - offsetInCluster;
  return undefined;
}

/** The L2-slice half of mapExtent: runs the L2 kernel once and checks what it found. */
function scanSlice(ctx: MappingContext, slice: Uint8Array, offset: number, offsetInCluster: number, sliceIndex: number, needed: number, l2Offset: number, out: HostMapping): void {
  const g = ctx.geometry;
  const clusterSize = 1 << g.clusterBits;
  const scIndex = offsetInCluster >>> g.subclusterBits;
  const nbClusters = Math.ceil(needed / clusterSize);
  const s = scanScratch;
  // One standard entry is a couple of loads: the wasm call's fixed cost (pointer checks, results
  // area) would outweigh it; from two entries on the kernel pays.
  if (nbClusters === 1 && !g.extended) scanOneStandard(slice, sliceIndex, g.hasDataFile, s);
  else kernel.scan(slice, sliceIndex, scIndex, nbClusters, g, s);
  const type = s.type;
  if (ctx.version < 3 && (type === SC.ZERO_PLAIN || type === SC.ZERO_ALLOC)) {
    throw ctx.corruption(`Zero cluster entry found in pre-v3 image (L2 offset: ${hex(l2Offset)}, L2 index: ${hex(sliceIndex)})`);
  }
  if (type === SC.INVALID || s.count <= 0) {
    throw ctx.corruption(`Invalid cluster entry found  (L2 offset: ${hex(l2Offset)}, L2 index: ${hex(s.invalidIndex >= 0 ? s.invalidIndex : sliceIndex)})`);
  }
  out.type = type;
  out.entryHi = s.entryHi;
  out.entryLo = s.entryLo;
  if (type === SC.COMPRESSED) {
    if (g.hasDataFile) {
      throw ctx.corruption(`Compressed cluster entry found in image with external data file (L2 offset: ${hex(l2Offset)}, L2 index: ${hex(sliceIndex)})`);
    }
  } else if (type === SC.NORMAL || type === SC.ZERO_ALLOC || type === SC.UNALLOCATED_ALLOC) {
    const host = s.hostCluster;
    if (host < 0 || host !== Math.floor(host / clusterSize) * clusterSize) {
      throw ctx.corruption(`Cluster allocation offset ${host < 0 ? 'beyond 2^53' : hex(host)} unaligned (L2 offset: ${hex(l2Offset)}, L2 index: ${hex(sliceIndex)})`);
    }
    if (g.hasDataFile && host !== offset - offsetInCluster) {
      throw ctx.corruption(`External data file host cluster offset ${hex(host)} does not match guest cluster offset: ${hex(offset - offsetInCluster)}, L2 index: ${hex(sliceIndex)})`);
    }
    out.hostOffset = host + offsetInCluster;
  }
  let got = (s.count + scIndex) * (1 << g.subclusterBits);
  if (got > needed) got = needed;
  out.bytes = got - offsetInCluster;
}

/**
 * QEMU's qcow2_get_host_offset: maps guest `offset` for up to `bytes` bytes to
 * a subcluster type, host offset and the length that shares them (never
 * crossing an L2 slice). Corrupt metadata yields the error from
 * ctx.corruption with QEMU's wording.
 */
export async function getHostOffset(ctx: MappingContext, offset: number, bytes: number): Promise<HostMapping> {
  const result = newHostMapping();
  const p = mapExtent(ctx, offset, bytes, result);
  if (p) await p;
  return result;
}

/**
 * QEMU's qcow2_parse_compressed_l2_entry: host offset and byte length of a
 * compressed cluster's data (the sector count is rounded, so the length runs
 * to the end of the last 512-byte sector the data touches).
 */
export function parseCompressedEntry(hi: number, lo: number, clusterBits: number): { offset: number; size: number } {
  const entry = (BigInt(hi >>> 0) << 32n) | BigInt(lo >>> 0);
  const csizeShift = BigInt(62 - (clusterBits - 8));
  const csizeMask = (1n << BigInt(clusterBits - 8)) - 1n;
  const offsetMask = (1n << csizeShift) - 1n;
  const coffset = entry & offsetMask;
  const sectors = ((entry >> csizeShift) & csizeMask) + 1n;
  const size = sectors * 512n - (coffset & 511n);
  if (coffset > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw new BlockError('EIO', 'qcow2: Image is corrupt: compressed cluster offset beyond 2^53');
  }
  return { offset: Number(coffset), size: Number(size) };
}
