/**
 * The shared memory layout of the SharedArrayBuffer channel between an
 * emulator's worker (the client, which blocks in Atomics.wait) and the engine
 * worker (the server, which waits with Atomics.waitAsync so its event loop
 * keeps serving everything else). One request at a time per channel:
 *
 *   header: 16 Int32 slots (64 bytes), then `capacity` data bytes.
 *   STATE  IDLE → (client) REQUEST → (server) DONE → (client) IDLE; CLOSED ends it.
 *   OP, OFFSET (lo/hi 32-bit halves), LENGTH describe the request;
 *   ERRNO (0 = success), RESULT (lo/hi) and MESSAGE_LENGTH the answer.
 *
 * Reads land in the data area straight from the driver, writes are taken from
 * it; an error's message is put there as UTF-8 text.
 */
import { BlockError, ERRNO, type ErrnoCode } from '../core/errors.ts';

/** Int32 slots of the header. */
export const SLOT = {
  STATE: 0,
  OP: 1,
  OFFSET_LO: 2,
  OFFSET_HI: 3,
  LENGTH: 4,
  ERRNO: 5,
  RESULT_LO: 6,
  RESULT_HI: 7,
  MESSAGE_LENGTH: 8,
} as const;

/** Values of the STATE slot. */
export const STATE = { IDLE: 0, REQUEST: 1, DONE: 2, CLOSED: 3 } as const;

/** Values of the OP slot. */
export const OP = { READ: 1, WRITE: 2, FLUSH: 3, LENGTH: 4, WRITE_ZEROES: 5, DISCARD: 6 } as const;

/** Bytes of the header before the data area. */
export const HEADER_BYTES = 64;

/** Default data area size: 1 MiB, so a typical guest request is one round trip. */
export const DEFAULT_CAPACITY = 1 << 20;

const TWO32 = 2 ** 32;

/** Splits a byte offset (< 2^53) into the two 32-bit slot values. */
export function splitOffset(n: number): [number, number] {
  return [n % TWO32 | 0, Math.floor(n / TWO32) | 0];
}

/** Joins the two 32-bit slot values back into a byte offset. */
export function joinOffset(lo: number, hi: number): number {
  return (hi >>> 0) * TWO32 + (lo >>> 0);
}

/** The errno code for a Linux errno number, EIO when unknown. */
export function codeOfErrno(n: number): ErrnoCode {
  for (const [k, v] of Object.entries(ERRNO)) if (v === n) return k as ErrnoCode;
  return 'EIO';
}

/** Why a SharedArrayBuffer channel cannot work here, or undefined when it can. */
export function sabUnavailableReason(): string | undefined {
  const g = globalThis as { SharedArrayBuffer?: unknown; crossOriginIsolated?: boolean; Atomics?: unknown };
  if (g.crossOriginIsolated === false || typeof g.SharedArrayBuffer !== 'function') {
    return (
      'The SharedArrayBuffer channel needs cross-origin isolation: serve the page with the headers ' +
      "'Cross-Origin-Opener-Policy: same-origin' and 'Cross-Origin-Embedder-Policy: require-corp' " +
      '(window.crossOriginIsolated is false here)'
    );
  }
  if (typeof g.Atomics !== 'object') return 'The SharedArrayBuffer channel needs Atomics, which this context lacks';
  return undefined;
}

/** Throws ENOTSUP with a clear message when cross-origin isolation (and so SharedArrayBuffer) is missing. */
export function requireSharedMemory(): void {
  const why = sabUnavailableReason();
  if (why) throw new BlockError('ENOTSUP', why);
}
