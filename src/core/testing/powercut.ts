/**
 * The `powercut` test protocol: storage with a volatile write cache. Writes,
 * zero writes, discards and truncates land in an ordered list of pending
 * operations that reads see but that reach the durable bytes only at a
 * flush, like a disk whose cache is lost at power failure.
 *
 * crashImage() computes what the durable medium could hold if the power
 * were cut right now: the durable bytes plus a chosen subset of the pending
 * operations. The `drop` model loses all of them; the `torn` model keeps
 * each 512-byte sector of each pending operation independently at random
 * (applied in issue order, so a later write to a sector still wins over an
 * earlier one), which is what a disk that reorders its cache may persist.
 * Metadata that is correctly ordered by flushes survives both.
 *
 * Stores are named (option `name`) and live in a module registry until
 * deletePowercutStore(), so a test keeps the store after closing the node.
 */
import type { BlockDriver } from '../driver.ts';
import { BlockError } from '../errors.ts';
import type { BlockNode } from '../node.ts';
import { MemoryStore } from '../../protocols/memory.ts';

type PendingOp =
  | { kind: 'write'; offset: number; data: Uint8Array }
  | { kind: 'zero'; offset: number; bytes: number }
  | { kind: 'truncate'; length: number };

/** Crash models for crashImage(). */
export type CrashModel = 'drop' | 'torn';

/** A disk with a volatile cache. */
export class PowercutStore {
  readonly durable: MemoryStore;
  pending: PendingOp[] = [];
  /** Counters tests use to pick cut points. */
  writes = 0;
  flushes = 0;
  /** Called after every write-like operation and flush reaches the store (the places a cut can happen). */
  onEvent: ((store: PowercutStore, kind: 'write' | 'flush') => void) | undefined = undefined;

  constructor(initial?: Uint8Array) {
    this.durable = new MemoryStore(null, 0);
    if (initial) {
      this.durable.resize(initial.length);
      this.durable.write(0, initial);
    }
  }

  /** Current length as reads see it (durable length changed by pending truncates and writes). */
  get length(): number {
    let len = this.durable.length;
    for (const op of this.pending) {
      if (op.kind === 'truncate') len = op.length;
      else if (op.kind === 'write') len = Math.max(len, op.offset + op.data.length);
      else len = Math.max(len, op.offset + op.bytes);
    }
    return len;
  }

  /** Reads through the cache: durable bytes overlaid with the pending operations in order. */
  read(offset: number, buf: Uint8Array): void {
    this.durable.read(offset, buf);
    let len = this.durable.length;
    const end = offset + buf.length;
    for (const op of this.pending) {
      if (op.kind === 'truncate') {
        // Bytes cut off and grown back read as zero.
        if (op.length < len) {
          const a = Math.max(offset, op.length);
          if (a < end) buf.fill(0, a - offset);
        }
        len = op.length;
        continue;
      }
      const o = op.offset;
      const n = op.kind === 'write' ? op.data.length : op.bytes;
      const a = Math.max(o, offset);
      const b = Math.min(o + n, end);
      if (a < b) {
        if (op.kind === 'write') buf.set(op.data.subarray(a - o, b - o), a - offset);
        else buf.fill(0, a - offset, b - offset);
      }
      len = Math.max(len, o + n);
    }
    if (len < end) buf.fill(0, Math.max(0, len - offset));
  }

  private event(kind: 'write' | 'flush'): void {
    if (kind === 'write') this.writes++;
    else this.flushes++;
    this.onEvent?.(this, kind);
  }

  /** Queues a write. */
  write(offset: number, data: Uint8Array): void {
    this.pending.push({ kind: 'write', offset, data: data.slice() });
    this.event('write');
  }

  /** Queues a zero write (a discard is one too: the range reads as zeroes afterwards). */
  zero(offset: number, bytes: number): void {
    this.pending.push({ kind: 'zero', offset, bytes });
    this.event('write');
  }

