/**
 * Image creation and size measurement (QEMU's qcow2_co_create,
 * qcow2_co_create_opts and qcow2_measure). Unlike QEMU, which writes a
 * minimal image and then grows it through the write path, create() computes
 * the whole layout up front — header, refcount table and blocks, L1, and for
 * preallocation the L2 tables and data area — and writes it once. Every
 * cluster is referenced exactly once, so `qemu-img check` finds neither
 * leaks nor errors.
 */
import { persistentBitmapsSize } from './bitmap-store.ts';
import { BdrvChild } from '../../core/child.ts';
import type { CreateContext, MeasureInfo, ProgressFn } from '../../core/driver.ts';
import { BlockError, isBlockError } from '../../core/errors.ts';
import { bdrvBlockStatusAbove, bdrvFlush, bdrvGetLength, bdrvPwritev, bdrvTruncate } from '../../core/io.ts';
import type { BlockNode } from '../../core/node.ts';
import type { CreateOptions, OptionSpec, OptionValue } from '../../core/options.ts';
import { parseOptionValue } from '../../core/options.ts';
import { BLOCK, PERM, PREALLOC_MODES, ROLE, type PreallocMode } from '../../core/types.ts';
import {
  AUTOCLEAR,
  COMPAT,
  COMPRESSION_TYPE,
  COMPRESSION_TYPE_NAMES,
  HEADER_SIZE,
  INCOMPAT,
  LIMITS,
  serializeHeader,
  type Qcow2Extensions,
  type Qcow2Header,
} from './header.ts';
import { refcountKernel, refcountMetadataSize } from './refcount.ts';

/** Options qcow2 shares between create and amend, in QEMU 7.2's order (its QCOW_COMMON_OPTIONS). */
const COMMON_OPTIONS: readonly OptionSpec[] = [
  { name: 'size', type: 'size', help: 'Virtual disk size' },
  { name: 'compat', type: 'string', help: 'Compatibility level (v2 [0.10] or v3 [1.1])' },
  { name: 'backing_file', type: 'string', help: 'File name of a base image' },
  { name: 'backing_fmt', type: 'string', help: 'Image format of the base image' },
  { name: 'data_file', type: 'string', help: 'File name of an external data file' },
  { name: 'data_file_raw', type: 'bool', help: 'The external data file must stay valid as a raw image' },
  { name: 'lazy_refcounts', type: 'bool', help: 'Postpone refcount updates', defaultValue: 'off' },
  { name: 'refcount_bits', type: 'number', help: 'Width of a reference count entry in bits', defaultValue: '16' },
];

/**
 * Create options of QEMU 7.2's qcow2 driver in its declaration order, which
 * is the order of the "Formatting …" line (`-o help` sorts them). The
 * encryption options are listed as QEMU lists them; creating an encrypted
 * image fails (see validateEncryption).
 */
export const CREATE_OPTIONS: readonly OptionSpec[] = [
  { name: 'encryption', type: 'bool', help: "Encrypt the image with format 'aes'. (Deprecated in favor of encrypt.format=aes)" },
  { name: 'encrypt.format', type: 'string', help: "Encrypt the image, format choices: 'aes', 'luks'" },
  { name: 'encrypt.key-secret', type: 'string', help: 'ID of secret providing qcow AES key or LUKS passphrase' },
  { name: 'encrypt.cipher-alg', type: 'string', help: 'Name of encryption cipher algorithm' },
  { name: 'encrypt.cipher-mode', type: 'string', help: 'Name of encryption cipher mode' },
  { name: 'encrypt.ivgen-alg', type: 'string', help: 'Name of IV generator algorithm' },
  { name: 'encrypt.ivgen-hash-alg', type: 'string', help: 'Name of IV generator hash algorithm' },
  { name: 'encrypt.hash-alg', type: 'string', help: 'Name of encryption hash algorithm' },
  { name: 'encrypt.iter-time', type: 'number', help: 'Time to spend in PBKDF in milliseconds' },
  { name: 'cluster_size', type: 'size', help: 'qcow2 cluster size', defaultValue: '65536' },
  { name: 'extended_l2', type: 'bool', help: 'Extended L2 tables', defaultValue: 'off' },
  { name: 'preallocation', type: 'string', help: 'Preallocation mode (allowed values: off, metadata, falloc, full)' },
  { name: 'compression_type', type: 'string', help: 'Compression method used for image cluster compression', defaultValue: 'zlib' },
  ...COMMON_OPTIONS,
];

