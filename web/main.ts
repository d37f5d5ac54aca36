/// <reference types="vite/client" />
/**
 * The image inspector's entry: starts the engine worker, puts the demo image
 * into the library on first visit and opens it, wires the ways to open
 * images (file picker, drag and drop, URL, library), the tabs, the service
 * worker and the install prompt.
 */
import type { EngineEnv } from '../src/client/index.ts';
import { renderActions } from './app/actions.ts';
import { AllocationMap, renderAllocationMap } from './app/allocmap.ts';
import { App, openFiles, openUrl, type OpenImage } from './app/app.ts';
import { button, errorBox, errorText, h, replace } from './app/dom.ts';
import { bytes } from './app/format.ts';
import { HexView } from './app/hexview.ts';
import { Library } from './app/library.ts';
import { renderOverview } from './app/overview.ts';
import { renderTables, type HexTarget } from './app/tables.ts';
import type { ProbeResult } from './probe-types.ts';

/** What make-demo.ts writes next to the demo images. */
interface DemoManifest {
  version: string;
  generator: 'engine' | 'qemu';
  byQemu?: string[];
  image: string;
  files: Array<{ name: string; size: number }>;
  description: string;
}

const TABS = ['Overview', 'Allocation map', 'Tables', 'Hex', 'Actions'] as const;
type Tab = (typeof TABS)[number];

const el = <T extends HTMLElement>(id: string): T => document.getElementById(id) as T;
const view = el<HTMLElement>('image-view');
const badges = el<HTMLElement>('status-badges');
const app = new App(el('jobs'));
let tab: Tab = 'Overview';
let mapView: AllocationMap | undefined;
let hexView: HexView | undefined;
let pendingHex: HexTarget | undefined;
let pendingBitmap = '';
let demo: DemoManifest | undefined;

/** Shows a message in the image area (errors while nothing is open). */
function placeholder(...c: Array<Node | string>): void {
  replace(view, h('div', { class: 'placeholder' }, ...c));
}

/** Opens the hex tab at a guest or host offset. */
function showHex(t: HexTarget): void {
  pendingHex = t;
  selectTab('Hex');
  // Coming from far down another tab: bring the dump into view.
  document.getElementById('tabpanel')?.scrollIntoView({ block: 'start' });
}

/** Opens the allocation map with a dirty bitmap laid over it. */
function showBitmapOnMap(name: string): void {
  pendingBitmap = name;
  selectTab('Allocation map');
  document.getElementById('tabpanel')?.scrollIntoView({ block: 'start' });
}

function selectTab(t: Tab): void {
  tab = t;
  render();
}

/** The tab strip, keyboard-operable as ARIA tabs (arrow keys move between them). */
function tabStrip(): HTMLElement {
  const list = h('div', { role: 'tablist', class: 'tabs', 'aria-label': 'Views of the image' });
  TABS.forEach((t, i) => {
    const b = h(
      'button',
      {
        type: 'button',
        role: 'tab',
        id: `tab-${i}`,
        'aria-selected': t === tab ? 'true' : 'false',
        'aria-controls': 'tabpanel',
        tabindex: t === tab ? 0 : -1,
        onclick: (() => selectTab(t)) as EventListener,
        onkeydown: ((ev: KeyboardEvent) => {
          const d = ev.key === 'ArrowRight' ? 1 : ev.key === 'ArrowLeft' ? -1 : 0;
          if (!d) return;
          ev.preventDefault();
          selectTab(TABS[(i + d + TABS.length) % TABS.length]!);
          document.getElementById(`tab-${TABS.indexOf(tab)}`)?.focus();
        }) as EventListener,
      },
      t,
    );
    list.append(b);
  });
  return list;
}

