/**
 * The Overview tab: the image's vital numbers (as qemu-img info prints
 * them), its backing chain as a picture, the qcow2 header field by field
 * with feature bits in words, the extensions, snapshots, bitmaps, and the
 * guest disk's partition table.
 */
import type { PartitionTable, Qcow2HeaderView } from '../../src/client/inspect.ts';
import type { ImageInfo } from '../../src/core/img/info.ts';
import type { App, OpenImage } from './app.ts';
import { button, dl, errorBox, h, replace, table, type Child } from './dom.ts';
import { BITMAP_FLAG_MEANING, featureMeaning, FIELD_MEANING } from './features.ts';
import { bytes, bytesExact, hex } from './format.ts';

/** A qemu-img info value as text (objects and arrays as compact JSON). */
function infoValue(v: unknown): string {
  if (typeof v === 'boolean') return v ? 'true' : 'false';
  if (typeof v === 'number' || typeof v === 'string') return String(v);
  return JSON.stringify(v);
}

/** A dl row carrying the raw value for tests and copy-paste. */
function fieldRow(key: string, label: Child, shown: Child, raw: unknown): [Child, Child] {
  return [label, h('span', { 'data-key': key, 'data-value': JSON.stringify(raw) }, shown)];
}

/** The summary card: qemu-img info's top-level fields of the image. */
function summary(img: OpenImage): HTMLElement {
  const info = img.info[0];
  const rows: Array<[Child, Child]> = [];
  rows.push(fieldRow('format', 'Format', img.summary.format, img.summary.format));
  rows.push(fieldRow('virtual-size', 'Virtual size', bytesExact(img.summary.virtualSize), img.summary.virtualSize));
  if (info?.['actual-size'] !== undefined) rows.push(fieldRow('actual-size', 'Disk size', bytes(info['actual-size']), info['actual-size']));
  if (info?.['cluster-size'] !== undefined) rows.push(fieldRow('cluster-size', 'Cluster size', bytesExact(info['cluster-size']), info['cluster-size']));
  if (info?.['backing-filename'] !== undefined) rows.push(fieldRow('backing-filename', 'Backing file', info['backing-filename'], info['backing-filename']));
  if (info?.['backing-filename-format'] !== undefined) rows.push(fieldRow('backing-filename-format', 'Backing format', info['backing-filename-format'], info['backing-filename-format']));
  if (info?.['dirty-flag'] !== undefined) rows.push(fieldRow('dirty-flag', 'Dirty', info['dirty-flag'] ? 'yes' : 'no', info['dirty-flag']));
  rows.push(['Opened', img.summary.readOnly ? 'read-only' : 'read-write']);
  rows.push(['Source', { demo: 'built-in demo (in the library)', file: 'a file on this device (never modified)', url: `HTTP range requests from ${img.url ?? ''}`, opfs: `library: ${img.opfsPath ?? ''}` }[img.origin]]);
  return h('section', { class: 'card', 'aria-labelledby': 'sum-h' }, h('h3', { id: 'sum-h' }, 'Image'), dl(rows, { class: 'kv', 'data-testid': 'image-summary' }));
}

/** The backing chain as boxes joined by arrows, top image first. */
function chainPicture(img: OpenImage): HTMLElement {
  const boxes: Child[] = [];
  img.layers.forEach((l, i) => {
    const info: ImageInfo | undefined = img.info[i];
    if (i > 0) boxes.push(h('div', { class: 'chain-arrow', 'aria-hidden': 'true' }, h('span', {}, 'backing')));
    boxes.push(
      h(
        'figure',
        { class: `chain-box layer-${Math.min(i, 4)}`, 'data-layer': i },
        h('figcaption', {}, h('span', { class: 'swatch', 'aria-hidden': 'true' }), i === 0 ? 'Image' : `Backing layer ${i}`),
        h('strong', { class: 'chain-name' }, i === 0 ? img.label : (info?.filename ?? l.filename)),
        h('span', {}, `${l.format} · ${bytes(info?.['virtual-size'] ?? 0)} virtual`),
        h('span', {}, `${bytes(l.fileLength)} file on ${l.protocol}`),
        info?.['cluster-size'] ? h('span', {}, `${bytes(info['cluster-size'])} clusters`) : null,
      ),
    );
  });
  return h(
    'section',
    { class: 'card wide', 'aria-labelledby': 'chain-h' },
    h('h3', { id: 'chain-h' }, 'Backing chain'),
    h('div', { class: 'chain', role: 'img', 'aria-label': `Backing chain: ${img.layers.map((l) => `${l.filename} (${l.format})`).join(' backed by ')}`, 'data-testid': 'chain' }, ...boxes),
    img.layers.length === 1 ? h('p', { class: 'muted' }, 'This image has no backing file: every cluster it does not hold reads as zeroes.') : null,
    ...img.notes.map((n) => h('p', { class: 'note' }, n)),
  );
}

