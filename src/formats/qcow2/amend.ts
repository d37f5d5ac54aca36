/**
 * `qemu-img amend` for qcow2 (QEMU's qcow2_amend_options and its helpers
 * qcow2_upgrade, qcow2_downgrade and qcow2_expand_zero_clusters): the
 * options are looked at in the order QEMU declares them, then applied in
 * QEMU's order — upgrade, refcount width, data file flags and header,
 * backing file check, lazy refcounts, size, downgrade last — with QEMU's
 * messages. Progress is reported the way QEMU's amend helper callback
 * spreads it over the operations.
 */
import { BlockBackend } from '../../core/block-backend.ts';
import type { ProgressFn } from '../../core/driver.ts';
import { BlockError, STRERROR, toBlockError } from '../../core/errors.ts';
import { HintedError } from '../../core/img/create.ts';
import { bdrvFlush, bdrvPread, bdrvPwritev } from '../../core/io.ts';
import type { BlockNode } from '../../core/node.ts';
import type { CreateOptions } from '../../core/options.ts';
import { PERM } from '../../core/types.ts';
import { allocClusters, barrier, checkUsable, flushRefblocks, getRefcount, markClean, overlapCheck, queueFree, updateRefcounts, writeback, writeHeaderRaw } from './alloc.ts';
import { getHostOffset, SC } from './cluster.ts';
import { AUTOCLEAR, COMPAT, COMPRESSION_TYPE, INCOMPAT, LIMITS, validateTable } from './header.ts';
import { changeRefcountOrder } from './refcount-order.ts';
import { writeSnapshotTable } from './snapshot-write.ts';
import { entryOffset, hiWord, HI_COMPRESSED, HI_COPIED, LO_ZERO, loWord, offsetWords, setWords, state, type Qcow2State } from './state.ts';

/** Operations QEMU's amend helper callback tells apart. */
type Operation = 'none' | 'upgrade' | 'refcount' | 'downgrade';

/**
 * QEMU's qcow2_amend_helper_cb: progress of several operations folded into
 * one bar, projecting the work of the operations still to come from the ones
 * seen so far.
 */
class AmendProgress {
  current: Operation = 'none';
  private last: Operation = 'none';
  private completed = 0;
  private offsetCompleted = 0;
  private lastWork = 0;

  constructor(private readonly total: number, private readonly out: ProgressFn | undefined) {}

  /** A status callback for the current operation. */
  report(offset: number, work: number): void {
    if (this.current !== this.last) {
      if (this.last !== 'none') {
        this.offsetCompleted += this.lastWork;
        this.completed++;
      }
      this.last = this.current;
    }
    if (this.total <= 0) return;
    this.lastWork = work;
    const currentWork = this.offsetCompleted + work;
    const projected = Math.trunc((currentWork * (this.total - this.completed - 1)) / (this.completed + 1));
    this.out?.(this.offsetCompleted + offset, currentWork + projected);
  }
}

/** Wraps an error as QEMU's error_setg_errno(errp, ret, "<what>"). */
function withErrno(what: string, e: unknown): BlockError {
  const be = toBlockError(e);
  return new BlockError(be.code, `${what}: ${STRERROR[be.code]}`, { cause: e });
}

/** Puts every cached table and refcount on disk and clears the dirty bit (QEMU's qcow2_mark_clean after a flush), failing in amend's words. */
async function makeClean(s: Qcow2State): Promise<void> {
  try {
    await writeback(s);
    await barrier(s);
    await markClean(s);
  } catch (e) {
    throw withErrno('Failed to make the image clean', e);
  }
}

