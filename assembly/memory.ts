// Memory management for the JS side. The module is built with the stub
// runtime (a bump allocator that never collects), which suits the kernels
// themselves (they allocate nothing) but not the JS side: metadata caches and
// dirty bitmaps live in linear memory and come and go. So blocks up to 1 MiB
// are handed out in power-of-two size classes, and a freed block goes on its
// class's free list for the next allocation of that class; cache entries come
// in a handful of sizes, so classes are reused rather than fragmented. Larger
// blocks (big bitmaps, scratch) are whole MiBs, reused best-fit, so a 50 MB
// bitmap does not cost 64 MiB.
//
// Every block is 16-byte aligned (kernels use aligned v128 loads) and carries
// a 16-byte header holding its class, so free() needs only the pointer.

/** Smallest class: 16 bytes (2^4); largest: 1 MiB (2^20). Larger blocks are whole MiBs on one best-fit list. */
const MIN_CLASS: u32 = 4;
const MAX_CLASS: u32 = 20;
const LARGE_UNIT: usize = 1 << 20;
/** The stub runtime's limit for one block. */
const MAX_SIZE: usize = 1 << 30;
const HEADER: usize = 16;

/** Heads of the free lists, one per class plus the large list; a free block's first word links to the next. */
const FREE_HEADS: usize = memory.data(<i32>((MAX_CLASS + 2) * sizeof<usize>()), 16);
const LARGE_HEAD: usize = FREE_HEADS + (<usize>(MAX_CLASS + 1)) * sizeof<usize>();

/** Total bytes (headers included) obtained from the bump allocator, for memory reports. */
let reserved: usize = 0;

/** Class of a request of `size` bytes: the smallest c >= MIN_CLASS with 2^c >= size. */
// @ts-ignore: decorator
@inline
function classOf(size: usize): u32 {
  if (size <= (<usize>1 << MIN_CLASS)) return MIN_CLASS;
  return 32 - clz<u32>(<u32>(size - 1));
}

/** Takes a fresh block of `bytes` usable bytes from the bump allocator. */
function fresh(bytes: usize): usize {
  // The stub returns 16-byte aligned pointers, so the block after the header is too.
  const raw = heap.alloc(HEADER + bytes);
  reserved += HEADER + bytes;
  store<usize>(raw, bytes);
  return raw + HEADER;
}

/** Allocates `size` bytes (16-byte aligned) and returns the pointer, or 0 when the size is beyond 1 GiB; grows linear memory as needed. */
export function alloc(size: usize): usize {
  if (size > MAX_SIZE) return 0;
  const cls = classOf(size);
  if (cls <= MAX_CLASS) {
    const slot = FREE_HEADS + (<usize>cls) * sizeof<usize>();
    const head = load<usize>(slot);
    if (head != 0) {
      store<usize>(slot, load<usize>(head));
      return head;
    }
    return fresh(<usize>1 << cls);
  }
  const bytes = (size + LARGE_UNIT - 1) & ~(LARGE_UNIT - 1);
  // Best fit among free large blocks, but never more than twice the request.
  let prev: usize = LARGE_HEAD;
  let bestPrev: usize = 0;
  let bestSize: usize = 0;
  let cur = load<usize>(LARGE_HEAD);
  while (cur != 0) {
    const n = load<usize>(cur - HEADER);
    if (n >= bytes && n <= bytes << 1 && (bestSize == 0 || n < bestSize)) {
      bestPrev = prev;
      bestSize = n;
    }
    prev = cur;
    cur = load<usize>(cur);
  }
  if (bestSize != 0) {
    const block = load<usize>(bestPrev);
    store<usize>(bestPrev, load<usize>(block));
    return block;
  }
  return fresh(bytes);
}

/** Returns a block from `alloc` to its free list; 0 is ignored. The caller must not use it afterwards. */
export function free(ptr: usize): void {
  if (ptr == 0) return;
  const size = load<usize>(ptr - HEADER);
  const slot = size > (<usize>1 << MAX_CLASS) ? LARGE_HEAD : FREE_HEADS + (<usize>classOf(size)) * sizeof<usize>();
  store<usize>(ptr, load<usize>(slot));
  store<usize>(slot, ptr);
}

/** Usable size of a block from `alloc` (at least the size asked for). */
export function blockSize(ptr: usize): usize {
  return load<usize>(ptr - HEADER);
}

/** Bytes taken from linear memory by `alloc` so far (free blocks included): what the allocator holds, not what is in use. */
export function reservedBytes(): f64 {
  return <f64>reserved;
}
