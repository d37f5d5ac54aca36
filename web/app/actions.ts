/**
 * The Actions tab: check (and repair leaks of library images), convert and
 * download, compare, commit (keeping or emptying the overlay), rebase (safe
 * or unsafe, onto a library image or none), and the snapshot, bitmap and
 * write cards of ./changes.ts. Every long operation runs as a job with
 * progress and Cancel; what needs a writable library image is shown
 * disabled with the reason, and what the engine cannot do fails with the
 * engine's error in QEMU's words, never faked.
 */
import type { Availability } from '../../src/client/inspect.ts';
import type { CheckOutcome } from '../../src/core/img/check.ts';
import { copyIntoLibrary, type App, type OpenImage } from './app.ts';
import { button, errorBox, h, replace, type Child } from './dom.ts';
import { bytes, percent } from './format.ts';
import { bitmapsCard, snapshotsCard, writeCard } from './changes.ts';
import { isCancel } from './jobs.ts';

/** OPFS directory for converted files on their way to the user's downloads (hidden from the library). */
const DOWNLOAD_DIR = '.downloads';

/** Hands a File to the browser's downloads. */
export function download(file: Blob, name: string): void {
  const url = URL.createObjectURL(file);
  const a = h('a', { href: url, download: name, hidden: true });
  document.body.append(a);
  a.click();
  a.remove();
  // The download has started from the URL by now; keep it a while for slow browsers.
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
}

/** A base name for files made from an image ("demo/disk.qcow2" → "disk"). */
function baseName(label: string): string {
  const last = label.split(/[/\\]/).pop() ?? label;
  return last.replace(/\.(qcow2?|raw|img|bin|vmdk|vhdx?|vdi)$/i, '') || 'image';
}

/**
 * Converts an image with the engine's qemu-img convert into a hidden OPFS
 * file (sparse: zero runs are not written) and downloads it; the File is
 * backed by that OPFS file, so memory stays small whatever the size.
 */
export async function convertAndDownload(app: App, img: OpenImage, format: string, compressed: boolean): Promise<File> {
  const name = `${baseName(img.label)}.${format === 'raw' ? 'raw' : format}`;
  const path = `${DOWNLOAD_DIR}/${name}`;
  return app.jobs.run(`Convert ${img.label} to ${format}`, async (job) => {
    // A previous download of the same name is replaced (its File keeps working until then).
    await app.engine.remove(path).catch(() => undefined);
    await app.engine.convert(img.id, path, { format, compressed }, { progress: job.progress, signal: job.signal });
    const file = await app.engine.exportFile(path, { name });
    job.note(`${bytes(file.size)} ${format} file; downloading ${name}`);
    download(file, name);
    return file;
  });
}

/** A button that is disabled, with the reason shown beside it, when `a` says so. */
function actionButton(label: string, a: Availability, run: () => void, attrs: Record<string, string> = {}): Child {
  const id = `why-${label.replace(/\W+/g, '-').toLowerCase()}`;
  return h(
    'span',
    { class: 'action' },
    button(label, run, { disabled: !a.ok, 'aria-describedby': a.ok ? undefined : id, ...attrs }),
    a.ok ? null : h('span', { class: 'why', id }, a.reason ?? 'Not available'),
  );
}

