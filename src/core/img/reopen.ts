/**
 * Reopening a backend's image with new options, as qemu-io's `reopen` does:
 * the backend gives up its write permission before a switch to read-only
 * (otherwise its own writer would block the switch), options a driver does
 * not know are refused with QEMU's "Cannot change the option" message, and
 * the cache mode's write-cache half is applied to the backend afterwards.
 */
import type { BlockBackend } from '../block-backend.ts';
import { BlockError } from '../errors.ts';
import { PERM } from '../types.ts';
import { parseCacheMode } from './open.ts';

/** What to change. */
export interface ReopenRequest {
  /** true = read-only, false = read-write, undefined = unchanged. */
  readOnly?: boolean;
  /** Driver options to change (values as text or typed). */
  options?: Record<string, unknown>;
  /** Cache mode name. */
  cache?: string;
}

/** Options every node has; reopening may only restate their current value. */
const FIXED_KEYS = new Set(['driver', 'node-name', 'file', 'backing', 'data-file']);

/** Reopens the backend's root node (QEMU's bdrv_reopen_multiple for one node) and applies the write-cache setting. */
export async function reopenBackend(blk: BlockBackend, req: ReopenRequest): Promise<void> {
  const bs = blk.bs;
  if (!bs) throw new BlockError('ENOMEDIUM', 'No medium inserted');
  let writethrough: boolean | undefined;
  if (req.cache !== undefined) {
    const c = parseCacheMode(req.cache);
    if (!c) throw new BlockError('EINVAL', `Invalid cache option: ${req.cache}`);
    writethrough = c.writethrough;
  }
  const known = new Set((bs.drv.runtimeOptions ?? []).map((o) => o.name));
  const options: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(req.options ?? {})) {
    if (FIXED_KEYS.has(k)) {
      if (String(bs.options[k] ?? '') !== String(v)) throw new BlockError('EINVAL', `Cannot change the option '${k}'`);
      continue;
    }
    if (k === 'read-only' || k === 'auto-read-only' || k === 'force-share' || k === 'detect-zeroes' || k === 'discard') {
      if (String(bs.options[k] ?? '') !== String(v)) throw new BlockError('EINVAL', `Cannot change the option '${k}'`);
      continue;
    }
    if (!known.has(k)) throw new BlockError('EINVAL', `Cannot change the option '${k}'`);
    options[k] = v;
  }
  const readOnly = req.readOnly ?? bs.readOnly;
  if (readOnly && !bs.readOnly) {
    const { perm, sharedPerm } = blk.getPerm();
    blk.setPerm(perm & ~(PERM.WRITE | PERM.WRITE_UNCHANGED), sharedPerm);
  }
  await blk.drain();
  await bs.graph.reopen(bs, { readOnly, options });
  if (writethrough !== undefined) blk.setEnableWriteCache(!writethrough);
}
