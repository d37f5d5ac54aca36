/**
 * The `file` protocol for Node (QEMU's block/file-posix.c for regular files)
 * on fs.promises FileHandles. Requests go straight to the handle with no
 * lock of our own, so reads and writes run concurrently in libuv's pool the
 * way QEMU's thread-pool AIO does; the generic request path already orders
 * the requests that must not overlap.
 *
 * The length is cached as QEMU caches it for regular files (bdrv_file has
 * no variable length): read at open and after truncate, grown by writes.
 *
 * What Node cannot do is emulated the way file-posix falls back when the
 * file system cannot: there is no fallocate, so zero writes past EOF extend
 * the file sparsely and everything else returns ENOTSUP for the generic
 * zero-buffer fallback; there is no hole punching, so discard is ENOTSUP
 * (advisory anyway); there is no SEEK_DATA, so block status reports DATA for
 * the whole file, which is what file-posix answers when it cannot tell.
 */
import { constants as fsConstants, promises as fsp, readSync, writeSync } from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
import type { BlockDriver, CreateContext, ReopenState } from '../core/driver.ts';
import { BlockError, ERRNO, STRERROR, throwIfAborted, type ErrnoCode } from '../core/errors.ts';
import type { BlockNode } from '../core/node.ts';
import type { CreateOptions } from '../core/options.ts';
import { BLOCK, OPEN, REQ, type BlockStatus, type PreallocMode } from '../core/types.ts';
import { enumOption, sizeOption, stringOption } from './driver-opts.ts';
import { checkProtocolPrealloc, newProtocolStats, type ProtocolStats } from './memory.ts';

/** Chunk used to write zeroes (preallocation and the zero-write fallback use the same size as file-posix). */
const ZERO_CHUNK = 64 * 1024;

/**
 * An open handle shared by the requests using it. Reopen swaps handles while
 * requests may still be running on the old one, so the old handle is closed
 * only once its last user is done.
 */
class HandleRef {
  users = 0;
  retired = false;
  private closed: Promise<void> | null = null;

  constructor(readonly fh: FileHandle, readonly writable: boolean) {}

  /** Takes a use; pair with release(). */
  acquire(): FileHandle {
    this.users++;
    return this.fh;
  }

  /** Drops a use and closes the handle if it was retired meanwhile. */
  release(): void {
    if (--this.users === 0 && this.retired) void this.close();
  }

  /** Marks the handle unused from now on; it closes when the last user releases it. */
  retire(): void {
    this.retired = true;
    if (this.users === 0) void this.close();
  }

  /** Closes the handle once (errors are ignored: nothing useful can be done with them here). */
  close(): Promise<void> {
    this.closed ??= this.fh.close().catch(() => undefined);
    return this.closed;
  }
}

/** Driver state of a file node. */
export interface FileNodeState {
  path: string;
  handle: HandleRef;
  /** Errno of a failed datasync: file-posix fails every later flush too, since the page cache may have dropped the data. */
  pageCacheInconsistent: ErrnoCode | null;
  stats: ProtocolStats;
}

function state(bs: BlockNode): FileNodeState {
  return bs.state<FileNodeState>();
}

/** The POSIX code of a Node fs error, if it has one we know. */
function fsCode(e: unknown): ErrnoCode | undefined {
  const code = (e as { code?: unknown } | null)?.code;
  return typeof code === 'string' && code in ERRNO ? (code as ErrnoCode) : undefined;
}

/** glibc's strerror() for fs errors outside the engine's errno table (reported with code EIO). */
const EXTRA_STRERROR: Record<string, string> = {
  ELOOP: 'Too many levels of symbolic links',
  ENAMETOOLONG: 'File name too long',
  EMFILE: 'Too many open files',
  ENFILE: 'Too many open files in system',
  ENXIO: 'No such device or address',
  ETXTBSY: 'Text file busy',
  EOVERFLOW: 'Value too large for defined data type',
  EDQUOT: 'Disk quota exceeded',
};

/** strerror() text for a Node fs error, falling back to its own message for codes we do not know. */
function fsReason(e: unknown): string {
  const code = fsCode(e);
  if (code) return STRERROR[code];
  const raw = (e as { code?: unknown } | null)?.code;
  if (typeof raw === 'string' && raw in EXTRA_STRERROR) return EXTRA_STRERROR[raw]!;
  const msg = (e as { message?: unknown } | null)?.message;
  return typeof msg === 'string' ? msg : String(e);
}