/** Amend options of QEMU 7.2's qcow2 driver (qemu-img amend -o help), in its declaration order. */
export const AMEND_OPTIONS: readonly OptionSpec[] = [
  { name: 'encrypt.state', type: 'string', help: 'Select new state of affected keyslots (active/inactive)' },
  { name: 'encrypt.keyslot', type: 'number', help: 'Select a single keyslot to modify explicitly' },
  { name: 'encrypt.old-secret', type: 'string', help: 'Select all keyslots that match this password' },
  { name: 'encrypt.new-secret', type: 'string', help: 'New secret to set in the matching keyslots. Empty string to erase' },
  { name: 'encrypt.iter-time', type: 'number', help: 'Time to spend in PBKDF in milliseconds' },
  ...COMMON_OPTIONS,
];

/**
 * QEMU's checks of the encryption options, in the order qcow2_co_create_opts
 * and the QAPI visitor make them, with their messages. Where QEMU would go on
 * to look up the secret and set up the cipher, this engine stops: it has no
 * secret objects and no qcow2 encryption.
 */
function validateEncryption(opts: CreateOptions, beforeCreate: boolean): void {
  const legacy = opts.encryption !== undefined ? parseOptionValue({ name: 'encryption', type: 'bool' }, opts.encryption) : undefined;
  const format = opts['encrypt.format'];
  const anyEncrypt = Object.keys(opts).some((k) => k.startsWith('encrypt.') && opts[k] !== undefined);
  if (beforeCreate) {
    if (format !== undefined && legacy !== undefined) throw einval("'encrypt.format' and its alias 'encryption' can't be used at the same time");
    if (format === undefined && legacy !== true && anyEncrypt) throw einval("Parameter 'encrypt.format' is missing");
    if (format !== undefined && format !== 'aes' && format !== 'luks') throw einval(`Parameter 'format' does not accept value '${String(format)}'`);
    return;
  }
  if (format === undefined && legacy !== true) return;
  if (opts['encrypt.key-secret'] === undefined) throw einval("Parameter 'encrypt.key-secret' is required for cipher");
  throw new BlockError('ENOTSUP', 'qcow2: creating encrypted images is not supported: this engine has no secret objects (--object secret) and no qcow2 encryption');
}

const DEFAULT_CLUSTER_SIZE = 65536;

/** Create options after QEMU's validation. */
export interface Qcow2CreateParams {
  size: number;
  version: 2 | 3;
  clusterSize: number;
  refcountOrder: number;
  extendedL2: boolean;
  lazyRefcounts: boolean;
  compressionType: number;
  preallocation: PreallocMode;
  backingFile?: string;
  backingFmt?: string;
  dataFile?: string;
  dataFileRaw: boolean;
}

function opt(opts: CreateOptions, name: string): OptionValue | undefined {
  const v = opts[name];
  if (v === undefined) return undefined;
  const spec = CREATE_OPTIONS.find((o) => o.name === name)!;
  return parseOptionValue(spec, v);
}

function einval(msg: string): BlockError {
  return new BlockError('EINVAL', msg);
}

/**
 * The compat option: 0.10|v2 → 2, 1.1|v3 → 3 (the default). Create goes through
 * QAPI, which names the field 'version'; measure uses qcow2_opt_get_version_del,
 * which knows only the numbered spellings.
 */
function parseVersion(v: OptionValue | undefined, forMeasure = false): 2 | 3 {
  if (v === undefined) return 3;
  if (v === '0.10' || (!forMeasure && v === 'v2')) return 2;
  if (v === '1.1' || (!forMeasure && v === 'v3')) return 3;
  if (forMeasure) throw einval(`Invalid compatibility level: '${String(v)}'`);
  throw einval(`Parameter 'version' does not accept value '${String(v)}'`);
}

/** validate_cluster_size. */
function validateClusterSize(cs: number, extendedL2: boolean): void {
  if (!Number.isInteger(cs) || cs < 512 || cs > 2 * 1024 * 1024 || (cs & (cs - 1)) !== 0) {
    throw einval('Cluster size must be a power of two between 512 and 2048k');
  }
  if (extendedL2 && cs < 512 * LIMITS.EXTL2_SUBCLUSTERS) {
    throw einval(`Extended L2 entries are only supported with cluster sizes of at least ${512 * LIMITS.EXTL2_SUBCLUSTERS} bytes`);
  }
}

