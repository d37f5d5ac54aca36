/**
 * The generic request path (QEMU's block/io.c): every request on a node passes
 * here to be checked, aligned to request_alignment (read-modify-write under a
 * serialising tracked request), split to max_transfer, counted in flight, and
 * only then handed to the driver. Drivers never see an unaligned request.
 */
import { BlockError, isBlockError, throwIfAborted } from './errors.ts';
import type { BdrvChild } from './child.ts';
import type { BlockDriverInfo } from './driver.ts';
import type { BlockNode, TrackedRequest } from './node.ts';
import { BDRV_MAX_LENGTH, BLOCK, OPEN, PERM, REQ, type BlockStatus, type PreallocMode } from './types.ts';
import { isZeroBuffer } from './zero.ts';
import { bdrvDirtyBitmapTruncate, bdrvHasReadonlyBitmaps, bdrvSetDirty } from './dirty-bitmap.ts';

/** Largest bounce buffer used when emulating zero writes. */
const MAX_ZERO_BOUNCE = 1 << 20;

/** Whether n is a multiple of a, without % (a library call when n is past 2^31 and so a double): the hot read paths test this per request. */
function isAligned(n: number, a: number): boolean {
  return a === 1 || n === Math.floor(n / a) * a;
}

function alignDown(n: number, a: number): number {
  return n - (n % a);
}
function alignUp(n: number, a: number): number {
  const r = n % a;
  return r === 0 ? n : n + (a - r);
}

/** Rejects ranges QEMU rejects with EIO (negative, or past BDRV_MAX_LENGTH), and non-integers with EINVAL. */
export function checkRequest(offset: number, bytes: number): void {
  if (!Number.isInteger(offset) || !Number.isInteger(bytes)) {
    throw new BlockError('EINVAL', `Request offset and length must be integers (got ${offset}, ${bytes})`);
  }
  if (offset < 0) throw new BlockError('EIO', `offset is negative: ${offset}`);
  if (bytes < 0) throw new BlockError('EIO', `bytes is negative: ${bytes}`);
  if (bytes > BDRV_MAX_LENGTH) throw new BlockError('EIO', `bytes(${bytes}) exceeds maximum(${BDRV_MAX_LENGTH})`);
  if (offset > BDRV_MAX_LENGTH - bytes) {
    throw new BlockError('EIO', `sum of offset(${offset}) and bytes(${bytes}) exceeds maximum(${BDRV_MAX_LENGTH})`);
  }
}

function checkNode(bs: BlockNode): void {
  if (bs.closing) throw new BlockError('ENOMEDIUM', undefined, { node: bs.nodeName });
}

/**
 * Announces a debug event (QEMU's bdrv_debug_event / BLKDBG_EVENT): walks from
 * `bs` down the primary children to the first driver that listens (blkdebug)
 * and lets it act; the promise rejects when it injects an error. Returns
 * undefined when nothing below listens, so the common case costs no I/O.
 */
export function bdrvDebugEvent(bs: BlockNode | null | undefined, event: string): Promise<void> | undefined {
  for (let n = bs; n; n = n.primaryChild?.bs) {
    if (n.drv.debugEvent) return n.drv.debugEvent(n, event);
  }
  return undefined;
}

/** Whether a debug event announced on `bs` would reach a listener (paths that cannot announce one take the general path then). */
export function hasDebugListener(bs: BlockNode | null | undefined): boolean {
  for (let n = bs; n; n = n.primaryChild?.bs) {
    if (n.drv.debugEvent) return true;
  }
  return false;
}

// ---------------------------------------------------------------------------
// Tracked requests

function trackBegin(bs: BlockNode, offset: number, bytes: number, isWrite: boolean): TrackedRequest {
  const req: TrackedRequest = {
    seq: bs.nextRequestSeq++,
    offset,
    bytes,
    overlapOffset: offset,
    overlapBytes: bytes,
    serialising: false,
    isWrite,
    done: null,
    resolve: null,
    finished: false,
  };
  bs.trackedRequests.add(req);
  return req;
}

function trackEnd(bs: BlockNode, req: TrackedRequest): void {
  bs.trackedRequests.delete(req);
  req.finished = true;
  req.resolve?.();
}

/** Widens the request's protected range to `align` and makes overlapping requests wait for it (QEMU's bdrv_make_request_serialising). */
function makeSerialising(req: TrackedRequest, align: number): void {
  const start = alignDown(req.overlapOffset, align);
  const end = alignUp(req.overlapOffset + req.overlapBytes, align);
  req.serialising = true;
  req.overlapOffset = Math.min(start, req.overlapOffset);
  req.overlapBytes = Math.max(end, req.overlapOffset + req.overlapBytes) - req.overlapOffset;
}

/** Resolves when `req` ends; the promise is made on first demand. */
function waitFor(req: TrackedRequest): Promise<void> {
  if (req.finished) return Promise.resolve();
  if (!req.done) req.done = new Promise<void>((r) => (req.resolve = r));
  return req.done;
}

function overlaps(a: TrackedRequest, b: TrackedRequest): boolean {
  return a.overlapOffset < b.overlapOffset + b.overlapBytes && b.overlapOffset < a.overlapOffset + a.overlapBytes;
}

/**
 * Waits for every older overlapping request when either side is serialising.
 * Waiting only on older requests keeps the wait graph acyclic.
 */
async function waitSerialising(bs: BlockNode, req: TrackedRequest): Promise<void> {
  for (;;) {
    let conflict: TrackedRequest | undefined;
    for (const other of bs.trackedRequests) {
      if (other === req || other.seq > req.seq) continue;
      if (!other.serialising && !req.serialising) continue;
      if (overlaps(req, other)) { conflict = other; break; }
    }
    if (!conflict) return;
    await waitFor(conflict);
  }
}

// ---------------------------------------------------------------------------
// Length

/**
 * QEMU keeps lengths in whole 512-byte sectors (bs->total_sectors), so a
 * 1000-byte file is a 1024-byte disk whose tail reads as zeroes.
 */
function sectorLength(len: number): number {
  return alignUp(len, 512);
}

/** Length of the node in bytes (QEMU's bdrv_getlength); asks drivers with variable length every time. */
export async function bdrvGetLength(bs: BlockNode): Promise<number> {
  checkNode(bs);
  if (bs.drv.hasVariableLength && bs.drv.getLength) {
    bs.totalBytes = sectorLength(await bs.drv.getLength(bs));
  }
  return bs.totalBytes;
}

