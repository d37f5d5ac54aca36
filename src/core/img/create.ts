/**
 * Image creation as QEMU's bdrv_img_create does it: the format's and the
 * protocol's create options merged into one list, `-o` text parsed against
 * it with QemuOpts rules, the size taken from the command line, the options
 * or the backing file, the "Formatting …" line printed from the merged list
 * (set values, else defaults, in the drivers' declaration order), and then
 * the format driver's create() with a context that reaches storage.
 */
import { HintedError } from '../errors.ts';
export { HintedError };
import type { BlockDriver, CreateContext, ProgressFn } from '../driver.ts';
import { BlockError, toBlockError } from '../errors.ts';
import { pathHasProtocol, type Graph } from '../graph.ts';
import type { BlockNode } from '../node.ts';
import { parseOptionValue, type CreateOptions, type OptionSpec, type OptionValue } from '../options.ts';
import { OPEN } from '../types.ts';
import { pathCombine } from './gate.ts';

/** One parsed `-o` option: the text as given and its typed value. */
interface SetOption {
  text: string;
  value: OptionValue;
}

/** A QemuOpts-like set of create options over a merged description list. */
export class CreateOptionSet {
  readonly specs: readonly OptionSpec[];
  private readonly values = new Map<string, SetOption>();

  /** Merges `lists` in order, the first description of a name winning (QEMU's qemu_opts_append). */
  constructor(...lists: Array<readonly OptionSpec[] | undefined>) {
    const seen = new Set<string>();
    const specs: OptionSpec[] = [];
    for (const l of lists) {
      for (const s of l ?? []) {
        if (seen.has(s.name)) continue;
        seen.add(s.name);
        specs.push(s);
      }
    }
    this.specs = specs;
  }

  /** The description of `name`, if the list has it. */
  spec(name: string): OptionSpec | undefined {
    return this.specs.find((s) => s.name === name);
  }

  /** Sets an option from text, validating it by type (QEMU's qemu_opt_set); throws EINVAL with QEMU's messages. */
  set(name: string, text: string): void {
    const spec = this.spec(name);
    if (!spec) throw new BlockError('EINVAL', `Invalid parameter '${name}'`);
    this.values.set(name, { text, value: parseOptionValue(spec, text) });
  }

  /** Sets a number-valued option (QEMU's qemu_opt_set_number). */
  setNumber(name: string, n: number): void {
    if (!this.spec(name)) throw new BlockError('EINVAL', `Invalid parameter '${name}'`);
    this.values.set(name, { text: String(n), value: n });
  }

  /** True when `name` was set explicitly. */
  has(name: string): boolean {
    return this.values.has(name);
  }

  /** The typed value of an explicitly set option. */
  get(name: string): OptionValue | undefined {
    return this.values.get(name)?.value;
  }

  /** Parses `a=1,b=2` text (QEMU's qemu_opts_do_parse without an implied key; `,,` escapes a comma in values). */
  parse(text: string): void {
    for (const [k, v] of splitOpts(text)) this.set(k, v);
  }

  /** The explicitly set options, typed, for a driver's create(). */
  toCreateOptions(): CreateOptions {
    const out: CreateOptions = {};
    for (const [k, v] of this.values) out[k] = v.value;
    return out;
  }

  /**
   * QEMU's qemu_opts_print(opts, " "): every option that is set or has a
   * default, in declaration order; sizes and numbers that were set print as
   * decimal integers, everything else as written.
   */
  print(): string {
    const parts: string[] = [];
    for (const s of this.specs) {
      const v = this.values.get(s.name);
      if (v) {
        if ((s.type === 'size' || s.type === 'number') && typeof v.value === 'number') parts.push(`${s.name}=${v.value}`);
        else parts.push(`${s.name}=${v.text}`);
      } else if (s.defaultValue !== undefined) {
        parts.push(`${s.name}=${s.defaultValue}`);
      }
    }
    return parts.join(' ');
  }
}

/** Splits QemuOpts text into name/value pairs; names end at '=' or ',', values honour ',,'. */
export function splitOpts(text: string): Array<[string, string]> {
  const out: Array<[string, string]> = [];
  let i = 0;
  while (i < text.length) {
    let name = '';
    while (i < text.length && text[i] !== '=' && text[i] !== ',') name += text[i++];
    let value = 'on';
    if (text[i] === '=') {
      i++;
      value = '';
      while (i < text.length) {
        if (text[i] === ',') {
          if (text[i + 1] !== ',') break;
          i++;
        }
        value += text[i++];
      }
    }
    out.push([name, value]);
    if (text[i] === ',') i++;
  }
  return out;
}

