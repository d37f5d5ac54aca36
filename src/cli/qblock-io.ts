/**
 * qblock-io: a drop-in counterpart of qemu-io. It parses qemu-io's command
 * line and command language and prints what qemu-io prints, byte for byte
 * (the timings in I/O reports aside); the I/O itself goes through the
 * engine's BlockBackend.
 */
import { constants as osConstants } from 'node:os';
import { promises as fsp } from 'node:fs';
import type { BlockBackend } from '../core/block-backend.ts';
import { STRERROR, toBlockError, type ErrnoCode } from '../core/errors.ts';
import type { Graph } from '../core/graph.ts';
import { bdrvGetLength, bdrvIsAllocated } from '../core/io.ts';
import { bdrvGetInfo, bdrvGetSpecificInfo } from '../core/img/info.ts';
import { AIO_MODES, addBackendPerm, openBackend, parseCacheMode, parseDiscardMode, parseOptionString } from '../core/img/open.ts';
import { reopenBackend } from '../core/img/reopen.ts';
import { loadVmstate, saveVmstate } from '../core/img/vmstate.ts';
import { BDRV_REQUEST_MAX_BYTES, PERM, PREALLOC_MODES, REQ, type BlockdevOptions, type PreallocMode } from '../core/types.ts';
import { blkdebugBreak, blkdebugIsSuspended, blkdebugRemoveBreak, blkdebugResume, blkdebugSetMessageHandler, blkdebugWaitBreak } from '../filters/blkdebug.ts';
import { cvtstr, dumpQObject, fmtFixed, hexDump, type JsonValue } from './format.ts';
import { checkObjectOption, parseTraceOption } from './common.ts';
import { objectHelp } from './objects.ts';
import { Getopt, type LongOption } from './getopt.ts';
import { defaultGraph, type CliIO } from './runtime.ts';
import { cvtnum, strtol, type SizeParse } from './strtosz.ts';

const PROG = 'qblock-io';

/** Command flags (QEMU's CMD_FLAG_GLOBAL and CMD_NOFILE_OK). */
const GLOBAL = 1;
const NOFILE_OK = 2;

/** Signal numbers Linux uses, for sigraise; NSIG is 65. */
const NSIG = 65;

/** One qemu-io command (QEMU's cmdinfo_t). */
interface Command {
  name: string;
  altname?: string;
  /** Argument synopsis; undefined prints nothing, '' prints an extra space (as for `map`). */
  args?: string;
  oneline: string;
  help?: string;
  argmin: number;
  argmax: number;
  flags: number;
  /** Permissions the command needs on the backend (taken before it runs). */
  perm: number;
  run(s: Session, argv: string[]): Promise<number>;
}

/** Thrown to unwind when a signal would have ended the process. */
class Terminated extends Error {
  constructor(readonly signal: string) {
    super(`terminated by ${signal}`);
  }
}

/** State of one qemu-io run: the open image and outstanding AIO. */
class Session {
  blk: BlockBackend | null = null;
  readonly pending = new Set<Promise<void>>();
  quit = false;
  /** The image was opened with --image-opts (changes `open -o` rules). */
  imageOpts = false;

  constructor(readonly io: CliIO, readonly graph: Graph) {}

  out(s: string): void {
    this.io.stdout(s);
  }

  err(s: string): void {
    this.io.stderr(s);
  }

  /** error_report(): the program name, a colon, the message. */
  report(msg: string): void {
    this.io.stderr(`${PROG}: ${msg}\n`);
  }

  /** Runs `p` in the background like a QEMU AIO request; aio_flush and exit wait for it. */
  /**
   * Keeps an AIO request for aio_flush, then lets it run until it waits for
   * I/O: QEMU enters the request's coroutine at once, so a blkdebug
   * breakpoint suspends it before qemu-io reads the next command.
   */
  async track(p: Promise<void>): Promise<void> {
    const t = p.catch(() => undefined).finally(() => this.pending.delete(t));
    this.pending.add(t);
    await new Promise<void>((resolve) => setImmediate(resolve));
  }

  async drainAio(): Promise<void> {
    while (this.pending.size > 0) await Promise.all([...this.pending]);
  }
}

/** -errno style result for a BlockError code. */
function neg(code: ErrnoCode): number {
  return -(ERRNO_NUM[code] ?? 5);
}

const ERRNO_NUM: Partial<Record<ErrnoCode, number>> = { EINVAL: 22, EIO: 5, ENOTSUP: 95, ERANGE: 34, EPERM: 1, ENOENT: 2 };

/** print_cvtnum_err. */
function cvtnumError(s: Session, r: SizeParse, arg: string): number {
  if (r.ok) return 0;
  if (r.code === 'ERANGE') s.out(`Parsing error: argument too large -- ${arg}\n`);
  else s.out(`Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- ${arg}\n`);
  return neg(r.code);
}

/** Parses a size argument, printing QEMU's error; returns null on error. */
function num(s: Session, arg: string): number | null {
  const r = cvtnum(arg);
  if (!r.ok) {
    cvtnumError(s, r, arg);
    return null;
  }
  return Number(r.value);
}

/** parse_pattern: a byte in C strtol syntax (decimal, 0x hex, 0 octal). */
function parsePattern(s: Session, arg: string): number | null {
  // strtol(arg, &end, 0) must consume everything and give 0..255; an empty string is 0, as in C.
  const r = strtol(arg, 0);
  if (r.end !== arg.length || r.value < 0n || r.value > 255n) {
    s.out(`${arg} is not a valid pattern byte\n`);
    return null;
  }
  return Number(r.value);
}

/** Elapsed-time text of print_report (QEMU's timestr). */
function timestr(sec: number, verbose: boolean): string {
  const whole = Math.floor(sec);
  const frac = sec - whole;
  if (verbose || whole > 0) {
    const h = Math.floor(whole / 3600);
    const m = Math.floor((whole % 3600) / 60);
    const secs = (whole % 60) + frac;
    return `${h}:${String(m).padStart(2, '0')}:${fmtFixed(secs, 2).padStart(5, '0')}`;
  }
  return `${fmtFixed(frac, 2).padStart(5, '0')} sec`;
}

/** print_report: the two report lines, or the -C machine-readable one. */
function report(s: Session, op: string, sec: number, offset: number, count: number, total: number, cnt: number, cflag: boolean): void {
  const ts = timestr(sec, cflag);
  if (!cflag) {
    s.out(`${op} ${total}/${count} bytes at offset ${offset}\n`);
    s.out(`${cvtstr(total)}, ${cnt} ops; ${ts} (${cvtstr(total / sec)}/sec and ${fmtFixed(cnt / sec, 4)} ops/sec)\n`);
  } else {
    s.out(`${total},${cnt},${ts},${fmtFixed(total / sec, 3)},${fmtFixed(cnt / sec, 3)}\n`);
  }
}

/** Seconds since `t0` (from performance.now()). */
function since(t0: number): number {
  return (performance.now() - t0) / 1000;
}

function usage(s: Session, c: Command): number {
  s.out(`${c.name} ${c.args ?? ''} -- ${c.oneline}\n`);
  return -22;
}

