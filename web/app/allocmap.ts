/**
 * The allocation map: the guest disk drawn on a canvas, one cell per cluster
 * when zoomed in (one cell per run of clusters when the disk is too big to
 * show whole), coloured by what holds the bytes: data, compressed data or
 * zeroes in the image itself, data in backing layer k, or nothing
 * (unallocated). It is built progressively from block status (the engine's
 * qemu-img map) in chunks that grow while they stay fast, so a 1 TiB image
 * draws at once and fills in without any guest data being read.
 *
 * Below the canvas: the legend with bytes per kind, the details of the cell
 * under the pointer or keyboard cursor (guest range, layer, host offset), and
 * the map as qemu-img map lists it.
 *
 * A persistent dirty bitmap of the image can be laid over the map: cells
 * holding dirty bits get a yellow corner, so what a backup would copy next
 * shows against what the image holds.
 */
import type { StoredBitmapView } from '../../src/client/inspect.ts';
import type { MapEntry } from '../../src/core/map.ts';
import type { App, OpenImage } from './app.ts';
import { button, errorBox, h, replace, table, type Child } from './dom.ts';
import { bytes, bytesExact, hex, percent } from './format.ts';

/** Cell kinds; backing layer k is LAYER0 + k - 1. */
const CAT = { PENDING: 0, UNALLOCATED: 1, DATA: 2, COMPRESSED: 3, ZERO: 4, LAYER0: 5 } as const;
/** Backing layers with their own colour (deeper ones share the last). */
const MAX_LAYER_COLOURS = 4;
const NCAT = CAT.LAYER0 + MAX_LAYER_COLOURS;
const COLOURS = ['#1b2230', '#2a3446', '#3b82f6', '#a855f7', '#34d399', '#f59e0b', '#ef4444', '#ec4899', '#eab308'];
const CAT_NAMES = ['not mapped yet', 'unallocated', 'data', 'compressed', 'zero', 'backing layer 1', 'backing layer 2', 'backing layer 3', 'backing layer 4+'];

/** Colour of the dirty-bitmap corner. */
const DIRTY_COLOUR = '#fde047';

/** Rows of cells shown at once. */
const MAX_ROWS = 40;
/** First chunk mapped per engine call; grows ×4 while calls take under 60 ms. */
const FIRST_CHUNK = 256 * 1024 * 1024;
const MAX_CHUNK = 2 ** 40;
/** Map entries listed before the table pages. */
const TABLE_PAGE = 500;

/** The kind of a map entry (see CAT). */
function category(e: MapEntry): number {
  if (!e.present && !e.data) return CAT.UNALLOCATED;
  if (e.depth > 0) return e.data ? CAT.LAYER0 + Math.min(e.depth, MAX_LAYER_COLOURS) - 1 : CAT.ZERO;
  if (e.compressed) return CAT.COMPRESSED;
  if (e.data) return CAT.DATA;
  return CAT.ZERO;
}

/**
 * qemu-img's entry_mergeable, for joining entries across the chunks the map is
 * fetched in, so the list is what `qemu-img map --output=json` prints (the
 * engine's copy in src/core/map.ts is not imported: the page reaches the
 * engine only through the client API).
 */
function mergeable(a: MapEntry, b: MapEntry): boolean {
  if (a.depth !== b.depth || a.present !== b.present || a.zero !== b.zero || a.data !== b.data || a.compressed !== b.compressed) return false;
  if ((a.offset === undefined) !== (b.offset === undefined)) return false;
  if (a.offset !== undefined && a.offset + a.length !== b.offset) return false;
  return a.filename === b.filename;
}

/** The map entries found so far, sorted by start. */
class MapStore {
  readonly entries: MapEntry[] = [];
  /** Guest bytes mapped so far (from 0). */
  mapped = 0;
  readonly perCat = new Float64Array(NCAT);

  /** Adds the entries of the next chunk, merging across the chunk boundary as qemu-img would. */
  add(list: MapEntry[]): void {
    for (const e of list) {
      this.perCat[category(e)]! += e.length;
      const last = this.entries[this.entries.length - 1];
      if (last && last.start + last.length === e.start && mergeable(last, e)) last.length += e.length;
      else this.entries.push({ ...e });
      this.mapped = e.start + e.length;
    }
  }

