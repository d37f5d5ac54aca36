/**
 * qblock's worker entry (`qblock/worker`): the engine host that owns every
 * node of a page, exposed with comlink from a dedicated worker. A worker
 * module only needs `exposeEngine()`; ./engine-worker.ts is such a module.
 */
import { expose, type Endpoint } from 'comlink';
import { loadKernels } from '../kernels/index.ts';
import { registerEngineTransferHandlers } from '../client/transfer.ts';
import { EngineHost, type EngineHostOptions } from './host.ts';

export { EngineHost, opfsGate, optionText, type EngineHostOptions } from './host.ts';
export { BackendService } from './backend-service.ts';
export { SabChannelServer } from './sab-server.ts';
export { Job, runJob, yieldToEventLoop, type ProgressSink } from './jobs.ts';
export type * from './types.ts';

/**
 * Creates an EngineHost and exposes it on `endpoint` (the worker's global
 * scope by default), after registering the transfer handlers that keep
 * BlockError codes and AbortSignals intact. The wasm kernels load in the
 * background; until they do, the JS reference kernels serve.
 */
export function exposeEngine(endpoint: Endpoint = self as unknown as Endpoint, opts: EngineHostOptions = {}): EngineHost {
  registerEngineTransferHandlers();
  const host = new EngineHost(opts);
  loadKernels().catch(() => undefined);
  expose(host, endpoint);
  return host;
}