/** Runs getopt over a command's argv with qemu-io's per-command messages. */
function opts(s: Session, argv: string[], optstring: string): { g: Getopt; list: Array<{ opt: string; arg?: string }> } | null {
  const g = new Getopt(argv, optstring, [], (m) => s.err(m));
  const list: Array<{ opt: string; arg?: string }> = [];
  for (let o = g.next(); o; o = g.next()) {
    if (o.opt === '?' || o.opt === ':') return null;
    const entry: { opt: string; arg?: string } = { opt: String(o.opt) };
    if (o.arg !== undefined) entry.arg = o.arg;
    list.push(entry);
  }
  return { g, list };
}

function strerr(e: unknown): string {
  return STRERROR[toBlockError(e).code];
}

/** Reads a pattern file for `write -s`, repeating it to fill `len` bytes. */
async function patternFromFile(s: Session, file: string, len: number): Promise<Uint8Array | null> {
  let data: Uint8Array;
  try {
    data = new Uint8Array(await fsp.readFile(file));
  } catch (e) {
    const code = (e as { code?: string }).code;
    const msg = code && code in STRERROR ? STRERROR[code as ErrnoCode] : String(e);
    s.err(`${file}: ${msg}\n`);
    return null;
  }
  const pattern = data.subarray(0, Math.min(data.length, len));
  if (pattern.length === 0) {
    s.err(`${file}: file is empty\n`);
    return null;
  }
  const buf = new Uint8Array(len);
  for (let i = 0; i < len; i += pattern.length) buf.set(pattern.subarray(0, Math.min(pattern.length, len - i)), i);
  return buf;
}

function bs(s: Session) {
  return s.blk!.bs!;
}

// ---------------------------------------------------------------------------
// Commands

const READ_HELP = `
 reads a range of bytes from the given offset

 Example:
 'read -v 512 1k' - dumps 1 kilobyte read from 512 bytes into the file

 Reads a segment of the currently open file, optionally dumping it to the
 standard output stream (with -v option) for subsequent inspection.
 -b, -- read from the VM state rather than the virtual disk
 -C, -- report statistics in a machine parsable format
 -l, -- length for pattern verification (only with -P)
 -p, -- ignored for backwards compatibility
 -P, -- use a pattern to verify read data
 -q, -- quiet mode, do not show I/O statistics
 -s, -- start offset for pattern verification (only with -P)
 -v, -- dump buffer to standard output

`;

const readCmd: Command = {
  name: 'read', altname: 'r', argmin: 2, argmax: -1, flags: 0, perm: 0,
  args: '[-abCqv] [-P pattern [-s off] [-l len]] off len',
  oneline: 'reads a number of bytes at a specified offset',
  help: READ_HELP,
  async run(s, argv) {
    const p = opts(s, argv, 'bCl:pP:qs:v');
    if (!p) return usage(s, readCmd);
    const f = ioFlags(0);
    let bflag = false, lflag = false, sflag = false;
    let patOff = 0, patCount = 0;
    for (const o of p.list) {
      const shared = sharedFlag(s, o, f);
      if (shared === null) return -22;
      if (shared) continue;
      switch (o.opt) {
        case 'b': bflag = true; break;
        case 'l': {
          lflag = true;
          const r = cvtnum(o.arg!);
          if (!r.ok) return cvtnumError(s, r, o.arg!);
          patCount = Number(r.value);
          break;
        }
        case 'p': break;
        case 's': {
          sflag = true;
          const r = cvtnum(o.arg!);
          if (!r.ok) return cvtnumError(s, r, o.arg!);
          patOff = Number(r.value);
          break;
        }
      }
    }
    const rest = p.g.rest();
    if (rest.length !== 2) return usage(s, readCmd);
    const oc = offsetCount(s, rest, false, '');
    if (typeof oc === 'number') return oc;
    const { offset, count } = oc;
    if (!f.P && (lflag || sflag)) return usage(s, readCmd);
    if (!lflag) patCount = count - patOff;
    if (patCount < 0 || patCount + patOff > count) {
      s.out('pattern verification range exceeds end of read data\n');
      return -22;
    }
    if (bflag && !sectorAligned(s, offset, count)) return -22;
    const buf = new Uint8Array(count).fill(0xab);
    const t0 = performance.now();
    try {
      if (bflag) await loadVmstate(bs(s), buf, offset);
      else await s.blk!.pread(offset, buf);
    } catch (e) {
      s.out(`read failed: ${strerr(e)}\n`);
      return neg(toBlockError(e).code);
    }
    return readDone(s, f, buf, offset, since(t0), patOff, patCount);
  },
};

/** Parses the lengths of a vectored request (create_iovec); null after printing an error. */
function iovLengths(s: Session, args: string[]): number[] | null {
  const out: number[] = [];
  let total = 0;
  for (const a of args) {
    const r = cvtnum(a);
    if (!r.ok) {
      cvtnumError(s, r, a);
      return null;
    }
    if (r.value > BigInt(BDRV_REQUEST_MAX_BYTES)) {
      s.out(`Argument '${a}' exceeds maximum size ${BDRV_REQUEST_MAX_BYTES}\n`);
      return null;
    }
    const len = Number(r.value);
    if (total > BDRV_REQUEST_MAX_BYTES - len) {
      s.out(`The total number of bytes exceed the maximum size ${BDRV_REQUEST_MAX_BYTES}\n`);
      return null;
    }
    out.push(len);
    total += len;
  }
  return out;
}

/** The flags read, readv, write, writev and their aio_ forms share: -C, -q, -v and -P pattern. */
interface IoFlags {
  C: boolean;
  q: boolean;
  v: boolean;
  /** -P was given (its value is `pattern`). */
  P: boolean;
  pattern: number;
}

function ioFlags(pattern: number): IoFlags {
  return { C: false, q: false, v: false, P: false, pattern };
}

/**
 * Applies one of the shared flags to `f`: true when `opt` was one of them,
 * false when it is the command's own, null after printing a bad pattern.
 */
function sharedFlag(s: Session, o: { opt: string; arg?: string }, f: IoFlags): boolean | null {
  switch (o.opt) {
    case 'C': f.C = true; return true;
    case 'q': f.q = true; return true;
    case 'v': f.v = true; return true;
    case 'P': {
      const v = parsePattern(s, o.arg!);
      if (v === null) return null;
      f.P = true;
      f.pattern = v;
      return true;
    }
    default: return false;
  }
}

/** `off len [len..]` of a vectored request: the offset and the buffer lengths, or which of them was bad (already printed). */
function vectoredArgs(s: Session, rest: string[]): { offset: number; lens: number[]; size: number } | 'offset' | 'lens' {
  const offset = num(s, rest[0]!);
  if (offset === null) return 'offset';
  const lens = iovLengths(s, rest.slice(1));
  if (!lens) return 'lens';
  return { offset, lens, size: lens.reduce((a, b) => a + b, 0) };
}

/**
 * `off len` of read and write; the length limit is lifted by `unlimited`
 * (write -n), `limitNote` goes into its message. A number is the command's
 * return value after the error was printed.
 */
function offsetCount(s: Session, rest: string[], unlimited: boolean, limitNote: string): { offset: number; count: number } | number {
  const offR = cvtnum(rest[0]!);
  if (!offR.ok) return cvtnumError(s, offR, rest[0]!);
  const cntR = cvtnum(rest[1]!);
  if (!cntR.ok) return cvtnumError(s, cntR, rest[1]!);
  if (cntR.value > BigInt(BDRV_REQUEST_MAX_BYTES) && !unlimited) {
    s.out(`length cannot exceed ${BDRV_REQUEST_MAX_BYTES}${limitNote}, given ${rest[1]}\n`);
    return -22;
  }
  return { offset: Number(offR.value), count: Number(cntR.value) };
}

