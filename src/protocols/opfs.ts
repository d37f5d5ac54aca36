/**
 * The `opfs` protocol: an image file in the Origin Private File System,
 * read and written through a FileSystemSyncAccessHandle (QEMU's file-posix
 * for the browser). Sync access handles exist only in dedicated workers, so
 * the engine opens OPFS images from its worker; elsewhere open fails with
 * ENOTSUP.
 *
 * One owner per file across tabs: a node holds the Web Lock
 * `qblock:opfs:<path>` for its whole life, taken with ifAvailable so a
 * second opener (another tab, worker, or node of the same graph) fails at
 * once with EBUSY instead of queueing, the way QEMU's image locking refuses
 * a second writer. The sync handle is exclusive as well; its
 * NoModificationAllowedError (someone outside qblock holds the file) is
 * also EBUSY. The handle is always opened read-write, so reopening between
 * read-only and read-write only changes flags.
 *
 * Paths are '/'-separated names below the OPFS root ("images/disk.qcow2");
 * an `opfs:` prefix is accepted and stripped, '.' and empty segments are
 * ignored, '..' is refused.
 */
import type { BlockDriver, ReopenState } from '../core/driver.ts';
import { BlockError, STRERROR, toBlockError } from '../core/errors.ts';
import type { BlockNode } from '../core/node.ts';
import { REQ, type PreallocMode } from '../core/types.ts';
import { boolOption, sizeOption, stringOption } from './driver-opts.ts';
import { checkProtocolPrealloc } from './memory.ts';

/** Prefix of the Web Lock names that guard OPFS files. */
export const OPFS_LOCK_PREFIX = 'qblock:opfs:';

/** The synchronous handle API we use (FileSystemSyncAccessHandle). */
interface SyncHandle {
  read(buf: Uint8Array, opts?: { at?: number }): number;
  write(buf: Uint8Array, opts?: { at?: number }): number;
  truncate(size: number): void;
  getSize(): number;
  flush(): void;
  close(): void;
}

/** A file handle with the worker-only and newer methods typed. */
interface FileHandleExt extends FileSystemFileHandle {
  createSyncAccessHandle(): Promise<SyncHandle>;
  move?(dir: FileSystemDirectoryHandle, name: string): Promise<void>;
}

/** A directory handle with async iteration typed (lib.dom's AsyncIterable part is not in our libs). */
interface DirHandleIter extends FileSystemDirectoryHandle {
  entries(): AsyncIterableIterator<[string, FileSystemHandle]>;
}

/** Per-node state of an opfs node (bs.opaque). */
export interface OpfsState {
  /** Canonical path below the OPFS root. */
  readonly path: string;
  readonly handle: SyncHandle;
  /** Releases the Web Lock. */
  readonly unlock: () => Promise<void>;
  closed: boolean;
}

/**
 * Splits a filename into OPFS path segments: strips an `opfs:` prefix,
 * drops empty and '.' segments, refuses '..' and empty paths (EINVAL).
 */
export function opfsPathSegments(filename: string): string[] {
  let p = filename;
  if (/^opfs:/i.test(p)) p = p.slice(5);
  const segs: string[] = [];
  for (const s of p.split('/')) {
    if (s === '' || s === '.') continue;
    if (s === '..') throw new BlockError('EINVAL', `OPFS paths cannot contain '..': '${filename}'`);
    segs.push(s);
  }
  if (segs.length === 0) throw new BlockError('EINVAL', `Empty OPFS path: '${filename}'`);
  return segs;
}

/** Canonical form of an OPFS path ("a/b/c.img"), the key of its Web Lock. */
export function opfsCanonicalPath(filename: string): string {
  return opfsPathSegments(filename).join('/');
}

