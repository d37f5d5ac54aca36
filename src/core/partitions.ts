/**
 * The partition table of a guest disk (MBR with extended partitions, or GPT
 * behind its protective MBR), read through any byte-reading function so it
 * works on a BlockBackend, a node or a plain buffer. Malformed tables are
 * reported as warnings, never thrown: a disk with a broken table is still a
 * disk worth inspecting. Every count and offset read from the disk is bounded
 * before it sizes a read.
 */

/** Reads `length` bytes at `offset` of the guest disk. */
export type DiskReader = (offset: number, length: number) => Promise<Uint8Array>;

/** One partition. */
export interface PartitionEntry {
  /** 1-based number as Linux names it (sda1…; logical MBR partitions from 5). */
  number: number;
  /** First byte on the disk. */
  start: number;
  /** Length in bytes. */
  size: number;
  /** MBR type byte as 0xNN, or the GPT type GUID. */
  type: string;
  /** A name for the type, when known. */
  typeName: string;
  /** GPT partition name. */
  name?: string;
  /** GPT unique partition GUID. */
  guid?: string;
  /** MBR active (boot) flag. */
  bootable?: boolean;
  /** MBR partition inside an extended partition. */
  logical?: boolean;
}

/** A disk's partition table. */
export interface PartitionTable {
  scheme: 'mbr' | 'gpt';
  /** MBR disk signature (0xNNNNNNNN) or GPT disk GUID. */
  diskId: string;
  sectorSize: number;
  partitions: PartitionEntry[];
  /** Problems found (bad CRC, entries past the end of the disk…). */
  warnings: string[];
}

const SECTOR = 512;
/** Logical partitions followed before giving up on a looping EBR chain. */
const MAX_LOGICAL = 128;
/** GPT entries read at most (the usual 128 with room to spare, bounded against hostile counts). */
const MAX_GPT_ENTRIES = 1024;

const MBR_TYPES: Record<number, string> = {
  0x01: 'FAT12',
  0x04: 'FAT16 <32M',
  0x05: 'Extended',
  0x06: 'FAT16',
  0x07: 'HPFS/NTFS/exFAT',
  0x0b: 'W95 FAT32',
  0x0c: 'W95 FAT32 (LBA)',
  0x0e: 'W95 FAT16 (LBA)',
  0x0f: 'W95 Extended (LBA)',
  0x11: 'Hidden FAT12',
  0x27: 'Hidden NTFS WinRE',
  0x42: 'SFS',
  0x82: 'Linux swap',
  0x83: 'Linux',
  0x85: 'Linux extended',
  0x8e: 'Linux LVM',
  0xa5: 'FreeBSD',
  0xa6: 'OpenBSD',
  0xa9: 'NetBSD',
  0xaf: 'HFS / HFS+',
  0xee: 'GPT protective',
  0xef: 'EFI (FAT-12/16/32)',
  0xfd: 'Linux raid autodetect',
};

const GPT_TYPES: Record<string, string> = {
  'c12a7328-f81f-11d2-ba4b-00a0c93ec93b': 'EFI System',
  '21686148-6449-6e6f-744e-656564454649': 'BIOS boot',
  '0fc63daf-8483-4772-8e79-3d69d8477de4': 'Linux filesystem',
  '0657fd6d-a4ab-43c4-84e5-0933c84b4f4f': 'Linux swap',
  'e6d6d379-f507-44c2-a23c-238f2a3df928': 'Linux LVM',
  'a19d880f-05fc-4d3b-a006-743f0f84911e': 'Linux RAID',
  '4f68bce3-e8cd-4db1-96e7-fbcaf984b709': 'Linux root (x86-64)',
  '933ac7e1-2eb4-4f13-b844-0e14e2aef915': 'Linux home',
  'ebd0a0a2-b9e5-4433-87c0-68b6b72699c7': 'Microsoft basic data',
  'e3c9e316-0b5c-4db8-817d-f92df00215ae': 'Microsoft reserved',
  'de94bba4-06d1-4d40-a16a-bfd50179d6ac': 'Windows recovery',
  '48465300-0000-11aa-aa11-00306543ecac': 'Apple HFS+',
  '7c3457ef-0000-11aa-aa11-00306543ecac': 'Apple APFS',
  '516e7cb4-6ecf-11d6-8ff8-00022d09712b': 'FreeBSD data',
};

