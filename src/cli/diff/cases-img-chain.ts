/**
 * qemu-img differential cases for backing chains and qcow2 metadata changes:
 * rebase (safe and unsafe) and commit without -d on qcow2 overlays, amend
 * with every qcow2 option and its errors, create with combinations of qcow2
 * options, and the `-o help` lists. Inputs are made by the real tools; the
 * resulting images are compared with `qemu-img compare` (ours must also pass
 * `qemu-img check`), and `qemu-img info` after the run shows the header
 * fields the command changed.
 */
import type { DiffCase } from './harness.ts';

/** `disk size` depends on where each engine places clusters, which may legitimately differ. */
const DISK_SIZE = { re: /^disk size: .*$/gm, why: 'cluster placement may differ between engines' };

/** A qcow2 chain base.qcow2 ← mid.qcow2 ← top.qcow2 with data in every layer, zero clusters hiding data, and a different other.qcow2. */
const QCHAIN = [
  'qemu-img create -q -f qcow2 $D/base.qcow2 1M',
  "qemu-io -c 'write -P 0x11 0 1M' $D/base.qcow2",
  'qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 $D/mid.qcow2',
  "qemu-io -c 'write -P 0x22 128k 128k' -c 'write -z 512k 64k' $D/mid.qcow2",
  'qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 $D/top.qcow2',
  "qemu-io -c 'write -P 0x33 64k 64k' -c 'write -z 256k 64k' -c 'write -P 0x34 900k 4k' $D/top.qcow2",
  'qemu-img create -q -f qcow2 $D/other.qcow2 1M',
  "qemu-io -c 'write -P 0x11 0 512k' -c 'write -P 0x44 768k 64k' $D/other.qcow2",
];

/** A qcow2 overlay on a fully allocated raw base, and another raw file. */
const RCHAIN = [
  'qemu-img create -q -f raw -o preallocation=full $D/base.raw 1M',
  "qemu-io -f raw -c 'write -P 0x55 0 1M' $D/base.raw",
  'qemu-img create -q -f raw -o preallocation=full $D/other.raw 1M',
  "qemu-io -f raw -c 'write -P 0x55 0 256k' -c 'write -P 0x56 256k 256k' $D/other.raw",
  'qemu-img create -q -f qcow2 -b base.raw -F raw $D/top.qcow2',
  "qemu-io -c 'write -P 0x66 64k 64k' -c 'write -z 320k 64k' $D/top.qcow2",
];

/** qcow2 images with what makes emptying and amending take the long way: snapshots, v2, subclusters, compressed clusters. */
const SPECIAL = [
  'qemu-img create -q -f qcow2 $D/base.qcow2 1M',
  "qemu-io -c 'write -P 0x11 0 1M' $D/base.qcow2",
  // Snapshots in the overlay: make_empty must discard instead of rebuilding.
  'qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 $D/snap.qcow2',
  "qemu-io -c 'write -P 0x21 0 128k' -c 'write -z 512k 64k' $D/snap.qcow2",
  'qemu-img snapshot -c s1 $D/snap.qcow2',
  "qemu-io -c 'write -P 0x22 64k 64k' -c 'write -z 0 64k' $D/snap.qcow2",
  // v2 overlay.
  'qemu-img create -q -f qcow2 -o compat=0.10 -b base.qcow2 -F qcow2 $D/v2.qcow2',
  "qemu-io -c 'write -P 0x31 192k 64k' $D/v2.qcow2",
  // Extended L2 overlay with partial subclusters.
  'qemu-img create -q -f qcow2 -o extended_l2=on -b base.qcow2 -F qcow2 $D/sub.qcow2',
  "qemu-io -c 'write -P 0x41 4k 8k' -c 'write -z 70k 6k' -c 'write -P 0x42 300k 2k' $D/sub.qcow2",
  // Compressed clusters in an overlay.
  'qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 $D/comp.qcow2',
  "qemu-io -c 'write -c -P 0x51 0 64k' -c 'write -c -P 0x52 256k 64k' -c 'write -P 0x53 512k 4k' $D/comp.qcow2",
];

