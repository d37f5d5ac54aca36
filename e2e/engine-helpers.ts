/**
 * Helpers the engine specs share: opening web/engine/index.html and waiting
 * for its engine worker, calling window.qe and unpacking results, and
 * unique OPFS names per test.
 */
import { execFile } from 'node:child_process';
import { join } from 'node:path';
import { promisify } from 'node:util';
import type { Page } from '@playwright/test';
import type { BackendMethod, CallError, CallResult, EngineMethod } from '../web/engine/api-types.ts';
import type { EngineEnv } from '../src/worker/types.ts';
import { expect } from './fixtures.ts';

/** The engine test page. */
export const ENGINE_PAGE = '/engine/index.html';

/** Opens the engine page and waits until its worker answers; returns the worker's environment. */
export async function enginePage(page: Page): Promise<EngineEnv> {
  await page.goto(ENGINE_PAGE);
  await expect(page.locator('#status[data-state="ready"]')).toBeAttached({ timeout: 20_000 });
  const env = JSON.parse((await page.locator('#status').textContent()) ?? '{}') as EngineEnv;
  expect(env.syncHandles, 'engine worker has FileSystemSyncAccessHandle').toBe(true);
  return env;
}

/** Unwraps a CallResult, throwing with the error's code and message. */
export function unwrap<T>(r: CallResult, what: string): T {
  if (!r.ok) throw new Error(`${what} failed: [${r.error.code}] ${r.error.message}`);
  return r.value as T;
}

/** Expects a CallResult to be an error and returns it. */
export function failure(r: CallResult, what: string): CallError {
  if (r.ok) throw new Error(`${what} succeeded (${JSON.stringify(r.value)}), expected an error`);
  return r.error;
}

/** Calls an EngineClient method on the page. */
export function call(page: Page, method: EngineMethod, ...args: unknown[]): Promise<CallResult> {
  return page.evaluate(([m, a]) => window.qe.call(m, ...a), [method, args] as const);
}

/** Calls an EngineClient method that must succeed. */
export async function ok<T = unknown>(page: Page, method: EngineMethod, ...args: unknown[]): Promise<T> {
  return unwrap<T>(await call(page, method, ...args), `${method}(${JSON.stringify(args)})`);
}

/** Calls an EngineClient method that must fail; returns the error as the page saw it. */
export async function fails(page: Page, method: EngineMethod, ...args: unknown[]): Promise<CallError> {
  return failure(await call(page, method, ...args), `${method}(${JSON.stringify(args)})`);
}

/** Calls a method of a backend the page attached. */
export function bcall(page: Page, name: string, method: BackendMethod, ...args: unknown[]): Promise<CallResult> {
  return page.evaluate(([n, m, a]) => window.qe.backend(n, m, ...a), [name, method, args] as const);
}

/** Calls a backend method that must succeed. */
export async function bok<T = unknown>(page: Page, name: string, method: BackendMethod, ...args: unknown[]): Promise<T> {
  return unwrap<T>(await bcall(page, name, method, ...args), `${name}.${method}(${JSON.stringify(args)})`);
}

/** Attaches a backend named `name` to image `id`. */
export async function attach(page: Page, name: string, id: string, opts: Record<string, unknown> = {}): Promise<void> {
  unwrap(await page.evaluate(([n, i, o]) => window.qe.attach(n, i, o), [name, id, opts] as const), `attach(${name})`);
}

/** Writes `length` bytes of `byte` at `offset` through backend `name`. */
export async function fill(page: Page, name: string, offset: number, length: number, byte: number): Promise<void> {
  unwrap(await page.evaluate(([n, o, l, b]) => window.qe.fill(n, o, l, b), [name, offset, length, byte] as const), 'fill');
}

/** Checksum of a range read through backend `name`. */
export async function sum(page: Page, name: string, offset: number, length: number): Promise<number> {
  return unwrap<number>(await page.evaluate(([n, o, l]) => window.qe.sum(n, o, l), [name, offset, length] as const), 'sum');
}

/** The checksum of `length` bytes of value `byte` (what sum() reads after fill()). */
export function filledSum(length: number, byte: number): number {
  let s = 0;
  for (let i = 0; i < length; i++) s = (s * 31 + byte) >>> 0;
  return s;
}

/** A unique OPFS directory per test, so reruns and parallel workers never collide. */
export function dirFor(title: string): string {
  return `e2e-engine-${title.replace(/\W+/g, '-').slice(0, 32)}-${Date.now().toString(36)}${Math.random().toString(36).slice(2, 6)}`;
}

/** Where Debian's QEMU tools are. */
export const QEMU_IMG = '/usr/bin/qemu-img';
export const QEMU_IO = '/usr/bin/qemu-io';

const execFileP = promisify(execFile);

/** Runs a QEMU tool in `cwd`; asynchronously, because the range server shares the spec's event loop. */
export async function qemu(cwd: string, tool: string, ...args: string[]): Promise<string> {
  return (await execFileP(tool, args, { cwd, encoding: 'utf8' })).stdout;
}

/** Downloads OPFS image `path` through the page (a real browser download) into `dir`; returns the file's path. */
export async function download(page: Page, path: string, name: string, dir: string): Promise<string> {
  const [dl, r] = await Promise.all([page.waitForEvent('download'), page.evaluate(([p, n]) => window.qe.download(p, n), [path, name] as const)]);
  unwrap(r, `download(${path})`);
  expect(dl.suggestedFilename()).toBe(name);
  const out = join(dir, `${Date.now()}-${name}`);
  await dl.saveAs(out);
  return out;
}

/** Checksum of `length` bytes at `offset` of `bytes`, as the page computes it. */
export function sumOf(bytes: Uint8Array, offset: number, length: number): number {
  let s = 0;
  for (let i = offset; i < offset + length; i++) s = (s * 31 + bytes[i]!) >>> 0;
  return s;
}
