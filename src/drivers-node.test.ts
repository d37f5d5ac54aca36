import { describe, expect, it } from 'vitest';
import { Graph } from './core/graph.ts';
import { nodeDrivers } from './drivers-node.ts';

describe('nodeDrivers', () => {
  it('lists each driver once, with raw present as the probing fallback', () => {
    const names = nodeDrivers().map((d) => d.name);
    expect(new Set(names).size).toBe(names.length);
    expect(names).toEqual(expect.arrayContaining(['file', 'memory', 'null-co', 'null-aio', 'raw', 'qcow2', 'blkdebug', 'copy-on-read', 'throttle']));
    const g = new Graph({ drivers: nodeDrivers() });
    expect(g.probeFormat(new Uint8Array(512), 'x').name).toBe('raw');
  });

  it('maps each protocol prefix to one driver', () => {
    const prefixes = nodeDrivers().flatMap((d) => d.protocolNames ?? []);
    expect(new Set(prefixes).size).toBe(prefixes.length);
    const g = new Graph({ drivers: nodeDrivers() });
    expect(g.findProtocol('memory')?.name).toBe('memory');
    expect(g.findProtocol('null-co')?.name).toBe('null-co');
    expect(g.findProtocol('file')?.name).toBe('file');
  });
});