/** bdrvGetLength without I/O: the length, or undefined when the driver can only answer asynchronously (the caller then awaits bdrvGetLength). */
export function bdrvGetLengthSync(bs: BlockNode): number | undefined {
  if (bs.closing) return undefined;
  const drv = bs.drv;
  if (!(drv.hasVariableLength && drv.getLength)) return bs.totalBytes;
  if (!drv.getLengthSync) return undefined;
  const len = drv.getLengthSync(bs);
  if (len === undefined) return undefined;
  bs.totalBytes = sectorLength(len);
  return bs.totalBytes;
}

/** Re-reads the length from the driver (after open or truncate). */
export async function refreshTotalBytes(bs: BlockNode): Promise<number> {
  if (bs.drv.getLength) bs.totalBytes = sectorLength(await bs.drv.getLength(bs));
  else if (bs.primaryChild) bs.totalBytes = await bdrvGetLength(bs.primaryChild.bs);
  return bs.totalBytes;
}

// ---------------------------------------------------------------------------
// Reads

async function driverPreadv(bs: BlockNode, offset: number, bytes: number, buf: Uint8Array, flags: number, signal?: AbortSignal): Promise<void> {
  const drv = bs.drv;
  if (drv.preadv) return drv.preadv(bs, offset, bytes, buf, flags & ~REQ.COPY_ON_READ, signal);
  const child = bs.filteredChild;
  if (child) return bdrvPreadv(child, offset, bytes, buf, flags, signal);
  throw new BlockError('ENOTSUP', `Driver '${drv.name}' cannot read`, { node: bs.nodeName });
}

/** Reads an aligned range, zero-filling past EOF and splitting to max_transfer (QEMU's bdrv_aligned_preadv). */
async function alignedPreadv(bs: BlockNode, req: TrackedRequest | null, offset: number, bytes: number, align: number, buf: Uint8Array, flags: number, signal?: AbortSignal): Promise<void> {
  if (flags & REQ.COPY_ON_READ && req) {
    await copyOnReadv(bs, req, offset, bytes, buf, flags, signal);
    return;
  }
  const total = await bdrvGetLength(bs);
  const maxBytes = alignUp(Math.max(0, total - offset), align);
  const toRead = Math.min(bytes, maxBytes);
  const maxTransfer = bs.bl.maxTransfer > 0 ? alignDown(bs.bl.maxTransfer, align) || align : toRead;
  let done = 0;
  while (done < toRead) {
    throwIfAborted(signal);
    const n = Math.min(toRead - done, maxTransfer);
    await driverPreadv(bs, offset + done, n, buf.subarray(done, done + n), flags, signal);
    done += n;
  }
  if (toRead < bytes) buf.fill(0, toRead, bytes);
}

/** QEMU's bdrv_get_info: the driver's answer; a filter without one passes the question to its child; else ENOTSUP. */
export async function bdrvGetInfo(bs: BlockNode): Promise<BlockDriverInfo> {
  if (!bs.drv.getInfo) {
    const f = bs.drv.kind === 'filter' ? bs.filteredChild?.bs ?? null : null;
    if (f) return bdrvGetInfo(f);
    throw new BlockError('ENOTSUP', undefined, { node: bs.nodeName });
  }
  return bs.drv.getInfo(bs);
}

/** Cluster size used to align copy-on-read (QEMU's bdrv_round_to_subclusters). */
async function copyOnReadAlign(bs: BlockNode): Promise<number> {
  let cs = 0;
  if (bs.drv.getInfo) {
    try {
      const info = await bs.drv.getInfo(bs);
      cs = info.subclusterSize ?? info.clusterSize ?? 0;
    } catch { cs = 0; }
  }
  return Math.max(cs, bs.bl.requestAlignment, 1);
}

async function copyOnReadv(bs: BlockNode, req: TrackedRequest, offset: number, bytes: number, buf: Uint8Array, flags: number, signal?: AbortSignal): Promise<void> {
  const align = await copyOnReadAlign(bs);
  makeSerialising(req, align);
  await waitSerialising(bs, req);
  const total = await bdrvGetLength(bs);
  const start = alignDown(offset, align);
  const end = Math.min(alignUp(offset + bytes, align), alignUp(total, bs.bl.requestAlignment));
  let pos = start;
  while (pos < end) {
    throwIfAborted(signal);
    const { allocated, pnum } = await bdrvIsAllocated(bs, pos, end - pos);
    const n = Math.max(pnum, Math.min(align, end - pos));
    const chunk = new Uint8Array(n);
    await alignedPreadv(bs, null, pos, n, bs.bl.requestAlignment, chunk, flags & ~REQ.COPY_ON_READ, signal);
    if (!allocated) {
      // Only the part of the cluster-aligned range up to EOF is written back.
      const writeLen = Math.min(n, Math.max(0, total - pos));
      if (writeLen > 0) {
        await bdrvDebugEvent(bs, 'cor_write');
        const zero = isZeroBuffer(chunk.subarray(0, writeLen));
        if (zero && bs.drv.pwriteZeroes) {
          await doPwriteZeroes(bs, pos, writeLen, REQ.WRITE_UNCHANGED);
        } else {
          await alignedPwritev(bs, req, pos, writeLen, bs.bl.requestAlignment, chunk.subarray(0, writeLen), REQ.WRITE_UNCHANGED, signal);
        }
      }
    }
    const a = Math.max(pos, offset);
    const b = Math.min(pos + n, offset + bytes);
    if (b > a) buf.set(chunk.subarray(a - pos, b - pos), a - offset);
    pos += n;
  }
}

/** Whether an older serialising request overlaps `req` (or `req` is serialising and overlaps an older one): the synchronous test of waitSerialising. */
function hasSerialisingConflict(bs: BlockNode, req: TrackedRequest): boolean {
  if (bs.trackedRequests.size === 1) return false;
  for (const other of bs.trackedRequests) {
    if (other === req || other.seq > req.seq) continue;
    if (!other.serialising && !req.serialising) continue;
    if (overlaps(req, other)) return true;
  }
  return false;
}

/** The settled result of a request done synchronously (shared: a resolved promise carries no state). */
const DONE: Promise<void> = Promise.resolve();

