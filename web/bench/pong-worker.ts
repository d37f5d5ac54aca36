/**
 * The other end of the bare SharedArrayBuffer round trip: waits for the ping
 * word to change, copies 4 KiB into the shared data area (what a channel read
 * does at the least) and answers. Layout of the buffer: Int32 [0] = request
 * counter, [1] = reply counter, bytes from 64 = data.
 */
self.onmessage = (e: MessageEvent<SharedArrayBuffer>) => {
  const ctl = new Int32Array(e.data, 0, 16);
  const data = new Uint8Array(e.data, 64, 4096);
  const src = new Uint8Array(4096).fill(7);
  let seen = 0;
  for (;;) {
    Atomics.wait(ctl, 0, seen);
    seen = Atomics.load(ctl, 0);
    if (seen < 0) return;
    data.set(src);
    Atomics.store(ctl, 1, seen);
    Atomics.notify(ctl, 1);
  }
};
