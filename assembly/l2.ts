// qcow2 L2 decoding: classifies the entries of a cached L2 slice (standard
// 8-byte or extended 16-byte entries) into subcluster types and counts how far
// a type and host contiguity reach (QEMU's qcow2_get_subcluster_type and
// count_contiguous_subclusters). l2Runs repeats the scan so that a whole guest
// range becomes a list of runs in one call: a 1 MiB read over 64 KiB clusters
// costs one call, not sixteen.
//
// This must agree with the JS reference (jsL2Kernel in
// src/formats/qcow2/cluster.ts) on every input; the property tests compare them.

// Subcluster types, as QEMU's QCow2SubclusterType (and SC in cluster.ts).
const UNALLOCATED_PLAIN: i32 = 0;
const UNALLOCATED_ALLOC: i32 = 1;
const ZERO_PLAIN: i32 = 2;
const ZERO_ALLOC: i32 = 3;
const NORMAL: i32 = 4;
const COMPRESSED: i32 = 5;
const INVALID: i32 = 6;

const HI_COPIED: u32 = 0x80000000;
const HI_COMPRESSED: u32 = 0x40000000;
/** L2E_OFFSET_MASK (bits 9..55) split into 32-bit halves. */
const HI_OFFSET_MASK: u32 = 0x00ffffff;
const LO_OFFSET_MASK: u32 = 0xfffffe00;
/** High words from this value up put the offset at or past 2^53, which JS numbers cannot address. */
const HI_OFFSET_LIMIT: u32 = 0x200000;

/** Geometry flags packed into one argument: cluster bits, subcluster bits, extended L2, external data file. */
const GEOM_EXTENDED: u32 = 1 << 16;
const GEOM_DATA_FILE: u32 = 1 << 17;

/**
 * Layout of one result record (32 bytes), shared by l2Scan and l2Runs:
 * type i32 @0, count i32 @4 (subclusters), invalidIndex i32 @8, entryHi u32 @12,
 * entryLo u32 @16, hostCluster f64 @24 (-1 when at or past 2^53).
 */
export const L2_RECORD_BYTES: i32 = 32;

// @ts-ignore: decorator
@inline
function be32(p: usize): u32 {
  return bswap<u32>(load<u32>(p));
}

// @ts-ignore: decorator
@inline
function lowMask(n: i32): u32 {
  return n >= 32 ? 0xffffffff : (<u32>1 << n) - 1;
}

/** Cluster-level classification folded into subcluster types (qcow2_get_subcluster_type). */
function classify(hi: u32, lo: u32, bmHi: u32, bmLo: u32, sc: i32, geom: u32): i32 {
  if (hi & HI_COMPRESSED) return COMPRESSED;
  const hasOffset = (hi & HI_OFFSET_MASK) != 0 || (lo & LO_OFFSET_MASK) != 0;
  const dataFile = (geom & GEOM_DATA_FILE) != 0;
  if (!(geom & GEOM_EXTENDED)) {
    if (lo & 1) return hasOffset ? ZERO_ALLOC : ZERO_PLAIN;
    // Offset 0 is a real cluster in an external data file; COPIED disambiguates.
    if (!hasOffset) return dataFile && (hi & HI_COPIED) != 0 ? NORMAL : UNALLOCATED_PLAIN;
    return NORMAL;
  }
  const allocated = hasOffset || (dataFile && (hi & HI_COPIED) != 0);
  const zeroBit = (bmHi >>> sc) & 1;
  const allocBit = (bmLo >>> sc) & 1;
  if (allocated) {
    if ((bmHi & bmLo) != 0) return INVALID;
    if (zeroBit) return ZERO_ALLOC;
    if (allocBit) return NORMAL;
    return UNALLOCATED_ALLOC;
  }
  if (bmLo != 0) return INVALID;
  return zeroBit ? ZERO_PLAIN : UNALLOCATED_PLAIN;
}

/** Run length inside one entry from subcluster `from` (qcow2_get_subcluster_range_type), or -1 when invalid. */
function rangeInEntry(type: i32, bmHi: u32, bmLo: u32, from: i32, perCluster: i32, geom: u32): i32 {
  if (type == INVALID) return -1;
  if (!(geom & GEOM_EXTENDED) || type == COMPRESSED) return perCluster - from;
  if (type == NORMAL) return <i32>ctz<u32>(~(bmLo | lowMask(from))) - from;
  if (type == ZERO_PLAIN || type == ZERO_ALLOC) return <i32>ctz<u32>(~(bmHi | lowMask(from))) - from;
  return <i32>ctz<u32>((bmHi | bmLo) & ~lowMask(from)) - from;
}