function le32(b: Uint8Array, o: number): number {
  return (b[o]! | (b[o + 1]! << 8) | (b[o + 2]! << 16) | (b[o + 3]! << 24)) >>> 0;
}

function le64(b: Uint8Array, o: number): number {
  return le32(b, o) + le32(b, o + 4) * 0x100000000;
}

/** A GUID in its mixed-endian on-disk layout, as the usual text form. */
export function formatGuid(b: Uint8Array, o: number): string {
  const h = (i: number): string => b[o + i]!.toString(16).padStart(2, '0');
  const seq = (idx: number[]): string => idx.map(h).join('');
  return `${seq([3, 2, 1, 0])}-${seq([5, 4])}-${seq([7, 6])}-${seq([8, 9])}-${seq([10, 11, 12, 13, 14, 15])}`;
}

let crcTable: Uint32Array | undefined;

/** CRC-32 (IEEE 802.3), the checksum GPT headers and entry arrays carry. */
export function crc32(buf: Uint8Array): number {
  if (!crcTable) {
    crcTable = new Uint32Array(256);
    for (let n = 0; n < 256; n++) {
      let c = n;
      for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
      crcTable[n] = c >>> 0;
    }
  }
  let c = 0xffffffff;
  for (let i = 0; i < buf.length; i++) c = crcTable[(c ^ buf[i]!) & 0xff]! ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

function isExtended(type: number): boolean {
  return type === 0x05 || type === 0x0f || type === 0x85;
}

function mbrTypeName(type: number): string {
  return MBR_TYPES[type] ?? 'Unknown';
}

/** The four primary slots of an MBR sector: [type, bootable, first LBA, sectors]. */
function mbrSlots(sector: Uint8Array): Array<{ type: number; boot: boolean; lba: number; count: number }> {
  const out: Array<{ type: number; boot: boolean; lba: number; count: number }> = [];
  for (let i = 0; i < 4; i++) {
    const o = 446 + 16 * i;
    out.push({ type: sector[o + 4]!, boot: sector[o] === 0x80, lba: le32(sector, o + 8), count: le32(sector, o + 12) });
  }
  return out;
}

function hasBootSignature(sector: Uint8Array): boolean {
  return sector.length >= SECTOR && sector[510] === 0x55 && sector[511] === 0xaa;
}

/** Reads the GPT whose header is at LBA 1; null when there is no "EFI PART" signature. */
async function readGpt(read: DiskReader, diskSize: number, warnings: string[]): Promise<PartitionTable | null> {
  const hdr = await read(SECTOR, SECTOR);
  if (new TextDecoder().decode(hdr.subarray(0, 8)) !== 'EFI PART') return null;
  const headerSize = le32(hdr, 12);
  if (headerSize >= 92 && headerSize <= SECTOR) {
    const copy = hdr.slice(0, headerSize);
    copy.fill(0, 16, 20);
    if (crc32(copy) !== le32(hdr, 16)) warnings.push('GPT header CRC does not match');
  } else {
    warnings.push(`GPT header size ${headerSize} is invalid`);
  }
  const entriesLba = le64(hdr, 72);
  const count = le32(hdr, 80);
  const entrySize = le32(hdr, 84);
  const table: PartitionTable = { scheme: 'gpt', diskId: formatGuid(hdr, 56), sectorSize: SECTOR, partitions: [], warnings };
  if (entrySize < 128 || entrySize > 4096 || entrySize % 8 !== 0) {
    warnings.push(`GPT entry size ${entrySize} is invalid`);
    return table;
  }
  const n = Math.min(count, MAX_GPT_ENTRIES);
  if (count > n) warnings.push(`GPT claims ${count} entries; only the first ${n} were read`);
  const bytes = n * entrySize;
  if (entriesLba * SECTOR + bytes > diskSize) {
    warnings.push('GPT entry array lies past the end of the disk');
    return table;
  }
  const entries = await read(entriesLba * SECTOR, bytes);
  if (count === n && crc32(entries) !== le32(hdr, 88)) warnings.push('GPT entry array CRC does not match');
  for (let i = 0; i < n; i++) {
    const o = i * entrySize;
    const type = formatGuid(entries, o);
    if (type === '00000000-0000-0000-0000-000000000000') continue;
    const first = le64(entries, o + 32);
    const last = le64(entries, o + 40);
    let name = '';
    for (let c = 0; c < 36; c++) {
      const ch = entries[o + 56 + 2 * c]! | (entries[o + 57 + 2 * c]! << 8);
      if (ch === 0) break;
      name += String.fromCharCode(ch);
    }
    const p: PartitionEntry = { number: i + 1, start: first * SECTOR, size: (last - first + 1) * SECTOR, type, typeName: GPT_TYPES[type] ?? 'Unknown', guid: formatGuid(entries, o + 16) };
    if (name) p.name = name;
    if (last < first) warnings.push(`Partition ${i + 1} ends before it starts`);
    else if (p.start + p.size > diskSize) warnings.push(`Partition ${i + 1} runs past the end of the disk`);
    table.partitions.push(p);
  }
  return table;
}

/** Follows an extended partition's EBR chain, appending logical partitions numbered from 5. */
async function readLogical(read: DiskReader, extStart: number, diskSize: number, out: PartitionEntry[], warnings: string[]): Promise<void> {
  let ebr = extStart;
  const seen = new Set<number>();
  for (let n = 0; n < MAX_LOGICAL; n++) {
    if (seen.has(ebr) || ebr * SECTOR + SECTOR > diskSize) {
      warnings.push('Extended partition chain loops or leaves the disk');
      return;
    }
    seen.add(ebr);
    const sector = await read(ebr * SECTOR, SECTOR);
    if (!hasBootSignature(sector)) {
      warnings.push(`EBR at sector ${ebr} has no boot signature`);
      return;
    }
    const [part, next] = mbrSlots(sector);
    if (part && part.type !== 0 && part.count > 0) {
      out.push({ number: 5 + n, start: (ebr + part.lba) * SECTOR, size: part.count * SECTOR, type: `0x${part.type.toString(16).padStart(2, '0')}`, typeName: mbrTypeName(part.type), bootable: part.boot, logical: true });
    }
    if (!next || next.type === 0 || next.lba === 0) return;
    ebr = extStart + next.lba;
  }
  warnings.push(`More than ${MAX_LOGICAL} logical partitions; the rest were not read`);
}

/**
 * The partition table of a disk of `diskSize` bytes, or null when sector 0
 * has no boot signature (no table, or a disk too small to have one).
 */
export async function readPartitionTable(read: DiskReader, diskSize: number): Promise<PartitionTable | null> {
  if (diskSize < SECTOR) return null;
  const mbr = await read(0, SECTOR);
  if (!hasBootSignature(mbr)) return null;
  const slots = mbrSlots(mbr);
  const warnings: string[] = [];
  if (slots.some((s) => s.type === 0xee) && diskSize >= 2 * SECTOR) {
    const gpt = await readGpt(read, diskSize, warnings);
    if (gpt) return gpt;
    warnings.push('Protective MBR without a GPT header');
  }
  const table: PartitionTable = { scheme: 'mbr', diskId: `0x${le32(mbr, 440).toString(16).padStart(8, '0')}`, sectorSize: SECTOR, partitions: [], warnings };
  for (let i = 0; i < 4; i++) {
    const s = slots[i]!;
    if (s.type === 0 || s.count === 0) continue;
    const p: PartitionEntry = { number: i + 1, start: s.lba * SECTOR, size: s.count * SECTOR, type: `0x${s.type.toString(16).padStart(2, '0')}`, typeName: mbrTypeName(s.type), bootable: s.boot };
    if (p.start + p.size > diskSize) warnings.push(`Partition ${i + 1} runs past the end of the disk`);
    table.partitions.push(p);
    if (isExtended(s.type)) await readLogical(read, s.lba, diskSize, table.partitions, warnings);
  }
  return table;
}
