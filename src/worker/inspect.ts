/**
 * Inspector queries over the images an EngineHost holds open: what the web
 * inspector needs beyond the host's own API (qcow2 header fields, L1/L2 and
 * refcount tables, what each host cluster holds, raw bytes of the image
 * file, the guest's partition table, HTTP counters, the formats that can be
 * created with their options, and which actions the engine can do today).
 *
 * It also runs the qemu-img operations the inspector offers that the host
 * does not expose: compare, commit and rebase as jobs with progress and
 * abort, internal snapshots (create, apply, delete) and persistent dirty
 * bitmaps (add, remove, clear, enable, disable, and their dirty areas).
 * Whatever the engine cannot do yet fails with the engine's own error, in
 * QEMU's words, and its code crosses to the page intact.
 *
 * Glue only, like the host: decoding lives in src/formats/qcow2/inspect.ts
 * and src/core/partitions.ts, the operations in src/core/img. `layer`
 * selects an image of the backing chain (0 = the image itself, 1 = its
 * backing image…).
 */
import { transfer } from 'comlink';
import { BlockBackend } from '../core/block-backend.ts';
import type { BdrvChild } from '../core/child.ts';
import { BlockError, toBlockError } from '../core/errors.ts';
import { bdrvFindDirtyBitmap } from '../core/dirty-bitmap.ts';
import { runBitmapActions, type BitmapAction } from '../core/img/bitmap.ts';
import { commitImage, rebaseImage } from '../core/img/chain.ts';
import { CompareError, compareImages } from '../core/img/compare.ts';
import { applySnapshot, createSnapshot, deleteSnapshot, listSnapshots } from '../core/img/snapshot.ts';
import { snapshotToJson, type SnapshotInfoJson } from '../core/img/info.ts';
import { bdrvFlush, bdrvGetLength, bdrvPread } from '../core/io.ts';
import type { BlockNode } from '../core/node.ts';
import type { OptionSpec } from '../core/options.ts';
import { readPartitionTable, type PartitionTable } from '../core/partitions.ts';
import { PERM } from '../core/types.ts';
import { pathCombine } from '../core/img/gate.ts';
import { dirtyRuns, hostLayout, inspectHeader, readHeader, readL1, readL2, readRefcounts, readStoredBitmap, requireQcow2, type StoredBitmapView, type HostExtent, type L1EntryView, type L2EntryView, type Qcow2HeaderView } from '../formats/qcow2/inspect.ts';
import { httpStats, type HttpStats } from '../protocols/http.ts';
import { protocolOf, type EngineHost } from './host.ts';
import { JobBackend, runJob, type Job, type ProgressSink } from './jobs.ts';

export type { StoredBitmapView, HostExtent, HostExtentKind, L1EntryView, L2EntryType, L2EntryView, Qcow2HeaderView, FeatureBit, HeaderExtension, HeaderField } from '../formats/qcow2/inspect.ts';
export type { PartitionEntry, PartitionTable } from '../core/partitions.ts';
export type { SnapshotInfoJson } from '../core/img/info.ts';
export type { HttpStats } from '../protocols/http.ts';

/** Largest host read the hex view may ask for at once. */
const MAX_HOST_READ = 1 << 20;
/** Most table entries returned per call. */
const MAX_ENTRIES = 65536;

/** Whether an action can be done, and if not, why (shown to the user as it is). */
export interface Availability {
  ok: boolean;
  reason?: string;
}

/** What the engine can do with one open image today. */
export interface ImageCapabilities {
  /** L1/L2/refcount tables and host layout (qcow2 only). */
  tables: Availability;
  /** qemu-img check. */
  check: Availability;
  /** qemu-img check -r leaks (needs a writable image and a check). */
  repair: Availability;
  /** Convert targets by format name. */
  convert: Record<string, Availability>;
  compare: Availability;
  commit: Availability;
  rebase: Availability;
  /** Creating, applying and deleting internal snapshots. */
  snapshots: Availability;
  /** Changing persistent dirty bitmaps. */
  bitmaps: Availability;
  /** Writing guest data (qemu-io write). */
  write: Availability;
}

/** One layer of the chain with where its bytes live. */
export interface LayerFile {
  layer: number;
  node: string;
  format: string;
  filename: string;
  /** Driver of the storage below the format ('opfs', 'http', 'blob'…). */
  protocol: string;
  /** Length of the image file in bytes. */
  fileLength: number;
  readOnly: boolean;
}

/** What compare() found: qemu-img compare's verdict and the lines it prints. */
export interface CompareReport {
  identical: boolean;
  /** "Images are identical." or where they first differ, as qemu-img says it. */
  lines: string[];
}

