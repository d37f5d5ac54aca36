/**
 * The `memory` protocol: a sparse, growable byte store kept in pages, so a
 * 1 TiB image costs nothing until it is written. It behaves like a regular
 * file on a file system with hole punching (QEMU's file-posix on ext4/xfs):
 * unwritten pages read as zeroes and report ZERO without DATA, zero writes
 * with MAY_UNMAP and discards free whole pages, truncate follows
 * file-posix's preallocation rules and messages.
 *
 * Stores can be named (`memory:foo`, or option `name`) so several opens share
 * the same bytes; named stores live in a module-level registry until
 * deleteMemoryStore(). Anonymous stores live as long as their node.
 *
 * Option `align` sets request_alignment, which lets tests emulate a device
 * that only accepts 4 KiB-aligned requests.
 */
import type { BlockDriver, CreateContext } from '../core/driver.ts';
import { BlockError, throwIfAborted } from '../core/errors.ts';
import { bdrvCopyRangeTo } from '../core/io.ts';
import type { BlockNode } from '../core/node.ts';
import type { CreateOptions } from '../core/options.ts';
import { BLOCK, REQ, type BlockStatus, type PreallocMode } from '../core/types.ts';
import { enumOption, numberOption, sizeOption, stringOption } from './driver-opts.ts';

/** Allocation granularity of memory stores. */
export const MEMORY_PAGE_SIZE = 64 * 1024;
const PAGE = MEMORY_PAGE_SIZE;

/** Largest `align` accepted (QEMU caps request_alignment well below this too). */
const MAX_ALIGN = 1 << 26;

/** Per-node I/O counters that tests inspect (requests as the driver saw them, after the generic path). */
export interface ProtocolStats {
  reads: number;
  writes: number;
  zeroWrites: number;
  discards: number;
  flushes: number;
  truncates: number;
  bytesRead: number;
  bytesWritten: number;
}

/** Fresh zeroed counters. */
export function newProtocolStats(): ProtocolStats {
  return { reads: 0, writes: 0, zeroWrites: 0, discards: 0, flushes: 0, truncates: 0, bytesRead: 0, bytesWritten: 0 };
}

/**
 * Sparse paged bytes with a length. Every method is synchronous and
 * complete when it returns, so one call is atomic with respect to others.
 */
export class MemoryStore {
  /** Registry key, or null for an anonymous store. */
  readonly name: string | null;
  /** Length in bytes (like a file's st_size). */
  length: number;
  /** Page index → page; missing pages read as zeroes. */
  readonly pages = new Map<number, Uint8Array>();

  constructor(name: string | null, length = 0) {
    this.name = name;
    this.length = length;
  }

  /** Copies [offset, offset+buf.length) into buf; bytes past EOF and in holes read as zero. */
  read(offset: number, buf: Uint8Array): void {
    let pos = 0;
    while (pos < buf.length) {
      const off = offset + pos;
      const idx = Math.floor(off / PAGE);
      const inPage = off - idx * PAGE;
      const n = Math.min(PAGE - inPage, buf.length - pos);
      const page = off < this.length ? this.pages.get(idx) : undefined;
      if (page) {
        // Bytes of the page beyond EOF are kept zero by resize(), so copying them is correct.
        buf.set(page.subarray(inPage, inPage + n), pos);
      } else {
        buf.fill(0, pos, pos + n);
      }
      pos += n;
    }
  }

  /** Copies data in at offset, allocating pages and growing the length as a file write would. */
  write(offset: number, data: Uint8Array): void {
    let pos = 0;
    while (pos < data.length) {
      const off = offset + pos;
      const idx = Math.floor(off / PAGE);
      const inPage = off - idx * PAGE;
      const n = Math.min(PAGE - inPage, data.length - pos);
      let page = this.pages.get(idx);
      if (!page) {
        page = new Uint8Array(PAGE);
        this.pages.set(idx, page);
      }
      page.set(data.subarray(pos, pos + n), inPage);
      pos += n;
    }
    if (offset + data.length > this.length) this.length = offset + data.length;
  }

