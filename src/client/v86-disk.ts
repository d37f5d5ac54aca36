/**
 * A disk for the v86 emulator backed by a BlockBackend (the engine's own, or
 * a RemoteBlockBackend on the page): an object with the duck-typed buffer
 * interface v86 accepts for hda/hdb/cdrom (`get`, `set` and `load` make v86
 * use it as it is). Nothing of the disk is kept in memory: reads go to the
 * backend, writes go to the image (for a qcow2 overlay, to the overlay),
 * so the guest's writes survive a reload.
 *
 * What v86 expects and how it is met:
 * - `byteLength` is known after load(); `onload` fires then.
 * - get(start, len, fn) answers asynchronously; a read waits for earlier
 *   writes to the same bytes, because v86's PIO writes do not wait for
 *   their callback before the guest reads again.
 * - set(start, data, fn) copies `data` at once (v86 reuses the array) and
 *   orders overlapping writes.
 * - get_and_cache/get_from_cache: v86 reads sector 0 before starting and
 *   then asks for it synchronously to guess the geometry.
 * - get_state() returns a small token (length and id), not the disk; call
 *   flush() (or saveState()) before save_state() so the image holds every
 *   write the saved state has seen. set_state() refuses a token of another disk.
 * - get_buffer(fn) calls fn() without a buffer, as v86's own async buffers
 *   do; get_as_file() reads the whole disk into a File (a Promise here).
 */
import type { DiskBackend } from './backend.ts';

/** What get_state() returns: [byteLength, disk id]. */
export type V86DiskState = [number, string];

/** Options for V86Disk. */
export interface V86DiskOptions {
  /** Names the disk in saved states; set_state() insists on the same id. Default 'qblock-disk'. */
  id?: string;
  /** Called with backend errors; the guest's request stays unanswered, as a failed drive would leave it. */
  onError?: (e: unknown) => void;
}

/** A write that has not completed yet. */
interface PendingWrite {
  start: number;
  end: number;
  done: Promise<void>;
}

/** Bytes per backend request for get_as_file. */
const FILE_CHUNK = 1 << 20;

/** v86's buffer interface over a backend. */
export class V86Disk {
  /** Size of the disk; 0 until load() finished. */
  byteLength = 0;
  /** Set by v86; called once the size is known. */
  onload: ((ev: Record<string, never>) => void) | undefined = undefined;
  /** Set by v86; unused (loading reads nothing but the size). */
  onprogress: ((ev: { loaded: number; total: number; lengthComputable: boolean }) => void) | undefined = undefined;
  readonly id: string;
  private readonly onError: (e: unknown) => void;
  private pending: PendingWrite[] = [];
  /** Blocks fetched by get_and_cache, kept current by set(). */
  private readonly cache = new Map<number, Uint8Array>();

  /** Wraps `backend`; call load() (v86 does) before use. */
  constructor(
    private readonly backend: DiskBackend,
    opts: V86DiskOptions = {},
  ) {
    this.id = opts.id ?? 'qblock-disk';
    this.onError = opts.onError ?? ((e) => console.error('qblock v86 disk:', e));
  }

  /** Learns the size from the backend, then calls onload (v86 waits for it). */
  load(): void {
    this.backend.getLength().then(
      (n) => {
        this.byteLength = n;
        this.onload?.({});
      },
      (e: unknown) => this.onError(e),
    );
  }

  private overlapping(start: number, end: number): Promise<void>[] {
    return this.pending.filter((p) => p.start < end && start < p.end).map((p) => p.done);
  }

  /** Reads `len` bytes at `start` and passes them to `fn` once earlier overlapping writes are done. */
  get(start: number, len: number, fn: (data: Uint8Array) => void): void {
    const before = this.overlapping(start, start + len);
    (async () => {
      if (before.length) await Promise.all(before);
      return this.backend.read(start, len);
    })().then(fn, (e: unknown) => this.onError(e));
  }