/** The vmstate and compressed paths take whole sectors only; false after printing which value is not. */
function sectorAligned(s: Session, offset: number, count: number): boolean {
  if (offset % 512) { s.out(`${offset} is not a sector-aligned value for 'offset'\n`); return false; }
  if (count % 512) { s.out(`${count} is not a sector-aligned value for 'count'\n`); return false; }
  return true;
}

/** After a read: -P verification of [patOff, patOff+patCount), then unless -q the -v dump and the report; -5 on a mismatch. */
function readDone(s: Session, f: IoFlags, buf: Uint8Array, offset: number, sec: number, patOff = 0, patCount = buf.length): number {
  let ret = 0;
  if (f.P && buf.subarray(patOff, patOff + patCount).some((b) => b !== f.pattern)) {
    s.out(`Pattern verification failed at offset ${offset + patOff}, ${patCount} bytes\n`);
    ret = -5;
  }
  if (f.q) return ret;
  if (f.v) s.out(hexDump(buf, offset));
  report(s, 'read', sec, offset, buf.length, buf.length, 1, f.C);
  return ret;
}

const readvCmd: Command = {
  name: 'readv', argmin: 2, argmax: -1, flags: 0, perm: 0,
  args: '[-Cqv] [-P pattern] off len [len..]',
  oneline: 'reads a number of bytes at a specified offset',
  help: `
 reads a range of bytes from the given offset into multiple buffers

 Example:
 'readv -v 512 1k 1k ' - dumps 2 kilobytes read from 512 bytes into the file

 Reads a segment of the currently open file, optionally dumping it to the
 standard output stream (with -v option) for subsequent inspection.
 Uses multiple iovec buffers if more than one byte range is specified.
 -C, -- report statistics in a machine parsable format
 -P, -- use a pattern to verify read data
 -v, -- dump buffer to standard output
 -q, -- quiet mode, do not show I/O statistics

`,
  async run(s, argv) {
    const p = opts(s, argv, 'CP:qv');
    if (!p) return usage(s, readvCmd);
    const f = ioFlags(0);
    for (const o of p.list) if (sharedFlag(s, o, f) === null) return -22;
    const rest = p.g.rest();
    if (rest.length < 2) return usage(s, readvCmd);
    const v = vectoredArgs(s, rest);
    if (typeof v === 'string') return -22;
    const buf = new Uint8Array(v.size).fill(0xab);
    const t0 = performance.now();
    try {
      await s.blk!.pread(v.offset, buf);
    } catch (e) {
      s.out(`readv failed: ${strerr(e)}\n`);
      return neg(toBlockError(e).code);
    }
    return readDone(s, f, buf, v.offset, since(t0));
  },
};

const writeCmd: Command = {
  name: 'write', altname: 'w', argmin: 2, argmax: -1, flags: 0, perm: PERM.WRITE,
  args: '[-bcCfnquz] [-P pattern | -s source_file] off len',
  oneline: 'writes a number of bytes at a specified offset',
  help: `
 writes a range of bytes from the given offset

 Example:
 'write 512 1k' - writes 1 kilobyte at 512 bytes into the open file

 Writes into a segment of the currently open file, using a buffer
 filled with a set pattern (0xcdcdcdcd).
 -b, -- write to the VM state rather than the virtual disk
 -c, -- write compressed data with blk_write_compressed
 -f, -- use Force Unit Access semantics
 -n, -- with -z, don't allow slow fallback
 -p, -- ignored for backwards compatibility
 -P, -- use different pattern to fill file
 -s, -- use a pattern file to fill the write buffer
 -C, -- report statistics in a machine parsable format
 -q, -- quiet mode, do not show I/O statistics
 -u, -- with -z, allow unmapping
 -z, -- write zeroes using blk_co_pwrite_zeroes

`,
  async run(s, argv) {
    const p = opts(s, argv, 'bcCfnpP:qs:uz');
    if (!p) return usage(s, writeCmd);
    const f = ioFlags(0xcd);
    let bflag = false, cflag = false, zflag = false, sflag = false;
    let flags = 0;
    let file = '';
    for (const o of p.list) {
      const shared = sharedFlag(s, o, f);
      if (shared === null) return -22;
      if (shared) continue;
      switch (o.opt) {
        case 'b': bflag = true; break;
        case 'c': cflag = true; break;
        case 'f': flags |= REQ.FUA; break;
        case 'n': flags |= REQ.NO_FALLBACK; break;
        case 'p': break;
        case 's': sflag = true; file = o.arg!; break;
        case 'u': flags |= REQ.MAY_UNMAP; break;
        case 'z': zflag = true; break;
      }
    }
    const rest = p.g.rest();
    if (rest.length !== 2) return usage(s, writeCmd);
    if (bflag && zflag) { s.out('-b and -z cannot be specified at the same time\n'); return -22; }
    if (flags & REQ.FUA && (bflag || cflag)) { s.out('-f and -b or -c cannot be specified at the same time\n'); return -22; }
    if (flags & REQ.NO_FALLBACK && !zflag) { s.out('-n requires -z to be specified\n'); return -22; }
    if (flags & REQ.MAY_UNMAP && !zflag) { s.out('-u requires -z to be specified\n'); return -22; }
    if (Number(zflag) + Number(f.P) + Number(sflag) > 1) { s.out('Only one of -z, -P, and -s can be specified at the same time\n'); return -22; }
    const oc = offsetCount(s, rest, (flags & REQ.NO_FALLBACK) !== 0, ' without -n');
    if (typeof oc === 'number') return oc;
    const { offset, count } = oc;
    if ((bflag || cflag) && !sectorAligned(s, offset, count)) return -22;
    let buf: Uint8Array | null = null;
    if (!zflag) {
      if (sflag) {
        buf = await patternFromFile(s, file, count);
        if (!buf) return -22;
      } else {
        buf = new Uint8Array(count).fill(f.pattern);
      }
    }
    const t0 = performance.now();
    try {
      if (bflag) await saveVmstate(bs(s), buf!, offset);
      else if (zflag) await s.blk!.pwriteZeroes(offset, count, { flags });
      else if (cflag) await s.blk!.pwriteCompressed(offset, buf!);
      else await s.blk!.pwrite(offset, buf!, { flags });
    } catch (e) {
      s.out(`write failed: ${strerr(e)}\n`);
      return neg(toBlockError(e).code);
    }
    const sec = since(t0);
    if (f.q) return 0;
    report(s, 'wrote', sec, offset, count, count, 1, f.C);
    return 0;
  },
};

