import { promises as fsp } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { BlockBackend } from '../core/block-backend.ts';
import { isBlockError } from '../core/errors.ts';
import { Graph } from '../core/graph.ts';
import { bdrvBlockStatus, bdrvDebugEvent } from '../core/io.ts';
import type { BlockNode } from '../core/node.ts';
import { PERM } from '../core/types.ts';
import { rawDriver } from '../formats/raw.ts';
import { memoryDriver, type MemoryNodeState } from '../protocols/memory.ts';
import {
  BLKDEBUG_EVENTS,
  blkdebugBreak,
  blkdebugCurrentState,
  blkdebugEvent,
  blkdebugEventName,
  blkdebugIsSuspended,
  blkdebugRemoveBreak,
  blkdebugResume,
  blkdebugSetMessageHandler,
  blkdebugWaitBreak,
  parseBlkdebugConfig,
} from './blkdebug.ts';
import { filterDrivers } from './index.ts';

const MiB = 1 << 20;
const open: Array<{ blk: BlockBackend; graph: Graph }> = [];

afterEach(async () => {
  for (const { blk, graph } of open.splice(0)) {
    await blk.close();
    await graph.closeAll();
  }
});

function newGraph(): Graph {
  return new Graph({ drivers: [memoryDriver, rawDriver, ...filterDrivers()] });
}

/** A backend on blkdebug over a 1 MiB memory node, reporting every error to the caller. */
async function blkdebug(opts: Record<string, unknown> = {}, image: Record<string, unknown> = {}): Promise<{ blk: BlockBackend; bs: BlockNode; graph: Graph }> {
  const graph = newGraph();
  const blk = await BlockBackend.open(graph, { driver: 'blkdebug', image: { driver: 'memory', size: MiB, ...image }, discard: 'unmap', ...opts });
  blk.setOnError('report', 'report');
  open.push({ blk, graph });
  return { blk, bs: blk.bs!, graph };
}

async function code(p: Promise<unknown>): Promise<string> {
  try {
    await p;
  } catch (e) {
    if (isBlockError(e)) return e.code;
    throw e;
  }
  return 'ok';
}

const data = (n: number, v = 0xab): Uint8Array => new Uint8Array(n).fill(v);

