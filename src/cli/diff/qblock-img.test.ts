/**
 * qblock-img against qemu-img: every case in cases-img.ts runs with both and
 * must produce the same stdout, stderr, exit status and files.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { IMG_CASES } from './cases-img.ts';
import { cleanupTemplates, renderResult, requireQemuTools, runCase } from './harness.ts';

describe('qblock-img vs qemu-img', () => {
  beforeAll(() => requireQemuTools());
  afterAll(() => cleanupTemplates());
  for (const c of IMG_CASES) {
    it.concurrent(c.name ?? `qemu-img ${c.cmd}`, async () => {
      const r = await runCase({ ...c, tool: 'qemu-img' });
      expect(renderResult(r.ours)).toBe(renderResult(r.qemu));
    });
  }
});
