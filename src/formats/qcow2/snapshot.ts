/**
 * Internal snapshot table, read side (QEMU's qcow2_do_read_snapshots without
 * repair): every entry is parsed and checked at open so a broken table is
 * rejected with QEMU's message, and the list is kept for snapshotList and
 * for later writes (unknown extra data is kept byte for byte).
 */
import type { BdrvChild } from '../../core/child.ts';
import { BlockError, toBlockError } from '../../core/errors.ts';
import { bdrvPread } from '../../core/io.ts';
import { LIMITS, readU64 } from './header.ts';

/** One snapshot table entry (QCowSnapshot). */
export interface Qcow2Snapshot {
  l1TableOffset: number;
  l1Size: number;
  id: string;
  name: string;
  diskSize: number;
  vmStateSize: number;
  dateSec: number;
  dateNsec: number;
  vmClockNsec: number;
  icount?: number;
  /** extra_data_size as stored. */
  extraDataSize: number;
  /** Extra data beyond the known 24 bytes. */
  unknownExtraData: Uint8Array;
}

/** Reads and validates `count` snapshot entries at `offset`; `diskSize` is used when an entry does not record its own. */
export async function readSnapshots(file: BdrvChild, offset: number, count: number, diskSize: number): Promise<{ snapshots: Qcow2Snapshot[]; size: number }> {
  const out: Qcow2Snapshot[] = [];
  if (count === 0) return { snapshots: out, size: 0 };
  const start = offset;
  let tableLength = 0;
  const fail = (e: unknown): never => {
    const be = toBlockError(e);
    throw new BlockError(be.code, `Failed to read snapshot table: ${be.message}`);
  };
  const td = new TextDecoder();
  for (let i = 0; i < count; i++) {
    tableLength = Math.ceil(tableLength / 8) * 8;
    offset = Math.ceil(offset / 8) * 8;
    const h = await bdrvPread(file, offset, LIMITS.SNAPSHOT_HEADER_SIZE).catch(fail);
    const dv = new DataView(h.buffer, h.byteOffset, h.byteLength);
    offset += LIMITS.SNAPSHOT_HEADER_SIZE;
    const sn: Qcow2Snapshot = {
      l1TableOffset: readU64(dv, 0),
      l1Size: dv.getUint32(8),
      id: '',
      name: '',
      diskSize: diskSize,
      vmStateSize: dv.getUint32(32),
      dateSec: dv.getUint32(16),
      dateNsec: dv.getUint32(20),
      vmClockNsec: readU64(dv, 24),
      extraDataSize: dv.getUint32(36),
      unknownExtraData: new Uint8Array(0),
    };
    const idSize = dv.getUint16(12);
    const nameSize = dv.getUint16(14);
    if (sn.extraDataSize > LIMITS.MAX_SNAPSHOT_EXTRA_DATA) {
      throw new BlockError('EFBIG', `Too much extra metadata in snapshot table entry ${i}`);
    }
    const known = Math.min(24, sn.extraDataSize);
    const extra = await bdrvPread(file, offset, 24).catch(fail);
    extra.fill(0, known);
    const edv = new DataView(extra.buffer, extra.byteOffset, extra.byteLength);
    offset += known;
    if (sn.extraDataSize >= 8) sn.vmStateSize = readU64(edv, 0);
    if (sn.extraDataSize >= 16) sn.diskSize = readU64(edv, 8);
    if (sn.extraDataSize >= 24) sn.icount = readU64(edv, 16);
    if (sn.extraDataSize > 24) {
      sn.unknownExtraData = await bdrvPread(file, offset, sn.extraDataSize - 24).catch(fail);
      offset += sn.extraDataSize - 24;
    }
    sn.id = td.decode(await bdrvPread(file, offset, idSize).catch(fail));
    offset += idSize;
    sn.name = td.decode(await bdrvPread(file, offset, nameSize).catch(fail));
    offset += nameSize;
    tableLength += LIMITS.SNAPSHOT_HEADER_SIZE + sn.extraDataSize + idSize + nameSize;
    if (tableLength > LIMITS.MAX_SNAPSHOTS_SIZE || offset - start > 0x7fffffff) {
      throw new BlockError('EFBIG', 'Snapshot table is too big');
    }
    out.push(sn);
  }
  return { snapshots: out, size: offset - start };
}