  /** Index of the last entry starting at or before `pos` (0 when none). */
  find(pos: number): number {
    let lo = 0;
    let hi = this.entries.length - 1;
    while (lo < hi) {
      const mid = (lo + hi + 1) >> 1;
      if (this.entries[mid]!.start <= pos) lo = mid;
      else hi = mid - 1;
    }
    return lo;
  }

  /** The entry covering `pos`, if mapped. */
  at(pos: number): MapEntry | undefined {
    const e = this.entries[this.find(pos)];
    return e && e.start <= pos && pos < e.start + e.length ? e : undefined;
  }
}

/** The allocation map view of one image. */
export class AllocationMap {
  readonly el: HTMLElement;
  private readonly store = new MapStore();
  private readonly canvas: HTMLCanvasElement;
  private readonly status: HTMLElement;
  private readonly legend: HTMLElement;
  private readonly details: HTMLElement;
  private readonly zoomText: HTMLElement;
  private readonly tableSlot: HTMLElement;
  private readonly total: number;
  private readonly cluster: number;
  private cellPx = 10;
  private cols = 1;
  /** Bytes per cell and the first byte shown. */
  private bpc: number;
  private viewStart = 0;
  private cursor = 0;
  private stopped = false;
  private frame = 0;
  private tableShown = 0;
  private readonly resize: ResizeObserver;
  /** The bitmap laid over the map, and its dirty runs. */
  private overlay: StoredBitmapView | undefined;
  private readonly overlayStatus: HTMLElement;
  private overlayToken = 0;

  /** Builds the view; call start() to map. `onHex` opens the hex view at a guest or host offset. */
  constructor(
    private readonly app: App,
    private readonly img: OpenImage,
    private readonly onHex: (where: { guest: number } | { host: number; layer: number }) => void,
    private readonly initialBitmap = '',
  ) {
    this.total = img.summary.virtualSize;
    this.cluster = img.info[0]?.['cluster-size'] ?? 65536;
    this.bpc = this.cluster;
    this.canvas = h('canvas', {
      class: 'alloc-canvas',
      tabindex: 0,
      role: 'img',
      'aria-roledescription': 'allocation map',
      'aria-describedby': 'map-help',
      'data-testid': 'alloc-canvas',
    });
    this.status = h('p', { class: 'map-status', 'aria-live': 'polite', 'data-testid': 'map-status' }, 'Mapping…');
    this.legend = h('ul', { class: 'legend', 'data-testid': 'map-legend' });
    this.details = h('div', { class: 'cell-details', 'aria-live': 'polite', 'data-testid': 'cell-details' }, 'Point at a cell, or focus the map and use the arrow keys.');
    this.zoomText = h('span', { class: 'zoom-text' });
    this.tableSlot = h('div', { class: 'scroll-x' });
    this.overlayStatus = h('p', { class: 'overlay-status', 'aria-live': 'polite', 'data-testid': 'bitmap-overlay-status' });
    const bitmaps = img.bitmaps.map((b) => b.name);
    const overlaySelect = h(
      'select',
      { id: 'bitmap-overlay', 'data-testid': 'bitmap-overlay', onchange: ((ev: Event) => void this.showBitmap((ev.target as HTMLSelectElement).value)) as EventListener },
      h('option', { value: '' }, bitmaps.length ? '(none)' : '(the image has no bitmaps)'),
      ...bitmaps.map((b) => h('option', { value: b, selected: b === initialBitmap }, b)),
    );
    if (!bitmaps.length) overlaySelect.disabled = true;
    const overlayBar = h('div', { class: 'map-controls' }, h('label', { for: 'bitmap-overlay' }, 'Dirty bitmap overlay'), overlaySelect);
    const controls = h(
      'div',
      { class: 'map-controls', role: 'toolbar', 'aria-label': 'Map zoom' },
      button('Zoom in', () => this.zoom(this.cursorCell(), 1 / 8), { 'aria-keyshortcuts': '+' }),
      button('Zoom out', () => this.zoom(this.cursorCell(), 8), { 'aria-keyshortcuts': '-' }),
      button('Whole disk', () => this.overview()),
      button('◀ Earlier', () => this.pan(-1), { 'aria-label': 'Earlier part of the disk' }),
      button('Later ▶', () => this.pan(1), { 'aria-label': 'Later part of the disk' }),
      this.zoomText,
    );
    this.el = h(
      'div',
      { class: 'allocmap' },
      controls,
      overlayBar,
      this.overlayStatus,
      h('div', { class: 'canvas-wrap' }, this.canvas),
      h('p', { id: 'map-help', class: 'visually-hidden' }, 'Arrow keys move between cells, Enter or plus zooms in, minus zooms out, H opens the hex view of the cell.'),
      this.status,
      this.legend,
      this.details,
      h('details', { class: 'map-table' }, h('summary', {}, 'Map entries (as qemu-img map lists them)'), this.tableSlot),
    );
    this.canvas.addEventListener('pointermove', (ev) => this.hover(ev));
    this.canvas.addEventListener('click', (ev) => {
      const c = this.cellAt(ev);
      if (c < 0) return;
      this.cursor = c;
      if (this.bpc > this.cluster) this.zoom(c, 1 / 8);
      else this.describe(c);
    });
    this.canvas.addEventListener('keydown', (ev) => this.key(ev));
    this.canvas.addEventListener('focus', () => this.describe(this.cursor));
    this.resize = new ResizeObserver(() => this.layout());
  }