/** True where FileSystemSyncAccessHandle exists (dedicated workers of a secure context). */
export function opfsSyncAvailable(): boolean {
  const g = globalThis as { FileSystemSyncAccessHandle?: unknown; navigator?: { storage?: { getDirectory?: unknown } } };
  return typeof g.FileSystemSyncAccessHandle === 'function' && typeof g.navigator?.storage?.getDirectory === 'function';
}

function requireSync(): void {
  if (!opfsSyncAvailable()) {
    throw new BlockError(
      'ENOTSUP',
      'OPFS images can only be opened in a dedicated worker: FileSystemSyncAccessHandle is not available in this context',
    );
  }
}

async function opfsRoot(): Promise<FileSystemDirectoryHandle> {
  const storage = (globalThis as { navigator?: { storage?: StorageManager } }).navigator?.storage;
  if (!storage?.getDirectory) throw new BlockError('ENOTSUP', 'The Origin Private File System is not available in this context');
  return storage.getDirectory();
}

function busyError(path: string, cause?: unknown): BlockError {
  return new BlockError('EBUSY', `Failed to get "write" lock: OPFS file '${path}' is open elsewhere (another tab, worker or node holds it)`, {
    cause,
  });
}

/** Maps a DOMException from OPFS onto a BlockError that names the file. */
function opfsError(e: unknown, path: string, what = 'Could not open'): BlockError {
  if (e instanceof BlockError) return e;
  const name = e && typeof e === 'object' ? (e as { name?: unknown }).name : undefined;
  switch (name) {
    case 'NotFoundError':
      return new BlockError('ENOENT', `${what} '${path}': ${STRERROR.ENOENT}`, { cause: e });
    case 'TypeMismatchError':
      return new BlockError('EISDIR', `${what} '${path}': a path component is of the wrong kind (file vs directory)`, { cause: e });
    case 'NoModificationAllowedError':
      return busyError(path, e);
    case 'QuotaExceededError':
      return new BlockError('ENOSPC', `${STRERROR.ENOSPC} (OPFS quota exceeded writing '${path}')`, { cause: e });
    case 'InvalidStateError':
      return new BlockError('EIO', `OPFS file '${path}' is no longer usable: ${(e as Error).message}`, { cause: e });
    default: {
      const be = toBlockError(e);
      return new BlockError(be.code, `${what} '${path}': ${be.message}`, { cause: e });
    }
  }
}

/**
 * Takes the Web Lock for `path` if nobody holds it and returns a function
 * that releases it (resolving once the lock manager has let it go, so the
 * same file can be reopened right away); throws EBUSY when it is held.
 * Without the Web Locks API (never in browsers that have sync handles) the
 * handle's own exclusivity is all there is.
 */
async function lockPath(path: string): Promise<() => Promise<void>> {
  const locks = (globalThis as { navigator?: { locks?: LockManager } }).navigator?.locks;
  if (!locks) return async () => undefined;
  let release!: () => void;
  const held = new Promise<void>((r) => (release = r));
  let request!: Promise<unknown>;
  const got = await new Promise<boolean>((resolve, reject) => {
    request = locks.request(OPFS_LOCK_PREFIX + path, { ifAvailable: true }, (lock) => {
      if (!lock) {
        resolve(false);
        return undefined;
      }
      resolve(true);
      // The lock stays held until this promise settles, i.e. until release().
      return held;
    });
    request.catch(reject);
  });
  if (!got) throw busyError(path);
  return async () => {
    release();
    // request() settles only after the lock is released.
    await request.catch(() => undefined);
  };
}

/** The directory holding `segs`' last element, creating missing directories when `create`. */
async function parentDir(segs: string[], create: boolean, path: string): Promise<FileSystemDirectoryHandle> {
  let d = await opfsRoot();
  for (const s of segs.slice(0, -1)) {
    try {
      d = await d.getDirectoryHandle(s, { create });
    } catch (e) {
      throw opfsError(e, path);
    }
  }
  return d;
}

