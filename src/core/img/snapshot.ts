/**
 * Internal snapshots as `qemu-img snapshot` uses them (QEMU's
 * block/snapshot.c): list, create, apply and delete on the driver that
 * keeps snapshots, falling back through primary children (raw over a file
 * asks the file) the way bdrv_snapshot_fallback does.
 */
import type { SnapshotInfo } from '../driver.ts';
import { BlockError, STRERROR, toBlockError } from '../errors.ts';
import { bdrvDrainedBegin, bdrvDrainedEnd } from '../io.ts';
import type { BlockNode } from '../node.ts';
import { bdrvSnapshotList } from './info.ts';

/** Runs a snapshot operation with `bs` drained, as QEMU's bdrv_snapshot_* do: no request may see the tables change under it. */
async function drained<T>(bs: BlockNode, fn: () => Promise<T>): Promise<T> {
  await bdrvDrainedBegin(bs);
  try {
    return await fn();
  } finally {
    bdrvDrainedEnd(bs);
  }
}

/** The node snapshot operations fall back to (QEMU's bdrv_snapshot_fallback_child: the primary, filtered child). */
function fallback(bs: BlockNode): BlockNode | null {
  if (bs.drv.kind === 'protocol' || bs.drv.supportsBacking) return null;
  return bs.primaryChild?.bs ?? null;
}

/**
 * The first node at or below `bs` whose driver keeps snapshots but cannot do
 * `what`: then the error names the missing capability instead of QEMU's
 * generic "not supported", because QEMU's driver for that format can.
 */
function partialSupport(bs: BlockNode, what: 'create' | 'apply' | 'delete'): string | null {
  for (let n: BlockNode | null = bs; n; n = fallback(n)) {
    if (n.drv.snapshotList) return `the '${n.drv.name}' driver of this engine can list internal snapshots but cannot ${what} them yet`;
  }
  return null;
}

/** Snapshots of `bs`, or an empty list when the driver keeps none (dump_snapshots prints nothing then). */
export async function listSnapshots(bs: BlockNode): Promise<SnapshotInfo[]> {
  try {
    return await bdrvSnapshotList(bs);
  } catch {
    return [];
  }
}

/** QEMU's bdrv_snapshot_create; the error message is qemu-img's "Could not create snapshot" line. */
export async function createSnapshot(bs: BlockNode, name: string, now: Date = new Date()): Promise<void> {
  const ms = now.getTime();
  const sn: SnapshotInfo = { id: '', name, vmStateSize: 0, dateSec: Math.floor(ms / 1000), dateNsec: (ms % 1000) * 1e6, vmClockNsec: 0 };
  for (let n: BlockNode | null = bs; n; n = fallback(n)) {
    if (n.drv.snapshotCreate) {
      try {
        const drv = n.drv;
        const node = n;
        await drained(node, () => drv.snapshotCreate!(node, sn));
        return;
      } catch (e) {
        const code = toBlockError(e).code;
        throw new BlockError(code, `Could not create snapshot '${name}': -${errnoOf(code)} (${STRERROR[code]})`);
      }
    }
  }
  const why = partialSupport(bs, 'create');
  throw new BlockError('ENOTSUP', `Could not create snapshot '${name}': -95 (${STRERROR.ENOTSUP})${why ? ` (${why})` : ''}`);
}

/** QEMU's bdrv_snapshot_goto; errors read "Could not apply snapshot '…': …". */
export async function applySnapshot(bs: BlockNode, name: string): Promise<void> {
  for (let n: BlockNode | null = bs; n; n = fallback(n)) {
    // The snapshot's data would not match what the bitmaps recorded (QEMU checks every node it passes).
    if (n.dirtyBitmaps.length > 0) throw new BlockError('EBUSY', `Could not apply snapshot '${name}': Device has active dirty bitmaps`);
    if (n.drv.snapshotGoto) {
      try {
        const drv = n.drv;
        const node = n;
        await drained(node, () => drv.snapshotGoto!(node, name));
        return;
      } catch (e) {
        // bdrv_snapshot_goto reports every driver failure as "Failed to load snapshot" with the errno text.
        const code = toBlockError(e).code;
        throw new BlockError(code, `Could not apply snapshot '${name}': Failed to load snapshot: ${STRERROR[code]}`);
      }
    }
  }
  const why = partialSupport(bs, 'apply');
  throw new BlockError('ENOTSUP', `Could not apply snapshot '${name}': ${why ? `Operation not supported (${why})` : 'Block driver does not support snapshots'}`);
}

/** qemu-img's delete: QEMU's bdrv_snapshot_find (by name) then bdrv_snapshot_delete, with qemu-img's messages. */
export async function deleteSnapshot(bs: BlockNode, name: string): Promise<void> {
  const list = await listSnapshots(bs);
  // qemu-img looks the snapshot up by name only (bdrv_snapshot_find), then deletes by that id and name.
  const sn = list.find((s) => s.name === name);
  if (!sn) throw new BlockError('ENOENT', `Could not delete snapshot '${name}': snapshot not found`);
  for (let n: BlockNode | null = bs; n; n = fallback(n)) {
    if (n.drv.snapshotDelete) {
      try {
        const drv = n.drv;
        const node = n;
        await drained(node, () => drv.snapshotDelete!(node, sn.id, sn.name));
        return;
      } catch (e) {
        throw new BlockError(toBlockError(e).code, `Could not delete snapshot '${name}': ${toBlockError(e).message}`);
      }
    }
  }
  const why = partialSupport(bs, 'delete');
  throw new BlockError('ENOTSUP', `Could not delete snapshot '${name}': Operation not supported${why ? ` (${why})` : ''}`);
}

function errnoOf(code: keyof typeof STRERROR): number {
  return new BlockError(code).errno;
}

/**
 * QEMU's bdrv_snapshot_load_tmp: `bs` (read-only) shows snapshot `id` and/or
 * `name` until it is closed. No fallback to children, as in QEMU; errors are
 * qemu-img's "Failed to load snapshot: …" lines.
 */
export async function loadSnapshotTmp(bs: BlockNode, id: string | undefined, name: string | undefined): Promise<void> {
  if (id === undefined && name === undefined) throw new BlockError('EINVAL', 'Failed to load snapshot: snapshot_id and name are both NULL');
  const drv = bs.drv;
  if (!drv.snapshotLoadTmp) {
    throw new BlockError('ENOTSUP', `Failed to load snapshot: Block format '${drv.name}' used by device '' does not support temporarily loading internal snapshots`);
  }
  try {
    await drained(bs, () => drv.snapshotLoadTmp!(bs, id, name));
  } catch (e) {
    const be = toBlockError(e);
    throw new BlockError(be.code, `Failed to load snapshot: ${be.message}`);
  }
}

/** QEMU's bdrv_snapshot_load_tmp_by_id_or_name: by id first, then by name when no id matches. */
export async function loadSnapshotTmpByIdOrName(bs: BlockNode, idOrName: string): Promise<void> {
  try {
    await loadSnapshotTmp(bs, idOrName, undefined);
  } catch (e) {
    if (toBlockError(e).code !== 'ENOENT') throw e;
    await loadSnapshotTmp(bs, undefined, idOrName);
  }
}
