/**
 * qblock-img: a drop-in counterpart of qemu-img (being written).
 */
import type { CliIO } from './runtime.ts';

/** Runs qblock-img with `argv` (without the program name) and returns its exit status. */
export async function qblockImg(argv: readonly string[], io: CliIO): Promise<number> {
  io.stderr(`qblock-img: Command not found: ${argv[0] ?? ''}\n`);
  return 1;
}
