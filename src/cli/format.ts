/**
 * Text formatting the QEMU tools do with printf: exact `%.Nf`, `%g` and
 * `%#x` conversions (glibc rounds exact ties to even, JavaScript's toFixed
 * does not), qemu-io's cvtstr, qemu-img's size_to_str, hex dumps, and QEMU's
 * pretty JSON writer (qobject/json-writer.c) whose layout differs from
 * JSON.stringify's.
 */

/** Decomposes a finite non-negative double into mantissa * 2^exp with integer mantissa. */
function decompose(x: number): { m: bigint; e: number } {
  if (x === 0) return { m: 0n, e: 0 };
  const buf = new DataView(new ArrayBuffer(8));
  buf.setFloat64(0, x);
  const hi = buf.getUint32(0);
  const lo = buf.getUint32(4);
  const biased = (hi >>> 20) & 0x7ff;
  let m = (BigInt(hi & 0xfffff) << 32n) | BigInt(lo);
  let e: number;
  if (biased === 0) e = -1074;
  else {
    m |= 1n << 52n;
    e = biased - 1075;
  }
  return { m, e };
}

/** round(x * 10^digits) with glibc's round-half-even on the exact binary value; x ≥ 0. */
function scaledRound(x: number, digits: number): bigint {
  const { m, e } = decompose(x);
  const scaled = m * 10n ** BigInt(digits);
  if (e >= 0) return scaled << BigInt(e);
  const div = 1n << BigInt(-e);
  const q = scaled / div;
  const r2 = (scaled % div) * 2n;
  if (r2 > div || (r2 === div && q % 2n === 1n)) return q + 1n;
  return q;
}

/** printf("%.*f", digits, x) as glibc prints it. */
export function fmtFixed(x: number, digits: number): string {
  if (!Number.isFinite(x)) return Number.isNaN(x) ? 'nan' : x > 0 ? 'inf' : '-inf';
  const neg = x < 0 || Object.is(x, -0);
  const q = scaledRound(Math.abs(x), digits).toString().padStart(digits + 1, '0');
  const body = digits === 0 ? q : `${q.slice(0, q.length - digits)}.${q.slice(q.length - digits)}`;
  return neg ? `-${body}` : body;
}

/** printf("%.*e", digits, x) as glibc prints it (x ≥ 0). */
function fmtExp(x: number, digits: number): { text: string; exp: number } {
  if (x === 0) return { text: `${digits > 0 ? `0.${'0'.repeat(digits)}` : '0'}e+00`, exp: 0 };
  let exp = Math.floor(Math.log10(x));
  // Correct log10's rounding and the carry of rounding itself.
  for (let guard = 0; guard < 4; guard++) {
    const q = scaledRoundPow(x, digits - exp);
    const s = q.toString();
    if (s.length > digits + 1) { exp++; continue; }
    if (s.length < digits + 1) { exp--; continue; }
    const mant = digits > 0 ? `${s[0]}.${s.slice(1)}` : s;
    const es = Math.abs(exp).toString().padStart(2, '0');
    return { text: `${mant}e${exp < 0 ? '-' : '+'}${es}`, exp };
  }
  throw new Error(`cannot format ${x}`);
}

/** round(x * 10^p) for any integer p (negative p divides), half-even. */
function scaledRoundPow(x: number, p: number): bigint {
  if (p >= 0) return scaledRound(x, p);
  const { m, e } = decompose(x);
  let num = m;
  let den = 10n ** BigInt(-p);
  if (e >= 0) num <<= BigInt(e);
  else den <<= BigInt(-e);
  const q = num / den;
  const r2 = (num % den) * 2n;
  if (r2 > den || (r2 === den && q % 2n === 1n)) return q + 1n;
  return q;
}

/** printf("%.*g", precision, x) as glibc prints it (x ≥ 0). */
export function fmtG(x: number, precision: number): string {
  const p = precision === 0 ? 1 : precision;
  if (x === 0) return '0';
  const { exp } = fmtExp(x, p - 1);
  let out: string;
  if (exp < p && exp >= -4) {
    out = fmtFixed(x, p - 1 - exp);
    if (out.includes('.')) out = out.replace(/0+$/, '').replace(/\.$/, '');
  } else {
    const t = fmtExp(x, p - 1).text;
    const [mant, e] = t.split('e') as [string, string];
    const m2 = mant.includes('.') ? mant.replace(/0+$/, '').replace(/\.$/, '') : mant;
    out = `${m2}e${e}`;
  }
  return out;
}