/** The qcow2 header field by field, then the feature bits and extensions in words. */
function headerSection(hv: Qcow2HeaderView, layerLabel: string): HTMLElement {
  const fields = table(
    ['Field', 'Offset', 'Bytes', 'Value', 'Meaning'],
    hv.fields.map((f) => [h('code', {}, f.name), hex(f.offset, 2), String(f.size), h('span', { 'data-field': f.name }, f.value), FIELD_MEANING[f.name] ?? '']),
    { class: 'grid-table', 'data-testid': 'header-fields' },
  );
  const derived = dl(
    [
      ['Cluster size', bytesExact(hv.clusterSize)],
      ['Subclusters', hv.extendedL2 ? `32 per cluster, ${bytes(hv.subclusterSize)} each (extended L2)` : 'none (standard L2 entries)'],
      ['One L2 table maps', `${bytes(hv.l2Coverage)} of guest disk (${hv.l2Entries} entries)`],
      ['Refcounts', `${hv.refcountBits}-bit, ${hv.refblockEntries} per refcount block`],
      ['Compression', hv.compressionType],
      ['Image file', bytesExact(hv.fileLength)],
    ],
    { class: 'kv' },
  );
  const features = hv.features.length
    ? h('ul', { class: 'features' }, ...hv.features.map((f) => h('li', {}, h('code', {}, `${f.kind} bit ${f.bit}`), ' ', h('strong', {}, f.name), ' — ', featureMeaning(f))))
    : h('p', { class: 'muted' }, 'No feature bits are set: a plain image any qcow2 reader can open.');
  const exts = hv.extensions.length
    ? table(['Extension', 'Magic', 'At', 'Length'], hv.extensions.map((e) => [e.name, hex(e.magic), hex(e.offset, 4), String(e.length)]), { class: 'grid-table' })
    : h('p', { class: 'muted' }, 'No header extensions.');
  return h(
    'section',
    { class: 'card wide', 'aria-labelledby': 'hdr-h' },
    h('h3', { id: 'hdr-h' }, `qcow2 header (version ${hv.version}) `, h('small', {}, layerLabel)),
    derived,
    h('h4', {}, 'Feature bits'),
    features,
    h('div', { class: 'scroll-x' }, fields),
    h('h4', {}, 'Header extensions'),
    exts,
    hv.backingFile !== undefined ? h('p', {}, 'Backing file name stored in the header: ', h('code', {}, hv.backingFile), hv.backingFormat ? ` (format ${hv.backingFormat})` : '') : null,
  );
}

/** qemu-img info's "Format specific information". */
function formatSpecific(info: ImageInfo | undefined): HTMLElement | null {
  const spec = info?.['format-specific'];
  if (!spec) return null;
  const rows = Object.entries(spec.data)
    .filter(([k]) => k !== 'bitmaps')
    .map(([k, v]) => fieldRow(`fs:${k}`, h('code', {}, k), infoValue(v), v));
  return h('section', { class: 'card', 'aria-labelledby': 'fs-h' }, h('h3', { id: 'fs-h' }, `Format-specific (${spec.type})`), dl(rows, { class: 'kv', 'data-testid': 'format-specific' }));
}

/** Internal snapshots and persistent bitmaps of the image. */
function snapshotsAndBitmaps(img: OpenImage, showOnMap: (bitmap: string) => void): HTMLElement {
  const snaps = img.info[0]?.snapshots ?? [];
  const bitmaps = img.bitmaps;
  const clock = (sec: number, nsec: number): string => {
    const t = sec + nsec / 1e9;
    const hh = Math.floor(t / 3600);
    const mm = Math.floor((t % 3600) / 60);
    return `${String(hh).padStart(2, '0')}:${String(mm).padStart(2, '0')}:${(t % 60).toFixed(3).padStart(6, '0')}`;
  };
  return h(
    'section',
    { class: 'card', 'aria-labelledby': 'sb-h' },
    h('h3', { id: 'sb-h' }, 'Snapshots and bitmaps'),
    snaps.length
      ? table(
          ['ID', 'Tag', 'VM state', 'Date', 'VM clock'],
          snaps.map((s) => [s.id, s.name, bytes(s['vm-state-size']), new Date(s['date-sec'] * 1000).toISOString().replace('T', ' ').slice(0, 19), clock(s['vm-clock-sec'], s['vm-clock-nsec'])]),
          { class: 'grid-table', 'data-testid': 'snapshots' },
        )
      : h('p', { class: 'muted' }, 'No internal snapshots.'),
    bitmaps.length
      ? table(
          ['Bitmap', 'Granularity', 'Flags', ''],
          bitmaps.map((b) => [
            b.name,
            bytes(b.granularity),
            b.flags.length ? b.flags.map((f) => BITMAP_FLAG_MEANING[f] ?? f).join('; ') : 'none (disabled: not tracking writes)',
            button('Show on map', () => showOnMap(b.name), { class: 'small', 'aria-label': `Show bitmap ${b.name} on the map` }),
          ]),
          { class: 'grid-table', 'data-testid': 'bitmaps' },
        )
      : h('p', { class: 'muted' }, 'No persistent dirty bitmaps.'),
  );
}