describe('blkdebug: opening', () => {
  it('lists every QAPI event and reads the pre-2.9 dotted spellings', () => {
    expect(BLKDEBUG_EVENTS).toHaveLength(48);
    expect(BLKDEBUG_EVENTS[0]).toBe('l1_update');
    expect(BLKDEBUG_EVENTS.at(-1)).toBe('none');
    expect(blkdebugEventName('l1_grow.alloc_table')).toBe('l1_grow_alloc_table');
    expect(blkdebugEventName('refblock_alloc.switch_table')).toBe('refblock_alloc_switch_table');
    expect(blkdebugEventName('pwritev_rmw.after_tail')).toBe('pwritev_rmw_after_tail');
    expect(blkdebugEventName('bogus')).toBeUndefined();
  });

  it('attaches `image` as the edge named file', async () => {
    const { bs } = await blkdebug();
    expect(bs.drv.name).toBe('blkdebug');
    expect(bs.file?.name).toBe('file');
    expect(bs.file?.bs.drv.name).toBe('memory');
    expect(bs.totalBytes).toBe(MiB);
  });

  it('accepts `file` instead of `image`, and refuses both or neither', async () => {
    const graph = newGraph();
    const blk = await BlockBackend.open(graph, { driver: 'blkdebug', file: { driver: 'memory', size: 4096 } });
    open.push({ blk, graph });
    expect(blk.bs!.file!.bs.drv.name).toBe('memory');
    await expect(graph.open({ driver: 'blkdebug', image: { driver: 'memory' }, file: { driver: 'memory' } })).rejects.toThrow(/both 'image' and 'file'/);
    await expect(graph.open({ driver: 'blkdebug' })).rejects.toThrow('A block device must be specified for "image"');
  });

  it('parses blkdebug:<config>:<image> filenames', async () => {
    const graph = newGraph();
    const bs = await graph.open({ driver: 'blkdebug', filename: 'blkdebug::memory:bd-fn' });
    expect(bs.file!.bs.filename).toBe('memory:bd-fn');
    expect(bs.filename).toBe('blkdebug::memory:bd-fn');
    await graph.closeAll();
    await expect(graph.open({ driver: 'blkdebug', filename: 'blkdebug:nocolon' })).rejects.toThrow('blkdebug requires both config file and image path');
  });

  it('rejects malformed rules with QEMU-style messages', async () => {
    const graph = newGraph();
    const img = { driver: 'memory' };
    await expect(graph.open({ driver: 'blkdebug', image: img, 'inject-error': [{}] })).rejects.toThrow('Missing event name for rule');
    await expect(graph.open({ driver: 'blkdebug', image: img, 'inject-error': [{ event: 'nope' }] })).rejects.toThrow('invalid parameter value: nope');
    await expect(graph.open({ driver: 'blkdebug', image: img, 'inject-error': [{ event: 'none', iotype: 'sideways' }] })).rejects.toThrow('invalid parameter value: sideways');
    await expect(graph.open({ driver: 'blkdebug', image: img, 'inject-error': [{ event: 'none', colour: 'red' }] })).rejects.toThrow("[inject-error] section doesn't support the option 'colour'");
    await expect(graph.open({ driver: 'blkdebug', image: img, 'inject-error': [{ event: 'none', state: 'x' }] })).rejects.toThrow("Parameter 'state' expects a number");
    await expect(graph.open({ driver: 'blkdebug', image: img, 'inject-error': { event: 'none' } })).rejects.toThrow('inject-error expects a list');
    await expect(graph.open({ driver: 'blkdebug', image: img, 'take-child-perms': ['fly'] })).rejects.toThrow("does not accept value 'fly'");
    expect(graph.nodes.size).toBe(0);
  });

  it('overrides limits and validates them against the alignment', async () => {
    const { bs, blk } = await blkdebug({ align: 4096, 'max-transfer': '64k', 'opt-write-zero': 8192, 'max-write-zero': 65536, 'opt-discard': 8192, 'max-discard': 131072 });
    expect(bs.bl).toMatchObject({ requestAlignment: 4096, maxTransfer: 65536, pwriteZeroesAlignment: 8192, maxPwriteZeroes: 65536, pdiscardAlignment: 8192, maxPdiscard: 131072 });
    // Unaligned requests still work: the generic path does read-modify-write at 4 KiB.
    await blk.pwrite(100, data(5000, 7));
    expect([...(await blk.read(99, 5002))]).toEqual([0, ...new Array<number>(5000).fill(7), 0]);
    const graph = newGraph();
    const img = { driver: 'memory' };
    await expect(graph.open({ driver: 'blkdebug', image: img, align: 3000 })).rejects.toThrow('Cannot meet constraints with align 3000');
    await expect(graph.open({ driver: 'blkdebug', image: img, align: 512, 'max-transfer': 1000 })).rejects.toThrow('Cannot meet constraints with max-transfer 1000');
    await expect(graph.open({ driver: 'blkdebug', image: { driver: 'memory', align: 4096 }, 'opt-discard': 512 })).rejects.toThrow('Cannot meet constraints with opt-discard 512');
    await expect(graph.open({ driver: 'blkdebug', image: img, 'opt-write-zero': 4096, 'max-write-zero': 6144 })).rejects.toThrow('Cannot meet constraints with max-write-zero 6144');
  });

  it('refuses to change its rules or limits on reopen', async () => {
    const { bs, graph } = await blkdebug({ align: 512 });
    await expect(graph.reopen(bs, { options: { align: 4096 } })).rejects.toThrow("Cannot change the option 'align'");
    await graph.reopen(bs, { options: { align: 512 } });
  });

  it('takes and unshares extra permissions on its child', async () => {
    const { bs, graph } = await blkdebug({ 'take-child-perms': ['resize'], 'unshare-child-perms': ['write'] });
    const child = bs.file!;
    expect(child.perm & PERM.RESIZE).toBeTruthy();
    expect(child.sharedPerm & PERM.WRITE).toBe(0);
    const job = { kind: 'job' as const, name: 'other', description: () => 'another writer' };
    expect(() => graph.attachRoot(child.bs, job, 'root', PERM.WRITE, PERM.ALL)).toThrow(/Permission conflict.*'write'/);
  });
});

