/**
 * qblock's engine entry: the block layer core and every driver that runs in
 * both Node and browsers. Node-only pieces (the `file` protocol, the file gate)
 * are in `qblock/node`; the UI-side API is in `qblock/client`, the worker host
 * in `qblock/worker`.
 */
export * from './core/errors.ts';
export * from './core/types.ts';
export type * from './core/driver.ts';
export { CHECK_FIX } from './core/driver.ts';
export * from './core/options.ts';
export { BlockNode, type TrackedRequest, type BeforeWriteHook, type BlockOp } from './core/node.ts';
export { BdrvChild, PermUpdate, defaultChildPerms, filterDefaultPerms, permNames, type ChildParent } from './core/child.ts';
export * from './core/io.ts';
export * from './core/graph.ts';
export * from './core/block-backend.ts';
export * from './core/accounting.ts';
export * from './core/clock.ts';
export * from './core/throttle.ts';
export * from './core/throttle-group.ts';
export { isZeroBuffer } from './core/zero.ts';
export { loadKernels, kernels, usingWasm } from './kernels/index.ts';
export { browserDrivers } from './drivers-browser.ts';
