/**
 * qblock's UI-side API (`qblock/client`): the engine worker's client, the
 * BlockBackend proxies it hands out, the SharedArrayBuffer channel for
 * emulators in their own worker, and the v86 disk adapter.
 */
export { connectEngine, EngineClient, type ConnectOptions, type CreateResult, type JobOptions } from './engine.ts';
export { RemoteBlockBackend, type DiskBackend, type RemoteRequestOptions, type RemoteWriteOptions } from './backend.ts';
export { SabChannelClient, type SabChannelOptions } from './sab-channel.ts';
export { DEFAULT_CAPACITY as DEFAULT_CHANNEL_CAPACITY, requireSharedMemory, sabUnavailableReason } from './sab-layout.ts';
export { createV86Disk, saveState, V86Disk, type V86DiskOptions, type V86DiskState, type V86StateSaver } from './v86-disk.ts';
export { registerEngineTransferHandlers } from './transfer.ts';
export type * from '../worker/types.ts';
export { BlockError, isBlockError, type ErrnoCode } from '../core/errors.ts';
export { connectInspector, InspectorClient } from './inspect.ts';