/** A BlockError in QEMU's error_setg_errno shape: "what: strerror". */
function fsError(e: unknown, what: string, fallback: ErrnoCode = 'EIO', node?: string): BlockError {
  if (e instanceof BlockError) return e;
  const code = fsCode(e) ?? fallback;
  return new BlockError(code, `${what}: ${fsReason(e)}`, { cause: e, ...(node !== undefined ? { node } : {}) });
}

/** A BlockError for a failed request: just the code and strerror, as QEMU returns -errno from I/O. */
function ioError(e: unknown, node: string): BlockError {
  if (e instanceof BlockError) return e;
  const code = fsCode(e) ?? 'EIO';
  return new BlockError(code, STRERROR[code], { cause: e, node });
}

/** The error file-posix reports when open(2) of `path` fails with `e`: "Could not open 'PATH': strerror", EROFS as EACCES. */
export function openError(path: string, e: unknown): BlockError {
  const err = fsError(e, `Could not open '${path}'`);
  return err.code === 'EROFS' ? new BlockError('EACCES', err.message, { cause: e }) : err;
}

/** Opens `path` read-only or read-write. */
async function openHandle(path: string, writable: boolean): Promise<HandleRef> {
  try {
    return new HandleRef(await fsp.open(path, writable ? fsConstants.O_RDWR : fsConstants.O_RDONLY), writable);
  } catch (e) {
    throw openError(path, e);
  }
}

/** Strips the optional `file:` prefix (QEMU's bdrv_parse_filename_strip_prefix). */
function stripPrefix(filename: string): string {
  return filename.startsWith('file:') ? filename.slice('file:'.length) : filename;
}

/** Writes zeroes to [from, to) in ZERO_CHUNK pieces. */
async function writeZeroes(fh: FileHandle, from: number, to: number): Promise<void> {
  const zero = new Uint8Array(Math.min(ZERO_CHUNK, Math.max(0, to - from)));
  let pos = from;
  while (pos < to) {
    const n = Math.min(to - pos, zero.length);
    const { bytesWritten } = await fh.write(zero, 0, n, pos);
    pos += bytesWritten;
  }
}

/**
 * file-posix's allocate_first_block: a file grown from empty without
 * preallocation gets its first block written with zeroes (4096 bytes, or one
 * 512-byte sector when it is smaller than that, which then extends it), so
 * O_DIRECT alignment probing finds allocated data there. `qemu-img info`
 * therefore shows "disk size: 4 KiB" for a fresh raw image. Failures are
 * ignored, as QEMU ignores them.
 */
async function allocateFirstBlock(fh: FileHandle, size: number): Promise<void> {
  const n = size < 4096 ? 512 : 4096;
  try {
    await fh.write(new Uint8Array(n), 0, n, 0);
  } catch {
    // Only an optimisation for alignment probing in QEMU; the truncate itself succeeded.
  }
}

/**
 * file-posix's handle_aiocb_truncate for a regular file: resize to exactly
 * `offset`, filling new space per `prealloc`; on a failed preallocation the
 * old length is restored.
 */
async function regularTruncate(fh: FileHandle, offset: number, prealloc: PreallocMode): Promise<void> {
  let current: number;
  try {
    current = (await fh.stat()).size;
  } catch (e) {
    throw fsError(e, 'Could not stat file');
  }
  checkProtocolPrealloc(current, offset, prealloc);
  if (prealloc === 'off') {
    try {
      await fh.truncate(offset);
    } catch (e) {
      throw fsError(e, 'Could not resize file');
    }
    if (current === 0 && offset > 0) await allocateFirstBlock(fh, offset);
    return;
  }
  if (offset === current) return;
  try {
    // Setting the final size first lets the file system plan the allocation, as file-posix does.
    try {
      await fh.truncate(offset);
    } catch (e) {
      throw fsError(e, 'Could not resize file');
    }
    // Node has no posix_fallocate: falloc allocates by writing zeroes too, only without the fsync of 'full'.
    try {
      await writeZeroes(fh, current, offset);
    } catch (e) {
      throw fsError(e, prealloc === 'full' ? 'Could not write zeros for preallocation' : 'Could not preallocate new data');
    }
    if (prealloc === 'full') {
      try {
        await fh.sync();
      } catch (e) {
        throw fsError(e, 'Could not flush file to disk');
      }
    }
  } catch (e) {
    await fh.truncate(current).catch(() => undefined);
    throw e;
  }
}

const PREALLOC_CHOICES: readonly PreallocMode[] = ['off', 'metadata', 'falloc', 'full'];
const LOCKING_CHOICES = ['auto', 'on', 'off'] as const;
const AIO_CHOICES = ['threads', 'native', 'io_uring'] as const;

