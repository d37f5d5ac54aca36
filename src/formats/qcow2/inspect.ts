/**
 * qcow2 introspection for the image inspector: the header with every field's
 * position, the extensions, the feature bits by name, L1 and L2 entries
 * decoded, refcounts, and a map of what each host cluster holds.
 *
 * Everything is read from the image file itself rather than from the open
 * driver's caches: the inspector shows what is on storage (the same bytes its
 * host hex view shows), and the driver's state stays private to the driver.
 * Callers flush a writable image first so the file is current.
 */
import type { BdrvChild } from '../../core/child.ts';
import { BlockError } from '../../core/errors.ts';
import { bdrvGetLength, bdrvPread } from '../../core/io.ts';
import { HBitmap } from '../../core/hbitmap.ts';
import { bitmapInfoList, readBitmapDirectory } from './bitmap.ts';
import { parseCompressedEntry } from './cluster.ts';
import {
  COMPRESSION_TYPE_NAMES,
  EXT,
  extensionsEnd,
  HDR,
  INCOMPAT,
  LIMITS,
  parseExtensions,
  parseHeader,
  QEMU_FEATURE_TABLE,
  type FeatureName,
  type Qcow2Extensions,
  type Qcow2Header,
} from './header.ts';
import { refcountKernel } from './refcount.ts';
import { readSnapshots } from './snapshot.ts';

/** One fixed header field: where it is and what it holds. */
export interface HeaderField {
  /** Field name as in docs/interop/qcow2.txt. */
  name: string;
  offset: number;
  size: number;
  /** Decimal value (64-bit fields as decimal strings so nothing is rounded). */
  value: string;
}

/** One feature bit that is set, with the name the image (or QEMU) gives it. */
export interface FeatureBit {
  kind: 'incompatible' | 'compatible' | 'autoclear';
  bit: number;
  name: string;
  /** False when neither the image's feature table nor QEMU's knows the bit. */
  known: boolean;
}

/** One header extension with its position in the first cluster. */
export interface HeaderExtension {
  magic: number;
  /** Known extensions by their qcow2.txt name, others 'unknown'. */
  name: string;
  /** Offset of the extension's 8-byte header in the file. */
  offset: number;
  length: number;
}

/** The qcow2 header as the inspector shows it. */
export interface Qcow2HeaderView {
  version: number;
  clusterBits: number;
  clusterSize: number;
  virtualSize: number;
  l1Size: number;
  l1TableOffset: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  refcountOrder: number;
  refcountBits: number;
  nbSnapshots: number;
  snapshotsOffset: number;
  headerLength: number;
  compressionType: string;
  cryptMethod: number;
  extendedL2: boolean;
  subclusterSize: number;
  /** Guest bytes one L2 table maps. */
  l2Coverage: number;
  /** Entries in one L2 table. */
  l2Entries: number;
  /** Entries in one refcount block. */
  refblockEntries: number;
  incompatibleFeatures: string;
  compatibleFeatures: string;
  autoclearFeatures: string;
  features: FeatureBit[];
  featureTable: FeatureName[];
  fields: HeaderField[];
  extensions: HeaderExtension[];
  backingFile?: string;
  backingFormat?: string;
  dataFile?: string;
  /** Length of the image file in bytes. */
  fileLength: number;
}

/** Decoded L1 entry. */
export interface L1EntryView {
  index: number;
  /** First guest byte the entry's L2 table maps. */
  guestOffset: number;
  /** Host offset of the L2 table, 0 when there is none. */
  l2Offset: number;
  /** QCOW_OFLAG_COPIED: refcount is exactly one, so the table may be written in place. */
  copied: boolean;
  /** The raw entry as 16 hex digits. */
  raw: string;
}

/** What an L2 entry says about its guest cluster. */
export type L2EntryType = 'unallocated' | 'normal' | 'zero' | 'zero-alloc' | 'compressed' | 'invalid';