/** How to rebase an image. */
export interface RebaseRequest {
  /** New backing file name as recorded in the image, relative to it ('' = no backing file: the image is made standalone). */
  backing: string;
  backingFmt?: string;
  /** Only rewrite the name (qemu-img rebase -u); the caller vouches the contents match. */
  unsafe?: boolean;
}

/** A dirty bitmap of an image, as the inspector lists it. */
export interface BitmapView {
  name: string;
  granularity: number;
  /** qemu-img info's flags: 'auto' (enabled: writes mark it), 'in-use' (inconsistent). */
  flags: string[];
  /** The image file holds it now; false for one the open image will store when it is closed. */
  inFile: boolean;
}

/** How to commit an image. */
export interface CommitRequest {
  /**
   * Empty the image afterwards, as plain `qemu-img commit` does; false
   * leaves it as it is (`-d`). Default false.
   */
  empty?: boolean;
}

/** One change to a persistent dirty bitmap (qemu-img bitmap --add, --remove…). */
export interface BitmapRequest {
  op: 'add' | 'remove' | 'clear' | 'enable' | 'disable';
  /** Bytes per bit of a new bitmap (--add -g); the driver's default when absent. */
  granularity?: number;
}

/** A format that can be created, with its create options. */
export interface CreatableFormat {
  name: string;
  options: OptionSpec[];
}

/** The inspector's worker-side service (handed to the page as a comlink proxy by EngineHost.inspector()). */
export class InspectService {
  /** Serves queries over the images `host` holds open. */
  constructor(private readonly host: EngineHost) {}

  /** The node of `layer` in image `id`'s chain. */
  private layerNode(id: string, layer = 0): BlockNode {
    let n: BlockNode | undefined = this.host.node(id);
    for (let i = 0; i < layer && n; i++) n = n.backing?.bs;
    if (!n) throw new BlockError('EINVAL', `Image '${id}' has no backing layer ${layer}`, { node: id });
    return n;
  }

  /** The child holding the layer's image file; a writable image is flushed first so the file is current. */
  private async fileOf(id: string, layer: number): Promise<{ bs: BlockNode; file: BdrvChild }> {
    const bs = this.layerNode(id, layer);
    if (!bs.file) throw new BlockError('ENOTSUP', `'${bs.nodeName}' has no image file below it`, { node: bs.nodeName });
    if (!bs.readOnly) await bdrvFlush(bs);
    return { bs, file: bs.file };
  }

  /** Each layer of the chain with its storage protocol and file length. */
  async layers(id: string): Promise<LayerFile[]> {
    const out: LayerFile[] = [];
    let layer = 0;
    for (let n: BlockNode | undefined = this.host.node(id); n; n = n.backing?.bs, layer++) {
      const st = protocolOf(n);
      out.push({ layer, node: n.nodeName, format: n.drv.name, filename: n.filename, protocol: st.drv.name, fileLength: await bdrvGetLength(st), readOnly: n.readOnly });
    }
    return out;
  }

  /** The qcow2 header of a layer, field by field. */
  async header(id: string, layer = 0): Promise<Qcow2HeaderView> {
    const { bs, file } = await this.fileOf(id, layer);
    requireQcow2(bs.drv.name, bs.nodeName);
    return inspectHeader(file);
  }

  /** Active L1 entries [start, start+count) of a qcow2 layer. */
  async l1(id: string, start: number, count: number, layer = 0): Promise<L1EntryView[]> {
    const { bs, file } = await this.fileOf(id, layer);
    requireQcow2(bs.drv.name, bs.nodeName);
    const { header } = await readHeader(file);
    return readL1(file, header, start, Math.min(count, MAX_ENTRIES));
  }

  /** Entries [start, start+count) of the L2 table behind L1 entry `l1Index`. */
  async l2(id: string, l1Index: number, start: number, count: number, layer = 0): Promise<L2EntryView[]> {
    const { bs, file } = await this.fileOf(id, layer);
    requireQcow2(bs.drv.name, bs.nodeName);
    const { header } = await readHeader(file);
    return readL2(file, header, l1Index, start, Math.min(count, MAX_ENTRIES));
  }

  /** Refcounts of host clusters [start, start+count). */
  async refcounts(id: string, start: number, count: number, layer = 0): Promise<number[]> {
    const { bs, file } = await this.fileOf(id, layer);
    requireQcow2(bs.drv.name, bs.nodeName);
    const { header } = await readHeader(file);
    return readRefcounts(file, header, start, Math.min(count, MAX_ENTRIES));
  }

