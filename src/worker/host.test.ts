// The engine worker's host and the page's client, connected by comlink over
// a MessageChannel in Node (the browser runs the same code over a Worker;
// see e2e/engine.spec.ts): opening images by options, BlockBackend proxies
// with pipelined I/O, errors with their codes across the boundary, abort
// signals and progress, info/map, closing, and the SharedArrayBuffer
// channel served to a synchronous client in another thread.

import { Worker } from 'node:worker_threads';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { expose, wrap } from 'comlink';
import { BlockError } from '../core/errors.ts';
import { denyAllGate } from '../core/graph.ts';
import { qcow2Driver } from '../formats/qcow2/index.ts';
import { rawDriver } from '../formats/raw.ts';
import { blobDriver } from '../protocols/blob.ts';
import { deleteMemoryStore, memoryDriver } from '../protocols/memory.ts';
import { nullCoDriver } from '../protocols/null.ts';
import { filterDrivers } from '../filters/index.ts';
import { EngineClient } from '../client/engine.ts';
import { SabChannelClient } from '../client/sab-channel.ts';
import { registerEngineTransferHandlers } from '../client/transfer.ts';
import { exposeEngine, type EngineHost } from './index.ts';
import type { SabThreadTask } from './testing/sab-client-thread.ts';
import type { BackendEvent } from './types.ts';

const MiB = 1 << 20;

/** Bytes i*13+seed mod 256. */
function pattern(n: number, seed: number): Uint8Array<ArrayBuffer> {
  const b = new Uint8Array(n);
  for (let i = 0; i < n; i++) b[i] = (i * 13 + seed) & 0xff;
  return b;
}

/** Byte equality without vitest's element-by-element diffing (slow on large arrays). */
function same(a: Uint8Array, b: Uint8Array): boolean {
  return Buffer.compare(Buffer.from(a.buffer, a.byteOffset, a.byteLength), Buffer.from(b.buffer, b.byteOffset, b.byteLength)) === 0;
}

let host: EngineHost;
let client: EngineClient;
let ports: MessageChannel;

beforeEach(() => {
  ports = new MessageChannel();
  host = exposeEngine(ports.port1, { drivers: [memoryDriver, nullCoDriver, blobDriver, rawDriver, qcow2Driver, ...filterDrivers()], gate: denyAllGate, defaultProtocol: 'memory' });
  client = new EngineClient({ worker: ports.port2, closeOnPagehide: false });
});

afterEach(async () => {
  await client.closeAll();
  ports.port1.close();
  ports.port2.close();
  deleteMemoryStore('host-test');
});