/** Whether a serialising request in flight overlaps the range (a synchronous read must not pass it). */
function serialisingOverlap(bs: BlockNode, offset: number, bytes: number): boolean {
  if (bs.trackedRequests.size === 0) return false;
  for (const other of bs.trackedRequests) {
    if (other.serialising && offset < other.overlapOffset + other.overlapBytes && other.overlapOffset < offset + bytes) return true;
  }
  return false;
}

/**
 * Reads from the child's node on this thread when its driver can and the
 * request needs none of the general path (QEMU has no such call: its
 * coroutines make every layer cheap; here a promise hop per layer is the
 * cost to avoid). True when `buf` holds the bytes; false when the caller must
 * take bdrvPreadv. Throws what the driver throws.
 */
export function bdrvPreadvSync(child: BdrvChild, offset: number, bytes: number, buf: Uint8Array): boolean {
  const bs = child.bs;
  const drv = bs.drv;
  return (
    drv.preadvSync !== undefined &&
    plainRead(bs, offset, bytes, buf) &&
    !serialisingOverlap(bs, offset, bytes) &&
    drv.preadvSync(bs, offset, bytes, buf.length === bytes ? buf : buf.subarray(0, bytes))
  );
}

/**
 * Whether a read needs none of the general path: inside the node, aligned,
 * within max_transfer, into a big enough buffer, with no copy-on-read and the
 * node open (the shared test of the fast and synchronous read paths).
 */
function plainRead(bs: BlockNode, offset: number, bytes: number, buf: Uint8Array): boolean {
  const align = bs.bl.requestAlignment;
  return (
    bytes > 0 &&
    !bs.closing &&
    bs.copyOnRead === 0 &&
    Number.isInteger(offset) &&
    Number.isInteger(bytes) &&
    offset >= 0 &&
    isAligned(offset, align) &&
    isAligned(bytes, align) &&
    offset + bytes <= (bdrvGetLengthSync(bs) ?? -1) &&
    buf.length >= bytes &&
    (bs.bl.maxTransfer <= 0 || bytes <= (alignDown(bs.bl.maxTransfer, align) || align))
  );
}

/** Waits for a fast-path driver read and ends its request (an async function: one resumption, no closures). */
async function fastReadTail(bs: BlockNode, req: TrackedRequest, p: Promise<void>): Promise<void> {
  try {
    await p;
  } finally {
    fastReadDone(bs, req);
  }
}

/** Ends a request started on the fast read path. */
function fastReadDone(bs: BlockNode, req: TrackedRequest): void {
  trackEnd(bs, req);
  bs.decInFlight();
}

/**
 * Reads `bytes` at `offset` from the child's node into `buf` (QEMU's
 * bdrv_co_preadv_part). Unaligned requests are widened and bounced.
 *
 * The common request (aligned, inside the node, within max_transfer, no
 * copy-on-read, nothing serialising in the way, a driver that reads) is
 * tracked and counted exactly as on the general path but handed to the
 * driver in the same turn, with one continuation for the bookkeeping: it
 * is the hot path of every format read and of the format's read of its file.
 */
export function bdrvPreadv(child: BdrvChild, offset: number, bytes: number, buf: Uint8Array, flags = 0, signal?: AbortSignal): Promise<void> {
  const bs = child.bs;
  const drv = bs.drv;
  if (!(flags & REQ.COPY_ON_READ) && drv.preadv !== undefined && plainRead(bs, offset, bytes, buf) && !signal?.aborted) {
    if (drv.preadvSync !== undefined && flags === 0 && !serialisingOverlap(bs, offset, bytes)) {
      // Done on this thread: nothing can start or observe the node meanwhile, so it needs no tracking.
      try {
        if (drv.preadvSync(bs, offset, bytes, buf.length === bytes ? buf : buf.subarray(0, bytes))) return DONE;
      } catch (e) {
        return Promise.reject(e);
      }
    }
    bs.incInFlight();
    const req = trackBegin(bs, offset, bytes, false);
    if (!hasSerialisingConflict(bs, req)) {
      let p: Promise<void>;
      try {
        p = drv.preadv(bs, offset, bytes, buf.length === bytes ? buf : buf.subarray(0, bytes), flags, signal);
      } catch (e) {
        fastReadDone(bs, req);
        return Promise.reject(e);
      }
      return fastReadTail(bs, req, p);
    }
    // Something serialising overlaps: the general path waits for it.
    trackEnd(bs, req);
    bs.decInFlight();
  }
  return bdrvPreadvSlow(child, offset, bytes, buf, flags, signal);
}

/** The general read path: checks, alignment bounce, serialisation, copy-on-read, EOF and max_transfer. */
async function bdrvPreadvSlow(child: BdrvChild, offset: number, bytes: number, buf: Uint8Array, flags = 0, signal?: AbortSignal): Promise<void> {
  const bs = child.bs;
  checkNode(bs);
  checkRequest(offset, bytes);
  if (buf.length < bytes) throw new BlockError('EINVAL', `Buffer of ${buf.length} bytes is smaller than the request (${bytes})`);
  if (bytes === 0) return;
  throwIfAborted(signal);
  bs.incInFlight();
  if (bs.copyOnRead > 0) flags |= REQ.COPY_ON_READ;
  const align = bs.bl.requestAlignment;
  const start = alignDown(offset, align);
  const end = alignUp(offset + bytes, align);
  const req = trackBegin(bs, start, end - start, false);
  try {
    await waitSerialising(bs, req);
    if (start === offset && end === offset + bytes) {
      await alignedPreadv(bs, req, offset, bytes, align, buf, flags, signal);
    } else {
      const bounce = new Uint8Array(end - start);
      await alignedPreadv(bs, req, start, end - start, align, bounce, flags, signal);
      buf.set(bounce.subarray(offset - start, offset - start + bytes));
    }
  } finally {
    trackEnd(bs, req);
    bs.decInFlight();
  }
}

/** Reads into a fresh buffer. */
export async function bdrvPread(child: BdrvChild, offset: number, bytes: number, flags = 0): Promise<Uint8Array> {
  const buf = new Uint8Array(bytes);
  await bdrvPreadv(child, offset, bytes, buf, flags);
  return buf;
}

// ---------------------------------------------------------------------------
// Writes

function checkWritePerm(child: BdrvChild, offset: number, bytes: number, flags: number): void {
  const bs = child.bs;
  const need = flags & REQ.WRITE_UNCHANGED ? PERM.WRITE | PERM.WRITE_UNCHANGED : PERM.WRITE;
  if (bs.readOnly || !(child.perm & need)) {
    throw new BlockError('EPERM', undefined, { node: bs.nodeName });
  }
}