/** printf("%#x") / ("%#-16" PRIx64): 0x-prefixed lowercase hex, except plain "0" for zero. */
export function altHex(n: number | bigint): string {
  const v = BigInt(n);
  return v === 0n ? '0' : `0x${v.toString(16)}`;
}

const KiB = 1024;

/**
 * qemu-io's cvtstr: the value in the largest binary unit it reaches, with
 * three decimals ("%f" for bytes), and the first ".000" cut off.
 */
export function cvtstr(value: number): string {
  const units: Array<[number, string]> = [
    [2 ** 60, ' EiB'], [2 ** 50, ' PiB'], [2 ** 40, ' TiB'], [2 ** 30, ' GiB'], [2 ** 20, ' MiB'], [KiB, ' KiB'],
  ];
  let str: string;
  let suffix: string;
  const hit = units.find(([u]) => value >= u);
  if (hit) {
    str = fmtFixed(value / hit[0], 3);
    suffix = hit[1];
  } else {
    str = fmtFixed(value, 6);
    suffix = ' bytes';
  }
  const trim = str.indexOf('.000');
  return trim >= 0 ? str.slice(0, trim) + suffix : str + suffix;
}

/**
 * qemu-img's size_to_str: three significant digits in the binary unit
 * that keeps the integer part below 1000 ("64 MiB", "0.977 KiB").
 */
export function sizeToStr(val: number): string {
  const suffixes = ['', 'Ki', 'Mi', 'Gi', 'Ti', 'Pi', 'Ei'];
  // frexp's exponent of val * 1024/1000, minus one, is floor(log2) of it.
  const scaled = val / (1000 / 1024);
  let i = scaled === 0 ? 0 : frexpExp(scaled);
  i = Math.trunc((i - 1) / 10);
  if (i < 0) i = 0;
  const div = 2 ** (i * 10);
  return `${fmtG(val / div, 3)} ${suffixes[i]}B`;
}

/** The exponent frexp() returns: x = f * 2^exp with 0.5 ≤ f < 1. */
function frexpExp(x: number): number {
  const { m, e } = decompose(x);
  return m.toString(2).length + e;
}

/** qemu-io's dump_buffer: 16 bytes a line, offset in %08x, hex bytes, then printable alphanumerics. */
export function hexDump(buf: Uint8Array, offset: number): string {
  let out = '';
  for (let i = 0; i < buf.length; i += 16) {
    const line = buf.subarray(i, Math.min(i + 16, buf.length));
    out += `${(offset + i).toString(16).padStart(8, '0')}:  `;
    for (const b of line) out += `${b.toString(16).padStart(2, '0')} `;
    out += ' ';
    for (const b of line) out += isAlnum(b) ? String.fromCharCode(b) : '.';
    out += '\n';
  }
  return out;
}

function isAlnum(b: number): boolean {
  return (b >= 48 && b <= 57) || (b >= 65 && b <= 90) || (b >= 97 && b <= 122);
}

/** A value QEMU's JSON writer can print; objects keep insertion order, as QDicts built by visitors do. */
export type JsonValue = string | number | bigint | boolean | null | JsonValue[] | { [key: string]: JsonValue | undefined };

/** QEMU's quoted_str: escapes like JSON, and every non-ASCII code point (and DEL) as \uXXXX in upper case. */
export function jsonQuote(s: string): string {
  let out = '"';
  for (const ch of s) {
    const cp = ch.codePointAt(0)!;
    switch (ch) {
      case '"': out += '\\"'; continue;
      case '\\': out += '\\\\'; continue;
      case '\b': out += '\\b'; continue;
      case '\f': out += '\\f'; continue;
      case '\n': out += '\\n'; continue;
      case '\r': out += '\\r'; continue;
      case '\t': out += '\\t'; continue;
    }
    if (cp > 0xffff) {
      const v = cp - 0x10000;
      out += `\\u${(0xd800 + (v >> 10)).toString(16).toUpperCase()}\\u${(0xdc00 + (v & 0x3ff)).toString(16).toUpperCase()}`;
    } else if (cp < 0x20 || cp >= 0x7f) {
      out += `\\u${cp.toString(16).toUpperCase().padStart(4, '0')}`;
    } else {
      out += ch;
    }
  }
  return `${out}"`;
}

/**
 * qobject_to_json_pretty: members on their own lines indented by four
 * spaces per level, `"key": value`, empty containers as "{\n}" at their
 * level; undefined members are left out (QAPI's absent optional members).
 */
export function jsonPretty(v: JsonValue): string {
  const parts: string[] = [];
  write(v, 0, parts);
  return parts.join('');
}