/** Decoded L2 entry. */
export interface L2EntryView {
  index: number;
  guestOffset: number;
  type: L2EntryType;
  /** Host offset of the data cluster (normal and zero-alloc) or of the compressed bytes. */
  hostOffset?: number;
  /** Length of the compressed bytes (rounded to the sectors the descriptor counts). */
  compressedSize?: number;
  copied: boolean;
  /** Extended L2: subclusters allocated (bit i = subcluster i). */
  allocBitmap?: number;
  /** Extended L2: subclusters reading as zeroes. */
  zeroBitmap?: number;
  raw: string;
}

/** What a run of host clusters holds. */
export type HostExtentKind =
  | 'header'
  | 'l1'
  | 'l2'
  | 'refcount-table'
  | 'refcount-block'
  | 'snapshot-table'
  | 'snapshot-l1'
  | 'snapshot-l2'
  | 'bitmap-directory'
  | 'bitmap-table'
  | 'bitmap-data'
  | 'data'
  | 'compressed'
  | 'snapshot-data'
  | 'crypto-header'
  | 'unused'
  | 'leaked';

/** A run of the image file with one role. */
export interface HostExtent {
  start: number;
  length: number;
  kind: HostExtentKind;
  /** Guest offset at `start` for data and compressed runs of the active L1 table. */
  guestOffset?: number;
}

const FEATURE_KINDS = ['incompatible', 'compatible', 'autoclear'] as const;

/** Formats a 64-bit entry as 16 hex digits. */
function hex64(hi: number, lo: number): string {
  return (hi >>> 0).toString(16).padStart(8, '0') + (lo >>> 0).toString(16).padStart(8, '0');
}

function be32(b: Uint8Array, o: number): number {
  return ((b[o]! << 24) | (b[o + 1]! << 16) | (b[o + 2]! << 8) | b[o + 3]!) >>> 0;
}

/** A 64-bit offset from its halves masked to bits 9..55, or -1 past 2^53. */
function offsetOf(hi: number, lo: number): number {
  const h = hi & 0x00ffffff;
  if (h >= 0x200000) return -1;
  return h * 0x100000000 + ((lo & 0xfffffe00) >>> 0);
}

/** Reads the first cluster (or as much of it as the file has) and parses the header and extensions. */
export async function readHeader(file: BdrvChild): Promise<{ header: Qcow2Header; ext: Qcow2Extensions; first: Uint8Array; fileLength: number }> {
  const fileLength = await bdrvGetLength(file.bs);
  const small = await bdrvPread(file, 0, Math.min(112, fileLength));
  const bits = small.length >= 24 ? be32(small, HDR.clusterBits) : 0;
  const want = bits >= LIMITS.MIN_CLUSTER_BITS && bits <= LIMITS.MAX_CLUSTER_BITS ? Math.min(2 ** bits, fileLength) : small.length;
  const first = want > small.length ? await bdrvPread(file, 0, want) : small;
  const header = parseHeader(first);
  const ext = parseExtensions(first, header, extensionsEnd(header));
  return { header, ext, first, fileLength };
}

/** Walks the extension area for each extension's position (parseExtensions validates; this only locates). */
function locateExtensions(first: Uint8Array, h: Qcow2Header): HeaderExtension[] {
  const names = new Map<number, string>([
    [EXT.BACKING_FORMAT, 'backing file format name'],
    [EXT.FEATURE_TABLE, 'feature name table'],
    [EXT.CRYPTO_HEADER, 'full disk encryption header pointer'],
    [EXT.BITMAPS, 'bitmaps'],
    [EXT.DATA_FILE, 'external data file name'],
  ]);
  const out: HeaderExtension[] = [];
  const end = Math.min(extensionsEnd(h), first.length);
  let off = h.headerLength;
  while (off + 8 <= end) {
    const magic = be32(first, off);
    const length = be32(first, off + 4);
    if (magic === EXT.END) break;
    out.push({ magic, name: names.get(magic) ?? 'unknown', offset: off, length });
    off += 8 + ((length + 7) & ~7);
  }
  return out;
}

