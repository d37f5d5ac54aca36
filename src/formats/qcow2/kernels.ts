/**
 * The qcow2 hot-path kernels behind one interface: the L2 scan that turns
 * L2 entries into extents, and refcount get/set over a refcount block. The
 * JS implementations are the references; a wasm build installs its own with
 * setQcow2Kernels and must agree with them on every input.
 */
import { l2Kernel, setL2Kernel, jsL2Kernel, type L2Kernel } from './cluster.ts';
import { refcountKernel, setRefcountKernel, jsRefcountKernel, type RefcountKernel } from './refcount.ts';

/** Every kernel the qcow2 driver calls on its hot paths. */
export interface Qcow2Kernels {
  l2: L2Kernel;
  refcount: RefcountKernel;
}

/** The JS reference kernels. */
export const jsQcow2Kernels: Qcow2Kernels = { l2: jsL2Kernel, refcount: jsRefcountKernel };

/** The kernels currently in use. */
export function qcow2Kernels(): Qcow2Kernels {
  return { l2: l2Kernel(), refcount: refcountKernel() };
}

/** Installs replacement kernels (any subset); pass jsQcow2Kernels to go back to the references. */
export function setQcow2Kernels(k: Partial<Qcow2Kernels>): void {
  if (k.l2) setL2Kernel(k.l2);
  if (k.refcount) setRefcountKernel(k.refcount);
}
