/**
 * qblock-img: a drop-in counterpart of qemu-img. This file parses qemu-img's
 * command lines and prints what qemu-img prints; the work itself is done by
 * the engine operations in src/core/img, which the browser can call too.
 */
import type { BlockBackend } from '../core/block-backend.ts';
import { STRERROR, toBlockError } from '../core/errors.ts';
import type { Graph } from '../core/graph.ts';
import { mapImage, type MapEntry } from '../core/map.ts';
import { amendImage } from '../core/img/amend.ts';
import { runBench, type BenchParams } from '../core/img/bench.ts';
import { convertCheckBitmaps, convertCopyBitmaps, runBitmapActions, type BitmapAction } from '../core/img/bitmap.ts';
import { commitImage, rebaseImage } from '../core/img/chain.ts';
import { checkImage, type CheckRepair, type ImageCheck } from '../core/img/check.ts';
import { compareImages, CompareError } from '../core/img/compare.ts';
import { convertCopy, ConvertError, MAX_BUF_SECTORS, MAX_COROUTINES, sourceGeometry } from '../core/img/convert.ts';
import { CreateOptionSet, HintedError, createContext, createOptionHelp, findProtocolFor, hasHelpOption, imgCreate, isValidOptionList, optionHelpLines } from '../core/img/create.ts';
import { ddCopy, ddOutputSize, type DdParams } from '../core/img/dd.ts';
import { queryImageInfo, type ImageInfo } from '../core/img/info.ts';
import { measureImage, MeasureOptionsError } from '../core/img/measure.ts';
import { AIO_MODES, openBackend, parseCacheMode, type ImageOpenSpec } from '../core/img/open.ts';
import { resizeImage, SHRINK_WARNING, ShrinkRefused } from '../core/img/resize.ts';
import { applySnapshot, createSnapshot, deleteSnapshot, listSnapshots, loadSnapshotTmp, loadSnapshotTmpByIdOrName } from '../core/img/snapshot.ts';
import type { BlockNode } from '../core/node.ts';
import { PREALLOC_MODES, type PreallocMode } from '../core/types.ts';
import { asQDict, dumpQObject, fmtFixed, jsonPretty, sizeToStr, altHex, type JsonValue } from './format.ts';
import { checkObjectOption, parseTraceOption } from './common.ts';
import { objectHelp } from './objects.ts';
import { Getopt, type LongOption } from './getopt.ts';
import { QemuProgress } from './progress.ts';
import { defaultGraph, type CliIO } from './runtime.ts';
import { INT64_MAX, qemuStrtosz, strtol } from './strtosz.ts';

const PROG = 'qblock-img';
/** The version banner. */
export const QBLOCK_IMG_VERSION = `${PROG} version 0.1.0 (compatible with qemu-img 7.2)\n`;

/** Unwinds to the exit status (QEMU's exit() calls). */
class Exit extends Error {
  constructor(readonly code: number) {
    super(`exit ${code}`);
  }
}

/** Shared state of one invocation. */
class Img {
  /** Ids of --object definitions seen so far. */
  readonly objects = new Set<string>();

  constructor(readonly io: CliIO, readonly graph: Graph) {}

  out(s: string): void {
    this.io.stdout(s);
  }

  /** qprintf: stdout unless quiet. */
  q(quiet: boolean, s: string): void {
    if (!quiet) this.io.stdout(s);
  }

  /** error_report. */
  report(msg: string): void {
    this.io.stderr(`${PROG}: ${msg}\n`);
  }

  /** error_exit: message, the --help hint, status 1. */
  errorExit(msg: string): never {
    this.io.stderr(`${PROG}: ${msg}\nTry '${PROG} --help' for more information\n`);
    throw new Exit(1);
  }

  fail(msg: string, code = 1): never {
    this.report(msg);
    throw new Exit(code);
  }
}

/** What a subcommand's option loop yields. */
interface Parsed {
  opts: Array<{ opt: string | number; arg?: string }>;
  rest: string[];
}

/** A subcommand's getopt loop with qemu-img's handling of '?', ':' and -h. */
function parse(img: Img, argv: readonly string[], optstring: string, longs: LongOption[]): Parsed {
  const g = new Getopt(argv, `:${optstring}`, [{ name: 'help', hasArg: 0, val: 'h' }, ...longs]);
  const opts: Parsed['opts'] = [];
  for (let o = g.next(); o; o = g.next()) {
    if (o.opt === ':') img.errorExit(`missing argument for option '${g.argv[g.optind - 1]}'`);
    if (o.opt === '?') img.errorExit(`unrecognized option '${g.argv[g.optind - 1]}'`);
    if (o.opt === 'h') {
      help(img);
      throw new Exit(0);
    }
    const e: { opt: string | number; arg?: string } = { opt: o.opt };
    if (o.arg !== undefined) e.arg = o.arg;
    opts.push(e);
  }
  return { opts, rest: g.rest() };
}

const OPTION_OBJECT = 256;
const OPTION_IMAGE_OPTS = 257;
const OPTION_OUTPUT = 258;
const OPTION_BACKING_CHAIN = 259;
const OPTION_SIZE = 260;
const OPTION_PREALLOCATION = 261;
const OPTION_SHRINK = 262;
const OPTION_SALVAGE = 263;
const OPTION_TARGET_IS_ZERO = 264;
const OPTION_TARGET_IMAGE_OPTS = 265;
const OPTION_FLUSH_INTERVAL = 266;
const OPTION_NO_DRAIN = 267;
const OPTION_PATTERN = 268;
const OPTION_FORCE = 269;
const OPTION_START_OFFSET = 270;
const OPTION_MAX_LENGTH = 271;
const OPTION_BITMAPS = 272;
const OPTION_SKIP_BROKEN = 273;
const OPTION_ADD = 274;
const OPTION_REMOVE = 275;
const OPTION_CLEAR = 276;
const OPTION_ENABLE = 277;
const OPTION_DISABLE = 278;
const OPTION_MERGE = 279;

const L = {
  object: { name: 'object', hasArg: 1, val: OPTION_OBJECT } as LongOption,
  imageOpts: { name: 'image-opts', hasArg: 0, val: OPTION_IMAGE_OPTS } as LongOption,
  output: { name: 'output', hasArg: 1, val: OPTION_OUTPUT } as LongOption,
  forceShare: { name: 'force-share', hasArg: 0, val: 'U' } as LongOption,
  format: { name: 'format', hasArg: 1, val: 'f' } as LongOption,
};

/** --object, with qemu-img's exit on error. */
function objectOption(img: Img, arg: string): void {
  const help = objectHelp(arg);
  if (help !== null) {
    img.io.stdout(help);
    throw new Exit(0);
  }
  const err = checkObjectOption(arg, img.objects);
  if (err !== null) img.fail(err);
}

/** -T/--trace. */
function traceOption(img: Img, arg: string): void {
  const t = parseTraceOption(arg);
  for (const w of t.warnings) img.report(w);
  if (t.error !== null) img.fail(t.error);
}

/** qemu-img's cvtnum_full: a size with QEMU's two error styles. */
function cvtnum(img: Img, name: string, value: string, min = 0n, max = INT64_MAX): number {
  const r = qemuStrtosz(value);
  if (!r.ok && r.code !== 'ERANGE') {
    img.report(`Invalid ${name} specified. You may use k, M, G, T, P or E suffixes for`);
    img.report('kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.');
    throw new Exit(1);
  }
  if (!r.ok || r.value > max || r.value < min) img.fail(`Invalid ${name} specified. Must be between ${min} and ${max}.`);
  return Number(r.value);
}

/** --output parsing (QEMU's parse_output_format). */
function outputFormat(img: Img, output: string | undefined): 'human' | 'json' {
  if (output === undefined || output === 'human') return 'human';
  if (output === 'json') return 'json';
  img.fail('--output must be used with human or json as argument.');
}

/** accumulate_options: `-o` lists joined with commas, each validated. */
function accumulate(img: Img, options: string | undefined, arg: string): string {
  if (!isValidOptionList(arg)) img.fail(`Invalid option list: ${arg}`);
  return options === undefined ? arg : `${options},${arg}`;
}

/** img_open: opens an image or an option string; prints "Could not open '…': …" and exits 1 on failure. */
async function imgOpen(img: Img, spec: { imageOpts: boolean; filename: string; fmt?: string; readOnly: boolean; cache?: string; forceShare?: boolean; noBacking?: boolean; unmap?: boolean; resize?: boolean; quiet?: boolean }, exitCode = 1): Promise<BlockBackend> {
  if (spec.imageOpts && spec.fmt !== undefined) img.fail('--image-opts and --format are mutually exclusive', exitCode);
  const o: ImageOpenSpec = {
    // qemu-img parses --image-opts with "file" as the implied name of a leading bare word.
    filename: spec.imageOpts && /^[^=,]+(,|$)/.test(spec.filename) ? `file=${spec.filename}` : spec.filename,
    imageOpts: spec.imageOpts,
    readOnly: spec.readOnly,
    forceShare: spec.forceShare ?? false,
    noBacking: spec.noBacking ?? false,
    unmap: spec.unmap ?? false,
    resize: spec.resize ?? false,
    onWarning: (m) => img.io.stderr(`WARNING: ${m}\n`),
    onOptionWarning: (m) => img.io.stderr(`${PROG}: warning: ${m}\n`),
  };
  if (spec.fmt !== undefined) o.format = spec.fmt;
  if (spec.cache !== undefined) o.cache = spec.cache;
  try {
    return await openBackend(img.graph, o);
  } catch (e) {
    img.report(`Could not open '${spec.filename}': ${toBlockError(e).message}`);
    throw new Exit(exitCode);
  }
}

