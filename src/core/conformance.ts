/**
 * The shared behaviour suite every protocol, format and filter runs (the way
 * wa-sqlite runs one VFS suite against every VFS). It is framework-agnostic:
 * each case is a plain async function that throws on failure, so the same
 * cases run as vitest `it`s and inside a browser worker under Playwright.
 *
 * A target declares which groups of cases apply to it (a null device cannot
 * keep data, a fixed window cannot be resized); runners pick cases by group,
 * and must not skip silently — see casesFor().
 *
 * Data is checked against a flat byte model. For concurrent requests the
 * check claims only what QEMU guarantees: requests that do not overlap land
 * exactly; where requests overlap every byte comes from one of them; a single
 * write of aligned whole blocks is never torn inside a block.
 */
import fc from 'fast-check';
import type { BlockBackend } from './block-backend.ts';
import { REQ } from './types.ts';

/** Groups of cases; a target lists the ones it supports. */
export type ConformanceGroup =
  /** Reads return what was written (byte model, odd offsets, concurrency, random sequences). */
  | 'read-write'
  /** A freshly opened image reads as zeroes everywhere. */
  | 'zero-init'
  /** pwriteZeroes makes ranges read as zero, with and without MAY_UNMAP. */
  | 'write-zeroes'
  /** pdiscard leaves bytes unchanged or zero (zero in whole blocks when the target says so). */
  | 'discard'
  /** flush succeeds, also concurrently with writes. */
  | 'flush'
  /** truncate grows and shrinks; new space reads as zero. */
  | 'truncate'
  /** truncate with preallocation full/falloc. */
  | 'truncate-prealloc'
  /** BlockBackend range checks, zero-length requests and cancellation. */
  | 'range-checks'
  /** Writes are accepted and dropped; reads return zeroes (null-co with read-zeroes). */
  | 'sink-zero';

/** Every group, so runners can check each one is exercised by some target. */
export const CONFORMANCE_GROUPS: readonly ConformanceGroup[] = [
  'read-write',
  'zero-init',
  'write-zeroes',
  'discard',
  'flush',
  'truncate',
  'truncate-prealloc',
  'range-checks',
  'sink-zero',
];

/** One opened image under test. */
export interface ConformanceImage {
  blk: BlockBackend;
  /** Closes the backend and frees whatever open() made (files, stores). */
  close(): Promise<void>;
}

/** A driver stack the suite runs against. */
export interface ConformanceTarget {
  readonly name: string;
  /** Groups of cases that apply; must not be empty. */
  readonly groups: readonly ConformanceGroup[];
  /**
   * When set, discard zeroes every whole block of this many bytes (aligned in
   * the image's offsets) inside the discarded range; 1 means exactly the range.
   * Bytes in partial blocks, and all bytes when unset, may keep their data or
   * read as zero: QEMU only passes aligned fragments down and discard is advisory.
   */
  readonly discardZeroBlock?: number;
  /** Request alignment of the storage at the bottom of the stack (default 1). */
  readonly alignment?: number;
  /** Opens a fresh, writable image of at least 256 KiB; each case opens its own. */
  open(): Promise<ConformanceImage>;
}

/** One case of the suite. */
export interface ConformanceCase {
  readonly name: string;
  readonly group: ConformanceGroup;
  run(t: ConformanceTarget): Promise<void>;
}

// ---------------------------------------------------------------------------
// Assertions (no test framework: they throw plain Errors with context)

/** Thrown when a conformance check fails. */
export class ConformanceError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'ConformanceError';
  }
}

/** Throws ConformanceError(message) unless cond holds. */
export function check(cond: boolean, message: string): asserts cond {
  if (!cond) throw new ConformanceError(message);
}

function hex(n: number): string {
  return `0x${n.toString(16)}`;
}

/** Throws with the first differing offset unless the byte arrays are equal. */
export function checkBytes(actual: Uint8Array, expected: Uint8Array, what: string, base = 0): void {
  check(actual.length === expected.length, `${what}: length ${actual.length}, expected ${expected.length}`);
  for (let i = 0; i < actual.length; i++) {
    if (actual[i] !== expected[i]) {
      let j = i;
      while (j < actual.length && actual[j] !== expected[j]) j++;
      throw new ConformanceError(
        `${what}: byte at ${base + i} (${hex(base + i)}) is ${actual[i]}, expected ${expected[i]} ` +
          `(${j - i} differing bytes from there)`,
      );
    }
  }
}

