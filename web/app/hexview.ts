/**
 * The Hex tab: bytes of the guest disk (read through a read-only
 * BlockBackend, so backing files, compression and zero clusters are resolved
 * as a guest would see them) or of any layer's image file as stored, at any
 * offset, with the mapping between the two shown beside the dump: where the
 * guest bytes live in which file, and what the host bytes are (header,
 * table, data for guest offset …).
 */
import type { RemoteBlockBackend } from '../../src/client/index.ts';
import type { HostExtent } from '../../src/client/inspect.ts';
import type { MapEntry } from '../../src/core/map.ts';
import type { App, OpenImage } from './app.ts';
import { button, errorBox, h, replace, type Child } from './dom.ts';
import { HOST_KIND_MEANING } from './features.ts';
import { bytes, hex, parseOffset } from './format.ts';
import type { HexTarget } from './tables.ts';

/** Rows per page. */
const ROWS = 32;

/** One read-only backend per open image, attached on first use. */
const backends = new WeakMap<OpenImage, Promise<RemoteBlockBackend>>();

/** Formats `data` as a hex dump starting at `base`. */
export function hexDump(data: Uint8Array, base: number, perRow: number): string {
  const lines: string[] = [];
  for (let o = 0; o < data.length; o += perRow) {
    const row = data.subarray(o, o + perRow);
    let hexPart = '';
    let ascii = '';
    for (let i = 0; i < perRow; i++) {
      if (i < row.length) {
        hexPart += row[i]!.toString(16).padStart(2, '0') + ' ';
        ascii += row[i]! >= 0x20 && row[i]! < 0x7f ? String.fromCharCode(row[i]!) : '.';
      } else {
        hexPart += '   ';
      }
      if (i === 7 && perRow > 8) hexPart += ' ';
    }
    lines.push(`${(base + o).toString(16).padStart(10, '0')}  ${hexPart} ${ascii}`);
  }
  return lines.join('\n');
}

/** The Hex tab of one image. */
export class HexView {
  private mode: 'guest' | 'host' = 'guest';
  private layer = 0;
  private offset = 0;
  private readonly dump = h('pre', { class: 'hexdump', tabindex: 0, 'data-testid': 'hex-dump', 'aria-label': 'Hex dump' });
  private readonly mapping = h('div', { class: 'mapping', 'aria-live': 'polite', 'data-testid': 'hex-mapping' });
  private readonly offsetInput = h('input', { type: 'text', id: 'hex-offset', inputmode: 'text', size: 14, 'aria-describedby': 'hex-offset-help' });
  private readonly modeSelect: HTMLSelectElement;
  private perRow = 16;
  private seq = 0;

  constructor(
    private readonly app: App,
    private readonly img: OpenImage,
    private readonly root: HTMLElement,
  ) {
    const opts: Child[] = [h('option', { value: 'guest' }, 'Guest disk')];
    img.layers.forEach((l) => opts.push(h('option', { value: `host:${l.layer}` }, `Host file: ${l.layer === 0 ? img.label : l.filename}`)));
    this.modeSelect = h('select', { id: 'hex-mode', onchange: (() => this.onMode()) as EventListener }, ...opts);
    const form = h(
      'form',
      {
        class: 'hex-controls',
        onsubmit: ((ev: Event) => {
          ev.preventDefault();
          const v = parseOffset(this.offsetInput.value);
          if (v === undefined) {
            replace(this.mapping, errorBox(`'${this.offsetInput.value}' is not an offset (try 0x100000, 1M or 4096)`));
            return;
          }
          this.offset = v;
          void this.show();
        }) as EventListener,
      },
      h('label', { for: 'hex-mode' }, 'Show '),
      this.modeSelect,
      h('label', { for: 'hex-offset' }, ' at '),
      this.offsetInput,
      h('button', { type: 'submit' }, 'Go'),
      button('◀', () => this.step(-1), { 'aria-label': 'Previous page', class: 'small' }),
      button('▶', () => this.step(1), { 'aria-label': 'Next page', class: 'small' }),
      h('span', { id: 'hex-offset-help', class: 'muted' }, ' decimal, 0x hex, or with K/M/G'),
    );
    replace(root, h('section', { class: 'card wide', 'aria-labelledby': 'hex-h' }, h('h3', { id: 'hex-h' }, 'Hex view'), form, h('div', { class: 'hex-layout' }, h('div', { class: 'scroll-x' }, this.dump), this.mapping)));
    this.dump.addEventListener('keydown', (ev) => {
      if (ev.key === 'PageDown') this.step(1);
      else if (ev.key === 'PageUp') this.step(-1);
      else return;
      ev.preventDefault();
    });
  }

  private onMode(): void {
    const v = this.modeSelect.value;
    this.mode = v === 'guest' ? 'guest' : 'host';
    this.layer = v.startsWith('host:') ? Number(v.slice(5)) : 0;
    void this.show();
  }

