/**
 * The Tables tab (qcow2): the active L1 table, the L2 table behind any L1
 * entry (decoded: type, host offset, compressed length, subcluster bitmaps),
 * refcounts of host clusters, and the host file's layout (what each host
 * cluster holds) — all read from the image file by the engine's inspector.
 */
import type { HostExtent, L1EntryView, L2EntryView, Qcow2HeaderView } from '../../src/client/inspect.ts';
import type { App, OpenImage } from './app.ts';
import { button, errorBox, h, replace, table, type Child } from './dom.ts';
import { HOST_KIND_MEANING } from './features.ts';
import { bytes, hex, parseOffset } from './format.ts';
import { isCancel } from './jobs.ts';

const L1_PAGE = 64;
const L2_PAGE = 128;
const REFCOUNT_PAGE = 256;

/** Where the hex view should go. */
export type HexTarget = { guest: number } | { host: number; layer: number };

/** Colours of host layout kinds (data like the allocation map's). */
const KIND_COLOURS: Record<string, string> = {
  header: '#e5e7eb',
  l1: '#f472b6',
  l2: '#fb7185',
  'refcount-table': '#facc15',
  'refcount-block': '#fde047',
  'snapshot-table': '#2dd4bf',
  'snapshot-l1': '#5eead4',
  'snapshot-l2': '#99f6e4',
  'bitmap-directory': '#c084fc',
  'bitmap-table': '#d8b4fe',
  'bitmap-data': '#e9d5ff',
  data: '#3b82f6',
  compressed: '#a855f7',
  'snapshot-data': '#14b8a6',
  'crypto-header': '#f97316',
  unused: '#2a3446',
  leaked: '#ef4444',
};

/** A pager: "◀ prev | n–m of total | next ▶". */
function pager(start: number, page: number, total: number, go: (start: number) => void, label: string): HTMLElement {
  return h(
    'div',
    { class: 'pager', role: 'group', 'aria-label': `${label} pages` },
    button('◀ Previous', () => go(Math.max(0, start - page)), { disabled: start === 0, class: 'small' }),
    h('span', {}, `${start}–${Math.min(total, start + page) - 1} of ${total}`),
    button('Next ▶', () => go(Math.min(total - 1, start + page)), { disabled: start + page >= total, class: 'small' }),
  );
}

/** The Tables tab of one image. */
class TablesView {
  private layer = 0;
  private header: Qcow2HeaderView | undefined;
  private readonly l1Slot = h('div', {});
  private readonly l2Slot = h('div', {}, h('p', { class: 'muted' }, 'Choose an L1 entry with an L2 table to see its entries.'));
  private readonly rcSlot = h('div', {});
  private readonly layoutSlot = h('div', {});
  private l2AllocatedOnly = true;

  constructor(
    private readonly app: App,
    private readonly img: OpenImage,
    private readonly root: HTMLElement,
    private readonly onHex: (t: HexTarget) => void,
  ) {}

  /** Renders the tab for the chosen layer. */
  async render(): Promise<void> {
    const qcowLayers = this.img.layers.filter((l) => l.format === 'qcow2');
    const picker =
      qcowLayers.length > 1
        ? h(
            'label',
            { class: 'inline' },
            'Layer ',
            h(
              'select',
              {
                onchange: ((ev: Event) => {
                  this.layer = Number((ev.target as HTMLSelectElement).value);
                  void this.render();
                }) as EventListener,
              },
              ...qcowLayers.map((l) => h('option', { value: l.layer, selected: l.layer === this.layer }, `${l.layer === 0 ? 'image' : `backing ${l.layer}`}: ${l.filename}`)),
            ),
          )
        : null;
    replace(
      this.root,
      picker,
      h('div', { class: 'cards' },
        h('section', { class: 'card', 'aria-labelledby': 'l1-h' }, h('h3', { id: 'l1-h' }, 'L1 table'), this.l1Slot),
        h('section', { class: 'card wide', 'aria-labelledby': 'l2-h' }, h('h3', { id: 'l2-h' }, 'L2 table'), this.l2Slot),
        h('section', { class: 'card', 'aria-labelledby': 'rc-h' }, h('h3', { id: 'rc-h' }, 'Refcounts'), this.rcSlot),
        h('section', { class: 'card wide', 'aria-labelledby': 'hl-h' }, h('h3', { id: 'hl-h' }, 'Host file layout'), this.layoutSlot),
      ),
    );
    try {
      this.header = await this.app.inspector.header(this.img.id, this.layer);
    } catch (e) {
      replace(this.l1Slot, errorBox(e));
      return;
    }
    replace(this.l2Slot, h('p', { class: 'muted' }, 'Choose an L1 entry with an L2 table to see its entries.'));
    await Promise.all([this.showL1(0), this.showRefcounts(0)]);
    replace(
      this.layoutSlot,
      h('p', {}, 'Walks every table of the image file to show what each host cluster holds — metadata, data (with its guest offset), snapshot-only clusters, leaks.'),
      button('Analyse the host file', () => void this.analyse(), { 'data-testid': 'analyse-host' }),
    );
  }

