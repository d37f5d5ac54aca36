/**
 * The implicit-open gate the command-line tools use. qemu-img and qemu-io
 * open whatever backing file an image names, resolved against the image's
 * directory (QEMU's path_combine); a local user running a tool on their own
 * images is trusted the way QEMU trusts them. Browser front ends keep the
 * graph's deny-all default or their own gate.
 */
import type { ImplicitOpenGate, ImplicitOpenRequest } from '../graph.ts';
import { pathHasProtocol } from '../graph.ts';
import type { BlockdevOptions } from '../types.ts';

/** QEMU's path_combine: `name` relative to the directory of `base`, unless absolute or protocol-prefixed. */
export function pathCombine(base: string, name: string): string {
  if (name.startsWith('/') || pathHasProtocol(name) || name.startsWith('json:')) return name;
  const slash = base.lastIndexOf('/');
  if (slash < 0) return name;
  return base.slice(0, slash + 1) + name;
}

/** A gate that opens backing and data files the way QEMU's tools do. */
export const toolGate: ImplicitOpenGate = {
  resolve(req: ImplicitOpenRequest): BlockdevOptions {
    return { filename: pathCombine(req.parent.filename, req.name) };
  },
};
