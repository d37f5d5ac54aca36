/**
 * Engine test page: connects to the engine worker with the client library
 * exactly as an application would (connectEngine starts
 * src/worker/engine-worker.ts), and puts helpers on window.qe for the
 * Playwright specs. Errors come back as data; `blockError` says whether a
 * real BlockError (code intact) reached the page.
 */
import { V86, type V86Image, type V86Options } from 'v86';
import v86WasmUrl from 'v86/build/v86.wasm?url';
import { connectEngine } from '../../src/client/engine.ts';
import type { RemoteBlockBackend } from '../../src/client/backend.ts';
import { createV86Disk } from '../../src/client/v86-disk.ts';
import { BlockError } from '../../src/core/errors.ts';
import type { BackendEvent } from '../../src/worker/types.ts';
import { checksum, type CallResult, type ChannelResult, type EngineTestApi } from './api-types.ts';

const status = document.getElementById('status') as HTMLPreElement;
const serial = document.getElementById('serial') as HTMLPreElement;
const engine = connectEngine();
const backends = new Map<string, RemoteBlockBackend>();
const events = new Map<string, BackendEvent[]>();

/** Turns a thrown value into CallResult's error part. */
function asError(e: unknown): CallResult<never> {
  if (e instanceof BlockError) {
    const out: CallResult<never> = { ok: false, error: { blockError: true, code: e.code, name: e.name, message: e.message } };
    if (e.node !== undefined) out.error.node = e.node;
    return out;
  }
  const o = (e ?? {}) as { code?: unknown; name?: unknown; message?: unknown };
  const out: CallResult<never> & { ok: false } = {
    ok: false,
    error: { blockError: false, name: typeof o.name === 'string' ? o.name : 'Error', message: typeof o.message === 'string' ? o.message : String(e) },
  };
  if (typeof o.code === 'string') out.error.code = o.code;
  return out;
}

/** Playwright serialises plain data best; bytes go over as number arrays. */
function plain(v: unknown): unknown {
  return v instanceof Uint8Array ? Array.from(v) : v;
}

/** Runs `fn`, packing its value or error. */
async function guard<T>(fn: () => Promise<T>): Promise<CallResult<T>> {
  try {
    return { ok: true, value: (await fn()) as T };
  } catch (e) {
    return asError(e);
  }
}

function backend(name: string): RemoteBlockBackend {
  const b = backends.get(name);
  if (!b) throw new BlockError('EINVAL', `No backend '${name}' on this page`);
  return b;
}

/** Starts a browser download of `file` as `filename`; returns its size. */
function saveFile(file: File, filename: string): number {
  const url = URL.createObjectURL(file);
  const a = document.createElement('a');
  a.href = url;
  a.download = filename;
  document.body.append(a);
  a.click();
  a.remove();
  // Revoked later: the download reads the object URL after click() returns.
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
  return file.size;
}