function strerr(e: unknown): string {
  return STRERROR[toBlockError(e).code];
}

/** error_reportf_err: the message as an error line, then any hint verbatim. */
function reportErr(img: Img, prefix: string, e: unknown): void {
  img.io.stderr(`${PROG}: ${prefix}${toBlockError(e).message}\n`);
  if (e instanceof HintedError) img.io.stderr(e.hint);
}

// ---------------------------------------------------------------------------
// help

const CMD_SYNTAX = [
  'amend [--object objectdef] [--image-opts] [-p] [-q] [-f fmt] [-t cache] [--force] -o options filename',
  'bench [-c count] [-d depth] [-f fmt] [--flush-interval=flush_interval] [-i aio] [-n] [--no-drain] [-o offset] [--pattern=pattern] [-q] [-s buffer_size] [-S step_size] [-t cache] [-w] [-U] filename',
  'bitmap (--merge SOURCE | --add | --remove | --clear | --enable | --disable)... [-b source_file [-F source_fmt]] [-g granularity] [--object objectdef] [--image-opts | -f fmt] filename bitmap',
  'check [--object objectdef] [--image-opts] [-q] [-f fmt] [--output=ofmt] [-r [leaks | all]] [-T src_cache] [-U] filename',
  'commit [--object objectdef] [--image-opts] [-q] [-f fmt] [-t cache] [-b base] [-r rate_limit] [-d] [-p] filename',
  'compare [--object objectdef] [--image-opts] [-f fmt] [-F fmt] [-T src_cache] [-p] [-q] [-s] [-U] filename1 filename2',
  'convert [--object objectdef] [--image-opts] [--target-image-opts] [--target-is-zero] [--bitmaps] [-U] [-C] [-c] [-p] [-q] [-n] [-f fmt] [-t cache] [-T src_cache] [-O output_fmt] [-B backing_file [-F backing_fmt]] [-o options] [-l snapshot_param] [-S sparse_size] [-r rate_limit] [-m num_coroutines] [-W] [--salvage] filename [filename2 [...]] output_filename',
  'create [--object objectdef] [-q] [-f fmt] [-b backing_file [-F backing_fmt]] [-u] [-o options] filename [size]',
  'dd [--image-opts] [-U] [-f fmt] [-O output_fmt] [bs=block_size] [count=blocks] [skip=blocks] if=input of=output',
  'info [--object objectdef] [--image-opts] [-f fmt] [--output=ofmt] [--backing-chain] [-U] filename',
  'map [--object objectdef] [--image-opts] [-f fmt] [--start-offset=offset] [--max-length=len] [--output=ofmt] [-U] filename',
  'measure [--output=ofmt] [-O output_fmt] [-o options] [--size N | [--object objectdef] [--image-opts] [-f fmt] [-l snapshot_param] filename]',
  'snapshot [--object objectdef] [--image-opts] [-U] [-q] [-l | -a snapshot | -c snapshot | -d snapshot] filename',
  'rebase [--object objectdef] [--image-opts] [-U] [-q] [-f fmt] [-t cache] [-T src_cache] [-p] [-u] -b backing_file [-F backing_fmt] filename',
  'resize [--object objectdef] [--image-opts] [-f fmt] [--preallocation=prealloc] [-q] [--shrink] filename [+ | -]size',
];

const HELP_PARAMS = `
Command parameters:
  'filename' is a disk image filename
  'objectdef' is a QEMU user creatable object definition. See the qemu(1)
    manual page for a description of the object properties. The most common
    object type is a 'secret', which is used to supply passwords and/or
    encryption keys.
  'fmt' is the disk image format. It is guessed automatically in most cases
  'cache' is the cache mode used to write the output disk image, the valid
    options are: 'none', 'writeback' (default, except for convert), 'writethrough',
    'directsync' and 'unsafe' (default for convert)
  'src_cache' is the cache mode used to read input disk images, the valid
    options are the same as for the 'cache' option
  'size' is the disk image size in bytes. Optional suffixes
    'k' or 'K' (kilobyte, 1024), 'M' (megabyte, 1024k), 'G' (gigabyte, 1024M),
    'T' (terabyte, 1024G), 'P' (petabyte, 1024T) and 'E' (exabyte, 1024P)  are
    supported. 'b' is ignored.
  'output_filename' is the destination disk image filename
  'output_fmt' is the destination format
  'options' is a comma separated list of format specific options in a
    name=value format. Use -o help for an overview of the options supported by
    the used format
  'snapshot_param' is param used for internal snapshot, format
    is 'snapshot.id=[ID],snapshot.name=[NAME]', or
    '[ID_OR_NAME]'
  '-c' indicates that target image must be compressed (qcow format only)
  '-u' allows unsafe backing chains. For rebasing, it is assumed that old and
       new backing file match exactly. The image doesn't need a working
       backing file before rebasing in this case (useful for renaming the
       backing file). For image creation, allow creating without attempting
       to open the backing file.
  '-h' with or without a command shows this help and lists the supported formats
  '-p' show progress of command (only certain commands)
  '-q' use Quiet mode - do not print any output (except errors)
  '-S' indicates the consecutive number of bytes (defaults to 4k) that must
       contain only zeros for ${PROG} to create a sparse image during
       conversion. If the number of bytes is 0, the source will not be scanned for
       unallocated or zero sectors, and the destination image will always be
       fully allocated
  '--output' takes the format in which the output must be done (human or json)
  '-n' skips the target volume creation (useful if the volume is created
       prior to running ${PROG})

Parameters to bitmap subcommand:
  'bitmap' is the name of the bitmap to manipulate, through one or more
       actions from '--add', '--remove', '--clear', '--enable', '--disable',
       or '--merge source'
  '-g granularity' sets the granularity for '--add' actions
  '-b source' and '-F src_fmt' tell '--merge' actions to find the source
       bitmaps from an alternative file

Parameters to check subcommand:
  '-r' tries to repair any inconsistencies that are found during the check.
       '-r leaks' repairs only cluster leaks, whereas '-r all' fixes all
       kinds of errors, with a higher risk of choosing the wrong fix or
       hiding corruption that has already occurred.

Parameters to convert subcommand:
  '--bitmaps' copies all top-level persistent bitmaps to destination
  '-m' specifies how many coroutines work in parallel during the convert
       process (defaults to 8)
  '-W' allow to write to the target out of order rather than sequential

Parameters to snapshot subcommand:
  'snapshot' is the name of the snapshot to create, apply or delete
  '-a' applies a snapshot (revert disk to saved state)
  '-c' creates a snapshot
  '-d' deletes a snapshot
  '-l' lists all snapshots in the given image

Parameters to compare subcommand:
  '-f' first image format
  '-F' second image format
  '-s' run in Strict mode - fail on different image size or sector allocation

Parameters to dd subcommand:
  'bs=BYTES' read and write up to BYTES bytes at a time (default: 512)
  'count=N' copy only N input blocks
  'if=FILE' read from FILE
  'of=FILE' write to FILE
  'skip=N' skip N bs-sized blocks at the start of input
`;

/** qemu-img --help, listing the formats this engine has. */
function help(img: Img): void {
  const formats = [...new Set([...img.graph.drivers.values()].map((d) => d.name))].sort();
  img.out(
    `${QBLOCK_IMG_VERSION}usage: ${PROG} [standard options] command [command options]\nQEMU disk image utility\n\n` +
      "    '-h', '--help'       display this help and exit\n" +
      "    '-V', '--version'    output version information and exit\n" +
      "    '-T', '--trace'      [[enable=]<pattern>][,events=<file>][,file=<file>]\n" +
      '                         specify tracing options\n\n' +
      `Command syntax:\n${CMD_SYNTAX.map((l) => `  ${l}\n`).join('')}${HELP_PARAMS}\n` +
      `Supported formats:${formats.map((f) => ` ${f}`).join('')}\n\n` +
      'See <https://qemu.org/contribute/report-a-bug> for how to report bugs.\n' +
      'More information on the QEMU project at <https://qemu.org>.\n',
  );
}

// ---------------------------------------------------------------------------
// info

/** bdrv_snapshot_dump's header or one row. */
function snapshotLine(sn?: { id: string; name: string; 'vm-state-size': number; 'date-sec': number; 'vm-clock-sec': number; 'vm-clock-nsec': number; icount?: number }): string {
  if (!sn) return `${'ID'.padEnd(10)}${'TAG'.padEnd(17)}${'VM SIZE'.padStart(8)}${'DATE'.padStart(20)}${'VM CLOCK'.padStart(13)}${'ICOUNT'.padStart(11)}`;
  const d = new Date(sn['date-sec'] * 1000);
  const p2 = (n: number): string => String(n).padStart(2, '0');
  const date = `${d.getFullYear()}-${p2(d.getMonth() + 1)}-${p2(d.getDate())} ${p2(d.getHours())}:${p2(d.getMinutes())}:${p2(d.getSeconds())}`;
  const secs = sn['vm-clock-sec'];
  const clock = `${p2(Math.floor(secs / 3600))}:${p2(Math.floor(secs / 60) % 60)}:${p2(secs % 60)}.${String(Math.floor(sn['vm-clock-nsec'] / 1e6) % 1000).padStart(3, '0')}`;
  const icount = sn.icount !== undefined ? String(sn.icount) : '';
  return `${sn.id.padEnd(9)} ${sn.name.padEnd(16)} ${sizeToStr(sn['vm-state-size']).padStart(8)}${date.padStart(20)}${clock.padStart(13)}${icount.padStart(11)}`;
}

