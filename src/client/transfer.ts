/**
 * comlink transfer handlers both ends of the engine boundary register:
 *
 * - `throw`: comlink's own handler keeps only name, message and stack of a
 *   thrown Error, so a BlockError would arrive without its code and node.
 *   Ours sends BlockErrors as plain data (BlockError.toJSON) and rebuilds
 *   them; DOMExceptions keep their name (QuotaExceededError…) so callers can
 *   still tell them apart; everything else goes through comlink's handler.
 * - `abort-signal`: an AbortSignal cannot be cloned. It crosses as a
 *   MessagePort on which the sending side posts once when the signal fires;
 *   the receiving side gets a fresh AbortSignal that aborts then. Like every
 *   comlink handler it applies to top-level arguments only, which is why the
 *   engine's long operations take the signal as their own argument.
 *
 * The page, the engine worker and any emulator worker that talks comlink must
 * all call registerEngineTransferHandlers() before their first call.
 */
import { transferHandlers, type TransferHandler } from 'comlink';
import { BlockError, type SerializedBlockError } from '../core/errors.ts';

/** The value comlink hands the `throw` handler: the thrown thing under `value`. */
interface Thrown {
  value: unknown;
}

/** How a thrown value travels. */
type ThrownWire = { blockError: SerializedBlockError } | { domException: { name: string; message: string } } | { other: unknown };

/** Marks our handler so registering twice never wraps our own wrapper. */
interface Marked {
  qblockEngine?: true;
}

/** Builds the wrapper around comlink's original `throw` handler. */
function throwHandler(base: TransferHandler<Thrown, unknown>): TransferHandler<Thrown, ThrownWire> & Marked {
  return {
    qblockEngine: true,
    canHandle: (v: unknown): v is Thrown => base.canHandle(v),
    serialize(v: Thrown): [ThrownWire, Transferable[]] {
      const e = v.value;
      if (e instanceof BlockError) return [{ blockError: e.toJSON() }, []];
      if (typeof DOMException !== 'undefined' && e instanceof DOMException) {
        return [{ domException: { name: e.name, message: e.message } }, []];
      }
      const [inner, transfers] = base.serialize(v);
      return [{ other: inner }, transfers];
    },
    deserialize(w: ThrownWire): Thrown {
      if ('blockError' in w) throw BlockError.fromJSON(w.blockError);
      if ('domException' in w) throw new DOMException(w.domException.message, w.domException.name);
      return base.deserialize(w.other);
    },
  };
}

/** An AbortSignal on the wire: whether it had fired already, and the port that tells when it fires later. */
interface SignalWire {
  aborted: boolean;
  port: MessagePort;
}

/** Sends an AbortSignal as a port that receives one message when it aborts. */
const abortSignalHandler: TransferHandler<AbortSignal, SignalWire> = {
  canHandle: (v: unknown): v is AbortSignal => typeof AbortSignal !== 'undefined' && v instanceof AbortSignal,
  serialize(signal: AbortSignal): [SignalWire, Transferable[]] {
    const { port1, port2 } = new MessageChannel();
    if (signal.aborted) port1.close();
    else {
      signal.addEventListener(
        'abort',
        () => {
          port1.postMessage(null);
          port1.close();
        },
        { once: true },
      );
    }
    return [{ aborted: signal.aborted, port: port2 }, [port2]];
  },
  deserialize(w: SignalWire): AbortSignal {
    // An aborted signal must arrive aborted: the callee may check it before any message could land.
    if (w.aborted) {
      w.port.close();
      return AbortSignal.abort();
    }
    const ctrl = new AbortController();
    w.port.onmessage = () => {
      ctrl.abort();
      w.port.close();
    };
    return ctrl.signal;
  },
};

/** Registers the engine's `throw` and `abort-signal` handlers with comlink; safe to call more than once. */
export function registerEngineTransferHandlers(): void {
  const base = transferHandlers.get('throw') as (TransferHandler<Thrown, unknown> & Marked) | undefined;
  if (base && !base.qblockEngine) transferHandlers.set('throw', throwHandler(base) as TransferHandler<unknown, unknown>);
  if (!transferHandlers.has('abort-signal')) transferHandlers.set('abort-signal', abortSignalHandler as TransferHandler<unknown, unknown>);
}