// @ts-ignore: decorator
@inline
function hasHost(type: i32): bool {
  return type == NORMAL || type == ZERO_ALLOC || type == UNALLOCATED_ALLOC;
}

/**
 * Classifies subcluster `scIndex` of the first of `nbClusters` entries at
 * `entries` (entry number `firstIndex` of its slice, used only to report
 * invalid entries) and counts the subclusters from there that share its type
 * and, for types with a host cluster, contiguous host offsets. Compressed
 * clusters count one cluster at most. Writes one record at `out`.
 */
export function l2Scan(entries: usize, firstIndex: i32, scIndex: i32, nbClusters: i32, geom: u32, out: usize): void {
  const extended = (geom & GEOM_EXTENDED) != 0;
  const entrySize: usize = extended ? 16 : 8;
  const perCluster: i32 = extended ? 32 : 1;
  const clusterSize = <f64>(<u64>1 << (geom & 0xff));
  let count: i32 = 0;
  let expectedType = NORMAL;
  let checkOffset = false;
  let expected: f64 = 0;
  for (let i: i32 = 0; i < nbClusters; i++) {
    const p = entries + <usize>i * entrySize;
    const hi = be32(p);
    const lo = be32(p + 4);
    const bmHi = extended ? be32(p + 8) : 0;
    const bmLo = extended ? be32(p + 12) : 0;
    const first = i == 0 ? scIndex : 0;
    const type = classify(hi, lo, bmHi, bmLo, first, geom);
    const n = rangeInEntry(type, bmHi, bmLo, first, perCluster, geom);
    if (n < 0) {
      store<i32>(out, INVALID);
      store<i32>(out, 0, 4);
      store<i32>(out, firstIndex + i, 8);
      if (i == 0) {
        store<u32>(out, hi, 12);
        store<u32>(out, lo, 16);
      }
      return;
    }
    const hostHi = hi & HI_OFFSET_MASK;
    const host: f64 = hostHi >= HI_OFFSET_LIMIT ? -1 : <f64>((<u64>hostHi << 32) | <u64>(lo & LO_OFFSET_MASK));
    if (i == 0) {
      store<i32>(out, type);
      store<u32>(out, hi, 12);
      store<u32>(out, lo, 16);
      store<i32>(out, -1, 8);
      store<f64>(out, hasHost(type) ? host : 0, 24);
      if (type == COMPRESSED) {
        store<i32>(out, n, 4);
        return;
      }
      expectedType = type;
      expected = host;
      checkOffset = hasHost(type);
    } else if (type != expectedType) {
      break;
    } else if (checkOffset) {
      expected += clusterSize;
      if (host != expected) break;
    }
    count += n;
    if (first + n < perCluster) break;
  }
  store<i32>(out, count, 4);
}

/**
 * Decodes the guest range that starts at subcluster `scIndex` of the first of
 * `nbClusters` entries at `entries` into at most `maxRuns` records at `out`,
 * each what l2Scan reports for the position where the previous run ended.
 * Stops after an invalid record. Returns the number of records written.
 */
export function l2Runs(entries: usize, firstIndex: i32, scIndex: i32, nbClusters: i32, geom: u32, out: usize, maxRuns: i32): i32 {
  const extended = (geom & GEOM_EXTENDED) != 0;
  const entrySize: usize = extended ? 16 : 8;
  const perCluster: i32 = extended ? 32 : 1;
  let idx: i32 = 0;
  let sc = scIndex;
  let runs: i32 = 0;
  while (idx < nbClusters && runs < maxRuns) {
    const rec = out + <usize>runs * <usize>L2_RECORD_BYTES;
    l2Scan(entries + <usize>idx * entrySize, firstIndex + idx, sc, nbClusters - idx, geom, rec);
    runs++;
    const count = load<i32>(rec, 4);
    if (load<i32>(rec) == INVALID || count <= 0) break;
    const total = sc + count;
    idx += total / perCluster;
    sc = total % perCluster;
  }
  return runs;
}
