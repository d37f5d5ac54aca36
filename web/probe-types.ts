/** What web/probe-worker.ts found out about the environment it runs in. */
export interface ProbeResult {
  /** `crossOriginIsolated` as seen by the worker. */
  workerCrossOriginIsolated: boolean;
  /** `navigator.storage.getDirectory()` resolved. */
  opfsDirectory: boolean;
  /** A sync access handle wrote, flushed and read back bytes. */
  opfsSyncAccessHandle: boolean;
  /** The wasm kernels loaded in the worker (false if the reference fallback was used or loading failed). */
  wasmKernels: boolean;
  /** Messages of whatever failed. */
  errors: string[];
}
