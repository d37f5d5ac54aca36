// Host side of the qblock wasm module: instantiation over a memory we create,
// memory views that survive growth, named scratch blocks the JS side copies
// request data into, and a small results area kernels write their outputs to.
//
// The module imports its memory. Where SharedArrayBuffer exists (Node, and
// cross-origin isolated pages and workers) that memory is shared, for one
// reason: a shared memory's buffer is never detached when it grows (views
// made before keep working over the bytes they covered), whereas growing an
// ordinary memory detaches every view into it. Stable views are what let
// metadata caches and dirty bitmaps hand out long-lived Uint8Arrays into
// linear memory. The build emits an ordinary memory import; instantiate()
// flips its flags byte to "shared" (see withSharedMemory).

/** Raw exports of build/qblock.wasm (see assembly/index.ts). Pointers and lengths are u32 in wasm; bit positions are f64. */
export interface QblockExports {
  readonly memory: WebAssembly.Memory;
  alloc(size: number): number;
  free(ptr: number): void;
  blockSize(ptr: number): number;
  reservedBytes(): number;
  isZero(ptr: number, len: number): number;
  firstNonZero(ptr: number, len: number): number;
  firstZeroBlock(ptr: number, len: number, unit: number): number;
  firstDifference(a: number, b: number, len: number): number;
  firstEqualBlock(a: number, b: number, len: number, unit: number): number;
  swap16(ptr: number, count: number): void;
  swap32(ptr: number, count: number): void;
  swap64(ptr: number, count: number): void;
  decodeBe64(src: number, dst: number, count: number, maskHi: number, maskLo: number): number;
  encodeBe64(src: number, dst: number, count: number): void;
  findBe64InRange(ptr: number, count: number, maskHi: number, maskLo: number, lo: number, hi: number): number;
  l2Scan(entries: number, firstIndex: number, scIndex: number, nbClusters: number, geom: number, out: number): void;
  l2Runs(entries: number, firstIndex: number, scIndex: number, nbClusters: number, geom: number, out: number, maxRuns: number): number;
  rcGet(ptr: number, index: number, order: number): number;
  rcSet(ptr: number, index: number, order: number, value: number): void;
  rcAdd(ptr: number, index: number, order: number, addend: number, max: number): number;
  rcFindZero(ptr: number, from: number, to: number, order: number): number;
  rcFindNonZero(ptr: number, from: number, to: number, order: number): number;
  rcFindFreeRun(ptr: number, from: number, to: number, order: number, want: number, out: number): number;
  rcIncRange(ptr: number, start: number, count: number, order: number, max: number): number;
  rcCompare(a: number, b: number, start: number, count: number, order: number, out: number, maxOut: number): number;
  rcCountNonZero(ptr: number, start: number, count: number, order: number): number;
  hbSet(l0: number, l1: number, start: number, count: number): number;
  hbReset(l0: number, l1: number, start: number, count: number): number;
  hbGet(l0: number, bit: number): number;
  hbCount(l0: number, start: number, count: number): number;
  hbNextDirty(l0: number, l1: number, start: number, end: number): number;
  hbNextZero(l0: number, start: number, end: number): number;
  hbDirtyRuns(l0: number, l1: number, start: number, end: number, out: number, maxRuns: number): number;
  hbMerge(dstL0: number, dstL1: number, srcL0: number, srcL1: number, nwords: number): number;
  hbSerialize(l0: number, startBit: number, nbits: number, out: number): number;
  hbDeserialize(l0: number, l1: number, startBit: number, nbits: number, src: number): number;
  hbTableScan(l0: number, l1: number, nbits: number, chunkBits: number, out: number): number;
}

/** Scratch blocks are allocated in multiples of this many bytes so small growth does not reallocate each call. */
const SCRATCH_GRANULE = 64 * 1024;

/** Pages the memory starts with (the build's initialMemory) and may grow to (its maximumMemory: 2 GiB). */
const INITIAL_PAGES = 16;
const MAXIMUM_PAGES = 32768;

/** Bytes of the results area kernels write their outputs to (several 32-byte records). */
export const RESULTS_BYTES = 256;

interface ScratchBlock {
  ptr: number;
  size: number;
}

/** Reads an unsigned LEB128 at `pos`; returns the value and the position after it. */
function leb(b: Uint8Array, pos: number): [number, number] {
  let v = 0;
  let shift = 0;
  for (;;) {
    const byte = b[pos++]!;
    v += (byte & 0x7f) * 2 ** shift;
    if ((byte & 0x80) === 0) return [v, pos];
    shift += 7;
  }
}

