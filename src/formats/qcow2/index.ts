/**
 * The qcow2 format driver (QEMU's block/qcow2.c): probe, open with QEMU's
 * validation, the read path (data, zero, unallocated → backing or zeroes,
 * compressed, extended L2 subclusters, external data files), block status,
 * info, measure and create; the write path lives in write.ts (allocation and
 * writeback in alloc.ts, check and repair in check.ts).
 */
import type { BdrvChild } from '../../core/child.ts';
import { CHECK_FIX, type BlockDriver, type BlockDriverInfo, type CheckResult, type ImageInfoSpecific, type MeasureInfo, type ReopenState, type SnapshotInfo } from '../../core/driver.ts';
import { BlockError, STRERROR, toBlockError } from '../../core/errors.ts';
import type { ImplicitOpenRequest } from '../../core/graph.ts';
import { bdrvBlockStatusAbove, bdrvDebugEvent, bdrvGetLength, bdrvPread, bdrvPreadv, refreshTotalBytes } from '../../core/io.ts';
import type { BlockNode } from '../../core/node.ts';
import type { CreateOptions, OptionSpec } from '../../core/options.ts';
import { parseOptionValue } from '../../core/options.ts';
import { BDRV_MAX_LENGTH, BLOCK, OPEN, REQ, ROLE, type BlockdevOptions, type BlockStatus } from '../../core/types.ts';
import { CACHE_OPTIONS, computeCacheSizes, MetadataCache } from './cache.ts';
import { getHostOffset, parseCompressedEntry, SC, type HostMapping, type L2Geometry, type MappingContext } from './cluster.ts';
import { bitmapInfoList, readBitmapDirectory } from './bitmap.ts';
import { persistentBitmapsSize, qcow2CanStoreNewDirtyBitmap, qcow2LoadDirtyBitmaps, qcow2RemovePersistentDirtyBitmap, qcow2ReopenBitmapsRo, qcow2ReopenBitmapsRw, qcow2StorePersistentDirtyBitmaps } from './bitmap-store.ts';
import { decompressCluster } from './compress.ts';
import { AMEND_OPTIONS, CREATE_OPTIONS, measureQcow2, qcow2Create } from './create.ts';
import { qcow2Amend } from './amend.ts';
import { qcow2ChangeBackingFile } from './backing.ts';
import { qcow2MakeEmpty } from './make-empty.ts';
import {
  AUTOCLEAR,
  COMPAT,
  COMPRESSION_TYPE_NAMES,
  CRYPT,
  extensionsEnd,
  HEADER_SIZE,
  hex,
  INCOMPAT,
  LIMITS,
  parseExtensions,
  parseHeader,
  QCOW_MAGIC,
  serializeHeader,
  unsupportedFeatureMessage,
  validateTable,
  type Qcow2Extensions,
  type Qcow2Header,
} from './header.ts';
import { RefcountState } from './refcount.ts';
import { readSnapshots, type Qcow2Snapshot } from './snapshot.ts';
import { barrier, flushRefblocks, markClean, writeback, writeHeaderRaw } from './alloc.ts';
import { qcow2Check } from './check.ts';
import { qcow2Preadv, qcow2PreadvSync } from './read.ts';
import { corruption, forgetCompressed, Mutex, OL_TEMPLATES, state, type Qcow2State } from './state.ts';
import { qcow2LoadVmstate, qcow2SaveVmstate, qcow2SnapshotCreate, qcow2SnapshotDelete, qcow2SnapshotGoto, qcow2SnapshotLoadTmp } from './snapshot-write.ts';
import { qcow2Pdiscard, qcow2Pwritev, qcow2PwritevCompressed, qcow2PwriteZeroes, qcow2Truncate } from './write.ts';

export type { Qcow2State } from './state.ts';
export { setQcow2Kernels, jsQcow2Kernels, qcow2Kernels, type Qcow2Kernels } from './kernels.ts';

/** Overlap-check templates QEMU accepts. */
const OVERLAP_TEMPLATES = ['none', 'constant', 'cached', 'all'];
const OVERLAP_BOOLS = ['main-header', 'active-l1', 'active-l2', 'refcount-table', 'refcount-block', 'snapshot-table', 'inactive-l1', 'inactive-l2', 'bitmap-directory'];

const RUNTIME_OPTIONS: readonly OptionSpec[] = [
  { name: 'lazy-refcounts', type: 'bool', help: 'Postpone refcount updates' },
  { name: 'pass-discard-request', type: 'bool', help: 'Pass guest discard requests to the layer below' },
  { name: 'pass-discard-snapshot', type: 'bool', help: 'Generate discard requests when snapshot related space is freed' },
  { name: 'pass-discard-other', type: 'bool', help: 'Generate discard requests when other clusters are freed' },
  { name: 'overlap-check', type: 'string', help: 'Selects which overlap checks to perform from a range of templates (none, constant, cached, all)' },
  { name: 'overlap-check.template', type: 'string', help: 'Selects which overlap checks to perform from a range of templates (none, constant, cached, all)' },
  ...OVERLAP_BOOLS.map((n): OptionSpec => ({ name: `overlap-check.${n}`, type: 'bool' })),
  ...CACHE_OPTIONS,
  { name: 'encrypt.key-secret', type: 'string', help: 'ID of secret providing qcow2 AES key or LUKS passphrase' },
];

