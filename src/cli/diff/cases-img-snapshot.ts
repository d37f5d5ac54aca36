/**
 * qemu-img snapshot differential cases on qcow2: create, apply and delete
 * with this engine's driver against QEMU's, errors included. Inputs are made
 * by the real tools in setup; after each run the real qemu-img lists the
 * snapshots, checks the image and reads the snapshots back, in both
 * directories, so what QEMU sees of our tables is compared too.
 */
import type { DiffCase } from './harness.ts';

/** Snapshot dates and times come from the clock of each run. */
const DATES = { re: /\d{4}-\d\d-\d\d \d\d:\d\d:\d\d/g, why: 'snapshot creation time is the clock of each run' };
const JSON_DATES = { re: /"date-(?:sec|nsec)": \d+/g, why: 'snapshot creation time is the clock of each run' };
const MASK = [DATES, JSON_DATES];

/** A qcow2 image with data, one with two snapshots made by QEMU, and variants (v2, 1-bit refcounts, data file, lazy refcounts, resized). */
const SNAP = [
  'qemu-img create -q -f qcow2 $D/q.qcow2 1M',
  "qemu-io -c 'write -P 0x33 0 64k' -c 'write -z 128k 64k' -c 'write -P 0x44 960k 4k' $D/q.qcow2",
  'qemu-img create -q -f qcow2 -o cluster_size=4k $D/s.qcow2 1M',
  "qemu-io -c 'write -P 1 0 64k' -c 'write -c -P 9 128k 4k' $D/s.qcow2",
  'qemu-img snapshot -c first $D/s.qcow2',
  "qemu-io -c 'write -P 2 4k 8k' -c 'write -z 32k 4k' $D/s.qcow2",
  'qemu-img snapshot -c second $D/s.qcow2',
  "qemu-io -c 'write -P 3 0 512' $D/s.qcow2",
  'qemu-img create -q -f qcow2 -o compat=0.10,cluster_size=4k $D/v2.qcow2 1M',
  "qemu-io -c 'write -P 5 0 12k' $D/v2.qcow2",
  'qemu-img create -q -f qcow2 -o refcount_bits=1 $D/r1.qcow2 1M',
  "qemu-io -c 'write -P 6 0 64k' $D/r1.qcow2",
  'qemu-img create -q -f qcow2 -o data_file=df.data $D/df.qcow2 1M',
  "qemu-io -c 'write -P 7 0 64k' $D/df.qcow2",
  'qemu-img create -q -f qcow2 -o lazy_refcounts=on,cluster_size=1k,refcount_bits=64 $D/lazy.qcow2 256k',
  "qemu-io -c 'write -P 8 1k 5k' $D/lazy.qcow2",
  'qemu-img create -q -f qcow2 $D/grown.qcow2 1M',
  "qemu-io -c 'write -P 9 0 1M' $D/grown.qcow2",
  'qemu-img snapshot -c small $D/grown.qcow2',
  'qemu-img resize -q $D/grown.qcow2 3M',
  "qemu-io -c 'write -P 10 2M 64k' $D/grown.qcow2",
];

/** Snapshots the real qemu-img exports after a run (absent ones fail alike in both directories). */
const EXPORTS: Record<string, string[]> = { 's.qcow2': ['first', 'second', '1', '3'], 'q.qcow2': ['s1'], 'v2.qcow2': ['s1'], 'lazy.qcow2': ['s1'], 'grown.qcow2': ['small'] };

function snap(cmd: string, image: string, extra: Partial<DiffCase> = {}): DiffCase {
  const names = EXPORTS[image] ?? [];
  return {
    setup: SNAP,
    cmd,
    images: [image],
    after: [
      `qemu-img snapshot -l $D/${image}`,
      `qemu-img check $D/${image}`,
      ...names.map((n) => `qemu-img convert -f qcow2 -O raw -l snapshot.name=${n} $D/${image} $D/export-${n}.raw`),
    ],
    files: names.map((n) => `export-${n}.raw`),
    mask: MASK,
    ...extra,
  };
}