/** Renders the current image's head, tabs and tab panel. */
function render(): void {
  mapView?.stop();
  mapView = undefined;
  hexView = undefined;
  const img = app.current;
  if (!img) {
    placeholder(h('p', {}, 'No image is open. Open a file, drop one here, give a URL, or pick one from the library.'));
    return;
  }
  const panel = h('div', { id: 'tabpanel', role: 'tabpanel', 'aria-labelledby': `tab-${TABS.indexOf(tab)}`, 'data-tab': tab });
  const demoNote =
    img.origin === 'demo' && demo
      ? h(
          'details',
          { class: 'demo-note' },
          h('summary', {}, 'Built-in demo image: what is in it'),
          h(
            'p',
            {},
            `${demo.description} Generated at build time by ${demo.generator === 'engine' ? 'qblock itself' : 'qemu-img (temporary)'}`,
            demo.byQemu?.length ? `; done by QEMU's tools until the engine has them: ${demo.byQemu.join(', ')}.` : '.',
          ),
        )
      : null;
  replace(
    view,
    h(
      'div',
      { class: 'image-head' },
      h('h2', { 'data-testid': 'image-title' }, img.label),
      h('span', { class: 'pill' }, img.summary.format),
      h('span', { class: 'pill' }, bytes(img.summary.virtualSize)),
      h('span', { class: `pill ${img.summary.readOnly ? '' : 'warn'}` }, img.summary.readOnly ? 'read-only' : 'read-write'),
      img.layers.length > 1 ? h('span', { class: 'pill' }, `${img.layers.length - 1} backing layer${img.layers.length > 2 ? 's' : ''}`) : null,
    ),
    demoNote,
    tabStrip(),
    panel,
  );
  switch (tab) {
    case 'Overview':
      void renderOverview(app, img, panel, showBitmapOnMap).catch((e: unknown) => replace(panel, errorBox(e)));
      break;
    case 'Allocation map':
      mapView = renderAllocationMap(app, img, panel, showHex, pendingBitmap);
      pendingBitmap = '';
      break;
    case 'Tables':
      void renderTables(app, img, panel, showHex).catch((e: unknown) => replace(panel, errorBox(e)));
      break;
    case 'Hex':
      hexView = new HexView(app, img, panel);
      if (pendingHex) hexView.go(pendingHex);
      else void hexView.show();
      pendingHex = undefined;
      break;
    case 'Actions':
      renderActions(app, img, panel, showBitmapOnMap);
      break;
  }
}

/** The sidebar's list of open images. */
function renderOpenList(): void {
  const list = el<HTMLUListElement>('open-list');
  if (app.images.length === 0) {
    replace(list, h('li', { class: 'muted' }, 'None'));
    return;
  }
  replace(
    list,
    ...app.images.map((img: OpenImage) =>
      h(
        'li',
        { class: img === app.current ? 'current' : '' },
        button(img.label, () => app.select(img), { class: 'link', 'aria-current': img === app.current ? 'true' : undefined, title: `${img.summary.format}, ${bytes(img.summary.virtualSize)}` }),
        button('×', () => void app.close(img).catch((e: unknown) => placeholder(errorBox(e))), { class: 'icon', 'aria-label': `Close ${img.label}` }),
      ),
    ),
  );
}

/** Opens files from the picker or a drop, reporting failures in the image area. */
async function openPicked(files: File[]): Promise<void> {
  if (files.length === 0) return;
  try {
    await openFiles(app, files);
  } catch (e) {
    placeholder(h('p', {}, `Could not open ${files.map((f) => f.name).join(', ')}:`), errorBox(e));
  }
}

