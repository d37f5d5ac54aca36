/**
 * copy-on-read: a filter that makes every read through it copy the data it
 * fetched from a backing file into the image below it (QEMU's
 * block/copy-on-read.c), so a later read is served by the top layer.
 *
 * The copying itself is the generic request path's (io.ts copyOnReadv): the
 * filter only adds REQ.COPY_ON_READ to reads, and takes WRITE_UNCHANGED on its
 * child so those write-backs are allowed. With `bottom`, only data allocated
 * in the backing chain above and including that node is copied; data from
 * below it is read through without being copied, as block-stream needs.
 */
import type { BlockDriver } from '../core/driver.ts';
import type { BdrvChild } from '../core/child.ts';
import { BlockError } from '../core/errors.ts';
import {
  bdrvGetLength,
  bdrvIsAllocated,
  bdrvIsAllocatedAbove,
  bdrvPdiscard,
  bdrvPreadv,
  bdrvPwriteCompressed,
  bdrvPwritev,
  bdrvPwriteZeroes,
} from '../core/io.ts';
import type { BlockNode } from '../core/node.ts';
import { OPEN, PERM, REQ, ROLE, type BlockdevOptions } from '../core/types.ts';

/** Per-node state (QEMU's BDRVStateCOR). */
interface CorState {
  bottom: BlockNode | null;
  /** Edges this node froze so the chain down to `bottom` cannot change under it. */
  frozen: BdrvChild[];
}

/** Bits the filter passes through from its parents; WRITE_UNCHANGED is its own business. */
const PASSTHROUGH = PERM.CONSISTENT_READ | PERM.WRITE | PERM.RESIZE;
const UNCHANGED = PERM.ALL & ~PASSTHROUGH;

function corState(bs: BlockNode): CorState {
  return bs.opaque as CorState;
}

/** The node below `bs` that holds data (skips filters; QEMU's bdrv_skip_filters). */
function skipFilters(bs: BlockNode | null): BlockNode | null {
  let n = bs;
  while (n && n.drv.kind === 'filter') n = n.filteredChild?.bs ?? null;
  return n;
}

/** The next data-bearing layer in the backing chain below `bs` (QEMU's bdrv_backing_chain_next). */
function backingChainNext(bs: BlockNode): BlockNode | null {
  const top = skipFilters(bs);
  return skipFilters(top?.drv.supportsBacking ? (top.backing?.bs ?? null) : null);
}

/** The edge `bs` reads unallocated data through: its filtered child or its backing (QEMU's bdrv_filter_or_cow_child). */
function filterOrCowChild(bs: BlockNode): BdrvChild | null {
  if (bs.drv.kind === 'filter') return bs.filteredChild;
  return bs.drv.supportsBacking ? bs.backing : null;
}

/**
 * Freezes the edges from `top` down to `base` (QEMU's bdrv_freeze_backing_chain),
 * all or none: EINVAL when `base` is not in the chain, EPERM when an edge is
 * already frozen by someone else.
 */
function freezeChain(top: BlockNode, base: BlockNode): BdrvChild[] {
  const edges: BdrvChild[] = [];
  for (let n: BlockNode = top; n !== base; ) {
    const c = filterOrCowChild(n);
    if (!c) throw new BlockError('EINVAL', `Bottom node '${base.nodeName}' is not in the backing chain of '${top.nodeName}'`);
    if (c.frozen) throw new BlockError('EPERM', `Cannot freeze '${c.name}' link to '${c.bs.nodeName}': it is already frozen`);
    edges.push(c);
    n = c.bs;
  }
  for (const c of edges) c.frozen = true;
  return edges;
}

