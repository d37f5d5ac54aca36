/**
 * Backing-chain operations of qemu-img: `commit` (copy what the top image
 * holds above the base into the base, then empty the top if its driver can)
 * and `rebase` (safe mode copies into the image every range where old and
 * new backing differ, then the image's header is changed to name the new
 * backing file). They need drivers with writes and changeBackingFile; where
 * a driver lacks one, the error is ENOTSUP in QEMU's words.
 */
import { BlockBackend } from '../block-backend.ts';
import { BlockError, STRERROR, toBlockError } from '../errors.ts';
import type { Graph } from '../graph.ts';
import { bdrvBlockStatusAbove, bdrvIsAllocated, bdrvIsAllocatedAbove, filterOrCowBs } from '../io.ts';
import type { BlockNode } from '../node.ts';
import { BLOCK, PERM, REQ } from '../types.ts';
import { compareBuffers, IO_BUF_SIZE } from './compare.ts';
import { pathCombine } from './gate.ts';

/** The next image down the backing chain, skipping filters (QEMU's bdrv_backing_chain_next). */
export function backingChainNext(bs: BlockNode): BlockNode | null {
  let n: BlockNode | null = bs;
  while (n && n.drv.kind === 'filter') n = n.filteredChild?.bs ?? null;
  if (!n || !n.drv.supportsBacking) return null;
  let b = n.backing?.bs ?? null;
  while (b && b.drv.kind === 'filter') b = b.filteredChild?.bs ?? null;
  return b;
}

/** QEMU's bdrv_find_backing_image: a node below `bs` whose name (as recorded or resolved) is `name`. */
export function findBackingImage(bs: BlockNode, name: string): BlockNode | null {
  for (let cur: BlockNode | null = bs; cur; cur = backingChainNext(cur)) {
    const next = backingChainNext(cur);
    if (!next) return null;
    if (cur.backingFile === name || next.filename === name || pathCombine(cur.filename, cur.backingFile) === name || pathCombine(cur.filename, name) === next.filename) return next;
  }
  return null;
}

/** A backend on an existing node with the given permissions (QEMU's blk_new_with_bs). */
function backendOn(graph: Graph, bs: BlockNode, perm: number): BlockBackend {
  const blk = new BlockBackend(graph, { perm, sharedPerm: PERM.ALL });
  blk.insertNode(bs);
  return blk;
}

/** Options for commitImage. */
export interface CommitOptions {
  /** Commit into this image of the chain (-b); default the immediate backing file. */
  base?: string;
  /** Display name of the top image, for messages. */
  filename: string;
  /** Leave the top image as it is afterwards (-d, or implied by -b). */
  drop?: boolean;
  progress?: (percent: number) => void;
}

/**
 * Commits the top image of `blk` into its base (QEMU's commit job as
 * qemu-img runs it): every range allocated above the base is copied down.
 */
export async function commitImage(blk: BlockBackend, opts: CommitOptions): Promise<void> {
  const bs = blk.bs!;
  let base: BlockNode | null;
  if (opts.base !== undefined) {
    base = findBackingImage(bs, opts.base);
    if (!base) throw new BlockError('EINVAL', `Did not find '${opts.base}' in the backing chain of '${opts.filename}'`);
  } else {
    base = backingChainNext(bs);
    if (!base) throw new BlockError('EINVAL', 'Image does not have a backing file');
  }
  const graph = bs.graph;
  // The base is opened read-only as part of the chain; commit needs to write it.
  if (base.readOnly) await graph.reopen(base, { readOnly: false });
  const dst = backendOn(graph, base, PERM.CONSISTENT_READ | PERM.WRITE | PERM.RESIZE);
  try {
    const size = await blk.getLength();
    if ((await dst.getLength()) < size) await dst.truncate(size);
    let offset = 0;
    while (offset < size) {
      const { depth, pnum } = await bdrvIsAllocatedAbove(bs, base, false, offset, Math.min(size - offset, IO_BUF_SIZE));
      const n = Math.max(1, pnum);
      // Ranges the chain reads as zeroes become zero writes that may unmap, as QEMU's commit (a mirror with unmap) does.
      for (let o = offset; depth > 0 && o < offset + n;) {
        const st = await bdrvBlockStatusAbove(bs, null, false, true, o, offset + n - o);
        const m = Math.max(1, Math.min(st.pnum, offset + n - o));
        if (st.status & BLOCK.ZERO) {
          await dst.pwriteZeroes(o, m, { flags: REQ.MAY_UNMAP });
        } else {
          const buf = new Uint8Array(m);
          await blk.pread(o, buf);
          await dst.pwrite(o, buf);
        }
        o += m;
      }
      offset += n;
      opts.progress?.((100 * offset) / size);
    }
    await dst.flush();
  } finally {
    await dst.close();
  }
  if (!opts.drop) await makeEmpty(bs);
}