/** The refcount_bits option as an order; measure words the v2 refusal with compat=, create (through QAPI) with version=. */
function parseRefcountBits(v: OptionValue | undefined, version: number, forMeasure = false): number {
  const bits = v === undefined ? 16 : Number(v);
  if (!Number.isInteger(bits) || bits < 1 || bits > 64 || (bits & (bits - 1)) !== 0) {
    throw einval('Refcount width must be a power of two and may not exceed 64 bits');
  }
  if (version < 3 && bits !== 16) {
    throw einval(`Different refcount widths than 16 bits require compatibility level 1.1 or above (use ${forMeasure ? 'compat=1.1' : 'version=v3'} or greater)`);
  }
  return Math.log2(bits);
}

function parsePrealloc(v: OptionValue | undefined): PreallocMode {
  if (v === undefined) return 'off';
  const s = String(v);
  if (!(PREALLOC_MODES as readonly string[]).includes(s)) throw einval(`Parameter 'preallocation' does not accept value '${s}'`);
  return s as PreallocMode;
}

/** Applies qcow2_co_create's checks and defaults; `size` must already be known. */
export function validateCreateParams(opts: CreateOptions, size: number): Qcow2CreateParams {
  validateEncryption(opts, true);
  const version = parseVersion(opt(opts, 'compat'));
  const clusterSize = (opt(opts, 'cluster_size') as number | undefined) ?? DEFAULT_CLUSTER_SIZE;
  const extendedL2 = (opt(opts, 'extended_l2') as boolean | undefined) ?? false;
  if (extendedL2 && version < 3) {
    throw einval('Extended L2 entries are only supported with compatibility level 1.1 and above (use version=v3 or greater)');
  }
  validateClusterSize(clusterSize, extendedL2);
  let preallocation = parsePrealloc(opt(opts, 'preallocation'));
  const backingFile = opt(opts, 'backing_file') as string | undefined;
  const backingFmt = opt(opts, 'backing_fmt') as string | undefined;
  if (backingFile !== undefined && preallocation !== 'off' && !extendedL2) {
    throw einval('Backing file and preallocation can only be used at the same time if extended_l2 is on');
  }
  if (backingFmt !== undefined && backingFile === undefined) throw einval('Backing format cannot be used without backing file');
  const lazyRefcounts = (opt(opts, 'lazy_refcounts') as boolean | undefined) ?? false;
  if (version < 3 && lazyRefcounts) {
    throw einval('Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)');
  }
  const refcountOrder = parseRefcountBits(opt(opts, 'refcount_bits'), version);
  const dataFile = opt(opts, 'data_file') as string | undefined;
  const dataFileRaw = (opt(opts, 'data_file_raw') as boolean | undefined) ?? false;
  if (dataFileRaw && dataFile === undefined) throw einval('data-file-raw requires data-file');
  if (dataFileRaw && backingFile !== undefined) throw einval('Backing file and data-file-raw cannot be used at the same time');
  // A raw data file must read the same with or without the metadata, so the mapping has to be 1:1 from the start.
  if (dataFileRaw && preallocation === 'off') preallocation = 'metadata';
  if (dataFile !== undefined && version < 3) {
    throw einval('External data files are only supported with compatibility level 1.1 and above (use version=v3 or greater)');
  }
  let compressionType: number = COMPRESSION_TYPE.ZLIB;
  const ct = opt(opts, 'compression_type');
  if (ct !== undefined) {
    const idx = (COMPRESSION_TYPE_NAMES as readonly string[]).indexOf(String(ct));
    if (idx < 0) throw einval(`Parameter 'compression-type' does not accept value '${String(ct)}'`);
    if (idx !== COMPRESSION_TYPE.ZLIB && version < 3) {
      throw einval('Non-zlib compression type is only supported with compatibility level 1.1 and above (use version=v3 or greater)');
    }
    compressionType = idx;
  }
  validateEncryption(opts, false);
  // qcow2_co_create_opts silently rounds the size up to whole sectors.
  size = Math.ceil(size / 512) * 512;
  const l2Entries = clusterSize / (extendedL2 ? 16 : 8);
  const l1Size = Math.ceil(size / (clusterSize * l2Entries));
  if (l1Size * 8 > LIMITS.MAX_L1_SIZE) {
    throw new BlockError('EFBIG', 'Could not resize image: Failed to grow the L1 table: File too large');
  }
  const p: Qcow2CreateParams = { size, version, clusterSize, refcountOrder, extendedL2, lazyRefcounts, compressionType, preallocation, dataFileRaw };
  if (backingFile !== undefined) p.backingFile = backingFile;
  if (backingFmt !== undefined) p.backingFmt = backingFmt;
  if (dataFile !== undefined) p.dataFile = dataFile;
  return p;
}

