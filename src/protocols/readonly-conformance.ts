/**
 * Behaviour cases for read-only protocols (http, blob), in the shape of the
 * shared suite in src/core/conformance.ts, whose groups all need a writable
 * image. A target opens a backend on an image whose contents it knows; the
 * cases read it every which way and check that everything that would modify
 * it is refused and changes nothing. Framework-agnostic: each case throws on
 * failure, so vitest and the browser worker run the same code.
 */
import type { BlockBackend } from '../core/block-backend.ts';
import { check, checkBytes, checkRejects, Prng } from '../core/conformance.ts';

/** An opened read-only image and the bytes it must contain. */
export interface ReadOnlyImage {
  blk: BlockBackend;
  /**
   * The bytes stored. The disk is them rounded up to whole 512-byte sectors,
   * the tail reading as zeroes, since QEMU keeps lengths in sectors.
   */
  expected: Uint8Array;
  close(): Promise<void>;
}

/** A read-only driver stack under test. */
export interface ReadOnlyTarget {
  readonly name: string;
  /** Opens the image (at least 256 KiB) read-only. */
  open(): Promise<ReadOnlyImage>;
}

/** One read-only case. */
export interface ReadOnlyCase {
  readonly name: string;
  run(t: ReadOnlyTarget): Promise<void>;
}

const ODD_LENGTHS = [1, 511, 512, 513, 4095, 4097, 65535, 65537, 262_145];

/** What a case sees: `expected` is the whole disk (stored bytes plus the zero tail of the last sector). */
interface DiskView {
  blk: BlockBackend;
  expected: Uint8Array;
  /** How many of the disk's bytes are stored; the rest of the last sector is the zero tail. */
  stored: number;
}