/**
 * A copy of the module bytes whose memory import is declared shared: the
 * limits flags byte 0x01 (min and max) becomes 0x03 (shared, min and max).
 * Walks the import section as the binary format lays it out; returns null
 * when there is no memory import with a maximum to flip.
 */
export function withSharedMemory(module: Uint8Array): Uint8Array | null {
  let pos = 8; // magic and version
  while (pos < module.length) {
    const id = module[pos++]!;
    const [size, body] = leb(module, pos);
    if (id !== 2) {
      pos = body + size;
      continue;
    }
    let p = body;
    let count: number;
    [count, p] = leb(module, p);
    for (let i = 0; i < count; i++) {
      let len: number;
      [len, p] = leb(module, p);
      p += len; // module name
      [len, p] = leb(module, p);
      p += len; // field name
      const kind = module[p++]!;
      switch (kind) {
        case 0: // function: type index
          [, p] = leb(module, p);
          break;
        case 1: { // table: reference type, limits
          p++;
          const flags = module[p++]!;
          [, p] = leb(module, p);
          if (flags & 1) [, p] = leb(module, p);
          break;
        }
        case 2: { // memory: limits
          if (module[p] !== 0x01) return null;
          const out = module.slice();
          out[p] = 0x03;
          return out;
        }
        case 3: // global: value type, mutability
          p += 2;
          break;
        case 4: // tag: attribute, type index
          p++;
          [, p] = leb(module, p);
          break;
        default:
          return null;
      }
    }
    return null;
  }
  return null;
}

/** Decodes an AssemblyScript string (UTF-16, byte length stored at ptr - 4) from `memory`. */
function readAsString(memory: WebAssembly.Memory, ptr: number): string {
  if (ptr === 0) return '';
  const bytes = new Uint8Array(memory.buffer);
  const byteLen = new DataView(memory.buffer).getUint32(ptr - 4, true);
  // Copy out: TextDecoder-like consumers refuse views of shared memory.
  const units = new Uint16Array(bytes.slice(ptr, ptr + byteLen).buffer);
  let s = '';
  for (let i = 0; i < units.length; i += 4096) {
    s += String.fromCharCode(...units.subarray(i, i + 4096));
  }
  return s;
}

/** True when this engine lets us create SharedArrayBuffers (Node; cross-origin isolated browser contexts). */
export function sharedMemoryAvailable(): boolean {
  if (typeof SharedArrayBuffer === 'undefined') return false;
  const g = globalThis as { crossOriginIsolated?: boolean };
  return g.crossOriginIsolated !== false;
}

/** Options for WasmHost.instantiate. */
export interface WasmHostOptions {
  /** Use a shared memory (stable views); default: whenever the engine allows it. */
  shared?: boolean;
}

/** Owns one instance of the qblock wasm module, its memory, scratch blocks and results area. */
export class WasmHost {
  /** The module's exports; call kernels through these with pointers from `scratch`, `alloc` or `ptrOf`. */
  readonly exports: QblockExports;
  /** True when memory is shared, so views into it never detach and may be kept. */
  readonly shared: boolean;
  /** Pointer of the results area (RESULTS_BYTES, 16-byte aligned). */
  readonly results: number;
  private u8: Uint8Array;
  private res32: Int32Array;
  private resU32: Uint32Array;
  private res64: Float64Array;
  /** Every buffer the memory has had (shared memories get a new one per growth; old views stay valid). */
  private readonly buffers = new Set<ArrayBufferLike>();
  private readonly slots = new Map<string, ScratchBlock>();

  /** Wraps an instantiated module and the memory it imported; use `WasmHost.instantiate` to create one from bytes. */
  constructor(instance: WebAssembly.Instance, shared: boolean) {
    // A mutable copy, so tests can observe calls (the instance's exports object is frozen).
    this.exports = { ...(instance.exports as unknown as QblockExports) };
    this.shared = shared;
    this.u8 = new Uint8Array(this.exports.memory.buffer);
    this.buffers.add(this.u8.buffer);
    this.results = this.exports.alloc(RESULTS_BYTES) >>> 0;
    this.u8 = this.bytes();
    this.res32 = new Int32Array(this.u8.buffer, this.results, RESULTS_BYTES / 4);
    this.resU32 = new Uint32Array(this.u8.buffer, this.results, RESULTS_BYTES / 4);
    this.res64 = new Float64Array(this.u8.buffer, this.results, RESULTS_BYTES / 8);
  }

