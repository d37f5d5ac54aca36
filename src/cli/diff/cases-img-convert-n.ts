/**
 * Differential cases for `convert -n` into an existing qcow2 image: QEMU
 * does not recreate the target, so where the data lands depends on what the
 * target already holds. Zero runs are written with MAY_UNMAP (no backing
 * file, no --target-is-zero), which frees the target's old clusters, and
 * QEMU's next allocation reuses them at once. After each run QEMU's own
 * `map --output=json` (host offsets included) and `check` of the target
 * must agree. Only in-order runs are compared: with -W the placement
 * depends on coroutine scheduling even between two QEMU runs.
 */
import type { DiffCase } from './harness.ts';

/** src.qcow2: data, a zero-flagged cluster, a cluster of written zeroes and a tail cluster, 8 MiB. */
const SRC = [
  'qemu-img create -q -f qcow2 $D/src.qcow2 8M',
  "qemu-io -c 'write -P 1 0 64k' -c 'write -P 2 1M 2M' -c 'write -z 4M 64k' -c 'write -P 0 5M 64k' -c 'write -P 3 7M 4k' $D/src.qcow2",
];

/** Target preparations, each applied to $D/t.qcow2 after it is created at 8 MiB. */
const TARGETS: Array<{ name: string; steps: string[] }> = [
  { name: 'fresh', steps: [] },
  { name: 'pre-written', steps: ["qemu-io -c 'write -P 9 3M 1M' -c 'write -P 8 0 4k' $D/t.qcow2"] },
  { name: 'pre-written over zero runs', steps: ["qemu-io -c 'write -P 9 3M 1M' -c 'write -P 8 5M 64k' $D/t.qcow2"] },
  { name: 'fully written', steps: ["qemu-io -c 'write -P 9 0 8M' $D/t.qcow2"] },
  { name: 'with a bitmap', steps: ['qemu-img bitmap --add $D/t.qcow2 b0'] },
  {
    name: 'pre-written with bitmaps',
    steps: [
      "qemu-io -c 'write -P 9 0 8M' $D/t.qcow2",
      'qemu-img bitmap --add $D/t.qcow2 b0',
      'qemu-img bitmap --add -g 4k --disable $D/t.qcow2 b1',
    ],
  },
  { name: 'with a compressed cluster', steps: ["qemu-io -c 'write -P 9 2M 4M' -c 'write -c 6M 64k' $D/t.qcow2"] },
];

/** The target as QEMU sees it: layout with host offsets, and check. */
const AFTER = ['qemu-img map --output=json $D/t.qcow2', 'qemu-img check $D/t.qcow2', 'qemu-img info $D/t.qcow2'];

/** Disk size counts blocks Node cannot punch out of freed clusters. */
const DISK_SIZE = { re: /^disk size: .*$/gm, why: 'Node cannot punch holes into freed clusters' };

function cases(): DiffCase[] {
  const out: DiffCase[] = [];
  for (const t of TARGETS) {
    for (const opts of ['', '-m 1', '-S 8k', '-m 2 -S 0']) {
      out.push({
        name: `convert -n ${opts ? `${opts} ` : ''}into a ${t.name} qcow2 target: same map and check`,
        setup: [...SRC, 'qemu-img create -q -f qcow2 $D/t.qcow2 8M', ...t.steps],
        cmd: `convert -n ${opts ? `${opts} ` : ''}-O qcow2 $D/src.qcow2 $D/t.qcow2`,
        images: ['t.qcow2'],
        after: AFTER,
        mask: [DISK_SIZE],
      });
    }
  }
  // A smaller target than the source is an error before anything is written.
  out.push({
    name: 'convert -n into a smaller qcow2 target',
    setup: [...SRC, 'qemu-img create -q -f qcow2 $D/t.qcow2 4M'],
    cmd: 'convert -n -O qcow2 $D/src.qcow2 $D/t.qcow2',
    after: AFTER,
    mask: [DISK_SIZE],
  });
  // --target-is-zero skips the zero writes, so the old clusters stay where they are.
  out.push({
    name: 'convert -n --target-is-zero into a fresh qcow2 target',
    setup: [...SRC, 'qemu-img create -q -f qcow2 $D/t.qcow2 8M'],
    cmd: 'convert -n --target-is-zero -O qcow2 $D/src.qcow2 $D/t.qcow2',
    images: ['t.qcow2'],
    after: AFTER,
    mask: [DISK_SIZE],
  });
  return out;
}

