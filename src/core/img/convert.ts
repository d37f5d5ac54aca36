/**
 * The copy loop of `qemu-img convert` (QEMU's convert_do_copy and helpers).
 * Sources are concatenated; each is walked by block status so unallocated
 * and zero ranges are never read, data is read in chunks of up to 2 MiB,
 * runs of at least `minSparse` zero sectors inside data are not written
 * (the target is known to read as zero, or gets an efficient zero write),
 * and up to `numCoroutines` workers copy in parallel while writes stay in
 * order unless `inOrder` is false. Chunking follows QEMU's so progress
 * advances in the same steps.
 */
import type { BlockBackend } from '../block-backend.ts';
import { BlockError, STRERROR, toBlockError } from '../errors.ts';
import { bdrvBlockStatusAbove, filterOrCowBs } from '../io.ts';
import type { BlockNode } from '../node.ts';
import { BDRV_REQUEST_MAX_BYTES, BLOCK, REQ } from '../types.ts';
import { firstNonZeroByte, firstZeroBlock, isZeroBuffer } from '../zero.ts';
import { kernelBuffer } from '../../kernels/index.ts';
import { bdrvGetInfo } from './info.ts';

const SECTOR = 512;
/** Sectors per read buffer by default (QEMU's IO_BUF_SIZE / 512). */
export const DEFAULT_BUF_SECTORS = (2 * 1024 * 1024) / SECTOR;
/** Largest read buffer in sectors (QEMU's MAX_BUF_SECTORS, 16 MiB). */
export const MAX_BUF_SECTORS = 32768;
/** Most parallel workers (QEMU's MAX_COROUTINES). */
export const MAX_COROUTINES = 16;
const REQUEST_MAX_SECTORS = Math.floor(BDRV_REQUEST_MAX_BYTES / SECTOR);

type Status = 'data' | 'zero' | 'backing';

/** One source image. */
export interface ConvertSource {
  blk: BlockBackend;
  /** Name for messages. */
  name: string;
}

/** Parameters of the copy (QEMU's ImgConvertState inputs). */
export interface ConvertParams {
  sources: ConvertSource[];
  target: BlockBackend;
  /** Target reads as zeroes already (new image with zero init, or --target-is-zero). */
  hasZeroInit: boolean;
  /** The target was created by this convert. */
  targetIsNew: boolean;
  /** The target has a backing file: leave ranges the source does not allocate unallocated. */
  targetHasBacking: boolean;
  /** Write compressed clusters (-c). */
  compressed: boolean;
  /** Minimum zero run, in sectors, that is not written (-S / 512); 0 writes everything. */
  minSparse: number;
  /** Parallel workers (-m). */
  numCoroutines: number;
  /** Keep writes in order (the default; -W clears it). */
  inOrder: boolean;
  /** Try to continue past read errors, writing zeroes (--salvage). */
  salvage: boolean;
  /** Suppresses salvage warnings. */
  quiet: boolean;
  /** Receives QEMU's warnings (salvage) without the program prefix. */
  warn?: (msg: string) => void;
  /** Progress in percent of the allocated sectors. */
  progress?: (percent: number) => void;
}

/** An error already reported in QEMU's words ("error while reading at byte …"). */
export class ConvertError extends BlockError {}

/** bdrv_has_zero_init: the driver's answer through filters; never with a backing file. */
export function hasZeroInit(bs: BlockNode): boolean {
  if (bs.backing) return false;
  if (bs.drv.hasZeroInit) return bs.drv.hasZeroInit(bs);
  const f = bs.drv.kind === 'filter' ? bs.filteredChild : null;
  return f ? hasZeroInit(f.bs) : false;
}

/** Whether a 512-byte sector is all zero. */
function sectorZero(buf: Uint8Array, sector: number): boolean {
  return isZeroBuffer(buf.subarray(sector * SECTOR, (sector + 1) * SECTOR));
}

/** QEMU's is_allocated_sectors: whether the run starting at sector 0 is data, and its length (aligned where it helps). */
export function isAllocatedSectors(buf: Uint8Array, n: number, sectorNum: number, alignment: number): { data: boolean; pnum: number } {
  if (n <= 0) return { data: false, pnum: 0 };
  // All-zero chunks are the common case in sparse images; one wide check answers them.
  if (isZeroBuffer(buf.subarray(0, n * SECTOR))) return { data: false, pnum: n };
  let isZero = sectorZero(buf, 0);
  // One scan finds where the run of like sectors ends: the sector of the first non-zero byte
  // after zeroes, or the first all-zero sector after data.
  const span = buf.subarray(0, n * SECTOR);
  const at = isZero ? firstNonZeroByte(span) : firstZeroBlock(span, SECTOR);
  let i = at < 0 ? n : Math.floor(at / SECTOR);
  if (i === n) return { data: !isZero, pnum: i };
  const tail = (sectorNum + i) & (alignment - 1);
  if (tail) {
    // A short zero run before data would be rewritten by the read-modify-write anyway.
    if (isZero && i <= tail) isZero = false;
    if (!isZero) i = Math.min(i + alignment - tail, n);
    else i -= tail;
  }
  return { data: !isZero, pnum: i };
}