describe('blkdebug: inject-error', () => {
  it('fails every matching request when armed at open (event none), leaving other types alone', async () => {
    const { blk } = await blkdebug({ 'inject-error': [{ event: 'none', iotype: 'read' }] });
    expect(await code(blk.read(0, 512))).toBe('EIO');
    expect(await code(blk.read(4096, 512))).toBe('EIO');
    expect(await code(blk.pwrite(0, data(512)))).toBe('ok');
    expect(await code(blk.flush())).toBe('ok');
  });

  it('without iotype fails reads, writes, zero writes, discards and flushes but not block status', async () => {
    const { blk, bs } = await blkdebug({ 'inject-error': [{ event: 'none', errno: 28 }] });
    expect(await code(blk.read(0, 512))).toBe('ENOSPC');
    expect(await code(blk.pwrite(0, data(512)))).toBe('ENOSPC');
    expect(await code(blk.pwriteZeroes(0, 4096))).toBe('ENOSPC');
    expect(await code(blk.pdiscard(0, 4096))).toBe('ENOSPC');
    expect(await code(bdrvBlockStatus(bs, true, 0, 4096))).toBe('ok');
  });

  it('fails flushes and block-status queries when asked to', async () => {
    const { blk, bs } = await blkdebug({ 'inject-error': [{ event: 'none', iotype: 'flush', errno: 'EROFS' }, { event: 'none', iotype: 'block-status' }] });
    await blk.pwrite(0, data(512));
    expect(await code(blk.flush())).toBe('EROFS');
    expect(await code(bdrvBlockStatus(bs, true, 0, 4096))).toBe('EIO');
    expect(await code(blk.read(0, 512))).toBe('ok');
  });

  it('once: fails a single request, then the rule is gone', async () => {
    const { blk } = await blkdebug({ 'inject-error': [{ event: 'none', iotype: 'write', once: true }] });
    expect(await code(blk.pwrite(0, data(512)))).toBe('EIO');
    expect(await code(blk.pwrite(0, data(512)))).toBe('ok');
    expect(await code(blk.pwrite(0, data(512)))).toBe('ok');
  });

  it('once on flush: the next flush after a write fails, the one after that succeeds', async () => {
    const { blk } = await blkdebug({ 'inject-error': [{ event: 'none', iotype: 'flush', once: 'on' }] });
    await blk.pwrite(0, data(512));
    expect(await code(blk.flush())).toBe('EIO');
    expect(await code(blk.flush())).toBe('ok');
  });

  it('sector: only requests covering that 512-byte sector fail', async () => {
    const { blk } = await blkdebug({ 'inject-error': [{ event: 'none', sector: 8 }] });
    expect(await code(blk.read(0, 4096))).toBe('ok');
    expect(await code(blk.read(4096 + 512, 512))).toBe('ok');
    expect(await code(blk.read(4096, 512))).toBe('EIO');
    expect(await code(blk.read(4000, 200))).toBe('EIO');
    expect(await code(blk.pwrite(0, data(8192)))).toBe('EIO');
    expect(await code(blk.pwrite(8192, data(512)))).toBe('ok');
  });

  it('the first armed rule that matches decides; errno 0 lets a request through', async () => {
    const { blk } = await blkdebug({
      'inject-error': [
        { event: 'none', sector: 0, errno: 0 },
        { event: 'none', errno: 28 },
      ],
    });
    expect(await code(blk.read(0, 512))).toBe('ok');
    expect(await code(blk.read(512, 512))).toBe('ENOSPC');
  });

  it('maps errno numbers to codes, and unknown numbers to EIO with the number in the message', async () => {
    const { blk } = await blkdebug({ 'inject-error': [{ event: 'none', iotype: 'read', errno: 4 }, { event: 'none', iotype: 'write', errno: '13' }] });
    await expect(blk.read(0, 512)).rejects.toThrow('Injected error (errno 4)');
    expect(await code(blk.pwrite(0, data(512)))).toBe('EACCES');
  });

  it('arms rules when their event is announced by the generic write path', async () => {
    const { blk } = await blkdebug({ 'inject-error': [{ event: 'pwritev', iotype: 'read' }] });
    expect(await code(blk.read(0, 512))).toBe('ok');
    await blk.pwrite(0, data(512));
    expect(await code(blk.read(0, 512))).toBe('EIO');
  });

  it('arms rules on events a format driver announces with blkdebugEvent, through the chain above', async () => {
    const graph = newGraph();
    const blk = await BlockBackend.open(graph, {
      driver: 'raw',
      file: { driver: 'blkdebug', 'node-name': 'dbg', image: { driver: 'memory', size: MiB }, 'inject-error': [{ event: 'l2_update', iotype: 'write', once: true }] },
    });
    blk.setOnError('report', 'report');
    open.push({ blk, graph });
    const raw = blk.bs!;
    await blk.pwrite(0, data(512));
    // A format announces on its file child, as QEMU's BLKDBG_EVENT(bs->file, ...).
    await blkdebugEvent(raw.file, 'l2_update');
    expect(await code(blk.pwrite(0, data(512)))).toBe('EIO');
    expect(await code(blk.pwrite(0, data(512)))).toBe('ok');
    // From the raw node itself the event walks down to blkdebug too.
    await blkdebugEvent(raw, 'l2_update');
    expect(blkdebugCurrentState(raw)).toBe(1);
    await expect(blkdebugEvent(raw, 'l2_updat')).rejects.toThrow("Unknown blkdebug event 'l2_updat'");
  });

  it('sees flush_to_disk announced by the format above it', async () => {
    const graph = newGraph();
    const blk = await BlockBackend.open(graph, {
      driver: 'raw',
      file: { driver: 'blkdebug', image: { driver: 'memory', size: MiB }, 'inject-error': [{ event: 'flush_to_disk', iotype: 'flush', once: true }] },
    });
    blk.setOnError('report', 'report');
    open.push({ blk, graph });
    await blk.pwrite(0, data(512));
    expect(await code(blk.flush())).toBe('EIO');
    await blk.pwrite(0, data(512));
    expect(await code(blk.flush())).toBe('ok');
  });

  it('without a blkdebug node below, events cost nothing and resolve', async () => {
    const graph = newGraph();
    const bs = await graph.open({ driver: 'raw', file: { driver: 'memory' } });
    expect(bdrvDebugEvent(bs, 'l2_load')).toBeUndefined();
    await blkdebugEvent(bs, 'l2_load');
    await blkdebugEvent(null, 'l2_load');
    await graph.closeAll();
  });
});

