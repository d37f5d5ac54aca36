/**
 * Types shared by the engine test page (web/engine/page.ts), its emulator
 * worker and the Playwright specs that drive them with page.evaluate.
 */
import type { EngineClient } from '../../src/client/engine.ts';
import type { RemoteBlockBackend } from '../../src/client/backend.ts';
import type { AttachOptions, BackendEvent, EngineEnv, ImageSummary } from '../../src/worker/types.ts';

/** An error as it reached the page, as plain data. */
export interface CallError {
  /** True when the page received a real BlockError (code intact). */
  blockError: boolean;
  code?: string;
  name: string;
  message: string;
  node?: string;
}

/** A call's value or its error. */
export type CallResult<T = unknown> = { ok: true; value: T } | { ok: false; error: CallError };

/** One synchronous request the emulator worker runs through the channel. */
export type ChannelOp =
  | { op: 'length' }
  | { op: 'flush' }
  | { op: 'write'; offset: number; length: number; fill: number }
  | { op: 'read'; offset: number; length: number };

/** What the emulator worker reports per request: a read's checksum (see checksum()) and first bytes. */
export type ChannelResult = { ok: true; value: number; bytes?: number[] } | { ok: false; code: string; message: string };

/** EngineClient methods the specs call by name. */
export type EngineMethod = Exclude<keyof EngineClient, 'remote' | 'worker'>;
/** RemoteBlockBackend methods the specs call by name. */
export type BackendMethod = Exclude<keyof RemoteBlockBackend, 'remote'>;

/** Options for booting v86 on the page. */
export interface BootOptions {
  biosUrl: string;
  vgaBiosUrl: string;
  timeoutMs?: number;
}

/** What the page offers Playwright. */
export interface EngineTestApi {
  /** Resolves with the worker's environment once it answers. */
  env(): Promise<EngineEnv>;
  /** Calls an EngineClient method; Uint8Arrays in results become number arrays. */
  call(method: EngineMethod, ...args: unknown[]): Promise<CallResult>;
  /** Attaches a backend to image `id` and keeps it under `name`, recording its events. */
  attach(name: string, id: string, opts?: AttachOptions): Promise<CallResult<null>>;
  /** Calls a method of backend `name`; number-array arguments named `data` are not converted (use fill). */
  backend(name: string, method: BackendMethod, ...args: unknown[]): Promise<CallResult>;
  /** Writes `length` bytes of value `byte` at `offset` (qemu-io's write -P). */
  fill(name: string, offset: number, length: number, byte: number): Promise<CallResult<null>>;
  /** checksum() of `length` bytes at `offset`, read through the backend proxy. */
  sum(name: string, offset: number, length: number): Promise<CallResult<number>>;
  /** Events backend `name` reported so far. */
  events(name: string): BackendEvent[];
  /** Exports OPFS image `path` as a File and starts its download as `filename`. */
  download(path: string, filename: string): Promise<CallResult<number>>;
  /** Converts open image `id` to `format` (engine convert) and starts the File's download as `filename`; returns its size. */
  downloadExport(id: string, format: string, filename: string): Promise<CallResult<number>>;
  /** Reads image `id` through exportRaw()'s stream: total bytes, their checksum, and the progress reports seen. */
  rawStream(id: string): Promise<CallResult<{ bytes: number; sum: number; reports: Array<[number, number]> }>>;
  /** Opens a channel on backend `name` and runs `ops` in an emulator-style worker. */
  channel(name: string, ops: ChannelOp[], capacity?: number): Promise<CallResult<ChannelResult[]>>;
  /** Boots v86 from backend `name` through the disk adapter; resolves with the guest's QBLOCK line. */
  bootV86(name: string, opts: BootOptions): Promise<CallResult<string>>;
  /** Imports a URL into OPFS, recording progress reports. */
  importUrl(url: string, path: string): Promise<CallResult<{ size: number; reports: Array<[number, number]> }>>;
  /** Starts an import and aborts it after the first progress report. */
  importAbort(url: string, path: string): Promise<CallResult>;
  /** Opens the qcow2 image at `path` over a File made on the page from the bytes at `baseUrl` (a File base). */
  openOverFile(path: string, baseUrl: string, fileName: string): Promise<CallResult<ImageSummary>>;
}

declare global {
  interface Window {
    qe: EngineTestApi;
  }
}

/** The checksum both sides use: s = (s * 31 + byte) mod 2^32 over the bytes. */
export function checksum(buf: Uint8Array): number {
  let s = 0;
  for (const b of buf) s = (s * 31 + b) >>> 0;
  return s;
}
