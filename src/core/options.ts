/**
 * Option descriptions (QEMU's QemuOptsList) and value parsing with QEMU's rules
 * for sizes and booleans, so `-o cluster_size=64k` means what it means in QEMU.
 */
import { BlockError } from './errors.ts';

export type OptionType = 'string' | 'bool' | 'number' | 'size';

/** One option a driver accepts at open or create time. */
export interface OptionSpec {
  name: string;
  type: OptionType;
  help?: string;
  /** Default as QEMU prints it in `-o help` (informative). */
  defaultValue?: string;
}

export type OptionValue = string | number | boolean;
/** Parsed create/amend options keyed by QEMU's names (`size`, `cluster_size`, `backing_file`…). */
export type CreateOptions = Record<string, OptionValue | undefined>;

const SUFFIXES: Record<string, number> = { b: 0, k: 10, m: 20, g: 30, t: 40, p: 50, e: 60 };

/**
 * Parses a size the way qemu_strtosz does: digits with an optional fraction and
 * one of b/k/M/G/T/P/E (powers of 1024, case-insensitive). Returns undefined
 * when the text is not a size, and throws ERANGE-style EINVAL when it is too big.
 */
export function parseSize(text: string, defaultSuffix = 'b'): number | undefined {
  const m = /^\s*(\d+)(?:\.(\d+))?\s*([a-zA-Z]?)$/.exec(text);
  if (!m) {
    const hex = /^\s*0x([0-9a-fA-F]+)$/.exec(text);
    return hex ? Number.parseInt(hex[1]!, 16) : undefined;
  }
  const suffix = (m[3] || defaultSuffix).toLowerCase();
  const shift = SUFFIXES[suffix];
  if (shift === undefined) return undefined;
  const whole = BigInt(m[1]!);
  let value = whole << BigInt(shift);
  if (m[2]) {
    if (shift === 0) return undefined; // QEMU rejects fractional byte counts
    const frac = m[2];
    value += (BigInt(frac) << BigInt(shift)) / 10n ** BigInt(frac.length);
  }
  if (value > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw new BlockError('ERANGE', 'Value exceeds maximum supported size');
  }
  return Number(value);
}

/** Parses QEMU's boolean spellings (on/off, yes/no, true/false). */
export function parseBool(name: string, text: string): boolean {
  switch (text) {
    case 'on': case 'yes': case 'true': case 'y': return true;
    case 'off': case 'no': case 'false': case 'n': return false;
    default:
      throw new BlockError('EINVAL', `Parameter '${name}' expects 'on' or 'off'`);
  }
}

/** Converts one textual option to its typed value per `spec`, with QEMU's error messages. */
export function parseOptionValue(spec: OptionSpec, text: OptionValue): OptionValue {
  if (typeof text !== 'string') return text;
  switch (spec.type) {
    case 'string': return text;
    case 'bool': return parseBool(spec.name, text);
    case 'number': {
      if (!/^\s*-?\d+$/.test(text)) throw new BlockError('EINVAL', `Parameter '${spec.name}' expects a number`);
      return Number(text);
    }
    case 'size': {
      let v: number | undefined;
      try {
        v = parseSize(text);
      } catch {
        throw new BlockError('EINVAL', `Parameter '${spec.name}' expects a non-negative number below 2^64\nOptional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively.`);
      }
      if (v === undefined) {
        throw new BlockError('EINVAL', `Parameter '${spec.name}' expects a non-negative number below 2^64\nOptional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively.`);
      }
      return v;
    }
  }
}

/**
 * Parses `-o a=1,b=2` text (QEMU's qemu_opts_do_parse: `,,` escapes a comma)
 * into name/value pairs, in order.
 */
export function splitOptionString(text: string): Array<[string, string]> {
  const out: Array<[string, string]> = [];
  let i = 0;
  while (i < text.length) {
    let name = '';
    while (i < text.length && text[i] !== '=' && text[i] !== ',') name += text[i++];
    let value: string | undefined;
    if (text[i] === '=') {
      i++;
      value = '';
      while (i < text.length) {
        if (text[i] === ',') {
          if (text[i + 1] === ',') { value += ','; i += 2; continue; }
          break;
        }
        value += text[i++];
      }
    }
    if (text[i] === ',') i++;
    if (name === '') continue;
    out.push([name, value ?? 'on']);
  }
  return out;
}

/** Validates and types a set of create options against a driver's list; unknown names are errors. */
export function parseCreateOptions(specs: readonly OptionSpec[], raw: Record<string, OptionValue | undefined>): CreateOptions {
  const byName = new Map(specs.map((s) => [s.name, s]));
  const out: CreateOptions = {};
  for (const [k, v] of Object.entries(raw)) {
    if (v === undefined) continue;
    const spec = byName.get(k);
    if (!spec) throw new BlockError('EINVAL', `Invalid parameter '${k}'`);
    out[k] = parseOptionValue(spec, v);
  }
  return out;
}