  private async showL1(start: number): Promise<void> {
    const hv = this.header!;
    try {
      const list: L1EntryView[] = await this.app.inspector.l1(this.img.id, start, L1_PAGE, this.layer);
      const rows = list.map((e) => [
        String(e.index),
        `${hex(e.guestOffset)}…`,
        e.l2Offset > 0 ? button(hex(e.l2Offset), () => void this.showL2(e.index, 0), { class: 'link', 'aria-label': `Show the L2 table of L1 entry ${e.index}` }) : e.l2Offset < 0 ? 'invalid' : h('span', { class: 'muted' }, 'none'),
        e.copied ? 'yes' : '',
        h('code', {}, e.raw),
      ]);
      replace(
        this.l1Slot,
        h('p', { class: 'muted' }, `${hv.l1Size} entries at ${hex(hv.l1TableOffset)}; each maps ${bytes(hv.l2Coverage)} of guest disk.`),
        pager(start, L1_PAGE, Math.max(1, hv.l1Size), (s) => void this.showL1(s), 'L1'),
        h('div', { class: 'scroll-x' }, table(['#', 'Guest from', 'L2 table at', 'Copied', 'Raw'], rows, { class: 'grid-table', 'data-testid': 'l1-table' })),
      );
    } catch (e) {
      replace(this.l1Slot, errorBox(e));
    }
  }

  private async showL2(l1Index: number, start: number): Promise<void> {
    const hv = this.header!;
    replace(this.l2Slot, h('p', { class: 'muted' }, 'Reading…'));
    try {
      let list: L2EntryView[];
      let total = hv.l2Entries;
      if (this.l2AllocatedOnly) {
        // One L2 table is at most a cluster: read it whole and keep the entries that map something.
        list = (await this.app.inspector.l2(this.img.id, l1Index, 0, hv.l2Entries, this.layer)).filter((e) => e.type !== 'unallocated');
        total = list.length;
        list = list.slice(start, start + L2_PAGE);
      } else {
        list = await this.app.inspector.l2(this.img.id, l1Index, start, L2_PAGE, this.layer);
      }
      const ext = hv.extendedL2;
      const rows = list.map((e) => {
        const r: Child[] = [
          String(e.index),
          button(hex(e.guestOffset), () => this.onHex({ guest: e.guestOffset }), { class: 'link', 'aria-label': `Guest bytes at ${hex(e.guestOffset)}` }),
          h('span', { class: `l2-type t-${e.type}` }, e.type),
          e.hostOffset !== undefined ? button(hex(e.hostOffset), () => this.onHex({ host: e.hostOffset!, layer: this.layer }), { class: 'link', 'aria-label': `Host bytes at ${hex(e.hostOffset)}` }) : '',
          e.compressedSize !== undefined ? bytes(e.compressedSize) : '',
          e.copied ? 'yes' : '',
        ];
        if (ext) r.push(e.allocBitmap !== undefined ? h('code', {}, e.allocBitmap.toString(2).padStart(32, '0')) : '', e.zeroBitmap !== undefined ? h('code', {}, e.zeroBitmap.toString(2).padStart(32, '0')) : '');
        r.push(h('code', {}, e.raw));
        return r;
      });
      const head = ['#', 'Guest offset', 'Type', 'Host offset', 'Compressed', 'Copied', ...(ext ? ['Allocated subclusters', 'Zero subclusters'] : []), 'Raw'];
      const toggle = h('label', { class: 'inline' }, h('input', {
        type: 'checkbox',
        checked: this.l2AllocatedOnly,
        onchange: ((ev: Event) => {
          this.l2AllocatedOnly = (ev.target as HTMLInputElement).checked;
          void this.showL2(l1Index, 0);
        }) as EventListener,
      }), ' only entries that map something');
      replace(
        this.l2Slot,
        h('p', {}, `L2 table of L1 entry ${l1Index}: guest ${hex(l1Index * hv.l2Coverage)} to ${hex((l1Index + 1) * hv.l2Coverage - 1)}. `, toggle),
        pager(start, L2_PAGE, Math.max(1, total), (s) => void this.showL2(l1Index, s), 'L2'),
        h('div', { class: 'scroll-x' }, table(head, rows, { class: 'grid-table', 'data-testid': 'l2-table' })),
        rows.length === 0 ? h('p', { class: 'muted' }, 'No entries map anything here.') : null,
      );
      this.l2Slot.closest('section')?.scrollIntoView({ block: 'nearest' });
    } catch (e) {
      replace(this.l2Slot, errorBox(e));
    }
  }

