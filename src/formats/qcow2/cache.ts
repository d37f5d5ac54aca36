/**
 * Bounded metadata cache for L2 table slices and refcount blocks (QEMU's
 * block/qcow2-cache.c), plus the cache-size option rules of
 * read_cache_sizes(). Entries are keyed by their host offset; the least
 * recently used clean entry is evicted first. Entries can be marked dirty for
 * the write path, which then owns flushing them in dependency order; a dirty
 * entry is never dropped silently.
 */
import { BlockError } from '../../core/errors.ts';
import type { OptionSpec } from '../../core/options.ts';
import { parseOptionValue } from '../../core/options.ts';

/** QEMU's defaults on Linux (qcow2.h): 32 MiB of L2 cache at most, clean unused entries every 600 s. */
export const DEFAULT_L2_CACHE_MAX_SIZE = 32 * 1024 * 1024;
export const DEFAULT_CACHE_CLEAN_INTERVAL = 600;
/** Minimum entries: two L2 slices (copy-on-write needs both), four refcount blocks (reftable growth). */
export const MIN_L2_CACHE_SIZE = 2;
export const MIN_REFCOUNT_CACHE_SIZE = 4;

/** The entries by offset, counting every change so a memoised lookup knows when it went stale. */
class EntryMap extends Map<number, Entry> {
  version = 0;

  override set(offset: number, e: Entry): this {
    this.version++;
    return super.set(offset, e);
  }

  override delete(offset: number): boolean {
    this.version++;
    return super.delete(offset);
  }

  override clear(): void {
    this.version++;
    super.clear();
  }
}

interface Entry {
  buf: Uint8Array;
  dirty: boolean;
  /** Bumped by every markDirty, so a flush racing a change does not mark the changed entry clean. */
  gen: number;
  /** Set on every hit; cleared by cleanUnused so untouched entries can be dropped. */
  used: boolean;
  /** Readers holding the entry; a referenced entry is never evicted. */
  refs: number;
  /** The cache's use counter at the last hit or insertion: the smallest is the least recently used. */
  lastUse: number;
}

/**
 * Makes the buffer of an entry loaded from storage. The wasm kernels install
 * one that places entries in linear memory so they work on them in place
 * (src/kernels/pool.ts); a buffer stays valid for as long as it is referenced.
 */
export type CacheBufferAllocator = (size: number) => Uint8Array;

let allocateEntry: CacheBufferAllocator = (size) => new Uint8Array(size);

/** Installs the allocator for entry buffers loaded from now on (loadKernels does). */
export function setCacheBufferAllocator(a: CacheBufferAllocator): void {
  allocateEntry = a;
}

/** Writes a dirty entry back; supplied by the write path. */
export type CacheWriter = (offset: number, buf: Uint8Array) => Promise<void>;

/** An LRU of fixed-size metadata buffers keyed by host offset. */
export class MetadataCache {
  private readonly entries = new EntryMap();
  /** The entry the last lookup found, valid while entries.version is memoVersion: runs of hits on one slice skip the Map. */
  private memoOffset = -1;
  private memoEntry: Entry | undefined = undefined;
  private memoVersion = -1;
  /** Use counter: a hit stamps the entry with the next value (QEMU's lru_counter), cheaper than reordering on every hit. */
  private useCounter = 0;
  private readonly loading = new Map<number, Promise<Uint8Array>>();
  /** Loads from storage (counts only; for tests and stats). */
  misses = 0;
  hits = 0;
  /**
   * Called when every entry is dirty or pinned and one must go: the write
   * path writes dirty entries back in dependency order here (QEMU's
   * qcow2_cache_do_get flushing the cache), after which clean entries can be
   * evicted. Not called again while it runs.
   */
  onFull: (() => Promise<void>) | undefined = undefined;
  private flushingForRoom = false;

  constructor(
    /** 'l2' or 'refcount', for messages. */
    readonly name: string,
    /** Capacity in entries (at least 1). */
    public maxEntries: number,
    /** Bytes per entry. */
    readonly entrySize: number,
  ) {
    if (maxEntries < 1) throw new BlockError('EINVAL', `${name} cache needs at least one entry`);
  }

  /** Number of cached entries. */
  get size(): number {
    return this.entries.size;
  }