/**
 * QEMU's bdrv_make_empty as qemu-img commit uses it: a driver without the
 * capability leaves the image as it is (qemu-img ignores ENOTSUP there);
 * other failures carry "Failed to empty <file>".
 */
export async function makeEmpty(bs: BlockNode): Promise<void> {
  const top = skipFilters(bs);
  if (!top.drv.makeEmpty) return;
  try {
    await top.drv.makeEmpty(top);
  } catch (e) {
    const be = toBlockError(e);
    throw new BlockError(be.code, `Failed to empty ${top.filename}: ${STRERROR[be.code]}`, { cause: e });
  }
}

/** Options for rebaseImage. */
export interface RebaseOptions {
  /** New backing file name as it will be recorded ('' = none). */
  backing: string | undefined;
  backingFmt?: string;
  /** Only rewrite the header (-u). */
  unsafe: boolean;
  /** Open the new backing image with force-share (-U). */
  forceShare?: boolean;
  /** Image name for messages. */
  filename: string;
  /** Called after each chunk with its share of 100; a returned promise is awaited (a job yields and checks for cancellation there). */
  progress?: (delta: number) => void | Promise<void>;
}

function skipFilters(bs: BlockNode): BlockNode {
  let n = bs;
  while (n.drv.kind === 'filter' && n.filteredChild) n = n.filteredChild.bs;
  return n;
}

/** QEMU's bdrv_change_backing_file with its argument checks. */
export async function changeBackingFile(bs: BlockNode, file: string | undefined, fmt: string | undefined, require: boolean): Promise<void> {
  if (fmt !== undefined && file === undefined) throw new BlockError('EINVAL');
  if (require && file !== undefined && fmt === undefined) throw new BlockError('EINVAL', 'backing format must be specified');
  if (!bs.drv.changeBackingFile) throw new BlockError('ENOTSUP');
  await bs.drv.changeBackingFile(bs, file ?? '', fmt);
  bs.backingFile = file ?? '';
  bs.backingFormat = fmt ?? '';
}

/**
 * Rebases the image of `blk` (QEMU's img_rebase after opening): in safe
 * mode, copies into the image every unallocated range where the old and new
 * backing files differ, then records the new backing file. Errors carry
 * qemu-img's messages.
 */
