/**
 * Vite plugins of the web inspector:
 *
 * - demo: makes the demo images (scripts/make-demo.ts, run with tsx in a
 *   child process so the engine is not bundled into the Vite config) into
 *   web/public/demo before the dev server starts or a build begins, when
 *   they are missing or older than the script.
 * - pwa: builds web/sw.ts as /sw.js next to the app, writes the precache
 *   list (every file of the build, the wasm kernels and the demo included)
 *   and a version hash into it after the build, and serves/emits the app
 *   icons (PNGs drawn here, so no binary sits in the repository).
 */
import { spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, readdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { join, relative, sep } from 'node:path';
import { fileURLToPath } from 'node:url';
import { deflateSync } from 'node:zlib';
import type { Plugin, ResolvedConfig } from 'vite';

const webRoot = fileURLToPath(new URL('.', import.meta.url));
const repoRoot = fileURLToPath(new URL('..', import.meta.url));

/** Where the demo lives (inside Vite's public directory, so dev and build serve it as is). */
export const DEMO_DIR = join(webRoot, 'public', 'demo');
/** Token in web/sw.ts replaced by the precache manifest after the build. */
const PRECACHE_TOKEN = '__QBLOCK_PRECACHE_MANIFEST__';
const ICON_SIZES = [192, 512] as const;

/**
 * True when the demo may need (re)generating: no demo.json, one older than
 * the generator, or one QEMU's tools helped make (the generator then checks
 * whether the engine changed and can do those steps itself now).
 */
function demoStale(): boolean {
  const manifest = join(DEMO_DIR, 'demo.json');
  if (!existsSync(manifest)) return true;
  if (statSync(manifest).mtimeMs < statSync(join(repoRoot, 'scripts', 'make-demo.ts')).mtimeMs) return true;
  try {
    return ((JSON.parse(readFileSync(manifest, 'utf8')) as { byQemu?: unknown[] }).byQemu?.length ?? 0) > 0;
  } catch {
    return true;
  }
}

/** Runs scripts/make-demo.ts when the demo is stale; a failure is reported, and the app starts without a demo. */
function ensureDemo(log: (m: string) => void): void {
  if (!demoStale()) return;
  const tsx = join(repoRoot, 'node_modules', '.bin', process.platform === 'win32' ? 'tsx.cmd' : 'tsx');
  const r = spawnSync(existsSync(tsx) ? tsx : 'npx', existsSync(tsx) ? ['scripts/make-demo.ts', DEMO_DIR] : ['tsx', 'scripts/make-demo.ts', DEMO_DIR], {
    cwd: repoRoot,
    stdio: ['ignore', 'inherit', 'inherit'],
  });
  if (r.status !== 0) log('could not generate the demo images (see above); the inspector starts without them');
}

/** The demo plugin (see the file comment). */
function demoPlugin(): Plugin {
  let preview = false;
  return {
    name: 'qblock-demo',
    config(_config, env) {
      preview = env.isPreview === true;
    },
    configResolved(config) {
      if (!preview) ensureDemo((m) => config.logger.warn(`[qblock-demo] ${m}`));
    },
  };
}

let crcTable: Int32Array | undefined;

/** CRC-32 as PNG chunks need it. */
function crc32(buf: Uint8Array): number {
  if (!crcTable) {
    crcTable = new Int32Array(256);
    for (let n = 0; n < 256; n++) {
      let c = n;
      for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
      crcTable[n] = c;
    }
  }
  let c = -1;
  for (let i = 0; i < buf.length; i++) c = crcTable[(c ^ buf[i]!) & 0xff]! ^ (c >>> 8);
  return (c ^ -1) >>> 0;
}

/** Encodes RGBA pixels as a PNG. */
function png(width: number, height: number, rgba: Uint8Array): Buffer {
  const chunk = (type: string, data: Uint8Array): Buffer => {
    const out = Buffer.alloc(12 + data.length);
    out.writeUInt32BE(data.length, 0);
    out.write(type, 4, 'ascii');
    out.set(data, 8);
    out.writeUInt32BE(crc32(out.subarray(4, 8 + data.length)), 8 + data.length);
    return out;
  };
  const ihdr = Buffer.alloc(13);
  ihdr.writeUInt32BE(width, 0);
  ihdr.writeUInt32BE(height, 4);
  ihdr.set([8, 6, 0, 0, 0], 8);
  const raw = Buffer.alloc(height * (1 + width * 4));
  for (let y = 0; y < height; y++) {
    raw[y * (1 + width * 4)] = 0;
    raw.set(rgba.subarray(y * width * 4, (y + 1) * width * 4), y * (1 + width * 4) + 1);
  }
  return Buffer.concat([Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]), chunk('IHDR', ihdr), chunk('IDAT', deflateSync(raw)), chunk('IEND', new Uint8Array(0))]);
}

