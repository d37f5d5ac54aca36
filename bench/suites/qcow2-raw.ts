// qcow2 against the raw storage underneath it, in Node: the same guest
// bytes read and written through qcow2 over a protocol, and straight through
// that protocol (memory, Node file). The browser runner does the same over
// OPFS. The qcow2 images are QEMU's (qemu-img convert), so reads exercise
// the L2 kernel on QEMU's layout.

import { copyFileSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { BlockBackend } from '../../src/core/block-backend.ts';
import type { BlockdevOptions } from '../../src/core/types.ts';
import { deleteMemoryStore, memoryStore } from '../../src/protocols/memory.ts';
import { createNodeGraph } from '../../src/node.ts';
import type { Row } from '../lib/harness.ts';
import { QEMU_IMG, requireQemu, run, scratchDir, writeData } from '../lib/images.ts';
import { ioCases, type Storage } from './io-cases.ts';

/** Options of the qcow2-vs-raw suite. */
export interface Qcow2BenchOptions {
  quick?: boolean;
}

/** The storages compared in Node: memory and Node files. */
function nodeStorages(dir: string): Storage[] {
  const memory: Storage = {
    name: 'memory',
    async load(key, path) {
      deleteMemoryStore(`bench-${key}`);
      const bytes = readFileSync(path);
      const s = memoryStore(`bench-${key}`);
      // MemoryStore keeps what it is given in its own pages.
      s.write(0, bytes);
      return { driver: 'memory', name: `bench-${key}` };
    },
    async cleanup() {
      for (const k of ['raw', 'qcow2', 'text', 'comp', 'fresh-raw', 'fresh-qcow2', 'over-raw', 'over-qcow2']) deleteMemoryStore(`bench-${k}`);
    },
  };
  const file: Storage = {
    name: 'Node file',
    async load(key, path) {
      const p = join(dir, `${key}.img`);
      copyFileSync(path, p);
      return { driver: 'file', filename: p };
    },
    async cleanup() {
      // The scratch directory goes as a whole.
    },
  };
  return [memory, file];
}

/** qcow2-vs-raw rows for memory and Node files. */
export async function qcow2VsRawRows(opts: Qcow2BenchOptions = {}): Promise<Row[]> {
  requireQemu();
  const { dir, cleanup } = scratchDir('qblock-bench-io-');
  try {
    const M = 1 << 20;
    const dataMiB = opts.quick ? 32 : 256;
    const raw = join(dir, 'data.raw');
    writeData(raw, 0, dataMiB * M, 'random');
    const qcow2 = join(dir, 'data.qcow2');
    run(QEMU_IMG, ['convert', '-O', 'qcow2', '-o', 'cluster_size=65536', raw, qcow2]);
    const text = join(dir, 'text.raw');
    writeData(text, 0, dataMiB * M, 'text', 5);
    const comp = join(dir, 'comp.qcow2');
    run(QEMU_IMG, ['convert', '-c', '-O', 'qcow2', '-o', 'cluster_size=65536', text, comp]);
    const emptyRaw = join(dir, 'empty.raw');
    run(QEMU_IMG, ['create', '-q', '-f', 'raw', emptyRaw, `${dataMiB}M`]);
    const emptyQcow2 = join(dir, 'empty.qcow2');
    run(QEMU_IMG, ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=65536', emptyQcow2, `${dataMiB}M`]);
    const rows: Row[] = [];
    for (const st of nodeStorages(dir)) {
      try {
        rows.push(...(await ioCases(st, { raw, qcow2, text, comp, emptyRaw, emptyQcow2 }, dataMiB * M, { rounds: opts.quick ? 1 : 5, minMs: 300, open })));
      } finally {
        await st.cleanup();
      }
    }
    return rows;
  } finally {
    cleanup();
  }
}

/** Opens a backend on blockdev options in a fresh Node graph. */
async function open(options: BlockdevOptions, readOnly: boolean): Promise<BlockBackend> {
  return BlockBackend.open(createNodeGraph(), options, { readOnly });
}