function wireOpenControls(): void {
  const input = el<HTMLInputElement>('file-input');
  input.addEventListener('change', () => {
    void openPicked(Array.from(input.files ?? []));
    input.value = '';
  });
  el<HTMLFormElement>('url-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    const url = el<HTMLInputElement>('url-input').value.trim();
    if (!url) return;
    let abs: string;
    try {
      abs = new URL(url, location.href).href;
    } catch {
      placeholder(errorBox(`'${url}' is not a URL`));
      return;
    }
    void openUrl(app, abs).catch((e: unknown) =>
      placeholder(
        h('p', {}, `Could not open ${abs}:`),
        errorBox(e),
        new URL(abs).origin !== location.origin
          ? h('p', { class: 'muted' }, 'Images on another site are read with range requests from this page, so that server must allow it with CORS: Access-Control-Allow-Origin, Range in Access-Control-Allow-Headers, and Content-Range in Access-Control-Expose-Headers.')
          : '',
      ),
    );
  });
  const overlay = el<HTMLElement>('drop-overlay');
  let depth = 0;
  const hasFiles = (ev: DragEvent): boolean => ev.dataTransfer?.types.includes('Files') ?? false;
  window.addEventListener('dragenter', (ev) => {
    if (!hasFiles(ev)) return;
    depth++;
    overlay.hidden = false;
  });
  window.addEventListener('dragleave', () => {
    if (--depth <= 0) {
      depth = 0;
      overlay.hidden = true;
    }
  });
  window.addEventListener('dragover', (ev) => {
    if (hasFiles(ev)) ev.preventDefault();
  });
  window.addEventListener('drop', (ev) => {
    if (!hasFiles(ev)) return;
    ev.preventDefault();
    depth = 0;
    overlay.hidden = true;
    void openPicked(Array.from(ev.dataTransfer?.files ?? []));
  });
}

/** Badges for what this browser gives the engine, and the app's offline state. */
function renderBadges(env: EngineEnv | undefined, extra: Array<Node | string> = []): void {
  const badge = (ok: boolean, label: string, why: string): HTMLElement => h('span', { class: `badge ${ok ? 'ok' : 'no'}`, title: why }, `${ok ? '✓' : '✗'} ${label}`);
  replace(
    badges,
    env ? badge(env.syncHandles, 'OPFS', env.syncHandles ? 'Images can be stored in the browser (OPFS sync access handles)' : 'No OPFS sync access handles: the library is unavailable') : '',
    env ? badge(env.crossOriginIsolated, 'isolated', env.crossOriginIsolated ? 'Cross-origin isolated: SharedArrayBuffer is available' : 'Not cross-origin isolated') : '',
    env ? badge(env.wasmKernels, 'wasm', env.wasmKernels ? 'SIMD wasm kernels loaded' : 'JS reference kernels in use') : '',
    ...extra,
  );
}

/** Reads the demo version the library copy was made from. */
async function demoCopyVersion(): Promise<string | undefined> {
  try {
    const dir = await (await navigator.storage.getDirectory()).getDirectoryHandle('demo');
    return (await (await dir.getFileHandle('.version')).getFile()).text();
  } catch {
    return undefined;
  }
}

/** Copies the demo into the library (once per demo version) and opens it; falls back to HTTP without OPFS. */
async function loadDemo(env: EngineEnv): Promise<void> {
  let res: Response;
  try {
    res = await fetch('./demo/demo.json', { cache: 'no-cache' });
    if (!res.ok) throw new Error(`HTTP ${res.status}`);
  } catch (e) {
    placeholder(h('p', {}, 'The demo image is not available (', errorText(e), '). Open an image of your own to start.'));
    return;
  }
  demo = (await res.json()) as DemoManifest;
  const url = (name: string): string => new URL(`./demo/${name}`, location.href).href;
  if (!env.syncHandles) {
    await openUrl(app, url(demo.image));
    app.current!.origin = 'demo';
    render();
    return;
  }
  if ((await demoCopyVersion()) !== demo.version) {
    for (const f of demo.files) {
      await app.engine.remove(`demo/${f.name}`).catch(() => undefined);
      await app.jobs.run(`Copy demo ${f.name} into the library`, (job) => app.engine.importImage({ url: url(f.name) }, `demo/${f.name}`, { progress: job.progress, signal: job.signal }));
    }
    const dir = await (await navigator.storage.getDirectory()).getDirectoryHandle('demo', { create: true });
    const w = await (await dir.getFileHandle('.version', { create: true })).createWritable();
    await w.write(demo.version);
    await w.close();
    app.emit('library');
  }
  const path = `demo/${demo.image}`;
  if (app.openAt(path)) return;
  await app.open({ opfs: path }, { readOnly: true, waitBusyMs: 3000 }, { label: path, origin: 'demo', opfsPath: path });
}