  /** Starts mapping and drawing; stops when the view leaves the page. */
  start(): void {
    this.resize.observe(this.el);
    this.layout();
    this.overview();
    void this.scan();
    if (this.initialBitmap) void this.showBitmap(this.initialBitmap);
  }

  /** Lays bitmap `name` over the map ('' removes the overlay); its dirty runs come from the image file. */
  private async showBitmap(name: string): Promise<void> {
    const token = ++this.overlayToken;
    this.overlay = undefined;
    delete this.canvas.dataset.dirtyCells;
    if (!name) {
      replace(this.overlayStatus);
      delete this.overlayStatus.dataset.state;
      this.redraw();
      return;
    }
    this.overlayStatus.dataset.state = 'loading';
    replace(this.overlayStatus, `Reading bitmap '${name}'…`);
    try {
      const bm = await this.app.inspector.bitmapDirty(this.img.id, name);
      if (token !== this.overlayToken || this.stopped) return;
      this.overlay = bm;
      const flags = bm.flags.includes('in-use') ? ' It is marked in use: what is stored may be out of date.' : '';
      replace(
        this.overlayStatus,
        h('span', { class: 'swatch', style: `background:${DIRTY_COLOUR}`, 'aria-hidden': 'true' }),
        ` Bitmap '${bm.name}' (${bytes(bm.granularity)} per bit, ${bm.flags.includes('auto') ? 'enabled' : 'disabled'}): ${bytes(bm.dirtyBytes)} dirty (${percent(bm.dirtyBytes, this.total)}) in ${bm.runs.length}${bm.truncated ? '+' : ''} runs, marked with a yellow corner.${flags}`,
      );
      this.overlayStatus.dataset.state = 'done';
      this.overlayStatus.dataset.dirtyBytes = String(bm.dirtyBytes);
      this.redraw();
    } catch (e) {
      if (token !== this.overlayToken) return;
      replace(this.overlayStatus, errorBox(e));
      this.overlayStatus.dataset.state = 'failed';
    }
  }

