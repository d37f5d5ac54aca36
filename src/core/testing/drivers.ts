/**
 * Small drivers for core tests: a counting sparse store with configurable
 * alignment and fault injection, a format with its own allocation map and a
 * backing child, and a pass-through filter. They exist so core behaviour is
 * tested without depending on the real drivers' details.
 */
import { BlockError, type ErrnoCode } from '../errors.ts';
import type { BlockDriver } from '../driver.ts';
import type { BlockNode } from '../node.ts';
import { bdrvPreadv, bdrvPwritev } from '../io.ts';
import { BLOCK, REQ, ROLE, type BlockdevOptions } from '../types.ts';

/** Per-node state of the `tstore` test protocol. */
export interface TStore {
  data: Uint8Array;
  length: number;
  reads: number;
  writes: number;
  zeroWrites: number;
  flushes: number;
  /** Errors to throw on the next writes (consumed one per write). */
  failWrites: ErrnoCode[];
  failReopen: boolean;
  /** Delay per request in ms, to widen race windows. */
  delay: number;
}

const stores = new Map<string, TStore>();

/** The shared state behind `tstore` nodes opened with `name`. */
export function tstore(name: string): TStore {
  let s = stores.get(name);
  if (!s) {
    s = { data: new Uint8Array(0), length: 0, reads: 0, writes: 0, zeroWrites: 0, flushes: 0, failWrites: [], failReopen: false, delay: 0 };
    stores.set(name, s);
  }
  return s;
}

function grow(s: TStore, end: number): void {
  if (end > s.data.length) {
    const n = new Uint8Array(Math.max(end, s.data.length * 2));
    n.set(s.data);
    s.data = n;
  }
  if (end > s.length) s.length = end;
}

const tick = (ms: number): Promise<void> => (ms > 0 ? new Promise((r) => setTimeout(r, ms)) : Promise.resolve());

/** Test protocol: options name, size, align, max-transfer; checks alignment of every request it gets. */
export const tstoreDriver: BlockDriver = {
  name: 'tstore',
  kind: 'protocol',
  protocolNames: ['tstore'],
  runtimeOptions: [
    { name: 'name', type: 'string' },
    { name: 'size', type: 'number' },
    { name: 'align', type: 'number' },
    { name: 'max-transfer', type: 'number' },
    { name: 'zeroes', type: 'bool' },
  ],
  parseFilename(filename, options) {
    options.name = filename.slice('tstore:'.length);
  },
  async open(bs, options) {
    const s = tstore(String(options.name ?? bs.nodeName));
    if (typeof options.size === 'number') grow(s, options.size);
    bs.opaque = { s, align: Number(options.align ?? 1), maxTransfer: Number(options['max-transfer'] ?? 0) };
    bs.filename = `tstore:${String(options.name ?? bs.nodeName)}`;
    if (options.zeroes !== false) bs.supportedZeroFlags = REQ.MAY_UNMAP;
    if (options.zeroes === false) (bs.opaque as { noZeroes?: boolean }).noZeroes = true;
  },
  refreshLimits(bs) {
    const o = bs.opaque as { align: number; maxTransfer: number };
    bs.bl.requestAlignment = o.align;
    bs.bl.maxTransfer = o.maxTransfer;
  },
  async getLength(bs) {
    return (bs.opaque as { s: TStore }).s.length;
  },
  async preadv(bs, offset, bytes, buf) {
    const o = bs.opaque as { s: TStore; align: number };
    if (offset % o.align || bytes % o.align) throw new BlockError('EINVAL', `unaligned read ${offset}+${bytes}`);
    o.s.reads++;
    await tick(o.s.delay);
    buf.fill(0, 0, bytes);
    const avail = Math.max(0, Math.min(bytes, o.s.length - offset));
    buf.set(o.s.data.subarray(offset, offset + avail));
  },
  async pwritev(bs, offset, bytes, buf) {
    const o = bs.opaque as { s: TStore; align: number };
    if (offset % o.align || bytes % o.align) throw new BlockError('EINVAL', `unaligned write ${offset}+${bytes}`);
    const f = o.s.failWrites.shift();
    if (f) throw new BlockError(f);
    o.s.writes++;
    const snapshot = buf.slice(0, bytes);
    await tick(o.s.delay);
    grow(o.s, offset + bytes);
    o.s.data.set(snapshot, offset);
  },
  async pwriteZeroes(bs, offset, bytes) {
    const o = bs.opaque as { s: TStore; noZeroes?: boolean };
    if (o.noZeroes) throw new BlockError('ENOTSUP');
    o.s.zeroWrites++;
    grow(o.s, offset + bytes);
    o.s.data.fill(0, offset, offset + bytes);
  },
  async flushToDisk(bs) {
    (bs.opaque as { s: TStore }).s.flushes++;
  },
  async truncate(bs, offset) {
    const s = (bs.opaque as { s: TStore }).s;
    if (offset < s.length) s.data.fill(0, offset, s.length);
    grow(s, offset);
    s.length = offset;
  },
  async reopenPrepare(state) {
    if ((state.bs.opaque as { s: TStore }).s.failReopen) throw new BlockError('EIO', 'injected reopen failure');
  },
};

