/**
 * Times synchronous 4 KiB reads over the engine's SharedArrayBuffer channel
 * (SabChannelClient, as an emulator's worker uses it) and, as the baseline,
 * the bare Atomics round trip with the pong worker. Atomics.wait is not
 * allowed on the page's thread, hence a worker.
 */
import { SabChannelClient } from '../../src/client/sab-channel.ts';
import type { SabRequest, SabResult } from './protocol.ts';

/** Ops/s of `op` over at least `minMs`. */
function rate(op: () => void, minMs: number): number {
  let n = 0;
  const t = performance.now();
  let el = 0;
  do {
    for (let i = 0; i < 32; i++) op();
    n += 32;
    el = performance.now() - t;
  } while (el < minMs);
  return (n * 1000) / el;
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[s.length >> 1]!;
}

self.onmessage = (e: MessageEvent<SabRequest>) => {
  const { channel, ping, minMs, rounds } = e.data;
  const client = new SabChannelClient(channel);
  const buf = new Uint8Array(4096);
  let off = 0;
  const read = (): void => {
    client.read(buf, off);
    off = (off + 4096) % (32 << 20);
  };
  const ctl = new Int32Array(ping, 0, 16);
  const data = new Uint8Array(ping, 64, 4096);
  let seq = 0;
  const bare = (): void => {
    seq++;
    Atomics.store(ctl, 0, seq);
    Atomics.notify(ctl, 0);
    while (Atomics.load(ctl, 1) !== seq) Atomics.wait(ctl, 1, seq - 1);
    buf.set(data);
  };
  for (let i = 0; i < 200; i++) {
    read();
    bare();
  }
  const a: number[] = [];
  const b: number[] = [];
  for (let r = 0; r < rounds; r++) {
    a.push(rate(read, minMs));
    b.push(rate(bare, minMs));
  }
  Atomics.store(ctl, 0, -1);
  Atomics.notify(ctl, 0);
  const out: SabResult = { kind: 'sab-result', channel: median(a), bare: median(b) };
  (self as unknown as Worker).postMessage(out);
};