/** QEMU's is_allocated_sectors_min: like isAllocatedSectors, but data swallows zero runs shorter than `min`. */
export function isAllocatedSectorsMin(buf: Uint8Array, n: number, min: number, sectorNum: number, alignment: number): { data: boolean; pnum: number } {
  if (n < min) min = n;
  const first = isAllocatedSectors(buf, n, sectorNum, alignment);
  if (!first.data) return first;
  let used = first.pnum;
  let checked = used;
  let off = first.pnum;
  let left = n - first.pnum;
  let sec = sectorNum + first.pnum;
  while (left > 0) {
    const r = isAllocatedSectors(buf.subarray(off * SECTOR), left, sec, alignment);
    off += r.pnum;
    left -= r.pnum;
    sec += r.pnum;
    checked += r.pnum;
    if (r.data) used = checked;
    else if (r.pnum >= min) break;
  }
  return { data: true, pnum: used };
}

/** Largest power of two ≤ n (QEMU's pow2floor; 0 for 0). */
function pow2floor(n: number): number {
  if (n <= 0) return 0;
  return 2 ** Math.floor(Math.log2(n));
}

/** The convert state machine. */
class Converter {
  readonly srcSectors: number[] = [];
  readonly srcAlignment: number[] = [];
  totalSectors = 0;
  allocatedSectors = 0;
  allocatedDone = 0;
  sectorNum = 0;
  wrOffs = 0;
  status: Status = 'data';
  sectorNextStatus = 0;
  bufSectors = DEFAULT_BUF_SECTORS;
  clusterSectors = 0;
  alignment = 1;
  targetBackingSectors = -1;
  error: unknown = null;
  private waiters = new Map<number, () => void>();

  constructor(readonly p: ConvertParams) {}

  /** Which source holds `sector`, and where that source starts. */
  selectPart(sector: number): { cur: number; base: number } {
    let cur = 0;
    let base = 0;
    while (sector - base >= this.srcSectors[cur]!) {
      base += this.srcSectors[cur]!;
      cur++;
    }
    return { cur, base };
  }

  /** QEMU's convert_iteration_sectors: the status of the run at `sector` and how many sectors to handle now. */
  async iterationSectors(sector: number): Promise<number> {
    const { cur, base } = this.selectPart(sector);
    let n = Math.min(this.totalSectors - sector, REQUEST_MAX_SECTORS);
    let postBackingZero = false;
    if (this.targetBackingSectors >= 0) {
      if (sector >= this.targetBackingSectors) postBackingZero = true;
      else if (sector + n > this.targetBackingSectors) n = this.targetBackingSectors - sector;
    }
    if (this.sectorNextStatus <= sector) {
      const offset = (sector - base) * SECTOR;
      const src = this.p.sources[cur]!.blk.bs!;
      const baseBs = this.p.targetHasBacking ? filterOrCowBs(skipFilters(src)) : null;
      let st: number;
      let count: number;
      for (;;) {
        try {
          const r = await bdrvBlockStatusAbove(src, baseBs, false, true, offset, n * SECTOR);
          st = r.status;
          count = r.pnum;
          break;
        } catch (e) {
          const msg = STRERROR[toBlockError(e).code];
          if (!this.p.salvage) throw new ConvertError(toBlockError(e).code, `error while reading block status at offset ${offset}: ${msg}`);
          if (n === 1) {
            if (!this.p.quiet) this.p.warn?.(`error while reading block status at offset ${offset}: ${msg}`);
            st = BLOCK.DATA;
            count = SECTOR;
            break;
          }
          n = Math.ceil(n / 4);
        }
      }
      n = Math.ceil(count / SECTOR);
      // Keep the next status query aligned to the source's request alignment and cluster size.
      const tail = (sector - base + n) % this.srcAlignment[cur]!;
      if (n > tail) n -= tail;
      if (st & BLOCK.ZERO) this.status = postBackingZero ? 'backing' : 'zero';
      else if (st & BLOCK.DATA) this.status = 'data';
      else this.status = this.p.targetHasBacking ? 'backing' : 'data';
      this.sectorNextStatus = sector + n;
    }
    n = Math.min(n, this.sectorNextStatus - sector);
    if (this.status === 'data') n = Math.min(n, this.bufSectors);
    if (this.p.compressed) {
      // Compressed images are written in whole clusters.
      if (n < this.clusterSectors) {
        n = Math.min(this.clusterSectors, this.totalSectors - sector);
        this.status = 'data';
      } else {
        n -= n % this.clusterSectors;
      }
    }
    return n;
  }

