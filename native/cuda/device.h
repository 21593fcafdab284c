// The CUDA runtime side of native/core/runtime.h: devices, one stream per device, the caching allocator.
#pragma once
#include <cuda_runtime.h>

#include <string>
#include <vector>

#include "../core/runtime.h"

namespace tcal::cuda {

int deviceCount(std::string* reason);
DeviceInfo deviceInfo(int index);
std::vector<std::string> compiledArchitectures();

// Makes `index` current on the calling thread (workers run on libuv threads) and returns its stream.
cudaStream_t use(int index);
void* allocate(int index, size_t bytes);
void release(int index, void* ptr);
void copy(void* dst, Device dstDevice, const void* src, Device srcDevice, size_t bytes);
void synchronize(int index);
MemoryStats memoryStats(int index);
void emptyCache(int index);
int multiprocessorCount(int index);

}  // namespace tcal::cuda