/** bdrv_image_info_dump: the human form of one image's information. */
function dumpImageInfo(info: ImageInfo): string {
  let s = `image: ${info.filename}\nfile format: ${info.format}\nvirtual size: ${sizeToStr(info['virtual-size'])} (${info['virtual-size']} bytes)\n`;
  s += `disk size: ${info['actual-size'] !== undefined ? sizeToStr(info['actual-size']) : 'unavailable'}\n`;
  if (info.encrypted) s += 'encrypted: yes\n';
  if (info['cluster-size'] !== undefined) s += `cluster_size: ${info['cluster-size']}\n`;
  if (info['dirty-flag']) s += 'cleanly shut down: no\n';
  if (info['backing-filename'] !== undefined) {
    s += `backing file: ${info['backing-filename']}`;
    const full = info['full-backing-filename'];
    if (full === undefined) s += ' (cannot determine actual path)';
    else if (full !== info['backing-filename']) s += ` (actual path: ${full})`;
    s += '\n';
    if (info['backing-filename-format'] !== undefined) s += `backing file format: ${info['backing-filename-format']}\n`;
  }
  if (info.snapshots) {
    s += `Snapshot list:\n${snapshotLine()}\n`;
    for (const sn of info.snapshots) s += `${snapshotLine(sn)}\n`;
  }
  if (info['format-specific']) {
    s += 'Format specific information:\n';
    s += dumpQObject(info['format-specific'].data as JsonValue, 1);
  }
  return s;
}

async function imgInfo(img: Img, argv: readonly string[]): Promise<number> {
  const p = parse(img, argv, 'f:hU', [L.format, L.output, { name: 'backing-chain', hasArg: 0, val: OPTION_BACKING_CHAIN }, L.object, L.imageOpts, L.forceShare]);
  let fmt: string | undefined, output: string | undefined;
  let chain = false, imageOpts = false, forceShare = false;
  for (const o of p.opts) {
    switch (o.opt) {
      case 'f': fmt = o.arg; break;
      case 'U': forceShare = true; break;
      case OPTION_OUTPUT: output = o.arg; break;
      case OPTION_BACKING_CHAIN: chain = true; break;
      case OPTION_OBJECT: objectOption(img, o.arg!); break;
      case OPTION_IMAGE_OPTS: imageOpts = true; break;
    }
  }
  if (p.rest.length !== 1) img.errorExit('Expecting one image file name');
  const ofmt = outputFormat(img, output);
  const list: ImageInfo[] = [];
  const seen = new Set<string>();
  let filename: string | undefined = p.rest[0]!;
  while (filename !== undefined) {
    if (seen.has(filename)) img.fail(`Backing file '${filename}' creates an infinite loop.`);
    seen.add(filename);
    const blk = await imgOpen(img, { imageOpts, filename, fmt, readOnly: true, noBacking: true, forceShare });
    let info: ImageInfo;
    try {
      info = await queryImageInfo(blk.bs!);
    } catch (e) {
      img.report(toBlockError(e).message);
      await blk.close();
      throw new Exit(1);
    }
    await blk.close();
    list.push(info);
    filename = undefined;
    fmt = undefined;
    imageOpts = false;
    if (chain) {
      if (info['full-backing-filename'] !== undefined) filename = info['full-backing-filename'];
      else if (info['backing-filename'] !== undefined) img.fail(`Could not determine absolute backing filename, but backing filename '${info['backing-filename']}' present`);
      if (info['backing-filename-format'] !== undefined) fmt = info['backing-filename-format'];
    }
  }
  if (ofmt === 'json') {
    const v = chain ? (list as unknown as JsonValue[]) : (list[0] as unknown as JsonValue);
    img.out(`${jsonPretty(asQDict(v))}\n`);
  } else {
    img.out(list.map(dumpImageInfo).join('\n'));
  }
  return 0;
}

// ---------------------------------------------------------------------------
// create

async function imgCreateCmd(img: Img, argv: readonly string[]): Promise<number> {
  const p = parse(img, argv, 'F:b:f:ho:qu', [L.object]);
  let fmt = 'raw', baseFmt: string | undefined, base: string | undefined, options: string | undefined;
  let quiet = false, noBacking = false;
  for (const o of p.opts) {
    switch (o.opt) {
      case 'F': baseFmt = o.arg; break;
      case 'b': base = o.arg; break;
      case 'f': fmt = o.arg!; break;
      case 'o': options = accumulate(img, options, o.arg!); break;
      case 'q': quiet = true; break;
      case 'u': noBacking = true; break;
      case OPTION_OBJECT: objectOption(img, o.arg!); break;
    }
  }
  const filename = p.rest[0];
  if (options !== undefined && hasHelpOption(options)) return printOptionHelp(img, fmt, filename);
  if (filename === undefined) img.errorExit('Expecting image file name');
  let size: number | undefined;
  if (p.rest.length > 1) size = cvtnum(img, 'image size', p.rest[1]!);
  if (p.rest.length > 2) img.errorExit(`Unexpected argument: ${p.rest[2]}`);
  try {
    const req: Parameters<typeof imgCreate>[1] = { filename, fmt, noBacking, onFormatting: (l) => img.q(quiet, `${l}\n`) };
    if (base !== undefined) req.backingFile = base;
    if (baseFmt !== undefined) req.backingFmt = baseFmt;
    if (options !== undefined) req.options = options;
    if (size !== undefined) req.size = size;
    await imgCreate(img.graph, req);
  } catch (e) {
    reportErr(img, `${filename}: `, e);
    return 1;
  }
  return 0;
}

/** print_block_option_help. */
function printOptionHelp(img: Img, fmt: string, filename: string | undefined): number {
  try {
    img.out(createOptionHelp(img.graph, fmt, filename));
    return 0;
  } catch (e) {
    img.report(toBlockError(e).message);
    return 1;
  }
}

// ---------------------------------------------------------------------------
// check

function dumpHumanCheck(img: Img, c: ImageCheck, quiet: boolean): void {
  const corruptions = c.corruptions ?? 0;
  const leaks = c.leaks ?? 0;
  if (!(corruptions || leaks || c['check-errors'])) {
    img.q(quiet, 'No errors were found on the image.\n');
  } else {
    if (corruptions) img.q(quiet, `\n${corruptions} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n`);
    if (leaks) img.q(quiet, `\n${leaks} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n`);
    if (c['check-errors']) img.q(quiet, `\n${c['check-errors']} internal errors have occurred during the check.\n`);
  }
  const total = c['total-clusters'] ?? 0;
  const alloc = c['allocated-clusters'] ?? 0;
  if (total !== 0 && alloc !== 0) {
    img.q(quiet, `${alloc}/${total} = ${fmtFixed((alloc * 100) / total, 2)}% allocated, ${fmtFixed(((c['fragmented-clusters'] ?? 0) * 100) / alloc, 2)}% fragmented, ${fmtFixed(((c['compressed-clusters'] ?? 0) * 100) / alloc, 2)}% compressed clusters\n`);
  }
  if (c['image-end-offset']) img.q(quiet, `Image end offset: ${c['image-end-offset']}\n`);
}

async function imgCheck(img: Img, argv: readonly string[]): Promise<number> {
  // -p is a qblock extension (QEMU 7.2's check has none): convert's progress meter on stdout.
  const p = parse(img, argv, 'hf:r:T:qUp', [L.format, { name: 'repair', hasArg: 1, val: 'r' }, L.output, L.object, L.imageOpts, L.forceShare]);
  let fmt: string | undefined, output: string | undefined, cache = 'writeback';
  let repair: CheckRepair, quiet = false, imageOpts = false, forceShare = false, progress = false;
  for (const o of p.opts) {
    switch (o.opt) {
      case 'f': fmt = o.arg; break;
      case 'r':
        if (o.arg === 'leaks') repair = 'leaks';
        else if (o.arg === 'all') repair = 'all';
        else img.errorExit(`Unknown option value for -r (expecting 'leaks' or 'all'): ${o.arg}`);
        break;
      case OPTION_OUTPUT: output = o.arg; break;
      case 'T': cache = o.arg!; break;
      case 'q': quiet = true; break;
      case 'U': forceShare = true; break;
      case 'p': progress = true; break;
      case OPTION_OBJECT: objectOption(img, o.arg!); break;
      case OPTION_IMAGE_OPTS: imageOpts = true; break;
    }
  }
  if (p.rest.length !== 1) img.errorExit('Expecting one image file name');
  const filename = p.rest[0]!;
  const ofmt = outputFormat(img, output);
  if (!parseCacheMode(cache)) img.fail(`Invalid source cache option: ${cache}`);
  const blk = await imgOpen(img, { imageOpts, filename, fmt, readOnly: repair === undefined, cache, forceShare });
  // The driver's findings ("Leaked cluster …", "ERROR …") go to stderr as QEMU's fprintf(stderr) does.
  const prevWarn = img.graph.onWarning;
  img.graph.onWarning = (m) => img.io.stderr(`${m}\n`);
  try {
    let outcome;
    // As in convert, -q silences the meter; JSON output keeps stdout a single document.
    const prog = new QemuProgress((s) => img.out(s), progress && !quiet && ofmt === 'human', 1.0);
    // The meter starts with the driver's first report, so a format without checks prints none.
    let started = false;
    const report = (done: number, total: number): void => {
      if (!started) prog.print(0, 100);
      started = true;
      prog.print(total > 0 ? (done * 100) / total : 100, 0);
    };
    try {
      outcome = await checkImage(blk.bs!, filename, repair, report);
      if (started) prog.end();
    } catch (e) {
      if (started) prog.end();
      if (toBlockError(e).code === 'ENOTSUP') {
        img.report('This image format does not support checks');
        return 63;
      }
      img.report(`Check failed: ${strerr(e)}`);
      return 1;
    }
    const c = outcome.check;
    if (outcome.repaired && ofmt === 'human') {
      img.q(quiet, `The following inconsistencies were found and repaired:\n\n    ${outcome.repaired.leaksFixed} leaked clusters\n    ${outcome.repaired.corruptionsFixed} corruptions\n\nDouble checking the fixed image now...\n`);
    }
    if (ofmt === 'human') dumpHumanCheck(img, c, quiet);
    else img.q(quiet, `${jsonPretty(asQDict(c as unknown as JsonValue))}\n`);
    if (c['check-errors']) {
      img.report('Check failed');
      return 1;
    }
    if (c.corruptions) return 2;
    if (c.leaks) return 3;
    return 0;
  } finally {
    img.graph.onWarning = prevWarn;
    await blk.close();
  }
}