/** The error code of whatever `p` rejects with, or 'resolved'. */
async function outcome(p: Promise<unknown>): Promise<string> {
  try {
    await p;
    return 'resolved';
  } catch (e) {
    const code = (e as { code?: unknown } | null)?.code;
    return typeof code === 'string' ? code : `non-coded error: ${String(e)}`;
  }
}

/** Throws unless `p` rejects with `code`. */
export async function checkRejects(p: Promise<unknown>, code: string, what: string): Promise<void> {
  const got = await outcome(p);
  check(got === code, `${what}: expected ${code}, got ${got}`);
}

// ---------------------------------------------------------------------------
// Model and data

/** Deterministic byte generator (mulberry32), so failures reproduce. */
export class Prng {
  private s: number;
  constructor(seed: number) {
    this.s = seed >>> 0;
  }
  /** Next 32-bit unsigned value. */
  next(): number {
    this.s = (this.s + 0x6d2b79f5) >>> 0;
    let t = this.s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return (t ^ (t >>> 14)) >>> 0;
  }
  /** Integer in [lo, hi]. */
  int(lo: number, hi: number): number {
    return lo + (this.next() % (hi - lo + 1));
  }
  /** Non-zero bytes, so a write is never mistaken for zeroes or a hole. */
  bytes(n: number): Uint8Array {
    const b = new Uint8Array(n);
    for (let i = 0; i < n; i++) b[i] = 1 + (this.next() % 255);
    return b;
  }
}

/** The expected contents of an image: a flat byte array that follows every request. */
export class FlatModel {
  bytes: Uint8Array;
  constructor(initial: Uint8Array) {
    this.bytes = initial.slice();
  }
  get length(): number {
    return this.bytes.length;
  }
  /** Applies a write. */
  write(offset: number, data: Uint8Array): void {
    this.bytes.set(data, offset);
  }
  /** Applies a zero write. */
  zero(offset: number, bytes: number): void {
    this.bytes.fill(0, offset, offset + bytes);
  }
  /** Applies a resize: new space is zero. */
  resize(size: number): void {
    const n = new Uint8Array(size);
    n.set(this.bytes.subarray(0, Math.min(size, this.bytes.length)));
    this.bytes = n;
  }
  /** Expected bytes of a range. */
  read(offset: number, bytes: number): Uint8Array {
    return this.bytes.subarray(offset, offset + bytes);
  }
}

/** Whether byte `abs` of a discard of [off, off+n) must read as zero on target `t`. */
function discardMustZero(t: ConformanceTarget, off: number, n: number, abs: number): boolean {
  const block = t.discardZeroBlock;
  if (block === undefined) return false;
  const start = abs - (abs % block);
  return start >= off && start + block <= off + n;
}

/** Checks a range read back after discard and returns it, so callers can adopt it into the model. */
function checkDiscarded(t: ConformanceTarget, model: FlatModel, off: number, n: number, got: Uint8Array, what: string): void {
  for (let i = 0; i < n; i++) {
    const abs = off + i;
    const old = model.bytes[abs]!;
    if (discardMustZero(t, off, n, abs)) {
      check(got[i] === 0, `${what}: byte ${abs} is ${got[i]}, expected 0 (whole ${t.discardZeroBlock}-byte block discarded)`);
    } else {
      check(got[i] === old || got[i] === 0, `${what}: byte ${abs} is ${got[i]}, neither its old value ${old} nor 0`);
    }
  }
}

/** Reads the whole image in 1 MiB pieces. */
async function readAll(blk: BlockBackend): Promise<Uint8Array> {
  const len = await blk.getLength();
  const out = new Uint8Array(len);
  const step = 1 << 20;
  for (let off = 0; off < len; off += step) {
    await blk.pread(off, out.subarray(off, Math.min(len, off + step)));
  }
  return out;
}

/** Checks the whole image against the model. */
async function checkImage(blk: BlockBackend, model: FlatModel, what: string): Promise<void> {
  const len = await blk.getLength();
  check(len === model.length, `${what}: image length ${len}, expected ${model.length}`);
  checkBytes(await readAll(blk), model.bytes, what);
}

/** Runs `fn` on a freshly opened image and always closes it. */
async function withImage(t: ConformanceTarget, fn: (blk: BlockBackend) => Promise<void>): Promise<void> {
  const img = await t.open();
  let failure: unknown = null;
  try {
    await fn(img.blk);
  } catch (e) {
    failure = e;
  }
  try {
    await img.close();
  } catch (e) {
    failure ??= e;
  }
  if (failure !== null) throw failure;
}