/** Behaviour chosen by runtime options. */
interface RuntimeChoices {
  lazy: boolean;
  overlapCheck: number;
  discard: { request: boolean; snapshot: boolean; other: boolean };
}

/** Validates the options QEMU checks in qcow2_update_options_prepare that do not size the caches, and resolves them. */
function checkRuntimeOptions(opts: Record<string, unknown>, version: number, compatibleFeatures: bigint): RuntimeChoices {
  const boolOpt = (name: string): boolean | undefined => {
    const v = opts[name];
    if (v === undefined) return undefined;
    return parseOptionValue({ name, type: 'bool' }, v as string | boolean) as boolean;
  };
  const lazy = boolOpt('lazy-refcounts') ?? (compatibleFeatures & COMPAT.LAZY_REFCOUNTS) !== 0n;
  if (lazy && version < 3) {
    throw new BlockError('EINVAL', 'Lazy refcounts require a qcow2 image with at least qemu 1.1 compatibility level');
  }
  const ov = opts['overlap-check'] as string | undefined;
  const ovt = opts['overlap-check.template'] as string | undefined;
  if (ov !== undefined && ovt !== undefined && ov !== ovt) {
    throw new BlockError('EINVAL', `Conflicting values for qcow2 options 'overlap-check' ('${ov}') and 'overlap-check.template' ('${ovt}')`);
  }
  const tmpl = ov ?? ovt ?? 'cached';
  if (!OVERLAP_TEMPLATES.includes(tmpl)) {
    throw new BlockError('EINVAL', `Unsupported value '${tmpl}' for qcow2 option 'overlap-check'. Allowed are any of the following: none, constant, cached, all`);
  }
  let overlapCheck = OL_TEMPLATES[tmpl]!;
  OVERLAP_BOOLS.forEach((b, bit) => {
    const v = boolOpt(`overlap-check.${b}`);
    if (v === true) overlapCheck |= 1 << bit;
    else if (v === false) overlapCheck &= ~(1 << bit);
  });
  // QEMU's defaults: guest discards and snapshot deletion reach the file, other frees do not.
  const discard = {
    request: boolOpt('pass-discard-request') ?? true,
    snapshot: boolOpt('pass-discard-snapshot') ?? true,
    other: boolOpt('pass-discard-other') ?? false,
  };
  return { lazy, overlapCheck, discard };
}

/** Reads exactly `len` bytes at `offset` of the file into a fresh buffer, prefixing errors with `what`. */
async function readMeta(child: BdrvChild, offset: number, len: number, what: string): Promise<Uint8Array> {
  try {
    return await bdrvPread(child, offset, len);
  } catch (e) {
    const be = toBlockError(e);
    throw new BlockError(be.code, `${what}: ${be.message}`, { cause: e });
  }
}

/** Opens the external data file named in the image through the graph's gate, as a protocol node (never probed). */
async function openImageDataFile(bs: BlockNode, name: string): Promise<BdrvChild> {
  const req: ImplicitOpenRequest = { kind: 'data-file', name, parent: bs };
  const spec = bs.graph.gate.resolve(req);
  const flags = bs.openFlags & ~(OPEN.NO_BACKING | OPEN.COPY_ON_READ | OPEN.PROTOCOL);
  let node: BlockNode;
  if (spec.driver !== undefined) node = await bs.graph.open(spec, flags);
  else node = await bs.graph.openProtocol(String(spec.filename ?? name), flags, {});
  try {
    return bs.graph.attachChild(bs, node, 'data-file', ROLE.DATA);
  } catch (e) {
    await bs.graph.unref(node).catch(() => undefined);
    throw e;
  }
}

/** Writes the header cluster from the in-memory state (QEMU's qcow2_update_header). */
export async function updateHeader(bs: BlockNode, s: Qcow2State): Promise<void> {
  void bs;
  await writeHeaderRaw(s);
}