  /** Dirty bytes of the overlay bitmap in each cell of the view (empty without an overlay). */
  private dirtyPerCell(): Float64Array {
    const n = this.cellCount();
    const out = new Float64Array(this.overlay ? n : 0);
    const runs = this.overlay?.runs;
    if (!runs) return out;
    const viewEnd = Math.min(this.total, this.viewStart + n * this.bpc);
    let lo = 0;
    let hi = runs.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (runs[mid]![0] + runs[mid]![1] <= this.viewStart) lo = mid + 1;
      else hi = mid;
    }
    for (let i = lo; i < runs.length; i++) {
      const [start, len] = runs[i]!;
      if (start >= viewEnd) break;
      const a = Math.max(start, this.viewStart);
      const b = Math.min(start + len, viewEnd);
      for (let c = Math.floor((a - this.viewStart) / this.bpc); c < n; c++) {
        const cs = this.viewStart + c * this.bpc;
        if (cs >= b) break;
        out[c]! += Math.min(b, cs + this.bpc) - Math.max(a, cs);
      }
    }
    return out;
  }

  /** Stops mapping (the image was closed or another is shown). */
  stop(): void {
    this.stopped = true;
    this.resize.disconnect();
    if (this.frame) cancelAnimationFrame(this.frame);
  }

  /** Maps the disk chunk by chunk, redrawing after each. */
  private async scan(): Promise<void> {
    let chunk = FIRST_CHUNK;
    const t0 = performance.now();
    try {
      while (this.store.mapped < this.total && !this.stopped) {
        const start = this.store.mapped;
        const len = Math.min(chunk, this.total - start);
        const t = performance.now();
        const entries = await this.app.engine.map(this.img.id, { start, length: len });
        if (this.stopped) return;
        if (entries.length === 0) throw new Error(`The engine returned no map entries at ${start}`);
        this.store.add(entries);
        if (performance.now() - t < 60) chunk = Math.min(MAX_CHUNK, chunk * 4);
        this.status.textContent = `Mapping… ${percent(this.store.mapped, this.total)} of ${bytes(this.total)}`;
        this.redraw();
      }
      if (this.stopped) return;
      this.status.textContent = `Mapped ${bytes(this.total)} in ${((performance.now() - t0) / 1000).toFixed(2)} s from block status: ${this.store.entries.length} entries.`;
      this.status.dataset.state = 'done';
      this.renderTable();
      this.redraw();
    } catch (e) {
      replace(this.status, errorBox(e));
      this.status.dataset.state = 'failed';
    }
  }

  /** Canvas geometry from the container width. */
  private layout(): void {
    const width = Math.max(200, this.el.clientWidth || 600);
    this.cellPx = width < 500 ? 8 : 10;
    const cols = Math.max(8, Math.floor(width / this.cellPx));
    if (cols !== this.cols) {
      this.cols = cols;
      this.overview();
    }
    this.redraw();
  }

  /** Bytes one row shows. */
  private rowBytes(): number {
    return this.bpc * this.cols;
  }

  /** Cells in the current view. */
  private cellCount(): number {
    return Math.min(this.cols * MAX_ROWS, Math.ceil((this.total - this.viewStart) / this.bpc));
  }

  /** Shows the whole disk with the smallest cells that fit. */
  private overview(): void {
    let bpc = this.cluster;
    while (Math.ceil(this.total / bpc) > this.cols * MAX_ROWS) bpc *= 2;
    this.bpc = bpc;
    this.viewStart = 0;
    this.cursor = Math.min(this.cursor, this.cellCount() - 1);
    this.redraw();
  }

  /** Changes the cell size by `factor` around cell `c` (never below one cluster or above the overview). */
  private zoom(c: number, factor: number): void {
    const at = this.viewStart + Math.max(0, c) * this.bpc;
    let bpc = Math.max(this.cluster, Math.round(this.bpc * factor));
    let full = this.cluster;
    while (Math.ceil(this.total / full) > this.cols * MAX_ROWS) full *= 2;
    bpc = Math.min(bpc, full);
    // Keep sizes a power-of-two multiple of the cluster so cells line up with clusters.
    bpc = this.cluster * 2 ** Math.round(Math.log2(bpc / this.cluster));
    this.bpc = bpc;
    const span = this.rowBytes() * MAX_ROWS;
    const start = Math.max(0, Math.min(at - span / 2, this.total - span));
    this.viewStart = Math.max(0, Math.floor(start / this.rowBytes()) * this.rowBytes());
    this.cursor = Math.floor((at - this.viewStart) / this.bpc);
    this.redraw();
    this.describe(this.cursor);
  }

  /** Moves the view by most of a screen. */
  private pan(dir: number): void {
    const step = this.rowBytes() * Math.max(1, MAX_ROWS - 4);
    const maxStart = Math.max(0, Math.ceil((this.total - this.rowBytes() * MAX_ROWS) / this.rowBytes()) * this.rowBytes());
    this.viewStart = Math.max(0, Math.min(maxStart, this.viewStart + dir * step));
    this.redraw();
    this.describe(this.cursor);
  }

  private cursorCell(): number {
    return Math.max(0, Math.min(this.cursor, this.cellCount() - 1));
  }

  private cellAt(ev: PointerEvent | MouseEvent): number {
    const r = this.canvas.getBoundingClientRect();
    const col = Math.floor((ev.clientX - r.left) / this.cellPx);
    const row = Math.floor((ev.clientY - r.top) / this.cellPx);
    if (col < 0 || col >= this.cols || row < 0) return -1;
    const c = row * this.cols + col;
    return c < this.cellCount() ? c : -1;
  }

  private hover(ev: PointerEvent): void {
    const c = this.cellAt(ev);
    if (c >= 0) this.describe(c);
  }

  private key(ev: KeyboardEvent): void {
    const n = this.cellCount();
    let c = this.cursorCell();
    switch (ev.key) {
      case 'ArrowRight': c = Math.min(n - 1, c + 1); break;
      case 'ArrowLeft': c = Math.max(0, c - 1); break;
      case 'ArrowDown': c = Math.min(n - 1, c + this.cols); break;
      case 'ArrowUp': c = Math.max(0, c - this.cols); break;
      case 'Home': c = 0; break;
      case 'End': c = n - 1; break;
      case 'PageDown': this.pan(1); ev.preventDefault(); return;
      case 'PageUp': this.pan(-1); ev.preventDefault(); return;
      case 'Enter': case '+': case '=': this.zoom(c, 1 / 8); ev.preventDefault(); return;
      case '-': case '_': this.zoom(c, 8); ev.preventDefault(); return;
      case 'h': case 'H': this.onHex({ guest: this.viewStart + c * this.bpc }); ev.preventDefault(); return;
      default: return;
    }
    ev.preventDefault();
    this.cursor = c;
    this.redraw();
    this.describe(c);
  }

  /** Bytes per kind in each cell of the view. */
  private cellStats(): Float64Array {
    const n = this.cellCount();
    const out = new Float64Array(n * NCAT);
    const viewEnd = Math.min(this.total, this.viewStart + n * this.bpc);
    const s = this.store;
    for (let i = s.entries.length ? s.find(this.viewStart) : 0; i < s.entries.length; i++) {
      const e = s.entries[i]!;
      if (e.start >= viewEnd) break;
      const a = Math.max(e.start, this.viewStart);
      const b = Math.min(e.start + e.length, viewEnd);
      if (a >= b) continue;
      const cat = category(e);
      for (let c = Math.floor((a - this.viewStart) / this.bpc); c < n; c++) {
        const cs = this.viewStart + c * this.bpc;
        const ce = cs + this.bpc;
        if (cs >= b) break;
        out[c * NCAT + cat]! += Math.min(b, ce) - Math.max(a, cs);
      }
    }
    // What is not mapped yet.
    for (let c = Math.max(0, Math.floor((s.mapped - this.viewStart) / this.bpc)); c < n; c++) {
      const cs = this.viewStart + c * this.bpc;
      out[c * NCAT + CAT.PENDING]! += Math.max(0, Math.min(cs + this.bpc, this.total) - Math.max(cs, s.mapped));
    }
    return out;
  }

  /** Schedules a redraw on the next frame. */
  private redraw(): void {
    if (!this.frame) this.frame = requestAnimationFrame(() => this.draw());
  }

  private draw(): void {
    this.frame = 0;
    const n = this.cellCount();
    const rows = Math.max(1, Math.ceil(n / this.cols));
    const dpr = window.devicePixelRatio || 1;
    const px = this.cellPx;
    this.canvas.style.width = `${this.cols * px}px`;
    this.canvas.style.height = `${rows * px}px`;
    this.canvas.width = Math.round(this.cols * px * dpr);
    this.canvas.height = Math.round(rows * px * dpr);
    const ctx = this.canvas.getContext('2d');
    if (!ctx) return;
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.fillStyle = '#0f141c';
    ctx.fillRect(0, 0, this.cols * px, rows * px);
    const stats = this.cellStats();
    const gap = px >= 8 ? 1 : 0;
    for (let c = 0; c < n; c++) {
      let best = 0;
      let second = -1;
      for (let k = 1; k < NCAT; k++) {
        const v = stats[c * NCAT + k]!;
        if (v > stats[c * NCAT + best]!) {
          second = best;
          best = k;
        } else if (v > 0 && (second < 0 || v > stats[c * NCAT + second]!)) second = k;
      }
      const x = (c % this.cols) * px;
      const y = Math.floor(c / this.cols) * px;
      ctx.fillStyle = COLOURS[best]!;
      ctx.fillRect(x, y, px - gap, px - gap);
      // A mixed cell (zoomed out) shows its second kind as a stripe along the bottom.
      if (second > 0 && stats[c * NCAT + second]! > 0) {
        ctx.fillStyle = COLOURS[second]!;
        ctx.fillRect(x, y + px - gap - 3, px - gap, 3);
      }
    }
    const dirty = this.dirtyPerCell();
    if (dirty.length) {
      // A dirty cell gets a corner triangle: visible over every kind's colour, and the kind still shows.
      ctx.fillStyle = DIRTY_COLOUR;
      const t = Math.max(4, Math.round((px - gap) * 0.6));
      let count = 0;
      for (let c = 0; c < n; c++) {
        if (dirty[c]! <= 0) continue;
        count++;
        const x = (c % this.cols) * px;
        const y = Math.floor(c / this.cols) * px;
        ctx.beginPath();
        ctx.moveTo(x, y);
        ctx.lineTo(x + t, y);
        ctx.lineTo(x, y + t);
        ctx.closePath();
        ctx.fill();
      }
      this.canvas.dataset.dirtyCells = String(count);
    }
    if (document.activeElement === this.canvas || this.cursor > 0) {
      const c = this.cursorCell();
      ctx.strokeStyle = '#ffffff';
      ctx.lineWidth = 2;
      ctx.strokeRect((c % this.cols) * px + 1, Math.floor(c / this.cols) * px + 1, px - 3, px - 3);
    }
    const end = Math.min(this.total, this.viewStart + n * this.bpc);
    this.zoomText.textContent = `1 cell = ${bytes(this.bpc)}${this.bpc === this.cluster ? ' (one cluster)' : ` (${this.bpc / this.cluster} clusters)`} · showing ${hex(this.viewStart)}–${hex(end)}`;
    this.canvas.setAttribute('aria-label', `Allocation map of ${this.img.label}, ${bytes(this.viewStart)} to ${bytes(end)}: ${this.summaryText()}`);
    this.canvas.dataset.cells = String(n);
    this.renderLegend();
  }

  private summaryText(): string {
    const p = this.store.perCat;
    return CAT_NAMES.map((name, k) => (p[k]! > 0 ? `${name} ${percent(p[k]!, this.total)}` : ''))
      .filter(Boolean)
      .join(', ');
  }

  private renderLegend(): void {
    const p = this.store.perCat;
    const items: Child[] = [];
    for (let k = 1; k < NCAT; k++) {
      const isLayer = k >= CAT.LAYER0;
      if (isLayer && k - CAT.LAYER0 + 1 >= this.img.layers.length && p[k] === 0) continue;
      // Once the whole disk is mapped, kinds it does not have are left out of the key.
      if (this.store.mapped >= this.total && p[k] === 0) continue;
      const layerName = isLayer ? this.img.layers[k - CAT.LAYER0 + 1]?.filename : undefined;
      items.push(
        h(
          'li',
          { 'data-cat': CAT_NAMES[k]!, 'data-bytes': p[k]! },
          h('span', { class: 'swatch', style: `background:${COLOURS[k]}`, 'aria-hidden': 'true' }),
          `${CAT_NAMES[k]}${layerName ? ` (${layerName})` : ''}: ${bytes(p[k]!)} (${percent(p[k]!, this.total)})`,
        ),
      );
    }
    replace(this.legend, ...items);
  }

  /** Shows what cell `c` holds. */
  private describe(c: number): void {
    if (c < 0 || c >= this.cellCount()) return;
    const start = this.viewStart + c * this.bpc;
    const end = Math.min(this.total, start + this.bpc);
    const lines: Child[] = [h('strong', {}, `Guest ${hex(start)}–${hex(end - 1)}`), ` (${bytes(end - start)})`];
    if (start >= this.store.mapped) {
      lines.push(' — not mapped yet');
      replace(this.details, ...lines);
      return;
    }
    if (this.overlay) {
      const d = this.dirtyPerCell()[c] ?? 0;
      lines.push(h('br'), h('span', { 'data-testid': 'cell-dirty' }, d > 0 ? `Dirty in bitmap '${this.overlay.name}': ${bytes(d)} of this cell` : `Clean in bitmap '${this.overlay.name}'`));
    }
    if (this.bpc > this.cluster) {
      const stats = this.cellStats();
      const parts = CAT_NAMES.map((name, k) => (stats[c * NCAT + k]! > 0 ? `${name} ${bytes(stats[c * NCAT + k]!)}` : '')).filter(Boolean);
      lines.push(h('br'), parts.join(' · '), h('br'), h('span', { class: 'muted' }, 'Click or press Enter to zoom in to single clusters.'));
      replace(this.details, ...lines);
      return;
    }
    const e = this.store.at(start);
    if (!e) return;
    const cat = category(e);
    const layer = this.img.layers[e.depth];
    lines.push(h('br'), `${CAT_NAMES[cat]}`, e.depth > 0 ? ` — read from backing layer ${e.depth} (${layer?.filename ?? '?'})` : ' — held by the image itself');
    if (e.offset !== undefined) {
      const host = e.offset + (start - e.start);
      lines.push(h('br'), `Host offset ${hex(host)} in ${e.filename ?? layer?.filename ?? 'the image file'} `, button('Show host bytes', () => this.onHex({ host, layer: e.depth }), { class: 'small' }));
    } else if (e.compressed) {
      lines.push(h('br'), 'Compressed: the host offset and length are in the L2 entry (Tables tab).');
    } else if (!e.present) {
      lines.push(h('br'), 'No layer holds it: it reads as zeroes.');
    }
    lines.push(' ', button('Show guest bytes', () => this.onHex({ guest: start }), { class: 'small' }));
    replace(this.details, ...lines);
  }

  /** The map entries, as qemu-img map --output=json has them (paged past TABLE_PAGE rows). */
  private renderTable(more = false): void {
    const list = this.store.entries;
    this.tableShown = more ? Math.min(list.length, this.tableShown + TABLE_PAGE) : Math.min(list.length, TABLE_PAGE);
    const rows = list.slice(0, this.tableShown).map((e) => {
      const tr = h(
        'tr',
        { 'data-entry': JSON.stringify({ start: e.start, length: e.length, depth: e.depth, present: e.present, zero: e.zero, data: e.data, compressed: e.compressed, ...(e.offset !== undefined ? { offset: e.offset } : {}) }) },
        ...[hex(e.start), bytes(e.length), String(e.depth), String(e.present), String(e.zero), String(e.data), String(e.compressed), e.offset !== undefined ? hex(e.offset) : ''].map((c) => h('td', {}, c)),
      );
      return tr;
    });
    const t = table(['Start', 'Length', 'Depth', 'Present', 'Zero', 'Data', 'Compressed', 'Host offset'], [], { class: 'grid-table', 'data-testid': 'map-entries', 'data-complete': String(this.tableShown === list.length) });
    t.tBodies[0]!.append(...rows);
    replace(this.tableSlot, t, this.tableShown < list.length ? button(`Show ${Math.min(TABLE_PAGE, list.length - this.tableShown)} more of ${list.length - this.tableShown}`, () => this.renderTable(true)) : null);
  }
}

/** Renders the Allocation map tab; returns the view so the caller can stop it. */
export function renderAllocationMap(app: App, img: OpenImage, root: HTMLElement, onHex: (where: { guest: number } | { host: number; layer: number }) => void, bitmap = ''): AllocationMap {
  const view = new AllocationMap(app, img, onHex, bitmap);
  replace(
    root,
    h(
      'section',
      { class: 'card wide', 'aria-labelledby': 'map-h' },
      h('h3', { id: 'map-h' }, 'Allocation map ', h('small', {}, `${bytesExact(img.summary.virtualSize)}, from block status only`)),
      view.el,
    ),
  );
  view.start();
  return view;
}