/** Opens an image, checks the minimum size, and seeds a model from its current contents. */
async function withModel(t: ConformanceTarget, fn: (blk: BlockBackend, model: FlatModel) => Promise<void>): Promise<void> {
  await withImage(t, async (blk) => {
    const len = await blk.getLength();
    check(len >= 256 * 1024, `target image is ${len} bytes; the suite needs at least 256 KiB`);
    const model = new FlatModel(await readAll(blk));
    await fn(blk, model);
  });
}

/**
 * Rounds a length for truncate up to the storage alignment, and at least to
 * whole 512-byte sectors: QEMU keeps lengths in sectors (bs->total_sectors),
 * so an odd length reads back rounded up (see the odd-size truncate case).
 * On storage with a larger alignment, an image whose length is not a multiple
 * of it grows to the next multiple when its last block is written (the
 * read-modify-write covers the whole block, and QEMU grows the node to the
 * end of what was written), so the suite only uses aligned lengths there.
 */
function alignedSize(t: ConformanceTarget, n: number): number {
  const a = Math.max(t.alignment ?? 1, 512);
  return Math.ceil(n / a) * a;
}

/** Lengths every driver must handle, around sector and page edges. */
const ODD_LENGTHS = [1, 511, 513, 4095, 4097, 65537];

/** Odd offsets spread over an image of `len` bytes, each leaving room for `bytes`. */
function oddOffsets(len: number, bytes: number): number[] {
  const max = len - bytes;
  const cands = [1, 511, 4097, 65535, 65537, Math.floor(max / 2) | 1, max];
  return [...new Set(cands.filter((o) => o >= 0 && o <= max))];
}

// ---------------------------------------------------------------------------
// Cases

