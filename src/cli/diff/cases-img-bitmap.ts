/**
 * qemu-img differential cases for persistent dirty bitmaps in qcow2: every
 * `bitmap` operation (and its errors), `info`, `check`, `measure` and
 * `convert --bitmaps` on images whose bitmaps QEMU made. Besides stdout,
 * stderr and status, the resulting images are compared byte for byte where
 * only bitmap metadata changes, and QEMU's own view of each bitmap's dirty
 * areas is read back after the run: qemu-nbd exports the bitmap and
 * `qemu-img map` reports its dirty ranges as "data": false.
 */
import type { DiffCase } from './harness.ts';

/**
 * bm.qcow2: 'b0' (64k granules, enabled, dirty where written after it was
 * added) and 'b1' (4k, disabled); other.qcow2 with 'ob' (512-byte granules);
 * big.qcow2 (2 MiB) with 'bb'; a plain v3 image, a v2 image, a raw file;
 * incons.qcow2 whose bitmap was left in use by a killed qemu-io; snap.qcow2
 * with an internal snapshot taken before its bitmap 'sb'.
 */
const BM = [
  'qemu-img create -q -f qcow2 $D/a.qcow2 1M',
  "qemu-io -c 'write -P 1 0 64k' $D/a.qcow2",
  'qemu-img create -q -f qcow2 $D/bm.qcow2 1M',
  'qemu-img bitmap --add $D/bm.qcow2 b0',
  "qemu-io -c 'write -P 2 64k 4k' -c 'write -z 512k 64k' $D/bm.qcow2",
  'qemu-img bitmap --add -g 4k --disable $D/bm.qcow2 b1',
  "qemu-io -c 'write -P 3 900k 8k' $D/bm.qcow2",
  'qemu-img create -q -f qcow2 $D/other.qcow2 1M',
  'qemu-img bitmap --add -g 512 $D/other.qcow2 ob',
  "qemu-io -c 'write -P 4 300k 1k' $D/other.qcow2",
  'qemu-img create -q -f qcow2 $D/big.qcow2 2M',
  'qemu-img bitmap --add $D/big.qcow2 bb',
  'qemu-img create -q -f qcow2 -o compat=0.10 $D/v2.qcow2 1M',
  'qemu-img create -q -f raw $D/r.raw 1M',
  'qemu-img create -q -f qcow2 $D/incons.qcow2 1M',
  'qemu-img bitmap --add $D/incons.qcow2 gone',
  'qemu-img bitmap --add $D/incons.qcow2 kept',
  // qemu-io dies without closing the image: both bitmaps stay IN_USE, so they are inconsistent from now on.
  "sh -c \"qemu-io -c 'write 0 4k' -c 'sigraise 9' $D/incons.qcow2; exit 0\"",
  'qemu-img bitmap --remove $D/incons.qcow2 kept',
  'qemu-img create -q -f qcow2 $D/snap.qcow2 1M',
  'qemu-img snapshot -c s1 $D/snap.qcow2',
  'qemu-img bitmap --add $D/snap.qcow2 sb',
  "qemu-io -c 'write 128k 4k' $D/snap.qcow2",
];

let sock = 0;
/** After-steps that print QEMU's view of a bitmap's dirty areas in `img`. */
function dirty(img: string, bitmap: string): string[] {
  const s = `$D/s${sock++}`;
  return [
    `qemu-nbd --fork -r -B ${bitmap} -k ${s} $D/${img}`,
    `qemu-img map --output=json --image-opts driver=nbd,server.type=unix,server.path=${s},x-dirty-bitmap=qemu:dirty-bitmap:${bitmap}`,
  ];
}

/** QEMU's info and check of an image after the run. */
function state(img: string): string[] {
  return [`qemu-img info -U $D/${img}`, `qemu-img check -U $D/${img}`];
}

