/**
 * qcow2 header: the fixed fields, the header extensions, feature bits, and
 * QEMU's validation rules (block/qcow2.c qcow2_do_open and
 * qcow2_read_extensions, docs/interop/qcow2.txt). Parsing works on the first
 * cluster read into memory; serialising produces a whole first cluster the way
 * qcow2_update_header lays it out, keeping unknown fields and extensions.
 */
import { BlockError } from '../../core/errors.ts';

/** 'QFI\xfb'. */
export const QCOW_MAGIC = 0x514649fb;

/** Header extension magics (qcow2.txt "Header extensions"). */
export const EXT = {
  END: 0,
  BACKING_FORMAT: 0xe2792aca,
  FEATURE_TABLE: 0x6803f857,
  CRYPTO_HEADER: 0x0537be77,
  BITMAPS: 0x23852875,
  DATA_FILE: 0x44415441,
} as const;

/** Incompatible feature bits. */
export const INCOMPAT = {
  DIRTY: 1n << 0n,
  CORRUPT: 1n << 1n,
  DATA_FILE: 1n << 2n,
  COMPRESSION: 1n << 3n,
  EXTL2: 1n << 4n,
  MASK: 0x1fn,
} as const;

/** Compatible feature bits. */
export const COMPAT = { LAZY_REFCOUNTS: 1n << 0n, MASK: 1n } as const;

/** Autoclear feature bits. */
export const AUTOCLEAR = { BITMAPS: 1n << 0n, DATA_FILE_RAW: 1n << 1n, MASK: 3n } as const;

/** Compression types (the header's compression_type byte). */
export const COMPRESSION_TYPE = { ZLIB: 0, ZSTD: 1 } as const;
export const COMPRESSION_TYPE_NAMES = ['zlib', 'zstd'] as const;

/** Encryption methods (crypt_method). */
export const CRYPT = { NONE: 0, AES: 1, LUKS: 2 } as const;

/** Limits from block/qcow2.h. */
export const LIMITS = {
  MIN_CLUSTER_BITS: 9,
  MAX_CLUSTER_BITS: 21,
  MAX_L1_SIZE: 32 * 1024 * 1024,
  MAX_REFTABLE_SIZE: 8 * 1024 * 1024,
  MAX_SNAPSHOTS: 65536,
  MAX_SNAPSHOTS_SIZE: 1024 * 65536,
  MAX_SNAPSHOT_EXTRA_DATA: 1024,
  MAX_BITMAPS: 65535,
  MAX_BITMAP_DIRECTORY_SIZE: 1024 * 65535,
  /** Longest backing file name QEMU accepts (bs->backing_file is 1024 bytes with the NUL). */
  MAX_BACKING_NAME: 1023,
  /** bs->backing_format is 16 bytes with the NUL. */
  MAX_BACKING_FORMAT: 15,
  EXTL2_SUBCLUSTERS: 32,
  /** sizeof(QCowSnapshotHeader). */
  SNAPSHOT_HEADER_SIZE: 40,
} as const;

/** sizeof(QCowHeader): the v3 fields plus compression_type and padding. */
export const HEADER_SIZE = 112;
/** Length of a v2 header (up to snapshots_offset). */
export const V2_HEADER_LENGTH = 72;
/** Minimum header_length of a v3 header. */
export const V3_MIN_HEADER_LENGTH = 104;
/** Byte offsets of the fixed fields (QCowHeader). */
export const HDR = {
  magic: 0,
  version: 4,
  backingFileOffset: 8,
  backingFileSize: 16,
  clusterBits: 20,
  size: 24,
  cryptMethod: 32,
  l1Size: 36,
  l1TableOffset: 40,
  refcountTableOffset: 48,
  refcountTableClusters: 56,
  nbSnapshots: 60,
  snapshotsOffset: 64,
  incompatibleFeatures: 72,
  compatibleFeatures: 80,
  autoclearFeatures: 88,
  refcountOrder: 96,
  headerLength: 100,
  compressionType: 104,
} as const;

