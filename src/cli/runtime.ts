/**
 * What the two commands need from their host: output streams, stdin, TTY
 * facts, signals and a graph with the Node drivers. Injecting it lets the
 * tests run the commands in-process, many at a time, with captured output.
 */
import { Graph } from '../core/graph.ts';
import { toolGate } from '../core/img/gate.ts';
import { nodeDrivers } from '../drivers-node.ts';

/** The host environment of one command invocation. */
export interface CliIO {
  /** Appends to standard output. */
  stdout(text: string): void;
  /** Appends to standard error. */
  stderr(text: string): void;
  /** Lines of standard input (without newlines), read lazily; absent = empty stdin. */
  stdinLines?: () => AsyncIterableIterator<string>;
  /** Whether stderr is a terminal (qemu-img shows progress only then). */
  stderrIsTTY?: boolean;
  /** Whether stdin is a terminal (qemu-io reads commands with line editing only then). */
  stdinIsTTY?: boolean;
  /** Delivers a signal to the process (qemu-io's sigraise and abort); returns if the signal does not terminate. */
  raise?(signal: string): void;
  /** Builds the graph the command opens images in; tests may register extra drivers. */
  makeGraph?(): Graph;
}

/** A graph with every Node driver and the tools' backing-file gate. */
export function defaultGraph(): Graph {
  return new Graph({ drivers: nodeDrivers(), defaultProtocol: 'file', gate: toolGate });
}

/** Collects output in memory: the shape tests use. */
export class BufferedIO implements CliIO {
  out = '';
  err = '';
  signals: string[] = [];
  stderrIsTTY = false;
  stdinIsTTY = false;
  private readonly input: string[];

  /** `stdin` is the whole standard input text. */
  constructor(stdin = '') {
    this.input = stdin === '' ? [] : stdin.replace(/\n$/, '').split('\n');
  }

  /** Appends to the captured stdout. */
  stdout(text: string): void {
    this.out += text;
  }

  /** Appends to the captured stderr. */
  stderr(text: string): void {
    this.err += text;
  }

  /** Yields the stdin lines given to the constructor. */
  async *stdinLines(): AsyncIterableIterator<string> {
    for (const l of this.input) yield l;
  }

  /** Records the signal instead of delivering it. */
  raise(signal: string): void {
    this.signals.push(signal);
  }
}
