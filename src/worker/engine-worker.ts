/**
 * The engine's dedicated worker module: `new Worker(new URL('qblock/worker/engine-worker.ts', import.meta.url), { type: 'module' })`,
 * or let connectEngine() start it. Everything runs in exposeEngine().
 */
import { exposeEngine } from './index.ts';

exposeEngine();