/** An extension this version does not know, kept byte for byte for header rewrites. */
export interface UnknownExtension {
  magic: number;
  data: Uint8Array;
}

/** One entry of the feature name table (Qcow2Feature). */
export interface FeatureName {
  /** 0 incompatible, 1 compatible, 2 autoclear. */
  type: number;
  bit: number;
  name: string;
}

/** Contents of the bitmaps extension (Qcow2BitmapHeaderExt). */
export interface BitmapsExtension {
  nbBitmaps: number;
  directorySize: number;
  directoryOffset: number;
}

/** The full-disk encryption header pointer (Qcow2CryptoHeaderExtension). */
export interface CryptoExtension {
  offset: number;
  length: number;
}

/**
 * The header as read from the image. 64-bit offsets are plain numbers; a value
 * that does not fit in 2^53 is kept as Infinity so range checks reject it
 * with QEMU's message instead of silently wrapping.
 */
export interface Qcow2Header {
  version: number;
  backingFileOffset: number;
  backingFileSize: number;
  clusterBits: number;
  /** Virtual size in bytes as stored (QEMU rounds it down to sectors for the node length). */
  size: number;
  cryptMethod: number;
  l1Size: number;
  l1TableOffset: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  nbSnapshots: number;
  snapshotsOffset: number;
  incompatibleFeatures: bigint;
  compatibleFeatures: bigint;
  autoclearFeatures: bigint;
  refcountOrder: number;
  headerLength: number;
  compressionType: number;
  /** Bytes between sizeof(QCowHeader) and header_length, kept for rewrites. */
  unknownHeaderFields: Uint8Array;
  /** Table offsets exactly as stored, for QEMU's range checks on values past 2^53. */
  raw?: { l1TableOffset: bigint; refcountTableOffset: bigint; snapshotsOffset: bigint };
}

/** Everything found in the extension area. */
export interface Qcow2Extensions {
  backingFormat?: string;
  dataFile?: string;
  featureTable: FeatureName[];
  crypto?: CryptoExtension;
  /** Set when the bitmaps extension is present and valid (autoclear bit set). */
  bitmaps?: BitmapsExtension;
  /** The bitmaps extension was present but its autoclear bit was clear: it must be dropped on the next header write. */
  staleBitmaps: boolean;
  unknown: UnknownExtension[];
}

function einval(msg: string): BlockError {
  return new BlockError('EINVAL', msg);
}

/** Converts an unsigned 64-bit value to a number, or Infinity when it exceeds 2^53 (never a valid offset or size here). */
export function u64ToNumber(v: bigint): number {
  return v > BigInt(Number.MAX_SAFE_INTEGER) ? Number.POSITIVE_INFINITY : Number(v);
}

/** Reads an unsigned 64-bit big-endian field as a number (Infinity when beyond 2^53). */
export function readU64(dv: DataView, off: number): number {
  return u64ToNumber(dv.getBigUint64(off));
}

/** Formats a number the way QEMU's %#" PRIx64 does (0 stays "0"). */
export function hex(n: number): string {
  return n === 0 ? '0' : `0x${n.toString(16)}`;
}

/**
 * Parses the fixed header from the first bytes of the file (at least
 * HEADER_SIZE, more when header_length is larger) and applies the checks
 * QEMU makes before it looks at anything else: magic, version, cluster size,
 * header length, backing file offset and compression type. Throws BlockError
 * with QEMU's message on the first violation.
 */