/** QEMU's is_valid_option_list: non-empty and not ending in an unescaped comma. */
export function isValidOptionList(text: string): boolean {
  if (text === '') return false;
  let commas = 0;
  for (let i = text.length - 1; i >= 0 && text[i] === ','; i--) commas++;
  return commas % 2 === 0;
}

/** True when the option text asks for help (`help` or `?` as an option name). */
export function hasHelpOption(text: string): boolean {
  return splitOpts(text).some(([k, v]) => (k === 'help' || k === '?') && v === 'on');
}

/** QEMU's qemu_opts_print_help: one sorted line per option, with the type and help text. */
export function optionHelpLines(specs: readonly OptionSpec[]): string[] {
  const typeName = (t: OptionSpec['type']): string => (t === 'bool' ? 'bool (on/off)' : t === 'size' ? 'size' : t === 'number' ? 'num' : 'str');
  const lines = specs.map((s) => {
    let line = `  ${s.name}=<${typeName(s.type)}>`;
    if (s.help) {
      if (line.length < 24) line += ' '.repeat(24 - line.length);
      line += ` - ${s.help}`;
    }
    return line;
  });
  return lines.sort((a, b) => (a < b ? -1 : a > b ? 1 : 0));
}

/** The protocol driver a filename selects (QEMU's bdrv_find_protocol with the graph's default for plain names). */
export function findProtocolFor(graph: Graph, filename: string): BlockDriver {
  if (pathHasProtocol(filename)) {
    const prefix = filename.slice(0, filename.indexOf(':'));
    const d = graph.findProtocol(prefix);
    if (!d) throw new BlockError('EINVAL', `Unknown protocol '${prefix}'`);
    return d;
  }
  return graph.getDriver(graph.defaultProtocol);
}

/**
 * `qemu-img create -o help` (QEMU's print_block_option_help): the format's
 * options, plus the protocol's when a filename is known.
 */
export function createOptionHelp(graph: Graph, fmt: string, filename?: string): string {
  const drv = graph.drivers.get(fmt);
  if (!drv) throw new BlockError('EINVAL', `Unknown file format '${fmt}'`);
  if (!drv.createOptions) throw new BlockError('ENOTSUP', `Format driver '${fmt}' does not support image creation`);
  let specs: OptionSpec[] = [...drv.createOptions];
  if (filename !== undefined) {
    const proto = findProtocolFor(graph, filename);
    if (!proto.createOptions) throw new BlockError('ENOTSUP', `Protocol driver '${proto.name}' does not support image creation`);
    specs = [...new CreateOptionSet(drv.createOptions, proto.createOptions).specs];
  }
  let out = filename !== undefined ? 'Supported options:\n' : `Supported ${fmt} options:\n`;
  for (const l of optionHelpLines(specs)) out += `${l}\n`;
  if (filename === undefined) out += '\nThe protocol level may support further options.\nSpecify the target filename to include those options.\n';
  return out;
}

/** A CreateContext over a graph: protocol-level create and open, and read-only opens of existing images. */
export function createContext(graph: Graph): CreateContext {
  const ctx: CreateContext = {
    async createAndOpenFile(filename: string, opts: CreateOptions = {}): Promise<BlockNode> {
      const proto = findProtocolFor(graph, filename);
      if (!proto.create || !proto.createOptions) throw new BlockError('ENOTSUP', `Protocol driver '${proto.name}' does not support image creation`);
      // The protocol sees only its own options (QEMU's qemu_opts_to_qdict_filtered).
      const mine: CreateOptions = {};
      for (const s of proto.createOptions) if (opts[s.name] !== undefined) mine[s.name] = opts[s.name];
      await proto.create(filename, mine, ctx);
      return graph.openProtocol(filename, OPEN.RDWR, {});
    },
    async openImage(filename: string, format?: string): Promise<BlockNode> {
      return graph.openImage(filename, { format, readOnly: true, options: { 'force-share': true } });
    },
    async close(bs: BlockNode): Promise<void> {
      await graph.unref(bs);
    },
  };
  return ctx;
}

