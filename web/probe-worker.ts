// Dedicated module worker that checks what qblock's worker side relies on:
// cross-origin isolation, OPFS sync access handles and the wasm kernels.

import { loadKernels } from '../src/kernels/index.ts';
import type { ProbeResult } from './probe-types.ts';

/** Creates a scratch OPFS file, round-trips bytes through a sync access handle and removes it; records what worked in `r`. */
async function probeOpfs(r: ProbeResult): Promise<void> {
  const root = await navigator.storage.getDirectory();
  r.opfsDirectory = true;
  const name = `qblock-probe-${Date.now()}-${Math.random().toString(36).slice(2)}.bin`;
  const file = await root.getFileHandle(name, { create: true });
  try {
    const handle = await file.createSyncAccessHandle();
    try {
      const out = new Uint8Array([0x71, 0x62, 0x6c, 0x6b]);
      handle.write(out, { at: 4096 });
      handle.flush();
      const back = new Uint8Array(4);
      handle.read(back, { at: 4096 });
      r.opfsSyncAccessHandle = handle.getSize() === 4100 && back.every((b, i) => b === out[i]);
      if (!r.opfsSyncAccessHandle) r.errors.push('sync access handle read back different bytes');
    } finally {
      handle.close();
    }
  } finally {
    await root.removeEntry(name);
  }
}

/** Runs every probe and returns the combined result; never throws. */
async function probe(): Promise<ProbeResult> {
  const r: ProbeResult = {
    workerCrossOriginIsolated: self.crossOriginIsolated,
    opfsDirectory: false,
    opfsSyncAccessHandle: false,
    wasmKernels: false,
    errors: [],
  };
  try {
    await probeOpfs(r);
  } catch (e) {
    r.errors.push(`opfs: ${String(e)}`);
  }
  try {
    const k = await loadKernels();
    r.wasmKernels = k.wasm && k.firstNonZero(new Uint8Array([0, 0, 0, 9])) === 3;
  } catch (e) {
    r.errors.push(`kernels: ${String(e)}`);
  }
  return r;
}

void probe().then((r) => self.postMessage(r));