  /**
   * Returns the entry at `offset`, loading it with `load` (which fills the
   * given buffer) on a miss. Concurrent misses on one offset share one load.
   * The buffer stays valid until the entry is evicted; callers that keep it
   * across awaits should use acquire/release.
   */
  async get(offset: number, load: (buf: Uint8Array) => Promise<void>): Promise<Uint8Array> {
    const e = this.entries.get(offset);
    if (e) {
      this.hits++;
      this.touch(offset, e);
      return e.buf;
    }
    const pending = this.loading.get(offset);
    if (pending) return pending;
    const p = (async () => {
      this.misses++;
      const buf = allocateEntry(this.entrySize);
      await load(buf);
      // With every entry dirty or pinned and nobody able to write them back now, the buffer is
      // handed out without being cached: a read must not fail for want of cache room.
      if (!(await this.makeRoom(true))) return buf;
      this.entries.set(offset, { buf, dirty: false, used: true, refs: 0, gen: 0, lastUse: ++this.useCounter });
      return buf;
    })();
    this.loading.set(offset, p);
    try {
      return await p;
    } finally {
      this.loading.delete(offset);
    }
  }

  /** The cached buffer at `offset`, counted as a use (the synchronous hit path of get), or undefined. */
  lookup(offset: number): Uint8Array | undefined {
    let e: Entry | undefined;
    if (offset === this.memoOffset && this.memoVersion === this.entries.version) {
      e = this.memoEntry!;
    } else {
      e = this.entries.get(offset);
      if (!e) return undefined;
      this.memoOffset = offset;
      this.memoEntry = e;
      this.memoVersion = this.entries.version;
    }
    this.hits++;
    this.touch(offset, e);
    return e.buf;
  }

  /** The cached buffer at `offset` without loading, or undefined. */
  peek(offset: number): Uint8Array | undefined {
    return this.entries.get(offset)?.buf;
  }

  /** Inserts a buffer for `offset` (a freshly allocated table), replacing any cached one; marks it dirty when asked. */
  async put(offset: number, buf: Uint8Array, dirty: boolean): Promise<void> {
    if (buf.length !== this.entrySize) throw new BlockError('EINVAL', `${this.name} cache entry must be ${this.entrySize} bytes`);
    if (!this.entries.has(offset)) await this.makeRoom(false);
    this.entries.set(offset, { buf, dirty, used: true, refs: 0, gen: 0, lastUse: ++this.useCounter });
  }

  /** Pins an entry so eviction skips it (QEMU's qcow2_cache_get reference). */
  acquire(offset: number): void {
    const e = this.entries.get(offset);
    if (e) e.refs++;
  }

  /** Drops a pin taken with acquire (QEMU's qcow2_cache_put). */
  release(offset: number): void {
    const e = this.entries.get(offset);
    if (e && e.refs > 0) e.refs--;
  }

  /** Whether any entry waits to be written back. */
  get hasDirty(): boolean {
    for (const e of this.entries.values()) if (e.dirty) return true;
    return false;
  }

  /** Forgets every entry, dirty ones included (after a failed image or when the state is rebuilt). */
  clear(): void {
    this.entries.clear();
  }

  /** Marks a cached entry as modified; flush() writes it back. */
  markDirty(offset: number): void {
    const e = this.entries.get(offset);
    if (!e) throw new BlockError('EIO', `${this.name} cache: marking an uncached entry dirty`);
    e.dirty = true;
    e.gen++;
  }

  /** Offsets of dirty entries, oldest use first. */
  dirtyOffsets(): number[] {
    const out: [number, number][] = [];
    for (const [off, e] of this.entries) if (e.dirty) out.push([e.lastUse, off]);
    return out.sort((a, b) => a[0] - b[0]).map((x) => x[1]);
  }

  /** Writes every dirty entry with `write` (in offset order) and marks it clean; stops at the first error. */
  async flush(write: CacheWriter): Promise<void> {
    const dirty = this.dirtyOffsets().sort((a, b) => a - b);
    for (const off of dirty) {
      const e = this.entries.get(off);
      if (!e || !e.dirty) continue;
      const gen = e.gen;
      await write(off, e.buf);
      // Changed while being written: it stays dirty for the next flush.
      if (e.gen === gen) e.dirty = false;
    }
  }

