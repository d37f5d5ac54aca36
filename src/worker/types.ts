/**
 * Plain-data types of the engine worker's API, shared by the worker host
 * and the UI-side client. Everything here survives structured clone (Blobs
 * and Files included), so it crosses comlink as it is.
 */
import type { BlockDeviceStats } from '../core/accounting.ts';
import type { ErrorPolicy, IoErrorEvent, IoStatus } from '../core/block-backend.ts';
import type { BlockdevOptions, PreallocMode } from '../core/types.ts';

/** Where an image lives. */
export type ImageSource =
  /** A path below the OPFS root ("images/disk.qcow2"). */
  | { opfs: string }
  /** A Blob or File the page holds (read-only). */
  | { blob: Blob }
  /** An http(s) URL read with range requests (read-only). */
  | { url: string }
  /** A complete blockdev-style options tree, backing chain and all. */
  | { options: BlockdevOptions };

/** How to open an image. */
export interface OpenOptions {
  /** Format driver; probed when absent. */
  format?: string;
  /** Default: read-write for OPFS and options trees, read-only for Blobs and URLs. */
  readOnly?: boolean;
  /**
   * The backing image, given explicitly: names recorded inside images are
   * opened only as plain OPFS names next to the image, so an overlay over an
   * HTTP or Blob base names its base here. null opens without a backing file.
   */
  backing?: BlockdevOptions | string | null;
  /** Node name to give the image's format node. */
  nodeName?: string;
  /** More options for the format node (cache sizes, discard…). */
  options?: BlockdevOptions;
  /**
   * Keep retrying for this long while the image is busy (EBUSY): a tab that
   * is reloading may take a moment to let go of its locks.
   */
  waitBusyMs?: number;
}

/** One layer of an open image's chain. */
export interface ChainEntry {
  node: string;
  filename: string;
  format: string;
}

/** What open() reports about the image it opened. */
export interface ImageSummary {
  /** Node name of the image's top node: the handle the other calls take. */
  id: string;
  filename: string;
  format: string;
  virtualSize: number;
  readOnly: boolean;
  /** Backing chain below the image, nearest first. */
  backingChain: ChainEntry[];
}

/** How to create an image in OPFS. */
export interface CreateImageOptions {
  /** Format driver (default 'raw', as qemu-img). */
  format?: string;
  /** Virtual size in bytes; may come from the backing file instead. */
  size?: number;
  /** Backing file name recorded in the image (an OPFS name next to it, or a URL). */
  backingFile?: string;
  backingFmt?: string;
  /** Any other create options by QEMU's names (cluster_size, compat, preallocation…). */
  options?: Record<string, string | number | boolean>;
  /** Do not open the backing file to check it and take the size from it (qemu-img create -u). */
  noBackingCheck?: boolean;
}

/** How to attach a BlockBackend to a node. */
export interface AttachOptions {
  /** Backend name used in events and permission errors. */
  name?: string;
  /** Take only the read permission. */
  readOnly?: boolean;
  /** Read error policy (default 'report'). */
  rerror?: ErrorPolicy;
  /** Write error policy (default 'enospc': stop on ENOSPC, report the rest). */
  werror?: ErrorPolicy;
  /** false = writethrough (every write is flushed). */
  writeCache?: boolean;
  /** Writes past the end grow the image instead of failing (as qemu-io's and block jobs' backends allow). */
  allowWriteBeyondEof?: boolean;
}

/** The error policy and status of a backend. */
export interface ErrorPolicyState {
  rerror: ErrorPolicy;
  werror: ErrorPolicy;
  iostatus: IoStatus;
  /** Requests are paused after an error with action 'stop' until resume(). */
  stopped: boolean;
}

/** Events a backend sends to a subscriber. */
export type BackendEvent =
  | { type: 'io-error'; event: IoErrorEvent }
  | { type: 'stop'; event: IoErrorEvent }
  | { type: 'resume' }
  | { type: 'resize'; size: number };

/** What stats() returns: QEMU's blockstats for the backend. */
export type BackendStats = BlockDeviceStats;

/** Options for BlockBackend.truncate through the proxy. */
export interface TruncateOptions {
  exact?: boolean;
  prealloc?: PreallocMode;
  flags?: number;
}

/** What the worker can do in this browser. */
export interface EngineEnv {
  /** FileSystemSyncAccessHandle exists (OPFS images can be opened). */
  syncHandles: boolean;
  locks: boolean;
  crossOriginIsolated: boolean;
  sharedArrayBuffer: boolean;
  wasmKernels: boolean;
}

/** navigator.storage.estimate() as the worker sees it. */
export interface StorageReport {
  usage: number;
  quota: number;
  /** navigator.storage.persisted(), when the browser tells. */
  persisted?: boolean;
}

/** Progress of a long operation in bytes. */
export type ProgressCallback = (done: number, total: number) => void;

/** Options for converting an image into a new OPFS image. */
export interface ConvertOptions {
  /** Target format (default 'raw'). */
  format?: string;
  /** Create options of the target (cluster_size, compat…). */
  options?: Record<string, string | number | boolean>;
  /** Write compressed clusters (qemu-img convert -c; formats that support it). */
  compressed?: boolean;
}

/** Options for exporting an image as a download. */
export interface ExportOptions {
  /** 'raw' streams the guest-visible bytes; any other format is converted first. */
  format?: string;
  /** Name of the File returned by exportFile. */
  name?: string;
}