async function fileHandle(path: string, create: boolean): Promise<FileHandleExt> {
  const segs = path.split('/');
  const dir = await parentDir(segs, create, path);
  try {
    return (await dir.getFileHandle(segs[segs.length - 1]!, { create })) as FileHandleExt;
  } catch (e) {
    throw opfsError(e, path);
  }
}

/** Opens the sync handle of `path` under its lock; the caller owns both. */
async function openLocked(path: string, create: boolean): Promise<{ handle: SyncHandle; unlock: () => Promise<void> }> {
  requireSync();
  const unlock = await lockPath(path);
  try {
    const fh = await fileHandle(path, create);
    let handle: SyncHandle;
    try {
      handle = await fh.createSyncAccessHandle();
    } catch (e) {
      throw opfsError(e, path);
    }
    return { handle, unlock };
  } catch (e) {
    await unlock();
    throw e;
  }
}

function st(bs: BlockNode): OpfsState {
  const s = bs.opaque as OpfsState | undefined;
  if (!s || s.closed) throw new BlockError('ENOMEDIUM', undefined, { node: bs.nodeName });
  return s;
}

const PREALLOC_OK: readonly PreallocMode[] = ['off', 'falloc', 'full'];

/**
 * Checks a preallocation mode. 'falloc' and 'full' need nothing beyond
 * resizing: OPFS fills new space with zeroes and charges quota by logical
 * size, so the space is as reserved as the browser lets us reserve it.
 */
function checkPrealloc(mode: string): PreallocMode {
  if (!(PREALLOC_OK as readonly string[]).includes(mode)) throw new BlockError('ENOTSUP', `Unsupported preallocation mode: ${mode}`);
  return mode as PreallocMode;
}

