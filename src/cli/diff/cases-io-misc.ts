/**
 * More qemu-io differential cases: qcow2 write edge cases (compressed
 * writes over many clusters, zero writes on compat=0.10 images with and
 * without a backing file, failed allocating writes through blkdebug) and
 * error cases of the commands the main list covers thinly. Same conventions
 * as cases-io.ts.
 */
import type { DiffCase } from './harness.ts';

/** qcow2 images made by qemu-img: compat=0.10 ones (alone and over a backing file), and a 4 KiB-cluster one. */
const V2 = [
  'qemu-img create -q -f qcow2 -o compat=0.10 $D/b.qcow2 1M',
  "qemu-io -c 'write -P 9 0 1M' $D/b.qcow2",
  'qemu-img create -q -f qcow2 -o compat=0.10 $D/v2.qcow2 1M',
  "qemu-io -c 'write -P 1 0 128k' -c 'write -P 2 256k 64k' -c 'write -P 3 512k 64k' $D/v2.qcow2",
  'qemu-img create -q -f qcow2 -o compat=0.10 -b b.qcow2 -F qcow2 $D/v2b.qcow2 1M',
  "qemu-io -c 'write -P 1 0 128k' -c 'write -P 2 256k 64k' -c 'write -P 3 512k 64k' $D/v2b.qcow2",
  'qemu-img create -q -f qcow2 -o compat=0.10,cluster_size=4k -b b.qcow2 -F qcow2 $D/v2s.qcow2 1M',
  "qemu-io -c 'write -P 1 0 128k' -c 'write -P 3 512k 64k' $D/v2s.qcow2",
  'qemu-img create -q -f qcow2 -o cluster_size=4k $D/c4.qcow2 1M',
  'qemu-img create -q -f qcow2 $D/e.qcow2 64M',
];

/** qemu-io commands on one image; the image's map is compared with qemu-img afterwards (offsets included). */
function v2(image: string, cmds: string[]): DiffCase {
  return { setup: V2, cmd: `${cmds.map((c) => `-c '${c}'`).join(' ')} $D/${image}`, images: [image], after: [`qemu-img map --output=json $D/${image}`, `qemu-img check $D/${image}`] };
}

const ZERO_WRITES = [
  ['write -z 64k 64k', 'write -z 256k 64k'],
  ['write -z -u 512k 64k', 'write -z -u 0 64k'],
  ['write -z 4k 4k', 'write -z 60k 8k'],
  ['write -z 700k 64k', 'write -z -u 800k 4k', 'write -z -u 900k 100k'],
  ['write -z 0 1M', 'map'],
  ['write -z -u 0 1M', 'map'],
];

const RAW = ['qemu-img create -q -f raw $D/a.raw 1M'];

function io(cmd: string): DiffCase {
  return { setup: RAW, cmd, files: ['a.raw'] };
}

