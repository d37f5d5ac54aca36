/**
 * Partition tables: MBR with an extended partition's EBR chain, GPT behind a
 * protective MBR with its CRCs checked, and the malformed cases reported as
 * warnings (a looping EBR chain, a bad CRC, hostile entry counts).
 */
import { describe, expect, it } from 'vitest';
import { crc32, formatGuid, readPartitionTable } from './partitions.ts';

const SECTOR = 512;

/** A disk in memory and a reader over it. */
function disk(size: number): { buf: Uint8Array; read: (o: number, n: number) => Promise<Uint8Array> } {
  const buf = new Uint8Array(size);
  return { buf, read: async (o, n) => buf.slice(o, o + n) };
}

function le32(b: Uint8Array, o: number, v: number): void {
  new DataView(b.buffer, b.byteOffset).setUint32(o, v >>> 0, true);
}

function le64(b: Uint8Array, o: number, v: number): void {
  le32(b, o, v % 2 ** 32);
  le32(b, o + 4, Math.floor(v / 2 ** 32));
}

/** Writes MBR slot `i` of the sector at `base`. */
function slot(b: Uint8Array, base: number, i: number, type: number, lba: number, count: number, boot = false): void {
  const o = base + 446 + 16 * i;
  b[o] = boot ? 0x80 : 0;
  b[o + 4] = type;
  le32(b, o + 8, lba);
  le32(b, o + 12, count);
  b[base + 510] = 0x55;
  b[base + 511] = 0xaa;
}

/** GUID text to GPT's mixed-endian bytes. */
function guid(b: Uint8Array, o: number, text: string): void {
  const h = text.replace(/-/g, '');
  const bytes = Array.from({ length: 16 }, (_, i) => Number.parseInt(h.slice(2 * i, 2 * i + 2), 16));
  [3, 2, 1, 0, 5, 4, 7, 6, 8, 9, 10, 11, 12, 13, 14, 15].forEach((s, i) => (b[o + i] = bytes[s]!));
}

describe('partition tables', () => {
  it('is null without a boot signature', async () => {
    const d = disk(1 << 20);
    expect(await readPartitionTable(d.read, d.buf.length)).toBeNull();
  });

  it('reads MBR primaries and the logical partitions of an extended partition', async () => {
    const d = disk(64 << 20);
    le32(d.buf, 440, 0xdeadbeef);
    slot(d.buf, 0, 0, 0x83, 2048, 20480, true);
    slot(d.buf, 0, 1, 0x05, 40960, 40960);
    // EBR chain: logical 5 at 40960+2048, then a link to the next EBR at +20480.
    slot(d.buf, 40960 * SECTOR, 0, 0x82, 2048, 8192);
    slot(d.buf, 40960 * SECTOR, 1, 0x05, 20480, 20480);
    slot(d.buf, (40960 + 20480) * SECTOR, 0, 0x83, 2048, 16384);
    const t = (await readPartitionTable(d.read, d.buf.length))!;
    expect(t.scheme).toBe('mbr');
    expect(t.diskId).toBe('0xdeadbeef');
    expect(t.partitions.map((p) => [p.number, p.start / SECTOR, p.size / SECTOR, p.type, p.logical ?? false])).toEqual([
      [1, 2048, 20480, '0x83', false],
      [2, 40960, 40960, '0x05', false],
      [5, 43008, 8192, '0x82', true],
      [6, 63488, 16384, '0x83', true],
    ]);
    expect(t.partitions[0]!.bootable).toBe(true);
    expect(t.partitions[2]!.typeName).toBe('Linux swap');
    expect(t.warnings).toEqual([]);
  });

  it('stops a looping EBR chain with a warning', async () => {
    const d = disk(16 << 20);
    slot(d.buf, 0, 0, 0x0f, 2048, 8192);
    // EBR A links to B, and B links to itself.
    slot(d.buf, 2048 * SECTOR, 0, 0x83, 63, 100);
    slot(d.buf, 2048 * SECTOR, 1, 0x05, 2048, 100);
    slot(d.buf, 4096 * SECTOR, 0, 0x83, 63, 100);
    slot(d.buf, 4096 * SECTOR, 1, 0x05, 2048, 100);
    const t = (await readPartitionTable(d.read, d.buf.length))!;
    expect(t.partitions.filter((p) => p.logical)).toHaveLength(2);
    expect(t.warnings.join()).toMatch(/loops/);
  });

  it('reads a GPT with names and GUIDs, and checks its CRCs', async () => {
    const d = disk(32 << 20);
    const last = d.buf.length / SECTOR - 1;
    slot(d.buf, 0, 0, 0xee, 1, last);
    const entries = new Uint8Array(128 * 128);
    guid(entries, 0, 'c12a7328-f81f-11d2-ba4b-00a0c93ec93b');
    guid(entries, 16, '11111111-2222-3333-4444-555555555555');
    le64(entries, 32, 2048);
    le64(entries, 40, 4095);
    'ESP'.split('').forEach((c, i) => (entries[56 + 2 * i] = c.charCodeAt(0)));
    guid(entries, 128, '0fc63daf-8483-4772-8e79-3d69d8477de4');
    le64(entries, 128 + 32, 4096);
    le64(entries, 128 + 40, last - 34);
    d.buf.set(entries, 2 * SECTOR);
    const h = d.buf.subarray(SECTOR, 2 * SECTOR);
    h.set(new TextEncoder().encode('EFI PART'));
    le32(h, 12, 92);
    guid(h, 56, 'aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee');
    le64(h, 72, 2);
    le32(h, 80, 128);
    le32(h, 84, 128);
    le32(h, 88, crc32(entries));
    le32(h, 16, crc32(h.slice(0, 92)));
    const t = (await readPartitionTable(d.read, d.buf.length))!;
    expect(t.scheme).toBe('gpt');
    expect(t.diskId).toBe('aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee');
    expect(t.warnings).toEqual([]);
    expect(t.partitions.map((p) => [p.number, p.typeName, p.name ?? '', p.start / SECTOR])).toEqual([
      [1, 'EFI System', 'ESP', 2048],
      [2, 'Linux filesystem', '', 4096],
    ]);
    expect(t.partitions[0]!.guid).toBe('11111111-2222-3333-4444-555555555555');
    // A changed entry no longer matches the array CRC.
    d.buf[2 * SECTOR + 60] = 0x41;
    expect((await readPartitionTable(d.read, d.buf.length))!.warnings).toEqual(['GPT entry array CRC does not match']);
  });

  it('bounds a hostile GPT entry count and reports entries past the disk', async () => {
    const d = disk(4 << 20);
    slot(d.buf, 0, 0, 0xee, 1, 8191);
    const h = d.buf.subarray(SECTOR, 2 * SECTOR);
    h.set(new TextEncoder().encode('EFI PART'));
    le32(h, 12, 92);
    le64(h, 72, 2);
    le32(h, 80, 0xffffffff);
    le32(h, 84, 128);
    const t = (await readPartitionTable(d.read, d.buf.length))!;
    expect(t.partitions).toEqual([]);
    expect(t.warnings.join(' | ')).toMatch(/only the first 1024 were read/);
  });

  it('formats GUIDs in their mixed-endian layout and computes IEEE CRC-32', () => {
    const b = new Uint8Array(16);
    guid(b, 0, 'c12a7328-f81f-11d2-ba4b-00a0c93ec93b');
    expect(formatGuid(b, 0)).toBe('c12a7328-f81f-11d2-ba4b-00a0c93ec93b');
    expect(crc32(new TextEncoder().encode('123456789'))).toBe(0xcbf43926);
  });
});
