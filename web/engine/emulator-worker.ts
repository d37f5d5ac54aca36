/**
 * An emulator-style worker for the engine specs: it receives a channel's
 * SharedArrayBuffer and runs a script of synchronous requests through
 * SabChannelClient, as an emulator's device model would, posting back what
 * it read or the error it got.
 */
import { SabChannelClient } from '../../src/client/sab-channel.ts';
import { isBlockError } from '../../src/core/errors.ts';
import { checksum, type ChannelOp, type ChannelResult } from './api-types.ts';

self.onmessage = (ev: MessageEvent<{ sab: SharedArrayBuffer; ops: ChannelOp[] }>) => {
  const out: ChannelResult[] = [];
  try {
    const ch = new SabChannelClient(ev.data.sab, { timeoutMs: 20_000 });
    for (const op of ev.data.ops) {
      try {
        switch (op.op) {
          case 'length':
            out.push({ ok: true, value: ch.getLength() });
            break;
          case 'write': {
            const buf = new Uint8Array(op.length).fill(op.fill);
            ch.write(buf, op.offset);
            out.push({ ok: true, value: op.length });
            break;
          }
          case 'read': {
            const buf = new Uint8Array(op.length);
            ch.read(buf, op.offset);
            out.push({ ok: true, value: checksum(buf), bytes: Array.from(buf.subarray(0, 16)) });
            break;
          }
          case 'flush':
            ch.flush();
            out.push({ ok: true, value: 0 });
            break;
        }
      } catch (e) {
        out.push({ ok: false, code: isBlockError(e) ? e.code : 'unknown', message: e instanceof Error ? e.message : String(e) });
      }
    }
  } catch (e) {
    out.push({ ok: false, code: isBlockError(e) ? e.code : 'unknown', message: e instanceof Error ? e.message : String(e) });
  }
  self.postMessage(out);
};
