// cuBLAS loaded at run time (dlopen): the build machine has no cuBLAS headers or libraries, servers do.
// Only the few entry points we call are declared here, with the ABI of cuBLAS 12/13.
#pragma once
#include <cuda_runtime.h>
#include <library_types.h>

#include <string>

namespace tcal::cuda::blas {

enum Operation { OpN = 0, OpT = 1 };
enum ComputeType { Compute32F = 68, Compute32FFastTF32 = 77, Compute64F = 70 };

// Which library was loaded, or why none could be ("" until first use).
std::string status();
bool available(std::string* reason);

// Column-major strided-batched GEMM through cublasGemmStridedBatchedEx on `stream` of `device`.
void gemmStridedBatched(int device, cudaStream_t stream, Operation opA, Operation opB, int m, int n, int k,
                        const void* alpha, const void* A, cudaDataType aType, int lda, long long strideA,
                        const void* B, cudaDataType bType, int ldb, long long strideB, const void* beta, void* C,
                        cudaDataType cType, int ldc, long long strideC, int batch, ComputeType compute);

}  // namespace tcal::cuda::blas
