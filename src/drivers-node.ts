/**
 * Every driver usable under Node, for building a Graph:
 * `new Graph({ drivers: nodeDrivers(), defaultProtocol: 'file' })`.
 * Engineers adding a driver that runs in Node list it here.
 */
import { inflateRawSync } from 'node:zlib';
import type { BlockDriver } from './core/driver.ts';
import { filterDrivers } from './filters/index.ts';
import { setRawInflate } from './formats/qcow2/compress.ts';
import { qcow2Driver } from './formats/qcow2/index.ts';
import { rawDriver } from './formats/raw.ts';
import { blobDriver } from './protocols/blob.ts';
import { fileDriver } from './protocols/file.ts';
import { httpDriver } from './protocols/http.ts';
import { memoryDriver } from './protocols/memory.ts';
import { nullAioDriver, nullCoDriver } from './protocols/null.ts';

// zlib clusters decode with Node's native zlib (several times fflate's speed); fflate stays the reference.
// One output chunk the size of the limit spares zlib's concatenation of 16 KiB chunks (~15% of a 64 KiB
// cluster's decode). Decoding on a worker thread instead was measured slower on the whole convert:
// the hand-offs cost more than the decode they move.
setRawInflate((src, maxOutput) => inflateRawSync(src, { maxOutputLength: maxOutput, chunkSize: Math.max(64, maxOutput) }));

/** The drivers a Node graph registers, protocols first; raw is always present as the probing fallback. */
export function nodeDrivers(): BlockDriver[] {
  return [
    // protocols
    fileDriver,
    httpDriver,
    blobDriver,
    memoryDriver,
    nullCoDriver,
    nullAioDriver,
    // formats
    rawDriver,
    qcow2Driver,
    // filters
    ...filterDrivers(),
  ];
}