/** Runs `fn` with the node's current handle held, so a reopen cannot close it underneath. */
let syncIo = false;

/**
 * Makes the file driver read and write with synchronous system calls (pread
 * and pwrite on the calling thread) instead of Node's thread pool. A cached
 * 4 KiB read then costs about 2 µs instead of 20-30 µs of hand-off (requests
 * above SYNC_IO_MAX stay asynchronous), but the event loop waits for the disk, so only a process that does nothing else
 * meanwhile should ask for it: the command-line tools do (bin/run.mjs). The
 * bytes and errors are the same either way.
 */
export function setFileSyncIo(on: boolean): void {
  syncIo = on;
  // The synchronous read hook exists only in this mode, so formats above an asynchronous file
  // see at once that only preadv can serve them (and map nothing twice).
  fileDriver.preadvSync = on ? readNow : undefined;
}

/** Requests up to this size go synchronous under setFileSyncIo; larger ones keep the thread pool, where the hand-off is noise and reads and writes of parallel requests overlap. */
const SYNC_IO_MAX = 256 * 1024;

/** The synchronous read (the driver's preadvSync under setFileSyncIo): false, having done nothing, when not in that mode or above SYNC_IO_MAX. */
function readNow(bs: BlockNode, offset: number, bytes: number, buf: Uint8Array): boolean {
  if (!syncIo || bytes > SYNC_IO_MAX) return false;
  const st = state(bs);
  st.stats.reads++;
  st.stats.bytesRead += bytes;
  const ref = st.handle;
  const fh = ref.acquire();
  let done = 0;
  try {
    while (done < bytes) {
      const n = readSync(fh.fd, buf, done, bytes - done, offset + done);
      if (n === 0) break;
      done += n;
    }
  } catch (e) {
    throw ioError(e, bs.nodeName);
  } finally {
    ref.release();
  }
  // A short read means EOF: the rest reads as zeroes (file-posix's handle_aiocb_rw).
  if (done < bytes) buf.fill(0, done, bytes);
  return true;
}

async function withHandle<T>(bs: BlockNode, fn: (fh: FileHandle) => Promise<T>): Promise<T> {
  const ref = state(bs).handle;
  const fh = ref.acquire();
  try {
    return await fn(fh);
  } finally {
    ref.release();
  }
}