// ---------------------------------------------------------------------------
// map

function humanMapLine(e: MapEntry): string {
  return `${altHex(e.start).padEnd(16)}${altHex(e.length).padEnd(16)}${altHex(e.offset ?? 0).padEnd(16)}${e.filename ?? ''}\n`;
}

function jsonMapEntry(e: MapEntry): string {
  let s = `{ "start": ${e.start}, "length": ${e.length}, "depth": ${e.depth}, "present": ${e.present}, "zero": ${e.zero}, "data": ${e.data}`;
  if (e.offset !== undefined) s += `, "offset": ${e.offset}`;
  return `${s}}`;
}

async function imgMap(img: Img, argv: readonly string[]): Promise<number> {
  const p = parse(img, argv, 'f:hU', [L.format, L.output, L.object, L.imageOpts, { name: 'start-offset', hasArg: 1, val: OPTION_START_OFFSET }, { name: 'max-length', hasArg: 1, val: OPTION_MAX_LENGTH }, L.forceShare]);
  let fmt: string | undefined, output: string | undefined, imageOpts = false, forceShare = false;
  let start = 0, maxLength = -1;
  for (const o of p.opts) {
    switch (o.opt) {
      case 'f': fmt = o.arg; break;
      case OPTION_OUTPUT: output = o.arg; break;
      case 'U': forceShare = true; break;
      case OPTION_OBJECT: objectOption(img, o.arg!); break;
      case OPTION_IMAGE_OPTS: imageOpts = true; break;
      case OPTION_START_OFFSET: start = cvtnum(img, 'start offset', o.arg!); break;
      case OPTION_MAX_LENGTH: maxLength = cvtnum(img, 'max length', o.arg!); break;
    }
  }
  if (p.rest.length !== 1) img.errorExit('Expecting one image file name');
  const filename = p.rest[0]!;
  const ofmt = outputFormat(img, output);
  const blk = await imgOpen(img, { imageOpts, filename, fmt, readOnly: true, forceShare });
  try {
    if (ofmt === 'human') img.out(`${'Offset'.padEnd(16)}${'Length'.padEnd(16)}${'Mapped to'.padEnd(16)}File\n`);
    else img.out('[');
    let length: number;
    try {
      length = await blk.getLength();
    } catch {
      img.report(`Failed to get size for '${filename}'`);
      return 1;
    }
    if (maxLength !== -1) length = Math.min(start + maxLength, length);
    let entries: MapEntry[];
    try {
      entries = start < length ? await mapImage(blk.bs!, { start, length: length - start }) : [];
    } catch (e) {
      img.report(`Could not read file metadata: ${strerr(e)}`);
      return 1;
    }
    if (entries.length === 0) entries = [{ start, length: 0, depth: 0, present: false, zero: false, data: false, compressed: false }];
    if (ofmt === 'human') {
      for (const e of entries) {
        if (e.data && e.offset === undefined) {
          img.report('File contains external, encrypted or compressed clusters.');
          return 1;
        }
        if (e.data && !e.zero) img.out(humanMapLine(e));
      }
    } else {
      img.out(`${entries.map(jsonMapEntry).join(',\n')}]\n`);
    }
    return 0;
  } finally {
    await blk.close();
  }
}

// ---------------------------------------------------------------------------
// compare

async function imgCompare(img: Img, argv: readonly string[]): Promise<number> {
  const p = parse(img, argv, 'hf:F:T:pqsU', [L.object, L.imageOpts, L.forceShare]);
  let fmt1: string | undefined, fmt2: string | undefined, cache = 'writeback';
  let progress = false, quiet = false, strict = false, imageOpts = false, forceShare = false;
  for (const o of p.opts) {
    switch (o.opt) {
      case 'f': fmt1 = o.arg; break;
      case 'F': fmt2 = o.arg; break;
      case 'T': cache = o.arg!; break;
      case 'p': progress = true; break;
      case 'q': quiet = true; break;
      case 's': strict = true; break;
      case 'U': forceShare = true; break;
      case OPTION_OBJECT: objectOption(img, o.arg!); break;
      case OPTION_IMAGE_OPTS: imageOpts = true; break;
    }
  }
  if (quiet) progress = false;
  if (p.rest.length !== 2) img.errorExit('Expecting two image file names');
  const [f1, f2] = p.rest as [string, string];
  const prog = new QemuProgress((s) => img.out(s), progress, 2.0);
  let blk1: BlockBackend | null = null;
  let blk2: BlockBackend | null = null;
  try {
    if (!parseCacheMode(cache)) {
      img.report(`Invalid source cache option: ${cache}`);
      return 2;
    }
    blk1 = await imgOpen(img, { imageOpts, filename: f1, fmt: fmt1, readOnly: true, cache, forceShare, quiet }, 2);
    blk2 = await imgOpen(img, { imageOpts, filename: f2, fmt: fmt2, readOnly: true, cache, forceShare, quiet }, 2);
    prog.print(0, 100);
    try {
      return await compareImages({ blk: blk1, filename: f1 }, { blk: blk2, filename: f2 }, {
        strict,
        say: (l) => img.q(quiet, `${l}\n`),
        progress: (delta, base) => prog.print(Math.fround(Math.fround(delta / base) * 100), 100),
      });
    } catch (e) {
      if (e instanceof CompareError) {
        img.report(e.message);
        return e.status;
      }
      throw e;
    }
  } finally {
    await blk2?.close();
    await blk1?.close();
    prog.end();
  }
}

// ---------------------------------------------------------------------------
// convert

