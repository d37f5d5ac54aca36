/**
 * The qcow2 fuzzer shared by the bounded test (fuzz.test.ts) and the long
 * run (scripts/fuzz-qcow2.ts): valid images made by qemu-img are mutated in
 * their header, extensions, L1/L2 entries, refcount table and blocks and
 * snapshot table, then opened, read, mapped, checked and (read-write)
 * written. Every case must either work consistently or fail with a
 * BlockError, within a time and memory bound. Not a test file.
 */
import { writeFileSync } from 'node:fs';
import { isBlockError } from '../../core/errors.ts';
import { bdrvBlockStatus, bdrvFlush, bdrvGetLength, bdrvPdiscard, bdrvPreadv, bdrvPwritev, bdrvPwriteZeroes } from '../../core/io.ts';
import { REQ } from '../../core/types.ts';
import { HDR, parseHeader } from './header.ts';
import { openQcow2, qemuImg, qemuIo } from './testing.ts';

/** A deterministic PRNG (mulberry32). */
export function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Makes the seed images in `dir` with qemu-img/qemu-io and returns their bytes by name. */
export function seedImages(dir: string, read: (name: string) => Uint8Array): Map<string, Uint8Array> {
  const out = new Map<string, Uint8Array>();
  const make = (name: string, create: string[], size: string, io: string[], after?: (img: string) => void): void => {
    qemuImg(dir, 'create', '-f', 'qcow2', ...create, name, size);
    if (io.length) qemuIo(dir, name, ...io);
    after?.(name);
    out.set(name, read(name));
  };
  make('plain.qcow2', [], '4M', ['write -P 1 0 200k', 'write -P 2 1M 64k', 'write -z 2M 128k', 'discard 1M 64k']);
  make('small.qcow2', ['-o', 'cluster_size=512,refcount_bits=8'], '256k', ['write -P 3 0 40k', 'write -c -P 4 64k 512']);
  make('extl2.qcow2', ['-o', 'extended_l2=on,cluster_size=16k'], '1M', ['write -P 5 1k 3k', 'write -z 64k 4k', 'write -P 6 512k 40k']);
  make('zlib.qcow2', ['-o', 'cluster_size=4k'], '1M', ['write -c -P 7 0 4k', 'write -c -P 8 4k 4k', 'write -P 9 8k 4k']);
  make('zstd.qcow2', ['-o', 'cluster_size=4k,compression_type=zstd'], '1M', ['write -c -P 10 0 4k', 'write -P 11 64k 4k']);
  make('v2.qcow2', ['-o', 'compat=0.10,cluster_size=4k'], '1M', ['write -P 12 0 100k']);
  make('snap.qcow2', ['-o', 'cluster_size=4k'], '1M', ['write -P 13 0 64k'], (img) => {
    qemuImg(dir, 'snapshot', '-c', 's1', img);
    qemuIo(dir, img, 'write -P 14 0 8k');
  });
  make('bitmap.qcow2', ['-o', 'cluster_size=4k'], '1M', ['write -P 15 0 64k'], (img) => qemuImg(dir, 'bitmap', '--add', img, 'b0'));
  return out;
}

/** Where the interesting structures of an image are. */
interface Layout {
  clusterSize: number;
  headerLength: number;
  extEnd: number;
  l1: number;
  l1Size: number;
  l2s: number[];
  reftable: number;
  refblocks: number[];
  snapshots: number;
}

function layout(img: Uint8Array): Layout | null {
  let h;
  try {
    h = parseHeader(img);
  } catch {
    return null;
  }
  const cs = 2 ** h.clusterBits;
  const dv = new DataView(img.buffer, img.byteOffset, img.byteLength);
  const u64 = (o: number): number => (o + 8 <= img.length ? Number(dv.getBigUint64(o) & 0x00fffffffffffe00n) : 0);
  const l2s: number[] = [];
  for (let i = 0; i < h.l1Size && i < 64; i++) {
    const o = u64(h.l1TableOffset + 8 * i);
    if (o) l2s.push(o);
  }
  const refblocks: number[] = [];
  for (let i = 0; i < 64; i++) {
    const o = u64(h.refcountTableOffset + 8 * i);
    if (o) refblocks.push(o);
  }
  return { clusterSize: cs, headerLength: h.headerLength, extEnd: h.backingFileOffset || cs, l1: h.l1TableOffset, l1Size: h.l1Size, l2s, reftable: h.refcountTableOffset, refblocks, snapshots: h.snapshotsOffset };
}

