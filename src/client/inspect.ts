/**
 * InspectorClient: the page's side of the worker's inspector queries
 * (src/worker/inspect.ts) — qcow2 header and tables, host layout, raw bytes
 * of image files, partition tables, HTTP counters, what the engine can do
 * with an image, compare/commit/rebase as jobs, internal snapshots, and
 * persistent dirty bitmaps with their dirty areas. Obtained once per
 * EngineClient with connectInspector().
 */
import { proxy, releaseProxy, type Remote } from 'comlink';
import type { PartitionTable } from '../core/partitions.ts';
import type { HttpStats } from '../protocols/http.ts';
import type { SnapshotInfoJson } from '../core/img/info.ts';
import type { BitmapRequest, BitmapView, CommitRequest, CompareReport, CreatableFormat, HostExtent, ImageCapabilities, InspectService, L1EntryView, L2EntryView, LayerFile, Qcow2HeaderView, RebaseRequest, StoredBitmapView } from '../worker/inspect.ts';
import type { EngineClient, JobOptions } from './engine.ts';

export type * from '../worker/inspect.ts';

/** Inspector queries over the images an EngineClient has open. */
export class InspectorClient {
  /** Wraps the proxy returned by the engine's inspector(). */
  constructor(readonly remote: Remote<InspectService>) {}

  /** Each layer of the chain with its storage protocol and file length. */
  layers(id: string): Promise<LayerFile[]> {
    return this.remote.layers(id);
  }

  /** The qcow2 header of a layer, field by field (ENOTSUP for other formats). */
  header(id: string, layer = 0): Promise<Qcow2HeaderView> {
    return this.remote.header(id, layer);
  }

  /** Active L1 entries [start, start+count). */
  l1(id: string, start: number, count: number, layer = 0): Promise<L1EntryView[]> {
    return this.remote.l1(id, start, count, layer);
  }

  /** Entries of the L2 table behind L1 entry `l1Index`. */
  l2(id: string, l1Index: number, start: number, count: number, layer = 0): Promise<L2EntryView[]> {
    return this.remote.l2(id, l1Index, start, count, layer);
  }

  /** Refcounts of host clusters [start, start+count). */
  refcounts(id: string, start: number, count: number, layer = 0): Promise<number[]> {
    return this.remote.refcounts(id, start, count, layer);
  }

  /** What each host cluster holds (reads every L2 table once). */
  hostLayout(id: string, layer = 0, job: JobOptions = {}): Promise<HostExtent[]> {
    return this.remote.hostLayout(id, layer, job.progress ? proxy(job.progress) : undefined, job.signal);
  }

  /** Raw bytes of a layer's image file (at most 1 MiB). */
  readHost(id: string, offset: number, length: number, layer = 0): Promise<Uint8Array> {
    return this.remote.readHost(id, offset, length, layer);
  }

  /** The guest disk's partition table, or null. */
  partitions(id: string): Promise<PartitionTable | null> {
    return this.remote.partitions(id);
  }

  /** HTTP counters of the image's chain (undefined when nothing is read over HTTP). */
  httpStats(id: string): Promise<HttpStats | undefined> {
    return this.remote.httpStats(id);
  }

  /** Formats that can be created and their create options. */
  formats(): Promise<CreatableFormat[]> {
    return this.remote.formats();
  }

  /** What the engine can do with the image, with reasons for what it cannot. */
  capabilities(id: string): Promise<ImageCapabilities> {
    return this.remote.capabilities(id);
  }

  /** qemu-img compare of two open images. */
  compare(idA: string, idB: string, job: JobOptions = {}): Promise<CompareReport> {
    return this.remote.compare(idA, idB, job.progress ? proxy(job.progress) : undefined, job.signal);
  }

  /** qemu-img commit: the image's clusters copied into its backing file, then the image emptied when `req.empty` (else as -d). */
  commit(id: string, req: CommitRequest = {}, job: JobOptions = {}): Promise<void> {
    return this.remote.commit(id, req, job.progress ? proxy(job.progress) : undefined, job.signal);
  }

  /** qemu-img rebase onto another backing file (or none). */
  rebase(id: string, req: RebaseRequest, job: JobOptions = {}): Promise<void> {
    return this.remote.rebase(id, req, job.progress ? proxy(job.progress) : undefined, job.signal);
  }

  /** The image's internal snapshots (qemu-img snapshot -l). */
  snapshots(id: string): Promise<SnapshotInfoJson[]> {
    return this.remote.snapshots(id);
  }

  /** qemu-img snapshot -c on an image open read-write. */
  snapshotCreate(id: string, name: string): Promise<void> {
    return this.remote.snapshotCreate(id, name);
  }

  /** qemu-img snapshot -a on an image open read-write. */
  snapshotApply(id: string, name: string): Promise<void> {
    return this.remote.snapshotApply(id, name);
  }

  /** qemu-img snapshot -d on an image open read-write. */
  snapshotDelete(id: string, name: string): Promise<void> {
    return this.remote.snapshotDelete(id, name);
  }

  /** The image's dirty bitmaps (tracked by the open image, and stored in its file). */
  bitmaps(id: string): Promise<BitmapView[]> {
    return this.remote.bitmaps(id);
  }

  /** qemu-img bitmap: changes to persistent bitmap `name`, in order. */
  bitmap(id: string, name: string, changes: BitmapRequest[]): Promise<void> {
    return this.remote.bitmap(id, name, changes);
  }

  /** The dirty areas of a bitmap: the open image's own, else the copy a qcow2 layer's file stores. */
  bitmapDirty(id: string, name: string, layer = 0): Promise<StoredBitmapView> {
    return this.remote.bitmapDirty(id, name, layer);
  }

  /** Releases the proxy. */
  dispose(): void {
    this.remote[releaseProxy]();
  }
}

/** The inspector of an engine client's worker. */
export async function connectInspector(engine: EngineClient): Promise<InspectorClient> {
  return new InspectorClient(await engine.remote.inspector());
}
