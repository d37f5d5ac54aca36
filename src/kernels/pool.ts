// Buffers in linear memory for metadata cache entries (L2 slices, refcount
// blocks), so the kernels work on them in place instead of copying them in.
//
// Only with a shared memory: its views survive growth, so a cache may keep a
// buffer as long as it likes. A block goes back to the allocator when the
// garbage collector has collected the buffer handed out for it, never
// earlier, so a buffer stays valid for as long as anyone holds it, exactly as
// a JS-heap buffer would. (A view derived from it with subarray() or a
// DataView does not keep it alive: hold the buffer itself.) Collection lags
// eviction, so blocks awaiting it count against a budget; past the budget
// the pool hands out ordinary JS buffers, which the kernels handle by copying.

import type { WasmHost } from './wasm.ts';

/** Default budget: bytes of linear memory handed out and not yet collected. */
export const DEFAULT_POOL_BUDGET = 64 * 1024 * 1024;

/** Counters for reports and tests. */
export interface PoolStats {
  /** Bytes handed out in linear memory and not yet collected. */
  outstanding: number;
  budget: number;
  /** Buffers handed out in linear memory, and as JS buffers because the budget was spent or memory is not shared. */
  inMemory: number;
  fallbacks: number;
}

/** Hands out zeroed buffers in linear memory, freeing each block once its buffer is garbage. */
export class LinearBufferPool {
  private outstanding = 0;
  private inMemory = 0;
  private fallbacks = 0;
  private readonly registry: FinalizationRegistry<number>;

  /** Serves from `host`'s memory up to `budget` outstanding bytes. */
  constructor(
    private readonly host: WasmHost,
    public budget = DEFAULT_POOL_BUDGET,
  ) {
    this.registry = new FinalizationRegistry<number>((ptr) => {
      this.outstanding -= this.host.exports.blockSize(ptr) >>> 0;
      this.host.free(ptr);
    });
  }

  /** A zeroed buffer of `size` bytes: in linear memory when it is shared and the budget allows, else on the JS heap. */
  allocate(size: number): Uint8Array {
    if (!this.host.shared || this.outstanding + size > this.budget) {
      this.fallbacks++;
      return new Uint8Array(size);
    }
    let ptr: number;
    try {
      ptr = this.host.alloc(size);
    } catch {
      // Linear memory is at its maximum: the JS heap still works.
      this.fallbacks++;
      return new Uint8Array(size);
    }
    const view = this.host.view(ptr, size);
    // Blocks may come back from a free list with a previous entry's bytes.
    view.fill(0);
    this.outstanding += this.host.exports.blockSize(ptr) >>> 0;
    this.inMemory++;
    this.registry.register(view, ptr);
    return view;
  }

  /** Current counters. */
  stats(): PoolStats {
    return { outstanding: this.outstanding, budget: this.budget, inMemory: this.inMemory, fallbacks: this.fallbacks };
  }
}