/** A value that tends to hit boundaries. */
function interesting(r: () => number, cs: number, len: number): bigint {
  const pick = Math.floor(r() * 12);
  switch (pick) {
    case 0: return 0n;
    case 1: return 1n;
    case 2: return BigInt(cs);
    case 3: return BigInt(len);
    case 4: return BigInt(len) + BigInt(cs);
    case 5: return (1n << 63n) | BigInt(Math.floor(r() * len));
    case 6: return 0xffffffffffffffffn;
    case 7: return BigInt(Math.floor(r() * 2 ** 32)) << 32n;
    case 8: return BigInt(Math.floor(r() * len / 512) * 512);
    case 9: return 1n << BigInt(Math.floor(r() * 64));
    case 10: return BigInt(Math.floor(r() * 2 ** 31));
    default: return BigInt(Math.floor(r() * 2 ** 32)) * 0x100000000n + BigInt(Math.floor(r() * 2 ** 32));
  }
}

/** Returns a mutated copy of `img` and a short description of what changed. */
export function mutate(img: Uint8Array, r: () => number): { bytes: Uint8Array; what: string } {
  const out = img.slice();
  const lay = layout(img);
  const dv = new DataView(out.buffer);
  const cs = lay?.clusterSize ?? 65536;
  const put64 = (o: number, v: bigint): void => { if (o >= 0 && o + 8 <= out.length) dv.setBigUint64(o, v & 0xffffffffffffffffn); };
  const put32 = (o: number, v: number): void => { if (o >= 0 && o + 4 <= out.length) dv.setUint32(o, v >>> 0); };
  const entry = (base: number, count: number): number => base + 8 * Math.floor(r() * Math.max(1, count));
  const kind = Math.floor(r() * 10);
  switch (kind) {
    case 0: {
      const fields = Object.entries(HDR).filter(([k]) => k !== 'magic');
      const [name, off] = fields[Math.floor(r() * fields.length)]!;
      const wide = ['backingFileOffset', 'size', 'l1TableOffset', 'refcountTableOffset', 'snapshotsOffset', 'incompatibleFeatures', 'compatibleFeatures', 'autoclearFeatures'].includes(name);
      if (wide) put64(off, interesting(r, cs, img.length));
      else if (name === 'compressionType') out[off] = Math.floor(r() * 4);
      else put32(off, Number(interesting(r, cs, img.length) & 0xffffffffn));
      return { bytes: out, what: `header ${name}` };
    }
    case 1: {
      if (!lay) break;
      const o = lay.headerLength + Math.floor(r() * Math.max(1, lay.extEnd - lay.headerLength));
      if (r() < 0.5) put32(o - (o % 4), Number(interesting(r, cs, img.length) & 0xffffffffn));
      else out[o] = Math.floor(r() * 256);
      return { bytes: out, what: `extension byte ${o}` };
    }
    case 2: {
      if (!lay || lay.l1Size === 0) break;
      const o = entry(lay.l1, Math.min(lay.l1Size, 64));
      put64(o, interesting(r, cs, img.length));
      return { bytes: out, what: `L1 entry at ${o}` };
    }
    case 3:
    case 4: {
      if (!lay || lay.l2s.length === 0) break;
      const l2 = lay.l2s[Math.floor(r() * lay.l2s.length)]!;
      const o = entry(l2, Math.min(cs / 8, 256));
      put64(o, interesting(r, cs, img.length) | (r() < 0.5 ? 1n << 63n : 0n));
      return { bytes: out, what: `L2 entry at ${o}` };
    }
    case 5: {
      if (!lay) break;
      const o = entry(lay.reftable, 8);
      put64(o, interesting(r, cs, img.length));
      return { bytes: out, what: `reftable entry at ${o}` };
    }
    case 6: {
      if (!lay || lay.refblocks.length === 0) break;
      const b = lay.refblocks[Math.floor(r() * lay.refblocks.length)]!;
      const o = b + Math.floor(r() * Math.min(cs, 512));
      out[o] = Math.floor(r() * 256);
      return { bytes: out, what: `refblock byte ${o}` };
    }
    case 7: {
      if (!lay || lay.snapshots === 0) break;
      const o = lay.snapshots + Math.floor(r() * 64);
      if (r() < 0.5) put32(o - (o % 4), Number(interesting(r, cs, img.length) & 0xffffffffn));
      else out[o] = Math.floor(r() * 256);
      return { bytes: out, what: `snapshot table byte ${o}` };
    }
    case 8: {
      const len = Math.floor(r() * img.length);
      return { bytes: out.slice(0, len), what: `truncated to ${len}` };
    }
    default: break;
  }
  const n = 1 + Math.floor(r() * 8);
  for (let i = 0; i < n; i++) {
    const o = Math.floor(r() * out.length);
    out[o] = (out[o]! ^ (1 << Math.floor(r() * 8))) & 0xff;
  }
  return { bytes: out, what: `${n} bit flips` };
}