async function qcow2Open(bs: BlockNode, options: Record<string, unknown>, flags: number): Promise<void> {
  const fileSpec = (options.file ?? bs.options.file) as BlockdevOptions | string | undefined;
  const file = await bs.graph.openChild(bs, fileSpec, 'file', ROLE.DATA | ROLE.METADATA | ROLE.PRIMARY);
  if (!file) throw new BlockError('EINVAL', 'A block device must be specified for "file"');
  // Names inside the image resolve against its location, which the gate needs while we are still opening.
  if (!bs.filename) bs.filename = file.bs.filename;
  const rw = (flags & OPEN.RDWR) !== 0;
  const check = (flags & OPEN.CHECK) !== 0;

  // The fixed header first; once the cluster size is known, the whole first cluster (header, extensions, backing name).
  const small = await readMeta(file, 0, HEADER_SIZE, 'Could not read qcow2 header');
  const sdv = new DataView(small.buffer, small.byteOffset, small.byteLength);
  let first = small;
  const bits = sdv.getUint32(20);
  if (sdv.getUint32(0) === QCOW_MAGIC && bits >= LIMITS.MIN_CLUSTER_BITS && bits <= LIMITS.MAX_CLUSTER_BITS) {
    first = await readMeta(file, 0, 2 ** bits, 'Could not read qcow2 header');
  }
  const h = parseHeader(first);
  const clusterSize = 2 ** h.clusterBits;
  const extEnd = extensionsEnd(h);

  if (h.incompatibleFeatures & ~INCOMPAT.MASK) {
    let table: Qcow2Extensions['featureTable'] = [];
    try {
      table = parseExtensions(first, h, extEnd).featureTable;
    } catch {
      // QEMU reports the features with whatever table it could read.
    }
    throw new BlockError('ENOTSUP', unsupportedFeatureMessage(table, h.incompatibleFeatures & ~INCOMPAT.MASK));
  }
  if (h.incompatibleFeatures & INCOMPAT.CORRUPT && rw && !check) {
    throw new BlockError('EACCES', 'qcow2: Image is corrupt; cannot be opened read/write');
  }
  const extendedL2 = (h.incompatibleFeatures & INCOMPAT.EXTL2) !== 0n;
  const subclustersPerCluster = extendedL2 ? LIMITS.EXTL2_SUBCLUSTERS : 1;
  const subclusterSize = clusterSize / subclustersPerCluster;
  if (subclusterSize < 512) throw new BlockError('EINVAL', `Unsupported subcluster size: ${subclusterSize}`);
  if (h.refcountOrder > 6) throw new BlockError('EINVAL', 'Reference count entry width too large; may not exceed 64 bits');
  if (h.cryptMethod !== CRYPT.NONE) {
    if (h.cryptMethod > CRYPT.LUKS) throw new BlockError('EINVAL', `Unsupported encryption method ${h.cryptMethod}`);
    throw new BlockError('ENOTSUP', `qcow2: encrypted images (${h.cryptMethod === CRYPT.AES ? 'aes' : 'luks'}) are not supported`);
  }
  const l2EntryBytes = extendedL2 ? 16 : 8;
  const l2Entries = clusterSize / l2EntryBytes;

  if (h.refcountTableClusters === 0 && !check) throw new BlockError('EINVAL', 'Image does not contain a reference count table');
  const raw = h.raw!;
  validateTable(raw.refcountTableOffset, h.refcountTableClusters, clusterSize, LIMITS.MAX_REFTABLE_SIZE, clusterSize, 'Reference count table');
  if (!check) {
    validateTable(raw.snapshotsOffset, h.nbSnapshots, LIMITS.SNAPSHOT_HEADER_SIZE, LIMITS.SNAPSHOT_HEADER_SIZE * LIMITS.MAX_SNAPSHOTS, clusterSize, 'Snapshot table');
  }
  validateTable(raw.l1TableOffset, h.l1Size, 8, LIMITS.MAX_L1_SIZE, clusterSize, 'Active L1 table');
  const l1VmStateIndex = Math.ceil(h.size / (clusterSize * l2Entries));
  if (!Number.isFinite(h.size) || l1VmStateIndex > 0x7fffffff || Math.floor(h.size / 512) * 512 > BDRV_MAX_LENGTH) {
    throw new BlockError('EFBIG', 'Image is too big');
  }
  if (h.l1Size < l1VmStateIndex) throw new BlockError('EINVAL', 'L1 table is too small');
  // Offsets QEMU accepts but no request can reach (past 2^53 here, past its maximum length there) fail as I/O errors.
  const unreachable = (what: string): BlockError => new BlockError('EIO', `${what}: Input/output error`);
  if (h.l1Size > 0 && !Number.isFinite(h.l1TableOffset)) throw unreachable('Could not read L1 table');
  const l1 = h.l1Size > 0 ? await readMeta(file, h.l1TableOffset, h.l1Size * 8, 'Could not read L1 table') : new Uint8Array(0);

  const virtualSize = Math.floor(h.size / 512) * 512;
  const sizes = computeCacheSizes(options, clusterSize, virtualSize, l2EntryBytes);
  const choices = checkRuntimeOptions(options, h.version, h.compatibleFeatures);
  const l2Cache = new MetadataCache('l2', sizes.l2Entries, sizes.l2EntrySize);
  const refcountCache = new MetadataCache('refcount', sizes.refcountEntries, clusterSize);

  if (h.refcountTableClusters > 0 && !Number.isFinite(h.refcountTableOffset)) throw unreachable('Could not initialize refcount handling');
  let reftable: Uint8Array;
  try {
    reftable = h.refcountTableClusters > 0 ? await bdrvPread(file, h.refcountTableOffset, h.refcountTableClusters * clusterSize) : new Uint8Array(0);
  } catch (e) {
    const be = toBlockError(e);
    throw new BlockError(be.code, `Could not initialize refcount handling: ${be.message}`, { cause: e });
  }
  const refcount = new RefcountState(h.clusterBits, h.refcountOrder, reftable, h.refcountTableOffset, refcountCache, file);

  const ext = parseExtensions(first, h, extEnd, (m) => bs.graph.onWarning(m));

  // External data file: an explicit 'data-file' option wins over the name in the image.
  const dataSpec = (options['data-file'] ?? bs.options['data-file']) as BlockdevOptions | string | undefined;
  let dataFile: BdrvChild = file;
  let hasDataFile = false;
  if (h.incompatibleFeatures & INCOMPAT.DATA_FILE) {
    let child: BdrvChild | null = null;
    if (dataSpec !== undefined) child = await bs.graph.openChild(bs, dataSpec, 'data-file', ROLE.DATA);
    else if (ext.dataFile !== undefined) child = await openImageDataFile(bs, ext.dataFile);
    if (!child) throw new BlockError('EINVAL', "'data-file' is required for this image");
    dataFile = child;
    hasDataFile = true;
  } else {
    if (dataSpec !== undefined) throw new BlockError('EINVAL', "'data-file' can only be set for images with an external data file");
    if (h.autoclearFeatures & AUTOCLEAR.DATA_FILE_RAW) throw new BlockError('EINVAL', 'data-file-raw requires a data file');
  }

  let imageBackingFile: string | undefined;
  if (h.backingFileOffset !== 0) {
    const len = h.backingFileSize;
    if (len > Math.min(LIMITS.MAX_BACKING_NAME, clusterSize - h.backingFileOffset)) {
      throw new BlockError('EINVAL', 'Backing file name too long');
    }
    imageBackingFile = new TextDecoder().decode(first.subarray(h.backingFileOffset, h.backingFileOffset + len));
  }

  let snapshots: Qcow2Snapshot[] = [];
  let snapshotsSize = 0;
  if (!check && h.nbSnapshots > 0) {
    if (!Number.isFinite(h.snapshotsOffset)) throw unreachable('Failed to read snapshot table');
    ({ snapshots, size: snapshotsSize } = await readSnapshots(file, h.snapshotsOffset, h.nbSnapshots, virtualSize));
  }

  const needHeaderUpdate = ext.staleBitmaps || (h.autoclearFeatures & ~AUTOCLEAR.MASK) !== 0n;

  const geometry: L2Geometry = { clusterBits: h.clusterBits, subclusterBits: Math.log2(subclusterSize), extended: extendedL2, hasDataFile };
  const l2SliceEntries = sizes.l2EntrySize / l2EntryBytes;
  const s: Qcow2State = {
    header: h,
    ext,
    clusterBits: h.clusterBits,
    clusterSize,
    subclusterBits: geometry.subclusterBits,
    subclusterSize,
    subclustersPerCluster,
    l2Entries,
    l2EntryBytes,
    l1VmStateIndex,
    l1,
    l2Cache,
    refcountCache,
    refcount,
    dataFile,
    hasDataFile,
    snapshots,
    snapshotsSize,
    lazyRefcounts: choices.lazy,
    compressedEpoch: 0,
    lock: new Mutex(),
    freeClusterIndex: 0,
    freeByteOffset: 0,
    pendingFrees: [],
    l1Dirty: new Set(),
    discardPassthrough: choices.discard,
    overlapCheck: choices.overlapCheck,
    broken: false,
    dirtyMarked: false,
    committing: false,
    bs,
    runtimeOptions: pickRuntimeOptions(options),
    cleanInterval: sizes.cleanInterval,
    mapping: {
      geometry,
      version: h.version,
      l1,
      l1Size: h.l1Size,
      l2SliceEntries,
      l2Entries,
      lookupL2Slice: (offset) => s.l2Cache.lookup(offset),
      loadL2Slice: (offset, describe) =>
        s.l2Cache.lookup(offset) ??
        s.l2Cache.get(offset, async (buf) => {
          // A table past the end of the file would read as zeroes and silently hide data: refuse it.
          if (offset >= (await bdrvGetLength(file.bs))) throw corruption(bs, describe());
          const e = bdrvDebugEvent(file.bs, 'l2_load');
          if (e) await e;
          await bdrvPreadv(file, offset, buf.length, buf);
        }),
      corruption: (m) => corruption(bs, m),
    },
  };
  if (imageBackingFile !== undefined) s.imageBackingFile = imageBackingFile;
  bs.opaque = s;
  installCacheHooks(s);

  if (rw && !check && h.incompatibleFeatures & INCOMPAT.DIRTY) {
    // Refcounts may be stale after a crash with lazy refcounts: repair before anything is written (QEMU does the same).
    let res: CheckResult;
    try {
      res = await s.lock.run(() => qcow2Check(bs, s, CHECK_FIX.LEAKS | CHECK_FIX.ERRORS));
    } catch (e) {
      const be = toBlockError(e);
      throw new BlockError(be.code, `Could not repair dirty image: ${be.message}`, { cause: e });
    }
    if (res.checkErrors > 0) throw new BlockError('EIO', 'Could not repair dirty image: Input/output error');
  }

  if (needHeaderUpdate && rw) {
    // Unknown autoclear bits must go: a program that does not know them may have invalidated what they describe.
    h.autoclearFeatures &= AUTOCLEAR.MASK;
    if (ext.staleBitmaps) delete ext.bitmaps;
  }
  // Bitmaps cover the disk: their size comes from the node's length.
  bs.totalBytes = virtualSize;
  let headerUpdated = false;
  if (!(flags & OPEN.INACTIVE)) headerUpdated = await qcow2LoadDirtyBitmaps(bs, s);
  if (needHeaderUpdate && rw && !headerUpdated) {
    try {
      await updateHeader(bs, s);
    } catch (e) {
      const be = toBlockError(e);
      throw new BlockError(be.code, `Could not update qcow2 header: ${be.message}`, { cause: e });
    }
  }

  bs.backingFile = imageBackingFile ?? '';
  bs.backingFormat = ext.backingFormat ?? '';
  bs.totalBytes = virtualSize;
  bs.supportedZeroFlags = h.version >= 3 ? REQ.MAY_UNMAP : 0;
  bs.supportedTruncateFlags = h.version >= 3 ? REQ.ZERO_WRITE : 0;
  startCleanTimer(s);
}