/** QEMU numbers automatic node names by an internal object counter that says nothing about the image. */
const NODE_NAMES = { re: /#block\d+/g, why: "QEMU's automatic node-name counter" };

/** qemu-io commands on the raw image. */
function on(cmds: string[]): DiffCase {
  return io(`-f raw ${cmds.map((c) => `-c '${c}'`).join(' ')} $D/a.raw`);
}

export const IO_MISC_CASES: DiffCase[] = [
  // --- thinly covered commands: sleep, abort, sigraise, close, flush, reopen, breakpoints
  on(['sleep 1', 'length']),
  on(['sleep 0', 'sleep 1k', 'length']),
  on(['sleep 1 2']),
  on(['sleep -5']),
  on(['sleep 0x10']),
  on(['sleep 1.5']),
  on(['sleep 99999999999999999999']),
  on(['sleep', 'length']),
  on(['sleep abc', 'length']),
  on(['sleep 1e3']),
  on(['write -q 0 512', 'abort']),
  on(['abort 1']),
  on(['abort x', 'length']),
  io('-c "abort" -c "length"'),
  on(['sigraise']),
  on(['sigraise 1 2']),
  on(['sigraise 0', 'length']),
  on(['sigraise -1', 'length']),
  on(['sigraise 1k', 'length']),
  // signals QEMU's main loop takes (or ignores) do not end it
  on(['sigraise 10', 'length']),
  on(['sigraise 7', 'length']),
  on(['sigraise 13', 'length']),
  on(['sigraise 14', 'length']),
  on(['sigraise 29', 'length']),
  on(['sigraise 2']),
  on(['sigraise 99999999999999999999', 'length']),
  on(['close', 'length', 'read 0 1', 'close']),
  on(['close x']),
  on(['close', 'open -o driver=raw $D/a.raw', 'length']),
  on(['close', 'flush']),
  on(['close', 'info']),
  on(['close', 'map']),
  on(['close', 'reopen -r']),
  on(['close', 'write 0 1']),
  on(['flush x']),
  on(['flush', 'flush', 'length']),
  on(['write -q 0 4k', 'flush', 'read -P 0xcd 0 4k']),
  on(['f']),
  on(['aio_write -q 0 4k', 'flush', 'aio_flush']),
  on(['reopen']),
  on(['reopen -r', 'writev 0 512', 'reopen -w', 'writev -q 0 512']),
  on(['reopen -r', 'discard 0 4k', 'truncate 2M', 'length']),
  on(['reopen -c none', 'read -q 0 512']),
  on(['reopen -c directsync', 'write -q 0 512']),
  on(['reopen -c unsafe', 'write -q 0 512', 'flush']),
  { ...on(['reopen -o read-only=on', 'write 0 1']), mask: [NODE_NAMES] },
  { ...io("-f raw -r -c 'reopen -o read-only=off' -c 'write -q 0 1' -c 'reopen -o read-only=on' $D/a.raw"), mask: [NODE_NAMES] },
  on(['reopen -o read-only=off', 'write -q 0 1']),
  on(['reopen -o read-only=x']),
  on(['reopen -r -o read-only=off']),
  on(['reopen -w -o read-only=on']),
  on(['reopen -a']),
  on(['reopen -o']),
  on(['reopen -c']),
  on(['wait_break']),
  on(['wait_break x y']),
  on(['remove_break']),
  on(['remove_break a b']),
  on(['resume a b']),
  on(['break']),
  on(['break write_aio']),

  // --- --object help and errors
  io('--object help -c quit'),
  io('--object ? -c quit'),
  io('--object secret,help -c quit'),
  io('--object authz-simple,help -c quit'),
  io('--object bogus,help -c quit'),
  io("--object '' -c quit"),
  io('--object qom-type=help -c quit'),
  io('--image-opts -c quit $D/a.raw'),
  io('--image-opts -c quit driver=raw,foo,file.filename=$D/a.raw'),


  // --- compat=0.10 zero writes: no zero flag, so QEMU discards or writes zeroes; the allocation map must match
  ...ZERO_WRITES.map((c) => v2('v2.qcow2', c)),
  ...ZERO_WRITES.map((c) => v2('v2b.qcow2', c)),
  ...ZERO_WRITES.map((c) => v2('v2s.qcow2', c)),

  // --- compressed writes longer than a cluster are split into clusters (only the last cluster of the image may be short)
  { setup: V2, cmd: "-c 'write -c -P 2 256k 64k' -c 'read -P 2 256k 64k' -c map $D/c4.qcow2", images: ['c4.qcow2'], after: ['qemu-img check $D/c4.qcow2'] },
  { setup: V2, cmd: "-c 'write -c 8k 6k' -c 'write -c 6k 4k' -c 'write -c 1020k 4k' -c map $D/c4.qcow2", images: ['c4.qcow2'] },
  { setup: V2, cmd: "-c 'write -c 0 4k' -c 'write -c 0 8k' $D/c4.qcow2", images: ['c4.qcow2'] },

  // --- discard goes through the L2 table even where there is none yet (QEMU allocates it)
  { setup: V2, cmd: "-c 'discard 0 1M' $D/c4.qcow2", images: ['c4.qcow2'], after: ['qemu-img check $D/c4.qcow2'] },
  { setup: V2, cmd: "-c 'discard 0 64k' -c 'write -P 1 64k 64k' $D/e.qcow2", images: ['e.qcow2'], after: ['qemu-img check $D/e.qcow2', 'qemu-img map --output=json $D/e.qcow2'] },

  // --- a failed allocating write gives its clusters back: no leaks, and the next write reuses them
  {
    setup: V2,
    cmd: "--image-opts -c 'write -P 1 0 16M' -c 'write -P 2 0 64k' driver=qcow2,file.driver=blkdebug,file.image.filename=$D/e.qcow2,file.inject-error.0.event=write_aio,file.inject-error.0.errno=28,file.inject-error.0.once=on",
    images: ['e.qcow2'],
    after: ['qemu-img check $D/e.qcow2', 'qemu-img map --output=json $D/e.qcow2'],
  },
  {
    setup: V2,
    cmd: "--image-opts -c 'write -P 1 4k 1M' -c 'write -P 2 8k 4k' driver=qcow2,file.driver=blkdebug,file.image.filename=$D/e.qcow2,file.inject-error.0.event=write_aio,file.inject-error.0.errno=5,file.inject-error.0.once=on",
    images: ['e.qcow2'],
    after: ['qemu-img check $D/e.qcow2', 'qemu-img map --output=json $D/e.qcow2'],
  },
];
