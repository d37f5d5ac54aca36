// `npm run bench:browser`: the browser benchmarks in Debian's Chromium with
// a persistent profile (OPFS in an incognito context is much slower), the
// engine in a worker. Makes the test images with qemu-img, serves the
// repository with Vite (cross-origin isolated), opens web/bench/, waits for
// its report, prints the table and writes build/bench/browser.json.
//
//   npm run bench:browser                 full run
//   npm run bench:browser -- --quick      smaller images, one round

import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from '@playwright/test';
import { createServer } from 'vite';
import { CHROMIUM_ARGS, CHROMIUM_PATH } from '../e2e/chromium.ts';
import type { BenchWindow } from '../web/bench/protocol.ts';
import { table, type Report } from './lib/harness.ts';
import { QEMU_IMG, requireQemu, run, writeData } from './lib/images.ts';

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const PORT = 5197;

/** Parses --quick and --out. */
function parseArgs(argv: string[]): { quick: boolean; out: string } {
  let quick = false;
  let out = join(ROOT, 'build', 'bench', 'browser.json');
  for (const a of argv) {
    if (a === '--quick') quick = true;
    else if (a.startsWith('--out=')) out = resolve(a.slice(6));
    else throw new Error(`unknown argument ${a}`);
  }
  return { quick, out };
}

/** Makes the images the page fetches into OPFS, below build/ (which the dev server may serve). */
function makeImages(dir: string, dataMiB: number): void {
  requireQemu();
  const M = 1 << 20;
  mkdirSync(dir, { recursive: true });
  const raw = join(dir, 'data.raw');
  rmSync(raw, { force: true });
  writeData(raw, 0, dataMiB * M, 'random');
  const q = ['-o', 'cluster_size=65536'];
  run(QEMU_IMG, ['convert', '-O', 'qcow2', ...q, raw, join(dir, 'data.qcow2')]);
  const text = join(dir, 'text.raw');
  rmSync(text, { force: true });
  writeData(text, 0, dataMiB * M, 'text', 5);
  run(QEMU_IMG, ['convert', '-c', '-O', 'qcow2', ...q, text, join(dir, 'comp.qcow2')]);
  run(QEMU_IMG, ['create', '-q', '-f', 'raw', join(dir, 'empty.raw'), `${dataMiB}M`]);
  run(QEMU_IMG, ['create', '-q', '-f', 'qcow2', ...q, join(dir, 'empty.qcow2'), `${dataMiB}M`]);
}

async function main(): Promise<void> {
  const { quick, out } = parseArgs(process.argv.slice(2));
  const dataMiB = quick ? 32 : 128;
  const imageDir = join(ROOT, 'build', 'bench', 'images');
  process.stderr.write('[bench:browser] making images with qemu-img…\n');
  makeImages(imageDir, dataMiB);
  const server = await createServer({ configFile: join(ROOT, 'web', 'vite.config.ts'), server: { port: PORT, strictPort: true }, logLevel: 'warn' });
  await server.listen();
  const profile = mkdtempSync(join(tmpdir(), 'qblock-bench-profile-'));
  try {
    const context = await chromium.launchPersistentContext(profile, { executablePath: CHROMIUM_PATH, args: CHROMIUM_ARGS, headless: true });
    try {
      const page = context.pages()[0] ?? (await context.newPage());
      page.on('console', (m) => {
        if (m.text().startsWith('[bench]')) process.stderr.write(`[bench:browser] ${m.text().slice(8)}\n`);
      });
      page.on('pageerror', (e) => process.stderr.write(`[bench:browser] page error: ${e.message}\n`));
      const images = `/@fs${imageDir}/`;
      const url = `http://localhost:${PORT}/bench/index.html?images=${encodeURIComponent(images)}&dataMiB=${dataMiB}${quick ? '&quick=1' : ''}`;
      await page.goto(url);
      await page.waitForFunction(() => (window as unknown as BenchWindow).qblockBench?.done === true, undefined, { timeout: 60 * 60 * 1000, polling: 1000 });
      const result = await page.evaluate(() => (window as unknown as BenchWindow).qblockBench);
      if (!result?.report) throw new Error(`benchmark page failed: ${result?.error ?? 'no report'}`);
      const report: Report = result.report;
      report.environment.chromium = context.browser()?.version() ?? 'persistent context';
      process.stdout.write(`${table(report.rows)}\n`);
      mkdirSync(dirname(out), { recursive: true });
      writeFileSync(out, `${JSON.stringify(report, null, 2)}\n`);
      process.stderr.write(`[bench:browser] wrote ${out}\n`);
    } finally {
      await context.close();
    }
  } finally {
    rmSync(profile, { recursive: true, force: true });
    await server.close();
  }
}

await main();