/** Lets full caches write themselves back in dependency order instead of failing. */
function installCacheHooks(s: Qcow2State): void {
  // Refcount blocks may always go to disk early: that leaks clusters at worst.
  s.refcountCache.onFull = () => flushRefblocks(s);
  // A writeback must hold the image lock. When someone holds it (possibly the very request that needs
  // room, reading for copy-on-write), nothing is written here: the cache hands out an uncached buffer,
  // and the lock holder makes room itself before it pins a slice (see writableSlice).
  s.l2Cache.onFull = async () => {
    if (!s.lock.locked) await s.lock.run(() => writeback(s));
  };
}

/** Keeps the options that size caches or tune behaviour, so a reopen can merge new ones into them. */
function pickRuntimeOptions(options: Record<string, unknown>): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const o of RUNTIME_OPTIONS) if (options[o.name] !== undefined) out[o.name] = options[o.name];
  return out;
}

/** (Re)arms the timer that drops cache entries unused for a whole interval (QEMU's cache_clean_timer). */
function startCleanTimer(s: Qcow2State): void {
  if (s.cleanTimer !== undefined) clearInterval(s.cleanTimer);
  delete s.cleanTimer;
  if (s.cleanInterval <= 0) return;
  s.cleanTimer = setInterval(() => {
    s.l2Cache.cleanUnused();
    s.refcountCache.cleanUnused();
  }, s.cleanInterval * 1000);
  // A cache timer must never keep a Node process alive.
  (s.cleanTimer as { unref?: () => void }).unref?.();
}