describe('blkdebug: immediately', () => {
  it('fails the event call itself and leaves I/O alone', async () => {
    const { blk, bs } = await blkdebug({ 'inject-error': [{ event: 'l2_load', immediately: true, errno: 28 }] });
    expect(await code(blkdebugEvent(bs, 'l2_load'))).toBe('ENOSPC');
    expect(await code(blk.read(0, 512))).toBe('ok');
    expect(await code(blkdebugEvent(bs, 'l2_load'))).toBe('ENOSPC');
  });

  it('with once, fails a single event call', async () => {
    const { bs } = await blkdebug({ 'inject-error': [{ event: 'refblock_alloc', immediately: 'on', once: 'on' }] });
    expect(await code(blkdebugEvent(bs, 'refblock_alloc'))).toBe('EIO');
    expect(await code(blkdebugEvent(bs, 'refblock_alloc'))).toBe('ok');
  });

  it('fails a generic-path write at its pwritev event, before anything reaches storage', async () => {
    const { blk, bs } = await blkdebug({ 'inject-error': [{ event: 'pwritev', immediately: true, once: true }] });
    const mem = bs.file!.bs.state<MemoryNodeState>();
    expect(await code(blk.pwrite(0, data(512)))).toBe('EIO');
    expect(mem.stats.writes).toBe(0);
    await blk.pwrite(0, data(512));
    expect(mem.stats.writes).toBe(1);
  });

  it('on the none event arms like an ordinary rule instead of failing the open', async () => {
    const { blk } = await blkdebug({ 'inject-error': [{ event: 'none', immediately: true, iotype: 'read' }] });
    expect(await code(blk.read(0, 512))).toBe('EIO');
  });
});