export function parseHeader(buf: Uint8Array): Qcow2Header {
  if (buf.length < HEADER_SIZE) {
    const padded = new Uint8Array(HEADER_SIZE);
    padded.set(buf);
    buf = padded;
  }
  const dv = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  if (dv.getUint32(HDR.magic) !== QCOW_MAGIC) throw einval('Image is not in qcow2 format');
  const version = dv.getUint32(HDR.version);
  if (version < 2 || version > 3) throw new BlockError('ENOTSUP', `Unsupported qcow2 version ${version}`);
  const clusterBits = dv.getUint32(HDR.clusterBits);
  if (clusterBits < LIMITS.MIN_CLUSTER_BITS || clusterBits > LIMITS.MAX_CLUSTER_BITS) {
    throw einval(`Unsupported cluster size: 2^${clusterBits}`);
  }
  const clusterSize = 2 ** clusterBits;
  const h: Qcow2Header = {
    version,
    backingFileOffset: readU64(dv, HDR.backingFileOffset),
    backingFileSize: dv.getUint32(HDR.backingFileSize),
    clusterBits,
    size: readU64(dv, HDR.size),
    cryptMethod: dv.getUint32(HDR.cryptMethod),
    l1Size: dv.getUint32(HDR.l1Size),
    l1TableOffset: readU64(dv, HDR.l1TableOffset),
    refcountTableOffset: readU64(dv, HDR.refcountTableOffset),
    refcountTableClusters: dv.getUint32(HDR.refcountTableClusters),
    nbSnapshots: dv.getUint32(HDR.nbSnapshots),
    snapshotsOffset: readU64(dv, HDR.snapshotsOffset),
    incompatibleFeatures: 0n,
    compatibleFeatures: 0n,
    autoclearFeatures: 0n,
    refcountOrder: 4,
    headerLength: V2_HEADER_LENGTH,
    compressionType: COMPRESSION_TYPE.ZLIB,
    unknownHeaderFields: new Uint8Array(0),
    raw: {
      l1TableOffset: dv.getBigUint64(HDR.l1TableOffset),
      refcountTableOffset: dv.getBigUint64(HDR.refcountTableOffset),
      snapshotsOffset: dv.getBigUint64(HDR.snapshotsOffset),
    },
  };
  if (version >= 3) {
    h.incompatibleFeatures = dv.getBigUint64(HDR.incompatibleFeatures);
    h.compatibleFeatures = dv.getBigUint64(HDR.compatibleFeatures);
    h.autoclearFeatures = dv.getBigUint64(HDR.autoclearFeatures);
    h.refcountOrder = dv.getUint32(HDR.refcountOrder);
    h.headerLength = dv.getUint32(HDR.headerLength);
    if (h.headerLength < V3_MIN_HEADER_LENGTH) throw einval('qcow2 header too short');
  }
  if (h.headerLength > clusterSize) throw einval('qcow2 header exceeds cluster size');
  if (h.headerLength > HEADER_SIZE) {
    // The caller passes at least header_length bytes (it is at most one cluster).
    h.unknownHeaderFields = buf.slice(HEADER_SIZE, h.headerLength);
  }
  if (h.backingFileOffset > clusterSize) throw einval('Invalid backing file offset');
  // Older v3 images end at 104 bytes and have no compression_type: that means zlib.
  if (h.headerLength > HDR.compressionType) h.compressionType = dv.getUint8(HDR.compressionType);
  validateCompressionType(h);
  return h;
}

/** QEMU's validate_compression_type: known type, and the incompatible bit set exactly for non-zlib. */
export function validateCompressionType(h: Qcow2Header): void {
  if (h.compressionType !== COMPRESSION_TYPE.ZLIB && h.compressionType !== COMPRESSION_TYPE.ZSTD) {
    throw new BlockError('ENOTSUP', `qcow2: unknown compression type: ${h.compressionType}`);
  }
  const bit = (h.incompatibleFeatures & INCOMPAT.COMPRESSION) !== 0n;
  if (h.compressionType === COMPRESSION_TYPE.ZLIB && bit) {
    throw einval('qcow2: Compression type incompatible feature bit must not be set');
  }
  if (h.compressionType !== COMPRESSION_TYPE.ZLIB && !bit) {
    throw einval('qcow2: Compression type incompatible feature bit must be set');
  }
}

/** End of the extension area: the backing file name if there is one, else the end of the first cluster. */
export function extensionsEnd(h: Qcow2Header): number {
  return h.backingFileOffset !== 0 ? h.backingFileOffset : 2 ** h.clusterBits;
}

/**
 * Parses the header extensions in `first` (the first cluster, or as much of
 * it as the file has) between header_length and `end`, with
 * qcow2_read_extensions' checks and messages. `warn` receives the warnings
 * QEMU prints (stale bitmaps).
 */