const readWriteCases: ConformanceCase[] = [
  {
    name: 'writes and reads at odd offsets and lengths match the model',
    group: 'read-write',
    run: (t) =>
      withModel(t, async (blk, model) => {
        const rng = new Prng(1);
        for (const n of ODD_LENGTHS) {
          for (const off of oddOffsets(model.length, n)) {
            const data = rng.bytes(n);
            await blk.pwrite(off, data);
            model.write(off, data);
            // Read back a little around the write too, so damage to neighbours shows up here.
            const lo = Math.max(0, off - 700);
            const hi = Math.min(model.length, off + n + 700);
            checkBytes(await blk.read(lo, hi - lo), model.read(lo, hi - lo), `after write(${off}, ${n})`, lo);
            checkBytes(await blk.read(off, n), data, `read(${off}, ${n})`, off);
          }
        }
        await checkImage(blk, model, 'whole image after odd writes');
      }),
  },
  {
    name: 'unaligned reads of written data return the right slices',
    group: 'read-write',
    run: (t) =>
      withModel(t, async (blk, model) => {
        const rng = new Prng(2);
        const data = rng.bytes(200_000);
        await blk.pwrite(0, data);
        model.write(0, data);
        for (const n of ODD_LENGTHS) {
          for (const off of oddOffsets(200_000, n)) {
            checkBytes(await blk.read(off, n), model.read(off, n), `read(${off}, ${n})`, off);
          }
        }
      }),
  },
  {
    name: 'the last byte and the last 4097 bytes of the image can be written and read',
    group: 'read-write',
    run: (t) =>
      withModel(t, async (blk, model) => {
        const rng = new Prng(3);
        const len = model.length;
        const one = rng.bytes(1);
        await blk.pwrite(len - 1, one);
        model.write(len - 1, one);
        const tail = rng.bytes(4097);
        await blk.pwrite(len - 4097, tail);
        model.write(len - 4097, tail);
        checkBytes(await blk.read(len - 8192, 8192), model.read(len - 8192, 8192), 'tail of the image', len - 8192);
        check((await blk.getLength()) === len, 'writing up to EOF changed the length');
      }),
  },
  {
    name: 'zero-length reads and writes succeed anywhere up to EOF and change nothing',
    group: 'read-write',
    run: (t) =>
      withModel(t, async (blk, model) => {
        const len = model.length;
        for (const off of [0, 1, 4097, len - 1, len]) {
          await blk.pwrite(off, new Uint8Array(0));
          await blk.pread(off, new Uint8Array(0));
          await blk.pwriteZeroes(off, 0);
        }
        await checkImage(blk, model, 'after zero-length requests');
      }),
  },
  {
    name: 'concurrent non-overlapping unaligned writes, packed into shared blocks, all land',
    group: 'read-write',
    run: (t) =>
      withModel(t, async (blk, model) => {
        const rng = new Prng(4);
        // Writes of 1..700 bytes packed end to end: neighbours share sectors and pages, so a
        // read-modify-write that is not serialised would lose one of them.
        const writes: Array<{ off: number; data: Uint8Array }> = [];
        let pos = 3;
        while (writes.length < 64) {
          const n = rng.int(1, 700);
          writes.push({ off: pos, data: rng.bytes(n) });
          pos += n + rng.int(0, 2);
        }
        await Promise.all(writes.map((w) => blk.pwrite(w.off, w.data)));
        for (const w of writes) model.write(w.off, w.data);
        await checkImage(blk, model, 'after concurrent disjoint writes');
      }),
  },
  {
    name: 'concurrent overlapping writes leave every byte from one of the writers',
    group: 'read-write',
    run: (t) =>
      withModel(t, async (blk, model) => {
        const rng = new Prng(5);
        const base = 10_001;
        const span = 40_000;
        const writes: Array<{ off: number; data: Uint8Array }> = [];
        for (let i = 0; i < 24; i++) {
          const n = rng.int(1, 9000);
          const off = base + rng.int(0, span - n);
          // Each writer fills with one value, so the writer of every byte can be told.
          writes.push({ off, data: new Uint8Array(n).fill(i + 1) });
        }
        await Promise.all(writes.map((w) => blk.pwrite(w.off, w.data)));
        const got = await blk.read(base, span);
        for (let i = 0; i < span; i++) {
          const abs = base + i;
          const covering = writes.filter((w) => w.off <= abs && abs < w.off + w.data.length).map((w) => w.data[0]!);
          if (covering.length === 0) {
            check(got[i] === model.bytes[abs], `byte ${abs} not covered by any write changed from ${model.bytes[abs]} to ${got[i]}`);
          } else {
            check(covering.includes(got[i]!), `byte ${abs} is ${got[i]}, which none of the writers covering it (${covering.join(',')}) wrote`);
          }
        }
        // Outside the window nothing may change.
        model.bytes.set(got, base);
        await checkImage(blk, model, 'outside the overlapping writes');
      }),
  },
  {
    name: 'concurrent writes of the same aligned blocks are not torn inside a block',
    group: 'read-write',
    run: (t) =>
      withModel(t, async (blk, model) => {
        const block = Math.max(512, t.alignment ?? 1);
        const blocks = 4;
        const off = block * 8;
        const writers = 12;
        await Promise.all(
          Array.from({ length: writers }, (_, i) => blk.pwrite(off, new Uint8Array(block * blocks).fill(i + 1))),
        );
        const got = await blk.read(off, block * blocks);
        for (let b = 0; b < blocks; b++) {
          const v = got[b * block]!;
          check(v >= 1 && v <= writers, `block ${b} starts with ${v}, which no writer wrote`);
          for (let i = 0; i < block; i++) {
            check(got[b * block + i] === v, `block ${b} is torn: byte ${i} is ${got[b * block + i]}, byte 0 is ${v}`);
          }
        }
        model.write(off, got);
        await checkImage(blk, model, 'around the contended blocks');
      }),
  },
  {
    name: 'random sequences of requests match the model (fast-check)',
    group: 'read-write',
    run: (t) => randomSequences(t),
  },
];

type Op =
  | { kind: 'write'; off: number; len: number; seed: number }
  | { kind: 'zero'; off: number; len: number; unmap: boolean }
  | { kind: 'discard'; off: number; len: number }
  | { kind: 'read'; off: number; len: number }
  | { kind: 'flush' }
  | { kind: 'truncate'; size: number }
  | { kind: 'batch'; writes: Array<{ off: number; len: number; seed: number }> };

/** Fractions of the image length, so generated ranges fit whatever size the target has. */
const fracArb = fc.double({ min: 0, max: 1, noNaN: true });
const lenArb = fc.oneof(fc.constantFrom(0, 1, 511, 512, 513, 4095, 4096, 4097, 65536, 65537), fc.integer({ min: 1, max: 20_000 }));