function write(v: JsonValue, depth: number, out: string[]): void {
  if (v === null) { out.push('null'); return; }
  if (typeof v === 'string') { out.push(jsonQuote(v)); return; }
  if (typeof v === 'boolean') { out.push(v ? 'true' : 'false'); return; }
  if (typeof v === 'number' || typeof v === 'bigint') { out.push(String(v)); return; }
  const nl = (d: number): string => `\n${' '.repeat(d * 4)}`;
  if (Array.isArray(v)) {
    out.push('[');
    v.forEach((item, i) => {
      out.push(i > 0 ? ',' : '', nl(depth + 1));
      write(item, depth + 1, out);
    });
    out.push(nl(depth), ']');
    return;
  }
  out.push('{');
  let i = 0;
  for (const [k, item] of Object.entries(v)) {
    if (item === undefined) continue;
    out.push(i++ > 0 ? ',' : '', nl(depth + 1), jsonQuote(k), ': ');
    write(item, depth + 1, out);
  }
  out.push(nl(depth), '}');
}

/** Compact QEMU JSON (qobject_to_json): `{"a": 1, "b": [1, 2]}` with QEMU's spacing. */
export function jsonCompact(v: JsonValue): string {
  if (v === null) return 'null';
  if (typeof v === 'string') return jsonQuote(v);
  if (typeof v === 'boolean') return v ? 'true' : 'false';
  if (typeof v === 'number' || typeof v === 'bigint') return String(v);
  if (Array.isArray(v)) return `[${v.map(jsonCompact).join(', ')}]`;
  const items = Object.entries(v).filter(([, x]) => x !== undefined).map(([k, x]) => `${jsonQuote(k)}: ${jsonCompact(x as JsonValue)}`);
  return `{${items.join(', ')}}`;
}

/** QEMU's tdb_hash of a QDict key; QDicts iterate their 512 buckets in order. */
function qdictHash(key: string): number {
  const bytes = new TextEncoder().encode(key);
  let v = Math.imul(0x238f13af, bytes.length) >>> 0;
  for (let i = 0; i < bytes.length; i++) v = (v + ((bytes[i]! << ((i * 5) % 24)) >>> 0)) >>> 0;
  return (Math.imul(1103515243, v) + 12345) >>> 0;
}

/**
 * Keys in the order a QEMU QDict holding them iterates: by hash bucket, and
 * within a bucket the most recently inserted first. QEMU prints dictionaries
 * (JSON output, format-specific dumps) in this order, so matching it makes
 * our output byte-identical rather than merely equivalent.
 */
export function qdictOrder(keys: readonly string[]): string[] {
  const indexed = keys.map((k, i) => ({ k, i, b: qdictHash(k) % 512 }));
  indexed.sort((x, y) => x.b - y.b || y.i - x.i);
  return indexed.map((x) => x.k);
}

/** Recursively reorders every object's keys into QDict iteration order (arrays keep theirs). */
export function asQDict(v: JsonValue): JsonValue {
  if (v === null || typeof v !== 'object') return v;
  if (Array.isArray(v)) return v.map(asQDict);
  const out: { [key: string]: JsonValue } = {};
  const present = Object.keys(v).filter((k) => v[k] !== undefined);
  for (const k of qdictOrder(present)) out[k] = asQDict(v[k]!);
  return out;
}

/**
 * QEMU's dump_qobject for human output (bdrv_image_info_specific_dump):
 * `key: value` lines indented four spaces per level, dashes in keys shown
 * as spaces, lists as `[i]:` items; dictionaries in QDict order.
 */
export function dumpQObject(v: JsonValue, indent: number): string {
  let out = '';
  const pad = ' '.repeat(indent * 4);
  const scalar = (x: JsonValue): string => (typeof x === 'boolean' ? (x ? 'true' : 'false') : String(x));
  if (Array.isArray(v)) {
    v.forEach((item, i) => {
      const composite = item !== null && typeof item === 'object';
      out += `${pad}[${i}]:${composite ? '\n' : ' '}`;
      out += composite ? dumpQObject(item, indent + 1) : `${scalar(item)}\n`;
    });
    return out;
  }
  if (v !== null && typeof v === 'object') {
    const present = Object.keys(v).filter((k) => v[k] !== undefined);
    for (const k of qdictOrder(present)) {
      const item = v[k]!;
      const composite = item !== null && typeof item === 'object';
      out += `${pad}${k.replace(/-/g, ' ')}:${composite ? '\n' : ' '}`;
      out += composite ? dumpQObject(item, indent + 1) : `${scalar(item)}\n`;
    }
    return out;
  }
  return `${scalar(v)}\n`;
}
