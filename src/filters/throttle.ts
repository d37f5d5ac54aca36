/**
 * throttle: a filter node that makes its requests wait their turn in a
 * throttle group (QEMU's block/throttle.c), so any part of a graph, not only a
 * BlockBackend, can be rate-limited, and several nodes can share one budget.
 *
 * Each read, write, zero write and discard is charged to the group member
 * before it is passed down; flushes are not throttled. A drained section
 * lifts the limit for this node (queued requests are released), as QEMU's
 * throttle_co_drain_begin does, so drains cannot wait on a timer.
 *
 * The group must already exist in the registry (created with
 * ThrottleGroupRegistry.createGroup, QEMU's `-object throttle-group`). The
 * registry, and with it the clock, is chosen when the driver is made:
 * createThrottleDriver(registry) lets tests run on a VirtualClock.
 */
import type { BlockDriver, ReopenState } from '../core/driver.ts';
import { BlockError } from '../core/errors.ts';
import { bdrvGetLength, bdrvPdiscard, bdrvPreadv, bdrvPwriteCompressed, bdrvPwritev, bdrvPwriteZeroes } from '../core/io.ts';
import type { BlockNode } from '../core/node.ts';
import { throttleGroups, type ThrottleGroupMember, type ThrottleGroupRegistry } from '../core/throttle-group.ts';
import { REQ, ROLE, type BlockdevOptions } from '../core/types.ts';

/** Per-node state: the node's membership in its group (QEMU keeps the ThrottleGroupMember as bs->opaque). */
interface ThrottleNodeState {
  member: ThrottleGroupMember;
}

function member(bs: BlockNode): ThrottleGroupMember {
  return (bs.opaque as ThrottleNodeState).member;
}

/** QEMU's throttle_parse_options: the group name must be given and name an existing group. */
function groupName(registry: ThrottleGroupRegistry, v: unknown): string {
  if (v === undefined) throw new BlockError('EINVAL', 'Please specify a throttle group');
  if (typeof v !== 'string') throw new BlockError('EINVAL', "Parameter 'throttle-group' expects a string");
  if (!registry.has(v)) throw new BlockError('EINVAL', `Throttle group '${v}' does not exist`);
  return v;
}

/**
 * Makes a throttle filter driver whose nodes join groups of `registry`
 * (default: the process-wide registry on the real clock).
 */
export function createThrottleDriver(registry: ThrottleGroupRegistry = throttleGroups): BlockDriver {
  return {
    name: 'throttle',
    kind: 'filter',
    hasVariableLength: true,
    runtimeOptions: [{ name: 'throttle-group', type: 'string', help: 'Name of the throttle group' }],

    async open(bs, options) {
      const spec = (options.file ?? bs.options.file) as BlockdevOptions | string | undefined;
      const child = (await bs.graph.openChild(bs, spec, 'file', ROLE.FILTERED | ROLE.PRIMARY))!;
      bs.supportedWriteFlags = child.bs.supportedWriteFlags | REQ.WRITE_UNCHANGED;
      bs.supportedZeroFlags = child.bs.supportedZeroFlags | REQ.WRITE_UNCHANGED;
      const name = groupName(registry, options['throttle-group']);
      bs.opaque = { member: registry.register(name) } satisfies ThrottleNodeState;
    },

    async close(bs) {
      const st = bs.opaque as ThrottleNodeState | undefined;
      st?.member.unregister();
    },

    async getLength(bs) {
      return bdrvGetLength(bs.file!.bs);
    },

    async preadv(bs, offset, bytes, buf, flags, signal) {
      await member(bs).intercept(bytes, false, signal);
      await bdrvPreadv(bs.file!, offset, bytes, buf, flags, signal);
    },

    async pwritev(bs, offset, bytes, buf, flags, signal) {
      await member(bs).intercept(bytes, true, signal);
      await bdrvPwritev(bs.file!, offset, bytes, buf, flags, signal);
    },

    async pwriteZeroes(bs, offset, bytes, flags) {
      await member(bs).intercept(bytes, true);
      await bdrvPwriteZeroes(bs.file!, offset, bytes, flags);
    },

    async pdiscard(bs, offset, bytes) {
      await member(bs).intercept(bytes, true);
      await bdrvPdiscard(bs.file!, offset, bytes);
    },

    async pwritevCompressed(bs, offset, bytes, buf) {
      await member(bs).intercept(bytes, true);
      await bdrvPwriteCompressed(bs.file!, offset, buf.subarray(0, bytes));
    },

    // Both run on a node whose open failed half-way too (closing drains it), when there is no member yet.
    drainBegin(bs) {
      (bs.opaque as ThrottleNodeState | undefined)?.member.drainBegin();
    },

    drainEnd(bs) {
      (bs.opaque as ThrottleNodeState | undefined)?.member.drainEnd();
    },

    async reopenPrepare(state: ReopenState) {
      for (const k of Object.keys(state.options)) {
        if (k !== 'throttle-group' && k !== 'file') {
          throw new BlockError('EINVAL', `Block format 'throttle' does not support the option '${k}'`, { node: state.bs.nodeName });
        }
      }
      const requested = state.options['throttle-group'];
      // An absent name keeps the current group; a given one must exist now, so commit cannot fail.
      state.opaque = requested === undefined ? member(state.bs).groupName : groupName(registry, requested);
    },

    reopenCommit(state: ReopenState) {
      const bs = state.bs;
      const name = state.opaque as string;
      const old = member(bs);
      if (name === old.groupName) return;
      const next = registry.register(name);
      // A node that is drained now stays unthrottled in its new group until the drain ends.
      if (bs.quiesceCounter > 0) next.drainBegin();
      old.unregister();
      (bs.opaque as ThrottleNodeState).member = next;
    },
  };
}

/** The throttle filter on the process-wide registry (QEMU's bdrv_throttle). */
export const throttleDriver: BlockDriver = createThrottleDriver();
