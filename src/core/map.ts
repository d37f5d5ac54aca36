/**
 * The allocation map of an image as `qemu-img map` reports it: one entry per
 * run of bytes with the same depth, presence, zero/data status and host
 * mapping, built the way qemu-img's get_block_status walks the backing chain
 * (one layer at a time, stopping at the first that has data or zeroes) and
 * merged the way its entry_mergeable does.
 */
import { bdrvBlockStatusAbove, bdrvGetLength, filterOrCowBs } from './io.ts';
import type { BlockNode } from './node.ts';
import { BLOCK } from './types.ts';

/** One map entry with qemu-img's JSON field names. */
export interface MapEntry {
  start: number;
  length: number;
  /** Backing-chain layer that answered (0 = the image itself). */
  depth: number;
  /** Allocated in that layer (BLOCK.ALLOCATED). */
  present: boolean;
  zero: boolean;
  data: boolean;
  /** Stored compressed (QEMU 8.1+ prints this field; 7.2 does not). */
  compressed: boolean;
  /** Host offset in `filename` when the status carried one. */
  offset?: number;
  /** Name of the node holding `offset` (qemu-img prints it in human output only). */
  filename?: string;
}

/** Options for mapImage. */
export interface MapOptions {
  /** First guest byte to map (default 0). */
  start?: number;
  /** Bytes to map from start (default: to the end of the image). */
  length?: number;
}

/** Largest range asked of block status at once (qemu-img probes up to 1 GiB at a time). */
const PROBE_MAX = 1 << 30;

/** Skips filter nodes down to the first non-filter (QEMU's bdrv_skip_filters). */
function skipFilters(bs: BlockNode): BlockNode {
  let n = bs;
  while (n.drv.kind === 'filter' && n.filteredChild) n = n.filteredChild.bs;
  return n;
}

/** Status of one range as qemu-img's get_block_status computes it. */
async function entryAt(top: BlockNode, offset: number, bytes: number): Promise<MapEntry> {
  let depth = 0;
  let bs: BlockNode | null = top;
  let status = 0;
  let map: number | undefined;
  let file: BlockNode | undefined;
  for (;;) {
    const cur: BlockNode = skipFilters(bs);
    const st = await bdrvBlockStatusAbove(cur, filterOrCowBs(cur), false, true, offset, bytes);
    if (st.pnum <= 0) throw new Error(`block status returned no progress at offset ${offset}`);
    bytes = st.pnum;
    status = st.status;
    map = st.map;
    file = st.file;
    if (status & (BLOCK.ZERO | BLOCK.DATA)) break;
    bs = filterOrCowBs(cur);
    if (!bs) {
      status = 0;
      break;
    }
    depth++;
  }
  const hasOffset = (status & BLOCK.OFFSET_VALID) !== 0 && map !== undefined;
  const e: MapEntry = {
    start: offset,
    length: bytes,
    depth,
    present: (status & BLOCK.ALLOCATED) !== 0,
    zero: (status & BLOCK.ZERO) !== 0,
    data: (status & BLOCK.DATA) !== 0,
    compressed: (status & BLOCK.COMPRESSED) !== 0,
  };
  if (hasOffset) {
    e.offset = map;
    if (file) e.filename = file.filename;
  }
  return e;
}

/** qemu-img's entry_mergeable: `next` continues `cur` in every respect, including a contiguous host offset. */
export function entryMergeable(cur: MapEntry, next: MapEntry): boolean {
  if (cur.length === 0) return false;
  if (cur.depth !== next.depth || cur.present !== next.present || cur.zero !== next.zero || cur.data !== next.data) return false;
  if (cur.compressed !== next.compressed) return false;
  if ((cur.offset !== undefined) !== (next.offset !== undefined)) return false;
  if (cur.offset !== undefined && cur.offset + cur.length !== next.offset) return false;
  if ((cur.filename !== undefined) !== (next.filename !== undefined)) return false;
  if (cur.filename !== undefined && cur.filename !== next.filename) return false;
  return true;
}

/** Maps an image (QEMU's qemu-img map): merged entries covering [start, start+length). */
export async function mapImage(bs: BlockNode, opts: MapOptions = {}): Promise<MapEntry[]> {
  const total = await bdrvGetLength(bs);
  const start = opts.start ?? 0;
  const end = Math.min(total, opts.length !== undefined ? start + opts.length : total);
  const out: MapEntry[] = [];
  let cur: MapEntry | null = null;
  let pos = start;
  while (pos < end) {
    const next = await entryAt(bs, pos, Math.min(PROBE_MAX, end - pos));
    pos += next.length;
    if (cur && entryMergeable(cur, next)) {
      cur.length += next.length;
      continue;
    }
    if (cur) out.push(cur);
    cur = next;
  }
  if (cur) out.push(cur);
  return out;
}

/** Formats entries exactly as `qemu-img map --output=json` prints them; `compressed` adds QEMU 8.1's field. */
export function formatMapJson(entries: readonly MapEntry[], opts: { compressed?: boolean } = {}): string {
  const lines = entries.map((e) => {
    let s = `{ "start": ${e.start}, "length": ${e.length}, "depth": ${e.depth}, "present": ${e.present}, "zero": ${e.zero}, "data": ${e.data}`;
    if (opts.compressed) s += `, "compressed": ${e.compressed}`;
    if (e.offset !== undefined) s += `, "offset": ${e.offset}`;
    return `${s}}`;
  });
  return `[${lines.join(',\n')}]\n`;
}
