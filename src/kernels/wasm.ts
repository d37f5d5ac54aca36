// Host side of the qblock wasm module: instantiation, memory views that
// survive memory growth, and named scratch blocks the JS side copies
// request data into before calling a kernel.

/** Raw exports of build/qblock.wasm (see assembly/index.ts). Pointers and lengths are u32 in wasm. */
export interface QblockExports {
  readonly memory: WebAssembly.Memory;
  alloc(size: number): number;
  free(ptr: number): void;
  isZero(ptr: number, len: number): number;
  firstNonZero(ptr: number, len: number): number;
}

/** Scratch blocks are allocated in multiples of this many bytes so small growth does not reallocate each call. */
const SCRATCH_GRANULE = 64 * 1024;

interface ScratchBlock {
  ptr: number;
  size: number;
}

/** Decodes an AssemblyScript string (UTF-16, byte length stored at ptr - 4) from `memory`. */
function readAsString(memory: WebAssembly.Memory, ptr: number): string {
  if (ptr === 0) return '';
  const bytes = new Uint8Array(memory.buffer);
  const byteLen = new DataView(memory.buffer).getUint32(ptr - 4, true);
  const units = new Uint16Array(bytes.slice(ptr, ptr + byteLen).buffer);
  let s = '';
  for (let i = 0; i < units.length; i += 4096) {
    s += String.fromCharCode(...units.subarray(i, i + 4096));
  }
  return s;
}

/** Owns one instance of the qblock wasm module and its scratch memory. */
export class WasmHost {
  /** The module's exports; call kernels through these with pointers from `scratch` or `ptrOf`. */
  readonly exports: QblockExports;
  private u8: Uint8Array;
  private readonly slots = new Map<string, ScratchBlock>();

  /** Wraps an instantiated module; use `WasmHost.instantiate` to create one from bytes. */
  constructor(instance: WebAssembly.Instance) {
    this.exports = instance.exports as unknown as QblockExports;
    this.u8 = new Uint8Array(this.exports.memory.buffer);
  }

  /** Compiles and instantiates the module from its bytes, providing the `env.abort` import. */
  static async instantiate(source: BufferSource): Promise<WasmHost> {
    let memory: WebAssembly.Memory | undefined;
    const imports = {
      env: {
        abort(msg: number, file: number, line: number, col: number): never {
          const text = memory ? `${readAsString(memory, msg)} at ${readAsString(memory, file)}:${line}:${col}` : 'abort';
          throw new Error(`qblock wasm abort: ${text}`);
        },
      },
    };
    const { instance } = await WebAssembly.instantiate(source, imports);
    const host = new WasmHost(instance);
    memory = host.exports.memory;
    return host;
  }

  /** A Uint8Array over all of linear memory, recreated if memory grew since the last call. */
  bytes(): Uint8Array {
    if (this.u8.buffer !== this.exports.memory.buffer) {
      this.u8 = new Uint8Array(this.exports.memory.buffer);
    }
    return this.u8;
  }

  /** True when `buf` is a view into this module's current linear memory, so kernels can use it without a copy. */
  contains(buf: Uint8Array): boolean {
    return buf.buffer === this.exports.memory.buffer;
  }

  /** Pointer of a block of at least `size` bytes reserved for `slot`; contents are undefined, and the block may move when it must grow. */
  scratch(slot: string, size: number): number {
    const cur = this.slots.get(slot);
    if (cur && cur.size >= size) return cur.ptr;
    const want = Math.max(SCRATCH_GRANULE, Math.ceil(size / SCRATCH_GRANULE) * SCRATCH_GRANULE);
    if (cur) this.exports.free(cur.ptr);
    const ptr = this.exports.alloc(want) >>> 0;
    this.slots.set(slot, { ptr, size: want });
    // alloc may have grown memory, which detaches the old ArrayBuffer.
    this.bytes();
    return ptr;
  }

  /** Copies `src` into the scratch block of `slot` and returns its pointer. */
  copyIn(slot: string, src: Uint8Array): number {
    const ptr = this.scratch(slot, src.length);
    this.bytes().set(src, ptr);
    return ptr;
  }
}