/** State of the `tfmt` test format: which 64 KiB clusters are allocated in this layer. */
export interface TFmt {
  allocated: Set<number>;
  size: number;
}

const TCLUSTER = 65536;

/** Test format with a backing child: allocation per 64 KiB cluster, data stored at the same offset in `file`. */
export const tfmtDriver: BlockDriver = {
  name: 'tfmt',
  kind: 'format',
  supportsBacking: true,
  runtimeOptions: [{ name: 'size', type: 'number' }, { name: 'backing-name', type: 'string' }, { name: 'backing-fmt', type: 'string' }],
  async open(bs, options) {
    await bs.graph.openChild(bs, options.file as BlockdevOptions | string, 'file', ROLE.DATA | ROLE.METADATA | ROLE.PRIMARY);
    bs.opaque = { allocated: new Set<number>(), size: Number(options.size ?? 1 << 20) } satisfies TFmt;
    if (typeof options['backing-name'] === 'string') bs.backingFile = options['backing-name'];
    if (typeof options['backing-fmt'] === 'string') bs.backingFormat = options['backing-fmt'];
  },
  async getLength(bs) {
    return (bs.opaque as TFmt).size;
  },
  async getInfo() {
    return { clusterSize: TCLUSTER };
  },
  async preadv(bs, offset, bytes, buf, flags) {
    const st = bs.opaque as TFmt;
    let pos = 0;
    while (pos < bytes) {
      const off = offset + pos;
      const c = Math.floor(off / TCLUSTER);
      const n = Math.min(bytes - pos, (c + 1) * TCLUSTER - off);
      const part = buf.subarray(pos, pos + n);
      if (st.allocated.has(c)) await bdrvPreadv(bs.file!, off, n, part, flags);
      else if (bs.backing) {
        const blen = bs.backing.bs.totalBytes;
        part.fill(0);
        if (off < blen) await bdrvPreadv(bs.backing, off, Math.min(n, blen - off), part);
      } else part.fill(0);
      pos += n;
    }
  },
  async pwritev(bs, offset, bytes, buf, flags) {
    const st = bs.opaque as TFmt;
    const first = Math.floor(offset / TCLUSTER);
    const last = Math.floor((offset + bytes - 1) / TCLUSTER);
    for (let c = first; c <= last; c++) {
      if (!st.allocated.has(c)) {
        // copy-on-write the whole cluster from below first
        const whole = new Uint8Array(TCLUSTER);
        if (bs.backing && c * TCLUSTER < bs.backing.bs.totalBytes) {
          await bdrvPreadv(bs.backing, c * TCLUSTER, Math.min(TCLUSTER, bs.backing.bs.totalBytes - c * TCLUSTER), whole);
        }
        await bdrvPwritev(bs.file!, c * TCLUSTER, TCLUSTER, whole, 0);
        st.allocated.add(c);
      }
    }
    await bdrvPwritev(bs.file!, offset, bytes, buf, flags);
  },
  async blockStatus(bs, _wantZero, offset, bytes) {
    const st = bs.opaque as TFmt;
    const c = Math.floor(offset / TCLUSTER);
    const alloc = st.allocated.has(c);
    let end = (c + 1) * TCLUSTER;
    while (end < offset + bytes && st.allocated.has(Math.floor(end / TCLUSTER)) === alloc) end += TCLUSTER;
    const pnum = Math.min(end, offset + bytes) - offset;
    return alloc ? { status: BLOCK.DATA | BLOCK.OFFSET_VALID, pnum, map: offset, file: bs.file!.bs } : { status: 0, pnum };
  },
};

/** Pass-through filter (like QEMU's compress-less 'preallocate' skeleton): everything goes to `file`. */
export const tfilterDriver: BlockDriver = {
  name: 'tfilter',
  kind: 'filter',
  async open(bs: BlockNode) {
    await bs.graph.openChild(bs, bs.options.file as BlockdevOptions | string, 'file', ROLE.FILTERED | ROLE.PRIMARY);
  },
  async getLength(bs) {
    return bs.file!.bs.totalBytes;
  },
};

/** All test drivers. */
export function testDrivers(): BlockDriver[] {
  return [tstoreDriver, tfmtDriver, tfilterDriver];
}