/** Node names QEMU makes up ("#block123") differ in numbering; only their presence matters. */
const NODE_NAMES = { re: /#block\d+/g, why: 'automatic node names are numbered per process' };

/**
 * Node cannot punch holes, so clusters our qcow2 frees (old bitmap tables
 * and data) stay allocated in the file: the same layout, but more disk in
 * use and stale bytes in free clusters, so "disk size" is masked and images
 * are compared by content, check, info and dirty areas, not by bytes.
 */
const DISK_SIZE = { re: /^disk size: .*$/gm, why: 'Node cannot punch holes into freed clusters' };

/** A snapshot taken in the run carries the clock of that run. */
const SNAPSHOT_DATES = { re: /\d{4}-\d\d-\d\d \d\d:\d\d:\d\d/g, why: 'snapshot creation time is the clock of each run' };

function img(cmd: string, extra: Partial<DiffCase> = {}): DiffCase {
  return { setup: BM, cmd, mask: [NODE_NAMES, DISK_SIZE], ...extra };
}

/** A bitmap operation on bm.qcow2: QEMU must see the same image, bitmaps and dirty areas after it. */
function onBm(cmd: string, bitmaps: string[] = ['b0', 'b1']): DiffCase {
  return img(cmd, { images: ['bm.qcow2'], after: [...state('bm.qcow2'), ...bitmaps.flatMap((b) => dirty('bm.qcow2', b))] });
}

/** Every qemu-img case about bitmaps on healthy images. */
const HEALTHY_CASES: DiffCase[] = [
  // --- info and check of images with bitmaps
  img('info $D/bm.qcow2'),
  img('info --output=json $D/bm.qcow2'),
  img('info $D/incons.qcow2'),
  img('info --output=json $D/other.qcow2'),
  img('check $D/bm.qcow2'),
  img('check --output=json $D/bm.qcow2'),
  img('check $D/incons.qcow2'),

  // --- bitmap --add
  onBm('bitmap --add $D/bm.qcow2 new', ['b0', 'b1', 'new']),
  onBm('bitmap --add -g 512 $D/bm.qcow2 new', ['new']),
  onBm('bitmap --add -g 2G $D/bm.qcow2 new', ['new']),
  onBm('bitmap --add -g 6G $D/bm.qcow2 new', ['new']),
  onBm('bitmap --add --disable $D/bm.qcow2 new', ['new']),
  onBm('bitmap --add -g 4k --disable --enable $D/bm.qcow2 new', ['new']),
  img('bitmap --add $D/a.qcow2 first', { files: ['a.qcow2'], images: ['a.qcow2'], after: [...state('a.qcow2'), ...dirty('a.qcow2', 'first')] }),
  onBm('bitmap --add $D/bm.qcow2 b0'),
  onBm('bitmap --add -g 1000 $D/bm.qcow2 new'),
  onBm('bitmap --add -g 256 $D/bm.qcow2 new'),
  onBm('bitmap --add -g 4G $D/bm.qcow2 new'),
  onBm("bitmap --add $D/bm.qcow2 ''"),
  onBm(`bitmap --add $D/bm.qcow2 ${'n'.repeat(1024)}`),
  onBm(`bitmap --add $D/bm.qcow2 ${'n'.repeat(1023)}`, ['b0']),
  img('bitmap --add $D/v2.qcow2 b0', { files: ['v2.qcow2'] }),
  img('bitmap --add -f qcow2 $D/r.raw b0'),
  img('bitmap --add -f raw $D/bm.qcow2 b0'),

  // --- remove, clear, enable, disable
  onBm('bitmap --remove $D/bm.qcow2 b0', ['b1']),
  onBm('bitmap --remove $D/bm.qcow2 b1', ['b0']),
  onBm('bitmap --remove $D/bm.qcow2 nope'),
  onBm('bitmap --clear $D/bm.qcow2 b0'),
  onBm('bitmap --clear $D/bm.qcow2 nope'),
  onBm('bitmap --enable $D/bm.qcow2 b1'),
  onBm('bitmap --disable $D/bm.qcow2 b0'),
  onBm('bitmap --disable --enable $D/bm.qcow2 b0'),
  onBm('bitmap --enable $D/bm.qcow2 nope'),
  onBm('bitmap --disable $D/bm.qcow2 nope'),
  onBm('bitmap --clear --remove $D/bm.qcow2 b0', ['b1']),
  onBm('bitmap --remove --clear $D/bm.qcow2 b0', ['b1']),
  onBm('bitmap --add --remove $D/bm.qcow2 x'),
  onBm('bitmap --remove --add -g 4k $D/bm.qcow2 b0'),

  // --- merge, in the image and from another image
  onBm('bitmap --merge b1 $D/bm.qcow2 b0'),
  onBm('bitmap --merge b0 $D/bm.qcow2 b1'),
  onBm('bitmap --merge nope $D/bm.qcow2 b0'),
  onBm('bitmap --merge b0 $D/bm.qcow2 nope'),
  onBm('bitmap --merge ob -b $D/other.qcow2 $D/bm.qcow2 b0'),
  onBm('bitmap --merge ob -b $D/other.qcow2 -F qcow2 $D/bm.qcow2 b1'),
  onBm('bitmap --merge ob -b $D/other.qcow2 -F raw $D/bm.qcow2 b0'),
  onBm('bitmap --merge bb -b $D/big.qcow2 $D/bm.qcow2 b0'),
  onBm('bitmap --merge ob -b $D/nonexistent.qcow2 $D/bm.qcow2 b0'),
  onBm('bitmap --add --merge ob -b $D/other.qcow2 $D/bm.qcow2 new', ['new']),
  onBm('bitmap --add -g 512 --merge b1 --merge b0 --disable $D/bm.qcow2 new', ['new']),
  onBm('bitmap --merge b0 --merge ob -b $D/other.qcow2 $D/bm.qcow2 b1'),

  // --- inconsistent bitmaps: unusable, removable
  img('bitmap --clear $D/incons.qcow2 gone', { files: ['incons.qcow2'] }),
  img('bitmap --merge gone $D/incons.qcow2 gone', { files: ['incons.qcow2'] }),
  img('bitmap --enable $D/incons.qcow2 gone', { files: ['incons.qcow2'] }),
  img('bitmap --remove $D/incons.qcow2 gone', { files: ['incons.qcow2'], after: state('incons.qcow2') }),
  img('bitmap --add $D/incons.qcow2 fresh', { files: ['incons.qcow2'], after: [...state('incons.qcow2'), ...dirty('incons.qcow2', 'fresh')] }),

  // --- measure with a bitmap-carrying source
  img('measure -O qcow2 $D/bm.qcow2'),
  img('measure --output=json -O qcow2 $D/bm.qcow2'),
  img('measure -O qcow2 -o cluster_size=4k $D/bm.qcow2'),
  img('measure --output=json -O qcow2 -o cluster_size=512 $D/other.qcow2'),
  img('measure -O qcow2 -o compat=0.10 $D/bm.qcow2'),
  img('measure -O raw $D/bm.qcow2'),
  img('measure -O qcow2 $D/a.qcow2'),
  img('measure --output=json -O qcow2 $D/v2.qcow2'),
  img('measure -O qcow2 $D/incons.qcow2'),
  img('measure -O qcow2 -f raw $D/bm.qcow2'),

  // --- convert --bitmaps
  // A new image gets no frees: its bytes must match QEMU's exactly.
  img('convert --bitmaps -O qcow2 $D/bm.qcow2 $D/out.qcow2', { images: ['out.qcow2'], files: ['out.qcow2'], after: [...state('out.qcow2'), ...dirty('out.qcow2', 'b0'), ...dirty('out.qcow2', 'b1')] }),
  img('convert --bitmaps -O qcow2 -o cluster_size=4k $D/other.qcow2 $D/out.qcow2', { images: ['out.qcow2'], after: [...state('out.qcow2'), ...dirty('out.qcow2', 'ob')] }),
  img('convert --bitmaps -O qcow2 $D/a.qcow2 $D/out.qcow2', { images: ['out.qcow2'], after: state('out.qcow2') }),
  img('convert --bitmaps -O raw $D/bm.qcow2 $D/out.raw'),
  img('convert --bitmaps -O qcow2 -o compat=0.10 $D/bm.qcow2 $D/out.qcow2', { images: ['out.qcow2'] }),
  img('convert --bitmaps -O qcow2 $D/bm.qcow2 $D/a.qcow2 $D/out.qcow2'),
  img('convert --bitmaps -O qcow2 $D/r.raw $D/out.qcow2'),
  img('convert --bitmaps -O qcow2 $D/incons.qcow2 $D/out.qcow2', { images: ['out.qcow2'], after: state('out.qcow2') }),
  img('convert --bitmaps --skip-broken-bitmaps -O qcow2 $D/incons.qcow2 $D/out.qcow2', { images: ['out.qcow2'], after: state('out.qcow2') }),
  img('convert --bitmaps -n -O qcow2 $D/bm.qcow2 $D/big.qcow2', { images: ['big.qcow2'], after: state('big.qcow2') }),
  // (convert -n over qcow2 places data differently from QEMU with or without bitmaps, so no check output here.)
  img('convert --bitmaps -n -O qcow2 $D/other.qcow2 $D/a.qcow2', { images: ['a.qcow2'], after: ['qemu-img info -U $D/a.qcow2', ...dirty('a.qcow2', 'ob')] }),

  // --- other commands on images with bitmaps
  img('resize $D/bm.qcow2 2M', { after: [...state('bm.qcow2'), ...dirty('bm.qcow2', 'b0')] }),
  img('resize $D/incons.qcow2 2M', { files: ['incons.qcow2'] }),
  img('amend -o lazy_refcounts=on $D/bm.qcow2', { images: ['bm.qcow2'], after: [...state('bm.qcow2'), ...dirty('bm.qcow2', 'b0')] }),
  img('amend -o refcount_bits=8 $D/bm.qcow2', { images: ['bm.qcow2'], after: [...state('bm.qcow2'), ...dirty('bm.qcow2', 'b0')] }),
  // QEMU's downgrade keeps the bitmaps extension in the v2 image, whose bitmaps are then stale and their clusters leak: both checks say so.
  img('amend -o compat=0.10 $D/bm.qcow2', { after: state('bm.qcow2') }),
  img('snapshot -l $D/bm.qcow2'),
  img('snapshot -c s1 $D/bm.qcow2', { mask: [NODE_NAMES, DISK_SIZE, SNAPSHOT_DATES], images: ['bm.qcow2'], after: [...state('bm.qcow2'), 'qemu-img snapshot -l $D/bm.qcow2', ...dirty('bm.qcow2', 'b0')] }),
  img('snapshot -a s1 $D/snap.qcow2', { images: ['snap.qcow2'], after: [...state('snap.qcow2'), ...dirty('snap.qcow2', 'sb')] }),
  img('snapshot -d s1 $D/snap.qcow2', { images: ['snap.qcow2'], after: [...state('snap.qcow2'), ...dirty('snap.qcow2', 'sb')] }),
];

/**
 * A QEMU-made image whose layout is fixed by the steps (b0's bitmap table at
 * 0x50000 with one data cluster at 0x40000, the directory at 0xd0000), then
 * damaged with raw writes: a table entry cleared (its data cluster leaks), a
 * table pointing past the file, reserved bits, bad flags, a bad granularity.
 */
const DAMAGED = [
  'qemu-img create -q -f qcow2 $D/base.qcow2 1M',
  'qemu-img bitmap --add -g 4k $D/base.qcow2 b0',
  "qemu-io -c 'write 0 4k' -c 'write 600k 4k' $D/base.qcow2",
  'qemu-img bitmap --add $D/base.qcow2 b1',
  'cp $D/base.qcow2 $D/leak.qcow2',
  "qemu-io -f raw -c 'write -P 0 327680 8' $D/leak.qcow2",
  'cp $D/base.qcow2 $D/far.qcow2',
  "qemu-io -f raw -c 'write -P 0x10 851971 1' $D/far.qcow2",
  'cp $D/base.qcow2 $D/reserved.qcow2',
  "qemu-io -f raw -c 'write -P 2 327687 1' $D/reserved.qcow2",
  'cp $D/base.qcow2 $D/ones.qcow2',
  "qemu-io -f raw -c 'write -P 0 327680 8' -c 'write -P 1 327687 1' $D/ones.qcow2",
  'cp $D/base.qcow2 $D/gran.qcow2',
  "qemu-io -f raw -c 'write -P 40 851985 1' $D/gran.qcow2",
  'cp $D/base.qcow2 $D/flags.qcow2',
  "qemu-io -f raw -c 'write -P 4 851982 1' $D/flags.qcow2",
];

function damaged(cmd: string, extra: Partial<DiffCase> = {}): DiffCase {
  return { setup: DAMAGED, cmd, mask: [NODE_NAMES, DISK_SIZE], ...extra };
}

/** check and open of damaged bitmap metadata. */
const IMG_BITMAP_DAMAGE_CASES: DiffCase[] = [
  damaged('check $D/base.qcow2'),
  damaged('check $D/leak.qcow2'),
  damaged('check --output=json $D/leak.qcow2'),
  damaged('check -r leaks $D/leak.qcow2', { images: ['leak.qcow2'], after: state('leak.qcow2') }),
  damaged('check -r all $D/leak.qcow2', { images: ['leak.qcow2'], after: [...state('leak.qcow2'), ...dirty('leak.qcow2', 'b1')] }),
  damaged('check $D/far.qcow2'),
  damaged('check $D/ones.qcow2'),
  damaged('info $D/ones.qcow2'),
  damaged('check $D/reserved.qcow2'),
  damaged('info $D/reserved.qcow2'),
  damaged('check $D/gran.qcow2'),
  damaged('info $D/flags.qcow2'),
  // The leak was there before: both images keep it, which the after-check shows for each.
  damaged('bitmap --remove $D/leak.qcow2 b0', { after: state('leak.qcow2') }),
];

/** Every qemu-img case about bitmaps. */
export const IMG_BITMAP_CASES: DiffCase[] = [...HEALTHY_CASES, ...IMG_BITMAP_DAMAGE_CASES];