/** What reopenPrepare computed, applied by reopenCommit. */
interface Qcow2Reopen {
  options: Record<string, unknown>;
  sizes: ReturnType<typeof computeCacheSizes>;
  choices: RuntimeChoices;
  /** The image is dirty and becomes writable: its refcounts need the repair open does. */
  repair: boolean;
  /** The repair, queued on the image lock at commit so it runs before any later allocating write. */
  repairing?: Promise<void>;
}

/** Checks a reopen (QEMU's qcow2_reopen_prepare): new cache options, and whether the image may become writable. */
async function qcow2ReopenPrepare(rs: ReopenState): Promise<void> {
  const bs = rs.bs;
  const s = state(bs);
  const h = s.header;
  const options = { ...s.runtimeOptions, ...pickRuntimeOptions(rs.options) };
  for (const k of Object.keys(rs.options)) {
    if (!RUNTIME_OPTIONS.some((o) => o.name === k)) throw new BlockError('EINVAL', `Block format 'qcow2' does not support the option '${k}'`);
  }
  // cache-size replaces both specific sizes given before (qcow2_join_options).
  if (rs.options['cache-size'] !== undefined) {
    if (rs.options['l2-cache-size'] === undefined) delete options['l2-cache-size'];
    if (rs.options['refcount-cache-size'] === undefined) delete options['refcount-cache-size'];
  }
  const sizes = computeCacheSizes(options, s.clusterSize, bs.totalBytes, s.l2EntryBytes);
  const choices = checkRuntimeOptions(options, h.version, h.compatibleFeatures);
  if (!rs.readOnly && bs.readOnly) {
    if (h.incompatibleFeatures & INCOMPAT.CORRUPT) throw new BlockError('EACCES', 'qcow2: Image is corrupt; cannot be opened read/write');
  }
  if (!bs.readOnly && !s.broken) {
    // Everything cached goes to disk first: the caches may be replaced, or the image become read-only.
    await s.lock.run(async () => {
      if (rs.readOnly) await qcow2ReopenBitmapsRo(bs, s);
      await writeback(s);
      await barrier(s);
      if (rs.readOnly && s.dirtyMarked) await markClean(s);
    });
  }
  // A dirty image (lazy refcounts) becoming writable has its refcounts repaired first, as at open.
  const repair = !rs.readOnly && bs.readOnly && (h.incompatibleFeatures & INCOMPAT.DIRTY) !== 0n;
  const r: Qcow2Reopen = { options, sizes, choices, repair };
  rs.opaque = r;

}

/** Waits for the repair of a dirty image that a reopen made writable; a failed repair leaves the node unusable rather than writable over stale refcounts. */
async function awaitReopenRepair(rs: ReopenState): Promise<void> {
  const r = rs.opaque as Qcow2Reopen;
  if (!r.repairing) return;
  const s = state(rs.bs);
  try {
    await r.repairing;
  } catch (e) {
    s.broken = true;
    const be = toBlockError(e);
    throw new BlockError(be.code, `Could not repair dirty image: ${be.message}`, { node: rs.bs.nodeName, cause: e });
  }
}

