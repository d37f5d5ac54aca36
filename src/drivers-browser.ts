/**
 * Every driver usable in the browser, for building a Graph in the engine's
 * worker: `new Graph({ drivers: browserDrivers(), defaultProtocol: 'opfs' })`.
 * Engineers adding a driver that runs in browsers list it here.
 */
import type { BlockDriver } from './core/driver.ts';
import { filterDrivers } from './filters/index.ts';
import { qcow2Driver } from './formats/qcow2/index.ts';
import { rawDriver } from './formats/raw.ts';
import { blobDriver } from './protocols/blob.ts';
import { httpDriver } from './protocols/http.ts';
import { memoryDriver } from './protocols/memory.ts';
import { nullAioDriver, nullCoDriver } from './protocols/null.ts';
import { opfsDriver } from './protocols/opfs.ts';
import { setRawInflateAsync } from './formats/qcow2/compress.ts';
import { inflateRawStream, streamInflateAvailable } from './inflate-stream.ts';

// zlib clusters decode with the browser's native zlib (DecompressionStream) where it has deflate-raw; fflate stays the reference.
if (streamInflateAvailable()) setRawInflateAsync(inflateRawStream);

/**
 * The drivers a browser graph registers, protocols first; raw is always
 * present as the probing fallback. Filters join the process-wide throttle
 * group registry.
 */
export function browserDrivers(): BlockDriver[] {
  return [
    // protocols
    opfsDriver,
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
