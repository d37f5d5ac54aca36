// Placeholder for the image inspector: runs the environment probe in a
// worker and shows the result.

import type { ProbeResult } from './probe-types.ts';

const out = document.getElementById('probe') as HTMLPreElement;

/** Shows the page's and the worker's findings and marks the probe as done for tests. */
function show(result: ProbeResult | { error: string }): void {
  const all = { pageCrossOriginIsolated: window.crossOriginIsolated, ...result };
  out.textContent = JSON.stringify(all, null, 2);
  out.dataset.state = 'done';
}

const worker = new Worker(new URL('./probe-worker.ts', import.meta.url), { type: 'module' });
worker.onmessage = (ev: MessageEvent<ProbeResult>) => {
  show(ev.data);
  worker.terminate();
};
worker.onerror = (ev: ErrorEvent) => show({ error: `worker failed: ${ev.message || 'unknown error'}` });