export function parseExtensions(first: Uint8Array, h: Qcow2Header, end: number, warn: (msg: string) => void = () => undefined): Qcow2Extensions {
  const clusterSize = 2 ** h.clusterBits;
  const out: Qcow2Extensions = { featureTable: [], staleBitmaps: false, unknown: [] };
  const bytes = (off: number, len: number): Uint8Array => {
    const r = new Uint8Array(len);
    if (off < first.length) r.set(first.subarray(off, Math.min(first.length, off + len)));
    return r;
  };
  let off = h.headerLength;
  while (off < end) {
    const head = new DataView(bytes(off, 8).buffer);
    const magic = head.getUint32(0);
    const len = head.getUint32(4);
    off += 8;
    if (off > end || len > end - off) throw einval('Header extension too large');
    const data = bytes(off, len);
    const dv = new DataView(data.buffer);
    switch (magic) {
      case EXT.END:
        return out;
      case EXT.BACKING_FORMAT:
        if (len > LIMITS.MAX_BACKING_FORMAT) {
          throw einval(`ERROR: ext_backing_format: len=${len} too large (>=${LIMITS.MAX_BACKING_FORMAT + 1})`);
        }
        out.backingFormat = cString(data);
        break;
      case EXT.FEATURE_TABLE:
        out.featureTable = parseFeatureTable(data);
        break;
      case EXT.CRYPTO_HEADER:
        if (h.cryptMethod !== CRYPT.LUKS) throw einval('CRYPTO header extension only expected with LUKS encryption method');
        if (len !== 16) throw einval(`CRYPTO header extension size ${len}, but expected size 16`);
        out.crypto = { offset: readU64(dv, 0), length: readU64(dv, 8) };
        if (out.crypto.offset % clusterSize !== 0) {
          throw einval(`Encryption header offset '${out.crypto.offset}' is not a multiple of cluster size '${clusterSize}'`);
        }
        break;
      case EXT.BITMAPS: {
        if (len !== 24) throw einval('bitmaps_ext: Invalid extension length');
        if ((h.autoclearFeatures & AUTOCLEAR.BITMAPS) === 0n) {
          warn(
            h.version < 3
              ? 'This qcow2 v2 image contains bitmaps, but they may have been modified by a program without persistent bitmap support; so now they must all be considered inconsistent'
              : 'a program lacking bitmap support modified this file, so all bitmaps are now considered inconsistent',
          );
          out.staleBitmaps = true;
          break;
        }
        if (dv.getUint32(4) !== 0) throw einval('bitmaps_ext: Reserved field is not zero');
        const nb = dv.getUint32(0);
        const size = readU64(dv, 8);
        const offset = readU64(dv, 16);
        if (nb > LIMITS.MAX_BITMAPS) {
          throw einval(`bitmaps_ext: Image has ${nb} bitmaps, exceeding the QEMU supported maximum of ${LIMITS.MAX_BITMAPS}`);
        }
        if (nb === 0) throw einval('found bitmaps extension with zero bitmaps');
        if (!Number.isFinite(offset) || offset % clusterSize !== 0) throw einval('bitmaps_ext: invalid bitmap directory offset');
        if (size > LIMITS.MAX_BITMAP_DIRECTORY_SIZE) {
          throw einval(`bitmaps_ext: bitmap directory size (${dv.getBigUint64(8)}) exceeds the maximum supported size (${LIMITS.MAX_BITMAP_DIRECTORY_SIZE})`);
        }
        out.bitmaps = { nbBitmaps: nb, directorySize: size, directoryOffset: offset };
        break;
      }
      case EXT.DATA_FILE:
        out.dataFile = cString(data);
        break;
      default:
        out.unknown.push({ magic, data });
        break;
    }
    off += (len + 7) & ~7;
  }
  return out;
}

/** A NUL-terminated or length-bounded string (QEMU copies len bytes and terminates). */
function cString(data: Uint8Array): string {
  const nul = data.indexOf(0);
  return new TextDecoder().decode(nul >= 0 ? data.subarray(0, nul) : data);
}

