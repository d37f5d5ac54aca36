import { describe, expect, it } from 'vitest';
import { cvtnum, qemuStrtosz, strtol } from './strtosz.ts';

const ok = (t: string): bigint | string => {
  const r = cvtnum(t);
  return r.ok ? r.value : r.code;
};

describe('qemu_strtosz', () => {
  it('accepts QEMU 7.2 size syntax', () => {
    expect(ok('0x10')).toBe(16n);
    expect(ok('+12')).toBe(12n);
    expect(ok('010')).toBe(10n);
    expect(ok('1.k')).toBe(1024n);
    expect(ok('1.')).toBe(1n);
    expect(ok('1.0')).toBe(1n);
    expect(ok('0.5k')).toBe(512n);
    expect(ok('0.001k')).toBe(1n);
    expect(ok('1.5M')).toBe(1572864n);
    expect(ok('1K')).toBe(1024n);
    expect(ok('1b')).toBe(1n);
  });
  it('rejects what QEMU rejects', () => {
    for (const t of ['1.5', '1.5b', '1e3', '-0', '1k5', '.5k', '0x', '1.5e1k', '', 'x', '0x10k', '0x1.5']) expect(ok(t)).toBe('EINVAL');
    for (const t of ['16E', '15.9999E', '18446744073709551615', '9223372036854775808', '8E']) expect(ok(t)).toBe('ERANGE');
  });
  it('allows values up to UINT64_MAX without the int64 limit', () => {
    const r = qemuStrtosz('18446744073709551615');
    expect(r.ok && r.value).toBe((1n << 64n) - 1n);
  });
  it('reports where parsing stopped when trailing text is allowed', () => {
    const r = qemuStrtosz('64k,', { allowTrailing: true });
    expect(r).toEqual({ ok: true, value: 65536n, end: 3 });
  });
});

describe('strtol', () => {
  it('follows C base detection', () => {
    expect(strtol('0x1f')).toMatchObject({ value: 31n, end: 4 });
    expect(strtol('012')).toMatchObject({ value: 10n, end: 3 });
    expect(strtol('-5')).toMatchObject({ value: -5n, end: 2 });
    expect(strtol('x')).toMatchObject({ value: 0n, end: 0 });
  });
});
