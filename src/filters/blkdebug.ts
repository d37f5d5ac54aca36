/**
 * blkdebug: rule-based error injection and breakpoints (QEMU's block/blkdebug.c).
 *
 * Format drivers announce interesting moments ("l2_update", "refblock_alloc",
 * "write_aio"…) with blkdebugEvent() on their `file` child; the generic
 * request path announces its own ("pwritev", "flush_to_disk", "cor_write"…).
 * The announcement travels down the primary children to a blkdebug node, which
 * runs the rules registered for that event:
 *
 * - `inject-error` rules arm themselves, and the next request reaching the
 *   blkdebug node that matches the rule's I/O type and sector fails with its
 *   errno (every time, or `once`);
 * - `set-state` rules move a small integer state machine, so later rules can
 *   match only on the second write or only after a flush;
 * - breakpoints (`blkdebugBreak`) suspend the announcing request until
 *   `blkdebugResume`, which lets tests interleave concurrent requests.
 *
 * Rules come from a config file (the .ini-like `-readconfig` syntax), from
 * `config-text` holding the same text, and from the `inject-error` /
 * `set-state` option lists. The filter also overrides the child's limits
 * (`align`, `max-transfer`, …) so tests can run any driver under awkward
 * alignment, and can take or unshare extra permissions on its child.
 *
 * One deliberate difference: QEMU's `immediately` only skips a coroutine
 * yield before the injected error is returned, which has no observable
 * equivalent here. In qblock an `immediately` rule instead fails the event
 * call itself, so the driver operation that announced the event fails before
 * it issues any I/O; on the `none` event (announced by open, where nobody
 * could observe that) it arms like an ordinary rule.
 */
import type { BlockDriver, ReopenState } from '../core/driver.ts';
import { BdrvChild, defaultChildPerms } from '../core/child.ts';
import { BlockError, ERRNO, toBlockError, type ErrnoCode } from '../core/errors.ts';
import { bdrvDebugEvent, bdrvGetLength, bdrvPdiscard, bdrvPreadv, bdrvPwritev, bdrvPwriteZeroes } from '../core/io.ts';
import type { BlockNode } from '../core/node.ts';
import { parseBool, parseOptionValue } from '../core/options.ts';
import { BLOCK, PERM, REQ, ROLE, type BlockdevOptions, type BlockStatus } from '../core/types.ts';

// ---------------------------------------------------------------------------
// Events and I/O types (QAPI's BlkdebugEvent and BlkdebugIOType)

/** Every event name blkdebug knows, in QAPI's BlkdebugEvent order. */
export const BLKDEBUG_EVENTS = [
  'l1_update',
  'l1_grow_alloc_table',
  'l1_grow_write_table',
  'l1_grow_activate_table',
  'l2_load',
  'l2_update',
  'l2_update_compressed',
  'l2_alloc_cow_read',
  'l2_alloc_write',
  'read_aio',
  'read_backing_aio',
  'read_compressed',
  'write_aio',
  'write_compressed',
  'vmstate_load',
  'vmstate_save',
  'cow_read',
  'cow_write',
  'reftable_load',
  'reftable_grow',
  'reftable_update',
  'refblock_load',
  'refblock_update',
  'refblock_update_part',
  'refblock_alloc',
  'refblock_alloc_hookup',
  'refblock_alloc_write',
  'refblock_alloc_write_blocks',
  'refblock_alloc_write_table',
  'refblock_alloc_switch_table',
  'cluster_alloc',
  'cluster_alloc_bytes',
  'cluster_free',
  'flush_to_os',
  'flush_to_disk',
  'pwritev_rmw_head',
  'pwritev_rmw_after_head',
  'pwritev_rmw_tail',
  'pwritev_rmw_after_tail',
  'pwritev',
  'pwritev_zero',
  'pwritev_done',
  'empty_image_prepare',
  'l1_shrink_write_table',
  'l1_shrink_free_l2_clusters',
  'cor_write',
  'cluster_alloc_space',
  'none',
] as const;

/** A blkdebug event name. */
export type BlkdebugEvent = (typeof BLKDEBUG_EVENTS)[number];

const EVENT_SET: ReadonlySet<string> = new Set(BLKDEBUG_EVENTS);

/**
 * The canonical name of `name`, or undefined if it is not an event. Before
 * QEMU 2.9 the sub-events were spelled with a dot (`l1_grow.alloc_table`);
 * old config files still use that spelling, so dots are read as underscores.
 */
export function blkdebugEventName(name: string): BlkdebugEvent | undefined {
  const n = name.includes('.') ? name.replace(/\./g, '_') : name;
  return EVENT_SET.has(n) ? (n as BlkdebugEvent) : undefined;
}

