/** Number formatting shared by the views: sizes, offsets and percentages. */

const UNITS = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB', 'EiB'];

/** A byte count as qemu-img prints sizes ("64 MiB", "1.5 GiB"). */
export function bytes(n: number): string {
  if (!Number.isFinite(n)) return String(n);
  let v = n;
  let u = 0;
  while (Math.abs(v) >= 1024 && u < UNITS.length - 1) {
    v /= 1024;
    u++;
  }
  const text = u === 0 ? String(v) : v >= 100 || Number.isInteger(v) ? v.toFixed(0) : v.toFixed(v >= 10 ? 1 : 2);
  return `${text} ${UNITS[u]}`;
}

/** A byte count with the exact number too ("64 MiB (67108864 bytes)"). */
export function bytesExact(n: number): string {
  return n < 1024 ? `${n} bytes` : `${bytes(n)} (${n} bytes)`;
}

/** An offset in hex ("0x00a00000"), padded to 8 digits for alignment in tables. */
export function hex(n: number, pad = 8): string {
  return `0x${n.toString(16).padStart(pad, '0')}`;
}

/** A percentage with one decimal. */
export function percent(part: number, whole: number): string {
  return whole > 0 ? `${((100 * part) / whole).toFixed(1)}%` : '0%';
}

/**
 * Parses an offset or size typed by a person: decimal, 0x hex, or a number
 * with a K/M/G/T suffix (powers of 1024, as qemu-img). Undefined when it is
 * not one.
 */
export function parseOffset(text: string): number | undefined {
  const t = text.trim().replace(/_/g, '');
  if (/^0x[0-9a-f]+$/i.test(t)) return Number.parseInt(t.slice(2), 16);
  const m = /^(\d+(?:\.\d+)?)\s*([kmgtp]?)(?:i?b)?$/i.exec(t);
  if (!m) return undefined;
  const shift = { '': 0, k: 10, m: 20, g: 30, t: 40, p: 50 }[m[2]!.toLowerCase() as '' | 'k' | 'm' | 'g' | 't' | 'p'];
  const v = Number(m[1]) * 2 ** shift;
  return Number.isSafeInteger(Math.floor(v)) ? Math.floor(v) : undefined;
}
