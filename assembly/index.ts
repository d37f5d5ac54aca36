// Entry point of the qblock wasm module: a thin list of re-exports.
// Each kernel family lives in its own file under assembly/.

export { alloc, free } from "./memory";
export { isZero, firstNonZero } from "./zero";