/** The app icon: an allocation map of coloured clusters on the app's dark background (maskable: content inside the safe zone). */
export function drawIcon(size: number): Buffer {
  const px = new Uint8Array(size * size * 4);
  const bg = [0x12, 0x18, 0x22];
  const colours = [
    [0x3b, 0x82, 0xf6],
    [0xa8, 0x55, 0xf7],
    [0xf5, 0x9e, 0x0b],
    [0x34, 0xd3, 0x99],
    [0x2a, 0x33, 0x44],
  ];
  // A fixed pattern of cell colours (index into `colours`), 5×5, like a small image's map.
  const pattern = [0, 0, 1, 4, 2, 0, 3, 3, 4, 2, 1, 0, 0, 0, 4, 4, 2, 2, 0, 1, 4, 4, 0, 3, 0];
  const grid = 5;
  const inset = Math.round(size * 0.2);
  const cell = (size - 2 * inset) / grid;
  const gap = Math.max(1, Math.round(cell * 0.12));
  for (let y = 0; y < size; y++) {
    for (let x = 0; x < size; x++) {
      let c = bg;
      const gx = Math.floor((x - inset) / cell);
      const gy = Math.floor((y - inset) / cell);
      if (gx >= 0 && gy >= 0 && gx < grid && gy < grid) {
        const ox = x - inset - gx * cell;
        const oy = y - inset - gy * cell;
        if (ox >= gap / 2 && oy >= gap / 2 && ox < cell - gap / 2 && oy < cell - gap / 2) c = colours[pattern[gy * grid + gx]!]!;
      }
      px.set([c[0]!, c[1]!, c[2]!, 255], (y * size + x) * 4);
    }
  }
  return png(size, size, px);
}

/** Every file below `root`, as URL paths relative to it. */
function walk(root: string, dir = root): string[] {
  const out: string[] = [];
  for (const e of readdirSync(dir, { withFileTypes: true })) {
    // Dot files are scratch space (make-demo's work directory), never part of the app.
    if (e.name.startsWith('.')) continue;
    const p = join(dir, e.name);
    if (e.isDirectory()) out.push(...walk(root, p));
    else out.push(relative(root, p).split(sep).join('/'));
  }
  return out;
}

/** The PWA plugin (see the file comment). */
function pwaPlugin(): Plugin {
  let config: ResolvedConfig | undefined;
  const icons = new Map<string, Buffer>();
  const icon = (size: number): Buffer => {
    const name = `icon-${size}.png`;
    let b = icons.get(name);
    if (!b) {
      b = drawIcon(size);
      icons.set(name, b);
    }
    return b;
  };
  return {
    name: 'qblock-pwa',
    config(_c, env) {
      if (env.command !== 'build' || env.isPreview) return;
      // The service worker is its own entry with a fixed name: it must sit at the root to control the whole app.
      return {
        build: {
          rolldownOptions: {
            input: { index: join(webRoot, 'index.html'), sw: join(webRoot, 'sw.ts') },
            output: { entryFileNames: (chunk) => (chunk.name === 'sw' ? 'sw.js' : 'assets/[name]-[hash].js') },
          },
        },
      };
    },
    configResolved(c) {
      config = c;
    },
    configureServer(server) {
      server.middlewares.use((req, res, next) => {
        const m = /^\/icons\/icon-(\d+)\.png$/.exec(req.url ?? '');
        const size = m ? Number(m[1]) : 0;
        if (!(ICON_SIZES as readonly number[]).includes(size)) return next();
        res.setHeader('Content-Type', 'image/png');
        res.end(icon(size));
      });
    },
    generateBundle() {
      for (const size of ICON_SIZES) this.emitFile({ type: 'asset', fileName: `icons/icon-${size}.png`, source: icon(size) });
    },
    closeBundle() {
      if (!config || config.command !== 'build') return;
      const out = config.build.outDir;
      const swPath = join(out, 'sw.js');
      if (!existsSync(swPath)) return;
      const files = walk(out).filter((f) => f !== 'sw.js' && !f.endsWith('.map'));
      const hash = createHash('sha256');
      for (const f of files.sort()) hash.update(f).update(readFileSync(join(out, f)));
      const manifest = { version: hash.digest('hex').slice(0, 16), files: ['./', ...files.filter((f) => f !== 'index.html').map((f) => `./${f}`), './index.html'] };
      const sw = readFileSync(swPath, 'utf8');
      if (!sw.includes(PRECACHE_TOKEN)) throw new Error(`sw.js lost its ${PRECACHE_TOKEN} placeholder`);
      // The token sits inside a string literal: insert the manifest as that string's escaped JSON.
      writeFileSync(swPath, sw.replace(PRECACHE_TOKEN, JSON.stringify(JSON.stringify(manifest)).slice(1, -1)));
    },
  };
}

/** The inspector's Vite plugins. */
export function qblockInspector(): Plugin[] {
  return [demoPlugin(), pwaPlugin()];
}
