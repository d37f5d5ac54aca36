// Entry point of the qblock wasm module: a thin list of re-exports.
// Each kernel family lives in its own file under assembly/; the JS side's view
// of these exports is QblockExports in src/kernels/wasm.ts.

export { alloc, free, blockSize, reservedBytes } from "./memory";
export { isZero, firstNonZero, firstZeroBlock } from "./zero";
export { firstDifference, firstEqualBlock } from "./compare";
export { swap16, swap32, swap64, decodeBe64, encodeBe64, findBe64InRange } from "./byteorder";
export { l2Scan, l2Runs } from "./l2";
export { rcGet, rcSet, rcAdd, rcFindZero, rcFindNonZero, rcFindFreeRun, rcIncRange, rcCompare, rcCountNonZero } from "./refcount";
export {
  hbSet,
  hbReset,
  hbGet,
  hbCount,
  hbNextDirty,
  hbNextZero,
  hbDirtyRuns,
  hbMerge,
  hbSerialize,
  hbDeserialize,
  hbTableScan,
} from "./hbitmap";