async function imgConvert(img: Img, argv: readonly string[]): Promise<number> {
  const p = parse(img, argv, 'hf:O:B:CcF:o:l:S:pt:T:qnm:WUr:', [
    L.object, L.imageOpts, { name: 'target-image-opts', hasArg: 0, val: OPTION_TARGET_IMAGE_OPTS },
    { name: 'salvage', hasArg: 0, val: OPTION_SALVAGE }, { name: 'target-is-zero', hasArg: 0, val: OPTION_TARGET_IS_ZERO },
    L.forceShare, { name: 'bitmaps', hasArg: 0, val: OPTION_BITMAPS }, { name: 'skip-broken-bitmaps', hasArg: 0, val: OPTION_SKIP_BROKEN },
  ]);
  let fmt: string | undefined, outFmt: string | undefined, outBase: string | undefined, backingFmt: string | undefined;
  let options: string | undefined, snapshot: SnapshotParam | undefined, cache = 'unsafe', srcCache = 'writeback';
  let compressed = false, copyRange = false, progress = false, quiet = false, skipCreate = false, inOrder = true;
  let forceShare = false, imageOpts = false, tgtImageOpts = false, salvage = false, targetIsZero = false, bitmaps = false, skipBroken = false;
  let minSparse = 8, explicitMinSparse = false, numCoroutines = 8, rateLimit = 0;
  for (const o of p.opts) {
    switch (o.opt) {
      case 'f': fmt = o.arg; break;
      case 'O': outFmt = o.arg; break;
      case 'B': outBase = o.arg; break;
      case 'C': copyRange = true; break;
      case 'c': compressed = true; break;
      case 'F': backingFmt = o.arg; break;
      case 'o': options = accumulate(img, options, o.arg!); break;
      case 'l': snapshot = snapshotParam(img, o.arg!); break;
      case 'S': {
        const v = cvtnum(img, 'buffer size for sparse output', o.arg!);
        if (v % 512 || v / 512 > MAX_BUF_SECTORS) {
          img.fail(`Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up to ${MAX_BUF_SECTORS * 512}. Select 0 to disable sparse detection (fully allocates output).`);
        }
        minSparse = v / 512;
        explicitMinSparse = true;
        break;
      }
      case 'p': progress = true; break;
      case 't': cache = o.arg!; break;
      case 'T': srcCache = o.arg!; break;
      case 'q': quiet = true; break;
      case 'n': skipCreate = true; break;
      case 'm': {
        const r = strtol(o.arg!, 0);
        if (r.end === 0 || r.end !== o.arg!.length || r.overflow || r.value < 1n || r.value > BigInt(MAX_COROUTINES)) {
          img.fail(`Invalid number of coroutines. Allowed number of coroutines is between 1 and ${MAX_COROUTINES}`);
        }
        numCoroutines = Number(r.value);
        break;
      }
      case 'W': inOrder = false; break;
      case 'U': forceShare = true; break;
      case 'r': rateLimit = cvtnum(img, 'rate limit', o.arg!); break;
      case OPTION_OBJECT: objectOption(img, o.arg!); break;
      case OPTION_IMAGE_OPTS: imageOpts = true; break;
      case OPTION_SALVAGE: salvage = true; break;
      case OPTION_TARGET_IMAGE_OPTS: tgtImageOpts = true; break;
      case OPTION_TARGET_IS_ZERO: targetIsZero = true; break;
      case OPTION_BITMAPS: bitmaps = true; break;
      case OPTION_SKIP_BROKEN: skipBroken = true; break;
    }
  }
  if (outFmt === undefined && !tgtImageOpts) outFmt = 'raw';
  if (skipBroken && !bitmaps) img.fail('Use of --skip-broken-bitmaps requires --bitmaps');
  if (compressed && copyRange) img.fail('Cannot enable copy offloading when -c is used');
  if (explicitMinSparse && copyRange) img.fail('Cannot enable copy offloading when -S is used');
  if (copyRange && salvage) img.fail('Cannot use copy offloading in salvaging mode');
  if (tgtImageOpts && !skipCreate) img.fail('--target-image-opts requires use of -n flag');
  if (skipCreate && options !== undefined) img.fail('-o has no effect when skipping image creation');
  if (targetIsZero && !skipCreate) img.fail('--target-is-zero requires use of -n flag');
  const srcNames = p.rest.slice(0, -1);
  const outFilename = p.rest.length >= 2 ? p.rest[p.rest.length - 1]! : undefined;
  if (options !== undefined && hasHelpOption(options)) {
    if (outFmt !== undefined) return printOptionHelp(img, outFmt, outFilename);
    img.fail('Option help requires a format be specified');
  }
  if (srcNames.length < 1 || outFilename === undefined) img.fail('Must specify image file name');
  if (!parseCacheMode(srcCache)) img.fail(`Invalid source cache option: ${srcCache}`);
  if (quiet) progress = false;
  const prog = new QemuProgress((s) => img.out(s), progress, 1.0);
  prog.print(0, 100);
  const sources: Array<{ blk: BlockBackend; name: string }> = [];
  let target: BlockBackend | null = null;
  let ok = false;
  try {
    for (const name of srcNames) {
      const blk = await imgOpen(img, { imageOpts, filename: name, fmt, readOnly: true, cache: srcCache, forceShare, quiet });
      sources.push({ blk, name });
    }
    let geo;
    try {
      geo = await sourceGeometry(sources);
    } catch (e) {
      img.report(toBlockError(e).message);
      return 1;
    }
    if (snapshot !== undefined) {
      if (snapshot.idOrName !== undefined && sources.length > 1) {
        img.report('No support for concatenating multiple snapshot');
        return 1;
      }
      try {
        await loadSnapshotParam(sources[0]!.blk.bs!, snapshot);
      } catch (e) {
        img.report(toBlockError(e).message);
        return 1;
      }
    }
    if (bitmaps) {
      if (sources.length > 1) {
        img.report('Copying bitmaps only possible with single source');
        return 1;
      }
      const sbs = sources[0]!.blk.bs!;
      if (!sbs.drv.supportsPersistentDirtyBitmap?.(sbs)) {
        img.report('Source lacks bitmap support');
        return 1;
      }
      try {
        convertCheckBitmaps(sbs, skipBroken, PROG);
      } catch (e) {
        reportErr(img, '', e);
        return 1;
      }
    }
    let set: CreateOptionSet | null = null;
    if (!skipCreate) {
      const drv = img.graph.drivers.get(outFmt!);
      if (!drv) {
        img.report(`Unknown file format '${outFmt}'`);
        return 1;
      }
      let proto;
      try {
        proto = findProtocolFor(img.graph, outFilename);
      } catch (e) {
        img.report(toBlockError(e).message);
        return 1;
      }
      if (!drv.createOptions || !drv.create) {
        img.report(`Format driver '${drv.name}' does not support image creation`);
        return 1;
      }
      if (!proto.createOptions || !proto.create) {
        img.report(`Protocol driver '${proto.name}' does not support image creation`);
        return 1;
      }
      set = new CreateOptionSet(drv.createOptions, proto.createOptions);
      try {
        if (options !== undefined) set.parse(options);
      } catch (e) {
        img.report(toBlockError(e).message);
        return 1;
      }
      set.setNumber('size', geo.totalSectors * 512);
      if (outBase !== undefined) {
        if (!set.spec('backing_file')) {
          img.report(`Backing file not supported for file format '${outFmt}'`);
          return 1;
        }
        set.set('backing_file', outBase);
      }
      if (backingFmt !== undefined) {
        if (!set.spec('backing_fmt')) {
          img.report(`Backing file format not supported for file format '${outFmt}'`);
          return 1;
        }
        set.set('backing_fmt', backingFmt);
      }
    }
    const baseParam = set?.get('backing_file') as string | undefined;
    if (baseParam !== undefined) outBase = baseParam;
    const targetHasBacking = outBase !== undefined;
    if (targetIsZero && targetHasBacking) {
      img.report('Cannot use --target-is-zero when the destination image has a backing file');
      return 1;
    }
    if (sources.length > 1 && outBase !== undefined) {
      img.report('Having a backing file for the target makes no sense when concatenating multiple input images');
      return 1;
    }
    if (baseParam !== undefined && set && set.get('backing_fmt') === undefined) {
      img.report('Use of backing file requires explicit backing format');
      return 1;
    }
    if (compressed) {
      const drv = img.graph.drivers.get(outFmt!);
      if (drv && !drv.pwritevCompressed) {
        img.report('Compression not supported for this file format');
        return 1;
      }
      if (set && (set.get('encryption') === true || set.get('encrypt.format') !== undefined)) {
        img.report('Compression and encryption not supported at the same time');
        return 1;
      }
      const pre = set?.get('preallocation');
      if (pre !== undefined && pre !== 'off') {
        img.report('Compression and preallocation not supported at the same time');
        return 1;
      }
    }
    if (!skipCreate && set) {
      const drv = img.graph.getDriver(outFmt!);
      try {
        await drv.create!(outFilename, set.toCreateOptions(), createContext(img.graph));
      } catch (e) {
        reportErr(img, `${outFilename}: error while converting ${outFmt}: `, e);
        return 1;
      }
    }
    if (!parseCacheMode(cache)) {
      img.report(`Invalid cache option: ${cache}`);
      return 1;
    }
    target = await imgOpen(img, { imageOpts: tgtImageOpts, filename: outFilename, fmt: outFmt, readOnly: false, cache, unmap: minSparse > 0, quiet, resize: false });
    const out = target.bs!;
    if (bitmaps && !out.drv.supportsPersistentDirtyBitmap?.(out)) {
      img.report(`Format driver '${out.drv.name}' does not support bitmaps`);
      return 1;
    }
    if (compressed && !out.drv.pwritevCompressed) {
      img.report('Compression not supported for this file format');
      return 1;
    }
    if (skipCreate) {
      let outSectors: number;
      try {
        outSectors = Math.ceil((await target.getLength()) / 512);
      } catch (e) {
        img.report(`unable to get output image length: ${strerr(e)}`);
        return 1;
      }
      if (outSectors < geo.totalSectors) {
        img.report('output file is smaller than input file');
        return 1;
      }
    }
    if (rateLimit) target.enableThrottling('img_convert', { 'bps-write': rateLimit });
    try {
      await convertCopy({
        sources,
        target,
        hasZeroInit: targetIsZero,
        targetIsNew: !skipCreate,
        targetHasBacking,
        compressed,
        minSparse,
        numCoroutines,
        inOrder,
        salvage,
        quiet,
        warn: (m) => img.report(`warning: ${m}`),
        progress: (pct) => prog.print(pct, 0),
      });
    } catch (e) {
      img.report(e instanceof ConvertError ? e.message : toBlockError(e).message);
      return 1;
    }
    if (bitmaps) {
      try {
        await convertCopyBitmaps(sources[0]!.blk.bs!, out, skipBroken, (m) => img.report(`warning: ${m}`));
      } catch (e) {
        reportErr(img, '', e);
        return 1;
      }
    }
    ok = true;
    return 0;
  } finally {
    if (ok) prog.print(100, 0);
    prog.end();
    if (target) await target.close().catch(() => undefined);
    for (const s of sources) await s.blk.close().catch(() => undefined);
  }
}

// ---------------------------------------------------------------------------
// measure