  /** Drops clean, unpinned entries not used since the previous call (QEMU's qcow2_cache_clean_unused). */
  cleanUnused(): void {
    for (const [off, e] of this.entries) {
      if (!e.used && !e.dirty && e.refs === 0) this.entries.delete(off);
      else e.used = false;
    }
  }

  /** Forgets every clean entry; throws EBUSY if dirty ones remain (flush them first). */
  invalidate(): void {
    for (const [off, e] of this.entries) {
      if (e.dirty) throw new BlockError('EBUSY', `${this.name} cache has unwritten entries`);
      this.entries.delete(off);
    }
  }

  /** Drops one entry (after its cluster was freed); a dirty entry is discarded too, as QEMU's qcow2_cache_discard does. */
  discard(offset: number): void {
    this.entries.delete(offset);
  }

  /** Drops every entry whose offset lies in [offset, offset+length) (the slices of a freed cluster). */
  discardRange(offset: number, length: number): void {
    // Entries sit at multiples of the entry size inside the range, so probing those is enough.
    for (let off = offset; off < offset + length; off += this.entrySize) this.entries.delete(off);
  }

  private touch(_offset: number, e: Entry): void {
    e.used = true;
    e.lastUse = ++this.useCounter;
  }

  /** Whether a new entry would need a writeback first (every entry dirty or pinned). */
  get fullOfUnevictable(): boolean {
    if (this.entries.size < this.maxEntries) return false;
    for (const e of this.entries.values()) if (!e.dirty && e.refs === 0) return false;
    return true;
  }

  /**
   * Evicts the oldest clean, unpinned entry when full. Dirty entries need the
   * write path: with `soft` the answer is false when none could be freed,
   * otherwise that is an error (dirty entries are never lost).
   */
  private async makeRoom(soft: boolean): Promise<boolean> {
    let flushed = false;
    while (this.entries.size >= this.maxEntries) {
      // The least recently used clean, unpinned entry (a scan per eviction, as QEMU's qcow2_cache_do_get does).
      let victim: number | undefined;
      let oldest = Infinity;
      for (const [off, e] of this.entries) {
        if (!e.dirty && e.refs === 0 && e.lastUse < oldest) { victim = off; oldest = e.lastUse; }
      }
      if (victim === undefined) {
        if (this.onFull && !flushed && !this.flushingForRoom && this.hasDirty) {
          flushed = true;
          this.flushingForRoom = true;
          try {
            await this.onFull();
          } finally {
            this.flushingForRoom = false;
          }
          continue;
        }
        if (soft) return false;
        throw new BlockError('ENOSPC', `${this.name} cache is full of pinned or dirty entries`);
      }
      this.entries.delete(victim);
    }
    return true;
  }
}

/** Runtime options that size the caches, with QEMU's names. */
export const CACHE_OPTIONS: readonly OptionSpec[] = [
  { name: 'cache-size', type: 'size', help: 'Maximum combined metadata (L2 tables and refcount blocks) cache size' },
  { name: 'l2-cache-size', type: 'size', help: 'Maximum L2 table cache size' },
  { name: 'l2-cache-entry-size', type: 'size', help: 'Size of each entry in the L2 cache' },
  { name: 'refcount-cache-size', type: 'size', help: 'Maximum refcount block cache size' },
  { name: 'cache-clean-interval', type: 'number', help: 'Clean unused cache entries after this time (in seconds)' },
];

/** Resolved cache geometry. */
export interface CacheSizes {
  /** L2 cache capacity in entries. */
  l2Entries: number;
  /** Bytes per L2 cache entry (one slice). */
  l2EntrySize: number;
  /** Refcount cache capacity in entries (each one cluster). */
  refcountEntries: number;
  /** Seconds between cleanings; 0 disables. */
  cleanInterval: number;
}

function optSize(opts: Record<string, unknown>, name: string): number | undefined {
  const v = opts[name];
  if (v === undefined) return undefined;
  const spec = CACHE_OPTIONS.find((o) => o.name === name)!;
  const parsed = parseOptionValue(spec, v as string | number | boolean);
  if (typeof parsed !== 'number' || !Number.isFinite(parsed) || parsed < 0) {
    throw new BlockError('EINVAL', `Parameter '${name}' expects a non-negative number below 2^64`);
  }
  return parsed;
}

