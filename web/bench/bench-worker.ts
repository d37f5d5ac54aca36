/**
 * The engine-side browser benchmarks, in a dedicated worker as the engine
 * runs: each kernel against its reference, and qcow2 against the raw OPFS
 * handle underneath (the images are QEMU-made, fetched from the dev server
 * into OPFS first).
 */
import { kernelRows } from '../../bench/suites/kernels.ts';
import { ioCases, type Storage } from '../../bench/suites/io-cases.ts';
import { unavailableRow, type Row } from '../../bench/lib/harness.ts';
import { BlockBackend } from '../../src/core/block-backend.ts';
import { Graph } from '../../src/core/graph.ts';
import { browserDrivers } from '../../src/drivers-browser.ts';
import { loadKernels, referenceKernels } from '../../src/kernels/index.ts';
import type { EngineSuiteMessage, EngineSuiteRequest } from './protocol.ts';

const DIR = 'qblock-bench';

function post(m: EngineSuiteMessage): void {
  (self as unknown as Worker).postMessage(m);
}

/** Stores fetched images as OPFS files below DIR, written through a sync access handle. */
async function opfsStorage(): Promise<Storage> {
  const root = await navigator.storage.getDirectory();
  const dir = await root.getDirectoryHandle(DIR, { create: true });
  return {
    name: 'OPFS',
    async load(key, url) {
      const fh = await dir.getFileHandle(`${key}.img`, { create: true });
      const h = await fh.createSyncAccessHandle();
      try {
        h.truncate(0);
        const res = await fetch(url);
        if (!res.ok || !res.body) throw new Error(`fetching ${url}: HTTP ${res.status}`);
        const reader = res.body.getReader();
        let at = 0;
        for (;;) {
          const { done, value } = await reader.read();
          if (done) break;
          h.write(value, { at });
          at += value.length;
        }
        h.flush();
      } finally {
        h.close();
      }
      return { driver: 'opfs', filename: `${DIR}/${key}.img` };
    },
    async cleanup() {
      await root.removeEntry(DIR, { recursive: true });
    },
  };
}

self.onmessage = async (e: MessageEvent<EngineSuiteRequest>) => {
  const { config } = e.data;
  try {
    const rows: Row[] = [];
    const k = await loadKernels();
    post({ kind: 'log', text: `kernels: wasm=${k.wasm}, shared memory=${k.host?.shared ?? false}` });
    if (!k.wasm) rows.push(unavailableRow('kernel vs reference', 'every kernel', 'not available: this browser has no wasm SIMD'));
    else rows.push(...(await kernelRows(k, referenceKernels, config.quick ? { rounds: 1, minMs: 50 } : {})));
    post({ kind: 'log', text: 'kernels done; qcow2 vs raw over OPFS…' });
    const st = await opfsStorage();
    const img = (name: string): string => new URL(name, config.images).href;
    try {
      rows.push(
        ...(await ioCases(
          st,
          { raw: img('data.raw'), qcow2: img('data.qcow2'), text: img('text.raw'), comp: img('comp.qcow2'), emptyRaw: img('empty.raw'), emptyQcow2: img('empty.qcow2') },
          config.dataMiB * 2 ** 20,
          {
            rounds: config.quick ? 1 : 5,
            minMs: 300,
            open: (options, readOnly) => BlockBackend.open(new Graph({ drivers: browserDrivers(), defaultProtocol: 'opfs' }), options, { readOnly }),
          },
        )),
      );
    } finally {
      await st.cleanup();
    }
    post({ kind: 'rows', rows });
  } catch (err) {
    post({ kind: 'error', message: err instanceof Error ? `${err.message}\n${err.stack ?? ''}` : String(err) });
  }
};
