/**
 * The implicit-open gate for Node: names found inside images (backing files,
 * external data files) are opened only as plain file names, resolved against
 * the directory of the image that names them, the way QEMU resolves relative
 * backing file names. Protocol prefixes and json: specs are refused by
 * checkPlainName before anything is resolved.
 */
import { dirname, isAbsolute, join } from 'node:path';
import { checkPlainName, type ImplicitOpenGate, type ImplicitOpenRequest } from '../core/graph.ts';
import { BlockError } from '../core/errors.ts';
import type { BlockdevOptions } from '../core/types.ts';

/** Options for nodeFileGate. */
export interface NodeFileGateOptions {
  /** Refuse absolute names found in images (default: allowed, as QEMU does). */
  relativeOnly?: boolean;
  /** Protocol driver to open the resolved name with (default: the graph's default protocol). */
  driver?: string;
}

/** The file name of the image making the request, even while it is still being opened. */
function parentFilename(req: ImplicitOpenRequest): string {
  return req.parent.filename || req.parent.file?.bs.filename || '';
}

/** Resolves a plain name from an image against that image's directory (QEMU's path_combine for plain paths). */
export function resolveImageRelative(parent: string, name: string): string {
  if (isAbsolute(name) || parent === '') return name;
  return join(dirname(parent), name);
}

/**
 * A gate that opens plain names relative to the naming image with the
 * Node file protocol, and refuses protocol prefixes, json: specs and NUL bytes.
 */
export function nodeFileGate(opts: NodeFileGateOptions = {}): ImplicitOpenGate {
  return {
    resolve(req: ImplicitOpenRequest): BlockdevOptions {
      checkPlainName(req);
      if (opts.relativeOnly && isAbsolute(req.name)) {
        throw new BlockError('EACCES', `Refusing to open ${req.kind === 'backing' ? 'backing file' : 'data file'} '${req.name}': absolute names are not allowed inside images`);
      }
      return { driver: opts.driver ?? req.parent.graph.defaultProtocol, filename: resolveImageRelative(parentFilename(req), req.name) };
    },
  };
}