/**
 * QEMU's read_cache_sizes() and the clamping in qcow2_update_options_prepare():
 * the L2 cache defaults to covering the whole disk up to 32 MiB, cache-size
 * splits between L2 and refcount caches, entries shrink to 4 KiB when the
 * cache cannot cover the disk, and both caches get their minimum entry count.
 */
export function computeCacheSizes(opts: Record<string, unknown>, clusterSize: number, virtualSize: number, l2EntryBytes: number): CacheSizes {
  const combined = optSize(opts, 'cache-size');
  const l2Set = optSize(opts, 'l2-cache-size');
  const rcSet = optSize(opts, 'refcount-cache-size');
  const entrySet = optSize(opts, 'l2-cache-entry-size');
  const minRefcountCache = MIN_REFCOUNT_CACHE_SIZE * clusterSize;
  const maxL2Entries = Math.ceil(virtualSize / clusterSize);
  // An L2 table is one cluster, so the most useful cache is a whole number of clusters.
  const maxL2Cache = Math.ceil((maxL2Entries * l2EntryBytes) / clusterSize) * clusterSize;
  let l2CacheSize = Math.min(maxL2Cache, l2Set ?? DEFAULT_L2_CACHE_MAX_SIZE);
  let refcountCacheSize = rcSet ?? 0;
  let l2EntrySize = entrySet ?? clusterSize;

  if (combined !== undefined) {
    if (l2Set !== undefined && rcSet !== undefined) {
      throw new BlockError('EINVAL', 'cache-size, l2-cache-size and refcount-cache-size may not be set at the same time');
    } else if (l2Set !== undefined && l2Set > combined) {
      throw new BlockError('EINVAL', 'l2-cache-size may not exceed cache-size');
    } else if (refcountCacheSize > combined) {
      throw new BlockError('EINVAL', 'refcount-cache-size may not exceed cache-size');
    }
    if (l2Set !== undefined) {
      refcountCacheSize = combined - l2CacheSize;
    } else if (rcSet !== undefined) {
      l2CacheSize = combined - refcountCacheSize;
    } else if (combined >= maxL2Cache + minRefcountCache) {
      l2CacheSize = maxL2Cache;
      refcountCacheSize = combined - l2CacheSize;
    } else {
      refcountCacheSize = Math.min(combined, minRefcountCache);
      l2CacheSize = combined - refcountCacheSize;
    }
  }
  // Smaller entries make loads and evictions cheaper when the cache cannot hold the whole table anyway.
  if (l2CacheSize < maxL2Cache && entrySet === undefined) l2EntrySize = Math.min(clusterSize, 4096);
  if (l2EntrySize < 512 || l2EntrySize > clusterSize || (l2EntrySize & (l2EntrySize - 1)) !== 0) {
    throw new BlockError('EINVAL', `L2 cache entry size must be a power of two between 512 and the cluster size (${clusterSize})`);
  }
  let l2Entries = Math.floor(l2CacheSize / l2EntrySize);
  if (l2Entries < MIN_L2_CACHE_SIZE) l2Entries = MIN_L2_CACHE_SIZE;
  if (l2Entries > 0x7fffffff) throw new BlockError('EINVAL', 'L2 cache size too big');
  let refcountEntries = Math.floor(refcountCacheSize / clusterSize);
  if (refcountEntries < MIN_REFCOUNT_CACHE_SIZE) refcountEntries = MIN_REFCOUNT_CACHE_SIZE;
  if (refcountEntries > 0x7fffffff) throw new BlockError('EINVAL', 'Refcount cache size too big');

  let cleanInterval = DEFAULT_CACHE_CLEAN_INTERVAL;
  if (opts['cache-clean-interval'] !== undefined) {
    const v = parseOptionValue(CACHE_OPTIONS[4]!, opts['cache-clean-interval'] as string | number | boolean);
    if (typeof v !== 'number' || !Number.isInteger(v) || v < 0) {
      throw new BlockError('EINVAL', "Parameter 'cache-clean-interval' expects a number");
    }
    if (v > 0xffffffff) throw new BlockError('EINVAL', 'Cache clean interval too big');
    cleanInterval = v;
  }
  return { l2Entries, l2EntrySize, refcountEntries, cleanInterval };
}