/** The header of a qcow2 image file, decoded field by field for display. */
export async function inspectHeader(file: BdrvChild): Promise<Qcow2HeaderView> {
  const { header: h, ext, first, fileLength } = await readHeader(file);
  const dv = new DataView(first.buffer, first.byteOffset, first.byteLength);
  const u64 = (o: number): string => (o + 8 <= first.length ? dv.getBigUint64(o).toString() : '0');
  const u32 = (o: number): string => (o + 4 <= first.length ? String(dv.getUint32(o)) : '0');
  const fields: HeaderField[] = [
    { name: 'magic', offset: HDR.magic, size: 4, value: `0x${dv.getUint32(0).toString(16)}` },
    { name: 'version', offset: HDR.version, size: 4, value: u32(HDR.version) },
    { name: 'backing_file_offset', offset: HDR.backingFileOffset, size: 8, value: u64(HDR.backingFileOffset) },
    { name: 'backing_file_size', offset: HDR.backingFileSize, size: 4, value: u32(HDR.backingFileSize) },
    { name: 'cluster_bits', offset: HDR.clusterBits, size: 4, value: u32(HDR.clusterBits) },
    { name: 'size', offset: HDR.size, size: 8, value: u64(HDR.size) },
    { name: 'crypt_method', offset: HDR.cryptMethod, size: 4, value: u32(HDR.cryptMethod) },
    { name: 'l1_size', offset: HDR.l1Size, size: 4, value: u32(HDR.l1Size) },
    { name: 'l1_table_offset', offset: HDR.l1TableOffset, size: 8, value: u64(HDR.l1TableOffset) },
    { name: 'refcount_table_offset', offset: HDR.refcountTableOffset, size: 8, value: u64(HDR.refcountTableOffset) },
    { name: 'refcount_table_clusters', offset: HDR.refcountTableClusters, size: 4, value: u32(HDR.refcountTableClusters) },
    { name: 'nb_snapshots', offset: HDR.nbSnapshots, size: 4, value: u32(HDR.nbSnapshots) },
    { name: 'snapshots_offset', offset: HDR.snapshotsOffset, size: 8, value: u64(HDR.snapshotsOffset) },
  ];
  if (h.version >= 3) {
    fields.push(
      { name: 'incompatible_features', offset: HDR.incompatibleFeatures, size: 8, value: `0x${h.incompatibleFeatures.toString(16)}` },
      { name: 'compatible_features', offset: HDR.compatibleFeatures, size: 8, value: `0x${h.compatibleFeatures.toString(16)}` },
      { name: 'autoclear_features', offset: HDR.autoclearFeatures, size: 8, value: `0x${h.autoclearFeatures.toString(16)}` },
      { name: 'refcount_order', offset: HDR.refcountOrder, size: 4, value: u32(HDR.refcountOrder) },
      { name: 'header_length', offset: HDR.headerLength, size: 4, value: u32(HDR.headerLength) },
    );
    if (h.headerLength > HDR.compressionType) fields.push({ name: 'compression_type', offset: HDR.compressionType, size: 1, value: String(h.compressionType) });
  }
  const table = ext.featureTable.length > 0 ? ext.featureTable : QEMU_FEATURE_TABLE;
  const features: FeatureBit[] = [];
  const masks = [h.incompatibleFeatures, h.compatibleFeatures, h.autoclearFeatures];
  masks.forEach((mask, type) => {
    for (let bit = 0; bit < 64; bit++) {
      if ((mask & (1n << BigInt(bit))) === 0n) continue;
      const named = table.find((f) => f.type === type && f.bit === bit) ?? QEMU_FEATURE_TABLE.find((f) => f.type === type && f.bit === bit);
      features.push({ kind: FEATURE_KINDS[type]!, bit, name: named?.name ?? `bit ${bit}`, known: named !== undefined });
    }
  });
  const clusterSize = 2 ** h.clusterBits;
  const extendedL2 = (h.incompatibleFeatures & INCOMPAT.EXTL2) !== 0n;
  const l2Entries = clusterSize / (extendedL2 ? 16 : 8);
  const view: Qcow2HeaderView = {
    version: h.version,
    clusterBits: h.clusterBits,
    clusterSize,
    virtualSize: h.size,
    l1Size: h.l1Size,
    l1TableOffset: h.l1TableOffset,
    refcountTableOffset: h.refcountTableOffset,
    refcountTableClusters: h.refcountTableClusters,
    refcountOrder: h.refcountOrder,
    refcountBits: 2 ** h.refcountOrder,
    nbSnapshots: h.nbSnapshots,
    snapshotsOffset: h.snapshotsOffset,
    headerLength: h.headerLength,
    compressionType: COMPRESSION_TYPE_NAMES[h.compressionType] ?? String(h.compressionType),
    cryptMethod: h.cryptMethod,
    extendedL2,
    subclusterSize: extendedL2 ? clusterSize / LIMITS.EXTL2_SUBCLUSTERS : clusterSize,
    l2Coverage: l2Entries * clusterSize,
    l2Entries,
    refblockEntries: (clusterSize * 8) / 2 ** h.refcountOrder,
    incompatibleFeatures: `0x${h.incompatibleFeatures.toString(16)}`,
    compatibleFeatures: `0x${h.compatibleFeatures.toString(16)}`,
    autoclearFeatures: `0x${h.autoclearFeatures.toString(16)}`,
    features,
    featureTable: ext.featureTable,
    fields,
    extensions: locateExtensions(first, h),
    fileLength,
  };
  if (h.backingFileOffset !== 0) {
    view.backingFile = new TextDecoder().decode(first.subarray(h.backingFileOffset, h.backingFileOffset + h.backingFileSize));
  }
  if (ext.backingFormat !== undefined) view.backingFormat = ext.backingFormat;
  if (ext.dataFile !== undefined) view.dataFile = ext.dataFile;
  return view;
}