function opArb(groups: readonly ConformanceGroup[]): fc.Arbitrary<Op> {
  const range = fc.record({ at: fracArb, len: lenArb });
  const arbs: Array<fc.Arbitrary<Op>> = [
    fc.record({ r: range, seed: fc.integer() }).map(({ r, seed }) => ({ kind: 'write' as const, off: r.at, len: r.len, seed })),
    range.map((r) => ({ kind: 'read' as const, off: r.at, len: r.len })),
    fc.array(fc.record({ r: range, seed: fc.integer() }), { minLength: 2, maxLength: 6 }).map((ws) => ({
      kind: 'batch' as const,
      writes: ws.map(({ r, seed }) => ({ off: r.at, len: r.len, seed })),
    })),
  ];
  if (groups.includes('write-zeroes')) {
    arbs.push(fc.record({ r: range, unmap: fc.boolean() }).map(({ r, unmap }) => ({ kind: 'zero' as const, off: r.at, len: r.len, unmap })));
  }
  if (groups.includes('discard')) arbs.push(range.map((r) => ({ kind: 'discard' as const, off: r.at, len: r.len })));
  if (groups.includes('flush')) arbs.push(fc.constant({ kind: 'flush' as const }));
  if (groups.includes('truncate')) arbs.push(fracArb.map((f) => ({ kind: 'truncate' as const, size: f })));
  // Offsets are carried as fractions until the image length is known; see place().
  return fc.oneof(...arbs) as fc.Arbitrary<Op>;
}

/** Turns a fractional offset and a wanted length into a range inside [0, len). */
function place(at: number, want: number, len: number): { off: number; n: number } {
  const off = Math.min(len, Math.floor(at * len));
  return { off, n: Math.min(want, len - off) };
}

async function randomSequences(t: ConformanceTarget): Promise<void> {
  await fc.assert(
    fc.asyncProperty(fc.array(opArb(t.groups), { minLength: 1, maxLength: 25 }), async (ops) => {
      await withModel(t, async (blk, model) => {
        const startLen = model.length;
        for (const op of ops) await applyOp(t, blk, model, op, startLen);
        await checkImage(blk, model, 'after random sequence');
      });
    }),
    { numRuns: 30 },
  );
}

async function applyOp(t: ConformanceTarget, blk: BlockBackend, model: FlatModel, op: Op, startLen: number): Promise<void> {
  const len = model.length;
  switch (op.kind) {
    case 'write': {
      const { off, n } = place(op.off, op.len, len);
      const data = new Prng(op.seed).bytes(n);
      await blk.pwrite(off, data);
      model.write(off, data);
      return;
    }
    case 'zero': {
      const { off, n } = place(op.off, op.len, len);
      await blk.pwriteZeroes(off, n, { flags: op.unmap ? REQ.MAY_UNMAP : 0 });
      model.zero(off, n);
      return;
    }
    case 'discard': {
      const { off, n } = place(op.off, op.len, len);
      await blk.pdiscard(off, n);
      // Where either outcome is allowed, adopt what the image says once it is known to be one of them.
      const got = await blk.read(off, n);
      checkDiscarded(t, model, off, n, got, `discard(${off}, ${n})`);
      model.write(off, got);
      return;
    }
    case 'read': {
      const { off, n } = place(op.off, op.len, len);
      checkBytes(await blk.read(off, n), model.read(off, n), `read(${off}, ${n})`, off);
      return;
    }
    case 'flush':
      await blk.flush();
      return;
    case 'truncate': {
      // Stay between half and the full starting size so ranges stay meaningful.
      const size = alignedSize(t, Math.floor(startLen / 2 + (op.size * startLen) / 2));
      await blk.truncate(size);
      model.resize(size);
      return;
    }
    case 'batch': {
      // Drop writes that overlap an earlier one in the batch: only disjoint concurrent writes have an exact result.
      const placed: Array<{ off: number; data: Uint8Array }> = [];
      for (const w of op.writes) {
        const { off, n } = place(w.off, w.len, len);
        if (placed.some((p) => off < p.off + p.data.length && p.off < off + n)) continue;
        placed.push({ off, data: new Prng(w.seed).bytes(n) });
      }
      await Promise.all(placed.map((p) => blk.pwrite(p.off, p.data)));
      for (const p of placed) model.write(p.off, p.data);
      return;
    }
  }
}

const zeroInitCases: ConformanceCase[] = [
  {
    name: 'a fresh image reads as zeroes everywhere',
    group: 'zero-init',
    run: (t) =>
      withImage(t, async (blk) => {
        const all = await readAll(blk);
        const i = all.findIndex((b) => b !== 0);
        check(i < 0, `fresh image has byte ${all[i]} at ${i}`);
      }),
  },
];