/** Applies a prepared reopen: new caches when their geometry changed (prepare wrote every dirty entry back). */
function qcow2ReopenCommit(rs: ReopenState): void {
  const s = state(rs.bs);
  const r = rs.opaque as Qcow2Reopen;
  s.runtimeOptions = r.options;
  s.lazyRefcounts = r.choices.lazy;
  s.overlapCheck = r.choices.overlapCheck;
  s.discardPassthrough = r.choices.discard;
  s.bs.supportedZeroFlags = !rs.readOnly && s.header.version >= 3 ? REQ.MAY_UNMAP : 0;
  if (r.sizes.l2Entries !== s.l2Cache.maxEntries || r.sizes.l2EntrySize !== s.l2Cache.entrySize) {
    s.l2Cache = new MetadataCache('l2', r.sizes.l2Entries, r.sizes.l2EntrySize);
    s.mapping.l2SliceEntries = r.sizes.l2EntrySize / s.l2EntryBytes;
  }
  if (r.sizes.refcountEntries !== s.refcountCache.maxEntries) {
    s.refcountCache = new MetadataCache('refcount', r.sizes.refcountEntries, s.clusterSize);
    s.refcount.cache = s.refcountCache;
  }
  if (r.sizes.cleanInterval !== s.cleanInterval) {
    s.cleanInterval = r.sizes.cleanInterval;
    startCleanTimer(s);
  }
  installCacheHooks(s);
  if (r.repair) {
    r.repairing = s.lock.run(async () => {
      const res = await qcow2Check(s.bs, s, CHECK_FIX.LEAKS | CHECK_FIX.ERRORS);
      if (res.checkErrors > 0) throw new BlockError('EIO', 'Input/output error');
    });
    // Reported by commit-post; keep an unobserved failure from being reported twice.
    r.repairing.catch(() => undefined);
  }
}

/**
 * After a switch to read-write, with the file writable: a dirty image's
 * refcounts are repaired first, then the bitmaps become writable and IN_USE
 * (qcow2_reopen_commit_post).
 */
async function qcow2ReopenCommitPost(rs: ReopenState): Promise<void> {
  if (rs.readOnly) return;
  await awaitReopenRepair(rs);
  const bs = rs.bs;
  const s = state(bs);
  try {
    await s.lock.run(() => qcow2ReopenBitmapsRw(bs, s));
  } catch (e) {
    // Not fatal in QEMU either: the bitmaps stay read-only.
    bs.graph.onWarning(`${bs.nodeName}: Failed to make dirty bitmaps writable: ${toBlockError(e).message}`);
  }
}

/**
 * Re-reads what another writer may have changed (QEMU's
 * qcow2_co_invalidate_cache): the header, L1 and refcount tables; cached L2
 * slices and refcount blocks are dropped. The cluster geometry must not change.
 */
async function qcow2InvalidateCache(bs: BlockNode): Promise<void> {
  const s = state(bs);
  const file = bs.file!;
  if (!bs.readOnly && !s.broken) {
    // What we changed must reach the file before our caches are dropped.
    await s.lock.run(async () => {
      await writeback(s);
      await barrier(s);
    });
  }
  // Storage first, as QEMU's bdrv_co_invalidate_cache does: the file may have grown.
  for (const c of [file, ...(s.hasDataFile ? [s.dataFile] : [])]) {
    await c.bs.drv.invalidateCache?.(c.bs);
    await refreshTotalBytes(c.bs);
  }
  s.l2Cache.invalidate();
  s.refcountCache.invalidate();
  forgetCompressed(s);
  delete s.metadataPreallocation;
  const first = await readMeta(file, 0, s.clusterSize, 'Could not reopen qcow2 layer: Could not read qcow2 header');
  const h = parseHeader(first);
  const geometryBits = INCOMPAT.EXTL2 | INCOMPAT.DATA_FILE;
  if (h.clusterBits !== s.clusterBits || (h.incompatibleFeatures & geometryBits) !== (s.header.incompatibleFeatures & geometryBits) || h.refcountOrder !== s.header.refcountOrder) {
    throw new BlockError('EIO', 'Could not reopen qcow2 layer: the image geometry changed', { node: bs.nodeName });
  }
  const raw = h.raw!;
  validateTable(raw.refcountTableOffset, h.refcountTableClusters, s.clusterSize, LIMITS.MAX_REFTABLE_SIZE, s.clusterSize, 'Reference count table');
  validateTable(raw.l1TableOffset, h.l1Size, 8, LIMITS.MAX_L1_SIZE, s.clusterSize, 'Active L1 table');
  const l1VmStateIndex = Math.ceil(h.size / (s.clusterSize * s.l2Entries));
  if (h.l1Size < l1VmStateIndex) throw new BlockError('EINVAL', 'L1 table is too small');
  const l1 = h.l1Size > 0 ? await readMeta(file, h.l1TableOffset, h.l1Size * 8, 'Could not read L1 table') : new Uint8Array(0);
  const reftable = await readMeta(file, h.refcountTableOffset, h.refcountTableClusters * s.clusterSize, 'Could not initialize refcount handling');
  s.ext = parseExtensions(first, h, extensionsEnd(h), (m) => bs.graph.onWarning(m));
  s.header = h;
  s.l1 = l1;
  s.mapping.l1 = l1;
  s.mapping.l1Size = h.l1Size;
  s.l1VmStateIndex = l1VmStateIndex;
  s.refcount.table = reftable;
  s.refcount.tableOffset = h.refcountTableOffset;
  // Another writer may have allocated anywhere: search for free clusters from the start again.
  s.freeClusterIndex = 0;
  s.freeByteOffset = 0;
  s.l1Dirty.clear();
  bs.totalBytes = Math.floor(h.size / 512) * 512;
}

