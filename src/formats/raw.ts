/**
 * The `raw` format (QEMU's block/raw-format.c): the guest sees the file's
 * bytes, optionally a window of them given by `offset` and `size`. Without a
 * window the node is nearly a filter (its file child has the FILTERED role);
 * with one, reads past the window fail with EINVAL and writes with ENOSPC so
 * nothing leaks outside it.
 *
 * A raw node whose format was guessed by probing refuses writes that would
 * make sector 0 look like another format: such a write could turn a guest's
 * disk into, say, a qcow2 header that names a host file as its backing file.
 */
import { defaultChildPerms, type BdrvChild } from '../core/child.ts';
import type { BlockDriver, BlockDriverInfo, CreateContext, MeasureInfo, ReopenState } from '../core/driver.ts';
import { BlockError } from '../core/errors.ts';
import { bdrvCopyRange, bdrvCopyRangeTo, bdrvDebugEvent, bdrvGetInfo, bdrvGetLength, bdrvGetLengthSync, hasDebugListener, bdrvPdiscard, bdrvPreadv, bdrvPreadvSync, bdrvPwriteZeroes, bdrvPwritev, bdrvTruncate } from '../core/io.ts';
import type { BlockNode } from '../core/node.ts';
import type { CreateOptions } from '../core/options.ts';
import { BLOCK, PERM, REQ, ROLE, type BlockdevOptions, type BlockStatus } from '../core/types.ts';
import { sizeOption } from '../protocols/driver-opts.ts';

/** Bytes at the start of a probed raw image that writes may not turn into another format (QEMU's BLOCK_PROBE_BUF_SIZE). */
export const RAW_PROBE_GUARD_BYTES = 512;
const SECTOR = 512;

/** The window raw exposes (QEMU's BDRVRawState). */
export interface RawNodeState {
  offset: number;
  /** Length of the window; follows the file when hasSize is false. */
  size: number;
  hasSize: boolean;
}

function state(bs: BlockNode): RawNodeState {
  return bs.state<RawNodeState>();
}

function fileChild(bs: BlockNode): BdrvChild {
  const c = bs.file;
  if (!c) throw new BlockError('ENOMEDIUM', undefined, { node: bs.nodeName });
  return c;
}

/** Reads `offset` and `size` from options (size absent means "to the end of the file"). */
function readWindowOptions(options: Record<string, unknown>): { offset: number; size: number | undefined } {
  return { offset: sizeOption(options, 'offset', 0), size: sizeOption(options, 'size') };
}

/** Validates a window against the file's current length, with QEMU's messages (raw_apply_options). */
async function applyOptions(bs: BlockNode, offset: number, size: number | undefined): Promise<RawNodeState> {
  let realSize: number;
  try {
    realSize = await bdrvGetLength(fileChild(bs).bs);
  } catch (e) {
    const code = e instanceof BlockError ? e.code : 'EIO';
    throw new BlockError(code, `Could not get image size: ${e instanceof Error ? e.message : String(e)}`, { cause: e });
  }
  if (offset > realSize) {
    throw new BlockError('EINVAL', `Offset (${offset}) cannot be greater than size of the containing file (${realSize})`);
  }
  if (size !== undefined && realSize - offset < size) {
    // The double space is QEMU's; tools that match on the message expect it.
    throw new BlockError(
      'EINVAL',
      `The sum of offset (${offset}) and size (${size}) has to be smaller or equal to the  actual size of the containing file (${realSize})`,
    );
  }
  // A size that is not whole sectors would be rounded up by sector-based users and leak past the window.
  if (size !== undefined && size % SECTOR !== 0) {
    throw new BlockError('EINVAL', `Specified size is not multiple of ${SECTOR}`);
  }
  return { offset, hasSize: size !== undefined, size: size ?? realSize - offset };
}

/** Maps a guest offset into the file, refusing ranges outside the window (QEMU's raw_adjust_offset). */
function adjustOffset(bs: BlockNode, offset: number, bytes: number, isWrite: boolean): number {
  const s = state(bs);
  if (s.hasSize && (offset > s.size || bytes > s.size - offset)) {
    throw new BlockError(isWrite ? 'ENOSPC' : 'EINVAL', undefined, { node: bs.nodeName });
  }
  return offset + s.offset;
}