export async function rebaseImage(graph: Graph, blk: BlockBackend, opts: RebaseOptions): Promise<void> {
  const bs = blk.bs!;
  const top = skipFilters(bs);
  if (opts.backingFmt !== undefined && !graph.drivers.has(opts.backingFmt)) throw new BlockError('EINVAL', `Invalid format name: '${opts.backingFmt}'`);
  if (top.drv.supportsBacking && !top.drv.changeBackingFile) {
    // A format that has backing files but whose driver here cannot rewrite the reference: refuse before copying anything.
    throw new BlockError('ENOTSUP', `Could not change the backing file to '${opts.backing ?? ''}': Operation not supported (the '${top.drv.name}' driver of this engine cannot rewrite its backing file reference)`);
  }
  if (!opts.unsafe) {
    const oldBacking = filterOrCowBs(top);
    let newBlk: BlockBackend | null = null;
    let prefix: BlockNode | null = null;
    const closers: BlockBackend[] = [];
    try {
      const oldBlk = oldBacking ? backendOn(graph, oldBacking, PERM.CONSISTENT_READ) : null;
      if (oldBlk) closers.push(oldBlk);
      if (opts.backing) {
        const real = pathCombine(bs.filename, opts.backing);
        prefix = findBackingImage(bs, real);
        if (prefix) {
          newBlk = backendOn(graph, prefix, PERM.CONSISTENT_READ);
        } else {
          try {
            const options = opts.forceShare ? { 'force-share': true } : {};
            newBlk = await BlockBackend.open(graph, real, { format: opts.backingFmt, readOnly: true, options });
          } catch (e) {
            throw new BlockError(toBlockError(e).code, `Could not open new backing file '${opts.backing}': ${toBlockError(e).message}`);
          }
        }
        closers.push(newBlk);
      }
      const size = await blk.getLength();
      const oldSize = oldBlk ? await oldBlk.getLength() : 0;
      const newSize = newBlk ? await newBlk.getLength() : 0;
      const step = size !== 0 ? Math.fround(100 / Math.trunc(size / Math.min(size, IO_BUF_SIZE))) : 0;
      let n: number;
      for (let offset = 0; offset < size; offset += n) {
        n = Math.min(IO_BUF_SIZE, size - offset);
        let r;
        try {
          r = await bdrvIsAllocated(top, offset, n);
        } catch (e) {
          throw new BlockError(toBlockError(e).code, `error while reading image metadata: ${STRERROR[toBlockError(e).code]}`);
        }
        n = r.pnum;
        if (r.allocated) continue;
        if (prefix) {
          const a = await bdrvIsAllocatedAbove(filterOrCowBs(top)!, prefix, false, offset, n);
          n = a.pnum;
          if (!a.depth) continue;
        }
        const bufOld = new Uint8Array(n);
        const bufNew = new Uint8Array(n);
        let oldZero = false;
        if (offset >= oldSize) oldZero = true;
        else {
          if (offset + n > oldSize) n = oldSize - offset;
          try {
            await oldBlk!.pread(offset, bufOld.subarray(0, n));
          } catch {
            throw new BlockError('EIO', 'error while reading from old backing file');
          }
        }
        if (newBlk && offset < newSize) {
          if (offset + n > newSize) n = newSize - offset;
          try {
            await newBlk.pread(offset, bufNew.subarray(0, n));
          } catch {
            throw new BlockError('EIO', 'error while reading from new backing file');
          }
        }
        for (let written = 0; written < n;) {
          const c = compareBuffers(bufOld.subarray(written, n), bufNew.subarray(written, n), n - written);
          if (c.differ) {
            try {
              if (oldZero) await blk.pwriteZeroes(offset + written, c.pnum);
              else await blk.pwrite(offset + written, bufOld.subarray(written, written + c.pnum));
            } catch (e) {
              throw new BlockError(toBlockError(e).code, `Error while writing to COW image: ${STRERROR[toBlockError(e).code]}`);
            }
          }
          written += c.pnum;
        }
        await opts.progress?.(step);
      }
    } finally {
      for (const c of closers) {
        // Backends built on chain nodes must not close those nodes: detach them only.
        await c.close().catch(() => undefined);
      }
    }
  }
  const file = opts.backing !== undefined && opts.backing !== '' ? opts.backing : undefined;
  try {
    await changeBackingFile(top, file, file !== undefined ? opts.backingFmt : undefined, file !== undefined);
  } catch (e) {
    const be = toBlockError(e);
    const name = opts.backing ?? '(null)';
    if (be.code === 'ENOSPC') throw new BlockError('ENOSPC', `Could not change the backing file to '${name}': No space left in the file header`);
    if (be.code === 'EINVAL' && file !== undefined && opts.backingFmt === undefined) {
      throw new BlockError('EINVAL', `Could not change the backing file to '${name}': backing format must be specified`);
    }
    throw new BlockError(be.code, `Could not change the backing file to '${name}': ${STRERROR[be.code]}`);
  }
}