describe('engine host through comlink', () => {
  it('opens an image from blockdev options, attaches a backend and pipelines writes and reads', async () => {
    const img = await client.open({ options: { driver: 'raw', 'node-name': 'disk0', file: { driver: 'memory', name: 'host-test', size: 4 * MiB } } });
    expect(img).toMatchObject({ id: 'disk0', format: 'raw', virtualSize: 4 * MiB, readOnly: false, backingChain: [] });
    const blk = await client.attach('disk0', { name: 'vd0' });
    // Issue 32 writes without waiting, then 32 reads without waiting.
    const writes = Array.from({ length: 32 }, (_, i) => blk.pwrite(i * 65536, pattern(65536, i)));
    await Promise.all(writes);
    const reads = await Promise.all(Array.from({ length: 32 }, (_, i) => blk.read(i * 65536, 65536)));
    reads.forEach((r, i) => expect(same(r, pattern(65536, i)), `chunk ${i}`).toBe(true));
    // A view into a larger buffer sends only its bytes; pread fills the caller's buffer.
    const big = new Uint8Array(MiB);
    big.set(pattern(1000, 77), 5000);
    await blk.pwrite(3 * MiB, big.subarray(5000, 6000));
    const back = new Uint8Array(1000);
    await blk.pread(3 * MiB, back);
    expect(back).toEqual(pattern(1000, 77));
    // Transferring gives the buffer up.
    const t = pattern(4096, 5);
    await blk.pwrite(0, t, { transfer: true });
    expect(t.byteLength).toBe(0);
    expect(await blk.read(0, 4096)).toEqual(pattern(4096, 5));
    await blk.pwriteZeroes(0, 4096);
    expect(await blk.read(0, 8)).toEqual(new Uint8Array(8));
    await blk.flush();
    expect(await blk.getLength()).toBe(4 * MiB);
    const st = await blk.stats();
    expect(st.wr_operations).toBeGreaterThanOrEqual(34);
    expect(st.rd_bytes).toBeGreaterThanOrEqual(32 * 65536);
    await blk.truncate(2 * MiB);
    expect(await blk.getLength()).toBe(2 * MiB);
    await blk.close();
  });

  it('delivers errors as BlockErrors with code, message and node', async () => {
    await client.open({ options: { driver: 'raw', 'node-name': 'small', file: { driver: 'memory', size: 4096 } } });
    const blk = await client.attach('small', { name: 'dev' });
    const past = await blk.read(8192, 512).catch((e: unknown) => e);
    expect(past).toBeInstanceOf(BlockError);
    expect((past as BlockError).code).toBe('EIO');
    const neg = await blk.pwrite(-1, new Uint8Array(1)).catch((e: unknown) => e);
    expect((neg as BlockError).code).toBe('EINVAL');
    expect((neg as BlockError).node).toBe('dev');
    const unknown = await client.open({ options: { driver: 'nope' } }).catch((e: unknown) => e);
    expect(unknown).toBeInstanceOf(BlockError);
    expect((unknown as BlockError).code).toBe('EINVAL');
    expect((unknown as BlockError).message).toBe("Unknown driver 'nope'");
    const noImage = await client.attach('missing').catch((e: unknown) => e);
    expect((noImage as BlockError).code).toBe('EINVAL');
    expect((noImage as BlockError).message).toContain("No image with id 'missing'");
    const badPolicy = await blk.setErrorPolicy('report', 'sometimes' as 'report').catch((e: unknown) => e);
    expect((badPolicy as BlockError).code).toBe('EINVAL');
  });

  it('reads a File/Blob read-only and refuses writes to it', async () => {
    const bytes = pattern(10_000, 3);
    const img = await client.open({ blob: new File([bytes], 'disk.img') }, { format: 'raw' });
    // 10 000 bytes are a 10 240-byte disk, as QEMU counts lengths in whole sectors.
    expect(img).toMatchObject({ format: 'raw', readOnly: true, virtualSize: 10_240 });
    // Browsers clone a File as a File (name kept); Node clones it as a plain Blob.
    expect(['disk.img', 'blob']).toContain(img.filename);
    const blk = await client.attach(img.id);
    expect(await blk.read(100, 900)).toEqual(bytes.subarray(100, 1000));
    const tail = await blk.read(9990, 250);
    expect(tail.subarray(0, 10)).toEqual(bytes.subarray(9990));
    expect(tail.subarray(10).every((b) => b === 0)).toBe(true);
    const e = await blk.pwrite(0, new Uint8Array(1)).catch((x: unknown) => x);
    expect(e).toBeInstanceOf(BlockError);
    expect(['EPERM', 'EACCES', 'EROFS']).toContain((e as BlockError).code);
  });

  it('reports info and map from the engine', async () => {
    await client.open({ options: { driver: 'raw', 'node-name': 'm', file: { driver: 'memory', size: MiB } } });
    const blk = await client.attach('m');
    await blk.pwrite(65536, pattern(65536, 1));
    const [info] = await client.info('m');
    expect(info).toMatchObject({ format: 'raw', 'virtual-size': MiB });
    const map = await client.map('m');
    expect(map.some((e) => e.data && e.start <= 65536 && e.start + e.length >= 131072)).toBe(true);
    expect((await client.check('m').catch((e: unknown) => e) as BlockError).code).toBe('ENOTSUP');
  });

  it('streams the raw bytes of an image with progress reports, and stops on abort', async () => {
    await client.open({ options: { driver: 'raw', 'node-name': 'x', file: { driver: 'memory', size: 3 * MiB + 5 } } });
    const blk = await client.attach('x');
    await blk.pwrite(MiB, pattern(MiB, 9));
    const seen: Array<[number, number]> = [];
    const stream = await client.exportRaw('x', { progress: (d, t) => seen.push([d, t]) });
    const chunks: Uint8Array[] = [];
    const reader = stream.getReader();
    for (;;) {
      const r = await reader.read();
      if (r.done) break;
      chunks.push(r.value);
    }
    // The disk is whole sectors (3 MiB + 512), as `qemu-img convert -O raw` would write it.
    const disk = 3 * MiB + 512;
    const total = chunks.reduce((n, c) => n + c.length, 0);
    expect(total).toBe(disk);
    expect(same(chunks[1]!, pattern(MiB, 9))).toBe(true);
    expect(chunks.at(-1)!.every((b) => b === 0)).toBe(true);
    await new Promise((r) => setTimeout(r, 20));
    expect(seen.at(-1)).toEqual([disk, disk]);
    expect(seen[0]).toEqual([0, disk]);

    const ctrl = new AbortController();
    const s2 = await client.exportRaw('x', { signal: ctrl.signal });
    const r2 = s2.getReader();
    await r2.read();
    ctrl.abort();
    await new Promise((r) => setTimeout(r, 20));
    const err = await (async () => {
      for (;;) {
        const r = await r2.read();
        if (r.done) return undefined;
      }
    })().catch((e: unknown) => e);
    expect(err).toBeDefined();
  });

  it('converts an image into a new one with the engine (qemu-img convert), with progress, and checks it', async () => {
    await client.open({ options: { driver: 'raw', 'node-name': 'src', file: { driver: 'memory', size: 4 * MiB } } });
    const blk = await client.attach('src');
    await blk.pwrite(MiB, pattern(2 * MiB, 6));
    const seen: number[] = [];
    const size = await client.convert('src', 'conv/out.qcow2', { format: 'qcow2', options: { cluster_size: 65536 } }, { progress: (d) => seen.push(d) });
    expect(size).toBe(4 * MiB);
    await new Promise((r) => setTimeout(r, 20));
    expect(seen.at(-1)).toBe(4 * MiB);
    const out = await client.open({ options: { driver: 'qcow2', 'node-name': 'out', file: { driver: 'memory', name: 'conv/out.qcow2' } } }, { readOnly: true });
    expect(out).toMatchObject({ format: 'qcow2', virtualSize: 4 * MiB });
    const ob = await client.attach('out');
    expect(same(await ob.read(MiB, 2 * MiB), pattern(2 * MiB, 6))).toBe(true);
    expect(same(await ob.read(0, MiB), new Uint8Array(MiB))).toBe(true);
    const { check } = await client.check('out');
    expect(check).toMatchObject({ format: 'qcow2', 'check-errors': 0 });
    expect(check.corruptions ?? 0).toBe(0);
    expect(check.leaks ?? 0).toBe(0);
    // Only the 2 MiB of data were allocated.
    const map = await client.map('out');
    expect(map.filter((e) => e.data).reduce((n, e) => n + e.length, 0)).toBe(2 * MiB);
    // A cancelled convert fails with ECANCELED and leaves the graph as it was.
    const nodes = host.graph.nodes.size;
    const e = await client.convert('src', 'conv/cancelled.img', {}, { signal: AbortSignal.abort() }).catch((x: unknown) => x);
    expect((e as BlockError).code).toBe('ECANCELED');
    expect(host.graph.nodes.size).toBe(nodes);
    deleteMemoryStore('conv/out.qcow2');
  });

  it('measures with the engine (qemu-img measure)', async () => {
    const m = await client.measure('qcow2', { size: 64 * MiB, cluster_size: 65536 });
    expect(m.required).toBe(327680);
    expect(m.fullyAllocated).toBe(67_436_544);
    await client.open({ options: { driver: 'raw', 'node-name': 'ms', file: { driver: 'memory', size: 8 * MiB } } });
    const blk = await client.attach('ms');
    await blk.pwrite(0, pattern(MiB, 1));
    const c = await client.measure('qcow2', {}, 'ms');
    expect(c.required).toBeGreaterThan(MiB);
    expect(c.required).toBeLessThan(2 * MiB);
    expect((await client.measure('nope').catch((x: unknown) => x) as BlockError).code).toBe('EINVAL');
  });

  it('carries AbortSignals across comlink as top-level arguments', async () => {
    registerEngineTransferHandlers();
    const ch = new MessageChannel();
    const api = {
      waitForAbort(signal: AbortSignal): Promise<string> {
        return new Promise((resolve) => {
          if (signal.aborted) resolve('already');
          signal.addEventListener('abort', () => resolve('aborted'));
        });
      },
    };
    expose(api, ch.port1);
    const remote = wrap<typeof api>(ch.port2);
    const ctrl = new AbortController();
    const p = remote.waitForAbort(ctrl.signal);
    ctrl.abort();
    expect(await p).toBe('aborted');
    expect(await remote.waitForAbort(AbortSignal.abort())).toBe('already');
    ch.port1.close();
    ch.port2.close();
  });

  it('closing an image closes its backends; later calls fail with ENOMEDIUM', async () => {
    await client.open({ options: { driver: 'raw', 'node-name': 'c', file: { driver: 'memory', size: MiB } } });
    const blk = await client.attach('c');
    await client.close('c');
    expect(host.openImages()).toEqual([]);
    expect(host.graph.nodes.size).toBe(0);
    const e = await blk.read(0, 1).catch((x: unknown) => x);
    expect((e as BlockError).code).toBe('ENOMEDIUM');
  });

  it('stops a write on ENOSPC under the default policy, reports it, and retries it on resume', async () => {
    await client.open({
      options: {
        driver: 'raw',
        'node-name': 'full',
        file: { driver: 'blkdebug', image: { driver: 'memory', size: MiB }, 'inject-error': [{ event: 'write_aio', errno: 'ENOSPC', once: true }] },
      },
    });
    const blk = await client.attach('full', { name: 'vd-full' });
    const events: BackendEvent[] = [];
    await blk.subscribe((ev) => events.push(ev));
    let settled = false;
    const write = blk.pwrite(4096, pattern(4096, 2)).then(() => (settled = true));
    for (let i = 0; i < 100 && !(await blk.errorPolicy()).stopped; i++) await new Promise((r) => setTimeout(r, 5));
    expect(await blk.errorPolicy()).toEqual({ rerror: 'report', werror: 'enospc', iostatus: 'nospace', stopped: true });
    expect(settled).toBe(false);
    expect(events.map((e) => e.type)).toEqual(['io-error', 'stop']);
    expect(events[0]).toMatchObject({ type: 'io-error', event: { device: 'vd-full', operation: 'write', action: 'stop', nospace: true, code: 'ENOSPC' } });
    await blk.resume();
    await write;
    expect(same(await blk.read(4096, 4096), pattern(4096, 2))).toBe(true);
    expect((await blk.errorPolicy()).iostatus).toBe('ok');

    // With werror=report the same error reaches the caller with its code.
    await client.open({
      options: { driver: 'raw', 'node-name': 'full2', file: { driver: 'blkdebug', image: { driver: 'memory', size: MiB }, 'inject-error': [{ event: 'write_aio', errno: 'ENOSPC' }] } },
    });
    const blk2 = await client.attach('full2', { werror: 'report' });
    const e = await blk2.pwrite(0, new Uint8Array(512)).catch((x: unknown) => x);
    expect(e).toBeInstanceOf(BlockError);
    expect((e as BlockError).code).toBe('ENOSPC');
  });
});