  /** Compiles and instantiates the module from its bytes over a new memory, providing the `env.abort` import. */
  static async instantiate(source: Uint8Array | ArrayBuffer, opts: WasmHostOptions = {}): Promise<WasmHost> {
    const bytes = source instanceof Uint8Array ? source : new Uint8Array(source);
    let shared = opts.shared ?? sharedMemoryAvailable();
    let moduleBytes: Uint8Array = bytes;
    if (shared) {
      const patched = withSharedMemory(bytes);
      if (patched) moduleBytes = patched;
      else shared = false;
    }
    const memory = new WebAssembly.Memory({ initial: INITIAL_PAGES, maximum: MAXIMUM_PAGES, shared });
    const imports = {
      env: {
        memory,
        abort(msg: number, file: number, line: number, col: number): never {
          throw new Error(`qblock wasm abort: ${readAsString(memory, msg)} at ${readAsString(memory, file)}:${line}:${col}`);
        },
      },
    };
    const { instance } = await WebAssembly.instantiate(moduleBytes as Uint8Array<ArrayBuffer>, imports);
    return new WasmHost(instance, shared);
  }

  /** A Uint8Array over all of linear memory, recreated if memory grew since the last call. */
  bytes(): Uint8Array {
    const buf = this.exports.memory.buffer;
    if (this.u8.buffer !== buf) {
      this.u8 = new Uint8Array(buf);
      this.buffers.add(buf);
    }
    return this.u8;
  }

  /** True when `buf` is a view into this module's linear memory (any of its buffers when shared), so kernels can use it without a copy. */
  contains(buf: ArrayBufferView): boolean {
    const b = buf.buffer;
    if (b === this.u8.buffer) return true;
    if (this.shared) return this.buffers.has(b);
    return b === this.exports.memory.buffer;
  }

  /** The results area as Int32, Uint32 and Float64 views (recreated after growth when memory is not shared). */
  res(): { i32: Int32Array; u32: Uint32Array; f64: Float64Array } {
    if (this.res32.length === 0) {
      const buf = this.bytes().buffer;
      this.res32 = new Int32Array(buf, this.results, RESULTS_BYTES / 4);
      this.resU32 = new Uint32Array(buf, this.results, RESULTS_BYTES / 4);
      this.res64 = new Float64Array(buf, this.results, RESULTS_BYTES / 8);
    }
    return { i32: this.res32, u32: this.resU32, f64: this.res64 };
  }

  /** Results area as Int32Array (the fast path of res()). */
  resI32(): Int32Array {
    if (this.res32.length === 0) this.res();
    return this.res32;
  }

  /** Results area as Float64Array (the fast path of res()). */
  resF64(): Float64Array {
    if (this.res64.length === 0) this.res();
    return this.res64;
  }

  /** Allocates `size` bytes of linear memory (16-byte aligned, contents undefined); throws when memory is exhausted. */
  alloc(size: number): number {
    const ptr = this.exports.alloc(size) >>> 0;
    if (ptr === 0) throw new RangeError(`qblock wasm: cannot allocate ${size} bytes`);
    this.bytes();
    return ptr;
  }

  /** Returns a block from `alloc` for reuse; the caller must drop every view of it first. */
  free(ptr: number): void {
    this.exports.free(ptr);
  }

  /** A view of `len` bytes at `ptr`, over the current buffer. */
  view(ptr: number, len: number): Uint8Array {
    return this.bytes().subarray(ptr, ptr + len);
  }

  /** Pointer of a block of at least `size` bytes reserved for `slot`; contents are undefined, and the block may move when it must grow. */
  scratch(slot: string, size: number): number {
    const cur = this.slots.get(slot);
    if (cur && cur.size >= size) return cur.ptr;
    const want = Math.max(SCRATCH_GRANULE, Math.ceil(size / SCRATCH_GRANULE) * SCRATCH_GRANULE);
    if (cur) this.exports.free(cur.ptr);
    const ptr = this.alloc(want);
    this.slots.set(slot, { ptr, size: want });
    return ptr;
  }

  /** Copies `src` into the scratch block of `slot` and returns its pointer. */
  copyIn(slot: string, src: Uint8Array): number {
    const ptr = this.scratch(slot, src.length);
    this.bytes().set(src, ptr);
    return ptr;
  }

  /** Bytes of linear memory (what the engine has committed to this module, at most). */
  memoryBytes(): number {
    return this.exports.memory.buffer.byteLength;
  }
}
