/**
 * Types shared by the test page (web/test/page.ts) and the Playwright specs
 * that call into it with page.evaluate.
 */
import type { TestApi } from './protocols-worker.ts';

/** An error as it reached the page: BlockError fields when comlink kept them. */
export interface CallError {
  /** True when the page received a real BlockError instance. */
  blockError: boolean;
  code?: string;
  name: string;
  message: string;
  node?: string;
}

/** Result of window.qbCall: the value (Uint8Array turned into a number array) or the error. */
export type CallResult = { ok: true; value: unknown } | { ok: false; error: CallError };

/** Names of the worker API's methods. */
export type ApiMethod = keyof TestApi;

declare global {
  interface Window {
    /** Calls a worker API method and reports its value or error as plain data. */
    qbCall(method: ApiMethod, ...args: unknown[]): Promise<CallResult>;
    /** Tries to open an OPFS image on the page's main thread (must fail: no sync handles there). */
    qbOpenOpfsOnMainThread(path: string): Promise<CallResult>;
    /** Hands a File built from `bytes` to the worker as backend `id`. */
    qbOpenFile(id: string, bytes: number[], name: string): Promise<CallResult>;
  }
}
