/**
 * The Actions tab's cards that change an image in place: internal
 * snapshots (qemu-img snapshot -c/-a/-d), persistent dirty bitmaps
 * (qemu-img bitmap --add/--remove/--clear/--enable/--disable) and guest
 * writes (qemu-io write -P/-z, which is what makes a bitmap dirty). They act
 * on library images open read-write; errors are the engine's, in QEMU's
 * words. Each card redraws itself from fresh image info after a change.
 */
import type { Availability } from '../../src/client/inspect.ts';
import type { App, OpenImage } from './app.ts';
import { button, errorBox, h, replace, table, type Child } from './dom.ts';
import { BITMAP_FLAG_MEANING } from './features.ts';
import { bytes, hex, parseOffset } from './format.ts';
import { isCancel } from './jobs.ts';

/** Largest write the write card does in one go. */
const MAX_WRITE = 256 * 1024 * 1024;
/** Bytes per write request of the write card. */
const WRITE_CHUNK = 1024 * 1024;

/** What a card reports after an action: a line for success, the engine's error for failure. */
function outcome(slot: HTMLElement, testid: string, run: () => Promise<string>): Promise<void> {
  replace(slot, h('p', { class: 'muted' }, 'Working…'));
  return run().then(
    (text) => replace(slot, h('p', { class: 'ok', 'data-testid': testid }, text)),
    (e: unknown) => replace(slot, isCancel(e) ? h('p', { class: 'muted', 'data-testid': `${testid}-cancelled` }, 'Cancelled.') : h('div', { 'data-testid': `${testid}-error` }, errorBox(e))),
  );
}

/** A line saying why a card's actions are off, or nothing. */
function whyNot(a: Availability, id: string): Child {
  return a.ok ? null : h('p', { class: 'why', id }, a.reason ?? 'Not available');
}

/** The snapshots card: list with Apply and Delete per snapshot, and a form to take one. */
export function snapshotsCard(app: App, img: OpenImage): HTMLElement {
  const card = h('section', { class: 'card', 'aria-labelledby': 'snap-h', 'data-testid': 'snapshots-card' });
  const out = h('div', { 'aria-live': 'polite' });
  const draw = (): void => {
    const cap = img.caps.snapshots;
    const off = !cap.ok;
    const snaps = img.info[0]?.snapshots ?? [];
    const act = (what: string, fn: () => Promise<void>, done: string): void => {
      void outcome(out, 'snapshot-done', async () => {
        await app.jobs.run(`${what} on ${img.label}`, () => fn(), { cancellable: false });
        await app.refresh(img, false);
        draw();
        return done;
      });
    };
    const name = h('input', { id: 'snapshot-name', type: 'text', required: true, placeholder: 'tag', size: 14, disabled: off, 'aria-describedby': off ? 'why-snap' : undefined });
    const list = snaps.length
      ? table(
          ['ID', 'Tag', 'Date', ''],
          snaps.map((s) => [
            s.id,
            s.name,
            new Date(s['date-sec'] * 1000).toISOString().replace('T', ' ').slice(0, 19),
            h(
              'span',
              { class: 'row-actions' },
              button('Apply', () => act(`Apply snapshot ${s.name}`, () => app.inspector.snapshotApply(img.id, s.name), `Reverted to snapshot '${s.name}'.`), { class: 'small', disabled: off, 'aria-label': `Apply snapshot ${s.name}` }),
              button('Delete', () => act(`Delete snapshot ${s.name}`, () => app.inspector.snapshotDelete(img.id, s.name), `Deleted snapshot '${s.name}'.`), { class: 'small ghost', disabled: off, 'aria-label': `Delete snapshot ${s.name}` }),
            ),
          ]),
          { class: 'grid-table', 'data-testid': 'snapshot-list' },
        )
      : h('p', { class: 'muted', 'data-testid': 'snapshot-list' }, 'No internal snapshots.');
    replace(
      card,
      h('h3', { id: 'snap-h' }, 'Snapshots'),
      h('p', { class: 'muted' }, 'An internal snapshot keeps the whole disk as it is now inside the image file (qemu-img snapshot). Applying one reverts the disk to it.'),
      whyNot(cap, 'why-snap'),
      h('div', { class: 'scroll-x' }, list),
      h(
        'form',
        {
          class: 'buttons',
          onsubmit: ((ev: Event) => {
            ev.preventDefault();
            const tag = name.value.trim();
            if (!tag) return;
            act(`Create snapshot ${tag}`, () => app.inspector.snapshotCreate(img.id, tag), `Created snapshot '${tag}'.`);
          }) as EventListener,
        },
        h('label', { for: 'snapshot-name' }, 'New snapshot'),
        name,
        h('button', { type: 'submit', disabled: off }, 'Create snapshot'),
      ),
      out,
    );
  };
  draw();
  return card;
}