/** Clamps a [start, start+count) window to [0, size). */
function window(start: number, count: number, size: number): [number, number] {
  const s = Math.max(0, Math.min(Math.floor(start), size));
  return [s, Math.max(0, Math.min(Math.floor(count), size - s))];
}

/** Entries [start, start+count) of the active L1 table. */
export async function readL1(file: BdrvChild, h: Qcow2Header, start: number, count: number): Promise<L1EntryView[]> {
  const [s, n] = window(start, count, h.l1Size);
  if (n === 0) return [];
  const buf = await bdrvPread(file, h.l1TableOffset + 8 * s, 8 * n);
  const clusterSize = 2 ** h.clusterBits;
  const l2Coverage = (clusterSize / ((h.incompatibleFeatures & INCOMPAT.EXTL2) !== 0n ? 16 : 8)) * clusterSize;
  const out: L1EntryView[] = [];
  for (let i = 0; i < n; i++) {
    const hi = be32(buf, 8 * i);
    const lo = be32(buf, 8 * i + 4);
    out.push({ index: s + i, guestOffset: (s + i) * l2Coverage, l2Offset: offsetOf(hi, lo), copied: (hi & 0x80000000) !== 0, raw: hex64(hi, lo) });
  }
  return out;
}

/** Decodes one L2 entry (standard or extended) of an image with this header. */
export function decodeL2Entry(buf: Uint8Array, off: number, h: Qcow2Header, index: number, guestOffset: number): L2EntryView {
  const hi = be32(buf, off);
  const lo = be32(buf, off + 4);
  const extended = (h.incompatibleFeatures & INCOMPAT.EXTL2) !== 0n;
  const copied = (hi & 0x80000000) !== 0;
  const e: L2EntryView = { index, guestOffset, type: 'unallocated', copied, raw: hex64(hi, lo) };
  if (hi & 0x40000000) {
    const c = parseCompressedEntry(hi, lo, h.clusterBits);
    e.type = 'compressed';
    e.hostOffset = c.offset;
    e.compressedSize = c.size;
    return e;
  }
  const host = offsetOf(hi, lo);
  if (host < 0) {
    e.type = 'invalid';
    return e;
  }
  if (extended) {
    const alloc = be32(buf, off + 12);
    const zero = be32(buf, off + 8);
    e.allocBitmap = alloc;
    e.zeroBitmap = zero;
    e.raw += ` ${hex64(zero, alloc)}`;
    if (host !== 0) e.hostOffset = host;
    if (alloc & zero) e.type = 'invalid';
    else if (host === 0 && alloc !== 0) e.type = 'invalid';
    else if (zero === 0xffffffff) e.type = host !== 0 ? 'zero-alloc' : 'zero';
    else if (alloc !== 0) e.type = 'normal';
    else e.type = host !== 0 ? 'normal' : 'unallocated';
    return e;
  }
  const zeroFlag = (lo & 1) !== 0 && h.version >= 3;
  if (host !== 0) e.hostOffset = host;
  if (zeroFlag) e.type = host !== 0 ? 'zero-alloc' : 'zero';
  else if (host !== 0 || copied) e.type = 'normal';
  return e;
}