/** The Node `file` protocol driver. */
export const fileDriver: BlockDriver = {
  name: 'file',
  kind: 'protocol',
  protocolNames: ['file'],
  // Like QEMU's bdrv_file (only host_cdrom has a variable length): the length is read at open and after
  // truncate, and grows with our own writes. Asking the OS on every request would cost a stat per read.
  hasVariableLength: false,
  runtimeOptions: [
    { name: 'filename', type: 'string', help: 'File name of the image' },
    { name: 'aio', type: 'string', help: 'host AIO implementation (threads, native, io_uring)' },
    { name: 'aio-max-batch', type: 'number', help: 'AIO max batch size (0 = auto handled by AIO backend, default: 0)' },
    { name: 'locking', type: 'string', help: 'file locking mode (on/off/auto, default: auto)' },
    { name: 'drop-cache', type: 'bool', help: 'invalidate page cache during live migration (default: on)' },
    { name: 'x-check-cache-dropped', type: 'bool', help: 'check that page cache was dropped on live migration (default: off)' },
  ],
  createOptions: [
    { name: 'size', type: 'size', help: 'Virtual disk size' },
    { name: 'nocow', type: 'bool', help: 'Turn off copy-on-write (valid only on btrfs)' },
    { name: 'preallocation', type: 'string', help: 'Preallocation mode (allowed values: off, falloc, full)' },
    { name: 'extent_size_hint', type: 'size', help: 'Extent size hint for the image file, 0 to disable' },
  ],

  parseFilename(filename, options) {
    options.filename = stripPrefix(filename);
  },

  async open(bs, options, flags) {
    const filename = stringOption(options, 'filename');
    if (filename === undefined) throw new BlockError('EINVAL', "Parameter 'filename' is missing");
    const path = stripPrefix(filename);
    // Validated for QEMU compatibility; Node offers neither OFD locks nor a choice of AIO engine.
    enumOption(options, 'locking', LOCKING_CHOICES, 'auto');
    enumOption(options, 'aio', AIO_CHOICES, 'threads');

    let writable = (flags & OPEN.RDWR) !== 0;
    let handle: HandleRef;
    try {
      handle = await openHandle(path, writable);
    } catch (e) {
      // auto-read-only: fall back to read-only when the file cannot be written (QEMU's bdrv_apply_auto_read_only).
      const code = (e as BlockError).code;
      if (!(writable && flags & OPEN.AUTO_RDONLY && (code === 'EACCES' || code === 'EPERM'))) throw e;
      handle = await openHandle(path, false);
      writable = false;
      bs.readOnly = true;
      bs.openFlags &= ~OPEN.RDWR;
    }
    try {
      const st = await handle.fh.stat();
      if (!st.isFile()) {
        throw new BlockError('EINVAL', `'file' driver requires '${path}' to be a regular file`);
      }
    } catch (e) {
      await handle.close();
      throw e instanceof BlockError ? e : fsError(e, 'Could not stat file');
    }
    const st: FileNodeState = { path, handle, pageCacheInconsistent: null, stats: newProtocolStats() };
    bs.opaque = st;
    bs.filename = path;
    bs.supportedZeroFlags = REQ.MAY_UNMAP | REQ.NO_FALLBACK;
    // Growing a regular file yields zeroes.
    bs.supportedTruncateFlags = REQ.ZERO_WRITE;
  },

  async close(bs) {
    const st = state(bs);
    st.handle.retire();
    await st.handle.close();
  },

  refreshLimits(bs) {
    // Buffered I/O: any byte range works (file-posix without O_DIRECT).
    bs.bl.requestAlignment = 1;
  },

  async preadv(bs, offset, bytes, buf, _flags, signal) {
    throwIfAborted(signal);
    if (readNow(bs, offset, bytes, buf)) return;
    const st = state(bs);
    st.stats.reads++;
    st.stats.bytesRead += bytes;
    await withHandle(bs, async (fh) => {
      let done = 0;
      try {
        while (done < bytes) {
          const bytesRead = (await fh.read(buf, done, bytes - done, offset + done)).bytesRead;
          if (bytesRead === 0) break;
          done += bytesRead;
        }
      } catch (e) {
        throw ioError(e, bs.nodeName);
      }
      // A short read means EOF: the rest reads as zeroes (file-posix's handle_aiocb_rw).
      if (done < bytes) buf.fill(0, done, bytes);
    });
  },

  async pwritev(bs, offset, bytes, buf, _flags, signal) {
    throwIfAborted(signal);
    const st = state(bs);
    st.stats.writes++;
    st.stats.bytesWritten += bytes;
    await withHandle(bs, async (fh) => {
      let done = 0;
      try {
        while (done < bytes) {
          const bytesWritten = syncIo && bytes <= SYNC_IO_MAX ? writeSync(fh.fd, buf, done, bytes - done, offset + done) : (await fh.write(buf, done, bytes - done, offset + done)).bytesWritten;
          if (bytesWritten === 0) throw new BlockError('EIO', undefined, { node: bs.nodeName });
          done += bytesWritten;
        }
      } catch (e) {
        throw ioError(e, bs.nodeName);
      }
    });
  },

  async pwriteZeroes(bs, offset, bytes) {
    // Past EOF a sparse extension reads as zero, which is file-posix's last-resort
    // fallocate path. Writing only the last byte extends the file without the
    // risk a truncate would carry of cutting off a concurrent write further out.
    // Inside the file Node cannot zero without a buffer, so the generic path writes one.
    const st = state(bs);
    await withHandle(bs, async (fh) => {
      let len: number;
      try {
        len = (await fh.stat()).size;
      } catch (e) {
        throw ioError(e, bs.nodeName);
      }
      if (offset < len) throw new BlockError('ENOTSUP', undefined, { node: bs.nodeName });
      try {
        await fh.write(new Uint8Array(1), 0, 1, offset + bytes - 1);
      } catch (e) {
        throw ioError(e, bs.nodeName);
      }
    });
    st.stats.zeroWrites++;
  },

  async pdiscard(bs) {
    // No hole punching in Node; discard is advisory, so the generic layer ignores this.
    throw new BlockError('ENOTSUP', undefined, { node: bs.nodeName });
  },

  async blockStatus(bs, _wantZero, offset, bytes): Promise<BlockStatus> {
    // Node has no SEEK_DATA, so everything inside the file is data. Past the file's real end (the
    // rest of its last sector, which QEMU counts in whole sectors) file-posix's SEEK_DATA fails with
    // ENXIO and it reports a trailing hole that reads as zero, as `qemu-img map` shows.
    if (offset + bytes > bs.totalBytes - 512) {
      const len = await withHandle(bs, async (fh) => {
        try {
          return (await fh.stat()).size;
        } catch (e) {
          throw ioError(e, bs.nodeName);
        }
      });
      if (offset >= len) return { status: BLOCK.ZERO | BLOCK.OFFSET_VALID, pnum: bytes, map: offset, file: bs };
      bytes = Math.min(bytes, len - offset);
    }
    return { status: BLOCK.DATA | BLOCK.OFFSET_VALID, pnum: bytes, map: offset, file: bs };
  },

  async flushToDisk(bs) {
    const st = state(bs);
    if (st.pageCacheInconsistent) throw new BlockError(st.pageCacheInconsistent, undefined, { node: bs.nodeName });
    st.stats.flushes++;
    await withHandle(bs, async (fh) => {
      try {
        await fh.datasync();
      } catch (e) {
        const err = ioError(e, bs.nodeName);
        st.pageCacheInconsistent = err.code;
        throw err;
      }
    });
  },

  async truncate(bs, offset, _exact, prealloc) {
    state(bs).stats.truncates++;
    // Regular files always resize to exactly `offset`, whatever `exact` says.
    await withHandle(bs, (fh) => regularTruncate(fh, offset, prealloc));
  },

  async getLength(bs) {
    return withHandle(bs, async (fh) => {
      try {
        return (await fh.stat()).size;
      } catch (e) {
        throw ioError(e, bs.nodeName);
      }
    });
  },

  async getAllocatedFileSize(bs) {
    return withHandle(bs, async (fh) => {
      try {
        return (await fh.stat()).blocks * 512;
      } catch (e) {
        throw ioError(e, bs.nodeName);
      }
    });
  },

  async getInfo() {
    return {};
  },

  hasZeroInit() {
    return true;
  },

  async reopenPrepare(rs: ReopenState) {
    const st = state(rs.bs);
    for (const [k, v] of Object.entries(rs.options)) {
      if (k === 'driver' || k === 'node-name') continue;
      if (k === 'locking') { enumOption(rs.options, k, LOCKING_CHOICES, 'auto'); continue; }
      if (k === 'aio') { enumOption(rs.options, k, AIO_CHOICES, 'threads'); continue; }
      if (k === 'drop-cache' || k === 'x-check-cache-dropped' || k === 'aio-max-batch') continue;
      if (k === 'filename' && typeof v === 'string' && stripPrefix(v) === st.path) continue;
      throw new BlockError('EINVAL', `Cannot change the option '${k}'`);
    }
    const writable = !rs.readOnly;
    if (writable === st.handle.writable) return;
    // Open the new handle now so that a failure leaves the node untouched.
    rs.opaque = await openHandle(st.path, writable);
  },

  reopenCommit(rs: ReopenState) {
    const next = rs.opaque;
    if (!(next instanceof HandleRef)) return;
    const st = state(rs.bs);
    const old = st.handle;
    st.handle = next;
    old.retire();
    rs.opaque = undefined;
  },

  reopenAbort(rs: ReopenState) {
    const next = rs.opaque;
    if (next instanceof HandleRef) void next.close();
    rs.opaque = undefined;
  },

  async create(filename: string, opts: CreateOptions, _ctx: CreateContext) {
    const path = stripPrefix(filename);
    const rawSize = sizeOption({ size: opts.size }, 'size', 0);
    // file-posix rounds new files up to whole sectors.
    const size = Math.ceil(rawSize / 512) * 512;
    const prealloc = enumOption({ preallocation: opts.preallocation }, 'preallocation', PREALLOC_CHOICES, 'off');
    const hint = sizeOption({ h: opts.extent_size_hint }, 'h');
    if (hint !== undefined && hint > 0xffffffff) throw new BlockError('EINVAL', 'Extent size hint is too large');
    let fh: FileHandle;
    try {
      fh = await fsp.open(path, fsConstants.O_RDWR | fsConstants.O_CREAT, 0o644);
    } catch (e) {
      throw fsError(e, `Could not create '${path}'`);
    }
    let failure: unknown = null;
    try {
      // Clear the file first, then size it, so stale data never survives a re-create.
      await regularTruncate(fh, 0, 'off');
      await regularTruncate(fh, size, prealloc);
    } catch (e) {
      failure = e;
    }
    try {
      await fh.close();
    } catch (e) {
      failure ??= fsError(e, 'Could not close the new file');
    }
    if (failure !== null) throw failure;
  },
};
