/**
 * Image information as QEMU's block/qapi.c gathers it (bdrv_query_image_info)
 * and the driver queries behind it (bdrv_get_info, bdrv_get_specific_info,
 * bdrv_get_allocated_file_size, bdrv_snapshot_list), with QEMU's fallbacks
 * through filters and primary children. The result uses QAPI's member names
 * so front ends print it as QEMU does.
 */
import type { BlockDriverInfo, ImageInfoSpecific, SnapshotInfo } from '../driver.ts';
import { BlockError, isBlockError, toBlockError } from '../errors.ts';
import { bdrvGetInfo, bdrvGetLength } from '../io.ts';
import type { BlockNode } from '../node.ts';
import { pathCombine } from './gate.ts';

/** QEMU's ImageInfo (QAPI), members named as in its JSON. */
export interface ImageInfo {
  filename: string;
  format: string;
  'dirty-flag'?: boolean;
  'actual-size'?: number;
  'virtual-size': number;
  'cluster-size'?: number;
  encrypted?: boolean;
  'backing-filename'?: string;
  'full-backing-filename'?: string;
  'backing-filename-format'?: string;
  snapshots?: SnapshotInfoJson[];
  'format-specific'?: ImageInfoSpecific;
}

/** One internal snapshot as QAPI's SnapshotInfo. */
export interface SnapshotInfoJson {
  id: string;
  name: string;
  'vm-state-size': number;
  'date-sec': number;
  'date-nsec': number;
  'vm-clock-sec': number;
  'vm-clock-nsec': number;
  icount?: number;
}

/** The node a filter passes everything to, or null (QEMU's bdrv_filter_bs). */
function filteredBs(bs: BlockNode): BlockNode | null {
  return bs.drv.kind === 'filter' ? bs.filteredChild?.bs ?? null : null;
}

/** QEMU's bdrv_get_info; lives in core/io.ts so drivers (raw) can pass it through too. */
export { bdrvGetInfo } from '../io.ts';

/** QEMU's bdrv_get_specific_info: the driver's format-specific info, or undefined when it has none. */
export async function bdrvGetSpecificInfo(bs: BlockNode): Promise<ImageInfoSpecific | undefined> {
  if (bs.drv.getSpecificInfo) return bs.drv.getSpecificInfo(bs);
  return undefined;
}

/**
 * QEMU's bdrv_get_allocated_file_size: what the driver reports, else the sum
 * over its storage children for formats, the filtered child for filters, or
 * ENOTSUP.
 */
export async function bdrvGetAllocatedFileSize(bs: BlockNode): Promise<number> {
  if (bs.drv.getAllocatedFileSize) return bs.drv.getAllocatedFileSize(bs);
  const f = filteredBs(bs);
  if (f) return bdrvGetAllocatedFileSize(f);
  if (bs.drv.kind === 'protocol') throw new BlockError('ENOTSUP', undefined, { node: bs.nodeName });
  // Formats: storage children (file, data-file), not the backing chain.
  let sum = 0;
  let any = false;
  for (const c of bs.children) {
    if (c === bs.backing) continue;
    try {
      sum += await bdrvGetAllocatedFileSize(c.bs);
      any = true;
    } catch (e) {
      if (!isBlockError(e, 'ENOTSUP')) throw e;
    }
  }
  if (!any) throw new BlockError('ENOTSUP', undefined, { node: bs.nodeName });
  return sum;
}

/** QEMU's bdrv_snapshot_list: the driver's snapshots, through filters; ENOTSUP when nothing below keeps any. */
export async function bdrvSnapshotList(bs: BlockNode): Promise<SnapshotInfo[]> {
  if (bs.drv.snapshotList) return bs.drv.snapshotList(bs);
  const f = filteredBs(bs) ?? (bs.drv.kind === 'format' && !bs.drv.supportsBacking ? bs.primaryChild?.bs ?? null : null);
  if (f) return bdrvSnapshotList(f);
  throw new BlockError('ENOTSUP', undefined, { node: bs.nodeName });
}

/** The backing file name resolved against the image's name, or undefined when that cannot be done (json: names). */
export function fullBackingFilename(bs: BlockNode): string | undefined {
  if (!bs.backingFile) return undefined;
  if (bs.fullBackingFilename) return bs.fullBackingFilename;
  if (bs.filename.startsWith('json:')) return undefined;
  return pathCombine(bs.filename, bs.backingFile);
}

/** Converts a driver's snapshot to QAPI's SnapshotInfo. */
export function snapshotToJson(sn: SnapshotInfo): SnapshotInfoJson {
  const out: SnapshotInfoJson = {
    id: sn.id,
    name: sn.name,
    'vm-state-size': sn.vmStateSize,
    'date-sec': sn.dateSec,
    'date-nsec': sn.dateNsec,
    'vm-clock-sec': Math.floor(sn.vmClockNsec / 1e9),
    'vm-clock-nsec': sn.vmClockNsec % 1e9,
  };
  if (sn.icount !== undefined) out.icount = sn.icount;
  return out;
}

/**
 * QEMU's bdrv_query_image_info: size, allocation, driver info, format-specific
 * info, backing file names and snapshots of `bs` alone (not its backing chain).
 */
export async function queryImageInfo(bs: BlockNode): Promise<ImageInfo> {
  let size: number;
  try {
    size = await bdrvGetLength(bs);
  } catch (e) {
    const be = toBlockError(e);
    throw new BlockError(be.code, `Can't get image size '${bs.filename}': ${be.message}`, { cause: e });
  }
  const info: ImageInfo = { filename: bs.filename, format: bs.drv.name, 'virtual-size': size };
  try {
    info['actual-size'] = await bdrvGetAllocatedFileSize(bs);
  } catch {
    // Unknown allocation is reported as absent ("disk size: unavailable").
  }
  if (bs.encrypted) info.encrypted = true;
  try {
    const bdi = await bdrvGetInfo(bs);
    if (bdi.clusterSize) info['cluster-size'] = bdi.clusterSize;
    info['dirty-flag'] = bdi.isDirty ?? false;
  } catch {
    // bdrv_get_info failing only leaves the fields out.
  }
  const spec = await bdrvGetSpecificInfo(bs);
  if (spec) info['format-specific'] = spec;
  if (bs.backingFile) {
    info['backing-filename'] = bs.backingFile;
    const full = fullBackingFilename(bs);
    if (full !== undefined) info['full-backing-filename'] = full;
    if (bs.backingFormat) info['backing-filename-format'] = bs.backingFormat;
  }
  try {
    const list = await bdrvSnapshotList(bs);
    if (list.length > 0) info.snapshots = list.map(snapshotToJson);
  } catch (e) {
    const code = toBlockError(e).code;
    if (code !== 'ENOTSUP' && code !== 'ENOMEDIUM') {
      throw new BlockError(code, `Can't list snapshots of device '${bs.displayName}': ${toBlockError(e).message}`, { cause: e });
    }
  }
  return info;
}