const writeZeroesCases: ConformanceCase[] = [false, true].flatMap((unmap): ConformanceCase[] => {
  const flags = unmap ? REQ.MAY_UNMAP : 0;
  const label = unmap ? 'with MAY_UNMAP' : 'without MAY_UNMAP';
  return [
    {
      name: `pwriteZeroes ${label} at odd offsets and lengths zeroes exactly the range`,
      group: 'write-zeroes',
      run: (t) =>
        withModel(t, async (blk, model) => {
          const rng = new Prng(unmap ? 11 : 10);
          const fill = rng.bytes(model.length);
          await blk.pwrite(0, fill);
          model.write(0, fill);
          for (const n of [...ODD_LENGTHS, 131072, 200_001]) {
            for (const off of oddOffsets(model.length, n).slice(0, 3)) {
              await blk.pwriteZeroes(off, n, { flags });
              model.zero(off, n);
              const lo = Math.max(0, off - 600);
              const hi = Math.min(model.length, off + n + 600);
              checkBytes(await blk.read(lo, hi - lo), model.read(lo, hi - lo), `after pwriteZeroes(${off}, ${n})`, lo);
              // Refill so the next range starts from data again.
              const again = rng.bytes(n);
              await blk.pwrite(off, again);
              model.write(off, again);
            }
          }
          await checkImage(blk, model, `after zero writes ${label}`);
        }),
    },
    {
      name: `pwriteZeroes ${label} over the whole image reads back as zeroes`,
      group: 'write-zeroes',
      run: (t) =>
        withModel(t, async (blk, model) => {
          const data = new Prng(12).bytes(model.length);
          await blk.pwrite(0, data);
          await blk.pwriteZeroes(0, model.length, { flags });
          model.zero(0, model.length);
          await checkImage(blk, model, `whole-image zero write ${label}`);
        }),
    },
  ];
});

writeZeroesCases.push({
  name: 'pwriteZeroes with NO_FALLBACK either zeroes the range or fails with ENOTSUP leaving it unchanged',
  group: 'write-zeroes',
  run: (t) =>
    withModel(t, async (blk, model) => {
      const data = new Prng(13).bytes(65536);
      await blk.pwrite(65536, data);
      model.write(65536, data);
      const got = await outcome(blk.pwriteZeroes(65536, 65536, { flags: REQ.NO_FALLBACK | REQ.MAY_UNMAP }));
      check(got === 'resolved' || got === 'ENOTSUP', `NO_FALLBACK zero write failed with ${got}`);
      if (got === 'resolved') model.zero(65536, 65536);
      await checkImage(blk, model, `after NO_FALLBACK zero write (${got})`);
    }),
});

const discardCases: ConformanceCase[] = [
  {
    name: 'discarded ranges keep their data or read as zero (zero in whole blocks when the target says so); nothing else changes',
    group: 'discard',
    run: (t) =>
      withModel(t, async (blk, model) => {
        const data = new Prng(20).bytes(model.length);
        await blk.pwrite(0, data);
        model.write(0, data);
        const ranges: Array<[number, number]> = [[1, 511], [4096, 4096], [65536, 65536], [70_001, 100_003], [131072, 8192], [0, 0]];
        for (const [off, n] of ranges) {
          await blk.pdiscard(off, n);
          const got = await blk.read(off, n);
          checkDiscarded(t, model, off, n, got, `discard(${off}, ${n})`);
          model.write(off, got);
          await checkImage(blk, model, `outside discard(${off}, ${n})`);
        }
      }),
  },
  {
    name: 'discarding the whole image succeeds and leaves data or zeroes',
    group: 'discard',
    run: (t) =>
      withModel(t, async (blk, model) => {
        const data = new Prng(21).bytes(model.length);
        await blk.pwrite(0, data);
        model.write(0, data);
        await blk.pdiscard(0, model.length);
        checkDiscarded(t, model, 0, model.length, await readAll(blk), 'whole-image discard');
      }),
  },
];

