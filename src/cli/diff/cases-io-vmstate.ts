/**
 * qemu-io VM state cases on qcow2 (`read -b` / `write -b`, QEMU's
 * bdrv_save_vmstate / bdrv_load_vmstate): the state lives past the end of
 * the disk, at the offset QEMU's qcow2_vm_state_offset gives.
 */
import type { DiffCase } from './harness.ts';

/** I/O rates and times differ from run to run. */
const SETUP = [
  'qemu-img create -q -f qcow2 $D/q.qcow2 1M',
  "qemu-io -c 'write -P 0x33 0 64k' $D/q.qcow2",
  'qemu-img create -q -f qcow2 -o cluster_size=4k,compat=0.10 $D/v2.qcow2 1M',
  'qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=32k $D/x.qcow2 1M',
  'qemu-img create -q -f qcow2 -b q.qcow2 -F qcow2 $D/top.qcow2',
  "qemu-io -c 'write -b -P 0x77 0 8k' $D/q.qcow2",
  'qemu-img snapshot -c withstate $D/q.qcow2',
];

function vm(image: string, cmds: string[], extra: Partial<DiffCase> = {}): DiffCase {
  return {
    setup: SETUP,
    cmd: `${cmds.map((c) => `-c '${c}'`).join(' ')} $D/${image}`,
    images: [image],
    after: [`qemu-img check $D/${image}`, `qemu-io -c 'read -b -P 0x5a 4096 512' $D/${image}`],
    ...extra,
  };
}

/** Every qemu-io VM state case. */
export const IO_VMSTATE_CASES: DiffCase[] = [
  vm('q.qcow2', ['read -b -P 0x77 0 8k', 'read -b -P 0 8k 512']),
  vm('q.qcow2', ['write -b -P 0x5a 4096 512', 'read -b -P 0x5a 4096 512', 'read -b -P 0x77 0 4k', 'read -P 0x33 0 64k']),
  vm('q.qcow2', ['write -b -P 0x5a 1M 64k', 'read -b -v 1M 512', 'read -b -P 0 2M 512']),
  vm('q.qcow2', ['read -b -q -P 1 0 512']),
  vm('v2.qcow2', ['write -b -P 0x5a 0 16k', 'read -b -P 0x5a 4096 512']),
  vm('x.qcow2', ['write -b -P 0x5a 512 4k', 'read -b -P 0x5a 512 4k', 'read -b -P 0 0 512']),
  vm('top.qcow2', ['read -b -P 0 0 512', 'write -b -P 0x5a 4096 512', 'read -b -P 0x5a 4096 512']),
  vm('q.qcow2', ['write -b -z 0 512']),
  vm('q.qcow2', ['write -b -c 0 512']),
  { setup: SETUP, cmd: "-r -c 'write -b 0 512' $D/q.qcow2", images: ['q.qcow2'] },
  { setup: SETUP, cmd: "-r -c 'read -b -P 0x77 0 512' $D/q.qcow2" },
];
