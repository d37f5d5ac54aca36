import { describe, expect, it } from 'vitest';
import { altHex, asQDict, cvtstr, dumpQObject, fmtFixed, fmtG, hexDump, jsonPretty, jsonQuote, qdictOrder, sizeToStr } from './format.ts';

describe('printf conversions', () => {
  it('rounds exact ties to even like glibc', () => {
    expect(fmtFixed(1.0625, 3)).toBe('1.062');
    expect(fmtFixed(1.0635, 3)).toBe('1.063'); // the double is just below the tie
    expect(fmtFixed(0.5, 0)).toBe('0');
    expect(fmtFixed(1.5, 0)).toBe('2');
    expect(fmtFixed(2.5, 0)).toBe('2');
    expect(fmtFixed(540.79837, 6)).toBe('540.798370');
  });
  it('formats %g with three significant digits', () => {
    expect(fmtG(64, 3)).toBe('64');
    expect(fmtG(0.9765625, 3)).toBe('0.977');
    expect(fmtG(0.99951171875, 3)).toBe('1');
    expect(fmtG(999.9, 3)).toBe('1e+03');
    expect(fmtG(1.5, 3)).toBe('1.5');
    expect(fmtG(0.0001234, 3)).toBe('0.000123');
    expect(fmtG(0.00001234, 3)).toBe('1.23e-05');
  });
  it('prints %#x with the 0x prefix except for zero', () => {
    expect(altHex(0)).toBe('0');
    expect(altHex(4096)).toBe('0x1000');
  });
});

describe('size formatting', () => {
  it('cvtstr trims the first .000', () => {
    expect(cvtstr(4096)).toBe('4 KiB');
    expect(cvtstr(1536)).toBe('1.500 KiB');
    expect(cvtstr(1)).toBe('1 bytes');
    expect(cvtstr(540.79837)).toBe('540.798370 bytes');
    expect(cvtstr(0)).toBe('0 bytes');
    expect(cvtstr(3 * 2 ** 20)).toBe('3 MiB');
  });
  it('size_to_str switches units at 1000', () => {
    expect(sizeToStr(67108864)).toBe('64 MiB');
    expect(sizeToStr(4096)).toBe('4 KiB');
    expect(sizeToStr(69632)).toBe('68 KiB');
    expect(sizeToStr(1000)).toBe('0.977 KiB');
    expect(sizeToStr(999)).toBe('999 B');
    expect(sizeToStr(0)).toBe('0 B');
    expect(sizeToStr(1024)).toBe('1 KiB');
  });
});

describe('hexDump', () => {
  it('prints 16 bytes a line with printable alphanumerics', () => {
    expect(hexDump(new Uint8Array([0x61, 0x20, 0xab]), 16)).toBe('00000010:  61 20 ab  a..\n');
  });
});

describe('QEMU JSON', () => {
  it('orders keys like a QDict', () => {
    expect(qdictOrder(['filename', 'format', 'virtual-size', 'actual-size', 'dirty-flag'])).toEqual(['virtual-size', 'filename', 'format', 'actual-size', 'dirty-flag']);
  });
  it('pretty-prints with four-space indents and QEMU escapes', () => {
    expect(jsonPretty({ a: 1, b: [true, 'x'], c: {} })).toBe('{\n    "a": 1,\n    "b": [\n        true,\n        "x"\n    ],\n    "c": {\n    }\n}');
    expect(jsonQuote('é\u007f"\n')).toBe('"\\u00E9\\u007F\\"\\n"');
  });
  it('dumps dictionaries for humans', () => {
    expect(dumpQObject(asQDict({ 'refcount-bits': 16, corrupt: false }), 1)).toBe('    refcount bits: 16\n    corrupt: false\n');
  });
});