/** Request kinds an inject-error rule can target, in QAPI's BlkdebugIOType order. */
export const BLKDEBUG_IO_TYPES = ['read', 'write', 'write-zeroes', 'discard', 'flush', 'block-status'] as const;

/** One request kind. */
export type BlkdebugIOType = (typeof BLKDEBUG_IO_TYPES)[number];

function ioBit(t: BlkdebugIOType): number {
  return 1 << BLKDEBUG_IO_TYPES.indexOf(t);
}

/** QEMU's default: every kind except block-status, which was added later and would break old configs. */
const DEFAULT_IOTYPE_MASK = ioBit('read') | ioBit('write') | ioBit('write-zeroes') | ioBit('discard') | ioBit('flush');

// ---------------------------------------------------------------------------
// Rule options as given in blockdev options (QAPI's BlkdebugInjectErrorOptions / BlkdebugSetStateOptions)

/** One `inject-error` rule. Numbers and booleans may also be given as strings, as in config files. */
export interface BlkdebugInjectErrorOptions {
  event: string;
  /** Only fire in this state (0 or absent: any state). */
  state?: number | string;
  /** Only fail this kind of request (absent: all but block-status). */
  iotype?: BlkdebugIOType;
  /** errno to fail with: a Linux number (default 5, EIO) or a name such as 'ENOSPC'. */
  errno?: number | string;
  /** Only fail requests overlapping this 512-byte sector (absent or -1: any). */
  sector?: number | string;
  /** Remove the rule after it failed one request. */
  once?: boolean | string;
  /** Fail the event call itself instead of the next matching request (see the file comment). */
  immediately?: boolean | string;
}

/** One `set-state` rule. */
export interface BlkdebugSetStateOptions {
  event: string;
  state?: number | string;
  new_state: number | string;
}

// ---------------------------------------------------------------------------
// Internal rule and node state

interface InjectRule {
  action: 'inject-error';
  event: BlkdebugEvent;
  state: number;
  errno: number;
  iotypeMask: number;
  /** Byte offset a request must cover, or -1 for any. */
  offset: number;
  once: boolean;
  immediately: boolean;
}

interface SetStateRule {
  action: 'set-state';
  event: BlkdebugEvent;
  state: number;
  newState: number;
}

/** A breakpoint: one-shot, it removes itself when a request reaches it. */
interface SuspendRule {
  action: 'suspend';
  event: BlkdebugEvent;
  state: number;
  tag: string;
}

type Rule = InjectRule | SetStateRule | SuspendRule;

interface SuspendedRequest {
  tag: string;
  resume: () => void;
}

/** Per-node state of a blkdebug node (QEMU's BDRVBlkdebugState). */
class BlkdebugState {
  /** The state machine's value; starts at 1 so rules with state 0 mean "any". */
  state = 1;
  /**
   * Rules per event, newest first. QEMU keeps them in a list it prepends to,
   * and the order decides which set-state wins and which armed error a
   * request meets first, so we keep the same order.
   */
  readonly rules = new Map<BlkdebugEvent, Rule[]>();
  /** Error rules armed by the last event that had any, in definition order. */
  active: InjectRule[] = [];
  readonly suspended: SuspendedRequest[] = [];
  waiters: Array<{ tag: string; resolve: () => void }> = [];
  onMessage: ((msg: string) => void) | null = null;

  align = 0;
  maxTransfer = 0;
  optWriteZero = 0;
  maxWriteZero = 0;
  optDiscard = 0;
  maxDiscard = 0;
  takeChildPerms = 0;
  unshareChildPerms = 0;
  configFile: string | undefined;

  addRule(rule: Rule): void {
    let list = this.rules.get(rule.event);
    if (!list) this.rules.set(rule.event, (list = []));
    list.unshift(rule);
  }

  removeRule(rule: Rule): void {
    const list = this.rules.get(rule.event);
    const i = list ? list.indexOf(rule) : -1;
    if (list && i >= 0) list.splice(i, 1);
    if (rule.action === 'inject-error') {
      const j = this.active.indexOf(rule);
      if (j >= 0) this.active.splice(j, 1);
    }
  }
}

function stateOf(bs: BlockNode): BlkdebugState {
  const s = bs.opaque;
  if (!(s instanceof BlkdebugState)) throw new BlockError('EINVAL', `Node '${bs.nodeName}' is not a blkdebug node`, { node: bs.nodeName });
  return s;
}

