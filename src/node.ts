/**
 * Node entry: everything in the engine entry plus the `file` protocol, the
 * file gate and a ready-made graph factory for scripts and the CLI.
 */
import { Graph } from './core/graph.ts';
import { nodeDrivers } from './drivers-node.ts';
import { nodeFileGate, type NodeFileGateOptions } from './protocols/file-gate.ts';

export * from './index.ts';
export { nodeDrivers } from './drivers-node.ts';
export { nodeFileGate, resolveImageRelative, type NodeFileGateOptions } from './protocols/file-gate.ts';

/** A graph with every Node driver, the `file` protocol as default and backing files opened relative to their image. */
export function createNodeGraph(gate: NodeFileGateOptions = {}): Graph {
  return new Graph({ drivers: nodeDrivers(), defaultProtocol: 'file', gate: nodeFileGate(gate) });
}
