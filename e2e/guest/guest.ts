/**
 * Builds the test guest: the boot sector from boot.asm (with nasm, installed
 * by `npm test`'s setup) and the raw base disk it boots from, plus where the
 * BIOS images and v86's wasm live. Used by the Playwright engine specs and
 * by the Node test of the v86 disk adapter.
 */
import { execFileSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

/** Where nasm is expected (Debian's package). */
export const NASM = '/usr/bin/nasm';
/** Debian's SeaBIOS images (package `seabios`). */
export const SEABIOS = '/usr/share/seabios/bios.bin';
export const VGABIOS = '/usr/share/seabios/vgabios-isavga.bin';
/** v86's wasm as the npm package ships it. */
export const V86_WASM = fileURLToPath(new URL('../../node_modules/v86/build/v86.wasm', import.meta.url));

/** Size of the guest's base disk: 1 MiB (SeaBIOS is happy with any whole number of sectors). */
export const GUEST_DISK_SIZE = 1 << 20;
/** Sector the guest checks (LBA 1) and the one it writes (LBA 2). */
export const PATTERN_SECTOR = 1;
export const WRITE_SECTOR = 2;

/** What the guest prints on COM1 after its n-th successful boot from the same disk. */
export function okLine(boot: number): string {
  return `QBLOCK OK boot=${boot}`;
}

/** Fails with an instruction when a tool the guest needs is missing. */
function need(path: string, pkg: string): void {
  if (!existsSync(path)) throw new Error(`${path} is missing: run \`npm test\` (its setup installs the Debian package '${pkg}')`);
}

/** Assembles e2e/guest/boot.asm into its 512-byte boot sector. */
export function buildBootSector(): Uint8Array {
  need(NASM, 'nasm');
  const dir = mkdtempSync(join(tmpdir(), 'qblock-guest-'));
  try {
    const out = join(dir, 'boot.bin');
    execFileSync(NASM, ['-f', 'bin', '-o', out, fileURLToPath(new URL('./boot.asm', import.meta.url))], { stdio: ['ignore', 'pipe', 'pipe'] });
    const bin = new Uint8Array(readFileSync(out));
    if (bin.length !== 512 || bin[510] !== 0x55 || bin[511] !== 0xaa) throw new Error(`boot.asm assembled to ${bin.length} bytes without a boot signature`);
    return bin;
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

/** The base disk: boot sector, the pattern sector the guest checks, zeroes elsewhere. */
export function buildGuestDisk(size = GUEST_DISK_SIZE): Uint8Array<ArrayBuffer> {
  const disk = new Uint8Array(size);
  disk.set(buildBootSector(), 0);
  for (let i = 0; i < 512; i++) disk[PATTERN_SECTOR * 512 + i] = (i * 7 + 3) & 0xff;
  return disk;
}

/** SeaBIOS and its VGA BIOS as bytes. */
export function biosImages(): { bios: Uint8Array<ArrayBuffer>; vgaBios: Uint8Array<ArrayBuffer> } {
  need(SEABIOS, 'seabios');
  need(VGABIOS, 'seabios');
  return { bios: new Uint8Array(readFileSync(SEABIOS)), vgaBios: new Uint8Array(readFileSync(VGABIOS)) };
}