  /**
   * Makes [offset, offset+bytes) read as zero. With `unmap`, whole pages are
   * freed; without it, allocated pages stay allocated (zero-filled), and holes
   * stay holes because they already read as zero — allocating them would make
   * a large zero write cost memory for nothing.
   */
  zero(offset: number, bytes: number, unmap: boolean): void {
    const end = offset + bytes;
    this.forEachPage(offset, end, (idx, from, to) => {
      const page = this.pages.get(idx);
      if (!page) return;
      if (unmap && from === 0 && to === PAGE) this.pages.delete(idx);
      else page.fill(0, from, to);
    });
    if (end > this.length) this.length = end;
  }

  /** Visits the allocated pages overlapping [start, end) with the in-page range, without walking holes one by one. */
  private forEachPage(start: number, end: number, fn: (idx: number, from: number, to: number) => void): void {
    if (end <= start) return;
    const first = Math.floor(start / PAGE);
    const last = Math.floor((end - 1) / PAGE);
    const visit = (idx: number): void => {
      const pStart = idx * PAGE;
      fn(idx, Math.max(start, pStart) - pStart, Math.min(end, pStart + PAGE) - pStart);
    };
    if (last - first + 1 <= this.pages.size) {
      for (let idx = first; idx <= last; idx++) if (this.pages.has(idx)) visit(idx);
    } else {
      for (const idx of [...this.pages.keys()]) if (idx >= first && idx <= last) visit(idx);
    }
  }

  /**
   * Sets the length. Shrinking frees pages past the end and zeroes the tail of
   * the last one (so a later grow reads zeroes there); growing with
   * `allocate` backs the new range with real pages (preallocation).
   */
  resize(newLength: number, allocate = false): void {
    const old = this.length;
    if (newLength < old) {
      const keepPages = Math.ceil(newLength / PAGE);
      for (const idx of [...this.pages.keys()]) if (idx >= keepPages) this.pages.delete(idx);
      const tail = newLength % PAGE;
      if (tail !== 0) this.pages.get(keepPages - 1)?.fill(0, tail);
    } else if (allocate && newLength > old) {
      for (let idx = Math.floor(old / PAGE); idx * PAGE < newLength; idx++) {
        if (!this.pages.has(idx)) this.pages.set(idx, new Uint8Array(PAGE));
      }
    }
    this.length = newLength;
  }

  /** Whether the page at `idx` holds memory. */
  isAllocated(idx: number): boolean {
    return this.pages.has(idx);
  }

  /** Bytes of memory backing the store (like st_blocks * 512). */
  allocatedBytes(): number {
    return this.pages.size * PAGE;
  }

  /**
   * Length in bytes, from `offset`, of the run of units (of `unit` bytes, a
   * multiple of the page size) sharing the allocation state of the first one,
   * capped at `limit`. A unit counts as allocated when any of its pages is.
   */
  allocationRun(offset: number, limit: number, unit: number): { allocated: boolean; bytes: number } {
    const perUnit = unit / PAGE;
    const unitAllocated = (u: number): boolean => {
      for (let k = 0; k < perUnit; k++) if (this.pages.has(u * perUnit + k)) return true;
      return false;
    };
    const firstUnit = Math.floor(offset / unit);
    const endOffset = offset + limit;
    const allocated = unitAllocated(firstUnit);
    let u = firstUnit + 1;
    if (allocated) {
      // Allocated runs are bounded by the number of pages, so walking them is cheap.
      while (u * unit < endOffset && unitAllocated(u)) u++;
    } else {
      // A hole may span terabytes: find the next allocated page instead of walking the hole.
      let next = Infinity;
      const firstPage = (firstUnit + 1) * perUnit;
      for (const idx of this.pages.keys()) if (idx >= firstPage && idx < next) next = idx;
      u = next === Infinity ? Infinity : Math.floor(next / perUnit);
    }
    const runEnd = u === Infinity ? endOffset : Math.min(u * unit, endOffset);
    return { allocated, bytes: runEnd - offset };
  }
}

const registry = new Map<string, MemoryStore>();

/** The named store, created empty (length 0) if it does not exist yet. */
export function memoryStore(name: string): MemoryStore {
  let s = registry.get(name);
  if (!s) {
    s = new MemoryStore(name, 0);
    registry.set(name, s);
  }
  return s;
}