/** The first blkdebug node at or below `bs` along primary children (how QEMU finds the node for breakpoints). */
function findBlkdebug(start: BlockNode | BdrvChild | null | undefined): { bs: BlockNode; s: BlkdebugState } {
  const first = start instanceof BdrvChild ? start.bs : start;
  for (let n = first; n; n = n.primaryChild?.bs) {
    if (n.opaque instanceof BlkdebugState) return { bs: n, s: n.opaque };
  }
  throw new BlockError('ENOTSUP', first ? `No blkdebug node at or below '${first.nodeName}'` : undefined);
}

// ---------------------------------------------------------------------------
// Errors

const CODE_BY_ERRNO = new Map<number, ErrnoCode>(Object.entries(ERRNO).map(([k, v]) => [v, k as ErrnoCode]));

function injectedError(bs: BlockNode, errno: number): BlockError {
  const code = CODE_BY_ERRNO.get(errno);
  if (code) return new BlockError(code, undefined, { node: bs.nodeName });
  // An errno qblock has no name for still has to fail the request.
  return new BlockError('EIO', `Injected error (errno ${errno})`, { node: bs.nodeName });
}

// ---------------------------------------------------------------------------
// Option values: numbers, booleans and sizes arrive typed from JSON or as text from config files

function optInt(name: string, v: unknown, def: number): number {
  if (v === undefined) return def;
  if (typeof v === 'number' && Number.isSafeInteger(v)) return v;
  if (typeof v === 'string' && /^\s*-?\d+\s*$/.test(v)) return Number(v);
  throw new BlockError('EINVAL', `Parameter '${name}' expects a number`);
}

function optBool(name: string, v: unknown, def: boolean): boolean {
  if (v === undefined) return def;
  if (typeof v === 'boolean') return v;
  if (typeof v === 'string') return parseBool(name, v);
  throw new BlockError('EINVAL', `Parameter '${name}' expects 'on' or 'off'`);
}

function optSize(name: string, v: unknown): number {
  if (v === undefined) return 0;
  if (typeof v === 'number') {
    if (Number.isSafeInteger(v) && v >= 0) return v;
  } else if (typeof v === 'string') {
    return parseOptionValue({ name, type: 'size' }, v) as number;
  }
  throw new BlockError('EINVAL', `Parameter '${name}' expects a size`);
}

function optErrno(v: unknown): number {
  if (typeof v === 'string' && v in ERRNO) return ERRNO[v as ErrnoCode];
  return optInt('errno', v, ERRNO.EIO);
}

function eventOf(v: unknown): BlkdebugEvent {
  if (v === undefined) throw new BlockError('EINVAL', 'Missing event name for rule');
  const e = typeof v === 'string' ? blkdebugEventName(v) : undefined;
  // QEMU's qapi_enum_parse wording, for rules given in options and in config files alike.
  if (!e) throw new BlockError('EINVAL', `invalid parameter value: ${String(v)}`);
  return e;
}

const INJECT_KEYS: ReadonlySet<string> = new Set(['event', 'state', 'iotype', 'errno', 'sector', 'once', 'immediately']);
const SET_STATE_KEYS: ReadonlySet<string> = new Set(['event', 'state', 'new_state']);

function checkKeys(o: Record<string, unknown>, allowed: ReadonlySet<string>, section: string): void {
  for (const k of Object.keys(o)) {
    // QEMU validates each rule as a QemuOpts group, in its words.
    if (!allowed.has(k)) throw new BlockError('EINVAL', `[${section}] section doesn't support the option '${k}'`);
  }
}

function buildInjectRule(o: Record<string, unknown>): InjectRule {
  checkKeys(o, INJECT_KEYS, 'inject-error');
  const event = eventOf(o.event);
  let iotypeMask = DEFAULT_IOTYPE_MASK;
  if (o.iotype !== undefined) {
    const t = o.iotype;
    if (typeof t !== 'string' || !(BLKDEBUG_IO_TYPES as readonly string[]).includes(t)) {
      throw new BlockError('EINVAL', `invalid parameter value: ${String(t)}`);
    }
    iotypeMask = ioBit(t as BlkdebugIOType);
  }
  const sector = optInt('sector', o.sector, -1);
  return {
    action: 'inject-error',
    event,
    state: optInt('state', o.state, 0),
    errno: optErrno(o.errno),
    iotypeMask,
    offset: sector < 0 ? -1 : sector * 512,
    once: optBool('once', o.once, false),
    immediately: optBool('immediately', o.immediately, false),
  };
}

function buildSetStateRule(o: Record<string, unknown>): SetStateRule {
  checkKeys(o, SET_STATE_KEYS, 'set-state');
  return {
    action: 'set-state',
    event: eventOf(o.event),
    state: optInt('state', o.state, 0),
    newState: optInt('new_state', o.new_state, 0),
  };
}

