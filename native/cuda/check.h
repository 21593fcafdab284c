// Every CUDA runtime call and every launch goes through these: a failure becomes tcal::Error (never an abort).
#pragma once
#include <cuda_runtime.h>

#include <string>

#include "../core/error.h"

namespace tcal::cuda {

[[noreturn]] inline void throwCuda(cudaError_t status, const char* op) {
  if (status == cudaErrorMemoryAllocation) {
    size_t freeB = 0, total = 0;
    cudaGetLastError();
    cudaMemGetInfo(&freeB, &total);
    Error e(ErrorKind::OutOfMemory, std::string(op) + ": out of device memory");
    e.op = op;
    e.freeBytes = freeB;
    throw e;
  }
  Error e(ErrorKind::Cuda, std::string(op) + " failed: " + cudaGetErrorName(status) + " (" +
                               std::to_string(int(status)) + "): " + cudaGetErrorString(status));
  e.cudaName = cudaGetErrorName(status);
  e.number = int(status);
  e.op = op;
  throw e;
}

inline void check(cudaError_t status, const char* op) {
  if (status != cudaSuccess) throwCuda(status, op);
}

// After a kernel launch: launch-configuration errors surface here; faults surface at the next sync.
inline void checkLaunch(const char* kernel) {
  cudaError_t s = cudaGetLastError();
  if (s != cudaSuccess) throwCuda(s, kernel);
}

}  // namespace tcal::cuda
