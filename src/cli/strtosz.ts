/**
 * QEMU's number parsing for command lines (util/cutils.c): qemu_strtosz for
 * sizes with binary suffixes and the glibc strtol/strtoull behaviour the
 * tools inherit (leading blanks, sign, base prefixes, where parsing stops).
 * Everything is done in BigInt because QEMU's limits are 64-bit.
 */

/** Result of a size parse: the value, or the errno QEMU returns; `end` is where parsing stopped. */
export type SizeParse =
  | { ok: true; value: bigint; end: number }
  | { ok: false; code: 'EINVAL' | 'ERANGE'; end: number };

/** Largest value qemu_strtosz accepts. */
export const UINT64_MAX = (1n << 64n) - 1n;
/** Largest size most QEMU options accept (INT64_MAX). */
export const INT64_MAX = (1n << 63n) - 1n;

const SPACE = new Set([' ', '\t', '\n', '\v', '\f', '\r']);

/** Multiplier of a size suffix letter (QEMU's suffix_mul), or 0 when `c` is not one. */
function suffixMul(c: string | undefined, unit: bigint): bigint {
  switch (c?.toUpperCase()) {
    case 'B': return 1n;
    case 'K': return unit;
    case 'M': return unit ** 2n;
    case 'G': return unit ** 3n;
    case 'T': return unit ** 4n;
    case 'P': return unit ** 5n;
    case 'E': return unit ** 6n;
    default: return 0n;
  }
}

/** Result of an unsigned integer parse in glibc's strtoull style. */
export interface UIntParse {
  /** Value before negation; strtoull negates modulo 2^64 when `negative`. */
  value: bigint;
  negative: boolean;
  /** Index after the last consumed character; 0 when nothing was converted. */
  end: number;
  overflow: boolean;
}

/**
 * glibc's strtoull/strtoll scanning: blanks, an optional sign, and digits in
 * `base` (0 = auto: 0x hex, leading 0 octal, else decimal). Nothing converted
 * gives end = 0.
 */
export function scanUnsigned(text: string, base: number, start = 0): UIntParse {
  let i = start;
  while (i < text.length && SPACE.has(text[i]!)) i++;
  let negative = false;
  if (text[i] === '+' || text[i] === '-') {
    negative = text[i] === '-';
    i++;
  }
  let b = base;
  if ((b === 0 || b === 16) && text[i] === '0' && (text[i + 1] === 'x' || text[i + 1] === 'X') && digitValue(text[i + 2]) < 16) {
    i += 2;
    b = 16;
  } else if (b === 0) {
    b = text[i] === '0' ? 8 : 10;
  }
  const digitsStart = i;
  let value = 0n;
  const big = BigInt(b);
  while (i < text.length) {
    const d = digitValue(text[i]);
    if (d >= b) break;
    value = value * big + BigInt(d);
    i++;
  }
  if (i === digitsStart) return { value: 0n, negative: false, end: start, overflow: false };
  return { value, negative, end: i, overflow: value > UINT64_MAX };
}

function digitValue(c: string | undefined): number {
  if (c === undefined) return 99;
  const code = c.charCodeAt(0);
  if (code >= 48 && code <= 57) return code - 48;
  if (code >= 97 && code <= 122) return code - 87;
  if (code >= 65 && code <= 90) return code - 55;
  return 99;
}

/** Length of the decimal floating-point number glibc's strtod would read at `start` (0 = none). */
function scanDouble(text: string, start: number): number {
  const m = /^[0-9]*\.?[0-9]*/.exec(text.slice(start));
  const mant = m ? m[0] : '';
  if (!/[0-9]/.test(mant)) return 0;
  let len = mant.length;
  const exp = /^[eE][+-]?[0-9]+/.exec(text.slice(start + len));
  if (exp) len += exp[0].length;
  return len;
}

/**
 * qemu_strtosz: an unsigned decimal or 0x-hex integer, an optional decimal
 * fraction (only with a suffix other than B), and an optional suffix
 * B/K/M/G/T/P/E (any case, powers of `unit`). With `allowTrailing` false the
 * whole text must be consumed, as when QEMU passes a NULL end pointer.
 */
export function qemuStrtosz(text: string, opts: { defaultSuffix?: string; unit?: number; allowTrailing?: boolean } = {}): SizeParse {
  const unit = BigInt(opts.unit ?? 1024);
  const defaultSuffix = opts.defaultSuffix ?? 'B';
  const fail = (code: 'EINVAL' | 'ERANGE', end: number): SizeParse => ({ ok: false, code, end });
  const first = scanUnsigned(text, 10);
  if (first.end === 0) return fail('EINVAL', 0);
  if (first.overflow) return fail('ERANGE', first.end);
  if (text.slice(0, first.end).includes('-')) return fail('EINVAL', 0);
  let val = first.value;
  let end = first.end;
  let fraction = 0;
  let mulRequired = false;
  if (val === 0n && (text[end] === 'x' || text[end] === 'X')) {
    // Hex: reparse, and allow neither a fraction nor a suffix.
    const hex = scanUnsigned(text, 16);
    if (hex.overflow) return fail('ERANGE', hex.end);
    val = hex.value;
    end = hex.end;
    if (text[end] === '.' || suffixMul(text[end], unit) > 0n) return fail('EINVAL', 0);
  } else if (text[end] === '.') {
    const len = scanDouble(text, end);
    if (len === 0) {
      end++;
    } else {
      const f = text.slice(end, end + len);
      if (/[eE]/.test(f)) return fail('EINVAL', 0);
      fraction = Number(f);
      if (fraction !== 0) mulRequired = true;
      end += len;
    }
  }
  let mul = suffixMul(text[end], unit);
  if (mul > 0n) end++;
  else mul = suffixMul(defaultSuffix, unit);
  if (mul === 1n && mulRequired) return fail('EINVAL', 0);
  const fracPart = BigInt(Math.trunc(fraction * Number(mul)));
  if (val > (UINT64_MAX - fracPart) / mul) return fail('ERANGE', end);
  const value = val * mul + fracPart;
  if (!opts.allowTrailing && end < text.length) return { ok: false, code: 'EINVAL', end };
  return { ok: true, value, end };
}

/** qemu-io's cvtnum: qemu_strtosz over the whole text, and at most INT64_MAX. */
export function cvtnum(text: string): SizeParse {
  const r = qemuStrtosz(text);
  if (r.ok && r.value > INT64_MAX) return { ok: false, code: 'ERANGE', end: r.end };
  return r;
}

/**
 * glibc's strtol(text, &end, base) for a C `long` (64-bit): value clamped to
 * the long range on overflow, plus whether the whole text was consumed.
 */
export function strtol(text: string, base = 0): { value: bigint; end: number; overflow: boolean } {
  const r = scanUnsigned(text, base);
  if (r.end === 0) return { value: 0n, end: 0, overflow: false };
  let v = r.negative ? -r.value : r.value;
  let overflow = false;
  if (v > INT64_MAX) { v = INT64_MAX; overflow = true; }
  if (v < -INT64_MAX - 1n) { v = -INT64_MAX - 1n; overflow = true; }
  return { value: v, end: r.end, overflow };
}