/** The bitmaps card: list with flags in words and per-bitmap actions, and a form to add one. */
export function bitmapsCard(app: App, img: OpenImage, showOnMap: (name: string) => void): HTMLElement {
  const card = h('section', { class: 'card', 'aria-labelledby': 'bm-h', 'data-testid': 'bitmaps-card' });
  const out = h('div', { 'aria-live': 'polite' });
  const draw = (): void => {
    const cap = img.caps.bitmaps;
    const off = !cap.ok;
    const list = img.bitmaps;
    const act = (what: string, name: string, changes: Parameters<App['inspector']['bitmap']>[2], done: string): void => {
      void outcome(out, 'bitmap-done', async () => {
        await app.jobs.run(`${what} on ${img.label}`, () => app.inspector.bitmap(img.id, name, changes), { cancellable: false });
        await app.refresh(img, false);
        draw();
        return done;
      });
    };
    const name = h('input', { id: 'bitmap-name', type: 'text', required: true, placeholder: 'name', size: 14, disabled: off, 'aria-describedby': off ? 'why-bm' : undefined });
    const gran = h(
      'select',
      { id: 'bitmap-granularity', disabled: off },
      h('option', { value: '' }, 'default'),
      ...[512, 4096, 65536, 1 << 20, 1 << 24].map((g) => h('option', { value: g }, bytes(g))),
    );
    const rows = list.map((b) => {
      const enabled = b.flags.includes('auto');
      return [
        b.name,
        bytes(b.granularity),
        h(
          'span',
          { 'data-flags': b.flags.join(',') },
          b.flags.length ? b.flags.map((f) => BITMAP_FLAG_MEANING[f] ?? f).join('; ') : 'disabled: kept as it is, not tracking writes',
          b.inFile ? '' : ' (not in the file yet: the image stores it when it is closed)',
        ),
        h(
          'span',
          { class: 'row-actions' },
          button('Show on map', () => showOnMap(b.name), { class: 'small', 'aria-label': `Show bitmap ${b.name} on the map` }),
          button('Clear', () => act(`Clear bitmap ${b.name}`, b.name, [{ op: 'clear' }], `Cleared bitmap '${b.name}'.`), { class: 'small ghost', disabled: off, 'aria-label': `Clear bitmap ${b.name}` }),
          enabled
            ? button('Disable', () => act(`Disable bitmap ${b.name}`, b.name, [{ op: 'disable' }], `Disabled bitmap '${b.name}'.`), { class: 'small ghost', disabled: off, 'aria-label': `Disable bitmap ${b.name}` })
            : button('Enable', () => act(`Enable bitmap ${b.name}`, b.name, [{ op: 'enable' }], `Enabled bitmap '${b.name}'.`), { class: 'small ghost', disabled: off, 'aria-label': `Enable bitmap ${b.name}` }),
          button('Remove', () => act(`Remove bitmap ${b.name}`, b.name, [{ op: 'remove' }], `Removed bitmap '${b.name}'.`), { class: 'small ghost', disabled: off, 'aria-label': `Remove bitmap ${b.name}` }),
        ),
      ];
    });
    replace(
      card,
      h('h3', { id: 'bm-h' }, 'Dirty bitmaps'),
      h('p', { class: 'muted' }, 'A persistent dirty bitmap records which parts of the disk were written since it was added or cleared, one bit per granule (qemu-img bitmap). An enabled bitmap tracks writes; the map can show its dirty areas.'),
      whyNot(cap, 'why-bm'),
      list.length ? h('div', { class: 'scroll-x' }, table(['Bitmap', 'Granularity', 'Flags', ''], rows, { class: 'grid-table', 'data-testid': 'bitmap-list' })) : h('p', { class: 'muted', 'data-testid': 'bitmap-list' }, 'No persistent dirty bitmaps.'),
      h(
        'form',
        {
          class: 'buttons',
          onsubmit: ((ev: Event) => {
            ev.preventDefault();
            const n = name.value.trim();
            if (!n) return;
            const g = gran.value ? Number(gran.value) : undefined;
            act(`Add bitmap ${n}`, n, [g !== undefined ? { op: 'add', granularity: g } : { op: 'add' }], `Added bitmap '${n}'.`);
          }) as EventListener,
        },
        h('label', { for: 'bitmap-name' }, 'New bitmap'),
        name,
        h('label', { for: 'bitmap-granularity' }, 'granularity'),
        gran,
        h('button', { type: 'submit', disabled: off }, 'Add bitmap'),
      ),
      out,
    );
  };
  draw();
  return card;
}

