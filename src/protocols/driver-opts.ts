/**
 * Reading typed driver options. Options reach a driver either already typed
 * (blockdev JSON: numbers and booleans) or as text (`-o size=1M`, filename
 * parsing, QemuOpts-style command lines); both forms are accepted here and
 * parsed with QEMU's rules so `size: '64k'` and `size: 65536` mean the same.
 */
import { BlockError } from '../core/errors.ts';
import { parseOptionValue, type OptionSpec } from '../core/options.ts';

function spec(name: string, type: OptionSpec['type']): OptionSpec {
  return { name, type };
}

/** A size option (bytes): a non-negative integer or QEMU size text; `def` when absent. */
export function sizeOption(options: Record<string, unknown>, name: string, def: number): number;
/** A size option (bytes), or undefined when absent. */
export function sizeOption(options: Record<string, unknown>, name: string): number | undefined;
export function sizeOption(options: Record<string, unknown>, name: string, def?: number): number | undefined {
  const v = options[name];
  if (v === undefined || v === null) return def;
  if (typeof v === 'number') {
    if (!Number.isSafeInteger(v) || v < 0) throw sizeError(name);
    return v;
  }
  if (typeof v === 'string') return parseOptionValue(spec(name, 'size'), v) as number;
  throw new BlockError('EINVAL', `Invalid parameter type for '${name}', expected: size`);
}

function sizeError(name: string): BlockError {
  return new BlockError(
    'EINVAL',
    `Parameter '${name}' expects a non-negative number below 2^64\nOptional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively.`,
  );
}

/** An integer option (may be negative; callers range-check); `def` when absent. */
export function numberOption(options: Record<string, unknown>, name: string, def: number): number {
  const v = options[name];
  if (v === undefined || v === null) return def;
  if (typeof v === 'number') {
    if (!Number.isSafeInteger(v)) throw new BlockError('EINVAL', `Parameter '${name}' expects a number`);
    return v;
  }
  if (typeof v === 'string') return parseOptionValue(spec(name, 'number'), v) as number;
  throw new BlockError('EINVAL', `Invalid parameter type for '${name}', expected: number`);
}

/** A boolean option (true/false or on/off/yes/no text); `def` when absent. */
export function boolOption(options: Record<string, unknown>, name: string, def: boolean): boolean {
  const v = options[name];
  if (v === undefined || v === null) return def;
  if (typeof v === 'boolean') return v;
  if (typeof v === 'string') return parseOptionValue(spec(name, 'bool'), v) as boolean;
  throw new BlockError('EINVAL', `Invalid parameter type for '${name}', expected: boolean`);
}

/** A string option, or undefined when absent. */
export function stringOption(options: Record<string, unknown>, name: string): string | undefined {
  const v = options[name];
  if (v === undefined || v === null) return undefined;
  if (typeof v === 'string') return v;
  throw new BlockError('EINVAL', `Invalid parameter type for '${name}', expected: string`);
}

/** An enum option checked against `allowed` with QEMU's qapi_enum_parse message; `def` when absent. */
export function enumOption<T extends string>(options: Record<string, unknown>, name: string, allowed: readonly T[], def: T): T {
  const v = stringOption(options, name);
  if (v === undefined) return def;
  if (!(allowed as readonly string[]).includes(v)) throw new BlockError('EINVAL', `invalid parameter value: ${v}`);
  return v as T;
}
