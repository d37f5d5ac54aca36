/**
 * The filter drivers: blkdebug (error injection and breakpoints),
 * copy-on-read and throttle. Register them with
 * `new Graph({ drivers: [...protocols, ...formats, ...filterDrivers()] })`.
 */
import type { BlockDriver } from '../core/driver.ts';
import type { ThrottleGroupRegistry } from '../core/throttle-group.ts';
import { blkdebugDriver } from './blkdebug.ts';
import { copyOnReadDriver } from './copy-on-read.ts';
import { createThrottleDriver, throttleDriver } from './throttle.ts';

export {
  BLKDEBUG_EVENTS,
  BLKDEBUG_IO_TYPES,
  blkdebugBreak,
  blkdebugCurrentState,
  blkdebugDriver,
  blkdebugEvent,
  blkdebugEventName,
  blkdebugIsSuspended,
  blkdebugRemoveBreak,
  blkdebugResume,
  blkdebugSetMessageHandler,
  blkdebugWaitBreak,
  parseBlkdebugConfig,
  type BlkdebugConfig,
  type BlkdebugEvent,
  type BlkdebugIOType,
  type BlkdebugInjectErrorOptions,
  type BlkdebugSetStateOptions,
} from './blkdebug.ts';
export { copyOnReadDriver } from './copy-on-read.ts';
export { createThrottleDriver, throttleDriver } from './throttle.ts';

/**
 * The three filter drivers. `throttleGroups` picks the registry (and so the
 * clock) throttle nodes join; without it they use the process-wide one.
 */
export function filterDrivers(opts: { throttleGroups?: ThrottleGroupRegistry } = {}): BlockDriver[] {
  const throttle = opts.throttleGroups ? createThrottleDriver(opts.throttleGroups) : throttleDriver;
  return [blkdebugDriver, copyOnReadDriver, throttle];
}