/** The write card: a pattern or zeroes over a guest range (qemu-io write -P / -z), as a cancellable job. */
export function writeCard(app: App, img: OpenImage): HTMLElement {
  const cap = img.caps.write;
  const off = !cap.ok;
  const out = h('div', { 'aria-live': 'polite' });
  const offset = h('input', { id: 'write-offset', type: 'text', value: '0', size: 10, disabled: off });
  const length = h('input', { id: 'write-length', type: 'text', value: '64k', size: 8, disabled: off });
  const pattern = h('input', { id: 'write-pattern', type: 'text', value: '0xcd', size: 5, disabled: off });
  const zero = h('input', { id: 'write-zero', type: 'checkbox', disabled: off });
  const submit = (ev: Event): void => {
    ev.preventDefault();
    void outcome(out, 'write-done', async () => {
      const at = parseOffset(offset.value.trim());
      const n = parseOffset(length.value.trim());
      const p = Number(pattern.value.trim());
      if (at === undefined) throw new Error(`'${offset.value}' is not an offset`);
      if (n === undefined || n <= 0) throw new Error(`'${length.value}' is not a length`);
      if (n > MAX_WRITE) throw new Error(`Write at most ${bytes(MAX_WRITE)} at once`);
      if (at + n > img.summary.virtualSize) throw new Error(`The write would end past the end of the disk (${bytes(img.summary.virtualSize)})`);
      if (!zero.checked && !(Number.isInteger(p) && p >= 0 && p <= 255)) throw new Error(`'${pattern.value}' is not a byte (0 to 255, or 0x00 to 0xff)`);
      const cmd = zero.checked ? `write -z ${at} ${n}` : `write -P 0x${p.toString(16)} ${at} ${n}`;
      await app.jobs.run(`${cmd} on ${img.label}`, async (job) => {
        const blk = await app.engine.attach(img.id, { name: 'inspector-write' });
        try {
          if (zero.checked) {
            await blk.pwriteZeroes(at, n);
          } else {
            const buf = new Uint8Array(Math.min(n, WRITE_CHUNK)).fill(p);
            for (let done = 0; done < n; ) {
              if (job.signal.aborted) throw Object.assign(new Error('Write cancelled'), { name: 'AbortError' });
              const k = Math.min(buf.length, n - done);
              await blk.pwrite(at + done, buf.subarray(0, k));
              done += k;
              job.progress(done, n);
            }
          }
          await blk.flush();
        } finally {
          await blk.close();
        }
      });
      await app.refresh(img, false);
      return `Wrote ${bytes(n)} at ${hex(at)} (qemu-io ${cmd}).`;
    });
  };
  return h(
    'section',
    { class: 'card', 'aria-labelledby': 'wr-h', 'data-testid': 'write-card' },
    h('h3', { id: 'wr-h' }, 'Write'),
    h('p', { class: 'muted' }, 'Writes a byte pattern or zeroes into the guest disk, as qemu-io write does: enabled dirty bitmaps mark the range.'),
    whyNot(cap, 'why-wr'),
    h(
      'form',
      { class: 'buttons', onsubmit: submit as EventListener },
      h('label', { for: 'write-offset' }, 'Offset'),
      offset,
      h('label', { for: 'write-length' }, 'Length'),
      length,
      h('label', { for: 'write-pattern' }, 'Byte'),
      pattern,
      h('label', { class: 'inline' }, zero, 'zeroes (-z)'),
      h('button', { type: 'submit', disabled: off }, 'Write'),
    ),
    out,
  );
}