const writevCmd: Command = {
  name: 'writev', argmin: 2, argmax: -1, flags: 0, perm: PERM.WRITE,
  args: '[-Cfq] [-P pattern] off len [len..]',
  oneline: 'writes a number of bytes at a specified offset',
  help: `
 writes a range of bytes from the given offset source from multiple buffers

 Example:
 'writev 512 1k 1k' - writes 2 kilobytes at 512 bytes into the open file

 Writes into a segment of the currently open file, using a buffer
 filled with a set pattern (0xcdcdcdcd).
 -P, -- use different pattern to fill file
 -C, -- report statistics in a machine parsable format
 -f, -- use Force Unit Access semantics
 -q, -- quiet mode, do not show I/O statistics

`,
  async run(s, argv) {
    const p = opts(s, argv, 'CfqP:');
    if (!p) return usage(s, writevCmd);
    const f = ioFlags(0xcd);
    let flags = 0;
    for (const o of p.list) {
      const shared = sharedFlag(s, o, f);
      if (shared === null) return -22;
      if (!shared && o.opt === 'f') flags |= REQ.FUA;
    }
    const rest = p.g.rest();
    if (rest.length < 2) return usage(s, writevCmd);
    const v = vectoredArgs(s, rest);
    if (typeof v === 'string') return -22;
    const buf = new Uint8Array(v.size).fill(f.pattern);
    const t0 = performance.now();
    try {
      await s.blk!.pwrite(v.offset, buf, { flags });
    } catch (e) {
      s.out(`writev failed: ${strerr(e)}\n`);
      return neg(toBlockError(e).code);
    }
    const sec = since(t0);
    if (f.q) return 0;
    report(s, 'wrote', sec, v.offset, v.size, v.size, 1, f.C);
    return 0;
  },
};

const AIO_NOTE = ` Note that due to its asynchronous nature, this command will be
 considered successful once the request is submitted, independently
 of potential I/O errors or pattern mismatches.
`;

const aioReadCmd: Command = {
  name: 'aio_read', argmin: 2, argmax: -1, flags: 0, perm: 0,
  args: '[-Ciqv] [-P pattern] off len [len..]',
  oneline: 'asynchronously reads a number of bytes',
  help: `
 asynchronously reads a range of bytes from the given offset

 Example:
 'aio_read -v 512 1k 1k ' - dumps 2 kilobytes read from 512 bytes into the file

 Reads a segment of the currently open file, optionally dumping it to the
 standard output stream (with -v option) for subsequent inspection.
 The read is performed asynchronously and the aio_flush command must be
 used to ensure all outstanding aio requests have been completed.
${AIO_NOTE} -C, -- report statistics in a machine parsable format
 -P, -- use a pattern to verify read data
 -i, -- treat request as invalid, for exercising stats
 -v, -- dump buffer to standard output
 -q, -- quiet mode, do not show I/O statistics

`,
  async run(s, argv) {
    const p = opts(s, argv, 'CP:iqv');
    if (!p) return usage(s, aioReadCmd);
    const f = ioFlags(0);
    for (const o of p.list) {
      const shared = sharedFlag(s, o, f);
      if (shared === null) return -22;
      if (!shared && o.opt === 'i') {
        s.out('injecting invalid read request\n');
        s.blk!.stats.acctInvalid('read');
        return 0;
      }
    }
    const rest = p.g.rest();
    if (rest.length < 2) return usage(s, aioReadCmd);
    const v = vectoredArgs(s, rest);
    if (v === 'lens') s.blk!.stats.acctInvalid('read');
    if (typeof v === 'string') return -22;
    const buf = new Uint8Array(v.size).fill(0xab);
    const t0 = performance.now();
    await s.track(s.blk!.pread(v.offset, buf).then(
      () => void readDone(s, f, buf, v.offset, since(t0)),
      (e: unknown) => s.out(`readv failed: ${strerr(e)}\n`),
    ));
    return 0;
  },
};

const aioWriteCmd: Command = {
  name: 'aio_write', argmin: 2, argmax: -1, flags: 0, perm: PERM.WRITE,
  args: '[-Cfiquz] [-P pattern] off len [len..]',
  oneline: 'asynchronously writes a number of bytes',
  help: `
 asynchronously writes a range of bytes from the given offset source
 from multiple buffers

 Example:
 'aio_write 512 1k 1k' - writes 2 kilobytes at 512 bytes into the open file

 Writes into a segment of the currently open file, using a buffer
 filled with a set pattern (0xcdcdcdcd).
 The write is performed asynchronously and the aio_flush command must be
 used to ensure all outstanding aio requests have been completed.
${AIO_NOTE} -P, -- use different pattern to fill file
 -C, -- report statistics in a machine parsable format
 -f, -- use Force Unit Access semantics
 -i, -- treat request as invalid, for exercising stats
 -q, -- quiet mode, do not show I/O statistics
 -u, -- with -z, allow unmapping
 -z, -- write zeroes using blk_aio_pwrite_zeroes

`,
  async run(s, argv) {
    const p = opts(s, argv, 'CfiqP:uz');
    if (!p) return usage(s, aioWriteCmd);
    const f = ioFlags(0xcd);
    let zflag = false, flags = 0;
    for (const o of p.list) {
      const shared = sharedFlag(s, o, f);
      if (shared === null) return -22;
      if (shared) continue;
      switch (o.opt) {
        case 'f': flags |= REQ.FUA; break;
        case 'u': flags |= REQ.MAY_UNMAP; break;
        case 'i':
          s.out('injecting invalid write request\n');
          s.blk!.stats.acctInvalid('write');
          return 0;
        case 'z': zflag = true; break;
      }
    }
    const rest = p.g.rest();
    if (rest.length < 2) return usage(s, aioWriteCmd);
    if (zflag && rest.length !== 2) { s.out('-z supports only a single length parameter\n'); return -22; }
    if (flags & REQ.MAY_UNMAP && !zflag) { s.out('-u requires -z to be specified\n'); return -22; }
    // QEMU checks "-z and -P" against a flag -P never sets, so the pair is accepted.
    const offset = num(s, rest[0]!);
    if (offset === null) return -22;
    const blk = s.blk!;
    const t0 = performance.now();
    const done = (size: number) => () => {
      if (f.q) return;
      report(s, 'wrote', since(t0), offset, size, size, 1, f.C);
    };
    const failed = (e: unknown): void => s.out(`aio_write failed: ${strerr(e)}\n`);
    if (zflag) {
      const count = num(s, rest[1]!);
      if (count === null) return -22;
      await s.track(blk.pwriteZeroes(offset, count, { flags }).then(done(count), failed));
      return 0;
    }
    const lens = iovLengths(s, rest.slice(1));
    if (!lens) {
      blk.stats.acctInvalid('write');
      return -22;
    }
    const size = lens.reduce((a, b) => a + b, 0);
    await s.track(blk.pwrite(offset, new Uint8Array(size).fill(f.pattern), { flags }).then(done(size), failed));
    return 0;
  },
};

const aioFlushCmd: Command = {
  name: 'aio_flush', argmin: 0, argmax: 0, flags: 0, perm: 0,
  oneline: 'completes all outstanding aio requests',
  async run(s) {
    const cookie = s.blk!.stats.acctStart('flush', 0);
    await s.drainAio();
    s.blk!.stats.acctDone(cookie);
    return 0;
  },
};

const flushCmd: Command = {
  name: 'flush', altname: 'f', argmin: 0, argmax: 0, flags: 0, perm: 0,
  oneline: 'flush all in-core file state to disk',
  async run(s) {
    try {
      await s.blk!.flush();
    } catch (e) {
      return neg(toBlockError(e).code);
    }
    return 0;
  },
};