async function withImage(t: ReadOnlyTarget, fn: (img: DiskView) => Promise<void>): Promise<void> {
  const img = await t.open();
  let failure: unknown = null;
  try {
    const stored = img.expected.length;
    check(stored >= 256 * 1024, `target image is ${stored} bytes; the cases need at least 256 KiB`);
    const disk = new Uint8Array(Math.ceil(stored / 512) * 512);
    disk.set(img.expected);
    check((await img.blk.getLength()) === disk.length, `length ${await img.blk.getLength()}, expected ${disk.length} (${stored} stored, rounded up to sectors)`);
    await fn({ blk: img.blk, expected: disk, stored });
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

/** Offsets that exercise starts, ends and unaligned middles for a read of n bytes in an image of len bytes. */
function oddOffsets(len: number, n: number): number[] {
  const out = new Set<number>([0, 1, 511, 4095, 4097, 65535, 131_073, len - n, len - n - 1]);
  return [...out].filter((o) => o >= 0 && o + n <= len);
}

/** The error code `p` rejects with, accepting any of `codes`. */
async function rejectsWithOneOf(p: Promise<unknown>, codes: readonly string[], what: string): Promise<void> {
  let got = 'resolved';
  try {
    await p;
  } catch (e) {
    const c = (e as { code?: unknown } | null)?.code;
    got = typeof c === 'string' ? c : `non-coded error: ${String(e)}`;
  }
  check(codes.includes(got), `${what}: expected ${codes.join(' or ')}, got ${got}`);
}

const cases: ReadOnlyCase[] = [
  {
    name: 'reads at odd offsets and lengths return the image bytes',
    run: (t) =>
      withImage(t, async ({ blk, expected }) => {
        for (const n of ODD_LENGTHS) {
          for (const off of oddOffsets(expected.length, n)) {
            // A poisoned buffer shows whether the read really filled it.
            const buf = new Uint8Array(n).fill(0xa5);
            await blk.pread(off, buf);
            checkBytes(buf, expected.subarray(off, off + n), `read(${off}, ${n})`, off);
          }
        }
      }),
  },
  {
    name: 'the whole image reads back in 1 MiB, 64 KiB and 4 KiB pieces',
    run: (t) =>
      withImage(t, async ({ blk, expected }) => {
        for (const step of [1 << 20, 65536, 4096]) {
          const out = new Uint8Array(expected.length);
          for (let off = 0; off < out.length; off += step) await blk.pread(off, out.subarray(off, Math.min(out.length, off + step)));
          checkBytes(out, expected, `whole image in ${step}-byte reads`);
        }
      }),
  },
  {
    name: 'concurrent overlapping reads all return the right bytes',
    run: (t) =>
      withImage(t, async ({ blk, expected }) => {
        const rng = new Prng(21);
        const reqs = Array.from({ length: 48 }, () => {
          const n = rng.int(1, 100_000);
          return { off: rng.int(0, expected.length - n), n };
        });
        const got = await Promise.all(reqs.map((r) => blk.read(r.off, r.n)));
        reqs.forEach((r, i) => checkBytes(got[i]!, expected.subarray(r.off, r.off + r.n), `concurrent read(${r.off}, ${r.n})`, r.off));
      }),
  },
  {
    name: 'seeded random reads match the image',
    run: (t) =>
      withImage(t, async ({ blk, expected }) => {
        const rng = new Prng(22);
        for (let i = 0; i < 300; i++) {
          const n = rng.int(1, 20_000);
          const off = rng.int(0, expected.length - n);
          checkBytes(await blk.read(off, n), expected.subarray(off, off + n), `read #${i} (${off}, ${n})`, off);
        }
      }),
  },
  {
    name: 'reads past EOF fail with EIO; zero-length reads at EOF succeed',
    run: (t) =>
      withImage(t, async ({ blk, expected }) => {
        const len = expected.length;
        await checkRejects(blk.pread(len, new Uint8Array(1)), 'EIO', 'read(len, 1)');
        await checkRejects(blk.pread(len - 1, new Uint8Array(2)), 'EIO', 'read(len-1, 2)');
        await checkRejects(blk.pread(len + 4096, new Uint8Array(0)), 'EIO', 'zero-length read past EOF');
        await blk.pread(len, new Uint8Array(0));
        checkBytes(await blk.read(len - 1, 1), expected.subarray(len - 1), 'last byte');
      }),
  },
  {
    name: 'a length that is not a multiple of 512 reads up to the next sector, the tail as zeroes',
    run: (t) =>
      withImage(t, async ({ blk, expected, stored }) => {
        const len = expected.length;
        const from = Math.max(0, stored - 8);
        // A poisoned buffer shows the tail really is zero-filled, not left alone.
        const buf = new Uint8Array(len - from).fill(0xa5);
        await blk.pread(from, buf);
        checkBytes(buf.subarray(0, stored - from), expected.subarray(from, stored), 'last stored bytes', from);
        check(
          buf.subarray(stored - from).every((b) => b === 0),
          `the ${len - stored} bytes after the stored ${stored} up to the sector end do not read as zero`,
        );
      }),
  },
  {
    name: 'negative or fractional offsets fail with EINVAL',
    run: (t) =>
      withImage(t, async ({ blk }) => {
        await checkRejects(blk.pread(-1, new Uint8Array(1)), 'EINVAL', 'read(-1, 1)');
        await checkRejects(blk.pread(0.5, new Uint8Array(1)), 'EINVAL', 'read(0.5, 1)');
        await checkRejects(blk.read(0, -3), 'EINVAL', 'read(0, -3)');
      }),
  },
  {
    name: 'reads with an already aborted signal fail with ECANCELED',
    run: (t) =>
      withImage(t, async ({ blk }) => {
        const ac = new AbortController();
        ac.abort();
        await checkRejects(blk.pread(0, new Uint8Array(512), { signal: ac.signal }), 'ECANCELED', 'aborted read');
      }),
  },
  {
    name: 'writes, zero writes, discards and resizes are refused and change nothing; flush succeeds',
    run: (t) =>
      withImage(t, async ({ blk, expected }) => {
        const refused = ['EPERM', 'EACCES', 'EROFS'] as const;
        await rejectsWithOneOf(blk.pwrite(0, new Uint8Array(512).fill(1)), refused, 'write');
        await rejectsWithOneOf(blk.pwrite(4097, new Uint8Array(3).fill(1)), refused, 'unaligned write');
        await rejectsWithOneOf(blk.pwriteZeroes(0, 4096), refused, 'zero write');
        await rejectsWithOneOf(blk.pdiscard(0, 4096), refused, 'discard');
        await rejectsWithOneOf(blk.truncate(expected.length + 65536), refused, 'grow');
        await rejectsWithOneOf(blk.truncate(4096), refused, 'shrink');
        await blk.flush();
        check((await blk.getLength()) === expected.length, 'a refused request changed the length');
        checkBytes(await blk.read(0, 8192), expected.subarray(0, 8192), 'after refused writes');
      }),
  },
];

/** Every read-only case, in a stable order. */
export function readOnlyCases(): ReadOnlyCase[] {
  return [...cases];
}