  /** get(), keeping the bytes for get_from_cache (v86 does this for sector 0 before it starts). */
  get_and_cache(start: number, len: number, fn: (data: Uint8Array) => void): void {
    this.get(start, len, (data) => {
      this.cache.set(start, data.slice());
      fn(data);
    });
  }

  /** The bytes a get_and_cache() of exactly this range fetched, or undefined. */
  get_from_cache(start: number, len: number): Uint8Array | undefined {
    const c = this.cache.get(start);
    return c && c.length === len ? c.slice() : undefined;
  }

  /** Writes `data` at `start` (copied at once), after earlier overlapping writes; `fn` runs when it is in the image. */
  set(start: number, data: Uint8Array, fn: () => void): void {
    const copy = data.slice();
    const end = start + copy.length;
    for (const [cs, c] of this.cache) {
      const lo = Math.max(cs, start);
      const hi = Math.min(cs + c.length, end);
      if (lo < hi) c.set(copy.subarray(lo - start, hi - start), lo - cs);
    }
    const before = this.overlapping(start, end);
    const write = (async () => {
      if (before.length) await Promise.all(before);
      await this.backend.pwrite(start, copy);
    })();
    const entry: PendingWrite = { start, end, done: write.catch(() => undefined) };
    this.pending.push(entry);
    write.then(
      () => {
        this.pending = this.pending.filter((p) => p !== entry);
        fn();
      },
      (e: unknown) => {
        this.pending = this.pending.filter((p) => p !== entry);
        this.onError(e);
      },
    );
  }

  /** v86's whole-buffer accessor: there is no in-memory buffer, so `fn` gets none (like v86's async disks). */
  get_buffer(fn: (buf?: ArrayBuffer) => void): void {
    fn(undefined);
  }

  /** A small token for v86's saved state; starts a flush (await flush() before save_state() to be sure). */
  get_state(): V86DiskState {
    void this.flush().catch((e: unknown) => this.onError(e));
    return [this.byteLength, this.id];
  }

  /** Accepts the token of this disk from a saved state; throws for another disk. */
  set_state(state: unknown): void {
    const ok = Array.isArray(state) && state[0] === this.byteLength && state[1] === this.id;
    if (!ok) throw new Error(`qblock v86 disk: the saved state belongs to another disk (${JSON.stringify(state)}, this is [${this.byteLength}, "${this.id}"])`);
  }

  /** Waits for every write issued so far, then flushes the backend. */
  async flush(): Promise<void> {
    await Promise.all(this.pending.map((p) => p.done));
    await this.backend.flush();
  }

  /** The whole disk as a File (read through the backend in 1 MiB pieces). */
  async get_as_file(name = `${this.id}.img`): Promise<File> {
    await Promise.all(this.pending.map((p) => p.done));
    const parts: Uint8Array<ArrayBuffer>[] = [];
    for (let pos = 0; pos < this.byteLength; pos += FILE_CHUNK) {
      // Backends hand out buffers over plain ArrayBuffers (transferred or freshly allocated).
      parts.push((await this.backend.read(pos, Math.min(FILE_CHUNK, this.byteLength - pos))) as Uint8Array<ArrayBuffer>);
    }
    return new File(parts, name);
  }
}

/** A v86 disk over `backend` (see V86Disk). */
export function createV86Disk(backend: DiskBackend, opts: V86DiskOptions = {}): V86Disk {
  return new V86Disk(backend, opts);
}

/** The part of a V86 emulator saveState() needs. */
export interface V86StateSaver {
  save_state(): Promise<ArrayBuffer>;
}

/** Flushes every disk, then saves the emulator's state, so the state never refers to writes the image lacks. */
export async function saveState(emulator: V86StateSaver, disks: readonly V86Disk[]): Promise<ArrayBuffer> {
  await Promise.all(disks.map((d) => d.flush()));
  return emulator.save_state();
}