describe('SharedArrayBuffer channel', () => {
  it('serves synchronous reads and writes from another thread, with the proxy seeing the same bytes', async () => {
    await client.open({ options: { driver: 'raw', 'node-name': 's', file: { driver: 'memory', size: 2 * MiB } } });
    const blk = await client.attach('s');
    await blk.pwrite(0, pattern(8192, 4));
    const sab = await blk.openChannel(4096);
    const task: SabThreadTask = { sab, write: Array.from(pattern(10_000, 8)), offset: 100_000, readLength: 10_000, badOffset: 4 * MiB };
    const out = await new Promise<{ length: number; read: number[]; error?: string; message?: string }>((resolve, reject) => {
      // The thread registers tsx itself: worker_threads do not take --import loaders from execArgv.
      const url = new URL('./testing/sab-client-thread.ts', import.meta.url).href;
      const boot = `import('tsx/esm/api').then((m) => { m.register(); return import(${JSON.stringify(url)}); })`;
      const w = new Worker(boot, { eval: true, workerData: task });
      w.once('message', resolve);
      w.once('error', reject);
    });
    expect(out.length).toBe(2 * MiB);
    expect(same(new Uint8Array(out.read), pattern(10_000, 8))).toBe(true);
    expect(out.error).toBe('EIO');
    // What the channel wrote, the proxy reads.
    expect(same(await blk.read(100_000, 10_000), pattern(10_000, 8))).toBe(true);
    await blk.close();
  });

  it('a channel of a closed backend answers ENOMEDIUM at once instead of blocking', async () => {
    await client.open({ options: { driver: 'raw', 'node-name': 'cc', file: { driver: 'memory', size: MiB } } });
    const blk = await client.attach('cc');
    const sab = await blk.openChannel(4096);
    await blk.close();
    // No other thread needed: a closed channel never waits.
    const ch = new SabChannelClient(sab, { timeoutMs: 1000 });
    let caught: unknown;
    try {
      ch.read(new Uint8Array(16), 0);
    } catch (e) {
      caught = e;
    }
    expect(caught).toBeInstanceOf(BlockError);
    expect((caught as BlockError).code).toBe('ENOMEDIUM');
  });

  it('a request given an aborted signal fails with ECANCELED', async () => {
    await client.open({ options: { driver: 'raw', 'node-name': 'ab', file: { driver: 'memory', size: MiB } } });
    const blk = await client.attach('ab');
    const e = await blk.read(0, 512, { signal: AbortSignal.abort() }).catch((x: unknown) => x);
    expect((e as BlockError).code).toBe('ECANCELED');
    expect((await blk.read(0, 4)).length).toBe(4);
  });
});
