/**
 * A getopt_long that behaves like glibc's, because qemu-img and qemu-io use
 * glibc's and their users rely on its quirks: arguments are permuted so
 * options may follow operands, long options match by unique prefix, `--`
 * ends option parsing, a leading `+` stops at the first operand, and a
 * leading `:` silences the built-in messages and reports a missing argument
 * as ':' instead of '?'.
 */

/** A long option (glibc's struct option); `val` is what next() reports for it. */
export interface LongOption {
  name: string;
  /** 0 = no argument, 1 = required, 2 = optional (only as `--name=value`). */
  hasArg: 0 | 1 | 2;
  /** A short option letter or a number ≥ 256 naming the long option. */
  val: string | number;
}

/** One parsed option: `opt` is the short letter / long val, or '?' / ':' on errors. */
export interface ParsedOption {
  opt: string | number;
  arg?: string;
}

/**
 * An iterator over the options of `argv` (argv[0] is the program or command
 * name, used in messages). After next() returns null, `optind` indexes the
 * first operand in the (permuted) `argv`.
 */
export class Getopt {
  /** Index of the next element of argv to scan (glibc's optind). */
  optind = 1;
  /** The option character that caused the last error (glibc's optopt). */
  optopt: string | number = 0;
  readonly argv: string[];
  private readonly shorts: Map<string, 0 | 1 | 2>;
  private readonly longs: readonly LongOption[];
  private readonly silent: boolean;
  private readonly requireOrder: boolean;
  /** Position inside a cluster of short options ("-abc"); 0 when between elements. */
  private nextChar = 0;
  /** Permutation bookkeeping: operands skipped so far sit in [firstNonopt, lastNonopt). */
  private firstNonopt = 1;
  private lastNonopt = 1;

  /** Prepares to scan `argv` with glibc's optstring syntax and long options; `printError` receives glibc's messages. */
  constructor(argv: readonly string[], optstring: string, longopts: readonly LongOption[] = [], private readonly printError: (msg: string) => void = () => undefined) {
    this.argv = [...argv];
    let spec = optstring;
    this.requireOrder = spec.startsWith('+');
    if (spec.startsWith('+') || spec.startsWith('-')) spec = spec.slice(1);
    this.silent = spec.startsWith(':');
    if (this.silent) spec = spec.slice(1);
    this.shorts = new Map();
    for (let i = 0; i < spec.length; i++) {
      const c = spec[i]!;
      let kind: 0 | 1 | 2 = 0;
      if (spec[i + 1] === ':') {
        kind = spec[i + 2] === ':' ? 2 : 1;
        i += kind;
      }
      this.shorts.set(c, kind);
    }
    this.longs = longopts;
  }

  private get prog(): string {
    return this.argv[0] ?? '';
  }

  private error(msg: string): void {
    if (!this.silent) this.printError(`${this.prog}: ${msg}\n`);
  }

  /** Moves the operands skipped so far behind the options just scanned (glibc's exchange()). */
  private exchange(): void {
    const a = this.argv;
    const nonopts = a.slice(this.firstNonopt, this.lastNonopt);
    const opts = a.slice(this.lastNonopt, this.optind);
    a.splice(this.firstNonopt, this.optind - this.firstNonopt, ...opts, ...nonopts);
    this.firstNonopt += opts.length;
    this.lastNonopt = this.optind;
  }

