/**
 * BdrvChild edges and the permission system (QEMU's block.c permission code):
 * every edge takes permissions on its child node and shares some with the
 * other users; a change is computed for the whole graph below it, checked, and
 * only then applied, so a failed change leaves every edge as it was.
 */
import { BlockError } from './errors.ts';
import type { BlockNode } from './node.ts';
import { OPEN, PERM, PERM_NAMES, ROLE } from './types.ts';

/** Who holds an edge: a node, a BlockBackend or a job. */
export interface ChildParent {
  readonly kind: 'node' | 'backend' | 'job';
  /** Node name, backend name ('' when anonymous) or job id. */
  readonly name: string;
  /** The parent node when kind === 'node'. */
  readonly node?: BlockNode;
  /** How QEMU names this user in errors ("node 'x'", "block device 'y'", "a block device"). */
  description(): string;
  /** The child's node entered a drained section: stop issuing requests. */
  drainedBegin?(): void;
  drainedEnd?(): void;
  /** The child's length changed. */
  resized?(): void;
}

/** One edge of the graph (QEMU's BdrvChild). */
export class BdrvChild {
  /** Frozen edges cannot be removed or replaced (QEMU's frozen flag during jobs). */
  frozen = false;

  constructor(
    /** Edge name: 'file', 'backing', 'data-file', 'root', 'image'… */
    readonly name: string,
    public bs: BlockNode,
    readonly parent: ChildParent,
    /** ROLE.* bits. */
    readonly role: number,
    public perm: number,
    public sharedPerm: number,
  ) {}
}

/** Parent adapter for a node's own children. */
export function nodeParent(node: BlockNode): ChildParent {
  return {
    kind: 'node',
    get name() { return node.nodeName; },
    node,
    description: () => `node '${node.nodeName}'`,
  };
}

/** QEMU's bdrv_perm_names: comma-separated names of the bits in `perm`. */
export function permNames(perm: number): string {
  return PERM_NAMES.filter(([bit]) => perm & bit).map(([, n]) => n).join(', ');
}

const PASSTHROUGH = PERM.CONSISTENT_READ | PERM.WRITE | PERM.WRITE_UNCHANGED | PERM.RESIZE;
const UNCHANGED = PERM.ALL & ~PASSTHROUGH;

/** Permissions a filter takes on its filtered child: exactly what its parents take (QEMU's bdrv_filter_default_perms). */
export function filterDefaultPerms(perm: number, shared: number): { perm: number; shared: number } {
  return { perm: perm & PASSTHROUGH, shared: (shared & PASSTHROUGH) | UNCHANGED };
}

/**
 * QEMU's bdrv_default_perms: filters pass through, backing (COW) children are
 * read consistently and shared, storage children (file, data-file) add the
 * metadata writes a format needs and forbid others to write or resize under it.
 */
export function defaultChildPerms(bs: BlockNode, role: number, perm: number, shared: number, writable: boolean): { perm: number; shared: number } {
  if (role & ROLE.FILTERED) return filterDefaultPerms(perm, shared);
  if (role & ROLE.COW) {
    const p = perm & PERM.CONSISTENT_READ;
    let s = shared & PERM.WRITE ? PERM.WRITE | PERM.RESIZE : 0;
    s |= PERM.CONSISTENT_READ | PERM.WRITE_UNCHANGED | PERM.GRAPH_MOD;
    return { perm: p, shared: s };
  }
  let { perm: p, shared: s } = filterDefaultPerms(perm, shared);
  if (role & ROLE.METADATA) {
    if (writable) p |= PERM.WRITE | PERM.RESIZE;
    if (!(bs.openFlags & OPEN.NO_IO)) p |= PERM.CONSISTENT_READ;
    s &= ~(PERM.WRITE | PERM.RESIZE);
  }
  if (role & ROLE.DATA) {
    s &= ~PERM.RESIZE;
    if (p & PERM.WRITE_UNCHANGED) p |= PERM.WRITE;
    if (p & PERM.WRITE) p |= PERM.RESIZE;
  }
  if (bs.openFlags & OPEN.INACTIVE) s |= PERM.WRITE | PERM.RESIZE;
  return { perm: p, shared: s };
}

type PermPair = { perm: number; shared: number };

/**
 * A proposed permission change: new values for some edges and, optionally, a
 * node's read-only state (for reopen). `apply()` checks the whole graph
 * below and commits only if everything holds.
 */
export class PermUpdate {
  private readonly edgePerms = new Map<BdrvChild, PermPair>();
  private readonly readOnly = new Map<BlockNode, boolean>();
  /** Edges considered absent (being detached). */
  private readonly removed = new Set<BdrvChild>();
  /** Edges considered present (being attached) though not yet in bs.parents. */
  private readonly added = new Set<BdrvChild>();

  /** Proposes new permissions for an edge. */
  setEdge(c: BdrvChild, perm: number, shared: number): this {
    this.edgePerms.set(c, { perm, shared });
    return this;
  }