  /** QEMU's convert_co_read: reads across source boundaries; with salvage, failed sectors read as zero. */
  async read(sector: number, nb: number, buf: Uint8Array): Promise<void> {
    let singleUntil = 0;
    let pos = 0;
    while (nb > 0) {
      const { cur, base } = this.selectPart(sector);
      const src = this.p.sources[cur]!;
      const offset = (sector - base) * SECTOR;
      let n = Math.min(nb, this.srcSectors[cur]! - (sector - base));
      if (singleUntil > offset) n = 1;
      try {
        await src.blk.pread(offset, buf.subarray(pos * SECTOR, (pos + n) * SECTOR));
      } catch (e) {
        if (!this.p.salvage) throw e;
        if (n > 1) {
          singleUntil = offset + n * SECTOR;
          continue;
        }
        if (!this.p.quiet) this.p.warn?.(`error while reading offset ${offset}: ${STRERROR[toBlockError(e).code]}`);
        buf.fill(0, pos * SECTOR, (pos + 1) * SECTOR);
      }
      sector += n;
      nb -= n;
      pos += n;
    }
  }

  /** QEMU's convert_co_write: data runs are written, zero runs skipped or zero-written, backing runs left alone. */
  async write(sector: number, nb: number, buf: Uint8Array, status: Status): Promise<void> {
    const t = this.p.target;
    let pos = 0;
    while (nb > 0) {
      let n = nb;
      let zero = status === 'zero';
      if (status === 'data') {
        const chunk = buf.subarray(pos * SECTOR, (pos + n) * SECTOR);
        let write = !this.p.minSparse;
        if (!write && !this.p.compressed) {
          const r = isAllocatedSectorsMin(chunk, n, this.p.minSparse, sector, this.alignment);
          n = r.pnum;
          write = r.data;
        } else if (!write) {
          write = !isZeroBuffer(chunk);
        }
        if (write) {
          const data = buf.subarray(pos * SECTOR, (pos + n) * SECTOR);
          if (this.p.compressed) await t.pwriteCompressed(sector * SECTOR, data);
          else await t.pwrite(sector * SECTOR, data);
        } else {
          zero = true;
        }
      }
      if (zero && !this.p.hasZeroInit) {
        await t.pwriteZeroes(sector * SECTOR, n * SECTOR, { flags: REQ.MAY_UNMAP });
      }
      sector += n;
      nb -= n;
      pos += n;
    }
  }

  /** One worker (QEMU's convert_co_do_copy). */
  async worker(): Promise<void> {
    // In linear memory when possible: each chunk is zero-scanned, and the kernel then reads it in place.
    const own = kernelBuffer(this.bufSectors * SECTOR);
    try {
      await this.copyLoop(own.buf);
    } finally {
      own.release();
    }
  }

  private async copyLoop(buf: Uint8Array): Promise<void> {
    for (;;) {
      if (this.error !== null || this.sectorNum >= this.totalSectors) return;
      let n: number;
      // Picking the next chunk must not interleave between workers (QEMU holds a lock here).
      const pick = await this.lock(async () => {
        if (this.error !== null || this.sectorNum >= this.totalSectors) return null;
        let k = await this.iterationSectors(this.sectorNum);
        const sector = this.sectorNum;
        const status = this.status;
        if (!this.p.minSparse && status === 'zero') k = Math.min(k, this.bufSectors);
        this.sectorNum += k;
        if (status === 'data' || (!this.p.minSparse && status === 'zero')) {
          this.allocatedDone += k;
          this.p.progress?.((100 * this.allocatedDone) / this.allocatedSectors);
        }
        return { sector, status, k };
      }).catch((e: unknown) => {
        this.error ??= e;
        return null;
      });
      if (!pick) return;
      n = pick.k;
      let status = pick.status;
      const sector = pick.sector;
      const chunk = buf.subarray(0, n * SECTOR);
      if (status === 'data') {
        try {
          await this.read(sector, n, chunk);
        } catch (e) {
          this.error ??= new ConvertError(toBlockError(e).code, `error while reading at byte ${sector * SECTOR}: ${STRERROR[toBlockError(e).code]}`);
        }
      } else if (!this.p.minSparse && status === 'zero') {
        status = 'data';
        chunk.fill(0);
      }
      if (this.p.inOrder) {
        while (this.wrOffs !== sector && this.error === null) {
          await new Promise<void>((r) => this.waiters.set(sector, r));
        }
      }
      if (this.error === null) {
        try {
          await this.write(sector, n, chunk, status);
        } catch (e) {
          this.error ??= new ConvertError(toBlockError(e).code, `error while writing at byte ${sector * SECTOR}: ${STRERROR[toBlockError(e).code]}`);
        }
      }
      if (this.p.inOrder) {
        this.wrOffs = sector + n;
        const w = this.waiters.get(this.wrOffs);
        if (w) {
          this.waiters.delete(this.wrOffs);
          w();
        }
        if (this.error !== null) for (const [k, r] of this.waiters) { this.waiters.delete(k); r(); }
      }
    }
  }