describe('blkdebug: state machine', () => {
  it('fails only the second write_aio (the documented example)', async () => {
    const { blk, bs } = await blkdebug({
      'set-state': [{ event: 'write_aio', state: 1, new_state: 2 }],
      'inject-error': [{ event: 'write_aio', state: 2, iotype: 'write' }],
    });
    expect(blkdebugCurrentState(bs)).toBe(1);
    await blkdebugEvent(bs, 'write_aio');
    expect(blkdebugCurrentState(bs)).toBe(2);
    expect(await code(blk.pwrite(0, data(512)))).toBe('ok');
    await blkdebugEvent(bs, 'write_aio');
    expect(await code(blk.pwrite(0, data(512)))).toBe('EIO');
  });

  it('evaluates every rule of an event against the state before the event', async () => {
    const { bs } = await blkdebug({
      'set-state': [
        { event: 'cluster_alloc', state: 1, new_state: 2 },
        { event: 'cluster_alloc', state: 2, new_state: 3 },
      ],
    });
    await blkdebugEvent(bs, 'cluster_alloc');
    expect(blkdebugCurrentState(bs)).toBe(2);
    await blkdebugEvent(bs, 'cluster_alloc');
    expect(blkdebugCurrentState(bs)).toBe(3);
    await blkdebugEvent(bs, 'cluster_alloc');
    expect(blkdebugCurrentState(bs)).toBe(3);
  });

  it('a later event with error rules replaces the armed set; one without leaves it', async () => {
    const { blk, bs } = await blkdebug({
      'inject-error': [
        { event: 'l1_update', iotype: 'read' },
        { event: 'l2_update', iotype: 'write' },
      ],
    });
    await blkdebugEvent(bs, 'l1_update');
    expect(await code(blk.read(0, 512))).toBe('EIO');
    await blkdebugEvent(bs, 'cluster_free');
    expect(await code(blk.read(0, 512))).toBe('EIO');
    await blkdebugEvent(bs, 'l2_update');
    expect(await code(blk.read(0, 512))).toBe('ok');
    expect(await code(blk.pwrite(0, data(512)))).toBe('EIO');
  });

  it('state 0 (the default) matches in any state', async () => {
    const { blk, bs } = await blkdebug({
      'set-state': [{ event: 'l2_load', new_state: 7 }],
      'inject-error': [{ event: 'l2_load', iotype: 'read', once: true }],
    });
    await blkdebugEvent(bs, 'l2_load');
    expect(blkdebugCurrentState(bs)).toBe(7);
    expect(await code(blk.read(0, 512))).toBe('EIO');
  });
});