/** What to create. */
export interface ImgCreateRequest {
  filename: string;
  /** Format driver name (qemu-img's default is raw). */
  fmt: string;
  /** Backing file (-b) and its format (-F). */
  backingFile?: string;
  backingFmt?: string;
  /** Accumulated `-o` text. */
  options?: string;
  /** Size from the command line; undefined when not given. */
  size?: number;
  /** Do not open the backing file (-u). */
  noBacking?: boolean;
  /** Receives the "Formatting …" line (without newline) unless quiet. */
  onFormatting?: (line: string) => void;
  progress?: ProgressFn;
}

/**
 * QEMU's bdrv_img_create. Errors carry QEMU's messages; those with a hint
 * ("Could not open backing image.") are HintedErrors.
 */
export async function imgCreate(graph: Graph, req: ImgCreateRequest): Promise<void> {
  const drv = graph.drivers.get(req.fmt);
  if (!drv) throw new BlockError('EINVAL', `Unknown file format '${req.fmt}'`);
  const proto = findProtocolFor(graph, req.filename);
  if (!drv.createOptions || !drv.create) throw new BlockError('ENOTSUP', `Format driver '${drv.name}' does not support image creation`);
  if (!proto.createOptions || !proto.create) throw new BlockError('ENOTSUP', `Protocol driver '${proto.name}' does not support image creation`);
  const opts = new CreateOptionSet(drv.createOptions, proto.createOptions);
  if (req.options !== undefined) opts.parse(req.options);
  if (!opts.has('size')) {
    if (req.size !== undefined) opts.setNumber('size', req.size);
  } else if (req.size !== undefined) {
    throw new BlockError('EINVAL', 'The image size must be specified only once');
  }
  if (req.backingFile !== undefined) {
    if (!opts.spec('backing_file')) throw new BlockError('ENOTSUP', `Backing file not supported for file format '${req.fmt}'`);
    opts.set('backing_file', req.backingFile);
  }
  if (req.backingFmt !== undefined) {
    if (!opts.spec('backing_fmt')) throw new BlockError('ENOTSUP', `Backing file format not supported for file format '${req.fmt}'`);
    opts.set('backing_fmt', req.backingFmt);
  }
  const backing = opts.get('backing_file') as string | undefined;
  if (backing !== undefined) {
    if (backing === req.filename) throw new BlockError('EINVAL', 'Error: Trying to create an image with the same filename as the backing file');
    if (backing === '') throw new BlockError('EINVAL', 'Expected backing file name, got empty string');
  }
  const backingFmt = opts.get('backing_fmt') as string | undefined;
  let size = opts.get('size') as number | undefined;
  if (backing !== undefined && !req.noBacking) {
    const full = pathCombine(req.filename, backing);
    let bs: BlockNode;
    try {
      bs = await graph.openImage(full, { format: backingFmt, readOnly: true, options: { 'force-share': true } });
    } catch (e) {
      const be = toBlockError(e);
      throw new HintedError(be.code, be.message, 'Could not open backing image.\n', e);
    }
    try {
      if (backingFmt === undefined) {
        throw new HintedError('EINVAL', 'Backing file specified without backing format', `Detected format of ${bs.drv.name}.`);
      }
      if (size === undefined) {
        size = bs.totalBytes;
        opts.setNumber('size', size);
      }
    } finally {
      await graph.unref(bs);
    }
  } else if (backing !== undefined && backingFmt === undefined) {
    throw new BlockError('EINVAL', 'Backing file specified without backing format');
  }
  if (size === undefined) throw new BlockError('EINVAL', 'Image creation needs a size parameter');
  req.onFormatting?.(`Formatting '${req.filename}', fmt=${req.fmt} ${opts.print()}`);
  try {
    await drv.create(req.filename, opts.toCreateOptions(), createContext(graph), req.progress);
  } catch (e) {
    const be = toBlockError(e);
    if (be.code === 'EFBIG') {
      const hint = opts.spec('cluster_size') && opts.get('cluster_size') ? ' (try using a larger cluster size)' : '';
      throw new BlockError('EFBIG', `The image size is too large for file format '${req.fmt}'${hint}`, { cause: e });
    }
    throw be;
  }
}
