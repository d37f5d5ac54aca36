/**
 * Changing the backing file reference of a qcow2 image (QEMU's
 * qcow2_change_backing_file): the name lives at the end of the first
 * cluster, after the header extensions, and the format in the
 * backing-format extension, so both are rewritten with the whole first
 * cluster in one write: a crash leaves the old header or the new one.
 */
import { BlockError } from '../../core/errors.ts';
import type { BlockNode } from '../../core/node.ts';
import { checkUsable, writeHeaderRaw } from './alloc.ts';
import { AUTOCLEAR, LIMITS } from './header.ts';
import { state } from './state.ts';

/**
 * Records `backingFile` ('' = none) and `backingFmt` in the image header.
 * EINVAL when a backing file is added to an image whose raw external data
 * file must stand alone, or when the name is longer than QEMU accepts;
 * ENOSPC ("No space left in the file header" at the tool level) when the
 * header, its extensions and the name do not fit in the first cluster, in
 * which case nothing is written and the image keeps its old reference.
 */
export async function qcow2ChangeBackingFile(bs: BlockNode, backingFile: string, backingFmt: string | undefined): Promise<void> {
  const s = state(bs);
  checkUsable(s);
  const file = backingFile !== '' ? backingFile : undefined;
  if (file !== undefined && s.hasDataFile && (s.header.autoclearFeatures & AUTOCLEAR.DATA_FILE_RAW) !== 0n) {
    // A raw data file must stay readable without the qcow2 metadata, which a backing file would break.
    throw new BlockError('EINVAL', undefined, { node: bs.nodeName });
  }
  if (file !== undefined && new TextEncoder().encode(file).length > LIMITS.MAX_BACKING_NAME) {
    throw new BlockError('EINVAL', undefined, { node: bs.nodeName });
  }
  // QEMU keeps the format in a 16-byte field: longer names are cut to 15 bytes.
  const fmt = backingFmt !== undefined ? truncateUtf8(backingFmt, LIMITS.MAX_BACKING_FORMAT) : undefined;
  await s.lock.run(async () => {
    const oldFile = s.imageBackingFile;
    const oldFmt = s.ext.backingFormat;
    if (file !== undefined) s.imageBackingFile = file;
    else delete s.imageBackingFile;
    if (fmt !== undefined) s.ext.backingFormat = fmt;
    else delete s.ext.backingFormat;
    try {
      await writeHeaderRaw(s);
    } catch (e) {
      // serializeHeader fails before anything is written; memory goes back to what the file says.
      if (oldFile !== undefined) s.imageBackingFile = oldFile;
      else delete s.imageBackingFile;
      if (oldFmt !== undefined) s.ext.backingFormat = oldFmt;
      else delete s.ext.backingFormat;
      throw e;
    }
  });
  bs.backingFile = file ?? '';
  bs.backingFormat = fmt ?? '';
}

/** The longest prefix of `text` whose UTF-8 encoding has at most `max` bytes. */
function truncateUtf8(text: string, max: number): string {
  const bytes = new TextEncoder().encode(text);
  if (bytes.length <= max) return text;
  return new TextDecoder().decode(bytes.subarray(0, max)).replace(/\uFFFD+$/, '');
}
