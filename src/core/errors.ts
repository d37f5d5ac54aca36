/**
 * One error class for the whole engine: a POSIX-style code, a message in QEMU's
 * words where QEMU has one, and the node the error arose on. It survives
 * structured clone and comlink because everything is plain data (see toJSON).
 */

/** errno values as Linux numbers them; qemu-io prints `strerror(-ret)` of these. */
export const ERRNO = {
  EPERM: 1,
  ENOENT: 2,
  EIO: 5,
  E2BIG: 7,
  EAGAIN: 11,
  ENOMEM: 12,
  EACCES: 13,
  EBUSY: 16,
  EEXIST: 17,
  ENOTDIR: 20,
  EISDIR: 21,
  EINVAL: 22,
  EFBIG: 27,
  ENOSPC: 28,
  EROFS: 30,
  ERANGE: 34,
  ENOTSUP: 95,
  ENOMEDIUM: 123,
  ECANCELED: 125,
} as const;

export type ErrnoCode = keyof typeof ERRNO;

/** glibc's strerror() text for each code, which QEMU's tools embed in their messages. */
export const STRERROR: Record<ErrnoCode, string> = {
  EPERM: 'Operation not permitted',
  ENOENT: 'No such file or directory',
  EIO: 'Input/output error',
  E2BIG: 'Argument list too long',
  EAGAIN: 'Resource temporarily unavailable',
  ENOMEM: 'Cannot allocate memory',
  EACCES: 'Permission denied',
  EBUSY: 'Device or resource busy',
  EEXIST: 'File exists',
  ENOTDIR: 'Not a directory',
  EISDIR: 'Is a directory',
  EINVAL: 'Invalid argument',
  EFBIG: 'File too large',
  ENOSPC: 'No space left on device',
  EROFS: 'Read-only file system',
  ERANGE: 'Numerical result out of range',
  ENOTSUP: 'Operation not supported',
  ENOMEDIUM: 'No medium found',
  ECANCELED: 'Operation canceled',
};

export interface BlockErrorOptions {
  /** Name of the node (or backend) the error belongs to. */
  node?: string;
  cause?: unknown;
}

/** The engine's error: `code` is a POSIX name, `message` reads like QEMU's. */
export class BlockError extends Error {
  readonly code: ErrnoCode;
  readonly node?: string;

  constructor(code: ErrnoCode, message?: string, opts: BlockErrorOptions = {}) {
    super(message ?? STRERROR[code], opts.cause !== undefined ? { cause: opts.cause } : undefined);
    this.name = 'BlockError';
    this.code = code;
    if (opts.node !== undefined) this.node = opts.node;
  }

  /** Linux errno number of `code`. */
  get errno(): number {
    return ERRNO[this.code];
  }

  /** Plain-data form used to carry the error across workers. */
  toJSON(): SerializedBlockError {
    return { name: 'BlockError', code: this.code, message: this.message, node: this.node, stack: this.stack };
  }

  /** Rebuilds an error from toJSON() output. */
  static fromJSON(s: SerializedBlockError): BlockError {
    const e = new BlockError(s.code, s.message, s.node !== undefined ? { node: s.node } : {});
    if (s.stack) e.stack = s.stack;
    return e;
  }
}

export interface SerializedBlockError {
  name: 'BlockError';
  code: ErrnoCode;
  message: string;
  node?: string;
  stack?: string;
}

/** Shorthand constructor: `err('EINVAL', 'Invalid offset')`. */
export function err(code: ErrnoCode, message?: string, opts?: BlockErrorOptions): BlockError {
  return new BlockError(code, message, opts);
}

/** True when `e` is a BlockError, optionally with the given code. */
export function isBlockError(e: unknown, code?: ErrnoCode): e is BlockError {
  return e instanceof BlockError && (code === undefined || e.code === code);
}

/** Maps Node fs errors, DOMExceptions and anything else onto a BlockError, keeping BlockErrors as they are. */
export function toBlockError(e: unknown, fallback: ErrnoCode = 'EIO', node?: string): BlockError {
  if (e instanceof BlockError) return e;
  const opts: BlockErrorOptions = { cause: e };
  if (node !== undefined) opts.node = node;
  if (e && typeof e === 'object') {
    const o = e as { code?: unknown; name?: unknown; message?: unknown };
    const msg = typeof o.message === 'string' ? o.message : undefined;
    if (typeof o.code === 'string' && o.code in ERRNO) {
      return new BlockError(o.code as ErrnoCode, STRERROR[o.code as ErrnoCode], opts);
    }
    if (o.name === 'QuotaExceededError') return new BlockError('ENOSPC', undefined, opts);
    if (o.name === 'NotFoundError') return new BlockError('ENOENT', undefined, opts);
    if (o.name === 'NoModificationAllowedError') return new BlockError('EBUSY', msg, opts);
    if (o.name === 'AbortError') return new BlockError('ECANCELED', undefined, opts);
    if (o.name === 'NotAllowedError' || o.name === 'SecurityError') return new BlockError('EACCES', msg, opts);
    return new BlockError(fallback, msg ?? STRERROR[fallback], opts);
  }
  return new BlockError(fallback, String(e), opts);
}

/** Throws ECANCELED if the signal has fired. */
export function throwIfAborted(signal?: AbortSignal): void {
  if (signal?.aborted) throw new BlockError('ECANCELED');
}

/**
 * An error with a hint (QEMU's error_append_hint): tools print the message
 * as an error line and the hint verbatim after it.
 */
export class HintedError extends BlockError {
  constructor(code: BlockError['code'], message: string, readonly hint: string, cause?: unknown) {
    super(code, message, cause !== undefined ? { cause } : {});
  }
}
