/**
 * Makes BlockErrors cross comlink with their code and node: comlink's own
 * throw handler keeps only message, name and stack. Both ends must call
 * registerBlockErrorTransfer() before the first call.
 */
import { transferHandlers, type TransferHandler } from 'comlink';
import { BlockError, type SerializedBlockError } from '../../src/core/errors.ts';

interface Thrown {
  value: unknown;
}

type Wire = { blockError: SerializedBlockError } | { other: unknown };

/** Wraps comlink's 'throw' handler so a thrown BlockError is rebuilt as a BlockError on the other side. */
export function registerBlockErrorTransfer(): void {
  const base = transferHandlers.get('throw') as TransferHandler<Thrown, unknown> | undefined;
  if (!base || (base as { qblock?: boolean }).qblock) return;
  const handler: TransferHandler<Thrown, Wire> & { qblock: true } = {
    qblock: true,
    canHandle: (v: unknown): v is Thrown => base.canHandle(v),
    serialize(v: Thrown): [Wire, Transferable[]] {
      if (v.value instanceof BlockError) return [{ blockError: v.value.toJSON() }, []];
      const [inner, transfers] = base.serialize(v);
      return [{ other: inner }, transfers];
    },
    deserialize(w: Wire): Thrown {
      if ('blockError' in w) throw BlockError.fromJSON(w.blockError);
      return base.deserialize(w.other);
    },
  };
  transferHandlers.set('throw', handler as TransferHandler<unknown, unknown>);
}
