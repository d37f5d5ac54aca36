/**
 * More qemu-img differential cases: resize with preallocation and shrinking
 * of qcow2 images, and error cases of the subcommands the main list covers
 * thinly. Same conventions as cases-img.ts.
 */
import type { DiffCase } from './harness.ts';

/** qcow2 images with 100 KiB of data, one per cluster size, one 1000 KiB image with data in its last cluster, and ones to shrink. */
const RESIZE = [
  'qemu-img create -q -f qcow2 $D/c64k.qcow2 1M',
  'qemu-img create -q -f qcow2 -o cluster_size=4k $D/c4k.qcow2 1M',
  'qemu-img create -q -f qcow2 -o cluster_size=512 $D/c512.qcow2 1M',
  'qemu-img create -q -f qcow2 -o extended_l2=on $D/ext.qcow2 1M',
  'qemu-img create -q -f qcow2 -o compat=0.10,cluster_size=4k $D/v2.qcow2 1M',
  "qemu-io -c 'write -P 1 0 100k' $D/c64k.qcow2",
  "qemu-io -c 'write -P 1 0 100k' $D/c4k.qcow2",
  "qemu-io -c 'write -P 1 0 100k' $D/c512.qcow2",
  "qemu-io -c 'write -P 1 0 100k' $D/ext.qcow2",
  "qemu-io -c 'write -P 1 0 100k' $D/v2.qcow2",
  'qemu-img create -q -f qcow2 $D/odd.qcow2 1000k',
  "qemu-io -c 'write -P 7 960k 40k' $D/odd.qcow2",
  'qemu-img create -q -f qcow2 -o cluster_size=512 $D/s512.qcow2 16M',
  "qemu-io -c 'write -P 1 0 3M' -c 'write -P 2 8M 7M' $D/s512.qcow2",
  'qemu-img create -q -f qcow2 -o cluster_size=4k,refcount_bits=64 $D/s4k.qcow2 16M',
  "qemu-io -c 'write -P 1 0 3M' -c 'write -P 2 8M 7M' $D/s4k.qcow2",
  'qemu-img create -q -f qcow2 -o cluster_size=512,refcount_bits=1 $D/s1.qcow2 16M',
  "qemu-io -c 'write -P 1 0 3M' -c 'write -P 2 8M 7M' $D/s1.qcow2",
];

/** `qemu-img resize` of one image; the file must come out byte for byte as QEMU's, and check and map agree. */
function grow(image: string, args: string): DiffCase {
  return { setup: RESIZE, cmd: `resize ${args.replace('IMG', `$D/${image}`)}`, files: [image], after: [`qemu-img check $D/${image}`, `qemu-img map --output=json $D/${image}`] };
}

/**
 * A shrink: the same refcount structures as QEMU's (qcow2_shrink_reftable
 * drops the blocks that count only freed space), so check and map agree;
 * the bytes may differ only where QEMU punched holes into the freed
 * clusters, which Node cannot do.
 */
function shrink(image: string, size: string, then: string[] = []): DiffCase {
  return {
    setup: RESIZE,
    cmd: `resize --shrink $D/${image} ${size}`,
    images: [image],
    after: [`qemu-img check $D/${image}`, `qemu-img map --output=json $D/${image}`, ...then],
  };
}

/** A small qcow2 image and a raw one. */
const SMALL = ['qemu-img create -q -f qcow2 $D/q.qcow2 1M', 'qemu-img create -q -f raw $D/a.raw 1M'];

function img(cmd: string, setup: string[] = SMALL): DiffCase {
  return { setup, cmd };
}

export const IMG_MISC_CASES: DiffCase[] = [
  // --- --image-opts: a leading bare word is the implied "file" (a node reference), later ones short-form booleans
  img('info --image-opts $D/q.qcow2'),
  img("info --image-opts 'a,,b'"),
  img('info --image-opts $D/q.qcow2,driver=qcow2'),
  img('info --image-opts driver=qcow2,file=$D/q.qcow2'),
  img('check --image-opts driver=qcow2,file.filename=$D/q.qcow2,bar'),
  img(`info 'json:{"driver":"qcow2","file":"$D/q.qcow2"}'`),

  // --- --object help and errors
  img('info --object help'),
  img('info --object ?'),
  img('info --object help,id=x $D/q.qcow2'),
  img('info --object bogus,help'),
  img('info --object secret,help'),
  img('check --object secret,id=s,? $D/q.qcow2'),
  img('map --object throttle-group,help'),
  img('info --object tls-creds-x509,help'),
  img('info --object qom-type=help $D/q.qcow2'),
  img("info --object '' $D/q.qcow2"),
  img('info --object secret,help=on $D/q.qcow2'),
  img('info --object secret $D/q.qcow2'),
  img('info --object secret,id=s $D/q.qcow2'),
  img('info --object secret,id=s,data=x --object secret,id=s,data=y $D/q.qcow2'),
  img('info --object'),


  // --- growth with preallocation: every mode and cluster size lays the image out as QEMU does
  ...['metadata', 'falloc', 'full'].flatMap((p) => [
    grow('c64k.qcow2', `--preallocation=${p} IMG +3M`),
    grow('c4k.qcow2', `--preallocation=${p} IMG +3M`),
    grow('c512.qcow2', `--preallocation=${p} IMG 4M`),
    grow('ext.qcow2', `--preallocation=${p} IMG 4M`),
    grow('v2.qcow2', `--preallocation=${p} IMG 9M`),
    // the cluster straddling the old end keeps its data (copied into the new cluster for falloc/full)
    grow('odd.qcow2', `--preallocation=${p} IMG 2M`),
  ]),
  grow('c4k.qcow2', '--preallocation=off IMG +3M'),
  grow('c4k.qcow2', '--preallocation=bogus IMG +3M'),
  grow('c4k.qcow2', '--preallocation=metadata IMG 512k'),
  grow('c4k.qcow2', '--preallocation=metadata --shrink IMG 512k'),

  // --- shrinking drops the refcount blocks that count only freed space
  shrink('s512.qcow2', '5M'),
  shrink('s512.qcow2', '1M'),
  shrink('s4k.qcow2', '5M'),
  shrink('s1.qcow2', '5M'),
  shrink('s512.qcow2', '5M', ["qemu-io -c 'write -P 3 4M 1M' -c 'write -P 4 5M 2M' $D/s512.qcow2", 'qemu-img check $D/s512.qcow2', 'qemu-img map --output=json $D/s512.qcow2']),
];