  /** What each host cluster of a qcow2 layer holds; progress counts L1 entries walked. */
  async hostLayout(id: string, layer = 0, progress?: ProgressSink, signal?: AbortSignal): Promise<HostExtent[]> {
    const { bs, file } = await this.fileOf(id, layer);
    requireQcow2(bs.drv.name, bs.nodeName);
    return runJob(progress, signal, 1, async (job) => hostLayout(file, async (done, total) => {
      job.total = total;
      await job.step(done);
    }));
  }

  /** Bytes [offset, offset+length) of a layer's image file, as stored (at most 1 MiB, cut at the end of the file). */
  async readHost(id: string, offset: number, length: number, layer = 0): Promise<Uint8Array> {
    const { file } = await this.fileOf(id, layer);
    const size = await bdrvGetLength(file.bs);
    const start = Math.max(0, Math.min(Math.floor(offset), size));
    const n = Math.max(0, Math.min(Math.floor(length), MAX_HOST_READ, size - start));
    const buf = n > 0 ? await bdrvPread(file, start, n) : new Uint8Array(0);
    return transfer(buf, [buf.buffer as ArrayBuffer]);
  }

  /** The partition table of the guest disk (MBR or GPT), or null when it has none. */
  async partitions(id: string): Promise<PartitionTable | null> {
    const bs = this.host.node(id);
    const blk = new BlockBackend(this.host.graph, { perm: PERM.CONSISTENT_READ, sharedPerm: PERM.ALL });
    blk.insertNode(bs);
    try {
      const size = await blk.getLength();
      return await readPartitionTable((offset, length) => blk.read(offset, length), size);
    } catch (e) {
      throw toBlockError(e);
    } finally {
      await blk.close().catch(() => undefined);
    }
  }

  /** HTTP counters summed over every http node of the image's chain (undefined when none is http). */
  httpStats(id: string): HttpStats | undefined {
    let sum: HttpStats | undefined;
    for (let n: BlockNode | undefined = this.host.node(id); n; n = n.backing?.bs) {
      const s = httpStats(protocolOf(n));
      if (!s) continue;
      if (!sum) sum = { ...s };
      else for (const k of Object.keys(s) as Array<keyof HttpStats>) sum[k] += s[k];
    }
    return sum;
  }

  /** Format drivers that can create images, with their create options. */
  formats(): CreatableFormat[] {
    const out: CreatableFormat[] = [];
    for (const d of this.host.graph.drivers.values()) {
      if (!(d.kind === 'format' && d.create)) continue;
      // Encryption options are listed by qemu-img but every encrypted create fails here: the form leaves them out.
      const options = (d.createOptions ?? []).filter((o) => o.name !== 'encryption' && !o.name.startsWith('encrypt.'));
      // The size leads the form whatever the driver's declaration order (which follows QEMU's "Formatting" line).
      options.sort((a, b) => Number(b.name === 'size') - Number(a.name === 'size'));
      out.push({ name: d.name, options });
    }
    return out;
  }

  /** What the engine can do with the image today, with a reason for each thing it cannot. */
  capabilities(id: string): ImageCapabilities {
    const bs = this.host.node(id);
    const qcow2 = bs.drv.name === 'qcow2';
    const inOpfs = protocolOf(bs).drv.name === 'opfs';
    const check: Availability = bs.drv.check ? { ok: true } : { ok: false, reason: `${bs.drv.name} images have no consistency check (as in qemu-img)` };
    // Operations that modify the image: only on library images (the user's own files are never written) opened read-write.
    const modify = (what: string): Availability => {
      if (!inOpfs) return { ok: false, reason: `${what} changes the image, and only images in the library are changed (import this one first)` };
      if (bs.readOnly) return { ok: false, reason: `The image is open read-only; reopen it for writing to ${what.toLowerCase()}` };
      return { ok: true };
    };
    const repair: Availability = check.ok ? modify('Repairing') : check;
    const convert: Record<string, Availability> = {};
    for (const f of this.formats()) convert[f.name] = { ok: true };
    let commit: Availability = bs.backing ? modify('Committing') : { ok: false, reason: 'The image has no backing file to commit into' };
    if (commit.ok && protocolOf(bs.backing!.bs).drv.name !== 'opfs') commit = { ok: false, reason: 'The backing file is not in the library, so it cannot be written' };
    // Whether the driver can do it is the engine's to say, in QEMU's words, when it is tried.
    const rebase: Availability = modify('Rebasing');
    const snapshots: Availability = modify('Taking or applying a snapshot');
    const bitmaps: Availability = modify('Changing a bitmap');
    const write: Availability = modify('Writing');
    return {
      tables: qcow2 ? { ok: true } : { ok: false, reason: `${bs.drv.name} images have no L1/L2 or refcount tables` },
      check,
      repair,
      convert,
      compare: { ok: true },
      commit,
      rebase,
      snapshots,
      bitmaps,
      write,
    };
  }