/**
 * QEMU's qcow2_detect_metadata_preallocation: an image is taken as
 * metadata-preallocated when more clusters are referenced than the file has
 * allocated on disk, so data clusters may be holes that read as zeroes.
 */
async function detectMetadataPreallocation(bs: BlockNode, s: Qcow2State): Promise<boolean> {
  const fileBs = bs.file!.bs;
  if (!fileBs.drv.getAllocatedFileSize) return false;
  const fileLength = await bdrvGetLength(fileBs);
  const realAllocation = await fileBs.drv.getAllocatedFileSize(fileBs);
  if (realAllocation < 0) return false;
  const realClusters = Math.floor(realAllocation / s.clusterSize);
  const threshold = Math.max(Math.floor((realClusters * 10) / 9), realClusters + 2);
  const endCluster = Math.ceil(fileLength / s.clusterSize);
  // Block by block with the kernel's count: the answer depends only on whether the count reaches the threshold.
  let count = 0;
  const E = s.refcount.blockEntries;
  for (let b = 0; b * E < endCluster && count < threshold; b++) {
    count += await s.refcount.countNonZero(b, endCluster - b * E);
  }
  return count >= threshold;
}

async function qcow2BlockStatus(bs: BlockNode, _wantZero: boolean, offset: number, bytes: number): Promise<BlockStatus> {
  const s = state(bs);
  if (s.metadataPreallocation === undefined) {
    try {
      s.metadataPreallocation = await detectMetadataPreallocation(bs, s);
    } catch {
      s.metadataPreallocation = false;
    }
  }
  const m = await getHostOffset(s.mapping, offset, Math.min(bytes, 0x7fffffff));
  const st: BlockStatus = { status: 0, pnum: m.bytes };
  if (m.type === SC.NORMAL || m.type === SC.ZERO_ALLOC || m.type === SC.UNALLOCATED_ALLOC) {
    st.map = m.hostOffset;
    st.file = s.dataFile.bs;
    st.status |= BLOCK.OFFSET_VALID;
  }
  if (m.type === SC.ZERO_PLAIN || m.type === SC.ZERO_ALLOC) st.status |= BLOCK.ZERO;
  else if (m.type !== SC.UNALLOCATED_PLAIN && m.type !== SC.UNALLOCATED_ALLOC) st.status |= BLOCK.DATA;
  if (m.type === SC.COMPRESSED) st.status |= BLOCK.COMPRESSED;
  if (s.metadataPreallocation && st.status & BLOCK.DATA && st.status & BLOCK.OFFSET_VALID) st.status |= BLOCK.RECURSE;
  return st;
}

/** QEMU's qcow2_get_specific_info, with the keys qemu-img info --output=json prints. */
async function specificInfo(bs: BlockNode): Promise<ImageInfoSpecific> {
  const s = state(bs);
  const h = s.header;
  const data: Record<string, unknown> = { compat: h.version === 2 ? '0.10' : '1.1', 'compression-type': COMPRESSION_TYPE_NAMES[h.compressionType] };
  if (h.version >= 3) {
    data['lazy-refcounts'] = (h.compatibleFeatures & COMPAT.LAZY_REFCOUNTS) !== 0n;
  }
  if (h.version >= 3 && s.ext.bitmaps) {
    data.bitmaps = bitmapInfoList(await readBitmapDirectory(bs.file!, s.ext.bitmaps));
  }
  data['refcount-bits'] = 2 ** h.refcountOrder;
  if (h.version >= 3) {
    if (s.ext.dataFile !== undefined) data['data-file'] = s.ext.dataFile;
    if (s.hasDataFile) data['data-file-raw'] = (h.autoclearFeatures & AUTOCLEAR.DATA_FILE_RAW) !== 0n;
    data.corrupt = (h.incompatibleFeatures & INCOMPAT.CORRUPT) !== 0n;
    data['extended-l2'] = (h.incompatibleFeatures & INCOMPAT.EXTL2) !== 0n;
  }
  return { type: 'qcow2', data };
}

