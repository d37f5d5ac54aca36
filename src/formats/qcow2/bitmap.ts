/**
 * Persistent dirty bitmaps, read side: the bitmap directory is parsed for
 * `qemu-img info` (name, granularity, flags). Loading, using and storing the
 * bitmaps themselves belongs to the dirty-bitmap work; until then images with
 * bitmaps open read-only only.
 */
import type { BdrvChild } from '../../core/child.ts';
import { BlockError } from '../../core/errors.ts';
import { bdrvPread } from '../../core/io.ts';
import type { BitmapsExtension } from './header.ts';

/** Bitmap directory entry flags (qcow2.txt, "Bitmap directory"). */
export const BME_FLAG = { IN_USE: 1, AUTO: 2, EXTRA_DATA_COMPATIBLE: 4 } as const;

/** One bitmap directory entry. */
export interface BitmapDirEntry {
  name: string;
  tableOffset: number;
  tableSize: number;
  flags: number;
  type: number;
  granularityBits: number;
}

/** Reads and decodes the bitmap directory described by the bitmaps extension. */
export async function readBitmapDirectory(file: BdrvChild, ext: BitmapsExtension): Promise<BitmapDirEntry[]> {
  const dir = await bdrvPread(file, ext.directoryOffset, ext.directorySize);
  const dv = new DataView(dir.buffer, dir.byteOffset, dir.byteLength);
  const out: BitmapDirEntry[] = [];
  let off = 0;
  const bad = (): BlockError => new BlockError('EINVAL', 'Bitmap directory is corrupted');
  while (off < dir.length) {
    if (off + 24 > dir.length) throw bad();
    const e: BitmapDirEntry = {
      tableOffset: Number(dv.getBigUint64(off)),
      tableSize: dv.getUint32(off + 8),
      flags: dv.getUint32(off + 12),
      type: dv.getUint8(off + 16),
      granularityBits: dv.getUint8(off + 17),
      name: '',
    };
    const ns = dv.getUint16(off + 18);
    const extra = dv.getUint32(off + 20);
    const end = off + 24 + extra + ns;
    if (end > dir.length) throw bad();
    e.name = new TextDecoder().decode(dir.subarray(off + 24 + extra, end));
    out.push(e);
    off = Math.ceil(end / 8) * 8;
  }
  if (out.length !== ext.nbBitmaps) throw bad();
  return out;
}

/** The bitmaps list of `qemu-img info` (QEMU's qcow2_get_bitmap_info_list). */
export function bitmapInfoList(entries: readonly BitmapDirEntry[]): Array<{ name: string; granularity: number; flags: string[] }> {
  return entries.map((e) => {
    const flags: string[] = [];
    if (e.flags & BME_FLAG.IN_USE) flags.push('in-use');
    if (e.flags & BME_FLAG.AUTO) flags.push('auto');
    return { name: e.name, granularity: 2 ** e.granularityBits, flags };
  });
}