  /** A read-only backend on `bs` whose reads tick `job` (so the operation notices an abort). */
  private source(bs: BlockNode, job: Job): JobBackend {
    const blk = new JobBackend(this.host.graph, job);
    blk.insertNode(bs);
    return blk;
  }

  /** qemu-img compare of two open images' guest contents; progress in bytes of the larger image. */
  async compare(idA: string, idB: string, progress?: ProgressSink, signal?: AbortSignal): Promise<CompareReport> {
    const a = this.host.node(idA);
    const b = this.host.node(idB);
    const total = Math.max(await bdrvGetLength(a), await bdrvGetLength(b));
    return runJob(progress, signal, total, async (job) => {
      const sa = this.source(a, job);
      const sb = this.source(b, job);
      const lines: string[] = [];
      let done = 0;
      try {
        const status = await compareImages({ blk: sa, filename: a.filename }, { blk: sb, filename: b.filename }, {
          say: (l) => lines.push(l),
          progress: (delta) => job.report((done += delta)),
        });
        return { identical: status === 0, lines };
      } catch (e) {
        if (e instanceof CompareError) throw new BlockError('EIO', e.message);
        throw toBlockError(e);
      } finally {
        await sa.close().catch(() => undefined);
        await sb.close().catch(() => undefined);
      }
    });
  }

  /**
   * qemu-img commit: copies what the image holds into its backing file,
   * then empties the image (`req.empty`) or leaves it as it is (-d).
   * Progress is in guest bytes.
   */
  async commit(id: string, req: CommitRequest = {}, progress?: ProgressSink, signal?: AbortSignal): Promise<void> {
    const bs = this.host.node(id);
    const cap = this.capabilities(id).commit;
    if (!cap.ok) throw new BlockError('ENOTSUP', cap.reason, { node: id });
    const total = await bdrvGetLength(bs);
    await runJob(progress, signal, total, async (job) => {
      const top = this.source(bs, job);
      try {
        await commitImage(top, { filename: bs.filename, drop: req.empty !== true, progress: (pct) => job.report(Math.round((pct / 100) * total)) });
      } finally {
        await top.close().catch(() => undefined);
      }
      if (!bs.readOnly) await bdrvFlush(bs);
    });
  }

  /** qemu-img rebase: safe mode copies what differs between the old and new backing files into the image first. */
  async rebase(id: string, req: RebaseRequest, progress?: ProgressSink, signal?: AbortSignal): Promise<void> {
    const bs = this.host.node(id);
    const cap = this.capabilities(id).rebase;
    if (!cap.ok) throw new BlockError('ENOTSUP', cap.reason, { node: id });
    const total = await bdrvGetLength(bs);
    await runJob(progress, signal, total, async (job) => {
      const blk = new BlockBackend(this.host.graph, { perm: PERM.CONSISTENT_READ | PERM.WRITE, sharedPerm: PERM.ALL });
      blk.insertNode(bs);
      let done = 0;
      try {
        const opts: Parameters<typeof rebaseImage>[2] = {
          backing: req.backing,
          unsafe: req.unsafe ?? false,
          filename: bs.filename,
          // rebaseImage reports per chunk and waits: the job yields there (OPFS reads never let the event loop run) and an abort surfaces as ECANCELED.
          progress: async (delta) => {
            job.report((done += (delta / 100) * total));
            await job.tick();
          },
        };
        const fmt = req.backingFmt ?? (req.backing !== '' ? await this.probeFormat(bs, req.backing) : undefined);
        if (fmt !== undefined) opts.backingFmt = fmt;
        await rebaseImage(this.host.graph, blk, opts);
        await blk.flush();
      } finally {
        await blk.close().catch(() => undefined);
      }
    });
  }

  /**
   * The format of the image a backing name resolves to next to `bs`, as
   * qemu-img probes it; undefined when it cannot be opened (the rebase then
   * reports that in QEMU's words).
   */
  private async probeFormat(bs: BlockNode, name: string): Promise<string | undefined> {
    let blk: BlockBackend | undefined;
    try {
      blk = await BlockBackend.open(this.host.graph, pathCombine(bs.filename, name), { readOnly: true, options: { backing: null } });
      return blk.bs?.drv.name;
    } catch {
      return undefined;
    } finally {
      await blk?.close().catch(() => undefined);
    }
  }