describe('blkdebug: config files', () => {
  const conf = [
    '# fail the second write_aio',
    '[set-state]',
    'state = "1"',
    'event = "write_aio"',
    'new_state = "2"',
    '',
    '[inject-error]',
    'event = "write_aio"',
    'state = "2"',
    'errno = "28"',
    'iotype = "write"',
    '',
    '[inject-error "named"]',
    '  event = "l1_grow.alloc_table"',
    '  once = "on"',
  ].join('\n');

  it('parses sections, quoted values, ids, comments and indentation', () => {
    const cfg = parseBlkdebugConfig(conf);
    expect(cfg.setStates).toEqual([{ state: '1', event: 'write_aio', new_state: '2' }]);
    expect(cfg.injectErrors).toEqual([
      { event: 'write_aio', state: '2', errno: '28', iotype: 'write' },
      { event: 'l1_grow.alloc_table', once: 'on' },
    ]);
  });

  it('reports the line of a syntax error', () => {
    expect(() => parseBlkdebugConfig('[inject-error]\nevent = read_aio\n', 'x.conf')).toThrow('Could not parse blkdebug config file: x.conf:2: parse error');
    expect(() => parseBlkdebugConfig('event = "read_aio"')).toThrow(':1: no group defined');
    expect(() => parseBlkdebugConfig('[drive]\n')).toThrow("There is no option group 'drive'");
    expect(() => parseBlkdebugConfig('[set-state]\nerrno = "5"\n')).toThrow("Invalid parameter 'errno'");
  });

  it('takes rules from config-text', async () => {
    const { blk, bs } = await blkdebug({ 'config-text': conf });
    await blkdebugEvent(bs, 'write_aio');
    await blkdebugEvent(bs, 'write_aio');
    expect(await code(blk.pwrite(0, data(512)))).toBe('ENOSPC');
  });

  it('reads a config file under Node and reports a missing one', async () => {
    const dir = await fsp.mkdtemp(join(tmpdir(), 'qblock-blkdebug-'));
    try {
      const path = join(dir, 'blkdebug.conf');
      await fsp.writeFile(path, '[inject-error]\nevent = "none"\nerrno = "5"\niotype = "read"\n');
      const { blk, bs } = await blkdebug({ config: path });
      expect(await code(blk.read(0, 512))).toBe('EIO');
      expect(bs.options.config).toBe(path);
      const graph = newGraph();
      await expect(graph.open({ driver: 'blkdebug', config: join(dir, 'missing.conf'), image: { driver: 'memory' } })).rejects.toThrow(
        'Could not read blkdebug config file: No such file or directory',
      );
    } finally {
      await fsp.rm(dir, { recursive: true, force: true });
    }
  });
});

