/**
 * Reference counts (QEMU's block/qcow2-refcount.c, read side). The refcount
 * table lives in memory; refcount blocks go through the metadata cache. The
 * per-entry get/set over a refcount block is the RefcountKernel, a pure
 * function of (block bytes, index, order) so a wasm kernel can replace it.
 *
 * Widths below one byte are packed least significant bits first within each
 * byte (qcow2.txt: "refcount_bits < 8 ... bit 0 is the first refcount"); 16,
 * 32 and 64-bit refcounts are big-endian.
 *
 * The write side (alloc.ts) sets entries through the kernel's set, grows the
 * table and searches free clusters with the kernel's findZero; RefcountState
 * keeps the table as raw on-disk bytes so single entries are written back in
 * place.
 */
import { BlockError } from '../../core/errors.ts';
import type { BdrvChild } from '../../core/child.ts';
import { bdrvPreadv } from '../../core/io.ts';
import type { MetadataCache } from './cache.ts';
import { hex } from './header.ts';

/** Hot-path refcount access over one refcount block. */
export interface RefcountKernel {
  /** Refcount at `index` of `block` for width 2^order bits (exact up to 2^53). */
  get(block: Uint8Array, index: number, order: number): number;
  /** Stores `value` (must fit the width) at `index` of `block`. */
  set(block: Uint8Array, index: number, order: number, value: number): void;
  /**
   * Index of the first entry in [from, to) whose refcount is 0, or -1 when
   * there is none (the free-cluster search of alloc_clusters_noref).
   */
  findZero(block: Uint8Array, from: number, to: number, order: number): number;
  /** Index of the first entry in [from, to) whose refcount is not 0, or `to` when all are 0. */
  findNonZero(block: Uint8Array, from: number, to: number, order: number): number;
  /** Number of entries in [start, start + count) whose refcount is not 0. */
  countNonZero(block: Uint8Array, start: number, count: number, order: number): number;
}

/** The JS reference implementation of RefcountKernel. */
export const jsRefcountKernel: RefcountKernel = {
  get(block, index, order) {
    switch (order) {
      case 0: return (block[index >>> 3]! >>> (index & 7)) & 1;
      case 1: return (block[index >>> 2]! >>> (2 * (index & 3))) & 3;
      case 2: return (block[index >>> 1]! >>> (4 * (index & 1))) & 15;
      case 3: return block[index]!;
      case 4: return (block[2 * index]! << 8) | block[2 * index + 1]!;
      case 5: {
        const o = 4 * index;
        return ((block[o]! << 24) >>> 0) + ((block[o + 1]! << 16) | (block[o + 2]! << 8) | block[o + 3]!);
      }
      case 6: {
        const o = 8 * index;
        const hi = ((block[o]! << 24) >>> 0) + ((block[o + 1]! << 16) | (block[o + 2]! << 8) | block[o + 3]!);
        const lo = ((block[o + 4]! << 24) >>> 0) + ((block[o + 5]! << 16) | (block[o + 6]! << 8) | block[o + 7]!);
        return hi * 0x100000000 + lo;
      }
      default:
        throw new BlockError('EINVAL', `Invalid refcount order ${order}`);
    }
  },
  set(block, index, order, value) {
    if (!Number.isInteger(value) || value < 0 || (order < 6 && value >= 2 ** (1 << order))) {
      throw new BlockError('ERANGE', `Refcount ${value} does not fit in ${1 << order} bits`);
    }
    switch (order) {
      case 0: case 1: case 2: {
        const bits = 1 << order;
        const perByte = 8 >>> order;
        const byte = Math.floor(index / perByte);
        const shift = bits * (index % perByte);
        const mask = ((1 << bits) - 1) << shift;
        block[byte] = (block[byte]! & ~mask) | (value << shift);
        return;
      }
      case 3: block[index] = value; return;
      case 4: block[2 * index] = value >>> 8; block[2 * index + 1] = value & 0xff; return;
      case 5: {
        const o = 4 * index;
        block[o] = value >>> 24; block[o + 1] = (value >>> 16) & 0xff; block[o + 2] = (value >>> 8) & 0xff; block[o + 3] = value & 0xff;
        return;
      }
      case 6: {
        const o = 8 * index;
        const hi = Math.floor(value / 0x100000000);
        const lo = value >>> 0;
        for (let i = 0; i < 4; i++) {
          block[o + i] = (hi >>> (24 - 8 * i)) & 0xff;
          block[o + 4 + i] = (lo >>> (24 - 8 * i)) & 0xff;
        }
        return;
      }
      default:
        throw new BlockError('EINVAL', `Invalid refcount order ${order}`);
    }
  },
  findZero(block, from, to, order) {
    for (let i = from; i < to; i++) {
      // Whole zero bytes are the common case in a sparse block; step over entries cheaply.
      if (jsRefcountKernel.get(block, i, order) === 0) return i;
    }
    return -1;
  },
  findNonZero(block, from, to, order) {
    if (order >= 3) {
      const bytes = 1 << (order - 3);
      let i = from;
      for (; i < to; i++) {
        const o = i * bytes;
        let nz = false;
        for (let b = 0; b < bytes; b++) if (block[o + b] !== 0) { nz = true; break; }
        if (nz) return i;
      }
      return to;
    }
    for (let i = from; i < to; i++) if (jsRefcountKernel.get(block, i, order) !== 0) return i;
    return to;
  },
  countNonZero(block, start, count, order) {
    let n = 0;
    for (let i = start; i < start + count; i++) if (jsRefcountKernel.get(block, i, order) !== 0) n++;
    return n;
  },
};

