/**
 * qblock-img against qemu-img: every case in cases-img.ts,
 * cases-img-snapshot.ts, cases-img-chain.ts, cases-img-bitmap.ts, cases-img-misc.ts,
 * cases-img-map-eof.ts and cases-img-convert-n.ts runs
 * with both and must produce the same stdout, stderr, exit status and files.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { IMG_BITMAP_CASES } from './cases-img-bitmap.ts';
import { IMG_MISC_CASES } from './cases-img-misc.ts';
import { CHAIN_CASES } from './cases-img-chain.ts';
import { IMG_CONVERT_N_CASES } from './cases-img-convert-n.ts';
import { IMG_CASES as BASE_CASES } from './cases-img.ts';
import { IMG_MAP_EOF_CASES } from './cases-img-map-eof.ts';
import { IMG_SNAPSHOT_CASES } from './cases-img-snapshot.ts';
import { cleanupTemplates, renderResult, requireQemuTools, schedule } from './harness.ts';

const IMG_CASES = [...BASE_CASES, ...IMG_SNAPSHOT_CASES, ...CHAIN_CASES, ...IMG_BITMAP_CASES, ...IMG_MISC_CASES, ...IMG_MAP_EOF_CASES, ...IMG_CONVERT_N_CASES];

describe('qblock-img vs qemu-img', () => {
  let results: ReturnType<typeof schedule> = [];
  beforeAll(() => {
    requireQemuTools();
    results = schedule(IMG_CASES.map((c) => ({ ...c, tool: 'qemu-img' as const })));
  });
  afterAll(() => cleanupTemplates());
  IMG_CASES.forEach((c, i) => {
    it(c.name ?? `qemu-img ${c.cmd}`, async () => {
      const r = await results[i]!;
      expect(renderResult(r.ours)).toBe(renderResult(r.qemu));
    });
  });
});
