// The shared conformance suite (src/core/conformance.ts) and the read-only
// cases (src/protocols/readonly-conformance.ts) run in a dedicated worker in
// Chromium against the browser protocols: OPFS and raw over OPFS take the
// whole writable suite; HTTP and Blob take the read-only cases plus the
// shared cases that only read; QEMU-made qcow2 images are read over HTTP and
// from OPFS. Every case is its own Playwright test.
//
// One persistent profile and page serve a whole worker process (OPFS in
// incognito-like contexts is far slower); Playwright starts a fresh process,
// and so a fresh page, after a failure.

import { spawnSync } from 'node:child_process';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { chromium, type BrowserContext, type Page } from '@playwright/test';
import { conformanceCases } from '../src/core/conformance.ts';
import { readOnlyCases } from '../src/protocols/readonly-conformance.ts';
import type { CaseResult } from '../web/test/protocols-worker.ts';
import { PATTERN_IMAGE, QCOW2_IMAGES, READONLY_TARGETS, SHARED_TARGETS, testPattern, ZERO_IMAGE } from '../web/test/targets.ts';
import { CHROMIUM_ARGS, CHROMIUM_PATH, E2E_BASE_URL } from './chromium.ts';
import { expect, test } from './fixtures.ts';
import { startRangeServer, type RangeServer } from './range-server.ts';

/** Whether qemu-img and qemu-io run here; the qcow2 targets need them to make their images. */
const HAVE_QEMU = ['qemu-img', 'qemu-io'].every((t) => spawnSync(t, ['--version']).status === 0);

/** Runs a QEMU tool in `dir`, failing loudly. */
function qemu(dir: string, tool: 'qemu-img' | 'qemu-io', ...args: string[]): void {
  const r = spawnSync(tool, args, { cwd: dir, encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`${tool} ${args.join(' ')}: ${r.stderr || r.stdout}`);
}

/**
 * Makes the qcow2 images the qcow2 targets read: data, zeroed and
 * unallocated clusters (4 KiB clusters, so reads cross many), and a
 * compressed copy; serves each with its raw conversion as the reference.
 */
async function serveQcow2Images(server: RangeServer, dir: string): Promise<void> {
  qemu(dir, 'qemu-img', 'create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4k', 'mixed.qcow2', '400k');
  qemu(dir, 'qemu-io', '-c', 'write -P 0x22 1000 5000', '-c', 'write -z 40k 10k', '-c', 'write -P 0x33 100k 33k', '-c', 'write -P 0x44 390k 10k', 'mixed.qcow2');
  qemu(dir, 'qemu-img', 'convert', '-c', '-f', 'qcow2', '-O', 'qcow2', '-o', 'cluster_size=4k', 'mixed.qcow2', 'compressed.qcow2');
  for (const [name, img] of [['mixed', QCOW2_IMAGES.plain], ['compressed', QCOW2_IMAGES.compressed]] as const) {
    qemu(dir, 'qemu-img', 'convert', '-f', 'qcow2', '-O', 'raw', `${name}.qcow2`, `${name}.raw`);
    server.put(img.path, new Uint8Array(await readFile(join(dir, `${name}.qcow2`))));
    server.put(img.raw, new Uint8Array(await readFile(join(dir, `${name}.raw`))));
  }
}

let srv: RangeServer | undefined;
let profile = '';
let context: BrowserContext | undefined;
let page: Page | undefined;

test.beforeAll(async ({}, info) => {
  srv = await startRangeServer();
  srv.put(PATTERN_IMAGE.path, testPattern(PATTERN_IMAGE.size, PATTERN_IMAGE.seed));
  srv.put(ZERO_IMAGE.path, new Uint8Array(ZERO_IMAGE.size));
  profile = await mkdtemp(join(tmpdir(), 'qblock-conformance-'));
  // The test command installs qemu-utils; without it these cases must fail, not vanish.
  if (!HAVE_QEMU) throw new Error('qemu-img/qemu-io are not installed: run `npm test`, which installs Debian qemu-utils');
  {
    const imgDir = await mkdtemp(join(tmpdir(), 'qblock-conformance-img-'));
    try {
      await serveQcow2Images(srv, imgDir);
    } finally {
      await rm(imgDir, { recursive: true, force: true });
    }
  }
  context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM_PATH,
    args: CHROMIUM_ARGS,
    headless: true,
    baseURL: info.project.use.baseURL ?? E2E_BASE_URL,
  });
  page = context.pages()[0] ?? (await context.newPage());
  await page.goto('/test/protocols.html');
  await expect(page.locator('#status[data-state="ready"]')).toBeAttached({ timeout: 20_000 });
  const r = await page.evaluate((base) => window.qbCall('configure', { httpBase: base }), srv.url);
  expect(r.ok).toBe(true);
});

test.afterAll(async () => {
  await context?.close();
  if (profile) await rm(profile, { recursive: true, force: true });
  await srv?.close();
});

/** Runs one case in the worker and fails the test with the case's own message. */
async function runCase(method: 'runSharedCase' | 'runReadOnlyCase', target: string, name: string): Promise<void> {
  if (!page) throw new Error('page not ready');
  const r = await page.evaluate(([m, t, n]) => window.qbCall(m, t, n), [method, target, name] as const);
  if (!r.ok) throw new Error(`${method} could not run: [${r.error.code}] ${r.error.message}`);
  const res = r.value as CaseResult;
  expect(res.error ?? '', `${target} › ${name}`).toBe('');
  expect(res.ok).toBe(true);
}

for (const t of SHARED_TARGETS) {
  const cases = conformanceCases().filter((c) => t.groups.includes(c.group));
  test.describe(`conformance: ${t.id}`, () => {
    test('has cases for every listed group', () => {
      for (const g of t.groups) expect(cases.some((c) => c.group === g), `group ${g}`).toBe(true);
    });
    for (const c of cases) {
      test(`[${c.group}] ${c.name}`, async () => {
        await runCase('runSharedCase', t.id, c.name);
      });
    }
  });
}

for (const t of READONLY_TARGETS) {
  test.describe(`read-only conformance: ${t.id}`, () => {
    for (const c of readOnlyCases()) {
      test(c.name, async () => {
        await runCase('runReadOnlyCase', t.id, c.name);
      });
    }
  });
}