/** Runs the before-write hooks and the write threshold (QEMU's bdrv_co_write_req_prepare). */
async function writeReqPrepare(bs: BlockNode, offset: number, bytes: number, flags: number): Promise<void> {
  // Bumped here and again on completion: an emulated FUA flush inside the write
  // must not be skipped, and a flush racing the write must not count it as flushed.
  bs.writeGen++;
  for (const hook of bs.beforeWriteHooks) await hook(bs, offset, bytes, flags);
  if (bs.writeThreshold > 0 && offset + bytes > bs.writeThreshold && bs.onWriteThreshold) {
    const exceeded = offset + bytes - bs.writeThreshold;
    const cb = bs.onWriteThreshold;
    bs.writeThreshold = 0; // fires once, like QEMU's event
    cb(bs, exceeded);
  }
}

/** A read-only bitmap could not record the write, so QEMU refuses it (bdrv_aligned_pwritev, bdrv_co_pdiscard). */
function checkBitmapsWritable(bs: BlockNode): void {
  if (bs.dirtyBitmaps.length > 0 && bdrvHasReadonlyBitmaps(bs)) throw new BlockError('EPERM', undefined, { node: bs.nodeName });
}

/** A failed write may have changed part of the range: QEMU marks it dirty all the same. */
function writeFailed(bs: BlockNode, offset: number, bytes: number): void {
  if (bs.dirtyBitmaps.length > 0 && bytes > 0) bdrvSetDirty(bs, offset, bytes);
}

/**
 * Bookkeeping after a completed write, zero write or discard (QEMU's
 * bdrv_co_write_req_finish): the range is marked in the node's enabled
 * dirty bitmaps; discards do not move the highest written offset.
 */
function writeReqFinish(bs: BlockNode, offset: number, bytes: number, discard = false): void {
  bs.writeGen++;
  if (bs.dirtyBitmaps.length > 0 && bytes > 0) bdrvSetDirty(bs, offset, bytes);
  if (discard) return;
  const end = offset + bytes;
  if (end > bs.wrHighestOffset) bs.wrHighestOffset = end;
  if (end > bs.totalBytes && bs.drv.kind !== 'format') bs.totalBytes = sectorLength(end);
}

async function driverPwritev(bs: BlockNode, offset: number, bytes: number, buf: Uint8Array, flags: number, signal?: AbortSignal): Promise<void> {
  const drv = bs.drv;
  if (flags & REQ.WRITE_COMPRESSED) {
    if (!drv.pwritevCompressed) throw new BlockError('ENOTSUP', undefined, { node: bs.nodeName });
    return drv.pwritevCompressed(bs, offset, bytes, buf);
  }
  const emulateFua = (flags & REQ.FUA) !== 0 && (bs.supportedWriteFlags & REQ.FUA) === 0;
  const passFlags = flags & (bs.supportedWriteFlags | REQ.WRITE_UNCHANGED);
  if (drv.pwritev) await drv.pwritev(bs, offset, bytes, buf, passFlags, signal);
  else if (bs.filteredChild) await bdrvPwritev(bs.filteredChild, offset, bytes, buf, flags, signal);
  else throw new BlockError('ENOTSUP', `Driver '${drv.name}' cannot write`, { node: bs.nodeName });
  if (emulateFua) await bdrvFlush(bs);
}

/** Writes an aligned range (QEMU's bdrv_aligned_pwritev): hooks, detect-zeroes, split, FUA. */
async function alignedPwritev(bs: BlockNode, _req: TrackedRequest | null, offset: number, bytes: number, align: number, buf: Uint8Array, flags: number, signal?: AbortSignal): Promise<void> {
  checkBitmapsWritable(bs);
  try {
    await writeReqPrepare(bs, offset, bytes, flags);
    if (bs.detectZeroes !== 'off' && !(flags & (REQ.ZERO_WRITE | REQ.WRITE_COMPRESSED)) && isZeroBuffer(buf.subarray(0, bytes))) {
      flags |= REQ.ZERO_WRITE;
      if (bs.detectZeroes === 'unmap' && bs.openFlags & OPEN.UNMAP) flags |= REQ.MAY_UNMAP;
    }
    if (flags & REQ.ZERO_WRITE) {
      await bdrvDebugEvent(bs, 'pwritev_zero');
      await doPwriteZeroes(bs, offset, bytes, flags);
    } else if (flags & REQ.WRITE_COMPRESSED) {
      await driverPwritev(bs, offset, bytes, buf, flags, signal);
    } else {
      await bdrvDebugEvent(bs, 'pwritev');
      const maxTransfer = bs.bl.maxTransfer > 0 ? alignDown(bs.bl.maxTransfer, align) || align : bytes;
      let done = 0;
      while (done < bytes) {
        throwIfAborted(signal);
        const n = Math.min(bytes - done, maxTransfer);
        await driverPwritev(bs, offset + done, n, buf.subarray(done, done + n), flags, signal);
        done += n;
      }
    }
    await bdrvDebugEvent(bs, 'pwritev_done');
  } catch (e) {
    writeFailed(bs, offset, bytes);
    throw e;
  }
  writeReqFinish(bs, offset, bytes);
}

/**
 * Zeroes a range via the driver, falling back to writing a zero buffer when
 * the driver cannot (unless NO_FALLBACK). Splits at pwrite_zeroes alignment:
 * the unaligned head and tail are separate driver calls that may answer
 * ENOTSUP and are then written as buffers (QEMU's bdrv_co_do_pwrite_zeroes).
 */