/** The driver's amend (QEMU's qcow2_amend_options). */
export async function qcow2Amend(bs: BlockNode, opts: CreateOptions, _force: boolean, progress?: ProgressFn): Promise<void> {
  const s = state(bs);
  checkUsable(s);
  const h = s.header;
  const oldVersion = h.version;
  let newVersion = oldVersion;
  let newSize = 0;
  let backingFile: string | undefined;
  let backingFmt: string | undefined;
  let dataFile: string | undefined;
  let lazyRefcounts = s.lazyRefcounts;
  const isRaw = s.hasDataFile && (h.autoclearFeatures & AUTOCLEAR.DATA_FILE_RAW) !== 0n;
  let dataFileRaw = isRaw;
  let refcountBits = 2 ** h.refcountOrder;

  // Looked at in QEMU's declaration order, so the first offending option is the one QEMU names.
  for (const name of Object.keys(opts).sort((a, b) => AMEND_ORDER.indexOf(a) - AMEND_ORDER.indexOf(b))) {
    const v = opts[name];
    if (v === undefined) continue;
    if (name.startsWith('encrypt.')) {
      // This engine opens no encrypted image, so there is never encryption to amend.
      throw new BlockError('EINVAL', "Can't amend encryption options - encryption not present");
    }
    switch (name) {
      case 'compat':
        if (v === '0.10' || v === 'v2') newVersion = 2;
        else if (v === '1.1' || v === 'v3') newVersion = 3;
        else throw new BlockError('EINVAL', `Unknown compatibility level ${String(v)}`);
        break;
      case 'size':
        newSize = Number(v);
        break;
      case 'backing_file':
        backingFile = String(v);
        break;
      case 'backing_fmt':
        backingFmt = String(v);
        break;
      case 'lazy_refcounts':
        lazyRefcounts = v === true;
        break;
      case 'refcount_bits': {
        const n = Number(v);
        if (n <= 0 || n > 64 || (n & (n - 1)) !== 0) throw new BlockError('EINVAL', 'Refcount width must be a power of two and may not exceed 64 bits');
        refcountBits = n;
        break;
      }
      case 'data_file':
        dataFile = String(v);
        if (!s.hasDataFile) throw new BlockError('EINVAL', 'data-file can only be set for images that use an external data file');
        break;
      case 'data_file_raw':
        dataFileRaw = v === true;
        if (dataFileRaw && !isRaw) throw new BlockError('EINVAL', 'data-file-raw cannot be set on existing images');
        break;
      default:
        throw new BlockError('EINVAL', `Invalid parameter '${name}'`);
    }
  }

  const newOrder = Math.log2(refcountBits);
  const total = (newVersion !== oldVersion ? 1 : 0) + (h.refcountOrder !== newOrder ? 1 : 0);
  const p = new AmendProgress(total, progress);

  if (newVersion > oldVersion) {
    p.current = 'upgrade';
    await s.lock.run(() => upgrade(s, newVersion, (o, w) => p.report(o, w)));
  }

  if (h.refcountOrder !== newOrder) {
    if (newVersion < 3 && refcountBits !== 16) {
      throw new BlockError('EINVAL', 'Refcount widths other than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)');
    }
    p.current = 'refcount';
    await s.lock.run(() => changeRefcountOrder(s, newOrder, (o, w) => p.report(o, w)));
  }

  // data-file-raw blocks backing files, so it is settled before the backing file is looked at.
  await s.lock.run(async () => {
    if (dataFileRaw) h.autoclearFeatures |= AUTOCLEAR.DATA_FILE_RAW;
    else h.autoclearFeatures &= ~AUTOCLEAR.DATA_FILE_RAW;
    if (dataFile !== undefined) {
      if (dataFile !== '') s.ext.dataFile = dataFile;
      else delete s.ext.dataFile;
    }
    try {
      await writeHeaderRaw(s);
    } catch (e) {
      throw withErrno('Failed to update the image header', e);
    }
  });

  if (backingFile !== undefined || backingFmt !== undefined) {
    // QEMU 7.2 only accepts the values the image already has: changing them is rebase's job.
    if (backingFile !== s.imageBackingFile || backingFmt !== s.ext.backingFormat) {
      throw new HintedError('EINVAL', 'Cannot amend the backing file', "You can use 'qblock-img rebase' instead.\n");
    }
  }

  if (s.lazyRefcounts !== lazyRefcounts) {
    await s.lock.run(async () => {
      if (lazyRefcounts) {
        if (newVersion < 3) {
          throw new BlockError('EINVAL', 'Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)');
        }
        h.compatibleFeatures |= COMPAT.LAZY_REFCOUNTS;
        try {
          await writeHeaderRaw(s);
        } catch (e) {
          h.compatibleFeatures &= ~COMPAT.LAZY_REFCOUNTS;
          throw withErrno('Failed to update the image header', e);
        }
        s.lazyRefcounts = true;
      } else {
        // Refcounts must be exact on disk before the image may claim they always are.
        await makeClean(s);
        h.compatibleFeatures &= ~COMPAT.LAZY_REFCOUNTS;
        try {
          await writeHeaderRaw(s);
        } catch (e) {
          h.compatibleFeatures |= COMPAT.LAZY_REFCOUNTS;
          throw withErrno('Failed to update the image header', e);
        }
        s.lazyRefcounts = false;
      }
    });
  }

  if (newSize) {
    const blk = new BlockBackend(bs.graph, { perm: PERM.RESIZE, sharedPerm: PERM.ALL });
    blk.insertNode(bs);
    try {
      // Amend means "exactly these values", so the truncate is exact.
      await blk.truncate(newSize, { exact: true, prealloc: 'off' });
    } finally {
      await blk.close();
    }
  }

  if (newVersion < oldVersion) {
    p.current = 'downgrade';
    await s.lock.run(() => downgrade(s, newVersion, (o, w) => p.report(o, w)));
  }
}