const flushCases: ConformanceCase[] = [
  {
    name: 'flush succeeds on a clean image, after writes, and repeatedly',
    group: 'flush',
    run: (t) =>
      withImage(t, async (blk) => {
        await blk.flush();
        const len = await blk.getLength();
        await blk.pwrite(Math.min(4097, len - 3), new Uint8Array([7, 8, 9]));
        await blk.flush();
        await blk.flush();
      }),
  },
  {
    name: 'flushes issued concurrently with writes all complete',
    group: 'flush',
    run: (t) =>
      withImage(t, async (blk) => {
        const len = await blk.getLength();
        const ps: Array<Promise<void>> = [];
        for (let i = 0; i < 16; i++) {
          ps.push(blk.pwrite((i * 8191) % (len - 100), new Uint8Array(100).fill(i + 1)));
          if (i % 3 === 0) ps.push(blk.flush());
        }
        await Promise.all(ps);
        await blk.flush();
      }),
  },
];

const truncateCases: ConformanceCase[] = [
  {
    name: 'truncate shrinks and grows; new space reads as zero, never as the old data',
    group: 'truncate',
    run: (t) =>
      withModel(t, async (blk, model) => {
        const len = model.length;
        const data = new Prng(30).bytes(len);
        await blk.pwrite(0, data);
        model.write(0, data);
        const small = alignedSize(t, Math.floor(len / 2) + 513);
        await blk.truncate(small);
        model.resize(small);
        await checkImage(blk, model, `after shrinking to ${small}`);
        const big = alignedSize(t, len + 65537);
        await blk.truncate(big);
        model.resize(big);
        await checkImage(blk, model, `after growing to ${big}`);
        const tail = new Prng(31).bytes(1000);
        await blk.pwrite(big - 1000, tail);
        model.write(big - 1000, tail);
        await checkImage(blk, model, 'after writing the new tail');
        await blk.truncate(len);
        model.resize(len);
        await checkImage(blk, model, `after shrinking back to ${len}`);
      }),
  },
  {
    name: 'truncate to an odd length reads back as whole sectors with a zero tail, like QEMU',
    group: 'truncate',
    run: (t) =>
      withModel(t, async (blk, model) => {
        // Storage with a larger alignment grows to its block size instead (see alignedSize).
        if ((t.alignment ?? 1) > 512) return;
        const len = model.length;
        const data = new Prng(34).bytes(len);
        await blk.pwrite(0, data);
        model.write(0, data);
        const odd = Math.floor(len / 1024) * 512 + 1000;
        await blk.truncate(odd);
        // The bytes cut off are gone; the rest of the last sector reads as zero.
        model.resize(odd);
        model.resize(Math.ceil(odd / 512) * 512);
        await checkImage(blk, model, `after truncating to ${odd}`);
        await blk.truncate(len);
        model.resize(len);
        await checkImage(blk, model, `after growing back to ${len}`);
      }),
  },
  {
    name: 'truncate to the current size changes nothing',
    group: 'truncate',
    run: (t) =>
      withModel(t, async (blk, model) => {
        const data = new Prng(32).bytes(5000);
        await blk.pwrite(3, data);
        model.write(3, data);
        await blk.truncate(model.length);
        await checkImage(blk, model, 'after same-size truncate');
      }),
  },
];

const truncatePreallocCases: ConformanceCase[] = (['full', 'falloc'] as const).map((prealloc) => ({
  name: `truncate with preallocation=${prealloc} grows the image and the new space reads as zero`,
  group: 'truncate-prealloc' as const,
  run: (t: ConformanceTarget) =>
    withModel(t, async (blk, model) => {
      const data = new Prng(33).bytes(model.length);
      await blk.pwrite(0, data);
      model.write(0, data);
      const size = alignedSize(t, model.length + 100_000);
      await blk.truncate(size, { prealloc });
      model.resize(size);
      await checkImage(blk, model, `after growing with ${prealloc}`);
      await checkRejects(blk.truncate(model.length - 4096, { prealloc }), 'ENOTSUP', `shrinking with preallocation=${prealloc}`);
      await checkImage(blk, model, 'after the refused shrink');
    }),
}));

