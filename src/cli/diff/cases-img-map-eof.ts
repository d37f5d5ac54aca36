/**
 * qemu-img differential cases for qcow2 images whose host file ends inside
 * (or before) a data cluster: the part past the end of the file reads as
 * zeroes, and map reports it as zero once the format's block status is
 * refined with the file's (qcow2 asks for that when the refcounts claim far
 * more clusters than the file has allocated, as here). The files are made
 * without holes before their end: Node cannot see holes (no SEEK_DATA), so
 * those are out of reach (see cases-img.ts).
 */
import type { DiffCase } from './harness.ts';

/**
 * e.qcow2: 64 KiB clusters, data at 0-128k and 512k-576k, the file cut at
 * 484000 (not a sector boundary) inside the last data cluster. s.qcow2:
 * 4 KiB clusters, cut at a sector boundary, with clusters wholly past the end.
 */
const CUT = [
  'qemu-img create -q -f qcow2 $D/e.qcow2 1M',
  "qemu-io -c 'write -P 0x11 0 128k' -c 'write -P 0x22 512k 64k' $D/e.qcow2",
  "qemu-io -f raw -c 'truncate 484000' $D/e.qcow2",
  'qemu-img create -q -f qcow2 -o cluster_size=4k $D/s.qcow2 256k',
  "qemu-io -c 'write -P 0x33 0 32k' -c 'write -P 0x44 128k 32k' $D/s.qcow2",
  "qemu-io -f raw -c 'truncate 40960' $D/s.qcow2",
];

export const IMG_MAP_EOF_CASES: DiffCase[] = [
  { name: 'map past EOF: json, cluster partly past the end of the file', setup: CUT, cmd: 'map --output=json $D/e.qcow2' },
  { name: 'map past EOF: human, cluster partly past the end of the file', setup: CUT, cmd: 'map $D/e.qcow2' },
  { name: 'map past EOF: json window inside the part past the end', setup: CUT, cmd: 'map --output=json --start-offset=540k --max-length=20k $D/e.qcow2' },
  { name: 'map past EOF: json window across the end of the file', setup: CUT, cmd: 'map --output=json --start-offset=520k --max-length=40k $D/e.qcow2' },
  { name: 'map past EOF: json, 4 KiB clusters wholly and partly past the end', setup: CUT, cmd: 'map --output=json $D/s.qcow2' },
  { name: 'map past EOF: human, 4 KiB clusters', setup: CUT, cmd: 'map $D/s.qcow2' },
  { name: 'map past EOF: check of the cut image', setup: CUT, cmd: 'check $D/e.qcow2' },
  { name: 'map past EOF: convert reads the part past the end as zeroes', setup: CUT, cmd: 'convert -O raw $D/e.qcow2 $D/out.raw', files: ['out.raw'] },
  { name: 'map past EOF: compare against its raw conversion', setup: [...CUT, 'qemu-img convert -O raw $D/s.qcow2 $D/s.raw'], cmd: 'compare $D/s.qcow2 $D/s.raw' },
];
