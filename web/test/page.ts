/**
 * Test page: starts the protocols worker, wraps it with comlink and puts
 * small helpers on window for Playwright. Errors are returned as data, and
 * `blockError` says whether a real BlockError (code intact) arrived.
 */
import * as Comlink from 'comlink';
import { BlockBackend } from '../../src/core/block-backend.ts';
import { BlockError } from '../../src/core/errors.ts';
import { Graph } from '../../src/core/graph.ts';
import { opfsDriver } from '../../src/protocols/opfs.ts';
import type { CallResult } from './api-types.ts';
import { registerBlockErrorTransfer } from './comlink-errors.ts';
import type { TestApi } from './protocols-worker.ts';

registerBlockErrorTransfer();

const status = document.getElementById('status') as HTMLPreElement;
const worker = new Worker(new URL('./protocols-worker.ts', import.meta.url), { type: 'module' });
const qb = Comlink.wrap<TestApi>(worker);

/** Turns a thrown value into CallResult's error part. */
function asError(e: unknown): CallResult {
  if (e instanceof BlockError) {
    const out: CallResult = { ok: false, error: { blockError: true, code: e.code, name: e.name, message: e.message } };
    if (e.node !== undefined) out.error.node = e.node;
    return out;
  }
  const o = (e ?? {}) as { code?: unknown; name?: unknown; message?: unknown };
  const error: CallResult & { ok: false } = {
    ok: false,
    error: { blockError: false, name: typeof o.name === 'string' ? o.name : 'Error', message: typeof o.message === 'string' ? o.message : String(e) },
  };
  if (typeof o.code === 'string') error.error.code = o.code;
  return error;
}

/** Playwright serialises plain data best; bytes go over as number arrays. */
function plain(v: unknown): unknown {
  return v instanceof Uint8Array ? Array.from(v) : v;
}

window.qbCall = async (method, ...args) => {
  try {
    const fn = qb[method] as unknown as (...a: unknown[]) => Promise<unknown>;
    return { ok: true, value: plain(await fn(...args)) };
  } catch (e) {
    return asError(e);
  }
};

window.qbOpenOpfsOnMainThread = async (path) => {
  const g = new Graph({ drivers: [opfsDriver], defaultProtocol: 'opfs' });
  try {
    const blk = await BlockBackend.open(g, { driver: 'opfs', filename: path, create: true });
    await blk.close();
    return { ok: true, value: null };
  } catch (e) {
    return asError(e);
  } finally {
    await g.closeAll();
  }
};

window.qbOpenFile = async (id, bytes, name) => {
  try {
    const file = new File([new Uint8Array(bytes)], name);
    return { ok: true, value: await qb.openBlob(id, file) };
  } catch (e) {
    return asError(e);
  }
};

qb.env().then(
  (env) => {
    status.textContent = JSON.stringify(env);
    status.dataset.state = 'ready';
  },
  (e: unknown) => {
    status.textContent = `worker failed: ${String(e)}`;
    status.dataset.state = 'error';
  },
);
worker.onerror = (ev) => {
  status.textContent = `worker error: ${ev.message}`;
  status.dataset.state = 'error';
};