async function doPwriteZeroes(bs: BlockNode, offset: number, bytes: number, flags: number): Promise<void> {
  const drv = bs.drv;
  const align = Math.max(bs.bl.pwriteZeroesAlignment || 1, bs.bl.requestAlignment);
  const maxWriteZeroes = bs.bl.maxPwriteZeroes > 0 ? alignDown(bs.bl.maxPwriteZeroes, align) || align : Number.MAX_SAFE_INTEGER;
  if (!(bs.supportedZeroFlags & REQ.MAY_UNMAP)) flags &= ~REQ.MAY_UNMAP;
  const headEnd = Math.min(offset + bytes, alignUp(offset, align));
  let pos = offset;
  const end = offset + bytes;
  while (pos < end) {
    let num: number;
    if (pos < headEnd && pos % align !== 0) num = headEnd - pos;
    else if (end - pos >= align) num = Math.min(alignDown(end - pos, align), maxWriteZeroes);
    else num = end - pos;
    // As in QEMU, the unaligned head and tail go to the driver too (each within one alignment unit):
    // a driver may still zero them cheaply (qcow2 when the rest of the subcluster reads as zero), or say ENOTSUP.
    let fallback = !drv.pwriteZeroes;
    if (!fallback) {
      try {
        const passFlags = flags & (bs.supportedZeroFlags | REQ.MAY_UNMAP | REQ.NO_FALLBACK | REQ.WRITE_UNCHANGED);
        await drv.pwriteZeroes!(bs, pos, num, passFlags);
        if (flags & REQ.FUA && !(bs.supportedZeroFlags & REQ.FUA)) await bdrvFlush(bs);
      } catch (e) {
        if (!isBlockError(e, 'ENOTSUP')) throw e;
        fallback = true;
      }
    }
    if (fallback) {
      if (flags & REQ.NO_FALLBACK) throw new BlockError('ENOTSUP', undefined, { node: bs.nodeName });
      let done = 0;
      const chunkMax = Math.min(MAX_ZERO_BOUNCE, bs.bl.maxTransfer > 0 ? bs.bl.maxTransfer : MAX_ZERO_BOUNCE);
      const zero = new Uint8Array(Math.min(num, chunkMax));
      while (done < num) {
        const n = Math.min(num - done, zero.length);
        await driverPwritev(bs, pos + done, n, zero.subarray(0, n), flags & ~(REQ.ZERO_WRITE | REQ.MAY_UNMAP | REQ.NO_FALLBACK), undefined);
        done += n;
      }
    }
    pos += num;
  }
}

/**
 * Writes `bytes` from `buf` at `offset` through the child (QEMU's
 * bdrv_co_pwritev_part). Unaligned edges are read, merged and written back
 * while a serialising tracked request keeps overlapping requests out.
 */
export async function bdrvPwritev(child: BdrvChild, offset: number, bytes: number, buf: Uint8Array | null, flags = 0, signal?: AbortSignal): Promise<void> {
  const bs = child.bs;
  checkNode(bs);
  checkRequest(offset, bytes);
  if (!(flags & REQ.ZERO_WRITE) && (!buf || buf.length < bytes)) {
    throw new BlockError('EINVAL', `Buffer is smaller than the request (${bytes})`);
  }
  checkWritePerm(child, offset, bytes, flags);
  if (bytes === 0) return;
  throwIfAborted(signal);
  bs.incInFlight();
  const align = bs.bl.requestAlignment;
  const start = alignDown(offset, align);
  const end = alignUp(offset + bytes, align);
  const req = trackBegin(bs, offset, bytes, true);
  try {
    const unaligned = start !== offset || end !== offset + bytes;
    if (unaligned) makeSerialising(req, align);
    await waitSerialising(bs, req);
    if (flags & REQ.ZERO_WRITE) {
      await zeroPwritev(bs, req, offset, bytes, align, flags);
    } else if (!unaligned) {
      await alignedPwritev(bs, req, offset, bytes, align, buf!, flags, signal);
    } else {
      if (flags & REQ.WRITE_COMPRESSED) {
        throw new BlockError('EINVAL', 'Compressed writes must be aligned to the request alignment', { node: bs.nodeName });
      }
      const bounce = new Uint8Array(end - start);
      // Head and tail come from storage; they may be the same aligned block.
      const headPadded = start !== offset;
      await bdrvDebugEvent(bs, headPadded ? 'pwritev_rmw_head' : 'pwritev_rmw_tail');
      await alignedPreadv(bs, null, start, align, align, bounce.subarray(0, align), 0, signal);
      await bdrvDebugEvent(bs, headPadded ? 'pwritev_rmw_after_head' : 'pwritev_rmw_after_tail');
      if (end - align > start) {
        const tailPadded = end !== offset + bytes;
        if (tailPadded) await bdrvDebugEvent(bs, 'pwritev_rmw_tail');
        await alignedPreadv(bs, null, end - align, align, align, bounce.subarray(end - align - start), 0, signal);
        if (tailPadded) await bdrvDebugEvent(bs, 'pwritev_rmw_after_tail');
      }
      bounce.set(buf!.subarray(0, bytes), offset - start);
      await alignedPwritev(bs, req, start, end - start, align, bounce, flags, signal);
    }
  } finally {
    trackEnd(bs, req);
    bs.decInFlight();
  }
}

/** Zero write with unaligned edges done as read-modify-write (QEMU's bdrv_co_do_zero_pwritev). */
async function zeroPwritev(bs: BlockNode, req: TrackedRequest, offset: number, bytes: number, align: number, flags: number): Promise<void> {
  const end = offset + bytes;
  let pos = offset;
  const rmw = async (blockStart: number, from: number, to: number): Promise<void> => {
    const block = new Uint8Array(align);
    const head = blockStart === alignDown(offset, align) && offset % align !== 0;
    await bdrvDebugEvent(bs, head ? 'pwritev_rmw_head' : 'pwritev_rmw_tail');
    await alignedPreadv(bs, null, blockStart, align, align, block, 0);
    await bdrvDebugEvent(bs, head ? 'pwritev_rmw_after_head' : 'pwritev_rmw_after_tail');
    block.fill(0, from - blockStart, to - blockStart);
    await alignedPwritev(bs, req, blockStart, align, align, block, flags & ~(REQ.ZERO_WRITE | REQ.MAY_UNMAP | REQ.NO_FALLBACK));
  };
  if (pos % align !== 0) {
    const bstart = alignDown(pos, align);
    const to = Math.min(end, bstart + align);
    await rmw(bstart, pos, to);
    pos = to;
  }
  const midEnd = alignDown(end, align);
  if (midEnd > pos) {
    checkBitmapsWritable(bs);
    try {
      await writeReqPrepare(bs, pos, midEnd - pos, flags);
      await bdrvDebugEvent(bs, 'pwritev_zero');
      await doPwriteZeroes(bs, pos, midEnd - pos, flags);
      await bdrvDebugEvent(bs, 'pwritev_done');
    } catch (e) {
      writeFailed(bs, pos, midEnd - pos);
      throw e;
    }
    writeReqFinish(bs, pos, midEnd - pos);
    pos = midEnd;
  }
  if (pos < end) await rmw(pos, pos, end);
}