/** Outcome of one case. */
export interface FuzzOutcome {
  /** Null when the case behaved (worked or failed cleanly); otherwise what went wrong. */
  problem: string | null;
  /** BlockError messages seen (for statistics). */
  errors: string[];
}

/** Longest a single case may run. */
export const CASE_TIMEOUT_MS = 10_000;
/** Most guest bytes a case reads. */
const READ_LIMIT = 4 << 20;

async function clean<T>(errors: string[], f: () => Promise<T>): Promise<T | undefined> {
  try {
    return await f();
  } catch (e) {
    if (isBlockError(e)) {
      errors.push(`${e.code}: ${e.message}`);
      return undefined;
    }
    throw e;
  }
}

/** Opens, reads (twice, comparing), maps, checks and for read-write cases writes the image at `path`. */
async function exercise(path: string, rw: boolean, r: () => number, errors: string[]): Promise<void> {
  const o = await clean(errors, () => openQcow2(path, { readOnly: !rw }));
  if (!o) return;
  o.graph.onWarning = () => undefined;
  try {
    const len = await bdrvGetLength(o.bs);
    const span = Math.min(len, READ_LIMIT);
    const offsets = [0];
    for (let i = 0; i < 4 && len > 0; i++) offsets.push(Math.floor((r() * len) / 512) * 512);
    for (const off of offsets) {
      const n = Math.min(span, len - off, 1 << 20);
      if (n <= 0) continue;
      const a = await clean(errors, async () => {
        const b = new Uint8Array(n);
        await bdrvPreadv(o.child, off, n, b);
        return b;
      });
      const b = await clean(errors, async () => {
        const x = new Uint8Array(n);
        await bdrvPreadv(o.child, off, n, x);
        return x;
      });
      if (a && b && !Buffer.from(a).equals(Buffer.from(b))) throw new Error(`two reads at ${off} differ`);
    }
    await clean(errors, async () => {
      let pos = 0;
      for (let i = 0; i < 256 && pos < len; i++) {
        const st = await bdrvBlockStatus(o.bs, true, pos, len - pos);
        if (st.pnum <= 0) throw new Error(`block status returned ${st.pnum} bytes at ${pos}`);
        pos += st.pnum;
      }
    });
    await clean(errors, () => o.bs.drv.check!(o.bs, 0));
    if (rw && len > 0) {
      const at = (): number => Math.floor((r() * Math.max(0, len - 8192)) / 512) * 512;
      await clean(errors, () => bdrvPwritev(o.child, at(), 4096, new Uint8Array(4096).fill(0x77)));
      await clean(errors, () => bdrvPwriteZeroes(o.child, at(), 8192, REQ.MAY_UNMAP));
      await clean(errors, () => bdrvPdiscard(o.child, at(), 65536));
      await clean(errors, () => bdrvFlush(o.bs));
    }
  } finally {
    await clean(errors, () => o.close());
  }
}

/**
 * Runs one fuzz case: mutates `seed` with the PRNG seeded by `caseSeed`,
 * writes it to `path` and exercises it, with a time bound.
 */
export async function fuzzCase(seed: Uint8Array, caseSeed: number, path: string): Promise<FuzzOutcome & { what: string }> {
  const r = prng(caseSeed);
  let { bytes, what } = mutate(seed, r);
  // Some cases stack several mutations.
  while (r() < 0.3) {
    const m = mutate(bytes, r);
    bytes = m.bytes;
    what += `, ${m.what}`;
  }
  writeFileSync(path, bytes);
  const errors: string[] = [];
  const rw = r() < 0.5;
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<string>((resolve) => {
    timer = setTimeout(() => resolve(`no answer within ${CASE_TIMEOUT_MS} ms (hang)`), CASE_TIMEOUT_MS);
  });
  try {
    const problem = await Promise.race([
      exercise(path, rw, r, errors).then(
        () => null,
        (e: unknown) => `${e instanceof Error ? `${e.name}: ${e.message}\n${e.stack ?? ''}` : String(e)}`,
      ),
      timeout,
    ]);
    return { problem, errors, what: `${what}${rw ? ' (read-write)' : ''}` };
  } finally {
    clearTimeout(timer);
  }
}