/** Standalone qcow2 images for amend: data, zero clusters, a snapshot, compression, lazy refcounts, a data file. */
const AMEND = [
  'qemu-img create -q -f qcow2 $D/a.qcow2 1M',
  "qemu-io -c 'write -P 0x61 0 256k' -c 'write -z 512k 64k' -c 'write -P 0x62 700k 4k' $D/a.qcow2",
  'qemu-img create -q -f qcow2 -o compat=0.10 $D/v2.qcow2 1M',
  "qemu-io -c 'write -P 0x63 64k 64k' $D/v2.qcow2",
  'qemu-img create -q -f qcow2 $D/s.qcow2 1M',
  "qemu-io -c 'write -P 0x64 0 512k' -c 'write -z 600k 64k' $D/s.qcow2",
  'qemu-img snapshot -c s1 $D/s.qcow2',
  "qemu-io -c 'write -z 0 64k' -c 'write -P 0x65 64k 64k' $D/s.qcow2",
  'qemu-img create -q -f qcow2 -o lazy_refcounts=on $D/lazy.qcow2 1M',
  "qemu-io -c 'write -P 0x66 0 64k' $D/lazy.qcow2",
  'qemu-img create -q -f qcow2 -o extended_l2=on $D/ext.qcow2 1M',
  'qemu-img create -q -f qcow2 -o compression_type=zstd $D/zstd.qcow2 1M',
  "qemu-io -c 'write -c -P 0x67 0 64k' $D/zstd.qcow2",
  'qemu-img create -q -f qcow2 -o compression_type=zstd $D/zstd-plain.qcow2 1M',
  "qemu-io -c 'write -P 0x68 0 64k' $D/zstd-plain.qcow2",
  'qemu-img create -q -f qcow2 -o data_file=a.data $D/df.qcow2 1M',
  "qemu-io -c 'write -P 0x69 0 64k' $D/df.qcow2",
  'qemu-img create -q -f qcow2 -o data_file=r.data,data_file_raw=on $D/dfr.qcow2 1M',
  'qemu-img create -q -f qcow2 -o refcount_bits=8 $D/r8.qcow2 1M',
  "qemu-io -c 'write -P 0x6a 0 128k' $D/r8.qcow2",
];

/** Host offsets in a committed-into image: QEMU's commit is a mirror whose chunks land in the order its coroutines finish. */
const COMMIT_OFFSETS = { re: /(?<=^\S+\s+\S+\s+)0x[0-9a-f]+(?=\s+\$D\/(?:mid|base)\.qcow2$)/gm, why: 'allocation order of concurrent mirror writes' };

/** Bigger images whose amend progress has many steps: v2, and 4k clusters with a snapshot. */
const PROGRESS = [
  'qemu-img create -q -f qcow2 -o compat=0.10 $D/v2.qcow2 4M',
  "qemu-io -c 'write -P 1 0 1M' $D/v2.qcow2",
  'qemu-img create -q -f qcow2 -o cluster_size=4k $D/a.qcow2 8M',
  "qemu-io -c 'write -P 1 0 3M' -c 'write -z 4M 1M' $D/a.qcow2",
  'qemu-img snapshot -c s $D/a.qcow2',
];

function img(cmd: string, setup: string[], extra: Partial<DiffCase> = {}): DiffCase {
  return { setup, cmd, mask: [DISK_SIZE], ...extra };
}

/** Every refcount width QEMU allows. */
const WIDTHS = [1, 2, 4, 8, 16, 32, 64];

const createCombos = [
  '',
  '-o compat=0.10',
  '-o compat=v2',
  '-o compat=1.1,lazy_refcounts=on',
  '-o cluster_size=4k,refcount_bits=1',
  '-o cluster_size=2M,extended_l2=on',
  '-o preallocation=metadata',
  '-o preallocation=falloc,cluster_size=128k',
  '-o compression_type=zstd',
  '-o data_file=$D/d.raw',
  '-o data_file=$D/d.raw,data_file_raw=on',
  '-o data_file_raw=off',
  '-o encryption=off',
  '-o refcount_bits=64,lazy_refcounts=off',
  '-o size=2M',
  '-o cluster_size=64k -o cluster_size=128k',
  '-b $D/a.qcow2 -F qcow2',
  '-o backing_file=$D/a.qcow2,backing_fmt=qcow2,extended_l2=on,preallocation=metadata',
  // Refused, each with QEMU's message.
  '-o encryption=on',
  '-o encrypt.format=luks',
  '-o encrypt.format=aes',
  '-o encrypt.format=bogus',
  '-o encryption=on,encrypt.format=luks',
  '-o encrypt.cipher-alg=aes-256',
  '-o encrypt.iter-time=abc',
  '-o compat=0.10,refcount_bits=8',
  '-o compat=0.10,lazy_refcounts=on',
  '-o compat=0.10,extended_l2=on',
  '-o compat=0.10,data_file=$D/d.raw',
  '-o compat=0.10,compression_type=zstd',
  '-o compat=2',
  '-o cluster_size=3k',
  '-o refcount_bits=3',
  '-o preallocation=bogus',
  '-o data_file_raw=on',
  '-o backing_fmt=raw',
];