/** Writes a buffer at offset (whole buffer). */
export function bdrvPwrite(child: BdrvChild, offset: number, buf: Uint8Array, flags = 0): Promise<void> {
  return bdrvPwritev(child, offset, buf.length, buf, flags);
}

/** Zeroes a range (QEMU's bdrv_co_pwrite_zeroes); MAY_UNMAP allows deallocation, NO_FALLBACK forbids buffer emulation. */
export function bdrvPwriteZeroes(child: BdrvChild, offset: number, bytes: number, flags = 0): Promise<void> {
  return bdrvPwritev(child, offset, bytes, null, flags | REQ.ZERO_WRITE);
}

/** Writes one compressed cluster-aligned range (QEMU's bdrv_pwrite_compressed path). */
export function bdrvPwriteCompressed(child: BdrvChild, offset: number, buf: Uint8Array): Promise<void> {
  return bdrvPwritev(child, offset, buf.length, buf, REQ.WRITE_COMPRESSED);
}

// ---------------------------------------------------------------------------
// Copy offloading

/**
 * Copies a range from one node to another without passing the data through
 * the caller (QEMU's bdrv_co_copy_range). ENOTSUP means the drivers cannot
 * offload this pair; callers then fall back to read + write.
 */
export async function bdrvCopyRange(src: BdrvChild, srcOffset: number, dst: BdrvChild, dstOffset: number, bytes: number, readFlags = 0, writeFlags = 0): Promise<void> {
  checkNode(src.bs);
  checkNode(dst.bs);
  checkRequest(srcOffset, bytes);
  checkRequest(dstOffset, bytes);
  checkWritePerm(dst, dstOffset, bytes, writeFlags);
  if (bytes === 0) return;
  const s = src.bs;
  if (!s.drv.copyRangeFrom) {
    if (s.filteredChild) return bdrvCopyRange(s.filteredChild, srcOffset, dst, dstOffset, bytes, readFlags, writeFlags);
    throw new BlockError('ENOTSUP', undefined, { node: s.nodeName });
  }
  s.incInFlight();
  const rreq = trackBegin(s, srcOffset, bytes, false);
  try {
    await waitSerialising(s, rreq);
    await s.drv.copyRangeFrom(s, src, srcOffset, dst, dstOffset, bytes, readFlags, writeFlags);
  } finally {
    trackEnd(s, rreq);
    s.decInFlight();
  }
}

/** The destination half of a copy (QEMU's bdrv_co_copy_range_to): a source driver calls it to hand the copy to `dst`'s driver. */
export async function bdrvCopyRangeTo(src: BdrvChild, srcOffset: number, dst: BdrvChild, dstOffset: number, bytes: number, readFlags = 0, writeFlags = 0): Promise<void> {
  const d = dst.bs;
  checkNode(d);
  checkRequest(dstOffset, bytes);
  checkWritePerm(dst, dstOffset, bytes, writeFlags);
  if (!d.drv.copyRangeTo) {
    if (d.filteredChild) return bdrvCopyRangeTo(src, srcOffset, d.filteredChild, dstOffset, bytes, readFlags, writeFlags);
    throw new BlockError('ENOTSUP', undefined, { node: d.nodeName });
  }
  d.incInFlight();
  const wreq = trackBegin(d, dstOffset, bytes, true);
  try {
    await waitSerialising(d, wreq);
    await writeReqPrepare(d, dstOffset, bytes, writeFlags);
    await d.drv.copyRangeTo(d, src, srcOffset, dst, dstOffset, bytes, readFlags, writeFlags);
    writeReqFinish(d, dstOffset, bytes);
  } finally {
    trackEnd(d, wreq);
    d.decInFlight();
  }
}

// ---------------------------------------------------------------------------
// Discard

/**
 * Discards a range (QEMU's bdrv_co_pdiscard): ignored unless the node was opened
 * with discard=unmap; only whole aligned fragments reach the driver; ENOTSUP
 * from the driver is not an error because discard is advisory.
 */
export async function bdrvPdiscard(child: BdrvChild, offset: number, bytes: number): Promise<void> {
  const bs = child.bs;
  checkNode(bs);
  checkRequest(offset, bytes);
  if (bs.readOnly || !(child.perm & PERM.WRITE)) throw new BlockError('EPERM', undefined, { node: bs.nodeName });
  checkBitmapsWritable(bs);
  if (bytes === 0) return;
  if (!(bs.openFlags & OPEN.UNMAP)) return;
  const drv = bs.drv;
  if (!drv.pdiscard && !bs.filteredChild) return;
  bs.incInFlight();
  const req = trackBegin(bs, offset, bytes, true);
  try {
    await waitSerialising(bs, req);
    await writeReqPrepare(bs, offset, bytes, 0);
    const ra = bs.bl.requestAlignment;
    const align = Math.max(bs.bl.pdiscardAlignment || 1, ra);
    const maxDiscard = bs.bl.maxPdiscard > 0 ? alignDown(bs.bl.maxPdiscard, align) || align : Number.MAX_SAFE_INTEGER;
    let pos = offset;
    const end = offset + bytes;
    while (pos < end) {
      let num = end - pos;
      const head = pos % align;
      if (head) {
        num = Math.min(num, align - head);
        if (num % ra) num = num - (num % ra) || num;
      } else if (num >= align) {
        num = Math.min(alignDown(num, align), maxDiscard);
      }
      const frag = pos % ra === 0 && num % ra === 0;
      if (frag) {
        try {
          if (drv.pdiscard) await drv.pdiscard(bs, pos, num);
          else await bdrvPdiscard(bs.filteredChild!, pos, num);
        } catch (e) {
          if (!isBlockError(e, 'ENOTSUP')) throw e;
        }
      }
      pos += num;
    }
    writeReqFinish(bs, offset, bytes, true);
  } finally {
    trackEnd(bs, req);
    bs.decInFlight();
  }
}

// ---------------------------------------------------------------------------
// Flush

/**
 * Makes everything written to `bs` and below durable (QEMU's bdrv_co_flush).
 * Does no I/O when nothing was written since the last successful flush;
 * concurrent flushes share one.
 */