const truncateCmd: Command = {
  name: 'truncate', altname: 't', argmin: 1, argmax: 3, flags: 0, perm: PERM.WRITE | PERM.RESIZE,
  args: '[-m prealloc_mode] off',
  oneline: 'truncates the current file at the given offset',
  async run(s, argv) {
    const p = opts(s, argv, 'm:');
    if (!p) return usage(s, truncateCmd);
    let prealloc: PreallocMode = 'off';
    for (const o of p.list) {
      if (o.opt === 'm') {
        if (!(PREALLOC_MODES as readonly string[]).includes(o.arg!)) {
          s.report(`Invalid preallocation mode '${o.arg}'`);
          return -22;
        }
        prealloc = o.arg as PreallocMode;
      }
    }
    const rest = p.g.rest();
    const offset = num(s, rest[0] ?? '');
    if (offset === null) return -22;
    try {
      await s.blk!.truncate(offset, { exact: true, prealloc });
    } catch (e) {
      s.report(toBlockError(e).message);
      return neg(toBlockError(e).code);
    }
    return 0;
  },
};

const lengthCmd: Command = {
  name: 'length', altname: 'l', argmin: 0, argmax: 0, flags: 0, perm: 0,
  oneline: 'gets the length of the current file',
  async run(s) {
    let size: number;
    try {
      size = await s.blk!.getLength();
    } catch (e) {
      s.out(`getlength: ${strerr(e)}\n`);
      return neg(toBlockError(e).code);
    }
    s.out(`${cvtstr(size)}\n`);
    return 0;
  },
};

const infoCmd: Command = {
  name: 'info', altname: 'i', argmin: 0, argmax: 0, flags: 0, perm: 0,
  oneline: 'prints information about the current file',
  async run(s) {
    const node = bs(s);
    s.out(`format name: ${node.drv.name}\n`);
    if (node.drv.kind === 'protocol' && node.drv.protocolNames?.[0]) s.out(`format name: ${node.drv.protocolNames[0]}\n`);
    let bdi;
    try {
      bdi = await bdrvGetInfo(node);
    } catch (e) {
      return neg(toBlockError(e).code);
    }
    s.out(`cluster size: ${cvtstr(bdi.clusterSize ?? 0)}\n`);
    s.out(`vm state offset: ${cvtstr(bdi.vmStateOffset ?? 0)}\n`);
    let spec;
    try {
      spec = await bdrvGetSpecificInfo(node);
    } catch (e) {
      s.report(toBlockError(e).message);
      return -5;
    }
    if (spec) {
      s.out('Format specific information:\n');
      s.out(dumpQObject(spec.data as JsonValue, 1));
    }
    return 0;
  },
};

const discardCmd: Command = {
  name: 'discard', altname: 'd', argmin: 2, argmax: -1, flags: 0, perm: PERM.WRITE,
  args: '[-Cq] off len',
  oneline: 'discards a number of bytes at a specified offset',
  help: `
 discards a range of bytes from the given offset

 Example:
 'discard 512 1k' - discards 1 kilobyte from 512 bytes into the file

 Discards a segment of the currently open file.
 -C, -- report statistics in a machine parsable format
 -q, -- quiet mode, do not show I/O statistics

`,
  async run(s, argv) {
    const p = opts(s, argv, 'Cq');
    if (!p) return usage(s, discardCmd);
    let cflag = false, qflag = false;
    for (const o of p.list) {
      if (o.opt === 'C') cflag = true;
      else if (o.opt === 'q') qflag = true;
    }
    const rest = p.g.rest();
    if (rest.length !== 2) return usage(s, discardCmd);
    const offset = num(s, rest[0]!);
    if (offset === null) return -22;
    const r = cvtnum(rest[1]!);
    if (!r.ok) return cvtnumError(s, r, rest[1]!);
    if (r.value > BigInt(BDRV_REQUEST_MAX_BYTES)) {
      s.out(`length cannot exceed ${BDRV_REQUEST_MAX_BYTES}, given ${rest[1]}\n`);
      return -22;
    }
    const bytes = Number(r.value);
    const t0 = performance.now();
    try {
      await s.blk!.pdiscard(offset, bytes);
    } catch (e) {
      s.out(`discard failed: ${strerr(e)}\n`);
      return neg(toBlockError(e).code);
    }
    if (!qflag) report(s, 'discard', since(t0), offset, bytes, bytes, 1, cflag);
    return 0;
  },
};

const allocCmd: Command = {
  name: 'alloc', altname: 'a', argmin: 1, argmax: 2, flags: 0, perm: 0,
  args: 'offset [count]',
  oneline: 'checks if offset is allocated in the file',
  async run(s, argv) {
    const start = num(s, argv[1]!);
    if (start === null) return -22;
    let count = 512;
    if (argv.length === 3) {
      const c = num(s, argv[2]!);
      if (c === null) return -22;
      count = c;
    }
    let offset = start, remaining = count, sum = 0;
    while (remaining > 0) {
      let r;
      try {
        r = await bdrvIsAllocated(bs(s), offset, remaining);
      } catch (e) {
        s.out(`is_allocated failed: ${strerr(e)}\n`);
        return neg(toBlockError(e).code);
      }
      offset += r.pnum;
      remaining -= r.pnum;
      if (r.allocated) sum += r.pnum;
      if (r.pnum === 0) {
        count -= remaining;
        remaining = 0;
      }
    }
    s.out(`${sum}/${count} bytes allocated at offset ${cvtstr(start)}\n`);
    return 0;
  },
};

const mapCmd: Command = {
  name: 'map', argmin: 0, argmax: 0, flags: 0, perm: 0, args: '',
  oneline: 'prints the allocated areas of a file',
  async run(s) {
    const node = bs(s);
    let bytes: number;
    try {
      bytes = await bdrvGetLength(node);
    } catch (e) {
      s.report(`Failed to query image length: ${strerr(e)}`);
      return neg(toBlockError(e).code);
    }
    let offset = 0;
    while (bytes > 0) {
      // map_is_allocated: merge consecutive answers with the same allocation state.
      let first: boolean;
      let total: number;
      try {
        const r0 = await bdrvIsAllocated(node, offset, Math.min(bytes, BDRV_REQUEST_MAX_BYTES));
        first = r0.allocated;
        total = r0.pnum;
        let o = offset + r0.pnum;
        let left = bytes - r0.pnum;
        while (left > 0) {
          const r = await bdrvIsAllocated(node, o, Math.min(left, BDRV_REQUEST_MAX_BYTES));
          if (r.allocated !== first || r.pnum === 0) break;
          total += r.pnum;
          o += r.pnum;
          left -= r.pnum;
        }
      } catch (e) {
        s.report(`Failed to get allocation status: ${strerr(e)}`);
        return neg(toBlockError(e).code);
      }
      if (total === 0) {
        s.report('Unexpected end of image');
        return -5;
      }
      s.out(`${cvtstr(total)} (0x${total.toString(16)}) bytes ${first ? '    allocated' : 'not allocated'} at offset ${cvtstr(offset)} (0x${offset.toString(16)})\n`);
      offset += total;
      bytes -= total;
    }
    return 0;
  },
};