/** Where each structure of a new image goes, in clusters. */
export interface CreateLayout {
  clusterSize: number;
  l1Size: number;
  l1Offset: number;
  l1Clusters: number;
  reftableOffset: number;
  reftableClusters: number;
  refblocksOffset: number;
  refblocks: number;
  l2Offset: number;
  l2Tables: number;
  dataOffset: number;
  /** Data clusters inside the image file (0 with an external data file or without preallocation). */
  dataClusters: number;
  /** Clusters with refcount 1, from cluster 0. */
  totalClusters: number;
}

/** Computes the layout: header, reftable, refblocks, L1, L2 tables, data, packed from cluster 0. */
export function planLayout(p: Qcow2CreateParams): CreateLayout {
  const cs = p.clusterSize;
  const l2Entries = cs / (p.extendedL2 ? 16 : 8);
  const guestClusters = Math.ceil(p.size / cs);
  const l1Size = Math.ceil(guestClusters / l2Entries);
  const l1Clusters = Math.ceil((l1Size * 8) / cs);
  const prealloc = p.preallocation !== 'off';
  const l2Tables = prealloc ? l1Size : 0;
  const dataClusters = prealloc && p.dataFile === undefined ? guestClusters : 0;
  const base = 1 + l1Clusters + l2Tables + dataClusters;
  const rc = refcountMetadataSize(base, cs, p.refcountOrder, false);
  const reftableClusters = Math.max(1, rc.tableClusters);
  const refblocks = Math.max(1, rc.blocks);
  if (reftableClusters * cs > LIMITS.MAX_REFTABLE_SIZE) throw new BlockError('EFBIG', 'Could not resize image: Failed to resize refcount structures: File too large');
  const reftableOffset = cs;
  const refblocksOffset = reftableOffset + reftableClusters * cs;
  const l1Offset = refblocksOffset + refblocks * cs;
  const l2Offset = l1Offset + l1Clusters * cs;
  const dataOffset = l2Offset + l2Tables * cs;
  const totalClusters = 1 + reftableClusters + refblocks + l1Clusters + l2Tables + dataClusters;
  return { clusterSize: cs, l1Size, l1Offset: l1Size > 0 ? l1Offset : 0, l1Clusters, reftableOffset, reftableClusters, refblocksOffset, refblocks, l2Offset, l2Tables, dataOffset, dataClusters, totalClusters };
}

/** The header of a new image. */
function newHeader(p: Qcow2CreateParams, lay: CreateLayout): Qcow2Header {
  let incompat = 0n;
  if (p.dataFile !== undefined) incompat |= INCOMPAT.DATA_FILE;
  if (p.compressionType !== COMPRESSION_TYPE.ZLIB) incompat |= INCOMPAT.COMPRESSION;
  if (p.extendedL2) incompat |= INCOMPAT.EXTL2;
  return {
    version: p.version,
    backingFileOffset: 0,
    backingFileSize: 0,
    clusterBits: Math.log2(p.clusterSize),
    size: p.size,
    cryptMethod: 0,
    l1Size: lay.l1Size,
    l1TableOffset: lay.l1Offset,
    refcountTableOffset: lay.reftableOffset,
    refcountTableClusters: lay.reftableClusters,
    nbSnapshots: 0,
    snapshotsOffset: 0,
    incompatibleFeatures: incompat,
    compatibleFeatures: p.lazyRefcounts ? COMPAT.LAZY_REFCOUNTS : 0n,
    autoclearFeatures: p.dataFileRaw ? AUTOCLEAR.DATA_FILE_RAW : 0n,
    refcountOrder: p.refcountOrder,
    headerLength: p.version >= 3 ? HEADER_SIZE : 72,
    compressionType: p.compressionType,
    unknownHeaderFields: new Uint8Array(0),
  };
}

