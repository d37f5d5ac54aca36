/**
 * The library: images stored in this origin's private file system (OPFS),
 * with their sizes, and what can be done with them — open, create with any
 * create option, import a file, download, rename, delete — plus the storage
 * estimate and whether the browser promised to keep the storage.
 */
import type { OpfsEntry } from '../../src/protocols/opfs.ts';
import type { CreatableFormat } from '../../src/client/inspect.ts';
import type { OptionSpec } from '../../src/core/options.ts';
import { download } from './actions.ts';
import type { App } from './app.ts';
import { button, errorBox, errorText, h, replace, type Child } from './dom.ts';
import { bytes, parseOffset, percent } from './format.ts';
import { isCancel } from './jobs.ts';

/** Create options shown as their own fields (others go under "More options"). */
const PRIMARY = new Set(['size', 'backing_file', 'backing_fmt', 'cluster_size', 'compression_type', 'extended_l2', 'preallocation', 'compat', 'lazy_refcounts', 'refcount_bits']);
/** Choices of string options that have a fixed set. */
const CHOICES: Record<string, string[]> = {
  compression_type: ['zlib', 'zstd'],
  compat: ['1.1', '0.10'],
  preallocation: ['off', 'metadata', 'falloc', 'full'],
  refcount_bits: ['16', '1', '2', '4', '8', '32', '64'],
};

/** The library panel. */
export class Library {
  private entries: OpfsEntry[] = [];
  private formats: CreatableFormat[] = [];
  private readonly storageSlot = h('div', { class: 'storage' });
  private readonly listSlot = h('ul', { class: 'lib-list', 'data-testid': 'library-list' });
  private readonly message = h('div', { 'aria-live': 'polite' });
  private readonly createSlot = h('div', {});
  private backingSelect: HTMLSelectElement | undefined;

  constructor(
    private readonly app: App,
    private readonly root: HTMLElement,
  ) {
    const importInput = h('input', { type: 'file', id: 'import-input', multiple: true, onchange: ((ev: Event) => void this.importFiles((ev.target as HTMLInputElement).files)) as EventListener });
    replace(
      root,
      this.storageSlot,
      h('div', { class: 'lib-tools' }, h('label', { class: 'file-button small' }, importInput, h('span', {}, 'Import files…')), button('Refresh', () => void this.refresh(), { class: 'small' })),
      this.message,
      this.listSlot,
      h('details', { class: 'create', 'data-testid': 'create-details' }, h('summary', {}, 'New image…'), this.createSlot),
    );
    app.on('library', () => void this.refresh());
    app.on('images', () => this.renderList());
  }

  /** Loads the formats and lists OPFS. */
  async start(): Promise<void> {
    this.formats = await this.app.inspector.formats();
    this.renderCreate(this.formats.find((f) => f.name === 'qcow2')?.name ?? this.formats[0]?.name ?? 'raw');
    await this.refresh();
  }

  /** Re-reads the OPFS listing and the storage estimate. */
  async refresh(): Promise<void> {
    try {
      this.entries = (await this.app.engine.list('', true)).filter((e) => e.kind === 'file' && !e.path.split('/').some((s) => s.startsWith('.')));
      this.renderList();
    } catch (e) {
      replace(this.listSlot, h('li', {}, errorBox(e)));
    }
    await this.renderStorage();
  }

  private async renderStorage(): Promise<void> {
    try {
      const est = await this.app.engine.estimate();
      const persisted = est.persisted;
      replace(
        this.storageSlot,
        h('label', { for: 'quota-meter' }, `Storage: ${bytes(est.usage)} used of ${bytes(est.quota)} (${percent(est.usage, est.quota)})`),
        h('meter', { id: 'quota-meter', min: 0, max: Math.max(1, est.quota), value: est.usage }),
        h(
          'p',
          { 'data-testid': 'persistence' },
          persisted ? 'Persistent: the browser will not evict these images under storage pressure.' : 'Not persistent: the browser may evict these images when storage runs low. ',
          persisted ? null : button('Ask to keep them', () => void this.app.engine.requestPersistence().then(() => this.renderStorage()), { class: 'small' }),
        ),
      );
    } catch (e) {
      replace(this.storageSlot, h('p', { class: 'muted' }, `Storage estimate unavailable: ${errorText(e)}`));
    }
  }

  private say(...c: Child[]): void {
    replace(this.message, ...c);
  }

  /** Offers the library's images as backing files, keeping the choice. */
  private fillBacking(): void {
    const sel = this.backingSelect;
    if (!sel) return;
    const keep = sel.value;
    replace(sel, h('option', { value: '' }, '(none)'), ...this.entries.map((e) => h('option', { value: e.path, selected: e.path === keep }, e.path)));
  }

  private renderList(): void {
    this.fillBacking();
    if (this.entries.length === 0) {
      replace(this.listSlot, h('li', { class: 'muted' }, 'No images yet. Create one, or import a file.'));
      return;
    }
    replace(this.listSlot, ...this.entries.map((e) => this.item(e)));
  }