const reopenCmd: Command = {
  name: 'reopen', argmin: 0, argmax: -1, flags: 0, perm: 0,
  args: '[(-r|-w)] [-c cache] [-o options]',
  oneline: 'reopens an image with new options',
  help: `
 Changes the open options of an already opened image

 Example:
 'reopen -o lazy-refcounts=on' - activates lazy refcount writeback on a qcow2 image

 -r, -- Reopen the image read-only
 -w, -- Reopen the image read-write
 -c, -- Change the cache mode to the given value
 -o, -- Changes block driver options (cf. 'open' command)

`,
  async run(s, argv) {
    const p = opts(s, argv, 'c:o:rw');
    if (!p) return usage(s, reopenCmd);
    let readOnly: boolean | undefined;
    let cache: string | undefined;
    const options: Record<string, unknown> = {};
    for (const o of p.list) {
      if (o.opt === 'c') {
        if (!parseCacheMode(o.arg!)) {
          s.report(`Invalid cache option: ${o.arg}`);
          return -22;
        }
        cache = o.arg!;
      } else if (o.opt === 'o') {
        try {
          Object.assign(options, parseOptionString(o.arg!, (m) => s.report(`warning: ${m}`)));
        } catch (e) {
          s.report(toBlockError(e).message);
          return -22;
        }
      } else if (o.opt === 'r' || o.opt === 'w') {
        if (readOnly !== undefined) {
          s.report('Only one -r/-w option may be given');
          return -22;
        }
        readOnly = o.opt === 'r';
      }
    }
    if (p.g.rest().length !== 0) return usage(s, reopenCmd);
    if (options['read-only'] !== undefined) {
      if (readOnly !== undefined) {
        s.report("Cannot set both -r/-w and 'read-only'");
        return -22;
      }
      readOnly = options['read-only'] === true;
      delete options['read-only'];
      // Unlike -r, the option does not make qemu-io give up its write permission first.
      const blk = s.blk!;
      if (readOnly && !blk.bs!.readOnly && blk.getPerm().perm & PERM.WRITE) {
        s.report(`Read-only block node '${blk.bs!.nodeName}' cannot support read-write users`);
        return -22;
      }
    }
    try {
      const req: { readOnly?: boolean; options: Record<string, unknown>; cache?: string } = { options };
      if (readOnly !== undefined) req.readOnly = readOnly;
      if (cache !== undefined) req.cache = cache;
      await reopenBackend(s.blk!, req);
    } catch (e) {
      s.report(toBlockError(e).message);
      return -22;
    }
    return 0;
  },
};

/** Runs a blkdebug breakpoint operation, printing QEMU's "Could not …" line on failure. */
function debugOp(s: Session, what: string, fn: () => void): number {
  try {
    fn();
    return 0;
  } catch (e) {
    s.out(`${what}: ${strerr(e)}\n`);
    return neg(toBlockError(e).code);
  }
}

const breakCmd: Command = {
  name: 'break', argmin: 2, argmax: 2, flags: 0, perm: 0, args: 'event tag',
  oneline: 'sets a breakpoint on event and tags the stopped request as tag',
  async run(s, argv) {
    return debugOp(s, 'Could not set breakpoint', () => {
      blkdebugBreak(bs(s), argv[1]!, argv[2]!);
      // blkdebug reports suspensions on stdout, as QEMU's does.
      blkdebugSetMessageHandler(bs(s), (m) => s.out(`${m}\n`));
    });
  },
};

const removeBreakCmd: Command = {
  name: 'remove_break', argmin: 1, argmax: 1, flags: 0, perm: 0, args: 'tag',
  oneline: 'remove a breakpoint by tag',
  async run(s, argv) {
    return debugOp(s, `Could not remove breakpoint ${argv[1]}`, () => blkdebugRemoveBreak(bs(s), argv[1]!));
  },
};

const resumeCmd: Command = {
  name: 'resume', argmin: 1, argmax: 1, flags: 0, perm: 0, args: 'tag',
  oneline: 'resumes the request tagged as tag',
  async run(s, argv) {
    return debugOp(s, 'Could not resume request', () => blkdebugResume(bs(s), argv[1]!));
  },
};

const waitBreakCmd: Command = {
  name: 'wait_break', argmin: 1, argmax: 1, flags: 0, perm: 0, args: 'tag',
  oneline: 'waits for the suspension of a request',
  async run(s, argv) {
    try {
      if (!blkdebugIsSuspended(bs(s), argv[1]!)) await blkdebugWaitBreak(bs(s), argv[1]!);
    } catch (e) {
      return neg(toBlockError(e).code);
    }
    return 0;
  },
};

const abortCmd: Command = {
  name: 'abort', argmin: 0, argmax: 0, flags: NOFILE_OK, perm: 0,
  oneline: 'simulate a program crash using abort(3)',
  async run(s) {
    s.io.raise?.('SIGABRT');
    throw new Terminated('SIGABRT');
  },
};

/** Signal names by number (Linux numbering, from Node's table). */
function signalName(n: number): string | undefined {
  for (const [name, num] of Object.entries(osConstants.signals)) if (num === n) return name;
  return undefined;
}

/** Signals whose default action does not end the process. */
const NONFATAL = new Set(['SIGCHLD', 'SIGCONT', 'SIGURG', 'SIGWINCH']);

/** Signals QEMU's tools ignore, block or handle (SIGPIPE ignored; SIGBUS, SIGUSR1, SIGALRM and SIGIO taken by its main loop), so raising them changes nothing. */
const HANDLED = new Set(['SIGBUS', 'SIGUSR1', 'SIGPIPE', 'SIGALRM', 'SIGIO', 'SIGPOLL']);

const sigraiseCmd: Command = {
  name: 'sigraise', argmin: 1, argmax: 1, flags: NOFILE_OK, perm: 0, args: 'signal',
  oneline: 'raises a signal',
  help: `
 raises the given signal

 Example:
 'sigraise 15' - raises SIGTERM

 Invokes raise(signal), where "signal" is the mandatory integer argument
 given to sigraise.

`,
  async run(s, argv) {
    const r = cvtnum(argv[1]!);
    if (!r.ok) return cvtnumError(s, r, argv[1]!);
    if (r.value > BigInt(NSIG)) {
      s.out(`signal argument '${argv[1]}' is too large to be a valid signal\n`);
      return -22;
    }
    const name = signalName(Number(r.value));
    if (!name || HANDLED.has(name)) return 0;
    s.io.raise?.(name);
    if (!NONFATAL.has(name)) throw new Terminated(name);
    return 0;
  },
};

const sleepCmd: Command = {
  name: 'sleep', argmin: 1, argmax: 1, flags: NOFILE_OK, perm: 0,
  oneline: 'waits for the given value in milliseconds',
  async run(s, argv) {
    const r = strtol(argv[1]!, 0);
    if (r.end !== argv[1]!.length || r.value < 0n) {
      s.out(`${argv[1]} is not a valid number\n`);
      return -22;
    }
    await new Promise((res) => setTimeout(res, Number(r.value)));
    return 0;
  },
};

