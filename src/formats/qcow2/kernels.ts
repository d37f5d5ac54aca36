/**
 * The qcow2 hot-path kernels behind one interface: the L2 scan that turns
 * L2 entries into extents, and refcount get/set over a refcount block. The
 * JS implementations are the references; a wasm build installs its own with
 * setQcow2Kernels and must agree with them on every input.
 */
import { l2Kernel, setL2Kernel, jsL2Kernel, type L2Kernel } from './cluster.ts';
import { refcountKernel, setRefcountKernel, jsRefcountKernel, type RefcountKernel } from './refcount.ts';

/** The search of a big-endian u64 table (L1, refcount table) the metadata overlap check runs on every allocating write. */
export interface TableSearch {
  /**
   * Index of the first u64 entry of `table` whose value ANDed with
   * maskHi:maskLo lies in [lo, hi), or -1; values at or past 2^53 never match.
   */
  findInRange(table: Uint8Array, maskHi: number, maskLo: number, lo: number, hi: number): number;
}

/** The JS reference TableSearch. */
export const jsTableSearch: TableSearch = {
  findInRange(table, maskHi, maskLo, lo, hi) {
    const count = Math.floor(table.length / 8);
    for (let i = 0; i < count; i++) {
      const o = 8 * i;
      const h = (((table[o]! << 24) | (table[o + 1]! << 16) | (table[o + 2]! << 8) | table[o + 3]!) & maskHi) >>> 0;
      if (h >= 0x200000) continue;
      const l = (((table[o + 4]! << 24) | (table[o + 5]! << 16) | (table[o + 6]! << 8) | table[o + 7]!) & maskLo) >>> 0;
      const v = h * 0x100000000 + l;
      if (v >= lo && v < hi) return i;
    }
    return -1;
  },
};

let tableSearch: TableSearch = jsTableSearch;

/** The table search in use. */
export function tableSearchKernel(): TableSearch {
  return tableSearch;
}

/** Every kernel the qcow2 driver calls on its hot paths. */
export interface Qcow2Kernels {
  l2: L2Kernel;
  refcount: RefcountKernel;
  tables: TableSearch;
}

/** The JS reference kernels. */
export const jsQcow2Kernels: Qcow2Kernels = { l2: jsL2Kernel, refcount: jsRefcountKernel, tables: jsTableSearch };

/** The kernels currently in use. */
export function qcow2Kernels(): Qcow2Kernels {
  return { l2: l2Kernel(), refcount: refcountKernel(), tables: tableSearch };
}

/** Installs replacement kernels (any subset); pass jsQcow2Kernels to go back to the references. */
export function setQcow2Kernels(k: Partial<Qcow2Kernels>): void {
  if (k.l2) setL2Kernel(k.l2);
  if (k.refcount) setRefcountKernel(k.refcount);
  if (k.tables) tableSearch = k.tables;
}
