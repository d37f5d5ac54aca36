/**
 * qblock-io against qemu-io: every case in cases-io.ts runs with both and
 * must produce the same stdout, stderr, exit status and files.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { IO_CASES } from './cases-io.ts';
import { cleanupTemplates, renderResult, requireQemuTools, runCase } from './harness.ts';

describe('qblock-io vs qemu-io', () => {
  beforeAll(() => requireQemuTools());
  afterAll(() => cleanupTemplates());
  for (const c of IO_CASES) {
    it.concurrent(c.name ?? `qemu-io ${c.cmd}${c.stdin !== undefined ? ` <<< ${JSON.stringify(c.stdin)}` : ''}`, async () => {
      const r = await runCase({ ...c, tool: 'qemu-io' });
      expect(renderResult(r.ours)).toBe(renderResult(r.qemu));
    });
  }
});