/** A private write edge to a node the create path owns (it is never attached to a graph parent). */
function writer(bs: BlockNode): BdrvChild {
  return new BdrvChild('create', bs, { kind: 'job', name: 'qcow2-create', description: () => 'qcow2 image creation' }, ROLE.DATA | ROLE.METADATA, PERM.CONSISTENT_READ | PERM.WRITE | PERM.RESIZE, PERM.ALL);
}

function setBe64(dv: DataView, off: number, v: number, flagsHi = 0): void {
  dv.setUint32(off, ((Math.floor(v / 0x100000000) | flagsHi) >>> 0));
  dv.setUint32(off + 4, v >>> 0);
}

const COPIED_HI = 0x80000000;

/** Grows `child`'s node to `length` with `mode`, falling back to writing zeroes or a plain resize where the protocol cannot preallocate. */
async function growTo(child: BdrvChild, length: number, mode: PreallocMode): Promise<void> {
  const cur = await bdrvGetLength(child.bs);
  if (cur >= length) return;
  try {
    await bdrvTruncate(child, length, false, mode);
  } catch (e) {
    if (!isBlockError(e, 'ENOTSUP') || mode === 'off') throw e;
    if (mode === 'full') {
      const zero = new Uint8Array(Math.min(1 << 20, length - cur));
      for (let pos = cur; pos < length; pos += zero.length) {
        const n = Math.min(zero.length, length - pos);
        await bdrvPwritev(child, pos, n, zero.subarray(0, n));
      }
    } else {
      await bdrvTruncate(child, length, false, 'off');
    }
  }
}