function ruleList(name: string, v: unknown): Array<Record<string, unknown>> {
  if (v === undefined) return [];
  if (!Array.isArray(v)) throw new BlockError('EINVAL', `${name} expects a list`);
  return v.map((r, i) => {
    if (!r || typeof r !== 'object' || Array.isArray(r)) throw new BlockError('EINVAL', `Invalid parameter type for '${name}[${i}]', expected: object`);
    return r as Record<string, unknown>;
  });
}

const PERM_BY_NAME: Readonly<Record<string, number>> = {
  'consistent-read': PERM.CONSISTENT_READ,
  write: PERM.WRITE,
  'write-unchanged': PERM.WRITE_UNCHANGED,
  resize: PERM.RESIZE,
  'graph-mod': PERM.GRAPH_MOD,
};

function permList(name: string, v: unknown): number {
  if (v === undefined) return 0;
  if (!Array.isArray(v)) throw new BlockError('EINVAL', `${name} expects a list`);
  let mask = 0;
  v.forEach((p, i) => {
    const bit = typeof p === 'string' ? PERM_BY_NAME[p] : undefined;
    if (bit === undefined) throw new BlockError('EINVAL', `Parameter '${name}[${i}]' does not accept value '${String(p)}'`);
    mask |= bit;
  });
  return mask;
}

// ---------------------------------------------------------------------------
// Config files

/** Rules read from a config file: one record of textual values per `[inject-error]` or `[set-state]` section. */
export interface BlkdebugConfig {
  injectErrors: Array<Record<string, string>>;
  setStates: Array<Record<string, string>>;
}

/**
 * Parses blkdebug config text, the .ini-like syntax of QEMU's -readconfig:
 * `[inject-error]` / `[set-state]` section headers (an optional `"id"` after
 * the name is ignored), `key = "value"` lines with the value in double quotes,
 * blank lines and `#` comments. Throws EINVAL "Could not parse blkdebug config
 * file" with the line and reason appended. QEMU insists on a space before `=`
 * and a non-empty value; this parser does not.
 */