/** qemu-img check's report in its words. */
function checkReport(o: CheckOutcome): HTMLElement {
  const c = o.check;
  const corruptions = c.corruptions ?? 0;
  const leaks = c.leaks ?? 0;
  const errors = c['check-errors'];
  const lines: Child[] = [];
  if (o.repaired && (o.repaired.leaksFixed || o.repaired.corruptionsFixed)) {
    lines.push(h('p', { class: 'ok' }, `The following inconsistencies were found and repaired: ${o.repaired.leaksFixed} leaked clusters, ${o.repaired.corruptionsFixed} corruptions. Double checking the fixed image now…`));
  }
  if (corruptions === 0 && leaks === 0 && errors === 0) lines.push(h('p', { class: 'ok', 'data-testid': 'check-verdict' }, 'No errors were found on the image.'));
  else {
    const parts: string[] = [];
    if (corruptions) parts.push(`${corruptions} errors were found on the image. Data may be corrupted, or further writes to the image may corrupt it.`);
    if (leaks) parts.push(`${leaks} leaked clusters were found on the image. This means waste of disk space, but no harm to data.`);
    if (errors) parts.push(`${errors} internal errors have occurred during the check.`);
    lines.push(h('p', { class: 'bad', 'data-testid': 'check-verdict' }, parts.join(' ')));
  }
  const total = c['total-clusters'] ?? 0;
  const alloc = c['allocated-clusters'] ?? 0;
  if (total > 0) {
    lines.push(h('p', {}, `${alloc}/${total} = ${percent(alloc, total)} allocated, ${percent(c['fragmented-clusters'] ?? 0, Math.max(1, alloc))} fragmented, ${percent(c['compressed-clusters'] ?? 0, Math.max(1, alloc))} compressed clusters`));
  }
  if (c['image-end-offset'] !== undefined) lines.push(h('p', {}, `Image end offset: ${c['image-end-offset']}`));
  return h('div', { class: 'check-report', 'data-testid': 'check-report', 'data-result': JSON.stringify(c) }, ...lines);
}