  /**
   * The image's dirty bitmaps: those the open image tracks (the driver
   * loads persistent ones at open and stores them at close) and those its
   * file stores, as qemu-img info lists them.
   */
  async bitmaps(id: string): Promise<BitmapView[]> {
    const bs = this.host.node(id);
    const out: BitmapView[] = [];
    const spec = await bs.drv.getSpecificInfo?.(bs);
    const stored = spec?.data.bitmaps;
    if (Array.isArray(stored)) {
      for (const b of stored as Array<{ name: string; granularity: number; flags: string[] }>) out.push({ name: b.name, granularity: b.granularity, flags: [...b.flags], inFile: true });
    }
    // The open image's own bitmaps say whether each is enabled now; those added since the open come last.
    for (const bm of bs.dirtyBitmaps) {
      if (bm.name === null || !bm.persistent) continue;
      const flags: string[] = [];
      if (bm.inconsistent) flags.push('in-use');
      if (bm.enabled) flags.push('auto');
      const inFile = out.find((o) => o.name === bm.name);
      if (inFile) inFile.flags = flags;
      else out.push({ name: bm.name, granularity: bm.granularity, flags, inFile: false });
    }
    return out;
  }

  /** Throws the capability's reason when `cap` says no. */
  private require(id: string, cap: Availability): BlockNode {
    if (!cap.ok) throw new BlockError('EACCES', cap.reason ?? 'Not available', { node: id });
    return this.host.node(id);
  }

  /** The internal snapshots of the image, as qemu-img snapshot -l and info list them. */
  async snapshots(id: string): Promise<SnapshotInfoJson[]> {
    return (await listSnapshots(this.host.node(id))).map(snapshotToJson);
  }

  /** qemu-img snapshot -c: takes an internal snapshot of the image named `name`. */
  async snapshotCreate(id: string, name: string): Promise<void> {
    const bs = this.require(id, this.capabilities(id).snapshots);
    if (name === '') throw new BlockError('EINVAL', 'A snapshot needs a name');
    await createSnapshot(bs, name);
    await bdrvFlush(bs);
  }

  /** qemu-img snapshot -a: reverts the image to snapshot `name` (an ID or a tag). */
  async snapshotApply(id: string, name: string): Promise<void> {
    const bs = this.require(id, this.capabilities(id).snapshots);
    await applySnapshot(bs, name);
    await bdrvFlush(bs);
  }

  /** qemu-img snapshot -d: deletes snapshot `name` (an ID or a tag). */
  async snapshotDelete(id: string, name: string): Promise<void> {
    const bs = this.require(id, this.capabilities(id).snapshots);
    await deleteSnapshot(bs, name);
    await bdrvFlush(bs);
  }

  /** qemu-img bitmap: runs the changes on bitmap `name` in order, stopping at the first that fails (with qemu-img's message). */
  async bitmap(id: string, name: string, changes: BitmapRequest[]): Promise<void> {
    const bs = this.require(id, this.capabilities(id).bitmaps);
    if (name === '') throw new BlockError('EINVAL', 'A bitmap needs a name');
    // qemu-img bitmap takes one -g for the whole command line; the first add's granularity is it.
    const granularity = changes.find((c) => c.op === 'add' && c.granularity !== undefined)?.granularity;
    const actions = changes.map((c): BitmapAction => ({ op: c.op }));
    await runBitmapActions(bs, name, actions, granularity !== undefined ? { granularity } : {});
    await bdrvFlush(bs);
  }

  /**
   * The dirty areas of bitmap `name` of a layer: the open image's own
   * bitmap when it has one by that name (current, writes included), else
   * the copy a qcow2 layer's file stores.
   */
  async bitmapDirty(id: string, name: string, layer = 0): Promise<StoredBitmapView> {
    // The open image's own bitmap is the current one (the file's copy is stale while the image is open read-write).
    const live = bdrvFindDirtyBitmap(this.layerNode(id, layer), name);
    if (live) {
      const { runs, truncated } = dirtyRuns(live.hbitmap, live.size);
      const flags: string[] = [];
      if (live.inconsistent) flags.push('in-use');
      if (live.enabled) flags.push('auto');
      return { name, granularity: live.granularity, flags, runs, dirtyBytes: Math.min(live.count(), live.size), truncated };
    }
    const { bs, file } = await this.fileOf(id, layer);
    requireQcow2(bs.drv.name, bs.nodeName);
    const { header, ext } = await readHeader(file);
    return readStoredBitmap(file, header, ext, name);
  }
}