/** Registers the service worker of the built app (the dev server has none: its modules are not precached). */
async function registerServiceWorker(): Promise<string> {
  if (!import.meta.env.PROD || !('serviceWorker' in navigator)) return 'dev';
  const hadController = navigator.serviceWorker.controller !== null;
  const reg = await navigator.serviceWorker.register('./sw.js', { scope: './' });
  // A new build's worker takes over at once (skipWaiting); this page still runs the old build, so say so.
  navigator.serviceWorker.addEventListener('controllerchange', () => {
    if (!hadController) return;
    badges.append(button('New version: reload', () => location.reload(), { class: 'small', 'data-testid': 'update-ready' }));
  });
  await navigator.serviceWorker.ready;
  return reg.active ? 'ready' : 'installing';
}

/** The environment probe (a worker that round-trips bytes through OPFS and loads the kernels), shown in the Environment panel. */
function runProbe(): void {
  const out = el<HTMLPreElement>('probe');
  const worker = new Worker(new URL('./probe-worker.ts', import.meta.url), { type: 'module' });
  worker.onmessage = (ev: MessageEvent<ProbeResult>) => {
    out.textContent = JSON.stringify({ pageCrossOriginIsolated: window.crossOriginIsolated, ...ev.data }, null, 2);
    out.dataset.state = 'done';
    worker.terminate();
  };
  worker.onerror = (ev: ErrorEvent) => {
    out.textContent = JSON.stringify({ error: `worker failed: ${ev.message || 'unknown error'}` });
    out.dataset.state = 'done';
  };
}

async function main(): Promise<void> {
  app.on('current', render);
  app.on('images', renderOpenList);
  wireOpenControls();
  renderOpenList();
  // The probe repeats what the engine checks at start (it writes a scratch OPFS file and loads the kernels), so only on demand.
  const envPanel = document.querySelector<HTMLDetailsElement>('details.env');
  envPanel?.addEventListener('toggle', () => {
    if (envPanel.open && el('probe').dataset.state === 'running') runProbe();
  });
  let installPrompt: Event | undefined;
  const offline = h('span', { class: 'badge', 'data-testid': 'offline-badge' }, 'offline: …');
  const install = button('Install app', () => void (installPrompt as Event & { prompt(): Promise<void> }).prompt(), { class: 'small', hidden: true });
  window.addEventListener('beforeinstallprompt', (ev) => {
    ev.preventDefault();
    installPrompt = ev;
    install.hidden = false;
  });
  void registerServiceWorker().then(
    (s) => {
      offline.textContent = s === 'dev' ? 'offline: dev server' : '✓ works offline';
      offline.className = `badge ${s === 'dev' ? '' : 'ok'}`;
      offline.dataset.state = s;
    },
    (e: unknown) => {
      offline.textContent = '✗ offline';
      offline.title = errorText(e);
    },
  );
  await app.ready();
  const engineEnv = await app.engine.env();
  renderBadges(engineEnv, [offline, install]);
  const library = new Library(app, el('library-body'));
  const libReady = engineEnv.syncHandles ? library.start() : Promise.resolve(replace(el('library-body'), h('p', { class: 'muted' }, 'This browser gives workers no OPFS sync access handles, so images cannot be stored here.')));
  try {
    await loadDemo(engineEnv);
  } catch (e) {
    placeholder(h('p', {}, 'The demo image could not be opened:'), errorBox(e));
  }
  await libReady.catch((e: unknown) => replace(el('library-body'), errorBox(e)));
  // The wasm kernels load in the background of the worker; by now they have.
  renderBadges(await app.engine.env(), [offline, install]);
  document.body.dataset.ready = 'true';
}

void main();
