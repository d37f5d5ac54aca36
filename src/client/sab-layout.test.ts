// The SharedArrayBuffer channel's shared pieces: offset halves, errno codes,
// and the clear error both ends give when the page is not cross-origin
// isolated (no COOP/COEP headers), which is what a misconfigured server causes.

import { afterEach, describe, expect, it } from 'vitest';
import { BlockError } from '../core/errors.ts';
import { SabChannelClient } from './sab-channel.ts';
import { codeOfErrno, joinOffset, requireSharedMemory, sabUnavailableReason, splitOffset } from './sab-layout.ts';

const g = globalThis as { crossOriginIsolated?: boolean };

afterEach(() => {
  delete g.crossOriginIsolated;
});

describe('channel layout', () => {
  it('splits and joins offsets up to 2^53', () => {
    for (const n of [0, 1, 2 ** 31, 2 ** 32 - 1, 2 ** 32, 2 ** 40 + 12345, 2 ** 53 - 1]) {
      const [lo, hi] = splitOffset(n);
      expect(joinOffset(lo, hi)).toBe(n);
    }
  });

  it('maps errno numbers back to codes, EIO for unknown ones', () => {
    expect(codeOfErrno(28)).toBe('ENOSPC');
    expect(codeOfErrno(16)).toBe('EBUSY');
    expect(codeOfErrno(9999)).toBe('EIO');
  });

  it('explains what is missing when the page is not cross-origin isolated', () => {
    expect(sabUnavailableReason()).toBeUndefined();
    g.crossOriginIsolated = false;
    const why = sabUnavailableReason();
    expect(why).toContain('cross-origin isolation');
    expect(why).toContain('Cross-Origin-Opener-Policy: same-origin');
    expect(why).toContain('Cross-Origin-Embedder-Policy: require-corp');
    let caught: unknown;
    try {
      requireSharedMemory();
    } catch (e) {
      caught = e;
    }
    expect(caught).toBeInstanceOf(BlockError);
    expect((caught as BlockError).code).toBe('ENOTSUP');
    expect(() => new SabChannelClient(new SharedArrayBuffer(1024))).toThrow(/cross-origin isolation/);
  });

  it('refuses buffers that are not channels', () => {
    expect(() => new SabChannelClient(new SharedArrayBuffer(16))).toThrow(/Not a channel/);
  });
});
