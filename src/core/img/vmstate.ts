/**
 * VM state access (QEMU's bdrv_co_writev_vmstate / readv_vmstate): the
 * driver that stores VM state (qcow2 keeps it past the end of the disk) or,
 * failing that, the node's primary child; ENOTSUP when nothing below can.
 */
import { BlockError } from '../errors.ts';
import type { BlockNode } from '../node.ts';

/** Writes `buf` at `pos` of the VM state area of `bs`. */
export async function saveVmstate(bs: BlockNode, buf: Uint8Array, pos: number): Promise<void> {
  for (let n: BlockNode | undefined = bs; n; n = n.primaryChild?.bs) {
    if (n.drv.saveVmstate) return n.drv.saveVmstate(n, buf, pos);
  }
  throw new BlockError('ENOTSUP', undefined, { node: bs.nodeName });
}

/** Reads `buf.length` bytes at `pos` of the VM state area of `bs`. */
export async function loadVmstate(bs: BlockNode, buf: Uint8Array, pos: number): Promise<void> {
  for (let n: BlockNode | undefined = bs; n; n = n.primaryChild?.bs) {
    if (n.drv.loadVmstate) return n.drv.loadVmstate(n, buf, pos);
  }
  throw new BlockError('ENOTSUP', undefined, { node: bs.nodeName });
}