/** Renders the Actions tab. */
export function renderActions(app: App, img: OpenImage, root: HTMLElement, showOnMap: (bitmap: string) => void): void {
  const caps = img.caps;
  const checkOut = h('div', { 'aria-live': 'polite' });
  const convertOut = h('div', { 'aria-live': 'polite' });
  const compareOut = h('div', { 'aria-live': 'polite' });
  const commitOut = h('div', { 'aria-live': 'polite' });
  const rebaseOut = h('div', { 'aria-live': 'polite' });
  const failed = (slot: HTMLElement, e: unknown, what: string): void => replace(slot, isCancel(e) ? h('p', { class: 'muted', 'data-testid': `${what}-cancelled` }, `${what[0]!.toUpperCase()}${what.slice(1)} cancelled.`) : errorBox(e));

  const runCheck = async (repair: boolean): Promise<void> => {
    replace(checkOut, h('p', { class: 'muted' }, repair ? 'Repairing…' : 'Checking…'));
    try {
      const r = await app.jobs.run(`${repair ? 'Repair' : 'Check'} ${img.label}`, () => app.engine.check(img.id, repair ? 'leaks' : undefined), { cancellable: false });
      // The report stays on screen: the refresh only updates what the other tabs will show.
      if (repair) await app.refresh(img, false);
      replace(checkOut, checkReport(r));
    } catch (e) {
      failed(checkOut, e, 'check');
    }
  };

  const formatSelect = h('select', { id: 'convert-format' }, ...Object.entries(caps.convert).map(([f, a]) => h('option', { value: f, disabled: !a.ok, selected: f === 'raw' }, a.ok ? f : `${f} (${a.reason ?? 'not available'})`)));
  const compressed = h('input', { type: 'checkbox', id: 'convert-compressed' });
  const compressedLabel = h('label', { class: 'inline' }, compressed, 'compress clusters (-c)');
  const syncCompressed = (): void => {
    compressedLabel.hidden = formatSelect.value !== 'qcow2';
  };
  formatSelect.addEventListener('change', syncCompressed);
  const runConvert = async (): Promise<void> => {
    const fmt = formatSelect.value;
    replace(convertOut);
    try {
      const f = await convertAndDownload(app, img, fmt, fmt === 'qcow2' && compressed.checked);
      replace(convertOut, h('p', { class: 'ok', 'data-testid': 'convert-done' }, `Converted to ${fmt}: ${bytes(f.size)}. `, button('Download again', () => download(f, f.name), { class: 'small' })));
    } catch (e) {
      failed(convertOut, e, 'convert');
    }
  };

  const others = app.images.filter((i) => i !== img);
  const otherSelect = h('select', { id: 'compare-with' }, ...others.map((o) => h('option', { value: o.id }, o.label)));
  const runCompare = async (): Promise<void> => {
    const other = others.find((o) => o.id === otherSelect.value);
    if (!other) return;
    replace(compareOut, h('p', { class: 'muted' }, 'Comparing…'));
    try {
      const r = await app.jobs.run(`Compare ${img.label} with ${other.label}`, (job) => app.inspector.compare(img.id, other.id, { progress: job.progress, signal: job.signal }));
      replace(compareOut, h('div', { 'data-testid': 'compare-result', 'data-identical': String(r.identical) }, ...r.lines.map((l) => h('p', { class: r.identical ? 'ok' : 'bad' }, l))));
    } catch (e) {
      failed(compareOut, e, 'compare');
    }
  };

  const emptyTop = h('input', { type: 'checkbox', id: 'commit-empty', 'data-testid': 'commit-empty' });
  const runCommit = async (): Promise<void> => {
    const empty = emptyTop.checked;
    replace(commitOut, h('p', { class: 'muted' }, 'Committing…'));
    try {
      await app.jobs.run(`Commit ${img.label} into its backing file`, (job) => app.inspector.commit(img.id, { empty }, { progress: job.progress, signal: job.signal }));
      await app.refresh(img, false);
      replace(commitOut, h('p', { class: 'ok', 'data-testid': 'commit-done' }, empty ? 'Image committed; the overlay was emptied.' : 'Image committed (the overlay was left as it was).'));
      app.emit('library');
    } catch (e) {
      failed(commitOut, e, 'commit');
    }
  };

  // New backing files come from the library, next to the image or below it: the name is recorded relative to the image.
  const dir = img.opfsPath?.includes('/') ? img.opfsPath.slice(0, img.opfsPath.lastIndexOf('/') + 1) : '';
  const rebaseSelect = h('select', { id: 'rebase-onto' }, h('option', { value: '' }, '(no backing file: make it standalone)'));
  const fillRebase = async (): Promise<void> => {
    if (img.opfsPath === undefined) return;
    const entries = (await app.engine.list('', true)).filter((e) => e.kind === 'file' && e.path !== img.opfsPath && e.path.startsWith(dir) && !e.path.split('/').some((p) => p.startsWith('.')));
    const current = img.info[0]?.['backing-filename'];
    rebaseSelect.append(...entries.map((e) => h('option', { value: e.path.slice(dir.length) }, `${e.path}${e.path.slice(dir.length) === current ? ' (current backing file)' : ''}`)));
  };
  void fillRebase().catch(() => undefined);
  const rebaseFmt = h('select', { id: 'rebase-format' }, h('option', { value: '' }, 'probe'), ...Object.keys(caps.convert).map((f) => h('option', { value: f }, f)));
  const unsafe = h('input', { type: 'checkbox', id: 'rebase-unsafe', 'data-testid': 'rebase-unsafe' });
  const runRebase = async (): Promise<void> => {
    const backing = rebaseSelect.value;
    const req: Parameters<App['inspector']['rebase']>[1] = { backing, unsafe: unsafe.checked };
    if (rebaseFmt.value && backing) req.backingFmt = rebaseFmt.value;
    replace(rebaseOut, h('p', { class: 'muted' }, 'Rebasing…'));
    try {
      await app.jobs.run(`Rebase ${img.label}${unsafe.checked ? ' (unsafe)' : ''}`, (job) => app.inspector.rebase(img.id, req, { progress: job.progress, signal: job.signal }));
      // The chain below the image changed: open it again to see the new one.
      app.notice = { path: img.opfsPath!, text: backing ? `Rebased onto ${backing}${unsafe.checked ? ' (unsafe: only the name was changed)' : ''}.` : 'Rebased: the image has no backing file now.', testid: 'rebase-done' };
      await app.reopen(img, false);
    } catch (e) {
      failed(rebaseOut, e, 'rebase');
    }
  };

  const writable = !img.summary.readOnly;
  const reopen: Child =
    img.opfsPath !== undefined
      ? button(writable ? 'Reopen read-only' : 'Reopen for writing', () => void app.reopen(img, writable).catch((e: unknown) => replace(checkOut, errorBox(e))), { class: 'small', 'data-testid': 'reopen' })
      : img.files
        ? button('Copy into the library', () => void copyIntoLibrary(app, img).catch((e: unknown) => replace(checkOut, errorBox(e))), { class: 'small', 'data-testid': 'copy-into-library', title: 'Your file stays as it is; the copy can be repaired, committed and changed' })
        : null;
  const notice = app.notice?.path === img.opfsPath ? app.notice : undefined;
  if (notice) app.notice = undefined;
  replace(
    root,
    notice ? h('p', { class: 'ok notice', role: 'status', 'data-testid': notice.testid }, notice.text) : null,
    h(
      'div',
      { class: 'cards' },
      h(
        'section',
        { class: 'card', 'aria-labelledby': 'chk-h' },
        h('h3', { id: 'chk-h' }, 'Check'),
        h('p', { class: 'muted' }, 'Verifies refcounts and tables as qemu-img check does. ', writable ? 'Open read-write: leaks can be repaired.' : 'Open read-only.', ' ', reopen),
        h('div', { class: 'buttons' }, actionButton('Check', caps.check, () => void runCheck(false)), actionButton('Repair leaks', caps.repair, () => void runCheck(true))),
        checkOut,
      ),
      h(
        'section',
        { class: 'card', 'aria-labelledby': 'cv-h' },
        h('h3', { id: 'cv-h' }, 'Convert and download'),
        h('p', { class: 'muted' }, 'The engine’s qemu-img convert writes the guest-visible disk (backing files flattened) in any format it can create, then your browser downloads it.'),
        h('div', { class: 'buttons' }, h('label', { for: 'convert-format' }, 'Format'), formatSelect, compressedLabel, button('Convert and download', () => void runConvert(), { 'data-testid': 'convert' })),
        convertOut,
      ),
      h(
        'section',
        { class: 'card', 'aria-labelledby': 'cmp-h' },
        h('h3', { id: 'cmp-h' }, 'Compare'),
        h('p', { class: 'muted' }, 'Compares the guest contents with another open image, as qemu-img compare does.'),
        others.length
          ? h('div', { class: 'buttons' }, h('label', { for: 'compare-with' }, 'With'), otherSelect, actionButton('Compare', caps.compare, () => void runCompare()))
          : h('div', { class: 'buttons' }, actionButton('Compare', { ok: false, reason: 'Open a second image to compare this one with' }, () => undefined)),
        compareOut,
      ),
      h(
        'section',
        { class: 'card', 'aria-labelledby': 'cm-h', 'data-testid': 'commit-card' },
        h('h3', { id: 'cm-h' }, 'Commit'),
        h('p', { class: 'muted' }, 'Copies what the overlay holds into its backing file (qemu-img commit). Emptying the overlay afterwards is what plain qemu-img commit does; leaving it is -d.'),
        h('div', { class: 'buttons' }, h('label', { class: 'inline' }, emptyTop, 'empty the overlay afterwards'), actionButton('Commit', caps.commit, () => void runCommit())),
        commitOut,
      ),
      h(
        'section',
        { class: 'card', 'aria-labelledby': 'rb-h', 'data-testid': 'rebase-card' },
        h('h3', { id: 'rb-h' }, 'Rebase'),
        h(
          'p',
          { class: 'muted' },
          'Changes which backing file the overlay reads from (qemu-img rebase). Safe mode first copies into the overlay every range where the old and new backing files differ, so the guest sees the same disk; unsafe (-u) only rewrites the name. New backing files come from the library, next to the image or below it.',
        ),
        h(
          'div',
          { class: 'buttons' },
          h('label', { for: 'rebase-onto' }, 'Onto'),
          rebaseSelect,
          h('label', { for: 'rebase-format' }, 'format'),
          rebaseFmt,
          h('label', { class: 'inline' }, unsafe, 'unsafe (-u)'),
          actionButton('Rebase', caps.rebase, () => void runRebase()),
        ),
        rebaseOut,
      ),
      snapshotsCard(app, img),
      bitmapsCard(app, img, showOnMap),
      writeCard(app, img),
    ),
  );
  syncCompressed();
}