  private pageBytes(): number {
    return ROWS * this.perRow;
  }

  private step(dir: number): void {
    this.offset = Math.max(0, this.offset + dir * this.pageBytes());
    void this.show();
  }

  /** Jumps to a guest or host offset. */
  go(t: HexTarget): void {
    if ('guest' in t) {
      this.mode = 'guest';
      this.offset = t.guest;
      this.modeSelect.value = 'guest';
    } else {
      this.mode = 'host';
      this.layer = t.layer;
      this.offset = t.host;
      this.modeSelect.value = `host:${t.layer}`;
    }
    void this.show();
  }

  private backend(): Promise<RemoteBlockBackend> {
    let b = backends.get(this.img);
    if (!b) {
      b = this.app.engine.attach(this.img.id, { readOnly: true, name: 'inspector-hex' });
      backends.set(this.img, b);
      b.catch(() => backends.delete(this.img));
    }
    return b;
  }

  /** Reads and shows the page at the current offset, and what maps to it. */
  async show(): Promise<void> {
    const seq = ++this.seq;
    this.perRow = (this.root.clientWidth || 800) < 640 ? 8 : 16;
    const page = this.pageBytes();
    const size = this.mode === 'guest' ? this.img.summary.virtualSize : (this.img.layers[this.layer]?.fileLength ?? 0);
    this.offset = Math.max(0, Math.min(Math.floor(this.offset / this.perRow) * this.perRow, Math.max(0, size - 1)));
    this.offsetInput.value = hex(this.offset);
    const len = Math.min(page, size - this.offset);
    try {
      const data = len <= 0 ? new Uint8Array(0) : this.mode === 'guest' ? await (await this.backend()).read(this.offset, len) : await this.app.inspector.readHost(this.img.id, this.offset, len, this.layer);
      if (seq !== this.seq) return;
      this.dump.textContent = data.length ? hexDump(data, this.offset, this.perRow) : '(past the end)';
      this.dump.dataset.offset = String(this.offset);
      this.dump.dataset.mode = this.mode;
      await this.showMapping(seq, this.offset, Math.max(len, 1));
    } catch (e) {
      if (seq === this.seq) replace(this.mapping, errorBox(e));
    }
  }

  private async showMapping(seq: number, offset: number, len: number): Promise<void> {
    const out: Child[] = [];
    if (this.mode === 'guest') {
      out.push(h('h4', {}, 'Where these guest bytes live'));
      const entries: MapEntry[] = await this.app.engine.map(this.img.id, { start: offset, length: len });
      for (const e of entries) {
        const layer = this.img.layers[e.depth];
        const what = !e.present && !e.data ? 'unallocated: reads as zeroes' : e.zero ? `zeroes (${e.depth === 0 ? 'zero cluster in the image' : `from backing layer ${e.depth}`})` : e.compressed ? `compressed data in ${e.depth === 0 ? 'the image' : `backing layer ${e.depth}`}` : `data in ${e.depth === 0 ? 'the image' : `backing layer ${e.depth}`}`;
        out.push(
          h(
            'p',
            { 'data-entry-start': e.start },
            h('code', {}, `${hex(e.start)}+${bytes(e.length)}`),
            `: ${what}`,
            e.offset !== undefined ? [` at host ${hex(e.offset)} of ${layer?.filename ?? e.filename ?? 'its file'} `, button('Show host bytes', () => this.go({ host: e.offset!, layer: e.depth }), { class: 'small' })] : null,
          ),
        );
      }
    } else {
      out.push(h('h4', {}, 'What these host bytes are'));
      const l = this.img.layers[this.layer];
      if (l?.format !== 'qcow2') {
        out.push(h('p', {}, l?.format === 'raw' ? 'A raw image: host offset = guest offset.' : `A ${l?.format ?? '?'} image.`));
      } else {
        const extents: HostExtent[] = await this.app.hostLayout(this.img, this.layer);
        let i = 0;
        while (i < extents.length && extents[i]!.start + extents[i]!.length <= offset) i++;
        for (; i < extents.length && extents[i]!.start < offset + len; i++) {
          const e = extents[i]!;
          const guest = e.guestOffset !== undefined ? e.guestOffset + Math.max(0, offset - e.start) : undefined;
          out.push(
            h(
              'p',
              { 'data-kind': e.kind },
              h('code', {}, `${hex(e.start)}+${bytes(e.length)}`),
              `: ${HOST_KIND_MEANING[e.kind] ?? e.kind}`,
              guest !== undefined && this.layer === 0 ? [' for guest ', button(hex(guest), () => this.go({ guest }), { class: 'small link', 'aria-label': `Guest bytes at ${hex(guest)}` })] : null,
            ),
          );
        }
      }
    }
    if (seq === this.seq) replace(this.mapping, ...out);
  }
}