const rangeCases: ConformanceCase[] = [
  {
    name: 'requests past EOF fail with EIO',
    group: 'range-checks',
    run: (t) =>
      withImage(t, async (blk) => {
        const len = await blk.getLength();
        await checkRejects(blk.pread(len, new Uint8Array(1)), 'EIO', 'read(len, 1)');
        await checkRejects(blk.pread(len - 1, new Uint8Array(2)), 'EIO', 'read(len-1, 2)');
        await checkRejects(blk.pread(len + 4096, new Uint8Array(0)), 'EIO', 'zero-length read past EOF');
        await checkRejects(blk.pwrite(len - 4096, new Uint8Array(4097)), 'EIO', 'write(len-4096, 4097)');
        await checkRejects(blk.pwriteZeroes(len, 512), 'EIO', 'pwriteZeroes(len, 512)');
        await checkRejects(blk.pdiscard(len - 1, 2), 'EIO', 'pdiscard(len-1, 2)');
        check((await blk.getLength()) === len, 'a refused request changed the length');
      }),
  },
  {
    name: 'negative or fractional offsets and lengths fail with EINVAL',
    group: 'range-checks',
    run: (t) =>
      withImage(t, async (blk) => {
        await checkRejects(blk.pread(-1, new Uint8Array(1)), 'EINVAL', 'read(-1, 1)');
        await checkRejects(blk.pwrite(-512, new Uint8Array(512)), 'EINVAL', 'write(-512, 512)');
        await checkRejects(blk.pwriteZeroes(0, -1), 'EINVAL', 'pwriteZeroes(0, -1)');
        await checkRejects(blk.pdiscard(-4096, 4096), 'EINVAL', 'pdiscard(-4096, 4096)');
        await checkRejects(blk.pread(0.5, new Uint8Array(1)), 'EINVAL', 'read(0.5, 1)');
        await checkRejects(blk.read(0, -3), 'EINVAL', 'read(0, -3)');
      }),
  },
  {
    name: 'zero-length requests at EOF succeed',
    group: 'range-checks',
    run: (t) =>
      withImage(t, async (blk) => {
        const len = await blk.getLength();
        await blk.pread(len, new Uint8Array(0));
        await blk.pwrite(len, new Uint8Array(0));
        await blk.pwriteZeroes(len, 0);
        await blk.pdiscard(len, 0);
        check((await blk.getLength()) === len, 'a zero-length request changed the length');
      }),
  },
  {
    name: 'requests with an already aborted signal fail with ECANCELED',
    group: 'range-checks',
    run: (t) =>
      withImage(t, async (blk) => {
        const ac = new AbortController();
        ac.abort();
        const signal = ac.signal;
        await checkRejects(blk.pread(0, new Uint8Array(512), { signal }), 'ECANCELED', 'aborted read');
        await checkRejects(blk.pwrite(0, new Uint8Array(512), { signal }), 'ECANCELED', 'aborted write');
        await checkRejects(blk.pwriteZeroes(0, 512, { signal }), 'ECANCELED', 'aborted zero write');
        await checkRejects(blk.pdiscard(0, 512, { signal }), 'ECANCELED', 'aborted discard');
        await checkRejects(blk.flush({ signal }), 'ECANCELED', 'aborted flush');
      }),
  },
];

const sinkCases: ConformanceCase[] = [
  {
    name: 'writes are accepted and reads return zeroes at odd offsets and lengths',
    group: 'sink-zero',
    run: (t) =>
      withImage(t, async (blk) => {
        const len = await blk.getLength();
        const rng = new Prng(40);
        for (const n of ODD_LENGTHS) {
          for (const off of oddOffsets(Math.min(len, 1 << 20), n)) {
            await blk.pwrite(off, rng.bytes(n));
            // A poisoned buffer shows whether the read really filled it.
            const buf = new Uint8Array(n).fill(0xa5);
            await blk.pread(off, buf);
            const i = buf.findIndex((b) => b !== 0);
            check(i < 0, `read(${off}, ${n}) has ${buf[i]} at ${off + i}, expected zeroes`);
          }
        }
        await blk.pwriteZeroes(1, 4095);
        await blk.flush();
      }),
  },
];

/** Every case of the suite, in a stable order. */
export function conformanceCases(): ConformanceCase[] {
  return [
    ...readWriteCases,
    ...zeroInitCases,
    ...writeZeroesCases,
    ...discardCases,
    ...flushCases,
    ...truncateCases,
    ...truncatePreallocCases,
    ...rangeCases,
    ...sinkCases,
  ];
}

/**
 * The cases that apply to `t`. Throws when the target lists no groups, or a
 * group no case belongs to, so a typo or an empty list cannot make a runner
 * pass by running nothing.
 */
export function casesFor(t: ConformanceTarget): ConformanceCase[] {
  check(t.groups.length > 0, `target '${t.name}' lists no conformance groups`);
  const all = conformanceCases();
  for (const g of t.groups) {
    check(all.some((c) => c.group === g), `target '${t.name}' lists group '${g}', which has no cases`);
  }
  return all.filter((c) => t.groups.includes(c.group));
}
