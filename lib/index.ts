export * from './errors';
export { Tensor, scope, keep, type HostArray, type CreateOptions, type DType, type DeviceName } from './tensor';
export { initBackend, backendInfo, defaultDevice, cudaDevices, type BackendChoice, type BackendInfo } from './backend';
export { synchronize, memoryStats, emptyCache, type MemoryStats } from './runtime';
export { cast, add, mul, scale, fill, randomFill } from './ops/elementwise';
export { sum, mean, type ReduceOptions } from './ops/reduce';
export { matmul, type MatmulOptions } from './ops/matmul';
export { version } from './version';
