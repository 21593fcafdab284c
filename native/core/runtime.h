// Device runtime: allocation (CPU aligned, CUDA through the caching allocator), copies, fills, sync.
// CUDA entry points exist only when the binary was built with CUDA (TCAL_WITH_CUDA); otherwise they throw
// NotCompiled, so callers need no #ifdefs.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "tensor.h"

namespace tcal {

struct DeviceInfo {
  int index = 0;
  std::string name;
  int major = 0, minor = 0;
  int multiprocessors = 0;
  size_t totalMemory = 0, freeMemory = 0;
  size_t l2Bytes = 0;
  size_t sharedPerBlockOptin = 0;
};

struct MemoryStats {
  size_t allocated = 0;  // bytes handed out to live tensors
  size_t reserved = 0;   // bytes held from the driver (allocated + cached)
  size_t peakAllocated = 0;
  size_t allocCalls = 0;     // cudaMalloc calls made
  size_t cacheHits = 0;
};

// Whether CUDA code is in this binary.
bool cudaCompiled();
// Number of usable CUDA devices; 0 with a reason when none (no driver, no device, not compiled).
int cudaDeviceCount(std::string* reason);
DeviceInfo cudaDeviceInfo(int index);
std::vector<std::string> compiledKernels();  // e.g. "cuda:sm_90", "cublas(runtime)"

Tensor empty(const Shape& shape, DType dtype, Device device);
// Copy between any two devices; sizes must match (dtype is not converted).
void copyBytes(const Tensor& dst, const Tensor& src);
void copyFromHost(const Tensor& dst, const void* src, size_t bytes);
void copyToHost(void* dst, const Tensor& src, size_t bytes);
void synchronize(Device device);
MemoryStats memoryStats(Device device);
void emptyCache(Device device);

// Wrap host memory owned elsewhere (zero-copy); `release` runs when the last tensor view is gone.
Tensor wrapHost(void* ptr, const Shape& shape, DType dtype, std::function<void(void*)> release);

}  // namespace tcal