/** True when a store with this name exists. */
export function hasMemoryStore(name: string): boolean {
  return registry.has(name);
}

/** Forgets the named store; nodes that have it open keep using their reference. Returns whether it existed. */
export function deleteMemoryStore(name: string): boolean {
  return registry.delete(name);
}

/** Driver state of a memory node. */
export interface MemoryNodeState {
  store: MemoryStore;
  align: number;
  stats: ProtocolStats;
}

function state(bs: BlockNode): MemoryNodeState {
  return bs.state<MemoryNodeState>();
}

/** Store name from `memory:NAME` / `memory://NAME`; '' for an anonymous store. */
function nameFromFilename(filename: string): string {
  let rest = filename.startsWith('memory:') ? filename.slice('memory:'.length) : filename;
  if (rest.startsWith('//')) rest = rest.slice(2);
  return rest;
}

function isPowerOfTwo(n: number): boolean {
  return Number.isInteger(n) && n > 0 && (n & (n - 1)) === 0;
}

/** file-posix's truncate rules: no preallocation when shrinking, metadata unsupported for a protocol. */
export function checkProtocolPrealloc(current: number, offset: number, prealloc: PreallocMode): void {
  if (current > offset && prealloc !== 'off') {
    throw new BlockError('ENOTSUP', 'Cannot use preallocation for shrinking files');
  }
  if (prealloc !== 'off' && prealloc !== 'full' && prealloc !== 'falloc') {
    throw new BlockError('ENOTSUP', `Unsupported preallocation mode: ${prealloc}`);
  }
}

const PREALLOC_CHOICES: readonly PreallocMode[] = ['off', 'metadata', 'falloc', 'full'];