  /** Returns the next option, or null when options are exhausted. */
  next(): ParsedOption | null {
    const a = this.argv;
    if (this.nextChar === 0) {
      if (this.lastNonopt > this.optind) this.lastNonopt = this.optind;
      if (this.firstNonopt > this.optind) this.firstNonopt = this.optind;
      if (!this.requireOrder) {
        if (this.firstNonopt !== this.lastNonopt && this.lastNonopt !== this.optind) this.exchange();
        else if (this.lastNonopt !== this.optind) this.firstNonopt = this.optind;
        while (this.optind < a.length && !isOption(a[this.optind]!)) this.optind++;
        this.lastNonopt = this.optind;
      }
      if (this.optind !== a.length && a[this.optind] === '--') {
        this.optind++;
        if (this.firstNonopt !== this.lastNonopt && this.lastNonopt !== this.optind) this.exchange();
        else if (this.firstNonopt === this.lastNonopt) this.firstNonopt = this.optind;
        this.lastNonopt = a.length;
        this.optind = a.length;
      }
      if (this.optind === a.length) {
        if (this.firstNonopt !== this.lastNonopt) this.optind = this.firstNonopt;
        return null;
      }
      // Only reachable with '+': permutation skipped every operand above.
      if (!isOption(a[this.optind]!)) return null;
      const cur = a[this.optind]!;
      if (cur.startsWith('--') && this.longs.length > 0) {
        this.optind++;
        return this.parseLong(cur.slice(2));
      }
      this.nextChar = 1;
    }
    return this.parseShort();
  }

  private parseLong(body: string): ParsedOption {
    const eq = body.indexOf('=');
    const name = eq >= 0 ? body.slice(0, eq) : body;
    const value = eq >= 0 ? body.slice(eq + 1) : undefined;
    let found: LongOption | undefined = this.longs.find((o) => o.name === name);
    if (!found) {
      const cands = this.longs.filter((o) => o.name.startsWith(name));
      const distinct = cands.filter((o, i) => cands.findIndex((p) => p.hasArg === o.hasArg && p.val === o.val) === i);
      if (distinct.length === 1) found = cands[0];
      else if (cands.length > 1) {
        this.error(`option '--${name}' is ambiguous; possibilities:${cands.map((o) => ` '--${o.name}'`).join('')}`);
        this.optopt = 0;
        return { opt: '?' };
      }
    }
    if (!found) {
      this.error(`unrecognized option '--${body}'`);
      this.optopt = 0;
      return { opt: '?' };
    }
    if (value !== undefined) {
      if (found.hasArg === 0) {
        this.error(`option '--${found.name}' doesn't allow an argument`);
        this.optopt = found.val;
        return { opt: '?' };
      }
      return { opt: found.val, arg: value };
    }
    if (found.hasArg === 1) {
      if (this.optind < this.argv.length) return { opt: found.val, arg: this.argv[this.optind++]! };
      this.error(`option '--${found.name}' requires an argument`);
      this.optopt = found.val;
      return { opt: this.silent ? ':' : '?' };
    }
    return { opt: found.val };
  }

  private parseShort(): ParsedOption {
    const cur = this.argv[this.optind]!;
    const c = cur[this.nextChar++]!;
    const atEnd = this.nextChar >= cur.length;
    const kind = c === ':' ? undefined : this.shorts.get(c);
    if (kind === undefined) {
      if (atEnd) { this.optind++; this.nextChar = 0; }
      this.error(`invalid option -- '${c}'`);
      this.optopt = c;
      return { opt: '?' };
    }
    if (kind === 0) {
      if (atEnd) { this.optind++; this.nextChar = 0; }
      return { opt: c };
    }
    if (!atEnd) {
      const arg = cur.slice(this.nextChar);
      this.optind++;
      this.nextChar = 0;
      return { opt: c, arg };
    }
    this.optind++;
    this.nextChar = 0;
    if (kind === 2) return { opt: c };
    if (this.optind < this.argv.length) return { opt: c, arg: this.argv[this.optind++]! };
    this.error(`option requires an argument -- '${c}'`);
    this.optopt = c;
    return { opt: this.silent ? ':' : '?' };
  }

  /** The operands left after option parsing (valid once next() returned null). */
  rest(): string[] {
    return this.argv.slice(this.optind);
  }
}

/** An element that starts an option: '-' followed by something ("-" alone is an operand). */
function isOption(s: string): boolean {
  return s.length > 1 && s[0] === '-';
}