  /** Queues a length change. */
  truncate(length: number): void {
    this.pending.push({ kind: 'truncate', length });
    this.event('write');
  }

  /** Makes every pending operation durable. */
  flush(): void {
    for (const op of this.pending) applyOp(this.durable, op);
    this.pending = [];
    this.event('flush');
  }

  /** The bytes a power cut now could leave on the medium (see the file comment for the models). */
  crashImage(model: CrashModel, random: () => number = Math.random): Uint8Array {
    const m = new MemoryStore(null, 0);
    m.resize(this.durable.length);
    const all = new Uint8Array(this.durable.length);
    this.durable.read(0, all);
    m.write(0, all);
    if (model === 'torn') {
      for (const op of this.pending) {
        if (op.kind === 'truncate') {
          // A length change is metadata of the host file system: it happens or not.
          if (random() < 0.5) applyOp(m, op);
          continue;
        }
        const n = op.kind === 'write' ? op.data.length : op.bytes;
        for (let s = 0; s < n; s += 512) {
          if (random() >= 0.5) continue;
          const len = Math.min(512, n - s);
          if (op.kind === 'write') m.write(op.offset + s, op.data.subarray(s, s + len));
          else m.zero(op.offset + s, len, false);
        }
      }
    }
    const out = new Uint8Array(m.length);
    m.read(0, out);
    return out;
  }
}

function applyOp(m: MemoryStore, op: PendingOp): void {
  if (op.kind === 'write') m.write(op.offset, op.data);
  else if (op.kind === 'zero') m.zero(op.offset, op.bytes, false);
  else m.resize(op.length);
}

const registry = new Map<string, PowercutStore>();

/** Registers a store under `name` (replacing any), optionally starting from `initial` bytes. */
export function newPowercutStore(name: string, initial?: Uint8Array): PowercutStore {
  const s = new PowercutStore(initial);
  registry.set(name, s);
  return s;
}

/** Forgets a named store. */
export function deletePowercutStore(name: string): void {
  registry.delete(name);
}

function store(bs: BlockNode): PowercutStore {
  const s = bs.opaque as PowercutStore | undefined;
  if (!s) throw new BlockError('ENOMEDIUM', undefined, { node: bs.nodeName });
  return s;
}

/** The powercut protocol driver (tests only). */
export const powercutDriver: BlockDriver = {
  name: 'powercut',
  kind: 'protocol',
  protocolNames: ['powercut'],
  hasVariableLength: true,
  runtimeOptions: [{ name: 'name', type: 'string', help: 'Name of a store made with newPowercutStore' }],

  parseFilename(filename, options) {
    options.name = filename.replace(/^powercut:/, '');
  },

  async open(bs, options) {
    const name = String(options.name ?? '');
    const s = registry.get(name);
    if (!s) throw new BlockError('ENOENT', `No powercut store named '${name}'`);
    bs.opaque = s;
    bs.filename = `powercut:${name}`;
  },

  async preadv(bs, offset, bytes, buf) {
    store(bs).read(offset, buf.subarray(0, bytes));
  },

  async pwritev(bs, offset, bytes, buf) {
    store(bs).write(offset, buf.subarray(0, bytes));
  },

  async pwriteZeroes(bs, offset, bytes) {
    store(bs).zero(offset, bytes);
  },

  async pdiscard(bs, offset, bytes) {
    const s = store(bs);
    const end = Math.min(offset + bytes, s.length);
    if (end > offset) s.zero(offset, end - offset);
  },

  async flushToDisk(bs) {
    store(bs).flush();
  },

  async truncate(bs, offset) {
    store(bs).truncate(offset);
  },

  async getLength(bs) {
    return store(bs).length;
  },

  hasZeroInit() {
    return true;
  },

  async reopenPrepare() {
    // Nothing depends on the read-only state.
  },

  async close(bs) {
    bs.opaque = undefined;
  },
};