  private async showRefcounts(start: number): Promise<void> {
    const hv = this.header!;
    const clusters = Math.ceil(hv.fileLength / hv.clusterSize);
    try {
      // Up to the end of the file (refcounts past it are all 0 and only clutter the grid).
      const counts = await this.app.inspector.refcounts(this.img.id, start, Math.max(1, Math.min(REFCOUNT_PAGE, clusters - start)), this.layer);
      const input = h('input', { type: 'text', inputmode: 'numeric', value: String(start), size: 8, 'aria-label': 'First host cluster' });
      const go = h(
        'form',
        {
          class: 'inline',
          onsubmit: ((ev: Event) => {
            ev.preventDefault();
            const v = parseOffset(input.value);
            if (v !== undefined) void this.showRefcounts(Math.max(0, v));
          }) as EventListener,
        },
        'From host cluster ',
        input,
        h('button', { type: 'submit', class: 'small' }, 'Show'),
      );
      const cells = counts.map((n, i) => {
        const c = start + i;
        const past = c >= clusters;
        return h(
          'button',
          {
            type: 'button',
            class: `rc ${past ? 'rc-past' : n === 0 ? 'rc-0' : n === 1 ? 'rc-1' : 'rc-n'}`,
            title: `host cluster ${c} at ${hex(c * hv.clusterSize)}: refcount ${n}${past ? ' (past the end of the file)' : ''}`,
            onclick: (() => this.onHex({ host: c * hv.clusterSize, layer: this.layer })) as EventListener,
          },
          String(n),
        );
      });
      replace(
        this.rcSlot,
        h('p', { class: 'muted' }, `${hv.refcountBits}-bit refcounts; the file has ${clusters} clusters. 0 = free, 1 = used once, more = shared (by snapshots).`),
        go,
        pager(start, REFCOUNT_PAGE, Math.max(clusters, start + 1), (s) => void this.showRefcounts(s), 'Refcount'),
        h('div', { class: 'rc-grid', 'data-testid': 'refcounts' }, ...cells),
      );
    } catch (e) {
      replace(this.rcSlot, errorBox(e));
    }
  }

  private async analyse(): Promise<void> {
    replace(this.layoutSlot, h('p', { class: 'muted' }, 'Analysing…'));
    let extents: HostExtent[];
    try {
      extents = await this.app.hostLayout(this.img, this.layer);
    } catch (e) {
      replace(this.layoutSlot, isCancel(e) ? h('p', { class: 'muted' }, 'Cancelled.') : errorBox(e), button('Analyse the host file', () => void this.analyse()));
      return;
    }
    const fileLen = this.header!.fileLength || 1;
    const perKind = new Map<string, number>();
    for (const e of extents) perKind.set(e.kind, (perKind.get(e.kind) ?? 0) + e.length);
    const bar = h(
      'div',
      { class: 'host-bar', role: 'img', 'aria-label': `Host file layout: ${[...perKind].map(([k, v]) => `${k} ${bytes(v)}`).join(', ')}` },
      ...extents.map((e) => h('span', { style: `left:${(100 * e.start) / fileLen}%;width:${Math.max(0.15, (100 * e.length) / fileLen)}%;background:${KIND_COLOURS[e.kind] ?? '#888'}`, title: `${e.kind} ${hex(e.start)} ${bytes(e.length)}` })),
    );
    const legend = h('ul', { class: 'legend' }, ...[...perKind].map(([k, v]) => h('li', {}, h('span', { class: 'swatch', style: `background:${KIND_COLOURS[k] ?? '#888'}`, 'aria-hidden': 'true' }), `${HOST_KIND_MEANING[k] ?? k}: ${bytes(v)}`)));
    const rows = extents.slice(0, 2000).map((e) => [
      button(hex(e.start), () => this.onHex({ host: e.start, layer: this.layer }), { class: 'link', 'aria-label': `Host bytes at ${hex(e.start)}` }),
      bytes(e.length),
      HOST_KIND_MEANING[e.kind] ?? e.kind,
      e.guestOffset !== undefined ? button(hex(e.guestOffset), () => this.onHex({ guest: e.guestOffset! }), { class: 'link', 'aria-label': `Guest bytes at ${hex(e.guestOffset)}` }) : '',
    ]);
    replace(
      this.layoutSlot,
      bar,
      legend,
      h('div', { class: 'scroll-x' }, table(['Host offset', 'Length', 'Holds', 'Guest offset'], rows, { class: 'grid-table', 'data-testid': 'host-layout' })),
      extents.length > 2000 ? h('p', { class: 'muted' }, `First 2000 of ${extents.length} runs shown.`) : null,
    );
  }
}

/** Renders the Tables tab. */
export async function renderTables(app: App, img: OpenImage, root: HTMLElement, onHex: (t: HexTarget) => void): Promise<void> {
  if (!img.caps.tables.ok) {
    replace(root, h('p', { class: 'muted' }, img.caps.tables.reason ?? 'No tables for this image.'));
    return;
  }
  await new TablesView(app, img, root, onHex).render();
}
