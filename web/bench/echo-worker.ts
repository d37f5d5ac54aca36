/**
 * The baseline of a UI thread → worker round trip: a worker that sends every
 * message straight back, transferring the buffer it carried (what a read
 * reply does at the least).
 */
self.onmessage = (e: MessageEvent<{ id: number; buf: ArrayBuffer }>) => {
  (self as unknown as Worker).postMessage(e.data, [e.data.buf]);
};