/** Writes the complete metadata of a new image to `file`, and sizes the data file. */
export async function writeNewImage(file: BlockNode, dataNode: BlockNode | null, p: Qcow2CreateParams, progress?: ProgressFn): Promise<void> {
  const lay = planLayout(p);
  const cs = p.clusterSize;
  const w = writer(file);
  const h = newHeader(p, lay);
  const ext: Qcow2Extensions = { featureTable: [], staleBitmaps: false, unknown: [] };
  if (p.backingFmt !== undefined) ext.backingFormat = p.backingFmt;
  if (p.dataFile !== undefined) ext.dataFile = p.dataFile;
  if (p.backingFile !== undefined && new TextEncoder().encode(p.backingFile).length > LIMITS.MAX_BACKING_NAME) {
    throw einval(`Could not assign backing file '${p.backingFile}' with format '${p.backingFmt ?? '(null)'}': Invalid argument`);
  }
  const hdrImage: Parameters<typeof serializeHeader>[0] = { header: h, extensions: ext, writeDataFile: p.dataFile !== undefined };
  if (p.backingFile !== undefined) hdrImage.backingFile = p.backingFile;
  let header: Uint8Array;
  try {
    header = serializeHeader(hdrImage);
  } catch (e) {
    if (isBlockError(e, 'ENOSPC')) throw new BlockError('EINVAL', `Could not assign backing file '${p.backingFile ?? ''}': the header does not fit in one cluster`);
    throw e;
  }
  const totalSteps = lay.reftableClusters + lay.refblocks + lay.l2Tables + 2;
  let step = 0;
  const tick = (): void => progress?.(++step, totalSteps);

  await bdrvPwritev(w, 0, cs, header);
  tick();

  // Refcount table: entry i points at refcount block i.
  const blockEntries = (cs * 8) / 2 ** p.refcountOrder;
  const rt = new Uint8Array(lay.reftableClusters * cs);
  const rtdv = new DataView(rt.buffer);
  for (let i = 0; i < lay.refblocks; i++) setBe64(rtdv, 8 * i, lay.refblocksOffset + i * cs);
  await bdrvPwritev(w, lay.reftableOffset, rt.length, rt);
  tick();

  // Refcount blocks: every cluster from 0 to totalClusters-1 is referenced once.
  const k = refcountKernel();
  for (let b = 0; b < lay.refblocks; b++) {
    const block = new Uint8Array(cs);
    const first = b * blockEntries;
    const end = Math.min(lay.totalClusters, first + blockEntries);
    for (let c = first; c < end; c++) k.set(block, c - first, p.refcountOrder, 1);
    await bdrvPwritev(w, lay.refblocksOffset + b * cs, cs, block);
    tick();
  }

  // L1 (and L2 tables when preallocating metadata).
  if (lay.l1Size > 0) {
    const l1 = new Uint8Array(lay.l1Clusters * cs);
    const l1dv = new DataView(l1.buffer);
    if (lay.l2Tables > 0) for (let i = 0; i < lay.l1Size; i++) setBe64(l1dv, 8 * i, lay.l2Offset + i * cs, COPIED_HI);
    await bdrvPwritev(w, lay.l1Offset, l1.length, l1);
  }
  tick();
  if (lay.l2Tables > 0) {
    const entryBytes = p.extendedL2 ? 16 : 8;
    const l2Entries = cs / entryBytes;
    const guestClusters = Math.ceil(p.size / cs);
    for (let t = 0; t < lay.l2Tables; t++) {
      const l2 = new Uint8Array(cs);
      const dv = new DataView(l2.buffer);
      for (let j = 0; j < l2Entries; j++) {
        const g = t * l2Entries + j;
        if (g >= guestClusters) break;
        // External data files map 1:1; otherwise the data area follows the tables. The bitmap stays 0 (see below).
        const host = p.dataFile !== undefined ? g * cs : lay.dataOffset + g * cs;
        setBe64(dv, j * entryBytes, host, COPIED_HI);
      }
      await bdrvPwritev(w, lay.l2Offset + t * cs, cs, l2);
      tick();
    }
  }
  // With extended L2 entries, preallocated clusters keep an empty bitmap (QEMU's prealloc link): they read
  // as unallocated, i.e. from the backing file or as zeroes, exactly like a fresh image.

  if (p.dataFile === undefined) {
    if (p.preallocation === 'off') {
      await growTo(w, lay.totalClusters * cs, 'off');
    } else {
      const metaEnd = lay.dataOffset;
      await growTo(w, metaEnd, 'off');
      // The file must cover every mapped cluster; QEMU ends it exactly at the guest size.
      const end = lay.dataOffset + p.size;
      await growTo(w, end, p.preallocation === 'metadata' ? 'off' : p.preallocation);
    }
  } else if (dataNode) {
    const dw = writer(dataNode);
    const mode: PreallocMode = p.preallocation === 'metadata' ? 'off' : p.preallocation;
    const cur = await bdrvGetLength(dataNode);
    if (cur !== p.size) {
      if (cur > p.size && p.preallocation !== 'off') {
        // Growing only: an existing larger data file keeps its contents.
      } else {
        await bdrvTruncate(dw, p.size, false, cur < p.size ? mode : 'off').catch(async (e: unknown) => {
          if (!isBlockError(e, 'ENOTSUP')) throw e;
          await growTo(dw, p.size, mode);
        });
      }
    }
    await bdrvFlush(dataNode);
  }
  await bdrvFlush(file);
  tick();
}

/** Joins a relative backing name to the directory of the image that names it (bdrv_get_full_backing_filename_from_filename). */
export function resolveRelative(imageName: string, name: string): string {
  if (name.startsWith('/') || /^[a-zA-Z][a-zA-Z0-9+.-]*:/.test(name)) return name;
  const slash = imageName.lastIndexOf('/');
  return slash < 0 ? name : imageName.slice(0, slash + 1) + name;
}

/** The driver's create(): validates, creates the file(s), writes the image. */
export async function qcow2Create(filename: string, opts: CreateOptions, ctx: CreateContext, progress?: ProgressFn): Promise<void> {
  let size = opt(opts, 'size') as number | undefined;
  const backing = opt(opts, 'backing_file') as string | undefined;
  if (size === undefined) {
    if (backing === undefined) throw einval('Image creation needs a size parameter');
    const fmt = opt(opts, 'backing_fmt') as string | undefined;
    const bb = await ctx.openImage(resolveRelative(filename, backing), fmt);
    try {
      size = await bdrvGetLength(bb);
    } finally {
      await ctx.close(bb);
    }
  }
  const p = validateCreateParams(opts, size);
  // Options qcow2 does not know belong to the protocol (QEMU's qemu_opts_to_qdict_filtered with del=true).
  const protoOpts: CreateOptions = {};
  for (const [key, v] of Object.entries(opts)) if (!CREATE_OPTIONS.some((o) => o.name === key)) protoOpts[key] = v;
  const file = await ctx.createAndOpenFile(filename, protoOpts);
  let dataNode: BlockNode | null = null;
  try {
    if (p.dataFile !== undefined) dataNode = await ctx.createAndOpenFile(resolveRelative(filename, p.dataFile), protoOpts);
    await writeNewImage(file, dataNode, p, progress);
  } finally {
    if (dataNode) await ctx.close(dataNode);
    await ctx.close(file);
  }
}