/** Entries [start, start+count) of the L2 table that L1 entry `l1Index` points at ([] when it has none). */
export async function readL2(file: BdrvChild, h: Qcow2Header, l1Index: number, start: number, count: number): Promise<L2EntryView[]> {
  const [l1] = await readL1(file, h, l1Index, 1);
  if (!l1 || l1.l2Offset <= 0) return [];
  const clusterSize = 2 ** h.clusterBits;
  const entryBytes = (h.incompatibleFeatures & INCOMPAT.EXTL2) !== 0n ? 16 : 8;
  const [s, n] = window(start, count, clusterSize / entryBytes);
  if (n === 0) return [];
  const buf = await bdrvPread(file, l1.l2Offset + s * entryBytes, n * entryBytes);
  const out: L2EntryView[] = [];
  for (let i = 0; i < n; i++) out.push(decodeL2Entry(buf, i * entryBytes, h, s + i, l1.guestOffset + (s + i) * clusterSize));
  return out;
}

/** Refcounts of host clusters [start, start+count) (0 where no refcount block covers them). */
export async function readRefcounts(file: BdrvChild, h: Qcow2Header, start: number, count: number): Promise<number[]> {
  const clusterSize = 2 ** h.clusterBits;
  const perBlock = (clusterSize * 8) / 2 ** h.refcountOrder;
  const tableEntries = (h.refcountTableClusters * clusterSize) / 8;
  const first = Math.max(0, Math.floor(start));
  const n = Math.max(0, Math.min(Math.floor(count), 1 << 20));
  const out: number[] = new Array<number>(n).fill(0);
  const k = refcountKernel();
  let i = 0;
  while (i < n) {
    const cluster = first + i;
    const ti = Math.floor(cluster / perBlock);
    const inBlock = Math.min(n - i, perBlock - (cluster % perBlock));
    if (ti < tableEntries) {
      const t = await bdrvPread(file, h.refcountTableOffset + 8 * ti, 8);
      const block = offsetOf(be32(t, 0), be32(t, 4));
      if (block > 0) {
        const buf = await bdrvPread(file, block, clusterSize);
        for (let j = 0; j < inBlock; j++) out[i + j] = k.get(buf, (cluster % perBlock) + j, h.refcountOrder);
      }
    }
    i += inBlock;
  }
  return out;
}