export const CHAIN_CASES: DiffCase[] = [
  // --- rebase, qcow2 over qcow2
  img('rebase -b other.qcow2 -F qcow2 $D/top.qcow2', QCHAIN, { images: ['top.qcow2'], after: ['qemu-img info $D/top.qcow2'] }),
  img('rebase -u -b other.qcow2 -F qcow2 $D/top.qcow2', QCHAIN, { images: ['top.qcow2'], after: ['qemu-img info $D/top.qcow2'] }),
  img('rebase -b base.qcow2 -F qcow2 $D/top.qcow2', QCHAIN, { images: ['top.qcow2'], after: ['qemu-img info $D/top.qcow2'] }),
  img("rebase -b '' $D/top.qcow2", QCHAIN, { images: ['top.qcow2'], after: ['qemu-img info $D/top.qcow2'] }),
  img("rebase -u -b '' $D/top.qcow2", QCHAIN, { images: ['top.qcow2'], after: ['qemu-img info $D/top.qcow2'] }),
  img('rebase -f qcow2 -q -b other.qcow2 -F qcow2 $D/top.qcow2', QCHAIN, { images: ['top.qcow2'] }),
  img('rebase -p -b other.qcow2 -F qcow2 $D/top.qcow2', QCHAIN, { images: ['top.qcow2'] }),
  img('rebase -U -t writethrough -T none -b other.qcow2 -F qcow2 $D/top.qcow2', QCHAIN, { images: ['top.qcow2'] }),
  img('rebase -b other.qcow2 $D/top.qcow2', QCHAIN, { images: ['top.qcow2'], after: ['qemu-img info $D/top.qcow2'] }),
  img('rebase -u -b other.qcow2 $D/top.qcow2', QCHAIN, { images: ['top.qcow2'], after: ['qemu-img info $D/top.qcow2'] }),
  img('rebase -b nowhere.qcow2 -F qcow2 $D/top.qcow2', QCHAIN, { images: ['top.qcow2'] }),
  img('rebase -b other.qcow2 -F bogus $D/top.qcow2', QCHAIN, { images: ['top.qcow2'] }),
  img('rebase -u -b other.raw -F raw $D/mid.qcow2', QCHAIN, { after: ['qemu-img info $D/mid.qcow2'] }),
  // --- rebase, qcow2 over raw
  img('rebase -b other.raw -F raw $D/top.qcow2', RCHAIN, { images: ['top.qcow2'], after: ['qemu-img info $D/top.qcow2'] }),
  img('rebase -f qcow2 -u -b other.raw -F raw $D/top.qcow2', RCHAIN, { images: ['top.qcow2'], after: ['qemu-img info $D/top.qcow2'] }),
  img("rebase -b '' $D/top.qcow2", RCHAIN, { images: ['top.qcow2'], after: ['qemu-img info $D/top.qcow2'] }),
  img('rebase -b other.raw -F qcow2 $D/top.qcow2', RCHAIN, { images: ['top.qcow2'] }),
  // The name must fit in the first cluster (ENOSPC) and in QEMU's 1023 bytes (EINVAL).
  img(`rebase -u -b ${'n'.repeat(400)} -F raw $D/small.qcow2`, ['qemu-img create -q -f qcow2 -o cluster_size=512 $D/small.qcow2 1M'], { images: ['small.qcow2'], after: ['qemu-img info $D/small.qcow2'] }),
  img(`rebase -u -b ${'n'.repeat(300)} -F raw $D/small.qcow2`, ['qemu-img create -q -f qcow2 -o cluster_size=512 $D/small.qcow2 1M'], { after: ['qemu-img info $D/small.qcow2'] }),
  img(`rebase -u -b ${'n'.repeat(1024)} -F raw $D/top.qcow2`, RCHAIN, { images: ['top.qcow2'], after: ['qemu-img info $D/top.qcow2'] }),
  img(`rebase -u -b ${'n'.repeat(1023)} -F raw $D/top.qcow2`, RCHAIN, { after: ['qemu-img info $D/top.qcow2'] }),
  img('rebase -u -b base.raw -F raw $D/dfr.qcow2', ['qemu-img create -q -f qcow2 -o data_file=dfr.data,data_file_raw=on $D/dfr.qcow2 1M'], { after: ['qemu-img info $D/dfr.qcow2'] }),

  // --- commit without -d: the top is emptied and reads through again
  // (No map of the raw base: QEMU punches a hole for the zeroes, which Node cannot; the bytes are compared instead.)
  img('commit $D/top.qcow2', RCHAIN, { files: ['base.raw'], images: ['top.qcow2'], after: ['qemu-img info $D/top.qcow2'] }),
  img('commit $D/top.qcow2', QCHAIN, { images: ['top.qcow2', 'mid.qcow2', 'base.qcow2'], after: ['qemu-img map $D/top.qcow2'], mask: [DISK_SIZE, COMMIT_OFFSETS] }),
  img('commit -q -t writethrough -r 100M $D/top.qcow2', QCHAIN, { images: ['top.qcow2', 'mid.qcow2'], after: ['qemu-img map $D/top.qcow2'], mask: [DISK_SIZE, COMMIT_OFFSETS] }),
  img('commit -b $D/base.qcow2 $D/top.qcow2', QCHAIN, { images: ['top.qcow2', 'mid.qcow2', 'base.qcow2'], after: ['qemu-img map $D/top.qcow2'], mask: [DISK_SIZE, COMMIT_OFFSETS] }),
  img('commit -f qcow2 $D/mid.qcow2', QCHAIN, { images: ['mid.qcow2', 'base.qcow2', 'top.qcow2'], after: ['qemu-img map $D/mid.qcow2'], mask: [DISK_SIZE, COMMIT_OFFSETS] }),
  img('commit $D/snap.qcow2', SPECIAL, { images: ['snap.qcow2', 'base.qcow2'], after: ['qemu-img map $D/snap.qcow2', 'qemu-img snapshot -l $D/snap.qcow2'] }),
  img('commit $D/v2.qcow2', SPECIAL, { images: ['v2.qcow2', 'base.qcow2'], after: ['qemu-img map $D/v2.qcow2'] }),
  img('commit $D/sub.qcow2', SPECIAL, { images: ['sub.qcow2', 'base.qcow2'], after: ['qemu-img map $D/sub.qcow2'] }),
  img('commit $D/comp.qcow2', SPECIAL, { images: ['comp.qcow2', 'base.qcow2'], after: ['qemu-img map $D/comp.qcow2'] }),
  img('commit $D/base.qcow2', SPECIAL, { images: ['base.qcow2'] }),

  // --- amend: every option
  img('amend -o compat=0.10 $D/a.qcow2', AMEND, { images: ['a.qcow2'], after: ['qemu-img info $D/a.qcow2', 'qemu-img map $D/a.qcow2'] }),
  img('amend -p -o compat=v2 $D/a.qcow2', AMEND, { images: ['a.qcow2'] }),
  img('amend -o compat=1.1 $D/v2.qcow2', AMEND, { images: ['v2.qcow2'], after: ['qemu-img info $D/v2.qcow2'] }),
  img('amend -p -o compat=v3 $D/v2.qcow2', AMEND, { images: ['v2.qcow2'] }),
  img('amend -o compat=1.1 $D/v2s.qcow2', ['qemu-img create -q -f qcow2 -o compat=0.10 $D/v2s.qcow2 1M', "qemu-io -c 'write -P 1 0 64k' $D/v2s.qcow2", 'qemu-img snapshot -c s $D/v2s.qcow2', "qemu-io -c 'write -P 2 0 64k' $D/v2s.qcow2"], { images: ['v2s.qcow2'], after: ['qemu-img info $D/v2s.qcow2', 'qemu-img convert -l s -O raw $D/v2s.qcow2 $D/s.raw'], files: ['s.raw'] }),
  img('amend -o compat=0.10 $D/s.qcow2', AMEND, { images: ['s.qcow2'], after: ['qemu-img info $D/s.qcow2', 'qemu-img snapshot -l $D/s.qcow2'] }),
  img('amend -o compat=0.10 $D/lazy.qcow2', AMEND, { images: ['lazy.qcow2'], after: ['qemu-img info $D/lazy.qcow2'] }),
  img('amend -o compat=0.10 $D/zstd-plain.qcow2', AMEND, { images: ['zstd-plain.qcow2'], after: ['qemu-img info $D/zstd-plain.qcow2'] }),
  img('amend -o lazy_refcounts=on $D/a.qcow2', AMEND, { images: ['a.qcow2'], after: ['qemu-img info $D/a.qcow2'] }),
  img('amend -o lazy_refcounts=off $D/lazy.qcow2', AMEND, { images: ['lazy.qcow2'], after: ['qemu-img info $D/lazy.qcow2'] }),
  img('amend -o lazy_refcounts=on $D/v2.qcow2', AMEND, { images: ['v2.qcow2'] }),
  img('amend -o compat=1.1,lazy_refcounts=on $D/v2.qcow2', AMEND, { images: ['v2.qcow2'], after: ['qemu-img info $D/v2.qcow2'] }),
  img('amend -o size=2M $D/a.qcow2', AMEND, { images: ['a.qcow2'], after: ['qemu-img info $D/a.qcow2'] }),
  img('amend -o size=512k $D/a.qcow2', AMEND, { images: ['a.qcow2'], after: ['qemu-img info $D/a.qcow2'] }),
  img('amend --force -o size=4M $D/s.qcow2', AMEND, { images: ['s.qcow2'], after: ['qemu-img info $D/s.qcow2'] }),
  img('amend -o size=0 $D/a.qcow2', AMEND, { images: ['a.qcow2'] }),
  img('amend -o data_file=b.data $D/df.qcow2', AMEND, { after: ['qemu-img info $D/df.qcow2'] }),
  img('amend -o data_file_raw=off $D/dfr.qcow2', AMEND, { after: ['qemu-img info $D/dfr.qcow2'] }),
  img('amend -o data_file_raw=on $D/dfr.qcow2', AMEND, { after: ['qemu-img info $D/dfr.qcow2'] }),
  img('amend -o backing_file=,backing_fmt= $D/a.qcow2', AMEND, { images: ['a.qcow2'] }),
  img('amend -o refcount_bits=8,compat=1.1 $D/a.qcow2', AMEND, { images: ['a.qcow2'], after: ['qemu-img info $D/a.qcow2'] }),
  img('amend -q -o refcount_bits=16 $D/r8.qcow2', AMEND, { images: ['r8.qcow2'], after: ['qemu-img info $D/r8.qcow2'] }),
  ...WIDTHS.map((w) => img(`amend -o refcount_bits=${w} $D/a.qcow2`, AMEND, { images: ['a.qcow2'], after: ['qemu-img info $D/a.qcow2'] })),
  ...WIDTHS.map((w) => img(`amend -o refcount_bits=${w} $D/s.qcow2`, AMEND, { images: ['s.qcow2'], after: ['qemu-img info $D/s.qcow2', 'qemu-img snapshot -l $D/s.qcow2'] })),
  // --- amend: progress spread over the operations as QEMU's helper callback does
  img('amend -p -o compat=1.1,refcount_bits=4 $D/v2.qcow2', PROGRESS, { images: ['v2.qcow2'] }),
  img('amend -p -o refcount_bits=32 $D/a.qcow2', PROGRESS, { images: ['a.qcow2'] }),
  img('amend -p -o compat=0.10 $D/a.qcow2', PROGRESS, { images: ['a.qcow2'] }),
  img('amend -p -o refcount_bits=16,compat=0.10 $D/a.qcow2', PROGRESS, { images: ['a.qcow2'] }),
  img('amend -p -o refcount_bits=64,size=16M $D/a.qcow2', PROGRESS, { images: ['a.qcow2'], after: ['qemu-img info $D/a.qcow2'] }),
  // --- amend: errors
  img('amend -o compat=0.10 $D/ext.qcow2', AMEND, { images: ['ext.qcow2'] }),
  img('amend -o compat=0.10 $D/zstd.qcow2', AMEND, { images: ['zstd.qcow2'] }),
  img('amend -o compat=0.10 $D/df.qcow2', AMEND, {}),
  img('amend -o compat=0.10 $D/r8.qcow2', AMEND, { images: ['r8.qcow2'] }),
  img('amend -o compat=0.10,refcount_bits=8 $D/a.qcow2', AMEND, { images: ['a.qcow2'] }),
  img('amend -o compat=0.10,lazy_refcounts=on $D/a.qcow2', AMEND, { images: ['a.qcow2'] }),
  img('amend -o compat=1.0 $D/a.qcow2', AMEND, { images: ['a.qcow2'] }),
  img('amend -o refcount_bits=3 $D/a.qcow2', AMEND, { images: ['a.qcow2'] }),
  img('amend -o refcount_bits=128 $D/a.qcow2', AMEND, { images: ['a.qcow2'] }),
  img('amend -o refcount_bits=0 $D/a.qcow2', AMEND, { images: ['a.qcow2'] }),
  img('amend -o refcount_bits=x $D/a.qcow2', AMEND, { images: ['a.qcow2'] }),
  img('amend -o lazy_refcounts=maybe $D/a.qcow2', AMEND, { images: ['a.qcow2'] }),
  img('amend -o cluster_size=4k $D/a.qcow2', AMEND, { images: ['a.qcow2'] }),
  img('amend -o preallocation=metadata $D/a.qcow2', AMEND, { images: ['a.qcow2'] }),
  img('amend -o extended_l2=on $D/a.qcow2', AMEND, { images: ['a.qcow2'] }),
  img('amend -o compression_type=zstd $D/a.qcow2', AMEND, { images: ['a.qcow2'] }),
  img('amend -o encrypt.format=luks $D/a.qcow2', AMEND, { images: ['a.qcow2'] }),
  img('amend -o encryption=on $D/a.qcow2', AMEND, { images: ['a.qcow2'] }),
  img('amend -o encrypt.state=active $D/a.qcow2', AMEND, { images: ['a.qcow2'] }),
  img('amend -o encrypt.keyslot=1 $D/a.qcow2', AMEND, { images: ['a.qcow2'] }),
  img('amend -o bogus=1 $D/a.qcow2', AMEND, { images: ['a.qcow2'] }),
  img('amend -o backing_file=x $D/a.qcow2', AMEND, { images: ['a.qcow2'] }),
  img('amend -o backing_fmt=raw $D/a.qcow2', AMEND, { images: ['a.qcow2'] }),
  img('amend -o data_file=x $D/a.qcow2', AMEND, { images: ['a.qcow2'] }),
  img('amend -o data_file_raw=on $D/df.qcow2', AMEND, { after: ['qemu-img info $D/df.qcow2'] }),
  img('amend -o size=1M,data_file_raw=on $D/df.qcow2', AMEND, {}),
  img('amend -o refcount_bits=1 $D/s.qcow2', AMEND, { images: ['s.qcow2'], after: ['qemu-img info $D/s.qcow2'] }),
  img('amend -o backing_file=mid.qcow2,backing_fmt=qcow2 $D/top.qcow2', QCHAIN, { images: ['top.qcow2'] }),
  img('amend -o backing_file=other.qcow2,backing_fmt=qcow2 $D/top.qcow2', QCHAIN, { images: ['top.qcow2'] }),
  img('amend -o lazy_refcounts=on,backing_file=other.qcow2 $D/top.qcow2', QCHAIN, { images: ['top.qcow2'], after: ['qemu-img info $D/top.qcow2'] }),
  img('amend -o compat=0.10 $D/top.qcow2', QCHAIN, { images: ['top.qcow2'], after: ['qemu-img info $D/top.qcow2', 'qemu-img map $D/top.qcow2'] }),
  img('amend -o compat=0.10 $D/snap.qcow2', SPECIAL, { images: ['snap.qcow2'], after: ['qemu-img info $D/snap.qcow2'] }),

  // --- the option lists
  img('create -f qcow2 -o help', []),
  img('create -f qcow2 -o help $D/x.qcow2', []),
  img('create -f qcow2 -o ? $D/x.qcow2', []),
  img('amend -f qcow2 -o help', []),
  img('amend -o help $D/a.qcow2', AMEND),
  img('amend -f qcow2 -o help,size=1M $D/a.qcow2', AMEND),
  img('measure -O qcow2 -o help', []),
  img('measure -O qcow2 -o help --size 1M', []),
  img('measure -f qcow2 -O qcow2 -o help', []),
  img('measure -O qcow2 -o compat=v2 --size 1M', []),
  img('measure -O qcow2 -o compat=0.10,refcount_bits=8 --size 1M', []),
  img('convert -O qcow2 -o help', []),

  // --- create: the Formatting line for combinations of options, and the refusals
  ...createCombos.map((o) => img(`create -f qcow2 ${o} $D/new.qcow2 1M`, ['qemu-img create -q -f qcow2 $D/a.qcow2 1M'], { images: ['new.qcow2'] })),
  img('create -f qcow2 -o backing_file=$D/a.qcow2,backing_fmt=qcow2 $D/new.qcow2', ['qemu-img create -q -f qcow2 $D/a.qcow2 1M'], { images: ['new.qcow2'], after: ['qemu-img info $D/new.qcow2'] }),
];
