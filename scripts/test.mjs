#!/usr/bin/env node
// Runs every test suite and prints, as the very last line of output,
//   N passed, M failed[, K skipped]
// summed over the type check (one test), vitest and Playwright.
// Each runner's output streams through; counts come from their JSON reports.
// A runner that fails without a usable report counts as one failed test.

import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { ROOT, ensureWasm } from './setup.mjs';

const RESULTS = join(ROOT, 'test-results');
const VITEST_JSON = join(RESULTS, 'vitest.json');
const PLAYWRIGHT_JSON = join(RESULTS, 'playwright.json');

/** Per-runner tallies, in the order the runners ran. */
const tallies = [];

/** Records a runner's counts and a note explaining anything unusual. */
function tally(name, passed, failed, skipped = 0, note = '') {
  tallies.push({ name, passed, failed, skipped, note });
}

/** Prints a section banner between runner outputs. */
function banner(title) {
  process.stdout.write(`\n=== ${title} ===\n`);
}

/** Path of a tool in node_modules/.bin. */
function bin(name) {
  return join(ROOT, 'node_modules', '.bin', process.platform === 'win32' ? `${name}.cmd` : name);
}

/** Runs a command from the repo root with inherited stdio; returns its exit status, or null if it could not start. */
function run(cmd, args) {
  const r = spawnSync(cmd, args, { cwd: ROOT, stdio: 'inherit' });
  if (r.error) {
    process.stderr.write(`cannot run ${cmd}: ${r.error.message}\n`);
    return null;
  }
  if (r.signal) process.stderr.write(`${cmd} killed by ${r.signal}\n`);
  return r.status;
}

/** Parses a JSON report, or returns null when it is missing or unreadable. */
function readReport(path) {
  if (!existsSync(path)) return null;
  try {
    return JSON.parse(readFileSync(path, 'utf8'));
  } catch {
    return null;
  }
}

/** Counts a vitest JSON report (Jest-compatible shape); a file that failed without failed tests (import error, crash) counts once. */
function countVitest(report) {
  let passed = 0;
  let failed = 0;
  let skipped = 0;
  for (const file of report.testResults ?? []) {
    let fileFailed = 0;
    for (const t of file.assertionResults ?? []) {
      if (t.status === 'passed') passed++;
      else if (t.status === 'failed') fileFailed++;
      else skipped++; // skipped, pending, todo, disabled
    }
    if (file.status === 'failed' && fileFailed === 0) fileFailed = 1;
    failed += fileFailed;
  }
  return { passed, failed, skipped };
}

/** Counts a Playwright JSON report; flaky tests (passed on retry) count as passed, top-level errors as failed. */
function countPlaywright(report) {
  const s = report.stats ?? {};
  return {
    passed: (s.expected ?? 0) + (s.flaky ?? 0),
    failed: (s.unexpected ?? 0) + (report.errors?.length ?? 0),
    skipped: s.skipped ?? 0,
  };
}

/** Runs a runner that writes a JSON report and records its counts, treating a crash or unexplained failure as one failed test. */
function runWithReport(name, cmd, args, reportPath, count) {
  rmSync(reportPath, { force: true });
  banner(name);
  const status = run(cmd, args);
  const report = readReport(reportPath);
  if (!report) {
    tally(name, 0, 1, 0, `no report (exit ${status ?? 'not started'})`);
    return;
  }
  const c = count(report);
  if (status !== 0 && c.failed === 0) {
    tally(name, c.passed, 1, c.skipped, `exited ${status ?? 'abnormally'} without reporting a failed test`);
  } else {
    tally(name, c.passed, c.failed, c.skipped);
  }
}

/** Runs everything, prints the per-runner breakdown and the summary line, and returns the exit code. */
function main() {
  mkdirSync(RESULTS, { recursive: true });

  banner('wasm kernels');
  if (ensureWasm()) process.stdout.write('build/qblock.wasm is ready\n');
  else tally('wasm build', 0, 1, 0, 'asc failed');

  banner('typecheck (tsc --noEmit)');
  const tsc = run(bin('tsc'), ['--noEmit', '-p', 'tsconfig.json']);
  if (tsc === 0) tally('typecheck', 1, 0);
  else tally('typecheck', 0, 1, 0, `tsc exited ${tsc ?? 'abnormally'}`);

  runWithReport(
    'vitest',
    bin('vitest'),
    ['run', '--reporter=default', '--reporter=json', `--outputFile=${VITEST_JSON}`],
    VITEST_JSON,
    countVitest,
  );

  runWithReport('playwright', bin('playwright'), ['test'], PLAYWRIGHT_JSON, countPlaywright);

  const total = { passed: 0, failed: 0, skipped: 0 };
  process.stdout.write('\n');
  for (const t of tallies) {
    total.passed += t.passed;
    total.failed += t.failed;
    total.skipped += t.skipped;
    const skip = t.skipped > 0 ? `, ${t.skipped} skipped` : '';
    process.stdout.write(`${t.name}: ${t.passed} passed, ${t.failed} failed${skip}${t.note ? ` (${t.note})` : ''}\n`);
  }
  const skip = total.skipped > 0 ? `, ${total.skipped} skipped` : '';
  process.stdout.write(`${total.passed} passed, ${total.failed} failed${skip}\n`);
  return total.failed > 0 ? 1 : 0;
}

process.exitCode = main();