async function imgMeasure(img: Img, argv: readonly string[]): Promise<number> {
  const p = parse(img, argv, 'hf:O:o:l:U', [L.imageOpts, L.object, L.output, { name: 'size', hasArg: 1, val: OPTION_SIZE }, L.forceShare]);
  let fmt: string | undefined, outFmt = 'raw', options: string | undefined, output: string | undefined, snapshot: SnapshotParam | undefined;
  let size: number | undefined, imageOpts = false, forceShare = false;
  for (const o of p.opts) {
    switch (o.opt) {
      case 'f': fmt = o.arg; break;
      case 'O': outFmt = o.arg!; break;
      case 'o': options = accumulate(img, options, o.arg!); break;
      case 'l': snapshot = snapshotParam(img, o.arg!); break;
      case 'U': forceShare = true; break;
      case OPTION_OBJECT: objectOption(img, o.arg!); break;
      case OPTION_IMAGE_OPTS: imageOpts = true; break;
      case OPTION_OUTPUT: output = o.arg; break;
      case OPTION_SIZE: size = cvtnum(img, 'image size', o.arg!); break;
    }
  }
  const ofmt = outputFormat(img, output);
  if (p.rest.length > 1) img.fail('At most one filename argument is allowed.');
  const filename = p.rest[0];
  // QEMU 7.2's measure has no option help: 'help' reaches the option parser and is refused there.
  if (filename === undefined && (imageOpts || fmt !== undefined || snapshot !== undefined)) img.fail('--image-opts, -f, and -l require a filename argument.');
  if (filename !== undefined && size !== undefined) img.fail('--size N cannot be used together with a filename.');
  if (filename === undefined && size === undefined) img.fail('Either --size N or one filename must be specified.');
  let blk: BlockBackend | null = null;
  try {
    if (filename !== undefined) {
      blk = await imgOpen(img, { imageOpts, filename, fmt, readOnly: true, forceShare });
      if (snapshot !== undefined) {
        try {
          await loadSnapshotParam(blk.bs!, snapshot);
        } catch (e) {
          img.report(toBlockError(e).message);
          return 1;
        }
      }
    }
    let info;
    try {
      const req: Parameters<typeof measureImage>[1] = { fmt: outFmt, source: blk?.bs ?? null };
      if (options !== undefined) req.options = options;
      if (size !== undefined) req.size = size;
      info = await measureImage(img.graph, req);
    } catch (e) {
      img.report(toBlockError(e).message);
      if (e instanceof MeasureOptionsError) img.report(`Invalid options for file format '${outFmt}'`);
      return 1;
    }
    if (ofmt === 'human') {
      img.out(`required size: ${info.required}\nfully allocated size: ${info.fullyAllocated}\n`);
      if (info.bitmaps !== undefined) img.out(`bitmaps size: ${info.bitmaps}\n`);
    } else {
      const v: { [k: string]: JsonValue | undefined } = { required: info.required, 'fully-allocated': info.fullyAllocated, bitmaps: info.bitmaps };
      img.out(`${jsonPretty(asQDict(v))}\n`);
    }
    return 0;
  } finally {
    await blk?.close();
  }
}

// ---------------------------------------------------------------------------
// resize

async function imgResize(img: Img, argv0: readonly string[]): Promise<number> {
  // The size is taken off the end first so that "-1G" is not read as an option (as qemu-img does).
  if (argv0.length < 3) img.errorExit('Not enough arguments');
  const argv = argv0.slice(0, -1);
  let size = argv0[argv0.length - 1]!;
  const p = parse(img, argv, 'f:hq', [L.object, L.imageOpts, { name: 'preallocation', hasArg: 1, val: OPTION_PREALLOCATION }, { name: 'shrink', hasArg: 0, val: OPTION_SHRINK }]);
  let fmt: string | undefined, quiet = false, imageOpts = false, shrink = false;
  let prealloc: PreallocMode = 'off';
  for (const o of p.opts) {
    switch (o.opt) {
      case 'f': fmt = o.arg; break;
      case 'q': quiet = true; break;
      case OPTION_OBJECT: objectOption(img, o.arg!); break;
      case OPTION_IMAGE_OPTS: imageOpts = true; break;
      case OPTION_PREALLOCATION:
        if (!(PREALLOC_MODES as readonly string[]).includes(o.arg!)) img.fail(`Invalid preallocation mode '${o.arg}'`);
        prealloc = o.arg as PreallocMode;
        break;
      case OPTION_SHRINK: shrink = true; break;
    }
  }
  if (p.rest.length !== 1) img.errorExit('Expecting image file name and size');
  const filename = p.rest[0]!;
  let relative: -1 | 0 | 1 = 0;
  if (size[0] === '+') { relative = 1; size = size.slice(1); }
  else if (size[0] === '-') { relative = -1; size = size.slice(1); }
  const r = qemuStrtosz(size);
  if (!r.ok) {
    img.report("Parameter 'size' expects a non-negative number below 2^64\nOptional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively.");
    return 1;
  }
  const blk = await imgOpen(img, { imageOpts, filename, fmt, readOnly: false, quiet, resize: true });
  try {
    await resizeImage(blk, { size: Number(r.value), relative, shrink, prealloc });
    img.q(quiet, 'Image resized.\n');
    return 0;
  } catch (e) {
    reportErr(img, '', e);
    if (e instanceof ShrinkRefused) img.report(`warning: ${SHRINK_WARNING}`);
    return 1;
  } finally {
    await blk.close();
  }
}

// ---------------------------------------------------------------------------
// dd

async function imgDd(img: Img, argv: readonly string[]): Promise<number> {
  const p = parse(img, argv, 'hf:O:U', [L.object, L.imageOpts, L.forceShare]);
  let fmt: string | undefined, outFmt = 'raw', imageOpts = false, forceShare = false;
  for (const o of p.opts) {
    switch (o.opt) {
      case 'f': fmt = o.arg; break;
      case 'O': outFmt = o.arg!; break;
      case 'U': forceShare = true; break;
      case OPTION_OBJECT: objectOption(img, o.arg!); break;
      case OPTION_IMAGE_OPTS: imageOpts = true; break;
    }
  }
  const dd: DdParams = { bs: 512 };
  let input: string | undefined, output: string | undefined;
  for (const arg of p.rest) {
    const eq = arg.indexOf('=');
    const key = eq < 0 ? arg : arg.slice(0, eq);
    const val = arg.slice(eq + 1);
    if (eq < 0 || !['bs', 'count', 'if', 'of', 'skip'].includes(key)) img.fail(`unrecognized operand ${key}`);
    if (key === 'bs') dd.bs = cvtnum(img, 'bs', val, 1n, 2147483647n);
    else if (key === 'count') dd.count = cvtnum(img, 'count', val);
    else if (key === 'skip') dd.skip = cvtnum(img, 'skip', val);
    else if (key === 'if') input = val;
    else output = val;
  }
  if (input === undefined || output === undefined) img.fail('Must specify both input and output files');
  const src = await imgOpen(img, { imageOpts, filename: input, fmt, readOnly: true, forceShare });
  let dst: BlockBackend | null = null;
  try {
    const drv = img.graph.drivers.get(outFmt);
    if (!drv) {
      img.report('Unknown file format');
      return 1;
    }
    let proto;
    try {
      proto = findProtocolFor(img.graph, output);
    } catch (e) {
      img.report(toBlockError(e).message);
      return 1;
    }
    if (!drv.createOptions || !drv.create) {
      img.report(`Format driver '${drv.name}' does not support image creation`);
      return 1;
    }
    if (!proto.createOptions || !proto.create) {
      img.report(`Protocol driver '${proto.name}' does not support image creation`);
      return 1;
    }
    let inSize: number;
    try {
      inSize = await src.getLength();
    } catch {
      img.report(`Failed to get size for '${input}'`);
      return 1;
    }
    const sz = ddOutputSize(inSize, dd);
    const set = new CreateOptionSet(drv.createOptions, proto.createOptions);
    set.setNumber('size', sz.outSize);
    try {
      await drv.create(output, set.toCreateOptions(), createContext(img.graph));
    } catch (e) {
      reportErr(img, `${output}: error while creating output image: `, e);
      return 1;
    }
    dst = await imgOpen(img, { imageOpts: false, filename: output, fmt: outFmt, readOnly: false });
    if (sz.skipBeyond) img.report(`${input}: cannot skip to specified offset`);
    try {
      await ddCopy(src, dst, dd, sz.size, sz.skipBeyond);
    } catch (e) {
      img.report(toBlockError(e).message);
      return 1;
    }
    return 0;
  } finally {
    await dst?.close();
    await src.close();
  }
}

// ---------------------------------------------------------------------------
// bench