let kernel: RefcountKernel = jsRefcountKernel;

/** The refcount kernel in use. */
export function refcountKernel(): RefcountKernel {
  return kernel;
}

/** Installs a faster refcount kernel (wasm); it must agree with jsRefcountKernel. */
export function setRefcountKernel(k: RefcountKernel): void {
  kernel = k;
}

/** Reftable entry bits: the offset, and reserved bits 0-8 (REFT_OFFSET_MASK / REFT_RESERVED_MASK). */
const REFT_OFFSET_LO_MASK = 0xfffffe00;

/** In-memory refcount state of one image. */
export class RefcountState {
  /** Entries per refcount block (refcount_block_size). */
  readonly blockEntries: number;
  readonly blockBits: number;
  /** Highest maximum refcount for this width (refcount_max). */
  readonly max: number;

  constructor(
    readonly clusterBits: number,
    readonly order: number,
    /** Refcount table as on disk (big-endian 64-bit entries). */
    public table: Uint8Array,
    public tableOffset: number,
    public cache: MetadataCache,
    readonly file: BdrvChild,
  ) {
    this.blockBits = clusterBits - (order - 3);
    this.blockEntries = 2 ** this.blockBits;
    this.max = order === 6 ? Number.MAX_SAFE_INTEGER : 2 ** (1 << order) - 1;
  }

  /** Number of entries in the refcount table. */
  get tableSize(): number {
    return this.table.length / 8;
  }

  /** Stores refcount block offset `offset` in table entry `i` (in memory only). */
  setTableEntry(i: number, offset: number): void {
    const dv = new DataView(this.table.buffer, this.table.byteOffset, this.table.byteLength);
    dv.setUint32(8 * i, Math.floor(offset / 0x100000000));
    dv.setUint32(8 * i + 4, offset >>> 0);
    this.tableVersion++;
  }

  /** Bumped by setTableEntry; with the table's identity it keys usedTable's answer. */
  private tableVersion = 0;
  private used: { table: Uint8Array; version: number; bytes: number } | null = null;