/** The qcow2 driver. */
export const qcow2Driver: BlockDriver = {
  name: 'qcow2',
  kind: 'format',
  supportsBacking: true,
  runtimeOptions: RUNTIME_OPTIONS,
  createOptions: CREATE_OPTIONS,
  amendOptions: AMEND_OPTIONS,

  probe(buf) {
    if (buf.length < HEADER_SIZE) return 0;
    const dv = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
    return dv.getUint32(0) === QCOW_MAGIC && dv.getUint32(4) >= 2 ? 100 : 0;
  },

  open: qcow2Open,

  async close(bs) {
    const s = bs.opaque as Qcow2State | undefined;
    if (!s) return;
    if (s.cleanTimer !== undefined) clearInterval(s.cleanTimer);
    try {
      if (!bs.readOnly && !s.broken && bs.file) {
        // A clean close leaves nothing pending and, with lazy refcounts, the dirty bit cleared (QEMU's qcow2_inactivate).
        // QEMU's qcow2_inactivate: every step is tried, each failure reported in QEMU's words, and the
        // image is marked clean only if all of them worked.
        const failures: Array<{ msg: string; err: BlockError }> = [];
        await s.lock.run(async () => {
          try {
            await qcow2StorePersistentDirtyBitmaps(bs, s, true);
          } catch (e) {
            const err = toBlockError(e);
            failures.push({ msg: `Lost persistent bitmaps during inactivation of node '${bs.displayName}': ${err.message}`, err });
          }
          try {
            await writeback(s);
          } catch (e) {
            const err = toBlockError(e);
            failures.push({ msg: `Failed to flush the L2 table cache: ${STRERROR[err.code]}`, err });
          }
          try {
            await flushRefblocks(s);
            await barrier(s);
          } catch (e) {
            const err = toBlockError(e);
            failures.push({ msg: `Failed to flush the refcount block cache: ${STRERROR[err.code]}`, err });
          }
          if (failures.length === 0 && s.dirtyMarked) await markClean(s);
        });
        const report = bs.graph.onError;
        if (report) for (const f of failures) report(f.msg);
        else if (failures.length > 0) {
          throw new BlockError(failures[0]!.err.code, failures.map((f) => f.msg).join('; '), { node: bs.nodeName, cause: failures[0]!.err });
        }
      }
    } finally {
      bs.opaque = undefined;
    }
  },

  refreshLimits(bs) {
    const s = bs.opaque as Qcow2State | undefined;
    if (!s) return;
    bs.bl.pwriteZeroesAlignment = s.subclusterSize;
    bs.bl.pdiscardAlignment = s.clusterSize;
  },

  preadv: qcow2Preadv,
  preadvSync: qcow2PreadvSync,

  pwritev: (bs, offset, bytes, buf) => qcow2Pwritev(bs, offset, bytes, buf),
  pwritevCompressed: qcow2PwritevCompressed,
  pwriteZeroes: qcow2PwriteZeroes,
  pdiscard: qcow2Pdiscard,
  truncate: qcow2Truncate,

  async flushToOs(bs) {
    const s = state(bs);
    if (bs.readOnly || s.broken) return;
    await s.lock.run(() => writeback(s));
  },

  async check(bs, fix, progress) {
    const s = state(bs);
    return s.lock.run(() => qcow2Check(bs, s, fix, progress));
  },

  blockStatus: qcow2BlockStatus,

  async getLength(bs) {
    const s = state(bs);
    return Math.floor(s.header.size / 512) * 512;
  },

  async getInfo(bs): Promise<BlockDriverInfo> {
    const s = state(bs);
    return {
      clusterSize: s.clusterSize,
      subclusterSize: s.subclusterSize,
      vmStateOffset: s.l1VmStateIndex * s.clusterSize * s.l2Entries,
      isDirty: (s.header.incompatibleFeatures & INCOMPAT.DIRTY) !== 0n,
    };
  },

  async getSpecificInfo(bs) {
    return specificInfo(bs);
  },

  snapshotCreate: qcow2SnapshotCreate,
  snapshotGoto: qcow2SnapshotGoto,
  snapshotDelete: qcow2SnapshotDelete,
  snapshotLoadTmp: qcow2SnapshotLoadTmp,
  saveVmstate: qcow2SaveVmstate,
  loadVmstate: qcow2LoadVmstate,

  async snapshotList(bs): Promise<SnapshotInfo[]> {
    const s = state(bs);
    // QEMU keeps no internal snapshots of images with an external data file, and lists none.
    if (s.hasDataFile) throw new BlockError('ENOTSUP', undefined, { node: bs.nodeName });
    return s.snapshots.map((sn) => {
      const info: SnapshotInfo = { id: sn.id, name: sn.name, vmStateSize: sn.vmStateSize, dateSec: sn.dateSec, dateNsec: sn.dateNsec, vmClockNsec: sn.vmClockNsec };
      if (sn.icount !== undefined) info.icount = sn.icount;
      return info;
    });
  },

  hasZeroInit(bs) {
    const s = bs.opaque as Qcow2State | undefined;
    if (!s) return false;
    // Preallocated images have every L2 table; others have none, so the first L1 entry tells.
    const preallocated = s.mapping.l1Size > 0 && s.l1.subarray(0, 8).some((b) => b !== 0);
    if (!preallocated) return true;
    return s.dataFile.bs.drv.hasZeroInit?.(s.dataFile.bs) ?? false;
  },

  async measure(opts: CreateOptions, src: BlockNode | null): Promise<MeasureInfo> {
    return measureQcow2(opts, src, bdrvBlockStatusAbove);
  },

  create: qcow2Create,
  changeBackingFile: qcow2ChangeBackingFile,
  makeEmpty: qcow2MakeEmpty,
  amend: qcow2Amend,

  supportsPersistentDirtyBitmap: (bs) => state(bs).header.version >= 3,
  async canStoreNewDirtyBitmap(bs, name, granularity) {
    qcow2CanStoreNewDirtyBitmap(bs, state(bs), name, granularity);
  },
  removePersistentDirtyBitmap: (bs, name) => qcow2RemovePersistentDirtyBitmap(bs, state(bs), name),

  reopenPrepare: qcow2ReopenPrepare,
  reopenCommit: qcow2ReopenCommit,
  reopenCommitPost: qcow2ReopenCommitPost,
  invalidateCache: qcow2InvalidateCache,
};

export { qcow2Driver as default };
