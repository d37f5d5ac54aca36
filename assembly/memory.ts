// Scratch memory for the JS side. The module is built with the stub runtime
// (a bump allocator that never collects), so the JS loader keeps one scratch
// block per purpose and replaces it only when it must grow. Blocks are
// 16-byte aligned so kernels can use aligned v128 loads on them.

/** Allocates `size` bytes (16-byte aligned) and returns the pointer; grows linear memory as needed. */
export function alloc(size: usize): usize {
  return heap.alloc(size);
}

/** Frees a block returned by `alloc`; the stub runtime reclaims only the most recently allocated block. */
export function free(ptr: usize): void {
  heap.free(ptr);
}