  private item(e: OpfsEntry): HTMLElement {
    const open = this.app.openAt(e.path);
    const li = h('li', { 'data-path': e.path });
    const row = (): Child[] => [
      button(e.path, () => void this.openPath(e.path), { class: 'lib-name link', 'aria-label': `Open ${e.path}`, 'aria-current': open && this.app.current === open ? 'true' : undefined }),
      h('span', { class: 'lib-size' }, e.size !== undefined ? bytes(e.size) : '?', open ? ' · open' : ''),
      h(
        'span',
        { class: 'lib-actions' },
        button('Download', () => void this.downloadFile(e.path), { class: 'small ghost', 'aria-label': `Download ${e.path}`, title: 'Download the image file as stored' }),
        button('Rename', () => renameForm(), { class: 'small ghost', 'aria-label': `Rename ${e.path}` }),
        button('Delete', () => deleteConfirm(), { class: 'small ghost', 'aria-label': `Delete ${e.path}` }),
      ),
    ];
    const renameForm = (): void => {
      const input = h('input', { type: 'text', value: e.path, 'aria-label': `New name for ${e.path}` });
      replace(
        li,
        h(
          'form',
          {
            class: 'inline',
            onsubmit: ((ev: Event) => {
              ev.preventDefault();
              void this.rename(e.path, input.value.trim());
            }) as EventListener,
          },
          input,
          h('button', { type: 'submit', class: 'small' }, 'Rename'),
          button('Cancel', () => replace(li, ...row()), { class: 'small' }),
        ),
      );
      input.focus();
      input.select();
    };
    const deleteConfirm = (): void => {
      const yes = button('Delete', () => void this.remove(e.path), { class: 'small danger' });
      replace(li, h('span', {}, `Delete ${e.path}? `), yes, button('Keep', () => replace(li, ...row()), { class: 'small' }));
      yes.focus();
    };
    replace(li, ...row());
    return li;
  }

  /** Opens a library image (read-only; reopen for writing from the Actions tab). */
  async openPath(path: string): Promise<void> {
    const already = this.app.openAt(path);
    if (already) {
      this.app.select(already);
      return;
    }
    const holder = this.app.images.find((i) => i.layers.some((l) => l.layer > 0 && l.protocol === 'opfs' && l.filename === path));
    if (holder) {
      this.say(h('p', { class: 'note' }, `${path} is a backing file of ${holder.label}, which holds it open: see it there (Tables and Hex show each layer), or close ${holder.label} to open ${path} alone.`));
      return;
    }
    this.say(h('p', { class: 'muted' }, `Opening ${path}…`));
    try {
      await this.app.open({ opfs: path }, { readOnly: true, waitBusyMs: 2000 }, { label: path, origin: 'opfs', opfsPath: path });
      this.say();
    } catch (e) {
      this.say(errorBox(e));
    }
  }

  private async downloadFile(path: string): Promise<void> {
    try {
      const f = await this.app.engine.exportFile(path);
      download(f, f.name);
    } catch (e) {
      this.say(errorBox(e));
    }
  }

  private async rename(from: string, to: string): Promise<void> {
    if (!to || to === from) {
      this.renderList();
      return;
    }
    try {
      if (this.app.openAt(from)) throw new Error(`${from} is open; close it first`);
      await this.app.engine.rename(from, to);
      this.say(h('p', { class: 'ok' }, `Renamed ${from} to ${to}.`));
    } catch (e) {
      this.say(errorBox(e));
    }
    await this.refresh();
  }

  private async remove(path: string): Promise<void> {
    try {
      const open = this.app.openAt(path);
      if (open) await this.app.close(open);
      await this.app.engine.remove(path);
      this.say(h('p', { class: 'ok' }, `Deleted ${path}.`));
    } catch (e) {
      this.say(errorBox(e));
    }
    await this.refresh();
  }

  /** Copies files byte for byte into the library (each a cancellable job). */
  async importFiles(files: FileList | File[] | null): Promise<void> {
    for (const f of Array.from(files ?? [])) {
      const path = this.freeName(f.name);
      try {
        await this.app.jobs.run(`Import ${f.name}`, (job) => this.app.engine.importImage({ blob: f }, path, { progress: job.progress, signal: job.signal }));
        this.say(h('p', { class: 'ok' }, `Imported ${f.name} as ${path}.`));
      } catch (e) {
        this.say(isCancel(e) ? h('p', { class: 'muted' }, `Import of ${f.name} cancelled.`) : errorBox(e));
      }
      await this.refresh();
    }
  }

  /** `name`, or `name (2)`… when taken. */
  private freeName(name: string): string {
    const taken = new Set(this.entries.map((e) => e.path));
    if (!taken.has(name)) return name;
    const dot = name.lastIndexOf('.');
    const stem = dot > 0 ? name.slice(0, dot) : name;
    const ext = dot > 0 ? name.slice(dot) : '';
    for (let i = 2; ; i++) if (!taken.has(`${stem}-${i}${ext}`)) return `${stem}-${i}${ext}`;
  }