/** QEMU's declaration order of the amend options. */
const AMEND_ORDER = ['encrypt.state', 'encrypt.keyslot', 'encrypt.old-secret', 'encrypt.new-secret', 'encrypt.iter-time', 'size', 'compat', 'backing_file', 'backing_fmt', 'data_file', 'data_file_raw', 'lazy_refcounts', 'refcount_bits'];

/** Bytes of snapshot extra data a v3 image needs (vm_state_size_large and disk_size). */
const V3_SNAPSHOT_EXTRA = 16;

/** QEMU's qcow2_upgrade to v3. Callers hold the lock. */
async function upgrade(s: Qcow2State, target: number, status: (offset: number, work: number) => void): Promise<void> {
  const h = s.header;
  status(0, 2);
  if (s.snapshots.some((sn) => sn.extraDataSize < V3_SNAPSHOT_EXTRA)) {
    // v3 requires each entry's 64-bit VM state size and disk size; the table writer always stores them.
    try {
      await writeSnapshotTable(s, s.snapshots.slice());
    } catch (e) {
      throw withErrno('Failed to update the snapshot table', e);
    }
  }
  status(1, 2);
  const old = h.version;
  h.version = target;
  try {
    await writeHeaderRaw(s);
  } catch (e) {
    h.version = old;
    throw withErrno('Failed to update the image header', e);
  }
  status(2, 2);
}

/** QEMU's qcow2_downgrade to v2. Callers hold the lock. */
async function downgrade(s: Qcow2State, target: number, status: (offset: number, work: number) => void): Promise<void> {
  const bs = s.bs;
  const h = s.header;
  if (h.refcountOrder !== 4) throw new BlockError('ENOTSUP', 'compat=0.10 requires refcount_bits=16');
  if (s.hasDataFile) throw new BlockError('ENOTSUP', 'Cannot downgrade an image with a data file');
  // v2 readers would ignore a snapshot's own disk size and a VM state size past 32 bits.
  for (const sn of s.snapshots) {
    if (sn.vmStateSize > 0xffffffff || sn.diskSize !== bs.totalBytes) throw new BlockError('ENOTSUP', 'Internal snapshots prevent downgrade of image');
  }
  if (h.incompatibleFeatures & INCOMPAT.DIRTY) await makeClean(s);
  const leftover = h.incompatibleFeatures & ~INCOMPAT.COMPRESSION;
  if (leftover) throw new BlockError('ENOTSUP', `Cannot downgrade an image with incompatible features 0x${leftover.toString(16)} set`);
  h.compatibleFeatures = 0n;
  h.autoclearFeatures = 0n;
  s.lazyRefcounts = false;
  try {
    await expandZeroClusters(s, status);
  } catch (e) {
    throw withErrno('Failed to turn zero into data clusters', e);
  }
  if (h.incompatibleFeatures & INCOMPAT.COMPRESSION) {
    let compressed: boolean;
    try {
      compressed = await hasCompressedClusters(s);
    } catch {
      throw new BlockError('EINVAL', 'Failed to check block status');
    }
    if (compressed) throw new BlockError('ENOTSUP', 'Cannot downgrade an image with zstd compression type and existing compressed clusters');
    h.incompatibleFeatures &= ~INCOMPAT.COMPRESSION;
    h.compressionType = COMPRESSION_TYPE.ZLIB;
  }
  h.version = target;
  try {
    await writeHeaderRaw(s);
  } catch (e) {
    h.version = 3;
    throw withErrno('Failed to update the image header', e);
  }
  await bdrvFlush(bs.file!.bs);
}

/** QEMU's qcow2_has_compressed_clusters over the active layer. */
async function hasCompressedClusters(s: Qcow2State): Promise<boolean> {
  const len = s.bs.totalBytes;
  for (let off = 0; off < len;) {
    const m = await getHostOffset(s.mapping, off, Math.min(len - off, 0x7fffffff));
    if (m.type === SC.COMPRESSED) return true;
    off += m.bytes;
  }
  return false;
}