async function imgBench(img: Img, argv: readonly string[]): Promise<number> {
  const p = parse(img, argv, 'hc:d:f:ni:o:qs:S:t:wU', [
    { name: 'flush-interval', hasArg: 1, val: OPTION_FLUSH_INTERVAL }, L.imageOpts, { name: 'pattern', hasArg: 1, val: OPTION_PATTERN },
    { name: 'no-drain', hasArg: 0, val: OPTION_NO_DRAIN }, L.forceShare,
  ]);
  const b: BenchParams = { count: 75000, depth: 64, offset: 0, bufSize: 4096, step: 0, write: false, pattern: 0, flushInterval: 0, noDrain: false };
  let fmt: string | undefined, imageOpts = false, forceShare = false, quiet = false, cache: string | undefined;
  let nocache = false;
  const intArg = (text: string, max: bigint): bigint | null => {
    const r = strtol(text, 0);
    if (r.end === 0 || r.end !== text.length || r.overflow || r.value < 0n || r.value > max) return null;
    return r.value;
  };
  for (const o of p.opts) {
    switch (o.opt) {
      case 'c': {
        const v = intArg(o.arg!, 2147483647n);
        if (v === null) img.fail('Invalid request count specified');
        b.count = Number(v);
        break;
      }
      case 'd': {
        const v = intArg(o.arg!, 2147483647n);
        if (v === null || v === 0n) img.fail('Invalid queue depth specified');
        b.depth = Number(v);
        break;
      }
      case 'f': fmt = o.arg; break;
      case 'n': nocache = true; break;
      case 'i':
        if (!(AIO_MODES as readonly string[]).includes(o.arg!)) img.fail(`Invalid aio option: ${o.arg}`);
        break;
      case 'o': b.offset = cvtnum(img, 'offset', o.arg!); break;
      case 'q': quiet = true; break;
      case 's': b.bufSize = cvtnum(img, 'buffer size', o.arg!, 1n, 2147483647n); break;
      case 'S': b.step = cvtnum(img, 'step_size', o.arg!, 0n, 2147483647n); break;
      case 't': cache = o.arg; break;
      case 'w': b.write = true; break;
      case 'U': forceShare = true; break;
      case OPTION_FLUSH_INTERVAL: {
        const v = intArg(o.arg!, 2147483647n);
        if (v === null) img.fail('Invalid flush interval specified');
        b.flushInterval = Number(v);
        break;
      }
      case OPTION_NO_DRAIN: b.noDrain = true; break;
      case OPTION_PATTERN: {
        const v = intArg(o.arg!, 255n);
        if (v === null) img.fail('Invalid pattern byte specified');
        b.pattern = Number(v);
        break;
      }
      case OPTION_IMAGE_OPTS: imageOpts = true; break;
    }
  }
  if (p.rest.length !== 1) img.errorExit('Expecting one image file name');
  const filename = p.rest[0]!;
  if (cache !== undefined && !parseCacheMode(cache)) img.fail('Invalid cache mode');
  if (b.flushInterval && !b.write) img.fail('--flush-interval is only available in write tests');
  if (b.flushInterval && b.flushInterval < b.depth) img.fail("Flush interval can't be smaller than depth");
  if (!b.step) b.step = b.bufSize;
  void quiet;
  const blk = await imgOpen(img, { imageOpts, filename, fmt, readOnly: !b.write, cache: cache ?? (nocache ? 'none' : 'writeback'), forceShare });
  try {
    img.out(`Sending ${b.count} ${b.write ? 'write' : 'read'} requests, ${b.bufSize} bytes each, ${b.depth} in parallel (starting at offset ${b.offset}, step size ${b.step})\n`);
    if (b.flushInterval) img.out(`Sending flush every ${b.flushInterval} requests\n`);
    const t0 = performance.now();
    try {
      await runBench(blk, b);
    } catch (e) {
      img.report(toBlockError(e).message);
      return 1;
    }
    img.out(`Run completed in ${fmtFixed((performance.now() - t0) / 1000, 3)} seconds.\n`);
    return 0;
  } finally {
    await blk.close();
  }
}

// ---------------------------------------------------------------------------
// commit, rebase

async function imgCommit(img: Img, argv: readonly string[]): Promise<number> {
  const p = parse(img, argv, 'f:ht:b:dpqr:', [L.object, L.imageOpts]);
  let fmt: string | undefined, cache = 'writeback', base: string | undefined;
  let drop = false, progress = false, quiet = false, imageOpts = false;
  for (const o of p.opts) {
    switch (o.opt) {
      case 'f': fmt = o.arg; break;
      case 't': cache = o.arg!; break;
      case 'b': base = o.arg; drop = true; break;
      case 'd': drop = true; break;
      case 'p': progress = true; break;
      case 'q': quiet = true; break;
      case 'r': cvtnum(img, 'rate limit', o.arg!); break;
      case OPTION_OBJECT: objectOption(img, o.arg!); break;
      case OPTION_IMAGE_OPTS: imageOpts = true; break;
    }
  }
  if (quiet) progress = false;
  if (p.rest.length !== 1) img.errorExit('Expecting one image file name');
  const filename = p.rest[0]!;
  if (!parseCacheMode(cache)) img.fail(`Invalid cache option: ${cache}`);
  const blk = await imgOpen(img, { imageOpts, filename, fmt, readOnly: false, cache, unmap: true, quiet });
  const prog = new QemuProgress((s) => img.out(s), progress, 1);
  prog.print(0, 100);
  let failure: unknown = null;
  try {
    const o: Parameters<typeof commitImage>[1] = { filename, drop, progress: (pct) => prog.print(pct, 0) };
    if (base !== undefined) o.base = base;
    await commitImage(blk, o);
  } catch (e) {
    failure = e;
  } finally {
    prog.end();
    await blk.close().catch(() => undefined);
  }
  if (failure !== null) {
    reportErr(img, '', failure);
    return 1;
  }
  img.q(quiet, 'Image committed.\n');
  return 0;
}

async function imgRebase(img: Img, argv: readonly string[]): Promise<number> {
  const p = parse(img, argv, 'hf:F:b:upt:T:qU', [L.object, L.imageOpts, L.forceShare]);
  let fmt: string | undefined, baseFmt: string | undefined, base: string | undefined, cache = 'writeback', srcCache = 'writeback';
  let unsafe = false, progress = false, quiet = false, imageOpts = false, forceShare = false;
  for (const o of p.opts) {
    switch (o.opt) {
      case 'f': fmt = o.arg; break;
      case 'F': baseFmt = o.arg; break;
      case 'b': base = o.arg; break;
      case 'u': unsafe = true; break;
      case 'p': progress = true; break;
      case 't': cache = o.arg!; break;
      case 'T': srcCache = o.arg!; break;
      case 'q': quiet = true; break;
      case 'U': forceShare = true; break;
      case OPTION_OBJECT: objectOption(img, o.arg!); break;
      case OPTION_IMAGE_OPTS: imageOpts = true; break;
    }
  }
  if (quiet) progress = false;
  if (p.rest.length !== 1) img.errorExit('Expecting one image file name');
  if (!unsafe && base === undefined) img.errorExit('Must specify backing file (-b) or use unsafe mode (-u)');
  const filename = p.rest[0]!;
  const prog = new QemuProgress((s) => img.out(s), progress, 2.0);
  prog.print(0, 100);
  let blk: BlockBackend | null = null;
  let code = 0;
  try {
    if (!parseCacheMode(cache)) {
      img.report(`Invalid cache option: ${cache}`);
      return 1;
    }
    if (!parseCacheMode(srcCache)) {
      img.report(`Invalid source cache option: ${srcCache}`);
      return 1;
    }
    blk = await imgOpen(img, { imageOpts, filename, fmt, readOnly: false, cache, noBacking: unsafe });
    try {
      const o: Parameters<typeof rebaseImage>[2] = { backing: base, unsafe, forceShare, filename, progress: (d) => prog.print(d, 100) };
      if (baseFmt !== undefined) o.backingFmt = baseFmt;
      await rebaseImage(img.graph, blk, o);
      prog.print(100, 0);
    } catch (e) {
      reportErr(img, '', e);
      code = 1;
    }
    return code;
  } catch (e) {
    if (e instanceof Exit) {
      code = e.code;
      return code;
    }
    throw e;
  } finally {
    prog.end();
    await blk?.close().catch(() => undefined);
  }
}

// ---------------------------------------------------------------------------
// snapshot, bitmap, amend

/** A -l argument of convert and measure: QEMU's internal_snapshot_opts, or a plain id or name. */
type SnapshotParam = { id?: string; name?: string; idOrName?: string };

/** Parses -l as qemu-img does at option time ("snapshot.id=…,snapshot.name=…" with ",," for a comma, or anything else as an id or name). */
function snapshotParam(img: Img, arg: string): SnapshotParam {
  if (!arg.startsWith('snapshot.')) return { idOrName: arg };
  const out: SnapshotParam = {};
  let i = 0;
  while (i < arg.length) {
    let item = '';
    for (; i < arg.length; i++) {
      if (arg[i] === ',') {
        if (arg[i + 1] === ',') { item += ','; i++; continue; }
        break;
      }
      item += arg[i];
    }
    i++;
    const eq = item.indexOf('=');
    let key = item;
    let value = 'on';
    if (eq >= 0) {
      key = item.slice(0, eq);
      value = item.slice(eq + 1);
    }
    if (key !== 'snapshot.id' && key !== 'snapshot.name') {
      img.report(`Invalid parameter '${key}'`);
      img.fail(`Failed in parsing snapshot param '${arg}'`);
    }
    if (eq < 0) img.report(`warning: short-form boolean option '${key}' deprecated\nPlease use ${key}=on instead`);
    if (key === 'snapshot.id') out.id = value;
    else out.name = value;
  }
  return out;
}

/** Loads the -l snapshot on a read-only source, as qemu-img convert and measure do. */
async function loadSnapshotParam(bs: BlockNode, sn: SnapshotParam): Promise<void> {
  if (sn.idOrName !== undefined) await loadSnapshotTmpByIdOrName(bs, sn.idOrName);
  else await loadSnapshotTmp(bs, sn.id, sn.name);
}