const KINDS: readonly HostExtentKind[] = [
  'unused', 'header', 'l1', 'l2', 'refcount-table', 'refcount-block', 'snapshot-table', 'snapshot-l1', 'snapshot-l2',
  'bitmap-directory', 'bitmap-table', 'bitmap-data', 'data', 'compressed', 'snapshot-data', 'crypto-header', 'leaked',
];

/**
 * Roles of the file's clusters in typed arrays (one byte and one guest offset
 * per cluster): a Map per cluster would cost tens of bytes each on big files.
 * The first role marked on a cluster wins.
 */
class HostMap {
  private readonly kinds: Uint8Array;
  private readonly guest: Float64Array;

  constructor(
    private readonly clusterSize: number,
    private readonly clusters: number,
  ) {
    this.kinds = new Uint8Array(clusters);
    this.guest = new Float64Array(clusters).fill(-1);
  }

  /** Marks the clusters covering [offset, offset+length) (clusters past the end of the file are ignored). */
  mark(offset: number, length: number, kind: HostExtentKind, guestOffset = -1): void {
    if (offset < 0 || length <= 0) return;
    const first = Math.floor(offset / this.clusterSize);
    const last = Math.min(this.clusters - 1, Math.floor((offset + length - 1) / this.clusterSize));
    const k = KINDS.indexOf(kind);
    for (let c = first; c <= last; c++) {
      if (this.kinds[c] !== 0) continue;
      this.kinds[c] = k;
      if (guestOffset >= 0) this.guest[c] = guestOffset + (c - first) * this.clusterSize;
    }
  }

  /** Runs over the file's clusters; unmarked clusters are 'unused', or 'leaked' when their refcount is not 0. */
  extents(refcount: (cluster: number) => number): HostExtent[] {
    const out: HostExtent[] = [];
    const cs = this.clusterSize;
    for (let c = 0; c < this.clusters; c++) {
      const marked = this.kinds[c]!;
      const kind: HostExtentKind = marked !== 0 ? KINDS[marked]! : refcount(c) > 0 ? 'leaked' : 'unused';
      const guest = this.guest[c]!;
      const last = out[out.length - 1];
      const contiguousGuest = last !== undefined && (last.guestOffset === undefined ? guest < 0 : guest === last.guestOffset + last.length);
      if (last && last.kind === kind && contiguousGuest) {
        last.length += cs;
        continue;
      }
      const e: HostExtent = { start: c * cs, length: cs, kind };
      if (guest >= 0) e.guestOffset = guest;
      out.push(e);
    }
    return out;
  }
}

/** How hostLayout reports progress and checks for cancellation. */
export type LayoutStep = (done: number, total: number) => Promise<void>;

/**
 * What every host cluster of the image file holds: header, tables, refcount
 * structures, snapshot and bitmap metadata, data of the active L1 table (with
 * its guest offset), data only snapshots use, and clusters nothing
 * references (unused, or leaked when their refcount says otherwise).
 * Reads every L2 table once, so its cost is the metadata's size.
 */