/** Node names QEMU makes up ("#block123") differ in numbering; only their presence matters. */
const NODE_NAMES = { re: /#block\d+/g, why: 'automatic node names are numbered per process' };

/** The target through blkdebug: `rule` is the JSON of its error rules, `file` the image under $D. */
function blkdebug(file: string, rules: string): string {
  return `json:{"driver":"qcow2","file":{"driver":"blkdebug",${rules},"image":{"driver":"file","filename":"$D/${file}"}}}`;
}

/**
 * Storing the target's bitmap at close fails: the convert allocates nothing
 * (the target is fully allocated), so the first cluster allocation is the
 * bitmap's and fails. QEMU reports the lost bitmaps, keeps the exit status,
 * and leaves an image that checks clean with the bitmap still in use.
 */
const LOST_BITMAPS: DiffCase[] = [
  {
    name: 'convert -n into a target whose bitmaps cannot be stored at close: "Lost persistent bitmaps"',
    setup: [
      'qemu-img create -q -f qcow2 $D/full.qcow2 1M',
      "qemu-io -c 'write -P 1 0 1M' $D/full.qcow2",
      'qemu-img create -q -f qcow2 $D/t.qcow2 1M',
      "qemu-io -c 'write -P 2 0 1M' $D/t.qcow2",
      'qemu-img bitmap --add $D/t.qcow2 b0',
    ],
    cmd: `convert -n -O qcow2 $D/full.qcow2 '${blkdebug('t.qcow2', '"inject-error":[{"event":"cluster_alloc","errno":28}]')}'`,
    images: ['t.qcow2'],
    after: AFTER,
    mask: [DISK_SIZE, NODE_NAMES],
  },
];

/** qemu-img cases. */
export const IMG_CONVERT_N_CASES: DiffCase[] = [...cases(), ...LOST_BITMAPS];

/**
 * qemu-io cases: a zero write with unmap (and a discard) frees clusters that
 * the next write of the same run reuses, as QEMU's in-memory refcount
 * decrement allows.
 */
export const IO_REUSE_CASES: DiffCase[] = [
  ...[
    "-c 'write -z -u 3M 4M' -c 'write -P 5 7M 64k'",
    "-c 'discard 3M 1M' -c 'write -P 5 7M 128k'",
    "-c 'write -z -u 3M 512k' -c 'write -P 5 6M 64k' -c 'write -z -u 3584k 512k' -c 'write -P 6 7M 1M'",
  ].map((c) => ({
    name: `qemu-io ${c} on a written qcow2: freed clusters are reused like QEMU`,
    setup: ['qemu-img create -q -f qcow2 $D/t.qcow2 8M', "qemu-io -c 'write -P 9 3M 1M' $D/t.qcow2"],
    cmd: `${c} $D/t.qcow2`,
    after: AFTER,
    mask: [DISK_SIZE],
  })),
  {
    // After the flush every write fails: the bitmap cannot be stored at close, and neither can the caches.
    name: 'qemu-io close that cannot store the bitmaps: "Lost persistent bitmaps" and the cache flush errors',
    setup: ['qemu-img create -q -f qcow2 $D/t.qcow2 1M', 'qemu-img bitmap --add $D/t.qcow2 b0'],
    cmd: `-c 'write 0 64k' -c flush '${blkdebug('t.qcow2', '"set-state":[{"event":"flush_to_disk","new_state":2}],"inject-error":[{"event":"pwritev","state":2,"errno":28}]')}'`,
    after: AFTER,
    mask: [DISK_SIZE, NODE_NAMES],
  },
];