async function imgSnapshot(img: Img, argv: readonly string[]): Promise<number> {
  const p = parse(img, argv, 'la:c:d:hqU', [L.object, L.imageOpts, L.forceShare]);
  let action: 'list' | 'apply' | 'create' | 'delete' | undefined;
  let name = '', quiet = false, imageOpts = false, forceShare = false;
  for (const o of p.opts) {
    const act = ({ l: 'list', a: 'apply', c: 'create', d: 'delete' } as const)[o.opt as 'l' | 'a' | 'c' | 'd'];
    if (act) {
      if (action) img.errorExit("Cannot mix '-l', '-a', '-c', '-d'");
      action = act;
      if (o.arg !== undefined) name = o.arg;
      continue;
    }
    if (o.opt === 'q') quiet = true;
    else if (o.opt === 'U') forceShare = true;
    else if (o.opt === OPTION_OBJECT) objectOption(img, o.arg!);
    else if (o.opt === OPTION_IMAGE_OPTS) imageOpts = true;
  }
  if (p.rest.length !== 1) img.errorExit('Expecting one image file name');
  const filename = p.rest[0]!;
  const blk = await imgOpen(img, { imageOpts, filename, readOnly: action === 'list', forceShare, quiet });
  const bs = blk.bs!;
  try {
    switch (action) {
      case 'list': {
        const list = await listSnapshots(bs);
        if (list.length > 0) {
          img.out(`Snapshot list:\n${snapshotLine()}\n`);
          for (const sn of list) {
            img.out(`${snapshotLine({ id: sn.id, name: sn.name, 'vm-state-size': sn.vmStateSize, 'date-sec': sn.dateSec, 'vm-clock-sec': Math.floor(sn.vmClockNsec / 1e9), 'vm-clock-nsec': sn.vmClockNsec % 1e9, ...(sn.icount !== undefined ? { icount: sn.icount } : {}) })}\n`);
          }
        }
        return 0;
      }
      case 'create': await createSnapshot(bs, name); return 0;
      case 'apply': await applySnapshot(bs, name); return 0;
      case 'delete': await deleteSnapshot(bs, name); return 0;
      default: return 0;
    }
  } catch (e) {
    img.report(toBlockError(e).message);
    return 1;
  } finally {
    await blk.close();
  }
}

async function imgBitmap(img: Img, argv: readonly string[]): Promise<number> {
  const p = parse(img, argv, 'b:hg:F:f:q', [
    L.object, L.imageOpts, { name: 'add', hasArg: 0, val: OPTION_ADD }, { name: 'remove', hasArg: 0, val: OPTION_REMOVE },
    { name: 'clear', hasArg: 0, val: OPTION_CLEAR }, { name: 'enable', hasArg: 0, val: OPTION_ENABLE },
    { name: 'disable', hasArg: 0, val: OPTION_DISABLE }, { name: 'merge', hasArg: 1, val: OPTION_MERGE },
  ]);
  let fmt: string | undefined, srcFile: string | undefined, srcFmt: string | undefined, imageOpts = false, granularity = 0;
  let add = false, merge = false;
  const actions: BitmapAction[] = [];
  for (const o of p.opts) {
    switch (o.opt) {
      case 'b': srcFile = o.arg; break;
      case 'g': granularity = cvtnum(img, 'granularity', o.arg!); break;
      case 'F': srcFmt = o.arg; break;
      case 'f': fmt = o.arg; break;
      case 'q': break;
      case OPTION_OBJECT: objectOption(img, o.arg!); break;
      case OPTION_IMAGE_OPTS: imageOpts = true; break;
      case OPTION_ADD: actions.push({ op: 'add' }); add = true; break;
      case OPTION_REMOVE: actions.push({ op: 'remove' }); break;
      case OPTION_CLEAR: actions.push({ op: 'clear' }); break;
      case OPTION_ENABLE: actions.push({ op: 'enable' }); break;
      case OPTION_DISABLE: actions.push({ op: 'disable' }); break;
      case OPTION_MERGE: actions.push({ op: 'merge', source: o.arg! }); merge = true; break;
    }
  }
  if (actions.length === 0) img.fail('Need at least one of --add, --remove, --clear, --enable, --disable, or --merge');
  if (granularity && !add) img.fail('granularity only supported with --add');
  if (srcFmt !== undefined && srcFile === undefined) img.fail('-F only supported with -b');
  if (srcFile !== undefined && !merge) img.fail('Merge bitmap source file only supported with --merge');
  if (p.rest.length !== 2) img.fail('Expecting filename and bitmap name');
  const [filename, bitmap] = p.rest as [string, string];
  const blk = await imgOpen(img, { imageOpts, filename, fmt, readOnly: false, noBacking: true });
  let src: BlockBackend | null = null;
  try {
    if (srcFile !== undefined) src = await imgOpen(img, { imageOpts: false, filename: srcFile, fmt: srcFmt, readOnly: true, noBacking: true });
    const opts: { granularity?: number; sourceNode?: BlockNode } = {};
    // qemu-img hands the size to QMP as a 32-bit value: 4G wraps to 0 (refused), 6G to 2G.
    if (granularity) opts.granularity = granularity % 2 ** 32;
    if (src) opts.sourceNode = src.bs!;
    await runBitmapActions(blk.bs!, bitmap, actions, opts);
    return 0;
  } catch (e) {
    if (e instanceof Exit) throw e;
    img.report(toBlockError(e).message);
    if (e instanceof HintedError) img.io.stderr(e.hint);
    return 1;
  } finally {
    await src?.close();
    await blk.close();
  }
}

async function imgAmend(img: Img, argv: readonly string[]): Promise<number> {
  const p = parse(img, argv, 'ho:f:t:pq', [L.object, L.imageOpts, { name: 'force', hasArg: 0, val: OPTION_FORCE }]);
  let fmt: string | undefined, options: string | undefined, cache = 'writeback';
  let progress = false, quiet = false, imageOpts = false, force = false;
  for (const o of p.opts) {
    switch (o.opt) {
      case 'o': options = accumulate(img, options, o.arg!); break;
      case 'f': fmt = o.arg; break;
      case 't': cache = o.arg!; break;
      case 'p': progress = true; break;
      case 'q': quiet = true; break;
      case OPTION_OBJECT: objectOption(img, o.arg!); break;
      case OPTION_IMAGE_OPTS: imageOpts = true; break;
      case OPTION_FORCE: force = true; break;
    }
  }
  if (options === undefined) img.errorExit('Must specify options (-o)');
  if (quiet) progress = false;
  const prog = new QemuProgress((s) => img.out(s), progress, 1.0);
  const filename = p.rest.length === 1 ? p.rest[0] : undefined;
  const amendHelp = (name: string): number => {
    const drv = img.graph.drivers.get(name);
    if (!drv) {
      img.report(`Unknown file format '${name}'`);
      return 1;
    }
    if (!drv.amend) {
      img.report(`Format driver '${name}' does not support option amendment`);
      return 1;
    }
    img.out(`Amend options for '${name}':\n${optionHelpLines(drv.amendOptions ?? drv.createOptions ?? []).map((l) => `${l}\n`).join('')}`);
    return 0;
  };
  let blk: BlockBackend | null = null;
  try {
    if (fmt !== undefined && hasHelpOption(options)) return amendHelp(fmt);
    if (filename === undefined) {
      img.report('Expecting one image file name');
      return 1;
    }
    if (!parseCacheMode(cache)) {
      img.report(`Invalid cache option: ${cache}`);
      return 1;
    }
    blk = await imgOpen(img, { imageOpts, filename, fmt, readOnly: false, cache, quiet });
    const bs = blk.bs!;
    if (hasHelpOption(options)) return amendHelp(bs.drv.name);
    prog.print(0, 0);
    try {
      await amendImage(bs, options, force, (done, total) => prog.print(total ? (100 * done) / total : 0, 0));
    } catch (e) {
      reportErr(img, '', e);
      return 1;
    }
    prog.print(100, 0);
    return 0;
  } finally {
    prog.end();
    await blk?.close();
  }
}

// ---------------------------------------------------------------------------
// main

const COMMANDS: Record<string, (img: Img, argv: readonly string[]) => Promise<number>> = {
  amend: imgAmend,
  bench: imgBench,
  bitmap: imgBitmap,
  check: imgCheck,
  commit: imgCommit,
  compare: imgCompare,
  convert: imgConvert,
  create: imgCreateCmd,
  dd: imgDd,
  info: imgInfo,
  map: imgMap,
  measure: imgMeasure,
  snapshot: imgSnapshot,
  rebase: imgRebase,
  resize: imgResize,
};

/**
 * Runs qblock-img with `argv` (without the program name) and returns the
 * exit status qemu-img would give.
 */
export async function qblockImg(argv: readonly string[], io: CliIO): Promise<number> {
  const img = new Img(io, io.makeGraph ? io.makeGraph() : defaultGraph());
  // Errors from closing nodes (QEMU's error_report during bdrv_close) reach the user, not the void.
  img.graph.onError = (m) => img.report(m);
  try {
    if (argv.length < 1) img.errorExit('Not enough arguments');
    const g = new Getopt([PROG, ...argv], '+:hVT:', [{ name: 'help', hasArg: 0, val: 'h' }, { name: 'version', hasArg: 0, val: 'V' }, { name: 'trace', hasArg: 1, val: 'T' }]);
    for (let o = g.next(); o; o = g.next()) {
      if (o.opt === ':') img.errorExit(`missing argument for option '${g.argv[g.optind - 1]}'`);
      if (o.opt === '?') img.errorExit(`unrecognized option '${g.argv[g.optind - 1]}'`);
      if (o.opt === 'h') {
        help(img);
        return 0;
      }
      if (o.opt === 'V') {
        img.out(QBLOCK_IMG_VERSION);
        return 0;
      }
      if (o.opt === 'T') traceOption(img, o.arg!);
    }
    const rest = g.rest();
    if (rest.length < 1) return 0;
    const cmd = COMMANDS[rest[0]!];
    if (!cmd || !Object.hasOwn(COMMANDS, rest[0]!)) img.errorExit(`Command not found: ${rest[0]}`);
    return await cmd(img, rest);
  } catch (e) {
    if (e instanceof Exit) return e.code;
    throw e;
  } finally {
    await img.graph.closeAll().catch(() => undefined);
  }
}