describe('blkdebug: breakpoints', () => {
  it('suspends a write at its event until resumed', async () => {
    const { blk, bs } = await blkdebug();
    const messages: string[] = [];
    blkdebugSetMessageHandler(bs, (m) => messages.push(m));
    const mem = bs.file!.bs.state<MemoryNodeState>();
    blkdebugBreak(bs, 'pwritev', 'A');
    let done = false;
    const w = blk.pwrite(0, data(512, 9)).then(() => {
      done = true;
    });
    await blkdebugWaitBreak(bs, 'A');
    expect(blkdebugIsSuspended(bs, 'A')).toBe(true);
    await new Promise((r) => setTimeout(r, 5));
    expect(done).toBe(false);
    expect(mem.stats.writes).toBe(0);
    blkdebugResume(bs, 'A');
    await w;
    expect(done).toBe(true);
    expect(blkdebugIsSuspended(bs, 'A')).toBe(false);
    expect(mem.stats.writes).toBe(1);
    expect(messages).toEqual(["blkdebug: Suspended request 'A'", "blkdebug: Resuming request 'A'"]);
    // Breakpoints are one-shot.
    await blk.pwrite(0, data(512));
    expect(blkdebugIsSuspended(bs, 'A')).toBe(false);
  });

  it('lets a second request overtake a suspended one', async () => {
    const { blk, bs } = await blkdebug();
    blkdebugBreak(bs, 'pwritev', 'first');
    const w1 = blk.pwrite(0, data(512, 1));
    await blkdebugWaitBreak(bs, 'first');
    await blk.pwrite(4096, data(512, 2));
    expect((await blk.read(4096, 1))[0]).toBe(2);
    expect((await blk.read(0, 1))[0]).toBe(0);
    blkdebugResume(bs, 'first');
    await w1;
    expect((await blk.read(0, 1))[0]).toBe(1);
  });

  it('remove_break drops the breakpoint and resumes what it holds, failing like QEMU when the breakpoint was spent', async () => {
    const { blk, bs } = await blkdebug();
    blkdebugBreak(bs, 'pwritev_done', 'B');
    const w = blk.pwrite(0, data(512));
    await blkdebugWaitBreak(bs, 'B');
    // The breakpoint was used up by the suspension: QEMU 7.2 resumes the request, then says ENOENT.
    expect(() => blkdebugRemoveBreak(bs, 'B')).toThrow(expect.objectContaining({ code: 'ENOENT' }));
    expect(blkdebugIsSuspended(bs, 'B')).toBe(false);
    await w;
    // With a breakpoint set again under the same tag, removing it succeeds and resumes the held request too.
    blkdebugBreak(bs, 'pwritev_done', 'D');
    const w2 = blk.pwrite(0, data(512));
    await blkdebugWaitBreak(bs, 'D');
    blkdebugBreak(bs, 'pwritev_done', 'D');
    blkdebugRemoveBreak(bs, 'D');
    await w2;
    blkdebugBreak(bs, 'pwritev', 'C');
    blkdebugRemoveBreak(bs, 'C');
    await blk.pwrite(0, data(512));
    expect(() => blkdebugRemoveBreak(bs, 'C')).toThrow(expect.objectContaining({ code: 'ENOENT' }));
  });

  it('reports unknown events and tags, and nodes without blkdebug', async () => {
    const { bs, graph } = await blkdebug();
    expect(() => blkdebugBreak(bs, 'no_such_event', 'X')).toThrow(expect.objectContaining({ code: 'ENOENT' }));
    expect(() => blkdebugResume(bs, 'X')).toThrow(expect.objectContaining({ code: 'ENOENT' }));
    expect(blkdebugIsSuspended(bs, 'X')).toBe(false);
    const plain = await graph.open({ driver: 'memory' });
    expect(() => blkdebugBreak(plain, 'pwritev', 'X')).toThrow(expect.objectContaining({ code: 'ENOTSUP' }));
    await expect(blkdebugWaitBreak(plain, 'X')).rejects.toMatchObject({ code: 'ENOTSUP' });
    await graph.unref(plain);
  });

  it('wait_break can be cancelled', async () => {
    const { bs } = await blkdebug();
    const ac = new AbortController();
    const p = blkdebugWaitBreak(bs, 'never', ac.signal);
    ac.abort();
    await expect(p).rejects.toMatchObject({ code: 'ECANCELED' });
  });

  it('is found from a node above blkdebug, as qemu-io does from the root', async () => {
    const graph = newGraph();
    const blk = await BlockBackend.open(graph, { driver: 'raw', file: { driver: 'blkdebug', image: { driver: 'memory', size: MiB } } });
    open.push({ blk, graph });
    const raw = blk.bs!;
    blkdebugBreak(raw, 'pwritev', 'R');
    const w = blk.pwrite(0, data(512));
    await blkdebugWaitBreak(raw, 'R');
    blkdebugResume(raw, 'R');
    await w;
  });

  it('a suspended read and an immediate error: the error comes after the resume', async () => {
    const { bs } = await blkdebug({ 'inject-error': [{ event: 'l2_load', immediately: true }] });
    blkdebugBreak(bs, 'l2_load', 'L');
    let settled = false;
    const ev = blkdebugEvent(bs, 'l2_load').then(
      () => 'ok',
      (e: unknown) => (isBlockError(e) ? e.code : 'other'),
    ).finally(() => {
      settled = true;
    });
    await blkdebugWaitBreak(bs, 'L');
    expect(settled).toBe(false);
    blkdebugResume(bs, 'L');
    expect(await ev).toBe('EIO');
  });
});