const openCmd: Command = {
  name: 'open', altname: 'o', argmin: 1, argmax: -1, flags: NOFILE_OK, perm: 0,
  args: '[-rsCnkU] [-t cache] [-d discard] [-o options] [path]',
  oneline: 'open the file specified by path',
  help: `
 opens a new file in the requested mode

 Example:
 'open -n -o driver=raw /tmp/data' - opens raw data file read-write, uncached

 Opens a file for subsequent use by all of the other qblock-io commands.
 -r, -- open file read-only
 -s, -- use snapshot file
 -C, -- use copy-on-read
 -n, -- disable host cache, short for -t none
 -U, -- force shared permissions
 -k, -- use kernel AIO implementation (Linux only, prefer use of -i)
 -i, -- use AIO mode (threads, native or io_uring)
 -t, -- use the given cache mode for the image
 -d, -- use the given discard mode for the image
 -o, -- options to be given to the block driver
`,
  async run(s, argv) {
    const p = opts(s, argv, 'snCro:ki:t:d:U');
    if (!p) return usage(s, openCmd);
    const o: OpenFlags = { readOnly: false, snapshot: false, cache: undefined, unmap: true, copyOnRead: false, forceShare: false };
    let options: BlockdevOptions | undefined;
    for (const x of p.list) {
      switch (x.opt) {
        case 's': o.snapshot = true; break;
        case 'n': o.cache = 'none'; break;
        case 'C': o.copyOnRead = true; break;
        case 'r': o.readOnly = true; break;
        case 'k': o.nativeAio = true; break;
        case 't':
          if (!parseCacheMode(x.arg!)) { s.report(`Invalid cache option: ${x.arg}`); return -22; }
          o.cache = x.arg!;
          break;
        case 'd': {
          const d = parseDiscardMode(x.arg!);
          if (d === undefined) { s.report(`Invalid discard option: ${x.arg}`); return -22; }
          o.unmap = d;
          break;
        }
        case 'i':
          if (!(AIO_MODES as readonly string[]).includes(x.arg!)) { s.report(`Invalid aio option: ${x.arg}`); return -22; }
          if (x.arg === 'native') o.nativeAio = true;
          break;
        case 'o':
          if (s.imageOpts) { s.out("--image-opts and 'open -o' are mutually exclusive\n"); return -22; }
          try {
            options = { ...(options ?? {}), ...parseOptionString(x.arg!, (m) => s.report(`warning: ${m}`)) };
          } catch (e) {
            s.report(toBlockError(e).message);
            return -22;
          }
          break;
        case 'U': o.forceShare = true; break;
      }
    }
    const rest = p.g.rest();
    if (s.imageOpts && rest.length === 1) {
      options = parseOptionString(rest.shift()!, (m) => s.report(`warning: ${m}`));
    }
    if (rest.length > 1) return usage(s, openCmd);
    const ok = await openFile(s, rest[0], o, options);
    return ok ? 0 : -22;
  },
};

const closeCmd: Command = {
  name: 'close', altname: 'c', argmin: 0, argmax: 0, flags: 0, perm: 0,
  oneline: 'close the current open file',
  async run(s) {
    await s.drainAio();
    await s.blk!.close();
    s.blk = null;
    return 0;
  },
};

const quitCmd: Command = {
  name: 'quit', altname: 'q', argmin: -1, argmax: -1, flags: GLOBAL, perm: 0,
  oneline: 'exit the program',
  async run(s) {
    s.quit = true;
    return 0;
  },
};

const helpCmd: Command = {
  name: 'help', altname: '?', argmin: 0, argmax: 1, flags: GLOBAL, perm: 0, args: '[command]',
  oneline: 'help for one or all commands',
  async run(s, argv) {
    if (argv.length === 1) {
      for (const c of COMMANDS) s.out(helpOneline(c.name, c));
      s.out("\nUse 'help commandname' for extended help.\n");
      return 0;
    }
    const c = findCommand(argv[1]!);
    if (!c) {
      s.out(`command ${argv[1]} not found\n`);
      return -22;
    }
    s.out(helpOneline(argv[1]!, c));
    if (c.help) s.out(c.help);
    return 0;
  },
};

function helpOneline(name: string, c: Command): string {
  return `${name} ${c.args !== undefined ? `${c.args} ` : ''}-- ${c.oneline}\n`;
}

/** Every command, sorted by name as QEMU's table is. */
const COMMANDS: Command[] = [
  abortCmd, aioFlushCmd, aioReadCmd, aioWriteCmd, allocCmd, breakCmd, closeCmd, discardCmd, flushCmd, helpCmd, infoCmd,
  lengthCmd, mapCmd, openCmd, quitCmd, readCmd, readvCmd, removeBreakCmd, reopenCmd, resumeCmd, sigraiseCmd, sleepCmd,
  truncateCmd, waitBreakCmd, writeCmd, writevCmd,
].sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));

function findCommand(name: string): Command | undefined {
  return COMMANDS.find((c) => c.name === name || c.altname === name);
}

/** qemu-io's breakline: split on single spaces, dropping empty words. */
function breakline(line: string): string[] {
  return line.split(' ').filter((w) => w !== '');
}

/** qemuio_command: looks the command up, checks its argument count and permissions, and runs it. */
async function runCommand(s: Session, line: string): Promise<number> {
  const argv = breakline(line);
  if (argv.length === 0) return 0;
  const c = findCommand(argv[0]!);
  if (!c) {
    s.err(`command "${argv[0]}" not found\n`);
    return -22;
  }
  if (!(c.flags & GLOBAL) && !(c.flags & NOFILE_OK) && !s.blk) {
    s.err("no file open, try 'help open'\n");
    return -22;
  }
  const n = argv.length - 1;
  if (n < c.argmin || (c.argmax !== -1 && n > c.argmax)) {
    if (c.argmax === -1) s.err(`bad argument count ${n} to ${argv[0]}, expected at least ${c.argmin} arguments\n`);
    else if (c.argmin === c.argmax) s.err(`bad argument count ${n} to ${argv[0]}, expected ${c.argmin} arguments\n`);
    else s.err(`bad argument count ${n} to ${argv[0]}, expected between ${c.argmin} and ${c.argmax} arguments\n`);
    return -22;
  }
  if (c.perm && s.blk?.isAvailable()) {
    try {
      addBackendPerm(s.blk, c.perm);
    } catch (e) {
      s.report(toBlockError(e).message);
      return -1;
    }
  }
  return c.run(s, argv);
}

interface OpenFlags {
  /** -k or -i native seen (-i threads does not undo -k, as in QEMU). */
  nativeAio?: boolean;
  readOnly: boolean;
  snapshot: boolean;
  cache: string | undefined;
  unmap: boolean;
  copyOnRead: boolean;
  forceShare: boolean;
}

/** qemu-io's openfile(): opens the image as the session's backend, printing QEMU's errors. */
async function openFile(s: Session, name: string | undefined, o: OpenFlags, options: BlockdevOptions | undefined): Promise<boolean> {
  if (s.blk) {
    s.report("file open already, try 'help close'");
    return false;
  }
  const where = name !== undefined ? ` device ${name}` : '';
  if (o.forceShare && options && options['force-share'] !== undefined && options['force-share'] !== true) {
    s.report('-U conflicts with image options');
    return false;
  }
  try {
    const spec: Parameters<typeof openBackend>[1] = {
      readOnly: o.readOnly,
      forceShare: o.forceShare,
      unmap: o.unmap,
      copyOnRead: o.copyOnRead,
      resize: false,
      snapshot: o.snapshot,
      onWarning: (m) => s.err(`WARNING: ${m}\n`),
    };
    if (name !== undefined) spec.filename = name;
    if (o.cache !== undefined) spec.cache = o.cache;
    if (o.nativeAio) spec.aio = 'native';
    if (options) {
      const { driver, ...rest } = options;
      if (name !== undefined && typeof driver === 'string') spec.format = driver;
      spec.options = name !== undefined ? rest : options;
    }
    s.blk = await openBackend(s.graph, spec);
  } catch (e) {
    s.report(`can't open${where}: ${toBlockError(e).message}`);
    return false;
  }
  return true;
}

