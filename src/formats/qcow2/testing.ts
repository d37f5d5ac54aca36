/**
 * Test support for the qcow2 driver: running QEMU's qemu-img/qemu-io, scratch
 * directories, and opening images through a Graph with the Node file protocol
 * and the plain-name gate. Not a test file itself (vitest only runs *.test.ts).
 */
import { execFile, execFileSync } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { BdrvChild } from '../../core/child.ts';
import type { CreateContext } from '../../core/driver.ts';
import { Graph } from '../../core/graph.ts';
import { bdrvGetLength, bdrvPreadv } from '../../core/io.ts';
import type { BlockNode } from '../../core/node.ts';
import type { CreateOptions } from '../../core/options.ts';
import { OPEN, PERM, ROLE } from '../../core/types.ts';
import { rawDriver } from '../raw.ts';
import { fileDriver } from '../../protocols/file.ts';
import { nodeFileGate } from '../../protocols/file-gate.ts';
import { qcow2Driver } from './index.ts';

/** Paths of QEMU's tools; tests fail (never skip) when they are missing. */
export const QEMU_IMG = '/usr/bin/qemu-img';
export const QEMU_IO = '/usr/bin/qemu-io';

/** Throws when qemu-img or qemu-io is missing, telling how to get them. */
export function requireQemu(): void {
  for (const p of [QEMU_IMG, QEMU_IO]) {
    if (!existsSync(p)) throw new Error(`${p} is missing: run \`npm test\`, which installs qemu-utils (qemu-img, qemu-io)`);
  }
}

/** Runs a command in `cwd`, returning stdout; throws with stderr on failure. */
export function run(cmd: string, args: string[], cwd: string): string {
  return execFileSync(cmd, args, { cwd, encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'], maxBuffer: 1 << 28 });
}

/** Runs a command expected to fail and returns its stderr. */
export function runFail(cmd: string, args: string[], cwd: string): string {
  try {
    execFileSync(cmd, args, { cwd, encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
  } catch (e) {
    return String((e as { stderr?: string }).stderr ?? '');
  }
  throw new Error(`${cmd} ${args.join(' ')} unexpectedly succeeded`);
}

/** qemu-img with arguments, in `cwd`. */
export function qemuImg(cwd: string, ...args: string[]): string {
  return run(QEMU_IMG, args, cwd);
}

/** Whether `qemu-img compare -U` (run in `cwd`) calls the two images identical. */
export function qemuSame(cwd: string, a: string, b: string): boolean {
  try {
    qemuImg(cwd, 'compare', '-U', a, b);
    return true;
  } catch {
    return false;
  }
}

/** qemu-io on a qcow2 image with the given -c commands. */
export function qemuIo(cwd: string, image: string, ...cmds: string[]): void {
  const args: string[] = ['-f', 'qcow2'];
  for (const c of cmds) args.push('-c', c);
  args.push(image);
  run(QEMU_IO, args, cwd);
}

/** A scratch directory removed by cleanup(). */
export function scratchDir(): { dir: string; path: (name: string) => string; cleanup: () => void } {
  const dir = mkdtempSync(join(tmpdir(), 'qblock-qcow2-'));
  return { dir, path: (n) => join(dir, n), cleanup: () => rmSync(dir, { recursive: true, force: true }) };
}

/** A graph with the Node file protocol, raw and qcow2, opening names from images relative to them. */
export function newGraph(): Graph {
  return new Graph({ drivers: [fileDriver, rawDriver, qcow2Driver], gate: nodeFileGate(), defaultProtocol: 'file' });
}

/** An open image and a read edge to it. */
export interface OpenedImage {
  graph: Graph;
  bs: BlockNode;
  child: BdrvChild;
  close(): Promise<void>;
}

/** Opens `path` as qcow2 (read-only unless asked) and attaches a reader. */
export async function openQcow2(path: string, opts: { readOnly?: boolean; options?: Record<string, unknown>; graph?: Graph } = {}): Promise<OpenedImage> {
  const graph = opts.graph ?? newGraph();
  const readOnly = opts.readOnly ?? true;
  const bs = await graph.openImage(path, { format: 'qcow2', readOnly, options: opts.options ?? {} });
  const perm = readOnly ? PERM.CONSISTENT_READ : PERM.CONSISTENT_READ | PERM.WRITE | PERM.RESIZE;
  const child = graph.attachRoot(bs, { kind: 'job', name: 'test', description: () => 'test reader' }, 'root', perm, PERM.ALL);
  bs.refcnt--; // attachRoot took a reference for the edge; the open's reference moves to it.
  return {
    graph,
    bs,
    child,
    close: async () => {
      // The reader edge keeps the node from being a root; drop it so the node and its children close.
      if (bs.parents.includes(child)) await graph.detachChild(child);
      await graph.closeAll();
    },
  };
}

/** Reads the whole virtual disk. */
export async function readAll(img: OpenedImage): Promise<Uint8Array> {
  const len = await bdrvGetLength(img.bs);
  const buf = new Uint8Array(len);
  const chunk = 4 << 20;
  for (let off = 0; off < len; off += chunk) {
    const n = Math.min(chunk, len - off);
    await bdrvPreadv(img.child, off, n, buf.subarray(off, off + n));
  }
  return buf;
}

/** A CreateContext over a graph with the Node file protocol (what qemu-img create does for files). */
export function createContext(graph: Graph): CreateContext {
  return {
    async createAndOpenFile(filename: string, opts?: CreateOptions) {
      await fileDriver.create!(filename, opts ?? {}, this);
      return graph.open({ driver: 'file', filename }, OPEN.RDWR);
    },
    async openImage(filename: string, format?: string) {
      return graph.openImage(filename, format !== undefined ? { format, readOnly: true } : { readOnly: true });
    },
    async close(bs: BlockNode) {
      await graph.unref(bs);
    },
  };
}

/** A bare reader edge for a node (used where no permissions matter). */
export function readerEdge(bs: BlockNode): BdrvChild {
  return new BdrvChild('test', bs, { kind: 'job', name: 'test', description: () => 'test' }, ROLE.DATA, PERM.CONSISTENT_READ, PERM.ALL);
}

/**
 * Runs the shell `commands` (with `{}` standing for the file name) on every
 * one of `files` in `dir`, four at a time, from a single shell: spawning
 * hundreds of qemu-img processes from the test worker costs far more than
 * the checks themselves. Resolves when all have run.
 */
export function forEachImageInShell(dir: string, files: string[], commands: string): Promise<void> {
  writeFileSync(join(dir, 'cuts.list'), files.join('\n') + '\n');
  const script = `xargs -P 4 -I{} sh -c '${commands}' < cuts.list`;
  return new Promise((resolve, reject) => {
    execFile('sh', ['-c', script], { cwd: dir, maxBuffer: 1 << 24 }, (err) => (err ? reject(err) : resolve()));
  });
}
