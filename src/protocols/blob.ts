/**
 * The `blob` protocol: a read-only node over a Blob or File the caller
 * already has (a file picked or dropped by the user, a fetched body), given
 * as the `blob` option. Reads slice the blob, so a large File is never
 * loaded whole. A `blob:` object URL also works as a filename: its Blob is
 * fetched (object URLs resolve locally) and used the same way.
 */
import type { BlockDriver } from '../core/driver.ts';
import { BlockError, toBlockError } from '../core/errors.ts';
import type { BlockNode } from '../core/node.ts';
import { BLOCK, OPEN, type BlockStatus } from '../core/types.ts';
import { stringOption } from './driver-opts.ts';

/** Per-node state of a blob node (bs.opaque). */
export interface BlobState {
  readonly blob: Blob;
  /** Bytes read from the blob so far (for the inspector). */
  bytesRead: number;
}

function isBlob(v: unknown): v is Blob {
  return typeof Blob !== 'undefined' && v instanceof Blob;
}

function st(bs: BlockNode): BlobState {
  const s = bs.opaque as BlobState | undefined;
  if (!s) throw new BlockError('ENOMEDIUM', undefined, { node: bs.nodeName });
  return s;
}

/** The Blob protocol driver. */
export const blobDriver: BlockDriver = {
  name: 'blob',
  kind: 'protocol',
  protocolNames: ['blob'],
  runtimeOptions: [
    { name: 'blob', type: 'string', help: 'The Blob or File to read (an object, not text)' },
    { name: 'url', type: 'string', help: 'A blob: object URL to read instead of a Blob' },
  ],

  parseFilename(filename, options) {
    options.url = filename;
  },

  async open(bs, options, flags) {
    // Blobs are immutable; like the curl driver, refuse read-write unless auto-read-only allows dropping to read-only.
    if (flags & OPEN.RDWR) {
      if (!(flags & OPEN.AUTO_RDONLY)) throw new BlockError('EACCES', 'blob driver does not support writes', { node: bs.nodeName });
      bs.readOnly = true;
      bs.openFlags &= ~OPEN.RDWR;
    }
    let blob: Blob;
    if (options.blob !== undefined) {
      if (!isBlob(options.blob)) throw new BlockError('EINVAL', "Parameter 'blob' expects a Blob or File object");
      blob = options.blob;
      if (!bs.filename) bs.filename = blob instanceof File && blob.name ? blob.name : 'blob';
    } else {
      const url = stringOption(options, 'url') ?? stringOption(options, 'filename');
      if (url === undefined) throw new BlockError('EINVAL', "The 'blob' protocol requires a 'blob' option (a Blob or File)");
      if (!/^blob:/i.test(url)) throw new BlockError('EINVAL', `'${url}' is not a blob: URL`);
      try {
        const res = await fetch(url);
        if (!res.ok) throw new BlockError('ENOENT', `Could not open '${url}': ${res.status} ${res.statusText}`);
        blob = await res.blob();
      } catch (e) {
        if (e instanceof BlockError) throw e;
        throw new BlockError('ENOENT', `Could not open '${url}': ${toBlockError(e).message}`, { cause: e });
      }
      if (!bs.filename) bs.filename = url;
    }
    const s: BlobState = { blob, bytesRead: 0 };
    bs.opaque = s;
  },

  async close(bs) {
    bs.opaque = undefined;
  },

  async getLength(bs) {
    return st(bs).blob.size;
  },

  async preadv(bs, offset, bytes, buf) {
    const s = st(bs);
    const end = Math.min(offset + bytes, s.blob.size);
    let got = 0;
    if (end > offset) {
      let data: ArrayBuffer;
      try {
        data = await s.blob.slice(offset, end).arrayBuffer();
      } catch (e) {
        // A File whose underlying file changed or vanished fails with NotReadableError.
        throw new BlockError('EIO', `Could not read '${bs.filename}': ${toBlockError(e).message}`, { node: bs.nodeName, cause: e });
      }
      got = data.byteLength;
      buf.set(new Uint8Array(data), 0);
      s.bytesRead += got;
    }
    if (got < bytes) buf.fill(0, got, bytes);
  },

  async blockStatus(bs, _wantZero, offset, bytes): Promise<BlockStatus> {
    return { status: BLOCK.DATA | BLOCK.OFFSET_VALID, pnum: bytes, map: offset, file: bs };
  },
};