export async function hostLayout(file: BdrvChild, step: LayoutStep = async () => undefined): Promise<HostExtent[]> {
  const { header: h, ext, fileLength } = await readHeader(file);
  const cs = 2 ** h.clusterBits;
  const map = new HostMap(cs, Math.ceil(fileLength / cs));
  const extended = (h.incompatibleFeatures & INCOMPAT.EXTL2) !== 0n;
  // With an external data file, L2 entries point into that file, not this one.
  const dataHere = (h.incompatibleFeatures & INCOMPAT.DATA_FILE) === 0n;
  const entryBytes = extended ? 16 : 8;
  const l2Entries = cs / entryBytes;
  map.mark(0, cs, 'header');
  if (ext.crypto) map.mark(ext.crypto.offset, ext.crypto.length, 'crypto-header');
  map.mark(h.refcountTableOffset, h.refcountTableClusters * cs, 'refcount-table');
  // Refcount blocks, and the refcounts themselves for telling leaks from free space.
  const reftable = await bdrvPread(file, h.refcountTableOffset, Math.min(h.refcountTableClusters * cs, LIMITS.MAX_REFTABLE_SIZE));
  const perBlock = (cs * 8) / 2 ** h.refcountOrder;
  const blocks = new Map<number, Uint8Array>();
  for (let i = 0; i < reftable.length / 8; i++) {
    const off = offsetOf(be32(reftable, 8 * i), be32(reftable, 8 * i + 4));
    if (off <= 0 || off >= fileLength) continue;
    map.mark(off, cs, 'refcount-block');
    blocks.set(i, await bdrvPread(file, off, cs));
  }
  const k = refcountKernel();
  const refcountOf = (c: number): number => {
    const b = blocks.get(Math.floor(c / perBlock));
    return b ? k.get(b, c % perBlock, h.refcountOrder) : 0;
  };

  // Active L1 and its L2 tables first, so shared clusters are shown as the guest sees them.
  const walkL1 = async (l1Offset: number, l1Size: number, active: boolean): Promise<void> => {
    if (l1Size === 0) return;
    const l1 = await bdrvPread(file, l1Offset, l1Size * 8);
    map.mark(l1Offset, l1Size * 8, active ? 'l1' : 'snapshot-l1');
    for (let i = 0; i < l1Size; i++) {
      const l2 = offsetOf(be32(l1, 8 * i), be32(l1, 8 * i + 4));
      if (l2 <= 0 || l2 >= fileLength) continue;
      map.mark(l2, cs, active ? 'l2' : 'snapshot-l2');
      const table = await bdrvPread(file, l2, cs);
      for (let j = 0; j < l2Entries; j++) {
        const e = decodeL2Entry(table, j * entryBytes, h, j, (i * l2Entries + j) * cs);
        if (!dataHere || e.hostOffset === undefined || e.hostOffset <= 0) continue;
        if (e.type === 'compressed') map.mark(e.hostOffset, e.compressedSize ?? 1, active ? 'compressed' : 'snapshot-data', active ? e.guestOffset : -1);
        else if (e.type === 'normal' || e.type === 'zero-alloc') map.mark(e.hostOffset, cs, active ? 'data' : 'snapshot-data', active ? e.guestOffset : -1);
      }
      await step(i + 1, l1Size);
    }
  };
  await walkL1(h.l1TableOffset, h.l1Size, true);
  if (h.nbSnapshots > 0) {
    const { snapshots, size } = await readSnapshots(file, h.snapshotsOffset, h.nbSnapshots, h.size);
    map.mark(h.snapshotsOffset, size, 'snapshot-table');
    for (const sn of snapshots) await walkL1(sn.l1TableOffset, sn.l1Size, false);
  }
  if (ext.bitmaps) {
    map.mark(ext.bitmaps.directoryOffset, ext.bitmaps.directorySize, 'bitmap-directory');
    for (const b of await readBitmapDirectory(file, ext.bitmaps)) {
      if (b.tableOffset <= 0) continue;
      map.mark(b.tableOffset, b.tableSize * 8, 'bitmap-table');
      const t = await bdrvPread(file, b.tableOffset, b.tableSize * 8);
      for (let i = 0; i < b.tableSize; i++) {
        const off = offsetOf(be32(t, 8 * i), be32(t, 8 * i + 4));
        if (off > 1) map.mark(off, cs, 'bitmap-data');
      }
    }
  }
  return map.extents(refcountOf);
}

/** Throws unless the node's driver is qcow2 (the inspector's table views need one). */
export function requireQcow2(format: string, node: string): void {
  if (format !== 'qcow2') throw new BlockError('ENOTSUP', `'${node}' is a ${format} image; only qcow2 images have L1/L2 and refcount tables`, { node });
}