export async function bdrvFlush(bs: BlockNode): Promise<void> {
  checkNode(bs);
  bs.incInFlight();
  try {
    while (bs.activeFlush) await bs.activeFlush.catch(() => undefined);
    const gen = bs.writeGen;
    if (bs.flushedGen === gen) return;
    const p = doFlush(bs);
    bs.activeFlush = p;
    try {
      await p;
      bs.flushedGen = Math.max(bs.flushedGen, gen);
    } finally {
      bs.activeFlush = null;
    }
  } finally {
    bs.decInFlight();
  }
}

async function doFlush(bs: BlockNode): Promise<void> {
  const drv = bs.drv;
  // QEMU announces flushes on the primary child, where a blkdebug node below a format listens.
  const primary = bs.primaryChild?.bs;
  await bdrvDebugEvent(primary, 'flush_to_os');
  if (drv.flushToOs) await drv.flushToOs(bs);
  if (!(bs.openFlags & OPEN.NO_FLUSH)) {
    await bdrvDebugEvent(primary, 'flush_to_disk');
    if (drv.flushToDisk) await drv.flushToDisk(bs);
  }
  let first: unknown;
  for (const c of bs.children) {
    if (c.perm & (PERM.WRITE | PERM.WRITE_UNCHANGED)) {
      try { await bdrvFlush(c.bs); } catch (e) { first ??= e; }
    }
  }
  if (first !== undefined) throw first;
}

// ---------------------------------------------------------------------------
// Truncate

/** Resizes the node (QEMU's bdrv_co_truncate) and tells its parents. */
export async function bdrvTruncate(child: BdrvChild, offset: number, exact: boolean, prealloc: PreallocMode = 'off', flags = 0): Promise<void> {
  const bs = child.bs;
  checkNode(bs);
  if (!Number.isInteger(offset)) throw new BlockError('EINVAL', 'Image size must be an integer');
  if (offset < 0) throw new BlockError('EINVAL', 'Image size cannot be negative', { node: bs.nodeName });
  if (offset > BDRV_MAX_LENGTH) throw new BlockError('EFBIG', `Required too big image size, it must be not greater than ${BDRV_MAX_LENGTH}`, { node: bs.nodeName });
  if (bs.readOnly) throw new BlockError('EACCES', 'Image is read-only', { node: bs.nodeName });
  if (!(child.perm & PERM.RESIZE)) throw new BlockError('EPERM', 'Resize permission not granted', { node: bs.nodeName });
  bs.incInFlight();
  const old = bs.totalBytes;
  const req = trackBegin(bs, Math.min(old, offset), BDRV_MAX_LENGTH - Math.min(old, offset), true);
  makeSerialising(req, 1);
  try {
    await waitSerialising(bs, req);
    if (bs.drv.truncate) {
      await bs.drv.truncate(bs, offset, exact, prealloc, flags);
    } else if (bs.filteredChild) {
      await bdrvTruncate(bs.filteredChild, offset, exact, prealloc, flags);
    } else {
      throw new BlockError('ENOTSUP', 'Image format driver does not support resize', { node: bs.nodeName });
    }
    await refreshTotalBytes(bs);
    if (bs.dirtyBitmaps.length > 0) bdrvDirtyBitmapTruncate(bs, bs.totalBytes);
    bs.writeGen++;
    if (bs.wrHighestOffset > bs.totalBytes) bs.wrHighestOffset = bs.totalBytes;
    for (const p of bs.parents) p.parent.resized?.();
  } finally {
    trackEnd(bs, req);
    bs.decInFlight();
  }
}

// ---------------------------------------------------------------------------
// Block status

/**
 * Status of the range starting at `offset` on `bs` alone (QEMU's
 * bdrv_co_block_status): one extent, recursing into the protocol layer for
 * RAW answers and, with wantZero, refining DATA with the file's zero ranges.
 */
export async function bdrvBlockStatus(bs: BlockNode, wantZero: boolean, offset: number, bytes: number): Promise<BlockStatus> {
  checkNode(bs);
  const total = await bdrvGetLength(bs);
  if (offset >= total) return { status: BLOCK.EOF, pnum: 0 };
  if (bytes === 0) return { status: 0, pnum: 0 };
  bytes = Math.min(bytes, total - offset);
  const drv = bs.drv;
  let st: BlockStatus;
  if (!drv.blockStatus) {
    if (bs.filteredChild) {
      st = { status: BLOCK.RAW | BLOCK.OFFSET_VALID, pnum: bytes, map: offset, file: bs.filteredChild.bs };
    } else {
      st = { status: BLOCK.DATA | BLOCK.ALLOCATED, pnum: bytes };
      if (drv.kind === 'protocol') {
        st.status |= BLOCK.OFFSET_VALID;
        st.map = offset;
        st.file = bs;
      }
    }
  } else {
    const align = bs.bl.requestAlignment;
    const aOff = alignDown(offset, align);
    const aBytes = alignUp(offset + bytes, align) - aOff;
    bs.incInFlight();
    try {
      st = await drv.blockStatus(bs, wantZero, aOff, aBytes);
    } finally {
      bs.decInFlight();
    }
    if (!(st.pnum > 0)) throw new BlockError('EIO', `Driver '${drv.name}' returned an empty block status extent`, { node: bs.nodeName });
    const skew = offset - aOff;
    st.pnum = Math.min(st.pnum - skew, bytes);
    if (st.pnum <= 0) throw new BlockError('EIO', `Driver '${drv.name}' returned a block status extent shorter than the alignment`, { node: bs.nodeName });
    if (st.status & BLOCK.OFFSET_VALID && st.map !== undefined) st.map += skew;
  }
  if (st.status & BLOCK.RAW) {
    if (!(st.status & BLOCK.OFFSET_VALID) || !st.file || st.map === undefined) {
      throw new BlockError('EIO', `Driver '${drv.name}' returned RAW block status without an offset`, { node: bs.nodeName });
    }
    const inner = await bdrvBlockStatus(st.file, wantZero, st.map, st.pnum);
    if (inner.pnum === 0) {
      // The file ends before the mapped range: reads there return zeroes.
      inner.status = BLOCK.ZERO | BLOCK.ALLOCATED | (inner.status & BLOCK.EOF);
      inner.pnum = st.pnum;
    }
    if (offset + inner.pnum === total) inner.status |= BLOCK.EOF;
    else inner.status &= ~BLOCK.EOF;
    return inner;
  }
  if (st.status & (BLOCK.DATA | BLOCK.ZERO)) {
    st.status |= BLOCK.ALLOCATED;
  } else if (drv.supportsBacking) {
    const cow = bs.backing?.bs;
    if (!cow) st.status |= BLOCK.ZERO;
    else if (wantZero) {
      const size2 = await bdrvGetLength(cow);
      if (offset >= size2) st.status |= BLOCK.ZERO;
    }
  }
  if (wantZero && st.status & BLOCK.RECURSE && st.file && st.file !== bs && st.status & BLOCK.DATA && !(st.status & BLOCK.ZERO) && st.status & BLOCK.OFFSET_VALID && st.map !== undefined) {
    try {
      const f = await bdrvBlockStatus(st.file, wantZero, st.map, st.pnum);
      if (f.status & BLOCK.EOF && (f.pnum === 0 || f.status & BLOCK.ZERO)) {
        st.status |= BLOCK.ZERO;
      } else {
        st.pnum = f.pnum;
        st.status |= f.status & BLOCK.ZERO;
      }
    } catch {
      // Extra information only; the format's answer stands.
    }
  }
  st.status &= ~BLOCK.RECURSE;
  if (offset + st.pnum === total) st.status |= BLOCK.EOF;
  else st.status &= ~BLOCK.EOF;
  return st;
}