/** QEMU's qcow2_calc_prealloc_size: bytes of a fully allocated image with all metadata. */
export function calcPreallocSize(totalSize: number, clusterSize: number, refcountOrder: number, extendedL2: boolean): number {
  const aligned = Math.ceil(totalSize / clusterSize) * clusterSize;
  const l2e = extendedL2 ? 16 : 8;
  let meta = clusterSize;
  let nl2e = aligned / clusterSize;
  nl2e = Math.ceil(nl2e / (clusterSize / l2e)) * (clusterSize / l2e);
  meta += nl2e * l2e;
  let nl1e = (nl2e * l2e) / clusterSize;
  nl1e = Math.ceil(nl1e / (clusterSize / 8)) * (clusterSize / 8);
  meta += nl1e * 8;
  meta += refcountMetadataSize((meta + aligned) / clusterSize, clusterSize, refcountOrder, false).bytes;
  return meta + aligned;
}

type StatusAbove = typeof bdrvBlockStatusAbove;

/** QEMU's qcow2_measure: required and fully-allocated sizes for `opts`, optionally converting from `src`. */
export async function measureQcow2(opts: CreateOptions, src: BlockNode | null, statusAbove: StatusAbove = bdrvBlockStatusAbove): Promise<MeasureInfo> {
  const extendedL2 = (opt(opts, 'extended_l2') as boolean | undefined) ?? false;
  const clusterSize = (opt(opts, 'cluster_size') as number | undefined) ?? DEFAULT_CLUSTER_SIZE;
  validateClusterSize(clusterSize, extendedL2);
  const version = parseVersion(opt(opts, 'compat'), true);
  const refcountOrder = parseRefcountBits(opt(opts, 'refcount_bits'), version, true);
  const prealloc = parsePrealloc(opt(opts, 'preallocation'));
  const hasBacking = opt(opts, 'backing_file') !== undefined;
  let virtualSize = (opt(opts, 'size') as number | undefined) ?? 0;
  virtualSize = Math.ceil(virtualSize / clusterSize) * clusterSize;
  const l2e = extendedL2 ? 16 : 8;
  const l2Tables = Math.ceil(virtualSize / clusterSize / (clusterSize / l2e));
  if (l2Tables * 8 > LIMITS.MAX_L1_SIZE) throw einval('The image size is too large (try using a larger cluster size)');
  let required = 0;
  if (src) {
    const ssize = await bdrvGetLength(src);
    virtualSize = Math.ceil(ssize / clusterSize) * clusterSize;
    if (hasBacking) {
      required = virtualSize;
    } else {
      let pnum = 0;
      for (let offset = 0; offset < ssize; offset += pnum) {
        const st = await statusAbove(src, null, false, true, offset, ssize - offset);
        pnum = st.pnum;
        if (pnum <= 0) break;
        if (st.status & BLOCK.ZERO) {
          // Zero regions need no data clusters.
        } else if ((st.status & (BLOCK.DATA | BLOCK.ALLOCATED)) === (BLOCK.DATA | BLOCK.ALLOCATED)) {
          pnum = Math.ceil((offset + pnum) / clusterSize) * clusterSize - offset;
          required += (offset % clusterSize) + pnum;
        }
      }
    }
  }
  if (prealloc === 'full' || prealloc === 'falloc') required = virtualSize;
  const fullyAllocated = calcPreallocSize(virtualSize, clusterSize, refcountOrder, extendedL2);
  const info: MeasureInfo = { required: fullyAllocated - virtualSize + required, fullyAllocated };
  // QEMU reports the bitmaps line whenever both images could hold persistent bitmaps, even as 0.
  if (version >= 3 && src && src.drv.supportsPersistentDirtyBitmap?.(src)) info.bitmaps = persistentBitmapsSize(src, clusterSize);
  return info;
}
