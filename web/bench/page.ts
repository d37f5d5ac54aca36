/**
 * The browser benchmark page (npm run bench:browser): runs the engine-side
 * suites in a dedicated worker, then times round trips from this (UI) thread
 * to the engine worker through comlink, single and pipelined, against a bare
 * postMessage echo worker, and reads over the SharedArrayBuffer channel
 * against a bare Atomics round trip. Leaves the report on
 * window.qblockBench for bench/browser.ts.
 */
import { connectEngine } from '../../src/client/engine.ts';
import { interleave, now, speedRow, unavailableRow, type Report, type Row } from '../../bench/lib/harness.ts';
import type { BenchConfig, BenchWindow, EngineSuiteMessage, EngineSuiteRequest, SabRequest, SabResult } from './protocol.ts';

const logEl = document.getElementById('log') as HTMLPreElement;
const w = window as unknown as BenchWindow;
w.qblockBench = { done: false };

function log(text: string): void {
  logEl.textContent += `${text}\n`;
  console.log(`[bench] ${text}`);
}

const params = new URLSearchParams(location.search);
const config: BenchConfig = {
  images: new URL(params.get('images') ?? '/', location.href).href,
  dataMiB: Number(params.get('dataMiB') ?? 128),
  quick: params.has('quick'),
};

/** Runs the engine-side suites in their worker. */
function engineSuites(): Promise<Row[]> {
  return new Promise((resolve, reject) => {
    const worker = new Worker(new URL('./bench-worker.ts', import.meta.url), { type: 'module', name: 'qblock-bench' });
    worker.onmessage = (e: MessageEvent<EngineSuiteMessage>) => {
      const m = e.data;
      if (m.kind === 'log') log(m.text);
      else if (m.kind === 'rows') {
        worker.terminate();
        resolve(m.rows);
      } else {
        worker.terminate();
        reject(new Error(m.message));
      }
    };
    worker.onerror = (e) => reject(new Error(`bench worker: ${e.message}`));
    const req: EngineSuiteRequest = { kind: 'engine-suites', config };
    worker.postMessage(req);
  });
}

/** Ops/s of `op` called with at most `depth` in flight, over at least `minMs`. */
async function pipelined(op: () => Promise<unknown>, depth: number, minMs: number): Promise<number> {
  let n = 0;
  const t = now();
  let stop = false;
  const lane = async (): Promise<void> => {
    while (!stop) {
      await op();
      n++;
      if (now() - t >= minMs) stop = true;
    }
  };
  await Promise.all(Array.from({ length: depth }, lane));
  return (n * 1000) / (now() - t);
}

/** Round trips through comlink against postMessage, and over the SAB channel against bare Atomics. */
async function roundTrips(): Promise<Row[]> {
  const G = 'UI thread → worker';
  const rows: Row[] = [];
  const minMs = config.quick ? 150 : 400;
  const rounds = config.quick ? 1 : 3;
  const engine = connectEngine();
  const img = await engine.open({ options: { driver: 'raw', file: { driver: 'memory', name: 'bench-rt', size: 64 << 20 } } }, { readOnly: false });
  const blk = await engine.attach(img.id);
  const echo = new Worker(new URL('./echo-worker.ts', import.meta.url), { type: 'module' });
  try {
    let id = 0;
    const waiting = new Map<number, (b: ArrayBuffer) => void>();
    echo.onmessage = (e: MessageEvent<{ id: number; buf: ArrayBuffer }>) => {
      waiting.get(e.data.id)?.(e.data.buf);
      waiting.delete(e.data.id);
    };
    const echoOnce = (): Promise<ArrayBuffer> =>
      new Promise((res) => {
        const i = id++;
        waiting.set(i, res);
        const buf = new ArrayBuffer(4096);
        echo.postMessage({ id: i, buf }, [buf]);
      });
    let off = 0;
    const read = (): Promise<Uint8Array> => {
      off = (off + 4096) % (32 << 20);
      return blk.read(off, 4096);
    };
    for (let i = 0; i < 200; i++) {
      await read();
      await echoOnce();
    }
    const [s1, e1] = await interleave(rounds, () => pipelined(read, 1, minMs), () => pipelined(echoOnce, 1, minMs));
    rows.push(speedRow(G, 'comlink: 4 KiB read, one at a time', { label: 'engine read', value: s1, unit: 'ops/s' }, { label: 'postMessage echo', value: e1, unit: 'ops/s' }));
    const [s32, e32] = await interleave(rounds, () => pipelined(read, 32, minMs), () => pipelined(echoOnce, 32, minMs));
    rows.push(speedRow(G, 'comlink: 4 KiB reads, 32 pipelined', { label: 'engine read', value: s32, unit: 'ops/s' }, { label: 'postMessage echo', value: e32, unit: 'ops/s' }));

    if (!crossOriginIsolated) {
      rows.push(unavailableRow(G, 'SAB channel: 4 KiB read', 'not available: page is not cross-origin isolated'));
    } else {
      const channel = await blk.openChannel();
      const ping = new SharedArrayBuffer(64 + 4096);
      const pong = new Worker(new URL('./pong-worker.ts', import.meta.url), { type: 'module' });
      pong.postMessage(ping);
      const sabWorker = new Worker(new URL('./sab-worker.ts', import.meta.url), { type: 'module' });
      const res = await new Promise<SabResult>((resolve, reject) => {
        sabWorker.onmessage = (e: MessageEvent<SabResult>) => resolve(e.data);
        sabWorker.onerror = (e) => reject(new Error(`sab worker: ${e.message}`));
        const req: SabRequest = { kind: 'sab', channel, ping, minMs, rounds };
        sabWorker.postMessage(req);
      });
      sabWorker.terminate();
      pong.terminate();
      rows.push(speedRow(G, 'SAB channel: 4 KiB read, synchronous', { label: 'engine read', value: res.channel, unit: 'ops/s' }, { label: 'bare Atomics round trip', value: res.bare, unit: 'ops/s' }));
    }
  } finally {
    echo.terminate();
    await blk.close();
    await engine.close(img.id);
    await engine.terminate();
  }
  return rows;
}

async function main(): Promise<void> {
  const startedAt = new Date().toISOString();
  const t = now();
  log(`config ${JSON.stringify(config)}; crossOriginIsolated=${crossOriginIsolated}`);
  const rows: Row[] = [];
  rows.push(...(await engineSuites()));
  log('round trips…');
  rows.push(...(await roundTrips()));
  const report: Report = {
    runner: 'browser',
    startedAt,
    environment: { userAgent: navigator.userAgent, hardwareConcurrency: navigator.hardwareConcurrency, crossOriginIsolated, seconds: Math.round((now() - t) / 1000), quick: config.quick },
    rows,
  };
  w.qblockBench = { done: true, report };
  log('done');
}

main().catch((e: unknown) => {
  log(`failed: ${String(e)}`);
  w.qblockBench = { done: true, error: e instanceof Error ? `${e.message}\n${e.stack ?? ''}` : String(e) };
});