const api: EngineTestApi = {
  env: () => engine.env(),

  call: (method, ...args) =>
    guard(async () => {
      const fn = engine[method] as unknown as (...a: unknown[]) => Promise<unknown>;
      return plain(await fn.apply(engine, args));
    }),

  attach: (name, id, opts = {}) =>
    guard(async () => {
      const b = await engine.attach(id, opts);
      backends.set(name, b);
      const list: BackendEvent[] = [];
      events.set(name, list);
      await b.subscribe((ev) => list.push(ev));
      return null;
    }),

  backend: (name, method, ...args) =>
    guard(async () => {
      const b = backend(name);
      const fn = b[method] as unknown as (...a: unknown[]) => Promise<unknown>;
      const v = plain(await fn.apply(b, args));
      if (method === 'close') backends.delete(name);
      return v;
    }),

  fill: (name, offset, length, byte) =>
    guard(async () => {
      await backend(name).pwrite(offset, new Uint8Array(length).fill(byte), { transfer: true });
      return null;
    }),

  sum: (name, offset, length) => guard(async () => checksum(await backend(name).read(offset, length))),

  events: (name) => events.get(name) ?? [],

  download: (path, filename) => guard(async () => saveFile(await engine.exportFile(path, { name: filename }), filename)),

  downloadExport: (id, format, filename) => guard(async () => saveFile(await engine.exportImage(id, { format, name: filename }), filename)),

  rawStream: (id) =>
    guard(async () => {
      const reports: Array<[number, number]> = [];
      const stream = await engine.exportRaw(id, { progress: (d, t) => reports.push([d, t]) });
      let bytes = 0;
      let s = 0;
      const reader = stream.getReader();
      for (;;) {
        const r = await reader.read();
        if (r.done) break;
        bytes += r.value.length;
        for (const b of r.value) s = (s * 31 + b) >>> 0;
      }
      await new Promise((r) => setTimeout(r, 50));
      return { bytes, sum: s, reports };
    }),

  channel: (name, ops, capacity) =>
    guard(async () => {
      const sab = await backend(name).openChannel(capacity);
      const w = new Worker(new URL('./emulator-worker.ts', import.meta.url), { type: 'module' });
      try {
        return await new Promise<ChannelResult[]>((resolve, reject) => {
          w.onmessage = (ev: MessageEvent<ChannelResult[]>) => resolve(ev.data);
          w.onerror = (ev) => reject(new Error(`emulator worker failed: ${ev.message}`));
          w.postMessage({ sab, ops });
        });
      } finally {
        w.terminate();
      }
    }),

  bootV86: (name, opts) =>
    guard(async () => {
      const [bios, vga] = await Promise.all([opts.biosUrl, opts.vgaBiosUrl].map(async (u) => (await fetch(u)).arrayBuffer()));
      const disk = createV86Disk(backend(name), { id: name });
      const settings: V86Options = {
        wasm_path: v86WasmUrl,
        bios: { buffer: bios! },
        vga_bios: { buffer: vga! },
        hda: disk as unknown as V86Image,
        autostart: true,
        disable_keyboard: true,
        disable_mouse: true,
        disable_speaker: true,
        memory_size: 16 << 20,
        vga_memory_size: 2 << 20,
      };
      const emulator = new V86(settings);
      let out = '';
      try {
        const line = await new Promise<string>((resolve, reject) => {
          const timer = setTimeout(() => reject(new Error(`guest did not report in time; serial: ${JSON.stringify(out)}`)), opts.timeoutMs ?? 30_000);
          emulator.add_listener('serial0-output-byte', (b: number) => {
            out += String.fromCharCode(b);
            serial.textContent = out;
            const m = /QBLOCK [^\r\n]*\r\n/.exec(out);
            if (m) {
              clearTimeout(timer);
              resolve(m[0].trim());
            }
          });
        });
        // The guest's write must be in the image before anyone looks (or the page reloads).
        await disk.flush();
        return line;
      } finally {
        await emulator.destroy();
      }
    }),

  importUrl: (url, path) =>
    guard(async () => {
      const reports: Array<[number, number]> = [];
      const size = await engine.importImage({ url }, path, { progress: (d, t) => reports.push([d, t]) });
      // Progress messages travel separately from the result; give the last one a moment.
      await new Promise((r) => setTimeout(r, 50));
      return { size, reports };
    }),

  importAbort: (url, path) =>
    guard(async () => {
      const ctrl = new AbortController();
      return engine.importImage({ url }, path, {
        signal: ctrl.signal,
        progress: (d) => {
          if (d > 0) ctrl.abort();
        },
      });
    }),

  openOverFile: (path, baseUrl, fileName) =>
    guard(async () => {
      const file = new File([await (await fetch(baseUrl)).arrayBuffer()], fileName);
      return engine.open({ opfs: path }, { format: 'qcow2', backing: { driver: 'raw', file: { driver: 'blob', blob: file } } });
    }),
};

window.qe = api;

engine.env().then(
  (env) => {
    status.textContent = JSON.stringify(env);
    status.dataset.state = 'ready';
  },
  (e: unknown) => {
    status.textContent = `engine failed: ${String(e)}`;
    status.dataset.state = 'error';
  },
);