  private chain: Promise<unknown> = Promise.resolve();

  /** Runs `fn` exclusively with respect to other lock() callers. */
  lock<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.chain.then(fn, fn);
    this.chain = run.catch(() => undefined);
    return run;
  }
}

function skipFilters(bs: BlockNode): BlockNode {
  let n = bs;
  while (n.drv.kind === 'filter' && n.filteredChild) n = n.filteredChild.bs;
  return n;
}

/** Sector counts and the alignment the copy loop uses, computed the way img_convert does before creating the target. */
export async function sourceGeometry(sources: ConvertSource[]): Promise<{ sectors: number[]; alignment: number[]; totalSectors: number }> {
  const sectors: number[] = [];
  const alignment: number[] = [];
  let total = 0;
  for (const s of sources) {
    let len: number;
    try {
      len = await s.blk.getLength();
    } catch (e) {
      throw new BlockError(toBlockError(e).code, `Could not get size of ${s.name}: ${STRERROR[toBlockError(e).code]}`);
    }
    const n = Math.ceil(len / SECTOR);
    const bs = s.blk.bs!;
    let a = Math.ceil(bs.bl.requestAlignment / SECTOR);
    try {
      const bdi = await bdrvGetInfo(bs);
      a = Math.max(a, Math.floor((bdi.clusterSize ?? 0) / SECTOR));
    } catch {
      // No driver info: the request alignment alone decides.
    }
    sectors.push(n);
    alignment.push(Math.max(1, a));
    total += n;
  }
  return { sectors, alignment, totalSectors: total };
}

/**
 * Copies the sources into the target (QEMU's convert_do_copy). Rejects with
 * ConvertError whose message is what qemu-img reports.
 */
export async function convertCopy(p: ConvertParams): Promise<void> {
  const c = new Converter(p);
  const geo = await sourceGeometry(p.sources);
  c.srcSectors.push(...geo.sectors);
  c.srcAlignment.push(...geo.alignment);
  c.totalSectors = geo.totalSectors;
  const out = p.target.bs!;
  c.bufSectors = Math.min(MAX_BUF_SECTORS, Math.max(DEFAULT_BUF_SECTORS, Math.floor(out.bl.optTransfer / SECTOR), Math.floor(out.bl.pdiscardAlignment / SECTOR)));
  c.alignment = Math.max(pow2floor(p.minSparse), Math.ceil(out.bl.requestAlignment / SECTOR));
  if (p.targetHasBacking && p.targetIsNew) {
    const b = filterOrCowBs(out);
    c.targetBackingSectors = b ? Math.ceil(b.totalBytes / SECTOR) : -1;
  }
  try {
    const bdi = await bdrvGetInfo(out);
    c.clusterSectors = Math.floor((bdi.clusterSize ?? 0) / SECTOR);
  } catch {
    if (p.compressed) throw new ConvertError('EINVAL', 'could not get block driver info');
  }
  if (!p.hasZeroInit && p.targetIsNew && p.minSparse && !p.targetHasBacking) p.hasZeroInit = hasZeroInit(out);
  if (p.compressed) {
    if (c.clusterSectors <= 0 || c.clusterSectors > c.bufSectors) throw new ConvertError('EINVAL', 'invalid cluster size');
    c.bufSectors = c.clusterSectors;
  }
  // First pass: how much will be copied, for progress only.
  for (let s = 0; s < c.totalSectors;) {
    const n = await c.iterationSectors(s);
    if (c.status === 'data' || (!p.minSparse && c.status === 'zero')) c.allocatedSectors += n;
    s += n;
  }
  c.sectorNextStatus = 0;
  const workers: Promise<void>[] = [];
  for (let i = 0; i < Math.max(1, Math.min(p.numCoroutines, MAX_COROUTINES)); i++) workers.push(c.worker());
  await Promise.all(workers);
  if (c.error !== null) {
    if (c.error instanceof BlockError) throw c.error;
    throw toBlockError(c.error);
  }
}