/** The memory protocol driver. */
export const memoryDriver: BlockDriver = {
  name: 'memory',
  kind: 'protocol',
  protocolNames: ['memory'],
  // Two nodes may share a named store, so one must see the other's growth.
  hasVariableLength: true,
  runtimeOptions: [
    { name: 'name', type: 'string', help: 'Shared store name (empty: private store)' },
    { name: 'size', type: 'size', help: 'Initial length of a new store', defaultValue: '0' },
    { name: 'align', type: 'number', help: 'Request alignment in bytes (power of two)', defaultValue: '1' },
  ],
  createOptions: [
    { name: 'size', type: 'size', help: 'Virtual disk size' },
    { name: 'preallocation', type: 'string', help: 'Preallocation mode (allowed values: off, falloc, full)' },
  ],

  parseFilename(filename, options) {
    options.name = nameFromFilename(filename);
  },

  async open(bs, options) {
    const name = stringOption(options, 'name') ?? (typeof options.filename === 'string' ? nameFromFilename(options.filename) : '');
    const size = sizeOption(options, 'size', 0);
    const align = numberOption(options, 'align', 1);
    if (!isPowerOfTwo(align) || align > MAX_ALIGN) {
      throw new BlockError('EINVAL', `Parameter 'align' must be a power of two between 1 and ${MAX_ALIGN}`);
    }
    // The size option only shapes a store this open creates; an existing named store keeps its bytes.
    const store = name ? (registry.get(name) ?? registerNew(name, size)) : new MemoryStore(null, size);
    const st: MemoryNodeState = { store, align, stats: newProtocolStats() };
    bs.opaque = st;
    bs.filename = name ? `memory:${name}` : 'memory:';
    bs.supportedWriteFlags = REQ.FUA;
    bs.supportedZeroFlags = REQ.MAY_UNMAP | REQ.NO_FALLBACK | REQ.FUA;
    bs.supportedTruncateFlags = REQ.ZERO_WRITE;
  },

  refreshLimits(bs) {
    bs.bl.requestAlignment = state(bs).align;
  },

  async preadv(bs, offset, bytes, buf, _flags, signal) {
    throwIfAborted(signal);
    memoryDriver.preadvSync!(bs, offset, bytes, buf);
  },

  preadvSync(bs, offset, bytes, buf) {
    const st = state(bs);
    st.store.read(offset, buf.length === bytes ? buf : buf.subarray(0, bytes));
    st.stats.reads++;
    st.stats.bytesRead += bytes;
    return true;
  },

  async pwritev(bs, offset, bytes, buf, _flags, signal) {
    throwIfAborted(signal);
    const st = state(bs);
    st.store.write(offset, buf.subarray(0, bytes));
    st.stats.writes++;
    st.stats.bytesWritten += bytes;
  },

  async copyRangeFrom(_bs, src, srcOffset, dst, dstOffset, bytes, readFlags, writeFlags) {
    await bdrvCopyRangeTo(src, srcOffset, dst, dstOffset, bytes, readFlags, writeFlags);
  },

  async copyRangeTo(bs, src, srcOffset, _dst, dstOffset, bytes) {
    // Offload only between memory stores: the bytes move without a caller buffer.
    if (src.bs.drv !== memoryDriver) throw new BlockError('ENOTSUP', undefined, { node: bs.nodeName });
    const from = state(src.bs).store;
    const to = state(bs).store;
    const chunk = new Uint8Array(Math.min(bytes, 1 << 20));
    for (let done = 0; done < bytes; done += chunk.length) {
      const n = Math.min(chunk.length, bytes - done);
      from.read(srcOffset + done, chunk.subarray(0, n));
      to.write(dstOffset + done, chunk.subarray(0, n));
    }
    state(bs).stats.writes++;
  },

  async pwriteZeroes(bs, offset, bytes, flags) {
    const st = state(bs);
    st.store.zero(offset, bytes, (flags & REQ.MAY_UNMAP) !== 0);
    st.stats.zeroWrites++;
  },

  async pdiscard(bs, offset, bytes) {
    // Like punching a hole in a sparse file: the range reads as zero afterwards.
    const st = state(bs);
    // Discard never grows the store, unlike a zero write.
    const end = Math.min(offset + bytes, st.store.length);
    if (end > offset) st.store.zero(offset, end - offset, true);
    st.stats.discards++;
  },

  async blockStatus(bs, _wantZero, offset, bytes): Promise<BlockStatus> {
    const st = state(bs);
    const unit = Math.max(PAGE, st.align);
    const run = st.store.allocationRun(offset, bytes, unit);
    return {
      status: (run.allocated ? BLOCK.DATA : BLOCK.ZERO) | BLOCK.OFFSET_VALID,
      pnum: run.bytes,
      map: offset,
      file: bs,
    };
  },

  async flushToDisk(bs) {
    state(bs).stats.flushes++;
  },

  async truncate(bs, offset, _exact, prealloc) {
    const st = state(bs);
    checkProtocolPrealloc(st.store.length, offset, prealloc);
    st.store.resize(offset, prealloc === 'full' || prealloc === 'falloc');
    st.stats.truncates++;
  },

  async getLength(bs) {
    return state(bs).store.length;
  },

  getLengthSync(bs) {
    return state(bs).store.length;
  },

  async getAllocatedFileSize(bs) {
    return state(bs).store.allocatedBytes();
  },

  async getInfo() {
    return {};
  },

  hasZeroInit() {
    return true;
  },

  async reopenPrepare() {
    // Nothing depends on the read-only state: the generic layer enforces it.
  },

  async close(bs) {
    bs.opaque = undefined;
  },

  async create(filename: string, opts: CreateOptions, _ctx: CreateContext) {
    const name = nameFromFilename(filename);
    if (!name) throw new BlockError('EINVAL', 'A name is required to create a memory image (memory:NAME)');
    const rawSize = opts.size === undefined ? 0 : sizeOption({ size: opts.size }, 'size', 0);
    // file-posix rounds the size of a new file up to whole sectors; do the same so images match.
    const size = Math.ceil(rawSize / 512) * 512;
    const prealloc = enumOption({ preallocation: opts.preallocation }, 'preallocation', PREALLOC_CHOICES, 'off');
    checkProtocolPrealloc(0, size, prealloc);
    const store = memoryStore(name);
    store.resize(0);
    store.pages.clear();
    store.resize(size, prealloc !== 'off');
  },
};

function registerNew(name: string, size: number): MemoryStore {
  const s = new MemoryStore(name, size);
  registry.set(name, s);
  return s;
}