/** QEMU's bdrv_has_zero_init: the driver's answer, a filter's child's, or false; never for images with a backing file. */
export function bdrvHasZeroInit(bs: BlockNode): boolean {
  if (bs.backing) return false;
  if (bs.drv.hasZeroInit) return bs.drv.hasZeroInit(bs);
  const f = bs.filteredChild;
  return f ? bdrvHasZeroInit(f.bs) : false;
}

/** The raw image's size given its file's current length `len` (updates the state, as getLength always has). */
function followFileLength(s: RawNodeState, len: number): number {
  if (len < s.offset) s.size = 0;
  else s.size = s.hasSize ? Math.min(s.size, len - s.offset) : len - s.offset;
  return s.size;
}

/** The raw format driver. */
export const rawDriver: BlockDriver = {
  name: 'raw',
  kind: 'format',
  hasVariableLength: true,
  runtimeOptions: [
    { name: 'offset', type: 'size', help: 'offset in the disk where the image starts' },
    { name: 'size', type: 'size', help: 'virtual disk size' },
  ],
  createOptions: [{ name: 'size', type: 'size', help: 'Virtual disk size' }],

  probe() {
    // The smallest positive score: raw is chosen only when no other format claims the file.
    return 1;
  },

  async open(bs, options) {
    const { offset, size } = readWindowOptions(options);
    // Without a window raw behaves like a filter; with one it does not (it hides part of the file).
    const role = offset !== 0 || size !== undefined ? ROLE.DATA | ROLE.PRIMARY : ROLE.FILTERED | ROLE.PRIMARY;
    const spec = bs.options.file as BlockdevOptions | string | undefined;
    const child = await bs.graph.openChild(bs, spec, 'file', role, false);
    if (!child) throw new BlockError('EINVAL', 'A block device must be specified for "file"');
    const f = child.bs;
    bs.supportedWriteFlags = REQ.WRITE_UNCHANGED | (REQ.FUA & f.supportedWriteFlags);
    bs.supportedZeroFlags = REQ.WRITE_UNCHANGED | ((REQ.FUA | REQ.MAY_UNMAP | REQ.NO_FALLBACK) & f.supportedZeroFlags);
    bs.supportedTruncateFlags = f.supportedTruncateFlags & REQ.ZERO_WRITE;
    bs.opaque = await applyOptions(bs, offset, size);
  },

  childPerm(bs, _child, role, parentPerm, parentShared) {
    const r = defaultChildPerms(bs, role, parentPerm, parentShared, !bs.readOnly);
    // The defaults add WRITE/RESIZE for storage children; raw needs them only when its users do.
    r.perm &= ~(PERM.WRITE | PERM.RESIZE);
    r.perm |= parentPerm & (PERM.WRITE | PERM.RESIZE);
    return r;
  },

  refreshLimits(bs) {
    // Protecting sector 0 is simple when every write covers whole sectors.
    if (bs.probed) bs.bl.requestAlignment = Math.max(bs.bl.requestAlignment, SECTOR);
  },

  async preadv(bs, offset, bytes, buf, flags, signal) {
    const off = adjustOffset(bs, offset, bytes, false);
    await bdrvDebugEvent(fileChild(bs).bs, 'read_aio');
    await bdrvPreadv(fileChild(bs), off, bytes, buf, flags, signal);
  },

  preadvSync(bs, offset, bytes, buf) {
    const file = fileChild(bs);
    // A listener on read_aio could inject an error or wait: only preadv announces it.
    if (hasDebugListener(file.bs)) return false;
    return bdrvPreadvSync(file, adjustOffset(bs, offset, bytes, false), bytes, buf);
  },

  async pwritev(bs, offset, bytes, buf, flags, signal) {
    let data = buf;
    if (bs.probed && offset < RAW_PROBE_GUARD_BYTES && bytes > 0) {
      // request_alignment is a sector on probed images, so a write here starts at 0 and covers the sector.
      if (offset !== 0 || bytes < RAW_PROBE_GUARD_BYTES) throw new BlockError('EINVAL', undefined, { node: bs.nodeName });
      // Check and write a private copy: the caller could change its buffer after the check.
      data = new Uint8Array(bytes);
      data.set(buf.subarray(0, bytes));
      const drv = bs.graph.probeFormat(data.subarray(0, RAW_PROBE_GUARD_BYTES), bs.filename);
      if (drv !== bs.drv) throw new BlockError('EPERM', undefined, { node: bs.nodeName });
    }
    const off = adjustOffset(bs, offset, bytes, true);
    await bdrvDebugEvent(fileChild(bs).bs, 'write_aio');
    await bdrvPwritev(fileChild(bs), off, bytes, data, flags, signal);
  },

  async copyRangeFrom(bs, _src, srcOffset, dst, dstOffset, bytes, readFlags, writeFlags) {
    const off = adjustOffset(bs, srcOffset, bytes, false);
    await bdrvCopyRange(fileChild(bs), off, dst, dstOffset, bytes, readFlags, writeFlags);
  },

  async copyRangeTo(bs, src, srcOffset, _dst, dstOffset, bytes, readFlags, writeFlags) {
    const off = adjustOffset(bs, dstOffset, bytes, true);
    await bdrvCopyRangeTo(src, srcOffset, fileChild(bs), off, bytes, readFlags, writeFlags);
  },

  async pwriteZeroes(bs, offset, bytes, flags) {
    const off = adjustOffset(bs, offset, bytes, true);
    await bdrvPwriteZeroes(fileChild(bs), off, bytes, flags);
  },

  async pdiscard(bs, offset, bytes) {
    const off = adjustOffset(bs, offset, bytes, true);
    await bdrvPdiscard(fileChild(bs), off, bytes);
  },

  async blockStatus(bs, _wantZero, offset, bytes): Promise<BlockStatus> {
    return { status: BLOCK.RAW | BLOCK.OFFSET_VALID, pnum: bytes, map: offset + state(bs).offset, file: fileChild(bs).bs };
  },

  async truncate(bs, offset, exact, prealloc, flags) {
    const s = state(bs);
    if (s.hasSize) throw new BlockError('ENOTSUP', 'Cannot resize fixed-size raw disks', { node: bs.nodeName });
    if (offset > Number.MAX_SAFE_INTEGER - s.offset) {
      throw new BlockError('EINVAL', 'Disk size too large for the chosen offset', { node: bs.nodeName });
    }
    s.size = offset;
    await bdrvTruncate(fileChild(bs), offset + s.offset, exact, prealloc, flags);
  },

  async getLength(bs) {
    // The file may have changed size under us; follow it, but never past a fixed size.
    return followFileLength(state(bs), await bdrvGetLength(fileChild(bs).bs));
  },

  getLengthSync(bs) {
    const len = bdrvGetLengthSync(fileChild(bs).bs);
    return len === undefined ? undefined : followFileLength(state(bs), len);
  },

  async getAllocatedFileSize(bs) {
    const f = fileChild(bs).bs;
    if (!f.drv.getAllocatedFileSize) throw new BlockError('ENOTSUP', undefined, { node: bs.nodeName });
    return f.drv.getAllocatedFileSize(f);
  },

  async getInfo(bs): Promise<BlockDriverInfo> {
    // QEMU's raw_get_info calls bdrv_get_info on the file, which passes through filters (blkdebug…).
    return bdrvGetInfo(fileChild(bs).bs);
  },

  hasZeroInit(bs) {
    return bdrvHasZeroInit(fileChild(bs).bs);
  },

  async measure(opts: CreateOptions, src: BlockNode | null): Promise<MeasureInfo> {
    let required: number;
    if (src) {
      try {
        required = await bdrvGetLength(src);
      } catch (e) {
        throw new BlockError(e instanceof BlockError ? e.code : 'EIO', `Unable to get image size: ${e instanceof Error ? e.message : String(e)}`, { cause: e });
      }
    } else {
      const size = sizeOption({ size: opts.size }, 'size', 0);
      required = Math.ceil(size / SECTOR) * SECTOR;
    }
    // Unallocated sectors still count towards a raw file's size.
    return { required, fullyAllocated: required };
  },

  async create(filename: string, opts: CreateOptions, ctx: CreateContext) {
    // A raw image is just the protocol's file; its create does the work (size, preallocation).
    const node = await ctx.createAndOpenFile(filename, opts);
    await ctx.close(node);
  },

  async reopenPrepare(rs: ReopenState) {
    const current = rs.bs.options;
    const merged: Record<string, unknown> = { offset: current.offset, size: current.size };
    for (const k of ['offset', 'size']) if (k in rs.options) merged[k] = rs.options[k];
    const { offset, size } = readWindowOptions(merged);
    rs.opaque = await applyOptions(rs.bs, offset, size);
  },

  reopenCommit(rs: ReopenState) {
    const next = rs.opaque as RawNodeState | undefined;
    if (next) Object.assign(state(rs.bs), next);
    rs.opaque = undefined;
  },

  reopenAbort(rs: ReopenState) {
    rs.opaque = undefined;
  },
};