/** The node below `bs` that supplies unallocated data: its backing (COW) or filtered child (QEMU's bdrv_filter_or_cow_bs). */
export function filterOrCowBs(bs: BlockNode): BlockNode | null {
  if (bs.drv.kind === 'filter') return bs.filteredChild?.bs ?? null;
  if (bs.drv.supportsBacking) return bs.backing?.bs ?? null;
  return null;
}

/** Status through the backing chain down to `base` (QEMU's bdrv_co_common_block_status_above); depth counts the layers visited. */
export async function bdrvBlockStatusAbove(bs: BlockNode, base: BlockNode | null, includeBase: boolean, wantZero: boolean, offset: number, bytes: number): Promise<BlockStatus & { depth: number }> {
  if (!includeBase && bs === base) return { status: 0, pnum: bytes, depth: 0 };
  let depth = 1;
  let st = await bdrvBlockStatus(bs, wantZero, offset, bytes);
  if (st.pnum === 0 || st.status & BLOCK.ALLOCATED || bs === base) return { ...st, depth };
  const eof = st.status & BLOCK.EOF ? offset + st.pnum : -1;
  bytes = st.pnum;
  for (let p = filterOrCowBs(bs); p && (includeBase || p !== base); p = filterOrCowBs(p)) {
    st = await bdrvBlockStatus(p, wantZero, offset, bytes);
    depth++;
    if (st.pnum === 0) {
      // The layer is shorter than the one above: its zeroes past EOF count as allocated here.
      st = { status: BLOCK.ZERO | BLOCK.ALLOCATED, pnum: bytes, file: p };
      break;
    }
    if (st.status & BLOCK.ALLOCATED) {
      st.status &= ~BLOCK.EOF;
      break;
    }
    if (p === base) break;
    bytes = st.pnum;
  }
  if (offset + st.pnum === eof) st.status |= BLOCK.EOF;
  return { ...st, depth };
}

/** Whether [offset, offset+bytes) is allocated in `bs` itself, and for how many bytes the answer holds (QEMU's bdrv_is_allocated). */
export async function bdrvIsAllocated(bs: BlockNode, offset: number, bytes: number): Promise<{ allocated: boolean; pnum: number }> {
  const st = await bdrvBlockStatusAbove(bs, bs, true, false, offset, bytes);
  return { allocated: (st.status & BLOCK.ALLOCATED) !== 0, pnum: st.pnum };
}

/**
 * Whether the range is allocated anywhere from `top` down to `base` (QEMU's
 * bdrv_is_allocated_above): depth is 0 when unallocated, else the layer
 * (1 = top) that has it.
 */
export async function bdrvIsAllocatedAbove(top: BlockNode, base: BlockNode | null, includeBase: boolean, offset: number, bytes: number): Promise<{ depth: number; pnum: number }> {
  const st = await bdrvBlockStatusAbove(top, base, includeBase, false, offset, bytes);
  return { depth: st.status & BLOCK.ALLOCATED ? st.depth : 0, pnum: st.pnum };
}

// ---------------------------------------------------------------------------
// Drain

/**
 * Begins a drained section on `bs` (QEMU's bdrv_drained_begin): its parents
 * stop issuing requests, and this resolves once nothing is in flight on the
 * node or above it.
 */
export async function bdrvDrainedBegin(bs: BlockNode): Promise<void> {
  drainedBeginQuiesce(bs);
  await drainPoll(bs);
}

function drainedBeginQuiesce(bs: BlockNode): void {
  if (bs.quiesceCounter++ === 0) {
    for (const p of bs.parents) {
      if (p.parent.kind === 'node' && p.parent.node) drainedBeginQuiesce(p.parent.node);
      else p.parent.drainedBegin?.();
    }
    bs.drv.drainBegin?.(bs);
  }
}

async function drainPoll(bs: BlockNode): Promise<void> {
  for (let guard = 0; guard < 1_000_000; guard++) {
    const busy = findBusy(bs, new Set());
    if (!busy) return;
    await busy.waitIdle();
  }
}

function findBusy(bs: BlockNode, seen: Set<BlockNode>): BlockNode | null {
  if (seen.has(bs)) return null;
  seen.add(bs);
  if (bs.inFlight > 0) return bs;
  for (const p of bs.parents) {
    if (p.parent.kind === 'node' && p.parent.node) {
      const b = findBusy(p.parent.node, seen);
      if (b) return b;
    }
  }
  return null;
}

/** Ends a drained section begun with bdrvDrainedBegin. */
export function bdrvDrainedEnd(bs: BlockNode): void {
  if (bs.quiesceCounter <= 0) throw new BlockError('EINVAL', 'drained_end without drained_begin', { node: bs.nodeName });
  if (--bs.quiesceCounter === 0) {
    bs.drv.drainEnd?.(bs);
    for (const p of bs.parents) {
      if (p.parent.kind === 'node' && p.parent.node) bdrvDrainedEnd(p.parent.node);
      else p.parent.drainedEnd?.();
    }
  }
}

/** Waits until `bs` and its parents are idle, without keeping them quiesced (QEMU's bdrv_drain). */
export async function bdrvDrain(bs: BlockNode): Promise<void> {
  await bdrvDrainedBegin(bs);
  bdrvDrainedEnd(bs);
}
