/**
 * qblock-io against qemu-io: every case in cases-io.ts, cases-io-vmstate.ts, cases-io-misc.ts
 * and the reuse cases of cases-img-convert-n.ts runs with both and
 * must produce the same stdout, stderr, exit status and files.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { IO_MISC_CASES } from './cases-io-misc.ts';
import { IO_CASES as BASE_CASES } from './cases-io.ts';
import { IO_VMSTATE_CASES } from './cases-io-vmstate.ts';
import { IO_REUSE_CASES } from './cases-img-convert-n.ts';
import { cleanupTemplates, renderResult, requireQemuTools, schedule } from './harness.ts';

const IO_CASES = [...BASE_CASES, ...IO_VMSTATE_CASES, ...IO_MISC_CASES, ...IO_REUSE_CASES];

describe('qblock-io vs qemu-io', () => {
  let results: ReturnType<typeof schedule> = [];
  beforeAll(() => {
    requireQemuTools();
    results = schedule(IO_CASES.map((c) => ({ ...c, tool: 'qemu-io' as const })));
  });
  afterAll(() => cleanupTemplates());
  IO_CASES.forEach((c, i) => {
    it(c.name ?? `qemu-io ${c.cmd}${c.stdin !== undefined ? ` <<< ${JSON.stringify(c.stdin)}` : ''}`, async () => {
      const r = await results[i]!;
      expect(renderResult(r.ours)).toBe(renderResult(r.qemu));
    });
  });
});
