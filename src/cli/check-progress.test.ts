/**
 * `qblock-img check -p`, a qblock extension (QEMU 7.2's check has no -p):
 * convert's progress meter on stdout before the report, silenced by -q and
 * by JSON output, absent for formats without a check.
 */
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { qblockImg } from './qblock-img.ts';
import { BufferedIO } from './runtime.ts';

const dir = mkdtempSync(join(tmpdir(), 'qblock-checkp-'));
const img = join(dir, 'a.qcow2');
const raw = join(dir, 'a.raw');

beforeAll(() => {
  for (const args of [['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4k', img, '64M'], ['create', '-q', '-f', 'raw', raw, '1M']]) {
    const r = spawnSync('qemu-img', args, { encoding: 'utf8' });
    if (r.status !== 0) throw new Error(`qemu-img ${args.join(' ')} failed (is qemu-utils installed?): ${r.stderr}`);
  }
  // 40 MiB of data: 20 L2 tables, so the meter has steps to show.
  const w = spawnSync('qemu-io', ['-c', 'write -P 1 0 40M', img], { encoding: 'utf8' });
  if (w.status !== 0) throw new Error(w.stderr);
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

async function check(...args: string[]): Promise<{ out: string; err: string; status: number }> {
  const io = new BufferedIO('');
  const status = await qblockImg(['check', ...args], io);
  return { out: io.out, err: io.err, status };
}

describe('qblock-img check -p', () => {
  it('prints the meter from 0 to 100 on stdout, then a newline and the usual report', async () => {
    const plain = await check(img);
    const r = await check('-p', img);
    expect(r.status).toBe(0);
    const meter = r.out.slice(0, r.out.length - plain.out.length);
    expect(r.out.endsWith(plain.out)).toBe(true);
    const steps = meter.split('\r');
    expect(steps[0]).toBe('    (0.00/100%)');
    expect(steps[steps.length - 2]).toBe('    (100.00/100%)');
    expect(steps[steps.length - 1]).toBe('\n');
    // Intermediate steps, each more than one point (convert's minimum step) after the previous one.
    const values = steps.slice(0, -1).map((x) => Number(/\(([\d.]+)\/100%\)/.exec(x)![1]));
    expect(values.length).toBeGreaterThan(10);
    for (let i = 1; i < values.length; i++) expect(values[i]!).toBeGreaterThan(values[i - 1]!);
  });

  it('prints no meter with -q, with --output=json, or for a format without checks', async () => {
    expect((await check('-p', '-q', img)).out).toBe('');
    const json = await check('-p', '--output=json', img);
    expect(json.out.startsWith('{')).toBe(true);
    const r = await check('-p', '-f', 'raw', raw);
    expect(r.status).toBe(63);
    expect(r.out).toBe('');
    expect(r.err).toBe('qblock-img: This image format does not support checks\n');
  });
});
