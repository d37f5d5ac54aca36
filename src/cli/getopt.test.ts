import { describe, expect, it } from 'vitest';
import { Getopt, type LongOption } from './getopt.ts';

function all(argv: string[], optstring: string, longs: LongOption[] = []): { opts: Array<[string | number, string | undefined]>; rest: string[]; errors: string[] } {
  const errors: string[] = [];
  const g = new Getopt(['prog', ...argv], optstring, longs, (m) => errors.push(m));
  const opts: Array<[string | number, string | undefined]> = [];
  for (let o = g.next(); o; o = g.next()) opts.push([o.opt, o.arg]);
  return { opts, rest: g.rest(), errors };
}

describe('Getopt', () => {
  it('permutes operands behind options like glibc', () => {
    expect(all(['0', '1', '-v'], 'v')).toEqual({ opts: [['v', undefined]], rest: ['0', '1'], errors: [] });
  });
  it('stops at -- and keeps what follows', () => {
    expect(all(['-a', '--', '-b'], 'ab').rest).toEqual(['-b']);
  });
  it('reads clustered options and attached arguments', () => {
    expect(all(['-abxval', '-x', 'v2'], 'abx:').opts).toEqual([['a', undefined], ['b', undefined], ['x', 'val'], ['x', 'v2']]);
  });
  it('prints glibc messages unless the optstring starts with a colon', () => {
    expect(all(['-z'], 'a').errors).toEqual(["prog: invalid option -- 'z'\n"]);
    expect(all(['-a'], 'a:').errors).toEqual(["prog: option requires an argument -- 'a'\n"]);
    const silent = all(['-a'], ':a:');
    expect(silent.errors).toEqual([]);
    expect(silent.opts).toEqual([[':', undefined]]);
  });
  it('matches long options by unique prefix and reports ambiguity', () => {
    const longs: LongOption[] = [{ name: 'cmd', hasArg: 1, val: 'c' }, { name: 'copy-on-read', hasArg: 0, val: 'C' }, { name: 'cache', hasArg: 1, val: 't' }];
    expect(all(['--cm', 'x'], 'c:Ct:', longs).opts).toEqual([['c', 'x']]);
    expect(all(['--c'], 'c:Ct:', longs).errors).toEqual(["prog: option '--c' is ambiguous; possibilities: '--cmd' '--copy-on-read' '--cache'\n"]);
    expect(all(['--copy-on-read=1'], 'c:Ct:', longs).errors).toEqual(["prog: option '--copy-on-read' doesn't allow an argument\n"]);
    expect(all(['--foo=1'], 'c:Ct:', longs).errors).toEqual(["prog: unrecognized option '--foo=1'\n"]);
  });
  it('stops at the first operand with a leading +', () => {
    expect(all(['info', '-f', 'raw'], '+f:').rest).toEqual(['info', '-f', 'raw']);
  });
});