/** Every qemu-img snapshot case on qcow2. */
export const IMG_SNAPSHOT_CASES: DiffCase[] = [
  // create
  snap('snapshot -c s1 $D/q.qcow2', 'q.qcow2'),
  snap('snapshot -q -c s1 $D/q.qcow2', 'q.qcow2'),
  snap('snapshot -c first $D/s.qcow2', 's.qcow2'),
  snap('snapshot -c 1 $D/s.qcow2', 's.qcow2'),
  snap("snapshot -c '' $D/s.qcow2", 's.qcow2'),
  snap(`snapshot -c ${'n'.repeat(300)} $D/q.qcow2`, 'q.qcow2'),
  snap('snapshot -c s1 --image-opts driver=qcow2,file.filename=$D/q.qcow2', 'q.qcow2'),
  snap('snapshot -c s1 -f qcow2 $D/v2.qcow2', 'v2.qcow2'),
  snap('snapshot -c s1 $D/lazy.qcow2', 'lazy.qcow2'),
  // QEMU leaks the L1 copy when the refcount overflows; we give it back, so only the listing is compared.
  snap('snapshot -c s1 $D/r1.qcow2', 'r1.qcow2', { after: ['qemu-img snapshot -l $D/r1.qcow2'] }),
  snap('snapshot -c s1 $D/df.qcow2', 'df.qcow2'),
  snap('snapshot -U -c s1 $D/q.qcow2', 'q.qcow2'),
  // apply
  snap('snapshot -a first $D/s.qcow2', 's.qcow2'),
  snap('snapshot -a 2 $D/s.qcow2', 's.qcow2'),
  snap('snapshot -q -a second $D/s.qcow2', 's.qcow2'),
  snap('snapshot -a nope $D/s.qcow2', 's.qcow2'),
  snap('snapshot -q -a nope $D/s.qcow2', 's.qcow2'),
  snap('snapshot -a s1 $D/df.qcow2', 'df.qcow2'),
  snap('snapshot -U -a first $D/s.qcow2', 's.qcow2'),
  snap('snapshot -a small $D/grown.qcow2', 'grown.qcow2'),
  // delete
  snap('snapshot -d first $D/s.qcow2', 's.qcow2'),
  snap('snapshot -d 2 $D/s.qcow2', 's.qcow2'),
  snap('snapshot -q -d second $D/s.qcow2', 's.qcow2'),
  snap('snapshot -d nope $D/s.qcow2', 's.qcow2'),
  snap('snapshot -d s1 $D/df.qcow2', 'df.qcow2'),
  snap('snapshot -U -d first $D/s.qcow2', 's.qcow2'),
  snap('snapshot -d small $D/grown.qcow2', 'grown.qcow2'),
  // convert and measure of a snapshot (QEMU's bdrv_snapshot_load_tmp)
  ...[
    '-l first', '-l second', '-l 1', '-l 2', '-l snapshot.name=first', '-l snapshot.id=2', '-l snapshot.id=1,snapshot.name=first',
    '-l snapshot.id=1,snapshot.name=second', '-l snapshot.id=', '-l snapshot.id', '-l snapshot.foo=1', '-l snapshot.name=first,x=1', '-l nope',
  ].map((l): DiffCase => ({ setup: SNAP, cmd: `convert ${l} -O raw $D/s.qcow2 $D/out.raw`, files: ['out.raw'] })),
  { setup: SNAP, cmd: 'convert -l small -O raw $D/grown.qcow2 $D/out.raw', files: ['out.raw'] },
  { setup: SNAP, cmd: 'convert -l first -O qcow2 $D/s.qcow2 $D/out.qcow2', images: ['out.qcow2'] },
  { setup: SNAP, cmd: 'convert -l first -O raw $D/s.qcow2 $D/s.qcow2 $D/out.raw', files: ['out.raw'] },
  { setup: SNAP, cmd: 'convert -l snapshot.name=first -O raw $D/s.qcow2 $D/q.qcow2 $D/out.raw', files: ['out.raw'] },
  { setup: SNAP, cmd: 'convert -l first -f raw -O raw $D/s.qcow2 $D/out.raw', files: ['out.raw'] },
  { setup: SNAP, cmd: 'measure -l first -O raw $D/s.qcow2' },
  { setup: SNAP, cmd: 'measure -l snapshot.name=small --output=json -O raw $D/grown.qcow2' },
  { setup: SNAP, cmd: 'measure -l nope -O raw $D/s.qcow2' },
  { setup: SNAP, cmd: 'measure -l snapshot.x=1 -O raw $D/s.qcow2' },

  // resizing images with snapshots: v3 can (each snapshot keeps its size), v2 cannot
  snap('resize $D/s.qcow2 2M', 's.qcow2'),
  snap('resize --shrink $D/s.qcow2 512k', 's.qcow2'),
  snap('resize $D/grown.qcow2 1M', 'grown.qcow2'),
  { setup: [...SNAP, 'qemu-img snapshot -c s1 $D/v2.qcow2'], cmd: 'resize $D/v2.qcow2 2M', images: ['v2.qcow2'] },

  // list and info over what QEMU made (ours reads; dates come from setup, so they are equal)
  { setup: SNAP, cmd: 'snapshot -l $D/s.qcow2' },
  { setup: SNAP, cmd: 'snapshot -l $D/df.qcow2' },
  { setup: SNAP, cmd: 'info $D/grown.qcow2' },
  { setup: SNAP, cmd: 'info --output=json $D/grown.qcow2' },
  { setup: SNAP, cmd: 'check $D/s.qcow2' },
];