/**
 * QEMU's qcow2_expand_zero_clusters: v2 has no zero flag, so every zero
 * cluster of the active layer and of every snapshot becomes either
 * unallocated (no backing file: it reads as zeroes anyway) or a data
 * cluster filled with zeroes. L2 tables are rewritten in place, each after
 * the clusters it will name are counted and zeroed on disk.
 */
async function expandZeroClusters(s: Qcow2State, status: (offset: number, work: number) => void): Promise<void> {
  const file = s.bs.file!;
  // Everything goes through the file from here: cached tables must be on disk and forgotten.
  await writeback(s);
  await barrier(s);
  s.l2Cache.invalidate();
  const total = s.header.l1Size + s.snapshots.reduce((n, sn) => n + sn.l1Size, 0);
  const visited = { n: 0 };
  await expandL1(s, s.l1, s.header.l1Size, visited, total, status);
  for (const sn of s.snapshots) {
    validateTable(BigInt(sn.l1TableOffset), sn.l1Size, 8, LIMITS.MAX_L1_SIZE, s.clusterSize, 'Snapshot L1 table');
    const l1 = sn.l1Size > 0 ? await bdrvPread(file, sn.l1TableOffset, sn.l1Size * 8) : new Uint8Array(0);
    await expandL1(s, l1, sn.l1Size, visited, total, status);
  }
  // References dropped from clusters that stay with the snapshots go now that the tables are on disk.
  await writeback(s);
  await barrier(s);
  s.l2Cache.invalidate();
}

/** Expands the zero clusters under one L1 table (QEMU's expand_zero_clusters_in_l1). */
async function expandL1(s: Qcow2State, l1: Uint8Array, l1Size: number, visited: { n: number }, total: number, status: (offset: number, work: number) => void): Promise<void> {
  const cs = s.clusterSize;
  const file = s.bs.file!;
  for (let i = 0; i < l1Size; i++) {
    const l2Offset = entryOffset(hiWord(l1, 8 * i), loWord(l1, 8 * i));
    if (l2Offset !== 0) {
      if (l2Offset < 0 || l2Offset % cs !== 0) throw new BlockError('EIO', `qcow2: Image is corrupt: L2 table offset 0x${l2Offset.toString(16)} unaligned (L1 index: 0x${i.toString(16)})`);
      const l2Refcount = await getRefcount(s, l2Offset / cs);
      const l2 = await bdrvPread(file, l2Offset, cs);
      let dirty = false;
      for (let j = 0; j < cs / 8; j++) {
        const hi = hiWord(l2, 8 * j);
        const lo = loWord(l2, 8 * j);
        if (hi & HI_COMPRESSED || (lo & LO_ZERO) === 0) continue;
        let offset = entryOffset(hi, lo);
        // QEMU zeroes an allocated zero cluster in place even when a snapshot still reads its data; a cluster
        // referenced beyond this table gets a fresh one instead, so the snapshot keeps what it saved.
        if (offset > 0 && offset % cs === 0 && (await getRefcount(s, offset / cs)) > l2Refcount) {
          for (let r = 0; r < l2Refcount; r++) queueFree(s, offset, cs, 'other');
          offset = 0;
        }
        if (offset === 0) {
          if (!s.bs.backing) {
            setWords(l2, 8 * j, 0, 0);
            dirty = true;
            continue;
          }
          offset = (await allocClusters(s, 1)).offset;
          // A table shared with snapshots gives each of its users a reference.
          if (l2Refcount > 1) await updateRefcounts(s, offset / cs, 1, l2Refcount - 1);
        }
        if (offset < 0 || offset % cs !== 0) throw new BlockError('EIO', `qcow2: Image is corrupt: Cluster allocation offset 0x${offset.toString(16)} unaligned (L2 offset: 0x${l2Offset.toString(16)}, L2 index: 0x${j.toString(16)})`);
        await overlapCheck(s, 0, offset, cs);
        await bdrvPwritev(s.dataFile, offset, cs, new Uint8Array(cs));
        const [nhi, nlo] = offsetWords(offset, l2Refcount === 1 ? HI_COPIED : 0);
        setWords(l2, 8 * j, nhi, nlo);
        dirty = true;
      }
      if (dirty) {
        // Counted and zeroed clusters first, then the table that names them.
        await flushRefblocks(s);
        await barrier(s);
        await overlapCheck(s, (1 << 2) | (1 << 7), l2Offset, cs);
        await bdrvPwritev(file, l2Offset, cs, l2);
        await barrier(s);
      }
    }
    visited.n++;
    status(visited.n, total);
  }
}