const LONGOPTS: LongOption[] = [
  { name: 'help', hasArg: 0, val: 'h' },
  { name: 'version', hasArg: 0, val: 'V' },
  { name: 'cmd', hasArg: 1, val: 'c' },
  { name: 'format', hasArg: 1, val: 'f' },
  { name: 'read-only', hasArg: 0, val: 'r' },
  { name: 'snapshot', hasArg: 0, val: 's' },
  { name: 'nocache', hasArg: 0, val: 'n' },
  { name: 'copy-on-read', hasArg: 0, val: 'C' },
  { name: 'misalign', hasArg: 0, val: 'm' },
  { name: 'native-aio', hasArg: 0, val: 'k' },
  { name: 'aio', hasArg: 1, val: 'i' },
  { name: 'discard', hasArg: 1, val: 'd' },
  { name: 'cache', hasArg: 1, val: 't' },
  { name: 'trace', hasArg: 1, val: 'T' },
  { name: 'object', hasArg: 1, val: 256 },
  { name: 'image-opts', hasArg: 0, val: 257 },
  { name: 'force-share', hasArg: 0, val: 'U' },
];

function usageText(): string {
  return `Usage: ${PROG} [OPTIONS]... [-c STRING]... [file]
QEMU Disk exerciser

  --object OBJECTDEF   define an object such as 'secret' for
                       passwords and/or encryption keys
  --image-opts         treat file as option string
  -c, --cmd STRING     execute command with its arguments
                       from the given string
  -f, --format FMT     specifies the block driver to use
  -r, --read-only      export read-only
  -s, --snapshot       use snapshot file
  -n, --nocache        disable host cache, short for -t none
  -C, --copy-on-read   enable copy-on-read
  -m, --misalign       misalign allocations for O_DIRECT
  -k, --native-aio     use kernel AIO implementation
                       (Linux only, prefer use of -i)
  -i, --aio=MODE       use AIO mode (threads, native or io_uring)
  -t, --cache=MODE     use the given cache mode for the image
  -d, --discard=MODE   use the given discard mode for the image
  -T, --trace [[enable=]<pattern>][,events=<file>][,file=<file>]
                       specify tracing options
                       see qblock-img(1) man page for full description
  -U, --force-share    force shared permissions
  -h, --help           display this help and exit
  -V, --version        output version information and exit

See '${PROG} -c help' for information on available commands.

See <https://qemu.org/contribute/report-a-bug> for how to report bugs.
More information on the QEMU project at <https://qemu.org>.
`;
}

/** The version banner. */
export const QBLOCK_VERSION = '0.1.0';

/**
 * Runs qblock-io with `argv` (without the program name) and returns the
 * exit status qemu-io would: 0, or 1 when a command or the open failed;
 * 128+signal when a raised signal ended the run.
 */
export async function qblockIo(argv: readonly string[], io: CliIO): Promise<number> {
  const g = new Getopt([PROG, ...argv], 'hVc:d:f:rsnCmki:t:T:U', LONGOPTS, (m) => io.stderr(m));
  const cmds: string[] = [];
  const o: OpenFlags = { readOnly: false, snapshot: false, cache: undefined, unmap: true, copyOnRead: false, forceShare: false };
  let format: string | undefined;
  let imageOpts = false;
  const objectIds = new Set<string>();
  const fail = (msg: string): number => {
    io.stderr(`${PROG}: ${msg}\n`);
    return 1;
  };
  for (let x = g.next(); x; x = g.next()) {
    switch (x.opt) {
      case 's': o.snapshot = true; break;
      case 'n': o.cache = 'none'; break;
      case 'C': o.copyOnRead = true; break;
      case 'd': {
        const d = parseDiscardMode(x.arg!);
        if (d === undefined) return fail(`Invalid discard option: ${x.arg}`);
        o.unmap = d;
        break;
      }
      case 'f': format = x.arg!; break;
      case 'c': cmds.push(x.arg!); break;
      case 'r': o.readOnly = true; break;
      case 'm': break;
      case 'k': o.nativeAio = true; break;
      case 'i':
        if (!(AIO_MODES as readonly string[]).includes(x.arg!)) return fail(`Invalid aio option: ${x.arg}`);
        if (x.arg === 'native') o.nativeAio = true;
        break;
      case 't':
        if (!parseCacheMode(x.arg!)) return fail(`Invalid cache option: ${x.arg}`);
        o.cache = x.arg!;
        break;
      case 'T': {
        const t = parseTraceOption(x.arg!);
        for (const w of t.warnings) io.stderr(`${PROG}: ${w}\n`);
        if (t.error !== null) return fail(t.error);
        break;
      }
      case 'V':
        io.stdout(`${PROG} version ${QBLOCK_VERSION}\n`);
        return 0;
      case 'h':
        io.stdout(usageText());
        return 0;
      case 'U': o.forceShare = true; break;
      case 256: {
        const help = objectHelp(x.arg!);
        if (help !== null) {
          io.stdout(help);
          return 0;
        }
        const err = checkObjectOption(x.arg!, objectIds);
        if (err !== null) return fail(err);
        break;
      }
      case 257: imageOpts = true; break;
      default:
        io.stdout(usageText());
        return 1;
    }
  }
  const rest = g.rest();
  if (rest.length > 1) {
    io.stdout(usageText());
    return 1;
  }
  if (format !== undefined && imageOpts) return fail('--image-opts and -f are mutually exclusive');

  const s = new Session(io, io.makeGraph ? io.makeGraph() : defaultGraph());
  // Errors from closing nodes (QEMU's error_report during bdrv_close) reach the user, not the void.
  s.graph.onError = (m) => io.stderr(`${PROG}: ${m}\n`);
  s.imageOpts = imageOpts;
  let lastError = 0;
  try {
    if (rest.length === 1) {
      let ok: boolean;
      if (imageOpts) {
        let opts: BlockdevOptions;
        try {
          opts = parseOptionString(rest[0]!, (m) => s.report(`warning: ${m}`));
        } catch (e) {
          return fail(toBlockError(e).message);
        }
        ok = await openFile(s, undefined, o, opts);
      } else {
        ok = await openFile(s, rest[0]!, o, format !== undefined ? { driver: format } : undefined);
      }
      if (!ok) return 1;
    }
    if (cmds.length > 0) {
      for (const c of cmds) {
        if (s.quit) break;
        const r = await runCommand(s, c);
        if (r < 0) lastError = r;
      }
    } else {
      const lines = io.stdinLines?.();
      for (;;) {
        if (s.quit) break;
        io.stdout(`${PROG}> `);
        const next = lines ? await lines.next() : { done: true as const, value: undefined };
        if (next.done) break;
        const r = await runCommand(s, next.value);
        if (r < 0) lastError = r;
      }
    }
    await s.drainAio();
  } catch (e) {
    if (e instanceof Terminated) {
      return 128 + (osConstants.signals[e.signal as keyof typeof osConstants.signals] ?? 0);
    }
    throw e;
  } finally {
    if (s.blk) await s.blk.close().catch(() => undefined);
    await s.graph.closeAll().catch(() => undefined);
  }
  return lastError < 0 ? 1 : 0;
}
