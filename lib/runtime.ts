/** Device-level runtime calls: synchronisation and the caching allocator's statistics. */
import { native, type MemoryStats } from './native';
import { defaultDevice } from './backend';

export type { MemoryStats } from './native';

/** Resolves when all work queued on the device has finished (a CUDA fault surfaces here as CudaError). */
export function synchronize(device: string = defaultDevice()): Promise<void> {
  return native().synchronize(device);
}

export function memoryStats(device: string = defaultDevice()): MemoryStats {
  return native().memoryStats(device);
}

/** Returns cached device blocks to the driver. */
export function emptyCache(device: string = defaultDevice()): void {
  native().emptyCache(device);
}