  /**
   * The table up to its last non-zero entry. Tables are allocated with room to
   * grow, and the overlap check of every allocating write searches this part
   * only: the zero tail names no block.
   */
  usedTable(): Uint8Array {
    const t = this.table;
    const u = this.used;
    if (u && u.table === t && u.version === this.tableVersion) return t.subarray(0, u.bytes);
    let bytes = t.length - (t.length % 8);
    while (bytes > 0) {
      let zero = true;
      for (let k = bytes - 8; k < bytes; k++) {
        if (t[k] !== 0) {
          zero = false;
          break;
        }
      }
      if (!zero) break;
      bytes -= 8;
    }
    this.used = { table: t, version: this.tableVersion, bytes };
    return t.subarray(0, bytes);
  }

  /** Refcount block offset stored in table entry `i` (0 = none), with reserved bits masked off. */
  tableEntry(i: number): number {
    const o = 8 * i;
    const t = this.table;
    const hi = ((t[o]! << 24) >>> 0) + ((t[o + 1]! << 16) | (t[o + 2]! << 8) | t[o + 3]!);
    const lo = (((t[o + 4]! << 24) >>> 0) + ((t[o + 5]! << 16) | (t[o + 6]! << 8) | t[o + 7]!)) & REFT_OFFSET_LO_MASK;
    // Offsets at or past 2^53 cannot exist in a file we can address.
    if (hi >= 0x200000) return Number.POSITIVE_INFINITY;
    return hi * 0x100000000 + (lo >>> 0);
  }

  /**
   * Refcount of host cluster `clusterIndex` (QEMU's qcow2_get_refcount):
   * 0 past the table or for a missing block; EIO for a misaligned block offset.
   */
  async get(clusterIndex: number): Promise<number> {
    const tableIndex = Math.floor(clusterIndex / this.blockEntries);
    const block = await this.block(tableIndex);
    return block ? kernel.get(block, clusterIndex % this.blockEntries, this.order) : 0;
  }

  /** How many of the `count` clusters from the first one block `tableIndex` counts have a refcount other than 0 (one kernel call). */
  async countNonZero(tableIndex: number, count: number): Promise<number> {
    const block = await this.block(tableIndex);
    return block ? kernel.countNonZero(block, 0, Math.min(count, this.blockEntries), this.order) : 0;
  }

  /** Refcount block `tableIndex` through the cache, or null when the table has none there; EIO for a misaligned offset. */
  private async block(tableIndex: number): Promise<Uint8Array | null> {
    if (tableIndex >= this.tableSize) return null;
    const blockOffset = this.tableEntry(tableIndex);
    if (blockOffset === 0) return null;
    const clusterSize = 2 ** this.clusterBits;
    if (!Number.isFinite(blockOffset) || blockOffset % clusterSize !== 0) {
      throw new BlockError('EIO', `qcow2: Image is corrupt: Refblock offset ${Number.isFinite(blockOffset) ? hex(blockOffset) : 'beyond 2^53'} unaligned (reftable index: ${hex(tableIndex)})`);
    }
    return this.cache.get(blockOffset, (buf) => bdrvPreadv(this.file, blockOffset, buf.length, buf));
  }
}

/**
 * QEMU's qcow2_refcount_metadata_size: bytes of refcount blocks and table
 * needed to count `clusters` clusters plus themselves (a fixed point), and the
 * number of refcount blocks in it.
 */
export function refcountMetadataSize(clusters: number, clusterSize: number, refcountOrder: number, generousIncrease: boolean): { bytes: number; blocks: number; tableClusters: number } {
  const blocksPerTableCluster = clusterSize / 8;
  const refcountsPerBlock = (clusterSize * 8) / 2 ** refcountOrder;
  let table = 0;
  let blocks = 0;
  let last: number;
  let n = 0;
  do {
    last = n;
    blocks = Math.ceil((clusters + table + blocks) / refcountsPerBlock);
    table = Math.ceil(blocks / blocksPerTableCluster);
    n = clusters + blocks + table;
    if (n === last && generousIncrease) {
      clusters += Math.ceil(table / 2);
      n = 0;
      generousIncrease = false;
    }
  } while (n !== last);
  return { bytes: (blocks + table) * clusterSize, blocks, tableClusters: table };
}
