// The v86 disk adapter in Node: v86 (npm) boots the nasm-built guest with
// Debian's SeaBIOS from a BlockBackend through the adapter; the guest reads
// its pattern through the BIOS, writes a sector, and a second boot from the
// same image sees that write. Also the adapter's ordering and state rules.

import { describe, expect, it } from 'vitest';
import { V86, type V86Image } from 'v86';
import { BlockBackend } from '../core/block-backend.ts';
import { Graph } from '../core/graph.ts';
import { memoryDriver } from '../protocols/memory.ts';
import { rawDriver } from '../formats/raw.ts';
import { biosImages, buildGuestDisk, okLine, V86_WASM, WRITE_SECTOR } from '../../e2e/guest/guest.ts';
import { createV86Disk, saveState, V86Disk } from './v86-disk.ts';
import type { DiskBackend } from './backend.ts';

/** A backend over an anonymous memory store holding `bytes`. */
async function memoryBackend(bytes: Uint8Array): Promise<{ blk: BlockBackend; close: () => Promise<void> }> {
  const graph = new Graph({ drivers: [memoryDriver, rawDriver], defaultProtocol: 'memory' });
  const blk = await BlockBackend.open(graph, { driver: 'raw', file: { driver: 'memory', size: bytes.length } });
  await blk.pwrite(0, bytes);
  return { blk, close: async () => { await blk.close(); await graph.closeAll(); } };
}

/** A v86 emulator over `disk` with Debian's SeaBIOS, not yet started unless `autostart`. */
function emulatorFor(disk: V86Disk, autostart = true): V86 {
  const { bios, vgaBios } = biosImages();
  return new V86({
    wasm_path: V86_WASM,
    bios: { buffer: bios.buffer },
    vga_bios: { buffer: vgaBios.buffer },
    hda: disk as unknown as V86Image,
    autostart,
    disable_keyboard: true,
    disable_mouse: true,
    disable_speaker: true,
    memory_size: 16 << 20,
    vga_memory_size: 2 << 20,
  } as ConstructorParameters<typeof V86>[0]);
}

/** Resolves with the guest's QBLOCK line from `emulator`'s serial port. */
function qblockLine(emulator: V86): Promise<string> {
  let out = '';
  return new Promise<string>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`guest did not report within 30 s; serial so far: ${JSON.stringify(out)}`)), 30_000);
    emulator.add_listener('serial0-output-byte', (b: number) => {
      out += String.fromCharCode(b);
      const m = /QBLOCK [^\r\n]*\r\n/.exec(out);
      if (m) {
        clearTimeout(timer);
        resolve(m[0].trim());
      }
    });
  });
}

/** Boots v86 from `disk` and resolves with the guest's QBLOCK line. */
async function boot(disk: V86Disk): Promise<string> {
  const emulator = emulatorFor(disk);
  try {
    return await qblockLine(emulator);
  } finally {
    await emulator.destroy();
  }
}

describe('v86 disk adapter', () => {
  it('boots the guest twice from a BlockBackend; the second boot sees the first boot\'s write', async () => {
    const img = buildGuestDisk();
    const { blk, close } = await memoryBackend(img);
    try {
      const disk = createV86Disk(blk, { id: 'guest' });
      expect(await boot(disk)).toBe(okLine(1));
      await disk.flush();
      const sector = await blk.read(WRITE_SECTOR * 512, 6);
      expect(Array.from(sector)).toEqual([...'WROTE'].map((c) => c.charCodeAt(0)).concat([1]));
      expect(await boot(createV86Disk(blk, { id: 'guest' }))).toBe(okLine(2));
      // Nothing else changed: the boot sector and the pattern sector are the base's.
      expect(await blk.read(0, 1024)).toEqual(img.subarray(0, 1024));
    } finally {
      await close();
    }
  }, 90_000);

  it('saves v86 state with a small disk token after a flush, and restores it over the same image', async () => {
    const img = buildGuestDisk();
    const { blk, close } = await memoryBackend(img);
    try {
      const disk = createV86Disk(blk, { id: 'guest' });
      const emu = emulatorFor(disk);
      expect(await qblockLine(emu)).toBe(okLine(1));
      const state = await saveState(emu, [disk]);
      await emu.destroy();
      // The guest's write is in the image, not in the state: the disk's part of it is [length, id].
      expect(Array.from(await blk.read(WRITE_SECTOR * 512, 6))).toEqual([...'WROTE'].map((c) => c.charCodeAt(0)).concat([1]));
      expect(disk.get_state()).toEqual([img.length, 'guest']);
      expect(state.byteLength).toBeLessThan(8 << 20);
      // Restoring needs a disk of the same length and id.
      const again = createV86Disk(blk, { id: 'guest' });
      const emu2 = emulatorFor(again, false);
      await new Promise<void>((r) => emu2.add_listener('emulator-loaded', () => r()));
      await emu2.restore_state(state);
      await emu2.destroy();
      const other = createV86Disk(blk, { id: 'other' });
      const emu3 = emulatorFor(other, false);
      await new Promise<void>((r) => emu3.add_listener('emulator-loaded', () => r()));
      await expect(emu3.restore_state(state)).rejects.toThrow(/another disk/);
      await emu3.destroy();
    } finally {
      await close();
    }
  }, 90_000);

  it('orders reads after overlapping writes and keeps get_from_cache current', async () => {
    let writes = 0;
    const store = new Uint8Array(4096);
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    const backend: DiskBackend = {
      async read(offset, length) { return store.slice(offset, offset + length); },
      async pwrite(offset, data) { await gate; store.set(data, offset); writes++; },
      async flush() {},
      async getLength() { return store.length; },
    };
    const disk = new V86Disk(backend);
    await new Promise<void>((r) => { disk.onload = () => r(); disk.load(); });
    expect(disk.byteLength).toBe(4096);
    await new Promise<void>((r) => disk.get_and_cache(0, 512, () => r()));
    const data = new Uint8Array(512).fill(9);
    let wrote = false;
    disk.set(0, data, () => (wrote = true));
    data.fill(1); // v86 reuses its array right away; the adapter must have copied it
    expect(disk.get_from_cache(0, 512)?.[0]).toBe(9);
    const read = new Promise<Uint8Array>((r) => disk.get(0, 512, r));
    release();
    expect((await read)[0]).toBe(9);
    expect(wrote).toBe(true);
    expect(writes).toBe(1);
  });

  it('returns a small state token, flushes before saving, and refuses another disk\'s token', async () => {
    const calls: string[] = [];
    const backend: DiskBackend = {
      async read(_o, n) { return new Uint8Array(n); },
      async pwrite() { calls.push('write'); },
      async flush() { calls.push('flush'); },
      async getLength() { return 1 << 20; },
    };
    const disk = new V86Disk(backend, { id: 'a' });
    await new Promise<void>((r) => { disk.onload = () => r(); disk.load(); });
    disk.set(0, new Uint8Array(512), () => undefined);
    const state = await saveState({ save_state: async () => { calls.push('save'); return new ArrayBuffer(0); } }, [disk]);
    expect(state.byteLength).toBe(0);
    expect(calls).toEqual(['write', 'flush', 'save']);
    expect(disk.get_state()).toEqual([1 << 20, 'a']);
    expect(() => disk.set_state([1 << 20, 'a'])).not.toThrow();
    expect(() => disk.set_state([1 << 20, 'b'])).toThrow(/another disk/);
    const file = await disk.get_as_file();
    expect(file.size).toBe(1 << 20);
  });
});