/** Decodes the feature name table: 48-byte entries of type, bit and a 46-byte name. */
export function parseFeatureTable(data: Uint8Array): FeatureName[] {
  const out: FeatureName[] = [];
  for (let o = 0; o + 48 <= data.length; o += 48) {
    const name = cString(data.subarray(o + 2, o + 48));
    // QEMU stops at the first entry with an empty name.
    if (name === '') break;
    out.push({ type: data[o]!, bit: data[o + 1]!, name });
  }
  return out;
}

/** The feature table QEMU writes into v3 images with clusters above 4 KiB. */
export const QEMU_FEATURE_TABLE: readonly FeatureName[] = [
  { type: 0, bit: 0, name: 'dirty bit' },
  { type: 0, bit: 1, name: 'corrupt bit' },
  { type: 0, bit: 2, name: 'external data file' },
  { type: 0, bit: 3, name: 'compression type' },
  { type: 0, bit: 4, name: 'extended L2 entries' },
  { type: 1, bit: 0, name: 'lazy refcounts' },
  { type: 2, bit: 0, name: 'bitmaps' },
  { type: 2, bit: 1, name: 'raw external data' },
];

/** QEMU's report_unsupported_feature: names from the table, then the leftover mask in hex. */
export function unsupportedFeatureMessage(table: readonly FeatureName[], mask: bigint): string {
  const names: string[] = [];
  for (const f of table) {
    if (f.type !== 0 || f.bit > 63) continue;
    const bit = 1n << BigInt(f.bit);
    if (mask & bit) {
      names.push(f.name);
      mask &= ~bit;
    }
  }
  if (mask) names.push(`Unknown incompatible feature: ${mask.toString(16)}`);
  return `Unsupported qcow2 feature(s): ${names.join(', ')}`;
}

/**
 * QEMU's qcow2_validate_table: `entries` of `entryLen` bytes must fit in
 * `maxBytes` (EFBIG "<name> too large") and start at a cluster-aligned offset
 * whose end fits in INT64_MAX (EINVAL "<name> offset invalid").
 */
export function validateTable(offset: bigint, entries: number, entryLen: number, maxBytes: number, clusterSize: number, name: string): void {
  if (entries > Math.floor(maxBytes / entryLen)) throw new BlockError('EFBIG', `${name} too large`);
  const INT64_MAX = (1n << 63n) - 1n;
  if (INT64_MAX - BigInt(entries * entryLen) < offset || offset % BigInt(clusterSize) !== 0n) {
    throw einval(`${name} offset invalid`);
  }
}

/** What a header rewrite needs besides the fixed fields. */
export interface HeaderImage {
  header: Qcow2Header;
  extensions: Qcow2Extensions;
  backingFile?: string;
  /** Write the data file extension (only when the image has an external data file). */
  writeDataFile: boolean;
}

/**
 * Lays out a whole first cluster the way qcow2_update_header does: fixed
 * header (v2 stops at 72 bytes), unknown header fields, backing format, data
 * file, crypto pointer, feature table (v3, clusters above 4 KiB), bitmaps,
 * unknown extensions, end marker, backing file name. Throws ENOSPC when it
 * does not fit in one cluster. header_length and the backing name's offset and
 * size are computed here.
 */