/** The OPFS protocol driver. */
export const opfsDriver: BlockDriver = {
  name: 'opfs',
  kind: 'protocol',
  protocolNames: ['opfs'],
  runtimeOptions: [
    { name: 'filename', type: 'string', help: 'Path of the image below the OPFS root' },
    { name: 'create', type: 'bool', help: 'Create the file (and its directories) when missing', defaultValue: 'off' },
  ],
  createOptions: [
    { name: 'size', type: 'size', help: 'Virtual disk size' },
    { name: 'preallocation', type: 'string', help: 'Preallocation mode (allowed values: off, falloc, full)', defaultValue: 'off' },
  ],

  parseFilename(filename, options) {
    options.filename = opfsCanonicalPath(filename);
  },

  async open(bs, options) {
    const filename = stringOption(options, 'filename');
    if (filename === undefined) throw new BlockError('EINVAL', "The 'opfs' protocol requires a 'filename' option");
    const path = opfsCanonicalPath(filename);
    const { handle, unlock } = await openLocked(path, boolOption(options, 'create', false));
    const s: OpfsState = { path, handle, unlock, closed: false };
    bs.opaque = s;
    bs.filename = path;
    // OPFS zero-fills whatever truncate adds.
    bs.supportedTruncateFlags = REQ.ZERO_WRITE;
  },

  async close(bs) {
    const s = bs.opaque as OpfsState | undefined;
    if (!s || s.closed) return;
    s.closed = true;
    try {
      s.handle.close();
    } finally {
      await s.unlock();
    }
  },

  async create(filename, opts) {
    const path = opfsCanonicalPath(filename);
    const size = sizeOption(opts, 'size', 0);
    checkPrealloc(stringOption(opts, 'preallocation') ?? 'off');
    const { handle, unlock } = await openLocked(path, true);
    try {
      // Like QEMU's raw create: an existing file is emptied, then sized.
      handle.truncate(0);
      handle.truncate(size);
      handle.flush();
    } catch (e) {
      throw opfsError(e, path, 'Could not resize file');
    } finally {
      try {
        handle.close();
      } finally {
        await unlock();
      }
    }
  },

  async preadv(bs, offset, bytes, buf) {
    opfsDriver.preadvSync!(bs, offset, bytes, buf);
  },

  preadvSync(bs, offset, bytes, buf) {
    const s = st(bs);
    const view = buf.length === bytes ? buf : buf.subarray(0, bytes);
    let n: number;
    try {
      n = s.handle.read(view, { at: offset });
    } catch (e) {
      throw opfsError(e, s.path, 'Could not read');
    }
    // Past EOF reads as zeroes, as a short pread does for file-posix.
    if (n < bytes) view.fill(0, n);
    return true;
  },

  async pwritev(bs, offset, bytes, buf) {
    const s = st(bs);
    let n: number;
    try {
      n = s.handle.write(buf.subarray(0, bytes), { at: offset });
    } catch (e) {
      throw opfsError(e, s.path, 'Could not write');
    }
    if (n !== bytes) throw new BlockError('EIO', `Short write to OPFS file '${s.path}': ${n} of ${bytes} bytes`, { node: bs.nodeName });
  },

  async pwriteZeroes(bs, offset, bytes) {
    const s = st(bs);
    // Beyond EOF, growing the file is a zero write that costs no I/O; elsewhere OPFS cannot punch
    // holes, so ENOTSUP lets the generic layer write zeroes (or refuse under NO_FALLBACK).
    if (offset < s.handle.getSize()) throw new BlockError('ENOTSUP');
    try {
      s.handle.truncate(offset + bytes);
    } catch (e) {
      throw opfsError(e, s.path, 'Could not resize file');
    }
  },

  async flushToDisk(bs) {
    const s = st(bs);
    try {
      s.handle.flush();
    } catch (e) {
      throw opfsError(e, s.path, 'Could not flush');
    }
  },

  async truncate(bs, offset, _exact, prealloc) {
    const s = st(bs);
    // file-posix's rules (no preallocation when shrinking); regular files are always resized exactly.
    checkProtocolPrealloc(s.handle.getSize(), offset, prealloc);
    try {
      s.handle.truncate(offset);
    } catch (e) {
      throw opfsError(e, s.path, 'Could not resize file');
    }
  },

  async getLength(bs) {
    return st(bs).handle.getSize();
  },

  async getAllocatedFileSize(bs) {
    // Quota is charged by logical size, so that is what the file costs.
    return st(bs).handle.getSize();
  },

  hasZeroInit() {
    return true;
  },

  async reopenPrepare(state: ReopenState) {
    const s = st(state.bs);
    const f = state.options.filename;
    if (f !== undefined && (typeof f !== 'string' || opfsCanonicalPath(f) !== s.path)) {
      throw new BlockError('ENOTSUP', "Cannot change the option 'filename'", { node: state.bs.nodeName });
    }
    for (const k of Object.keys(state.options)) {
      if (k !== 'filename' && k !== 'create') {
        throw new BlockError('EINVAL', `Block protocol 'opfs' doesn't support the option '${k}'`, { node: state.bs.nodeName });
      }
    }
  },

  reopenCommit() {
    // The handle is read-write whatever the node's mode, so only flags change (done by the graph).
  },

  reopenAbort() {
    // Nothing was changed in prepare.
  },
};

/** One entry of opfsList. */
export interface OpfsEntry {
  /** Path below the OPFS root. */
  path: string;
  name: string;
  kind: 'file' | 'directory';
  /** Logical size of a file; undefined when it could not be read (e.g. held by a foreign sync handle). */
  size?: number;
  /** A qblock node somewhere holds the file open (its Web Lock is taken). */
  open?: boolean;
}