/** Most dirty runs a bitmap is listed in (an alternating bitmap over a huge disk is cut off there). */
const MAX_DIRTY_RUNS = 65536;
/** Largest bitmap read for display: 2^31 bits (256 MiB of bits), e.g. 128 TiB at 64 KiB granularity. */
const MAX_BITMAP_BITS = 2 ** 31;

/** The dirty areas of `bm` below `size` as [offset, length] runs, at most MAX_DIRTY_RUNS of them (`truncated` when more exist). */
export function dirtyRuns(bm: HBitmap, size: number): { runs: Array<[number, number]>; truncated: boolean } {
  const runs: Array<[number, number]> = [];
  for (let pos = 0; pos < size; ) {
    const a = bm.nextDirtyArea(pos, size);
    if (!a) break;
    if (runs.length === MAX_DIRTY_RUNS) return { runs, truncated: true };
    runs.push([a.offset, a.bytes]);
    pos = a.offset + a.bytes;
  }
  return { runs, truncated: false };
}

/** A persistent dirty bitmap as stored in the image file. */
export interface StoredBitmapView {
  name: string;
  granularity: number;
  /** Directory flags by name ('in-use', 'auto'). */
  flags: string[];
  /** Dirty runs [offset, length] in guest bytes, merged, in order. */
  runs: Array<[number, number]>;
  /** Guest bytes the dirty bits cover (up to the disk size). */
  dirtyBytes: number;
  /** More runs exist than `runs` lists. */
  truncated: boolean;
}

/**
 * The dirty runs of persistent bitmap `name` as its bitmap table stores
 * them (QEMU's load_bitmap_data): table entries of 0 are clear chunks, the
 * all-ones flag marks chunks fully dirty, other entries point at clusters
 * holding the bits. A bitmap marked in use is read as stored; it may be
 * out of date, which its 'in-use' flag says.
 */
export async function readStoredBitmap(file: BdrvChild, h: Qcow2Header, ext: Qcow2Extensions, name: string): Promise<StoredBitmapView> {
  if (!ext.bitmaps) throw new BlockError('ENOENT', `Dirty bitmap '${name}' not found`);
  const entry = (await readBitmapDirectory(file, ext.bitmaps)).find((b) => b.name === name);
  if (!entry) throw new BlockError('ENOENT', `Dirty bitmap '${name}' not found`);
  const [info] = bitmapInfoList([entry]);
  if (entry.granularityBits < 9 || entry.granularityBits > 31) throw new BlockError('EINVAL', `Bitmap '${name}' has an invalid granularity (2^${entry.granularityBits} bytes)`);
  const granularity = 2 ** entry.granularityBits;
  if (Math.ceil(h.size / granularity) > MAX_BITMAP_BITS) throw new BlockError('EFBIG', `Bitmap '${name}' is too large to display`);
  const bm = new HBitmap(h.size, granularity);
  try {
    const cs = 2 ** h.clusterBits;
    const want = bm.tableSize(cs);
    if (entry.tableSize !== want) throw new BlockError('EINVAL', `Bitmap '${name}' has a table of ${entry.tableSize} entries; ${want} expected`);
    const table = want > 0 ? await bdrvPread(file, entry.tableOffset, want * 8) : new Uint8Array(0);
    for (let i = 0; i < want; i++) {
      const hi = be32(table, 8 * i);
      const lo = be32(table, 8 * i + 4);
      const off = offsetOf(hi, lo);
      if (off < 0) throw new BlockError('EINVAL', `Bitmap '${name}' table entry ${i} is invalid`);
      if (off === 0) {
        if (lo & 1) bm.deserializeChunk(i, cs, 'ones');
        continue;
      }
      bm.deserializeChunk(i, cs, await bdrvPread(file, off, cs));
    }
    const { runs, truncated } = dirtyRuns(bm, h.size);
    return { name, granularity, flags: info!.flags, runs, dirtyBytes: Math.min(bm.count(), h.size), truncated };
  } finally {
    bm.dispose();
  }
}
