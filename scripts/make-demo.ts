#!/usr/bin/env tsx
/**
 * Generates the web inspector's demo images: a qcow2 overlay over a qcow2
 * base, 64 MiB each, with a GPT partition table, data, zero and compressed
 * clusters, and (when the generator can make them) an internal snapshot and
 * persistent dirty bitmaps. Writes them and demo.json (what is there, how it
 * was made, a content version) into the output directory.
 *
 *   tsx scripts/make-demo.ts [outDir] [--force] [--engine | --qemu]
 *
 * outDir defaults to web/public/demo (served by Vite, precached by the
 * service worker). Without --force it does nothing when demo.json is newer
 * than this script. The Vite plugin (web/vite-plugin.ts) runs it before every
 * dev start and build, so `npm start` on a fresh checkout makes the demo.
 *
 * Generators: the engine itself makes the images (qcow2 create, data, zero
 * and compressed writes through a BlockBackend, the internal snapshot with
 * the engine's qemu-img snapshot -c, the persistent bitmaps with its
 * qemu-img bitmap --add, and the later writes, which the bitmaps mark).
 * Each step is tried with the engine first, so the demo is the engine's
 * alone wherever the engine can do it. TEMPORARY fallback, per step, while an engine lacks one (the error
 * is ENOTSUP): that step is done with qemu-img/qemu-io and listed in
 * demo.json's byQemu, which the app shows; with everything in the engine,
 * byQemu is empty. Without qemu-utils a step the engine cannot do is left
 * out. An engine whose qcow2 writes fail with ENOTSUP falls back to doing
 * every step with qemu-img/qemu-io (also TEMPORARY).
 *
 * A demo that needed QEMU's tools is remade when the engine's sources
 * change (demo.json keeps a fingerprint of them), so a build after the
 * engine gains a capability makes the demo with it.
 */
import { spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, renameSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { crc32 } from '../src/core/partitions.ts';

/** Bump when the demo's content or layout changes, so stale copies are regenerated. */
const DEMO_LAYOUT = 5;

const MiB = 1024 * 1024;
const KiB = 1024;
const DISK = 64 * MiB;
const CLUSTER = 64 * KiB;
const SECTOR = 512;

/** One write of the demo, replayed by either generator. */
type DemoOp =
  | { kind: 'data'; offset: number; data: Uint8Array }
  | { kind: 'compressed'; offset: number; data: Uint8Array }
  | { kind: 'zero'; offset: number; length: number };

/** One image of the demo chain. */
interface DemoLayer {
  file: string;
  backing?: string;
  /** Writes before the snapshot. */
  ops: DemoOp[];
  snapshot?: string;
  bitmaps?: Array<{ name: string; granularity?: number }>;
  /** Writes after the snapshot and the bitmaps, so the bitmaps have dirty bits. */
  laterOps?: DemoOp[];
}

/** What the generated directory holds (read by the web app). */
export interface DemoManifest {
  layout: number;
  /** Content hash of the images: the app re-imports its OPFS copy when it changes. */
  version: string;
  /** 'engine', or 'qemu' while the temporary fallback is in use. */
  generator: 'engine' | 'qemu';
  /** Steps QEMU's tools did because the engine cannot yet (TEMPORARY, shown by the app; empty when the engine did everything). */
  byQemu: string[];
  /** Hash of the engine sources the demo was made with (a demo with byQemu steps is remade when it changes). */
  engine: string;
  /** The image to open (the top of the chain). */
  image: string;
  files: Array<{ name: string; size: number }>;
  description: string;
}

/** 64-byte text lines naming the layer, the region and each line's guest offset. */
function text(offset: number, length: number, label: string): Uint8Array {
  const out = new Uint8Array(length);
  const enc = new TextEncoder();
  for (let o = 0; o < length; o += 64) {
    const line = `qblock demo | ${label} | guest 0x${(offset + o).toString(16).padStart(8, '0')}`.padEnd(63, ' ') + '\n';
    out.set(enc.encode(line).subarray(0, Math.min(64, length - o)), o);
  }
  return out;
}

/** Writes a GUID in GPT's mixed-endian layout. */
function putGuid(b: Uint8Array, o: number, guid: string): void {
  const hex = guid.replace(/-/g, '');
  const bytes = Array.from({ length: 16 }, (_, i) => Number.parseInt(hex.slice(2 * i, 2 * i + 2), 16));
  const order = [3, 2, 1, 0, 5, 4, 7, 6, 8, 9, 10, 11, 12, 13, 14, 15];
  order.forEach((src, i) => (b[o + i] = bytes[src]!));
}

function putLe32(b: Uint8Array, o: number, v: number): void {
  new DataView(b.buffer, b.byteOffset).setUint32(o, v >>> 0, true);
}

function putLe64(b: Uint8Array, o: number, v: number): void {
  const dv = new DataView(b.buffer, b.byteOffset);
  dv.setUint32(o, v % 0x100000000, true);
  dv.setUint32(o + 4, Math.floor(v / 0x100000000), true);
}

/** A GPT header for the given LBAs, CRCs filled in. */
function gptHeader(current: number, backup: number, entriesLba: number, entriesCrc: number, lastLba: number): Uint8Array {
  const h = new Uint8Array(SECTOR);
  h.set(new TextEncoder().encode('EFI PART'), 0);
  putLe32(h, 8, 0x00010000);
  putLe32(h, 12, 92);
  putLe64(h, 24, current);
  putLe64(h, 32, backup);
  putLe64(h, 40, 34);
  putLe64(h, 48, lastLba - 33);
  putGuid(h, 56, '5eb1c0c4-0dd5-4d7e-9a1b-7dbf0ab1e0c5');
  putLe64(h, 72, entriesLba);
  putLe32(h, 80, 128);
  putLe32(h, 84, 128);
  putLe32(h, 88, entriesCrc);
  putLe32(h, 16, crc32(h.subarray(0, 92)));
  return h;
}

/** Protective MBR, primary GPT (LBA 0-33) and backup GPT (last 33 sectors) with an EFI and a Linux partition. */
function gpt(): { primary: Uint8Array; backup: Uint8Array } {
  const lastLba = DISK / SECTOR - 1;
  const entries = new Uint8Array(128 * 128);
  const part = (i: number, type: string, guid: string, first: number, last: number, name: string): void => {
    const o = i * 128;
    putGuid(entries, o, type);
    putGuid(entries, o + 16, guid);
    putLe64(entries, o + 32, first);
    putLe64(entries, o + 40, last);
    for (let c = 0; c < name.length; c++) entries[o + 56 + 2 * c] = name.charCodeAt(c);
  };
  part(0, 'c12a7328-f81f-11d2-ba4b-00a0c93ec93b', '9a1d3b5e-1c2f-4e6a-8b7d-0e1f2a3b4c5d', 2048, 18431, 'EFI system partition');
  part(1, '0fc63daf-8483-4772-8e79-3d69d8477de4', '3c4d5e6f-7a8b-4c9d-ae0f-1a2b3c4d5e6f', 18432, 129023, 'root');
  const entriesCrc = crc32(entries);
  const primary = new Uint8Array(34 * SECTOR);
  // Protective MBR: one 0xEE partition over the whole disk.
  const m = 446;
  primary[m + 4] = 0xee;
  primary.set([0x00, 0x02, 0x00], m + 1);
  primary.set([0xff, 0xff, 0xff], m + 5);
  putLe32(primary, m + 8, 1);
  putLe32(primary, m + 12, Math.min(lastLba, 0xffffffff));
  primary[510] = 0x55;
  primary[511] = 0xaa;
  primary.set(gptHeader(1, lastLba, 2, entriesCrc, lastLba), SECTOR);
  primary.set(entries, 2 * SECTOR);
  const backup = new Uint8Array(33 * SECTOR);
  backup.set(entries, 0);
  backup.set(gptHeader(lastLba, 1, lastLba - 32, entriesCrc, lastLba), 32 * SECTOR);
  return { primary, backup };
}

/** The demo chain: base.qcow2 (partition table, data, compressed data) under overlay.qcow2. */
function demoLayers(): DemoLayer[] {
  const { primary, backup } = gpt();
  const data = (offset: number, length: number, label: string): DemoOp => ({ kind: 'data', offset, data: text(offset, length, label) });
  const compressed = (offset: number, length: number, label: string): DemoOp => ({ kind: 'compressed', offset, data: text(offset, length, label) });
  return [
    {
      file: 'base.qcow2',
      ops: [
        { kind: 'data', offset: 0, data: primary },
        { kind: 'data', offset: DISK - backup.length, data: backup },
        data(1 * MiB, 256 * KiB, 'base | EFI system partition'),
        data(9 * MiB, 2 * MiB, 'base | root filesystem'),
        compressed(16 * MiB, 1 * MiB, 'base | compressed cluster'),
      ],
    },
    {
      file: 'overlay.qcow2',
      backing: 'base.qcow2',
      ops: [
        data(10 * MiB, 512 * KiB, 'overlay | rewritten over the base'),
        { kind: 'zero', offset: 10 * MiB + 512 * KiB, length: 512 * KiB },
        compressed(20 * MiB, 1 * MiB, 'overlay | compressed cluster'),
        data(32 * MiB, 256 * KiB, 'overlay | data'),
      ],
      snapshot: 'installed',
      bitmaps: [{ name: 'backup-0' }, { name: 'migration', granularity: 1 * MiB }],
      laterOps: [data(40 * MiB, 512 * KiB, 'overlay | written after the snapshot'), data(9 * MiB + 64 * KiB, 64 * KiB, 'overlay | one cluster over the base')],
    },
  ];
}

/** Thrown by the engine generator when the engine cannot write qcow2 yet. */
class EngineCannotWrite extends Error {}

/** Runs a command, throwing with its stderr when it fails. */
function run(cmd: string, args: string[], cwd: string): void {
  const r = spawnSync(cmd, args, { cwd, encoding: 'utf8' });
  if (r.error) throw new Error(`${cmd}: ${r.error.message}`);
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} failed: ${r.stderr || r.stdout}`);
}

/** True when `cmd` runs (qemu-img and qemu-io are optional for `npm start`). */
function have(cmd: string): boolean {
  const r = spawnSync(cmd, ['--version'], { encoding: 'utf8' });
  return !r.error && r.status === 0;
}

/** Replays ops with qemu-io; each data op's bytes go through a pattern file of exactly its length, so nothing repeats. */
function replayWithQemuIo(dir: string, file: string, ops: DemoOp[]): void {
  if (ops.length === 0) return;
  const tmp = join(dir, '.ops');
  mkdirSync(tmp, { recursive: true });
  try {
    const cmds: string[] = [];
    ops.forEach((op, i) => {
      if (op.kind === 'zero') {
        cmds.push('-c', `write -q -z ${op.offset} ${op.length}`);
        return;
      }
      const f = join(tmp, `${file}.${i}`);
      writeFileSync(f, op.data);
      cmds.push('-c', `write -q ${op.kind === 'compressed' ? '-c ' : ''}-s ${f} ${op.offset} ${op.data.length}`);
    });
    run('qemu-io', ['-f', 'qcow2', ...cmds, file], dir);
  } finally {
    rmSync(tmp, { recursive: true, force: true });
  }
}

/**
 * Makes the demo with qblock itself: qcow2 create, then data, zero and
 * compressed writes through a BlockBackend, the snapshot, the bitmaps and
 * the later writes. Returns what had to be done by QEMU's tools instead
 * (TEMPORARY: each step falls back to qemu-img/qemu-io when the engine
 * answers ENOTSUP; an engine without bitmaps opens images with bitmaps
 * read-only, so the writes after QEMU's bitmaps go through qemu-io too).
 * Without qemu-img those extras are skipped rather than failing `npm start`.
 */
async function generateWithEngine(dir: string, layers: DemoLayer[], log: (m: string) => void): Promise<{ byQemu: string[]; snapshot: boolean; bitmaps: boolean }> {
  const { createNodeGraph, BlockBackend, OPEN, isBlockError } = await import('../src/node.ts');
  const { createSnapshot } = await import('../src/core/img/snapshot.ts');
  const { runBitmapActions } = await import('../src/core/img/bitmap.ts');
  const graph = createNodeGraph();
  const qcow2 = graph.getDriver('qcow2');
  const file = graph.getDriver('file');
  const ctx = {
    async createAndOpenFile(name: string) {
      await file.create!(name, {}, ctx);
      return graph.open({ driver: 'file', filename: name }, OPEN.RDWR);
    },
    async openImage(name: string, format?: string) {
      return graph.openImage(name, { ...(format !== undefined ? { format } : {}), readOnly: true, options: { 'force-share': true } });
    },
    async close(bs: Parameters<typeof graph.unref>[0]) {
      await graph.unref(bs);
    },
  };
  const byQemu: string[] = [];
  const made = { snapshot: false, bitmaps: false };
  const qemu = have('qemu-img') && have('qemu-io');
  type Blk = Awaited<ReturnType<typeof BlockBackend.open>>;
  const openRw = (path: string): Promise<Blk> => BlockBackend.open(graph, { driver: 'qcow2', file: { driver: 'file', filename: path } });
  const replay = async (blk: Blk, ops: DemoOp[]): Promise<void> => {
    try {
      for (const op of ops) {
        if (op.kind === 'data') await blk.pwrite(op.offset, op.data);
        else if (op.kind === 'zero') await blk.pwriteZeroes(op.offset, op.length);
        // The engine compresses one cluster per request, as QEMU's driver callback does.
        else for (let o = 0; o < op.data.length; o += CLUSTER) await blk.pwriteCompressed(op.offset + o, op.data.subarray(o, o + CLUSTER));
      }
      await blk.flush();
    } catch (e) {
      if (isBlockError(e, 'ENOTSUP')) throw new EngineCannotWrite(e.message);
      throw e;
    }
  };
  const write = async (path: string, ops: DemoOp[]): Promise<void> => {
    const blk = await openRw(path);
    try {
      await replay(blk, ops);
    } finally {
      await blk.close();
    }
  };
  try {
    for (const layer of layers) {
      const path = join(dir, layer.file);
      const opts: Record<string, string | number> = { size: DISK, cluster_size: CLUSTER };
      if (layer.backing !== undefined) Object.assign(opts, { backing_file: layer.backing, backing_fmt: 'qcow2' });
      await qcow2.create!(path, opts, ctx);
      await write(path, layer.ops);
      if (layer.snapshot !== undefined) {
        // The engine's qemu-img snapshot -c first.
        const blk = await openRw(path);
        let engineDid = false;
        try {
          await createSnapshot(blk.bs!, layer.snapshot);
          await blk.flush();
          engineDid = true;
        } catch (e) {
          if (!isBlockError(e, 'ENOTSUP')) throw e;
        } finally {
          await blk.close();
        }
        if (engineDid) made.snapshot = true;
        else if (qemu) {
          // TEMPORARY: the engine cannot create qcow2 internal snapshots yet.
          run('qemu-img', ['snapshot', '-c', layer.snapshot, layer.file], dir);
          byQemu.push(`snapshot '${layer.snapshot}' (qemu-img snapshot)`);
          made.snapshot = true;
        } else {
          log(`the engine cannot create snapshots yet and qemu-img is not installed: the demo has no internal snapshot`);
        }
      }
      let later = layer.laterOps ?? [];
      if (layer.bitmaps?.length) {
        // The engine's qemu-img bitmap --add first, one open per bitmap as separate qemu-img runs do (the
        // bitmap directory keeps that order); the later writes below then mark them, and closing stores them.
        let engineDid = 0;
        for (const b of layer.bitmaps) {
          const blk = await openRw(path);
          try {
            await runBitmapActions(blk.bs!, b.name, [{ op: 'add' }], b.granularity ? { granularity: b.granularity } : {});
            engineDid++;
          } catch (e) {
            if (engineDid > 0 || !isBlockError(e, 'ENOTSUP')) throw e;
            break;
          } finally {
            await blk.close();
          }
        }
        if (engineDid > 0) made.bitmaps = true;
        else if (qemu) {
          // TEMPORARY: the engine cannot store persistent dirty bitmaps yet.
          for (const b of layer.bitmaps) run('qemu-img', ['bitmap', '--add', ...(b.granularity ? ['-g', String(b.granularity)] : []), layer.file, b.name], dir);
          byQemu.push('dirty bitmaps (qemu-img bitmap)');
          made.bitmaps = true;
          if (later.length) {
            // TEMPORARY: an engine without bitmaps opens images with bitmaps read-only, and only QEMU would mark them dirty.
            replayWithQemuIo(dir, layer.file, later);
            byQemu.push('writes after the bitmaps were added (qemu-io)');
            later = [];
          }
        } else {
          log(`the engine cannot store bitmaps yet and qemu-img is not installed: the demo has no dirty bitmaps`);
        }
      }
      if (later.length) await write(path, later);
    }
  } finally {
    await graph.closeAll();
  }
  return { byQemu, ...made };
}

/** TEMPORARY full fallback for an engine that cannot write qcow2: every step with qemu-img and qemu-io. */
function generateWithQemu(dir: string, layers: DemoLayer[]): void {
  for (const layer of layers) {
    const backing = layer.backing !== undefined ? ['-b', layer.backing, '-F', 'qcow2'] : [];
    run('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', `cluster_size=${CLUSTER}`, ...backing, layer.file, String(DISK)], dir);
    replayWithQemuIo(dir, layer.file, layer.ops);
    if (layer.snapshot !== undefined) run('qemu-img', ['snapshot', '-c', layer.snapshot, layer.file], dir);
    for (const b of layer.bitmaps ?? []) run('qemu-img', ['bitmap', '--add', ...(b.granularity ? ['-g', String(b.granularity)] : []), layer.file, b.name], dir);
    replayWithQemuIo(dir, layer.file, layer.laterOps ?? []);
  }
}

/** Hash of the engine's sources (src/ without tests): a demo QEMU helped make is remade when it changes. */
export function engineFingerprint(): string {
  const root = fileURLToPath(new URL('../src', import.meta.url));
  const hash = createHash('sha256');
  const walk = (d: string): void => {
    for (const e of readdirSync(d, { withFileTypes: true }).sort((x, y) => (x.name < y.name ? -1 : 1))) {
      const p = join(d, e.name);
      if (e.isDirectory()) walk(p);
      else if (e.name.endsWith('.ts') && !e.name.endsWith('.test.ts')) hash.update(e.name).update(readFileSync(p));
    }
  };
  walk(root);
  return hash.digest('hex').slice(0, 16);
}

/** True when demo.json exists, matches this layout, is newer than this script, and (when QEMU helped) the engine is unchanged. */
function upToDate(dir: string): boolean {
  const manifest = join(dir, 'demo.json');
  if (!existsSync(manifest)) return false;
  try {
    const m = JSON.parse(readFileSync(manifest, 'utf8')) as DemoManifest;
    if (m.layout !== DEMO_LAYOUT || !m.files.every((f) => existsSync(join(dir, f.name)))) return false;
    // QEMU's tools made part of it: remake it when the engine has changed, in case it can now.
    if (m.byQemu.length > 0 && m.engine !== engineFingerprint()) return false;
  } catch {
    return false;
  }
  return statSync(manifest).mtimeMs >= statSync(fileURLToPath(import.meta.url)).mtimeMs;
}

/** Waits for the lock directory `lock` (two servers starting at once must not write the demo together); returns its release. */
async function lockDir(lock: string): Promise<() => void> {
  for (;;) {
    try {
      mkdirSync(lock);
      return () => rmSync(lock, { recursive: true, force: true });
    } catch (e) {
      if ((e as { code?: string }).code !== 'EEXIST') throw e;
      // A lock left by a killed run is stale after two minutes.
      if (Date.now() - statSync(lock).mtimeMs > 120_000) rmSync(lock, { recursive: true, force: true });
      await new Promise((r) => setTimeout(r, 200));
    }
  }
}

/** Generates the demo into `dir` (see the file comment); returns the manifest written, or null when it was up to date. */
export async function makeDemo(dir: string, opts: { force?: boolean; generator?: 'engine' | 'qemu' } = {}): Promise<DemoManifest | null> {
  if (!opts.force && upToDate(dir)) return null;
  mkdirSync(dir, { recursive: true });
  const unlock = await lockDir(`${dir}.lock`);
  try {
    // Another run may have made it while we waited.
    if (!opts.force && upToDate(dir)) return null;
    // Made in a scratch directory and moved into place, so a server never serves half-written images.
    const work = mkdtempSync(join(dir, '..', '.demo-'));
    try {
      const manifest = await generate(work, opts);
      for (const f of manifest.files) renameSync(join(work, f.name), join(dir, f.name));
      renameSync(join(work, 'demo.json'), join(dir, 'demo.json'));
      return manifest;
    } finally {
      rmSync(work, { recursive: true, force: true });
    }
  } finally {
    unlock();
  }
}

/** Makes the images and demo.json in `dir`. */
async function generate(dir: string, opts: { generator?: 'engine' | 'qemu' }): Promise<DemoManifest> {
  const layers = demoLayers();
  const log = (m: string): void => void process.stderr.write(`[make-demo] ${m}\n`);
  let generator: DemoManifest['generator'] = 'engine';
  let byQemu: string[] = [];
  let extras = { snapshot: false, bitmaps: false };
  if (opts.generator !== 'qemu') {
    try {
      const r = await generateWithEngine(dir, layers, log);
      byQemu = r.byQemu;
      extras = { snapshot: r.snapshot, bitmaps: r.bitmaps };
    } catch (e) {
      if (!(e instanceof EngineCannotWrite) || opts.generator === 'engine') throw e;
      log(`the engine cannot make the demo yet (${e.message}); using qemu-img/qemu-io (temporary)`);
      generator = 'qemu';
    }
  } else {
    generator = 'qemu';
  }
  if (generator === 'qemu') {
    for (const l of layers) rmSync(join(dir, l.file), { force: true });
    generateWithQemu(dir, layers);
    byQemu = ['everything (qemu-img, qemu-io)'];
    extras = { snapshot: true, bitmaps: true };
  }
  const hash = createHash('sha256');
  const files = layers.map((l) => {
    const bytes = readFileSync(join(dir, l.file));
    hash.update(bytes);
    return { name: l.file, size: bytes.length };
  });
  const manifest: DemoManifest = {
    layout: DEMO_LAYOUT,
    version: hash.digest('hex').slice(0, 16),
    generator,
    byQemu,
    engine: engineFingerprint(),
    image: layers[layers.length - 1]!.file,
    files,
    description:
      'A 64 MiB qcow2 overlay over a qcow2 base: GPT with an EFI and a Linux partition, data in both layers, ' +
      'zero clusters hiding base data, compressed clusters' +
      (extras.snapshot && extras.bitmaps ? ', an internal snapshot and two dirty bitmaps (written to after they were added).' : extras.snapshot ? ' and an internal snapshot.' : extras.bitmaps ? ' and two dirty bitmaps (written to after they were added).' : '.'),
  };
  writeFileSync(join(dir, 'demo.json'), `${JSON.stringify(manifest, null, 2)}\n`);
  return manifest;
}

/** Command-line entry. */
async function main(argv: string[]): Promise<void> {
  const root = fileURLToPath(new URL('..', import.meta.url));
  const positional = argv.filter((a) => !a.startsWith('--'));
  const dir = resolve(positional[0] ?? join(root, 'web', 'public', 'demo'));
  const generator = argv.includes('--engine') ? 'engine' : argv.includes('--qemu') ? 'qemu' : undefined;
  const m = await makeDemo(dir, { force: argv.includes('--force'), ...(generator ? { generator } : {}) });
  if (m) process.stderr.write(`[make-demo] ${m.image} and its base written to ${dir} by ${m.generator === 'qemu' ? 'qemu-img/qemu-io (temporary)' : 'the engine'} (version ${m.version})\n`);
}

if (process.argv[1] && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  main(process.argv.slice(2)).catch((e: unknown) => {
    process.stderr.write(`[make-demo] ${e instanceof Error ? e.message : String(e)}\n`);
    process.exit(1);
  });
}