/** The copy-on-read filter driver (QEMU's bdrv_copy_on_read). */
export const copyOnReadDriver: BlockDriver = {
  name: 'copy-on-read',
  kind: 'filter',
  hasVariableLength: true,
  runtimeOptions: [
    { name: 'bottom', type: 'string', help: 'Name of a non-filter node below which nothing is copied (inclusive limit)' },
  ],

  async open(bs, options) {
    const state: CorState = { bottom: null, frozen: [] };
    bs.opaque = state;
    const spec = (options.file ?? bs.options.file) as BlockdevOptions | string | undefined;
    const child = (await bs.graph.openChild(bs, spec, 'file', ROLE.FILTERED | ROLE.PRIMARY))!;
    bs.supportedWriteFlags = REQ.WRITE_UNCHANGED | (REQ.FUA & child.bs.supportedWriteFlags);
    bs.supportedZeroFlags = REQ.WRITE_UNCHANGED | ((REQ.FUA | REQ.MAY_UNMAP | REQ.NO_FALLBACK) & child.bs.supportedZeroFlags);

    const bottomName = options.bottom;
    if (bottomName !== undefined) {
      if (typeof bottomName !== 'string') throw new BlockError('EINVAL', "Parameter 'bottom' expects a string");
      const bottom = bs.graph.findNode(bottomName);
      if (!bottom) throw new BlockError('EINVAL', `Bottom node '${bottomName}' not found`);
      if (bottom.drv.kind === 'filter') throw new BlockError('EINVAL', `Bottom node '${bottomName}' is a filter`);
      state.frozen = freezeChain(bs, bottom);
      // The chain is frozen, but holding a reference keeps the pointer honest (QEMU does the same).
      bottom.refcnt++;
      state.bottom = bottom;
    }
  },

  async close(bs) {
    const state = bs.opaque as CorState | undefined;
    if (!state) return;
    for (const c of state.frozen) c.frozen = false;
    state.frozen = [];
    const bottom = state.bottom;
    state.bottom = null;
    if (bottom) await bs.graph.unref(bottom);
  },

  childPerm(bs, _child, _role, perm, shared) {
    const p = perm & PASSTHROUGH;
    const s = (shared & PASSTHROUGH) | UNCHANGED;
    // An inactive node's child cannot grant write access, so none is asked for.
    return { perm: bs.openFlags & OPEN.INACTIVE ? p : p | PERM.WRITE_UNCHANGED, shared: s };
  },

  async getLength(bs) {
    return bdrvGetLength(bs.file!.bs);
  },

  async preadv(bs, offset, bytes, buf, flags, signal) {
    const { bottom } = corState(bs);
    const file = bs.file!;
    if (bottom && skipFilters(file.bs) === bottom) {
      // Everything copyable already lives in the image itself.
      await bdrvPreadv(file, offset, bytes, buf, flags, signal);
      return;
    }
    if (!bottom) {
      await bdrvPreadv(file, offset, bytes, buf, flags | REQ.COPY_ON_READ, signal);
      return;
    }
    let done = 0;
    while (done < bytes) {
      const off = offset + done;
      let n = bytes - done;
      let localFlags = flags;
      // On errors, copy anyway: a spurious copy is harmless, a missed one is not.
      let allocated = false;
      try {
        const r = await bdrvIsAllocated(file.bs, off, n);
        allocated = r.allocated;
        n = r.pnum;
      } catch {
        allocated = false;
      }
      if (!allocated) {
        const below = backingChainNext(file.bs);
        let copy = true;
        if (below) {
          try {
            const r = await bdrvIsAllocatedAbove(below, bottom, true, off, n);
            copy = r.depth > 0;
            n = r.pnum;
          } catch {
            copy = true;
          }
        }
        if (copy) localFlags |= REQ.COPY_ON_READ;
        if (n === 0) {
          // Past the end of the chain's data (QEMU stops early here); read the rest plainly so it is filled.
          n = bytes - done;
          localFlags = flags;
        }
      }
      const skip = (localFlags & (REQ.PREFETCH | REQ.COPY_ON_READ)) === REQ.PREFETCH;
      if (!skip) await bdrvPreadv(file, off, n, buf.subarray(done, done + n), localFlags, signal);
      done += n;
    }
  },

  async pwritev(bs, offset, bytes, buf, flags, signal) {
    await bdrvPwritev(bs.file!, offset, bytes, buf, flags, signal);
  },

  async pwriteZeroes(bs, offset, bytes, flags) {
    await bdrvPwriteZeroes(bs.file!, offset, bytes, flags);
  },

  async pdiscard(bs, offset, bytes) {
    await bdrvPdiscard(bs.file!, offset, bytes);
  },

  async pwritevCompressed(bs, offset, bytes, buf) {
    await bdrvPwriteCompressed(bs.file!, offset, buf.subarray(0, bytes));
  },
};
