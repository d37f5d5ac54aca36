/// <reference lib="webworker" />
/**
 * The inspector's service worker: precaches the whole built app (HTML, JS,
 * CSS, the wasm kernels, icons, the demo images) at install, then answers
 * every same-origin GET from that cache first, so after one visit the app
 * loads and works with no network. Range requests (the engine's HTTP driver
 * reading the demo) are cut from the cached file. Cached responses keep the
 * server's COOP/COEP headers, so the offline page is still cross-origin
 * isolated.
 *
 * The precache list and its version are written into this file after the
 * build (web/vite-plugin.ts); a new build changes this file, which is what
 * makes the browser install the new worker.
 */
export {};

declare const self: ServiceWorkerGlobalScope;

/** What the build writes in place of the token. */
interface PrecacheManifest {
  version: string;
  files: string[];
}

const MANIFEST: PrecacheManifest = JSON.parse('__QBLOCK_PRECACHE_MANIFEST__') as PrecacheManifest;
const CACHE = `qblock-${MANIFEST.version}`;
const CACHE_PREFIX = 'qblock-';

self.addEventListener('install', (event) => {
  event.waitUntil(
    (async () => {
      const cache = await caches.open(CACHE);
      // 'reload' skips the HTTP cache so the precache holds exactly this build.
      await cache.addAll(MANIFEST.files.map((f) => new Request(new URL(f, self.registration.scope), { cache: 'reload' })));
      await self.skipWaiting();
    })(),
  );
});

self.addEventListener('activate', (event) => {
  event.waitUntil(
    (async () => {
      for (const key of await caches.keys()) if (key.startsWith(CACHE_PREFIX) && key !== CACHE) await caches.delete(key);
      await self.clients.claim();
    })(),
  );
});

/** A 206 (or 416) cut from a cached full response for a `Range: bytes=a-b` request. */
async function rangeResponse(cached: Response, range: string): Promise<Response> {
  const blob = await cached.blob();
  const m = /^bytes=(\d*)-(\d*)$/.exec(range.trim());
  const size = blob.size;
  let start = m?.[1] ? Number(m[1]) : NaN;
  let end = m?.[2] ? Number(m[2]) : NaN;
  if (Number.isNaN(start)) {
    // Suffix range: the last N bytes.
    start = Number.isNaN(end) ? 0 : Math.max(0, size - end);
    end = size - 1;
  } else if (Number.isNaN(end) || end >= size) {
    end = size - 1;
  }
  const headers = new Headers(cached.headers);
  if (!m || start >= size || start > end) {
    headers.set('Content-Range', `bytes */${size}`);
    headers.delete('Content-Length');
    return new Response(null, { status: 416, headers });
  }
  headers.set('Content-Range', `bytes ${start}-${end}/${size}`);
  headers.set('Content-Length', String(end - start + 1));
  headers.set('Accept-Ranges', 'bytes');
  return new Response(blob.slice(start, end + 1), { status: 206, statusText: 'Partial Content', headers });
}

/** Cache first; navigations fall back to the cached app shell; misses go to the network. */
async function answer(req: Request): Promise<Response> {
  const cache = await caches.open(CACHE);
  const url = new URL(req.url);
  let cached = await cache.match(req, { ignoreSearch: url.pathname.endsWith('.html') || req.mode === 'navigate', ignoreVary: true });
  if (!cached && req.mode === 'navigate') cached = await cache.match(new URL('./', self.registration.scope).href);
  if (cached) {
    const range = req.headers.get('range');
    if (range) {
      // If-Range with a validator other than the cached one asks for the whole new file: let the network decide.
      const ifRange = req.headers.get('if-range');
      const tag = cached.headers.get('etag') ?? cached.headers.get('last-modified');
      if (!ifRange || ifRange === tag) return rangeResponse(cached, range);
    } else {
      return cached;
    }
  }
  return fetch(req);
}

self.addEventListener('fetch', (event) => {
  const req = event.request;
  if (req.method !== 'GET' || new URL(req.url).origin !== self.location.origin) return;
  event.respondWith(answer(req));
});