/** Lists a directory below the OPFS root ('' = the root), optionally recursively, with file sizes and open state. */
export async function opfsList(dir = '', opts: { recursive?: boolean } = {}): Promise<OpfsEntry[]> {
  const segs = dir === '' || dir === '/' ? [] : opfsPathSegments(dir);
  let d = await opfsRoot();
  for (const s of segs) {
    try {
      d = await d.getDirectoryHandle(s);
    } catch (e) {
      throw opfsError(e, segs.join('/'), 'Could not list');
    }
  }
  const held = new Set<string>();
  const locks = (globalThis as { navigator?: { locks?: LockManager } }).navigator?.locks;
  if (locks) {
    const q = await locks.query();
    for (const l of q.held ?? []) if (l.name?.startsWith(OPFS_LOCK_PREFIX)) held.add(l.name.slice(OPFS_LOCK_PREFIX.length));
  }
  const out: OpfsEntry[] = [];
  const walk = async (h: FileSystemDirectoryHandle, prefix: string): Promise<void> => {
    for await (const [name, child] of (h as DirHandleIter).entries()) {
      const path = prefix ? `${prefix}/${name}` : name;
      if (child.kind === 'file') {
        const e: OpfsEntry = { path, name, kind: 'file', open: held.has(path) };
        try {
          e.size = (await (child as FileSystemFileHandle).getFile()).size;
        } catch {
          // Size unknown while another context holds the file exclusively.
        }
        out.push(e);
      } else {
        out.push({ path, name, kind: 'directory' });
        if (opts.recursive) await walk(child as FileSystemDirectoryHandle, path);
      }
    }
  };
  await walk(d, segs.join('/'));
  out.sort((a, b) => (a.path < b.path ? -1 : a.path > b.path ? 1 : 0));
  return out;
}

/** Deletes a file (or, with recursive, a directory tree) below the OPFS root; EBUSY while a node has the file open. */
export async function opfsRemove(path: string, opts: { recursive?: boolean } = {}): Promise<void> {
  const p = opfsCanonicalPath(path);
  const segs = p.split('/');
  const unlock = await lockPath(p);
  try {
    const dir = await parentDir(segs, false, p);
    try {
      await dir.removeEntry(segs[segs.length - 1]!, { recursive: opts.recursive ?? false });
    } catch (e) {
      if ((e as { name?: unknown }).name === 'InvalidModificationError') {
        // POSIX lets rmdir report a non-empty directory as EEXIST; we have no ENOTEMPTY.
        throw new BlockError('EEXIST', `Could not remove '${p}': Directory not empty`, { cause: e });
      }
      throw opfsError(e, p, 'Could not remove');
    }
  } finally {
    await unlock();
  }
}

/**
 * Renames (moves) a file below the OPFS root, creating the target's
 * directories. EEXIST when the target exists, EBUSY while either name is
 * open, ENOTSUP where FileSystemHandle.move() is missing.
 */
export async function opfsRename(from: string, to: string): Promise<void> {
  const a = opfsCanonicalPath(from);
  const b = opfsCanonicalPath(to);
  if (a === b) return;
  const unlockA = await lockPath(a);
  try {
    const unlockB = await lockPath(b);
    try {
      const fh = await fileHandle(a, false);
      if (typeof fh.move !== 'function') throw new BlockError('ENOTSUP', 'This browser cannot move OPFS files');
      const bs = b.split('/');
      const dir = await parentDir(bs, true, b);
      const name = bs[bs.length - 1]!;
      let exists = true;
      try {
        await dir.getFileHandle(name);
      } catch (e) {
        const n = (e as { name?: unknown }).name;
        if (n === 'NotFoundError') exists = false;
        else if (n === 'TypeMismatchError') throw new BlockError('EISDIR', `Cannot rename '${a}' to '${b}': the target is a directory`);
        else throw opfsError(e, b, 'Could not rename to');
      }
      if (exists) throw new BlockError('EEXIST', `Cannot rename '${a}' to '${b}': ${STRERROR.EEXIST}`);
      try {
        await fh.move(dir, name);
      } catch (e) {
        throw opfsError(e, a, 'Could not rename');
      }
    } finally {
      await unlockB();
    }
  } finally {
    await unlockA();
  }
}