export function parseBlkdebugConfig(text: string, source = 'config'): BlkdebugConfig {
  const out: BlkdebugConfig = { injectErrors: [], setStates: [] };
  let current: { keys: ReadonlySet<string>; values: Record<string, string> } | null = null;
  const lines = text.split(/\r?\n/);
  const fail = (lno: number, why: string): never => {
    throw new BlockError('EINVAL', `Could not parse blkdebug config file: ${source}:${lno}: ${why}`);
  };
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i]!;
    const lno = i + 1;
    const trimmed = line.trim();
    if (trimmed === '' || trimmed.startsWith('#')) continue;
    const group = /^\[\s*([^\]\s"]+)(?:\s+"[^"]*")?\s*\]$/.exec(trimmed);
    if (group) {
      const name = group[1]!;
      const values: Record<string, string> = {};
      if (name === 'inject-error') {
        out.injectErrors.push(values);
        current = { keys: INJECT_KEYS, values };
      } else if (name === 'set-state') {
        out.setStates.push(values);
        current = { keys: SET_STATE_KEYS, values };
      } else {
        fail(lno, `There is no option group '${name}'`);
      }
      continue;
    }
    const kv = /^([^\s="]+)\s*=\s*"([^"]*)"$/.exec(trimmed);
    if (!kv) fail(lno, 'parse error');
    if (!current) fail(lno, 'no group defined');
    const key = kv![1]!;
    // QEMU's qemu_config_parse reports an unknown key without the file and line.
    if (!current!.keys.has(key)) throw new BlockError('EINVAL', `Invalid parameter '${key}'`);
    current!.values[key] = kv![2]!;
  }
  return out;
}

/** Reads a config file through Node's fs; in a browser there is no file system to read, so config-text must be used. */
async function readConfigFile(path: string): Promise<string> {
  const proc = (globalThis as { process?: { versions?: { node?: string } } }).process;
  if (!proc?.versions?.node) {
    throw new BlockError('ENOTSUP', 'Could not read blkdebug config file: files can only be read under Node.js; pass the rules in config-text');
  }
  // A computed specifier keeps browser bundlers from trying to resolve node:fs.
  const spec = 'node:fs/promises';
  const fs = (await import(/* @vite-ignore */ spec)) as { readFile(p: string, encoding: 'utf8'): Promise<string> };
  try {
    return await fs.readFile(path, 'utf8');
  } catch (e) {
    const be = toBlockError(e);
    throw new BlockError(be.code, `Could not read blkdebug config file: ${be.message}`, { cause: e });
  }
}

// ---------------------------------------------------------------------------
// Events, rule checks, breakpoints

function suspend(s: BlkdebugState, rule: SuspendRule): Promise<void> {
  s.removeRule(rule);
  return new Promise<void>((resolve) => {
    s.suspended.push({ tag: rule.tag, resume: resolve });
    s.onMessage?.(`blkdebug: Suspended request '${rule.tag}'`);
    const ready = s.waiters.filter((w) => w.tag === rule.tag);
    if (ready.length > 0) {
      s.waiters = s.waiters.filter((w) => w.tag !== rule.tag);
      for (const w of ready) w.resolve();
    }
  });
}

/**
 * Runs the rules of `event` (QEMU's blkdebug_co_debug_event): set-state rules
 * compute the next state from the current one (all see the same current
 * state), the first inject-error rule that matches replaces the armed set,
 * breakpoints suspend the caller until resumed. `fromOpen` arms immediate
 * rules instead of failing, since the open itself announced the event.
 */
async function processEvent(bs: BlockNode, s: BlkdebugState, event: BlkdebugEvent, fromOpen: boolean): Promise<void> {
  const list = s.rules.get(event);
  if (!list || list.length === 0) return;
  let newState = s.state;
  let armedAny = false;
  let immediate: InjectRule | null = null;
  const waits: Array<Promise<void>> = [];
  for (const rule of [...list]) {
    if (rule.state !== 0 && rule.state !== s.state) continue;
    switch (rule.action) {
      case 'inject-error':
        if (rule.immediately && !fromOpen) {
          // Iterating newest first, the last one seen is the earliest defined.
          immediate = rule;
          break;
        }
        if (!armedAny) {
          s.active = [];
          armedAny = true;
        }
        s.active.unshift(rule);
        break;
      case 'set-state':
        newState = rule.newState;
        break;
      case 'suspend':
        waits.push(suspend(s, rule));
        break;
    }
  }
  s.state = newState;
  if (waits.length > 0) await Promise.all(waits);
  if (immediate) {
    if (immediate.once) s.removeRule(immediate);
    if (immediate.errno !== 0) throw injectedError(bs, immediate.errno);
  }
}

/**
 * QEMU's rule_check: the first armed rule that matches the request's type and
 * covers the rule's sector decides. A matching rule with errno 0 lets the
 * request through (and shadows the rules after it).
 */
function ruleCheck(bs: BlockNode, offset: number, bytes: number, iotype: BlkdebugIOType): void {
  const s = stateOf(bs);
  if (s.active.length === 0) return;
  const bit = ioBit(iotype);
  const rule = s.active.find((r) => (r.offset < 0 || (bytes > 0 && r.offset >= offset && r.offset < offset + bytes)) && (r.iotypeMask & bit) !== 0);
  if (!rule || rule.errno === 0) return;
  if (rule.once) s.removeRule(rule);
  throw injectedError(bs, rule.errno);
}

/**
 * Announces `event` (QEMU's BLKDBG_EVENT) from `bs`, normally a format
 * driver's `file` child or its node: the first blkdebug node at or below it
 * runs its rules. Resolves at once when there is none; rejects with EINVAL
 * for an unknown event name, and with the injected error when an
 * `immediately` rule fires; stays pending while a breakpoint holds it.
 */
export function blkdebugEvent(bs: BlockNode | BdrvChild | null | undefined, event: string): Promise<void> {
  const name = blkdebugEventName(event);
  if (!name) return Promise.reject(new BlockError('EINVAL', `Unknown blkdebug event '${event}'`));
  return bdrvDebugEvent(bs instanceof BdrvChild ? bs.bs : bs, name) ?? Promise.resolve();
}

/**
 * Sets a breakpoint (qemu-io `break <event> <tag>`) on the first blkdebug node
 * at or below `bs`: the next request to announce `event` there is suspended
 * under `tag`. Throws ENOENT for an unknown event, ENOTSUP without blkdebug.
 */
export function blkdebugBreak(bs: BlockNode | BdrvChild, event: string, tag: string): void {
  const { s } = findBlkdebug(bs);
  const e = blkdebugEventName(event);
  if (!e) throw new BlockError('ENOENT', `Unknown blkdebug event '${event}'`);
  s.addRule({ action: 'suspend', event: e, state: 0, tag });
}

/**
 * Removes every breakpoint named `tag` and resumes every request suspended
 * under it (qemu-io `remove_break`). Throws ENOENT when no breakpoint was
 * removed, even after resuming requests: a breakpoint is spent once it
 * suspends a request, and QEMU 7.2 answers "Could not remove breakpoint t:
 * No such file or directory" after "blkdebug: Resuming request 't'".
 */
export function blkdebugRemoveBreak(bs: BlockNode | BdrvChild, tag: string): void {
  const { s } = findBlkdebug(bs);
  let found = false;
  for (const list of s.rules.values()) {
    for (const r of [...list]) {
      if (r.action === 'suspend' && r.tag === tag) {
        s.removeRule(r);
        found = true;
      }
    }
  }
  for (const r of s.suspended.filter((x) => x.tag === tag)) resumeOne(s, r);
  if (!found) throw new BlockError('ENOENT', `No breakpoint with tag '${tag}'`);
}

function resumeOne(s: BlkdebugState, r: SuspendedRequest): void {
  const i = s.suspended.indexOf(r);
  if (i >= 0) s.suspended.splice(i, 1);
  s.onMessage?.(`blkdebug: Resuming request '${r.tag}'`);
  r.resume();
}

/** Resumes the oldest request suspended under `tag` (qemu-io `resume`); throws ENOENT if none is. */
export function blkdebugResume(bs: BlockNode | BdrvChild, tag: string): void {
  const { s } = findBlkdebug(bs);
  const r = s.suspended.find((x) => x.tag === tag);
  if (!r) throw new BlockError('ENOENT', `No suspended request with tag '${tag}'`);
  resumeOne(s, r);
}

/** True while a request is suspended under `tag` (the test qemu-io `wait_break` polls). */
export function blkdebugIsSuspended(bs: BlockNode | BdrvChild, tag: string): boolean {
  const { s } = findBlkdebug(bs);
  return s.suspended.some((x) => x.tag === tag);
}

/**
 * Resolves once a request is suspended under `tag` (qemu-io `wait_break`),
 * at once if one already is; rejects with ECANCELED when `signal` fires.
 */
export function blkdebugWaitBreak(bs: BlockNode | BdrvChild, tag: string, signal?: AbortSignal): Promise<void> {
  let s: BlkdebugState;
  try {
    s = findBlkdebug(bs).s;
  } catch (e) {
    return Promise.reject(e);
  }
  if (s.suspended.some((x) => x.tag === tag)) return Promise.resolve();
  if (signal?.aborted) return Promise.reject(new BlockError('ECANCELED'));
  return new Promise<void>((resolve, reject) => {
    const w = {
      tag,
      resolve: () => {
        signal?.removeEventListener('abort', onAbort);
        resolve();
      },
    };
    const onAbort = (): void => {
      s.waiters = s.waiters.filter((x) => x !== w);
      reject(new BlockError('ECANCELED'));
    };
    signal?.addEventListener('abort', onAbort, { once: true });
    s.waiters.push(w);
  });
}

/** The state machine's current value on the first blkdebug node at or below `bs` (for tests and qemu-io style inspection). */
export function blkdebugCurrentState(bs: BlockNode | BdrvChild): number {
  return findBlkdebug(bs).s.state;
}

/**
 * Routes blkdebug's progress messages ("blkdebug: Suspended request 'A'",
 * "blkdebug: Resuming request 'A'", which QEMU prints on stdout) to `fn`,
 * or silences them with null (the default).
 */
export function blkdebugSetMessageHandler(bs: BlockNode | BdrvChild, fn: ((msg: string) => void) | null): void {
  findBlkdebug(bs).s.onMessage = fn;
}

// ---------------------------------------------------------------------------
// The driver

const RUNTIME_KEYS = [
  'image',
  'config',
  'config-text',
  'align',
  'max-transfer',
  'opt-write-zero',
  'max-write-zero',
  'opt-discard',
  'max-discard',
  'inject-error',
  'set-state',
  'take-child-perms',
  'unshare-child-perms',
] as const;

/** Splits `blkdebug:<config>:<image>` (QEMU's blkdebug_parse_filename); the config part may be empty. */
function parseBlkdebugFilename(filename: string, options: Record<string, unknown>): void {
  let rest = filename;
  if (rest.startsWith('blkdebug:')) {
    rest = rest.slice('blkdebug:'.length);
    const c = rest.indexOf(':');
    if (c < 0) throw new BlockError('EINVAL', 'blkdebug requires both config file and image path');
    if (c > 0) options.config = rest.slice(0, c);
    rest = rest.slice(c + 1);
  }
  // A file name (QEMU's x-image), not a node reference as a string "image" option would be.
  options.image = { filename: rest };
}

function checkConstraint(name: string, value: number, multipleOf: number): void {
  if (value && (value >= 0x7fffffff || value % multipleOf !== 0)) {
    throw new BlockError('EINVAL', `Cannot meet constraints with ${name} ${value}`);
  }
}

/** The blkdebug filter driver (QEMU's bdrv_blkdebug). */
export const blkdebugDriver: BlockDriver = {
  name: 'blkdebug',
  kind: 'filter',
  protocolNames: ['blkdebug'],
  hasVariableLength: true,
  runtimeOptions: [
    { name: 'image', type: 'string', help: 'The image to debug (child options or node name); `file` works too' },
    { name: 'config', type: 'string', help: 'Path to the configuration file (Node.js only)' },
    { name: 'config-text', type: 'string', help: 'Configuration file contents' },
    { name: 'align', type: 'size', help: 'Required alignment in bytes' },
    { name: 'max-transfer', type: 'size', help: 'Maximum transfer size in bytes' },
    { name: 'opt-write-zero', type: 'size', help: 'Optimum write zero alignment in bytes' },
    { name: 'max-write-zero', type: 'size', help: 'Maximum write zero size in bytes' },
    { name: 'opt-discard', type: 'size', help: 'Optimum discard alignment in bytes' },
    { name: 'max-discard', type: 'size', help: 'Maximum discard size in bytes' },
    { name: 'inject-error', type: 'string', help: 'List of error injection rules' },
    { name: 'set-state', type: 'string', help: 'List of state transition rules' },
    { name: 'take-child-perms', type: 'string', help: 'Permissions to take on the image in addition to what parents need' },
    { name: 'unshare-child-perms', type: 'string', help: 'Permissions not to share on the image' },
  ],

  parseFilename(filename, options) {
    parseBlkdebugFilename(filename, options);
  },

  async open(bs, options) {
    const s = new BlkdebugState();
    bs.opaque = s;
    if (typeof options.filename === 'string' && options.image === undefined && options.file === undefined && bs.options.file === undefined) {
      parseBlkdebugFilename(options.filename, options);
    }

    // Rules: config file, then config text, then the option lists; inject-error before set-state, as QEMU adds them.
    const injects: Array<Record<string, unknown>> = [];
    const sets: Array<Record<string, unknown>> = [];
    if (options.config !== undefined) {
      if (typeof options.config !== 'string') throw new BlockError('EINVAL', "Parameter 'config' expects a string");
      s.configFile = options.config;
      const cfg = parseBlkdebugConfig(await readConfigFile(options.config), options.config);
      injects.push(...cfg.injectErrors);
      sets.push(...cfg.setStates);
    }
    if (options['config-text'] !== undefined) {
      if (typeof options['config-text'] !== 'string') throw new BlockError('EINVAL', "Parameter 'config-text' expects a string");
      const cfg = parseBlkdebugConfig(options['config-text'], 'config-text');
      injects.push(...cfg.injectErrors);
      sets.push(...cfg.setStates);
    }
    injects.push(...ruleList('inject-error', options['inject-error']));
    sets.push(...ruleList('set-state', options['set-state']));
    for (const r of injects) s.addRule(buildInjectRule(r));
    for (const r of sets) s.addRule(buildSetStateRule(r));
    s.state = 1;

    // Permission modifiers must be known before the child is attached, which computes its permissions.
    s.takeChildPerms = permList('take-child-perms', options['take-child-perms']);
    s.unshareChildPerms = permList('unshare-child-perms', options['unshare-child-perms']);

    const fileSpec = (options.file ?? bs.options.file) as BlockdevOptions | string | undefined;
    const imageSpec = options.image as BlockdevOptions | string | undefined;
    if (imageSpec !== undefined && fileSpec !== undefined) {
      throw new BlockError('EINVAL', "Cannot specify both 'image' and 'file' for blkdebug");
    }
    const spec = imageSpec ?? fileSpec;
    if (spec === undefined) throw new BlockError('EINVAL', 'A block device must be specified for "image"');
    // The child is named 'file' whatever option named it, so the engine finds it as bs.file.
    const child = (await bs.graph.openChild(bs, spec, 'file', ROLE.FILTERED | ROLE.PRIMARY))!;

    bs.supportedWriteFlags = REQ.WRITE_UNCHANGED | (REQ.FUA & child.bs.supportedWriteFlags);
    bs.supportedZeroFlags = REQ.WRITE_UNCHANGED | ((REQ.FUA | REQ.MAY_UNMAP | REQ.NO_FALLBACK) & child.bs.supportedZeroFlags);

    s.align = optSize('align', options.align);
    if (s.align && (s.align >= 0x7fffffff || (s.align & (s.align - 1)) !== 0)) {
      throw new BlockError('EINVAL', `Cannot meet constraints with align ${s.align}`);
    }
    const align = Math.max(s.align, child.bs.bl.requestAlignment);
    s.maxTransfer = optSize('max-transfer', options['max-transfer']);
    checkConstraint('max-transfer', s.maxTransfer, align);
    s.optWriteZero = optSize('opt-write-zero', options['opt-write-zero']);
    checkConstraint('opt-write-zero', s.optWriteZero, align);
    s.maxWriteZero = optSize('max-write-zero', options['max-write-zero']);
    checkConstraint('max-write-zero', s.maxWriteZero, Math.max(s.optWriteZero, align));
    s.optDiscard = optSize('opt-discard', options['opt-discard']);
    checkConstraint('opt-discard', s.optDiscard, align);
    s.maxDiscard = optSize('max-discard', options['max-discard']);
    checkConstraint('max-discard', s.maxDiscard, Math.max(s.optDiscard, align));

    const simple = Object.keys(options).every((k) => k === 'image' || k === 'file' || k === 'config' || k === 'filename');
    if (simple && child.bs.filename) bs.filename = `blkdebug:${s.configFile ?? ''}:${child.bs.filename}`;

    await processEvent(bs, s, 'none', true);
  },

  async close(bs) {
    const s = bs.opaque;
    if (!(s instanceof BlkdebugState)) return;
    s.rules.clear();
    s.active = [];
    // Nothing can be suspended here (close drains first), but never leave a waiter hanging.
    for (const r of s.suspended.splice(0)) r.resume();
    s.waiters = [];
  },

  refreshLimits(bs) {
    const s = stateOf(bs);
    if (s.align) bs.bl.requestAlignment = s.align;
    if (s.maxTransfer) bs.bl.maxTransfer = s.maxTransfer;
    if (s.optWriteZero) bs.bl.pwriteZeroesAlignment = s.optWriteZero;
    if (s.maxWriteZero) bs.bl.maxPwriteZeroes = s.maxWriteZero;
    if (s.optDiscard) bs.bl.pdiscardAlignment = s.optDiscard;
    if (s.maxDiscard) bs.bl.maxPdiscard = s.maxDiscard;
  },

  childPerm(bs, _child, role, perm, shared) {
    const r = defaultChildPerms(bs, role, perm, shared, !bs.readOnly);
    const s = bs.opaque;
    if (s instanceof BlkdebugState) {
      r.perm |= s.takeChildPerms;
      r.shared &= ~s.unshareChildPerms;
    }
    return r;
  },

  async getLength(bs) {
    return bdrvGetLength(bs.file!.bs);
  },

  async preadv(bs, offset, bytes, buf, flags, signal) {
    ruleCheck(bs, offset, bytes, 'read');
    await bdrvPreadv(bs.file!, offset, bytes, buf, flags, signal);
  },

  async pwritev(bs, offset, bytes, buf, flags, signal) {
    ruleCheck(bs, offset, bytes, 'write');
    await bdrvPwritev(bs.file!, offset, bytes, buf, flags, signal);
  },

  async pwriteZeroes(bs, offset, bytes, flags) {
    // Small requests are refused so the generic layer's write fallback gets exercised, as in QEMU.
    if (bytes < Math.max(bs.bl.requestAlignment, bs.bl.pwriteZeroesAlignment)) throw new BlockError('ENOTSUP', undefined, { node: bs.nodeName });
    ruleCheck(bs, offset, bytes, 'write-zeroes');
    await bdrvPwriteZeroes(bs.file!, offset, bytes, flags);
  },

  async pdiscard(bs, offset, bytes) {
    if (bytes < bs.bl.requestAlignment) throw new BlockError('ENOTSUP', undefined, { node: bs.nodeName });
    ruleCheck(bs, offset, bytes, 'discard');
    await bdrvPdiscard(bs.file!, offset, bytes);
  },

  async flushToDisk(bs) {
    // The child is flushed by the generic path after this.
    ruleCheck(bs, 0, 0, 'flush');
  },

  async blockStatus(bs, _wantZero, offset, bytes): Promise<BlockStatus> {
    ruleCheck(bs, offset, bytes, 'block-status');
    return { status: BLOCK.RAW | BLOCK.OFFSET_VALID, pnum: bytes, map: offset, file: bs.file!.bs };
  },

  async debugEvent(bs, event) {
    const e = blkdebugEventName(event);
    if (!e) throw new BlockError('EINVAL', `Unknown blkdebug event '${event}'`);
    await processEvent(bs, stateOf(bs), e, false);
  },

  async reopenPrepare(state: ReopenState) {
    // Rules and limits are fixed for the node's lifetime (QEMU's strong runtime options).
    for (const [k, v] of Object.entries(state.options)) {
      if ((RUNTIME_KEYS as readonly string[]).includes(k) && JSON.stringify(v) !== JSON.stringify(state.bs.options[k])) {
        throw new BlockError('EINVAL', `Cannot change the option '${k}'`, { node: state.bs.nodeName });
      }
    }
  },
};