/** The guest's partition table. */
function partitionsSection(pt: PartitionTable | null, diskSize: number): HTMLElement {
  const body: Child[] = [];
  if (!pt) {
    body.push(h('p', { class: 'muted' }, 'No partition table: sector 0 has no MBR boot signature (a blank disk, or a filesystem without partitions).'));
  } else {
    body.push(h('p', {}, `${pt.scheme === 'gpt' ? 'GPT' : 'MBR'} partition table, disk ${pt.scheme === 'gpt' ? 'GUID' : 'signature'} `, h('code', {}, pt.diskId)));
    body.push(
      h(
        'div',
        { class: 'part-bar', role: 'img', 'aria-label': 'Partitions laid out on the disk' },
        ...pt.partitions.map((p) =>
          h('span', { class: 'part', style: `left:${(100 * p.start) / diskSize}%;width:${Math.max(0.5, (100 * p.size) / diskSize)}%`, title: `${p.number}: ${p.typeName} ${bytes(p.size)}` }, String(p.number)),
        ),
      ),
    );
    body.push(
      table(
        ['#', 'Start', 'Size', 'Type', 'Name'],
        pt.partitions.map((p) => [String(p.number), `${hex(p.start)} (sector ${p.start / pt.sectorSize})`, bytes(p.size), `${p.typeName} ${pt.scheme === 'gpt' ? '' : p.type}`.trim(), p.name ?? (p.bootable ? 'bootable' : p.logical ? 'logical' : '')]),
        { class: 'grid-table', 'data-testid': 'partitions' },
      ),
    );
    for (const w of pt.warnings) body.push(h('p', { class: 'note' }, w));
  }
  return h('section', { class: 'card', 'aria-labelledby': 'pt-h' }, h('h3', { id: 'pt-h' }, 'Partition table'), ...body);
}

/** Renders the Overview tab for the current image into `root`. */
export async function renderOverview(app: App, img: OpenImage, root: HTMLElement, showOnMap: (bitmap: string) => void = () => undefined): Promise<void> {
  const headerSlot = h('div', { class: 'slot wide' });
  const partSlot = h('div', { class: 'slot' }, h('p', { class: 'muted' }, 'Reading the partition table…'));
  const httpSlot = h('div', { class: 'slot' });
  replace(root, h('div', { class: 'cards' }, summary(img), formatSpecific(img.info[0]), chainPicture(img), headerSlot, snapshotsAndBitmaps(img, showOnMap), partSlot, httpSlot));
  const jobs: Array<Promise<void>> = [];
  if (img.caps.tables.ok) {
    jobs.push(
      app.inspector.header(img.id).then(
        (hv) => replace(headerSlot, headerSection(hv, img.label)),
        (e: unknown) => replace(headerSlot, errorBox(e)),
      ),
    );
  }
  jobs.push(
    app.inspector.partitions(img.id).then(
      (pt) => replace(partSlot, partitionsSection(pt, img.summary.virtualSize)),
      (e: unknown) => replace(partSlot, h('section', { class: 'card' }, h('h3', {}, 'Partition table'), errorBox(e))),
    ),
  );
  if (img.origin === 'url') {
    const show = async (): Promise<void> => {
      const s = await app.inspector.httpStats(img.id);
      if (!s) return;
      replace(
        httpSlot,
        h(
          'section',
          { class: 'card', 'aria-labelledby': 'http-h' },
          h('h3', { id: 'http-h' }, 'HTTP'),
          dl([
            ['Bytes fetched', h('span', { 'data-testid': 'bytes-fetched' }, bytesExact(s.bytesFetched))],
            ['Of the image', `${((100 * s.bytesFetched) / Math.max(1, img.layers.reduce((a, l) => a + l.fileLength, 0))).toFixed(2)}% of ${bytes(img.layers.reduce((a, l) => a + l.fileLength, 0))}`],
            ['Requests', String(s.requests)],
            ['Cache hits / misses', `${s.cacheHits} / ${s.cacheMisses}`],
          ], { class: 'kv' }),
        ),
      );
    };
    jobs.push(show());
    // The other tabs fetch more as they are used; keep the counter current while this tab shows.
    const timer = setInterval(() => {
      if (!root.isConnected || app.current !== img) clearInterval(timer);
      else void show().catch(() => clearInterval(timer));
    }, 1000);
  }
  await Promise.all(jobs);
}