  /** Treats `c` as newly attached to c.bs. */
  addEdge(c: BdrvChild): this {
    this.added.add(c);
    this.edgePerms.set(c, { perm: c.perm, shared: c.sharedPerm });
    return this;
  }

  /** Treats `c` as detached from c.bs. */
  removeEdge(c: BdrvChild): this {
    this.removed.add(c);
    return this;
  }

  /** Proposes a node's read-only state. */
  setReadOnly(bs: BlockNode, ro: boolean): this {
    this.readOnly.set(bs, ro);
    return this;
  }

  private edge(c: BdrvChild): PermPair {
    return this.edgePerms.get(c) ?? { perm: c.perm, shared: c.sharedPerm };
  }

  private parentsOf(bs: BlockNode): BdrvChild[] {
    const out = bs.parents.filter((p) => !this.removed.has(p));
    for (const a of this.added) if (a.bs === bs && !out.includes(a)) out.push(a);
    return out;
  }

  private isReadOnly(bs: BlockNode): boolean {
    return this.readOnly.get(bs) ?? bs.readOnly;
  }

  /** Cumulative permissions taken on `bs` and shared by all its users under this update. */
  cumulative(bs: BlockNode): PermPair {
    let perm = 0;
    let shared = PERM.ALL;
    for (const p of this.parentsOf(bs)) {
      const e = this.edge(p);
      perm |= e.perm;
      shared &= e.shared;
    }
    return { perm, shared };
  }

  /** Checks the graph below every touched node and commits; throws EPERM with QEMU's message on conflict. */
  apply(): void {
    const queue: BlockNode[] = [];
    const seen = new Set<BlockNode>();
    const push = (bs: BlockNode): void => {
      if (!seen.has(bs)) { seen.add(bs); queue.push(bs); }
    };
    for (const c of this.edgePerms.keys()) push(c.bs);
    for (const c of this.removed) push(c.bs);
    for (const bs of this.readOnly.keys()) push(bs);
    let guard = 0;
    while (queue.length > 0) {
      if (++guard > 100000) throw new BlockError('EINVAL', 'Permission update did not converge');
      const bs = queue.shift()!;
      seen.delete(bs);
      this.checkNode(bs);
      const { perm, shared } = this.cumulative(bs);
      for (const c of bs.children) {
        if (this.removed.has(c)) continue;
        const want = childPermsFor(bs, c, perm, shared, !this.isReadOnly(bs));
        const cur = this.edge(c);
        if (want.perm !== cur.perm || want.shared !== cur.shared || this.added.has(c)) {
          this.edgePerms.set(c, want);
          push(c.bs);
        }
      }
    }
    for (const [c, e] of this.edgePerms) {
      c.perm = e.perm;
      c.sharedPerm = e.shared;
    }
  }

  private checkNode(bs: BlockNode): void {
    const parents = this.parentsOf(bs);
    const { perm } = this.cumulative(bs);
    if (perm & (PERM.WRITE | PERM.WRITE_UNCHANGED) && this.isReadOnly(bs)) {
      if (bs.readOnly) throw new BlockError('EPERM', 'Block node is read-only', { node: bs.nodeName });
      throw new BlockError('EPERM', 'Cannot make block node read-only, there is a writer on it', { node: bs.nodeName });
    }
    for (const a of parents) {
      for (const b of parents) {
        if (a === b) continue;
        const ea = this.edge(a);
        const eb = this.edge(b);
        const missing = eb.perm & ~ea.shared;
        if (missing) {
          const n = bs.nodeName;
          throw new BlockError(
            'EPERM',
            `Permission conflict on node '${n}': permissions '${permNames(missing)}' are both required by ` +
              `${b.parent.description()} (uses node '${n}' as '${b.name}' child) and unshared by ` +
              `${a.parent.description()} (uses node '${n}' as '${a.name}' child).`,
            { node: n },
          );
        }
      }
    }
  }
}

/** Permissions node `bs` needs on child edge `c`, given what its own users take and share. */
export function childPermsFor(bs: BlockNode, c: BdrvChild, perm: number, shared: number, writable: boolean): PermPair {
  const r = bs.drv.childPerm
    ? bs.drv.childPerm(bs, c, c.role, perm, shared)
    : defaultChildPerms(bs, c.role, perm, shared, writable);
  if (c.bs.options['force-share'] === true) r.shared = PERM.ALL;
  return r;
}

/** Recomputes the permissions of every edge below `bs` from its current users (after open or reopen). */
export function refreshPerms(bs: BlockNode): void {
  const u = new PermUpdate();
  for (const c of bs.children) {
    const { perm, shared } = u.cumulative(bs);
    const want = childPermsFor(bs, c, perm, shared, !bs.readOnly);
    u.setEdge(c, want.perm, want.shared);
  }
  u.apply();
}