export function serializeHeader(img: HeaderImage): Uint8Array {
  const h = img.header;
  const clusterSize = 2 ** h.clusterBits;
  const buf = new Uint8Array(clusterSize);
  const dv = new DataView(buf.buffer);
  const enc = new TextEncoder();
  const headerLength = HEADER_SIZE + h.unknownHeaderFields.length;
  dv.setUint32(HDR.magic, QCOW_MAGIC);
  dv.setUint32(HDR.version, h.version);
  dv.setUint32(HDR.clusterBits, h.clusterBits);
  dv.setBigUint64(HDR.size, BigInt(h.size));
  dv.setUint32(HDR.cryptMethod, h.cryptMethod);
  dv.setUint32(HDR.l1Size, h.l1Size);
  dv.setBigUint64(HDR.l1TableOffset, BigInt(h.l1TableOffset));
  dv.setBigUint64(HDR.refcountTableOffset, BigInt(h.refcountTableOffset));
  dv.setUint32(HDR.refcountTableClusters, h.refcountTableClusters);
  dv.setUint32(HDR.nbSnapshots, h.nbSnapshots);
  dv.setBigUint64(HDR.snapshotsOffset, BigInt(h.snapshotsOffset));
  let pos: number;
  if (h.version >= 3) {
    dv.setBigUint64(HDR.incompatibleFeatures, h.incompatibleFeatures);
    dv.setBigUint64(HDR.compatibleFeatures, h.compatibleFeatures);
    dv.setBigUint64(HDR.autoclearFeatures, h.autoclearFeatures);
    dv.setUint32(HDR.refcountOrder, h.refcountOrder);
    dv.setUint32(HDR.headerLength, headerLength);
    dv.setUint8(HDR.compressionType, h.compressionType);
    pos = HEADER_SIZE;
  } else {
    pos = V2_HEADER_LENGTH;
  }
  const put = (data: Uint8Array): void => {
    if (pos + data.length > clusterSize) throw new BlockError('ENOSPC', 'qcow2 header does not fit in the first cluster');
    buf.set(data, pos);
    pos += data.length;
  };
  const ext = (magic: number, data: Uint8Array): void => {
    const padded = (data.length + 7) & ~7;
    if (pos + 8 + padded > clusterSize) throw new BlockError('ENOSPC', 'qcow2 header does not fit in the first cluster');
    dv.setUint32(pos, magic);
    dv.setUint32(pos + 4, data.length);
    buf.set(data, pos + 8);
    pos += 8 + padded;
  };
  if (h.unknownHeaderFields.length > 0) put(h.unknownHeaderFields);
  const e = img.extensions;
  if (e.backingFormat !== undefined) ext(EXT.BACKING_FORMAT, enc.encode(e.backingFormat));
  if (img.writeDataFile && e.dataFile !== undefined) ext(EXT.DATA_FILE, enc.encode(e.dataFile));
  if (e.crypto && e.crypto.offset !== 0) {
    const c = new Uint8Array(16);
    const cdv = new DataView(c.buffer);
    cdv.setBigUint64(0, BigInt(e.crypto.offset));
    cdv.setBigUint64(8, BigInt(e.crypto.length));
    ext(EXT.CRYPTO_HEADER, c);
  }
  if (h.version >= 3 && clusterSize > 4096) ext(EXT.FEATURE_TABLE, featureTableBytes(QEMU_FEATURE_TABLE));
  if (e.bitmaps && e.bitmaps.nbBitmaps > 0) {
    const b = new Uint8Array(24);
    const bdv = new DataView(b.buffer);
    bdv.setUint32(0, e.bitmaps.nbBitmaps);
    bdv.setBigUint64(8, BigInt(e.bitmaps.directorySize));
    bdv.setBigUint64(16, BigInt(e.bitmaps.directoryOffset));
    ext(EXT.BITMAPS, b);
  }
  for (const u of e.unknown) ext(u.magic, u.data);
  ext(EXT.END, new Uint8Array(0));
  if (img.backingFile !== undefined && img.backingFile !== '') {
    const name = enc.encode(img.backingFile);
    const at = pos;
    put(name);
    dv.setBigUint64(HDR.backingFileOffset, BigInt(at));
    dv.setUint32(HDR.backingFileSize, name.length);
  }
  return buf;
}

/** Encodes feature name table entries (48 bytes each). */
export function featureTableBytes(table: readonly FeatureName[]): Uint8Array {
  const out = new Uint8Array(table.length * 48);
  const enc = new TextEncoder();
  table.forEach((f, i) => {
    out[i * 48] = f.type;
    out[i * 48 + 1] = f.bit;
    out.set(enc.encode(f.name).subarray(0, 46), i * 48 + 2);
  });
  return out;
}