  /** The create form for `format`, its fields made from the format's create options. */
  private renderCreate(format: string): void {
    this.backingSelect = undefined;
    const fmt = this.formats.find((f) => f.name === format);
    const specs = fmt?.options ?? [];
    const fields = new Map<string, HTMLInputElement | HTMLSelectElement>();
    const field = (s: OptionSpec): Child => {
      const id = `create-${s.name.replace(/\W/g, '-')}`;
      let input: HTMLInputElement | HTMLSelectElement;
      if (s.name === 'backing_file') {
        input = this.backingSelect = h('select', { id });
        this.fillBacking();
      } else if (s.type === 'bool') {
        input = h('select', { id }, h('option', { value: '' }, `default (${s.defaultValue ?? 'off'})`), h('option', { value: 'on' }, 'on'), h('option', { value: 'off' }, 'off'));
      } else if (CHOICES[s.name]) {
        input = h('select', { id }, h('option', { value: '' }, `default${s.defaultValue ? ` (${s.defaultValue})` : ''}`), ...CHOICES[s.name]!.map((c) => h('option', { value: c }, c)));
      } else if (s.name === 'backing_fmt') {
        input = h('select', { id }, h('option', { value: '' }, 'probe'), ...this.formats.map((f) => h('option', { value: f.name }, f.name)));
      } else {
        input = h('input', { id, type: 'text', placeholder: s.defaultValue ?? '', size: 10 });
      }
      if (s.name === 'size') (input as HTMLInputElement).value = '1G';
      fields.set(s.name, input);
      return h('div', { class: 'field' }, h('label', { for: id }, s.name.replace(/_/g, ' ')), input, s.help ? h('small', {}, s.help) : null);
    };
    const nameInput = h('input', { id: 'create-name', type: 'text', value: `new.${format === 'raw' ? 'img' : format}`, required: true });
    const formatSelect = h('select', { id: 'create-format', onchange: ((ev: Event) => this.renderCreate((ev.target as HTMLSelectElement).value)) as EventListener }, ...this.formats.map((f) => h('option', { value: f.name, selected: f.name === format }, f.name)));
    const primary = specs.filter((s) => PRIMARY.has(s.name));
    const more = specs.filter((s) => !PRIMARY.has(s.name));
    const out = h('div', { 'aria-live': 'polite' });
    const submit = async (ev: Event): Promise<void> => {
      ev.preventDefault();
      const path = nameInput.value.trim();
      const opts: Record<string, string | number | boolean> = {};
      let size: number | undefined;
      let backingFile: string | undefined;
      let backingFmt: string | undefined;
      try {
        for (const [k, el] of fields) {
          const v = el.value.trim();
          if (v === '') continue;
          if (k === 'size') {
            size = parseOffset(v);
            if (size === undefined) throw new Error(`'${v}' is not a size (try 1G, 512M, 1T)`);
          } else if (k === 'backing_file') backingFile = v;
          else if (k === 'backing_fmt') backingFmt = v;
          else opts[k] = v;
        }
        if (!path) throw new Error('Give the image a name');
        if (this.entries.some((e) => e.path === path)) throw new Error(`${path} exists already`);
        const create: Parameters<App['engine']['create']>[1] = { format, options: opts };
        if (size !== undefined) create.size = size;
        if (backingFile !== undefined) {
          // The name recorded in the image is resolved next to it, so make it relative to the new image's directory.
          const dir = path.includes('/') ? path.slice(0, path.lastIndexOf('/') + 1) : '';
          if (!backingFile.startsWith(dir)) throw new Error(`Put the new image next to its backing file (in ${backingFile.slice(0, backingFile.lastIndexOf('/') + 1) || 'the top level'})`);
          create.backingFile = backingFile.slice(dir.length);
          create.backingFmt = backingFmt ?? 'qcow2';
        }
        const res = await this.app.jobs.run(`Create ${path}`, (job) => this.app.engine.create(path, create, { progress: job.progress, signal: job.signal }), { unit: 'percent' });
        replace(out, h('p', { class: 'ok', 'data-testid': 'create-done' }, `Created ${path}${res.persisted === false ? ' (storage is not persistent)' : ''}.`));
        await this.refresh();
        await this.openPath(path);
      } catch (e) {
        replace(out, errorBox(e));
      }
    };
    replace(
      this.createSlot,
      h(
        'form',
        { class: 'create-form', onsubmit: ((ev: Event) => void submit(ev)) as EventListener, 'data-testid': 'create-form' },
        h('div', { class: 'field' }, h('label', { for: 'create-name' }, 'name'), nameInput),
        h('div', { class: 'field' }, h('label', { for: 'create-format' }, 'format'), formatSelect),
        ...primary.map(field),
        more.length ? h('details', {}, h('summary', {}, 'More options'), ...more.map(field)) : null,
        h('button', { type: 'submit' }, 'Create'),
        out,
      ),
    );
  }
}
