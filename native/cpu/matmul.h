// CPU reference GEMM: C[b] = alpha * op(A[b]) · op(B[b]) + beta * C[b], row-major, strided-batched.
#pragma once
#include "../core/tensor.h"

namespace tcal::cpu {

struct GemmShape {
  int64_t batch, m, n, k;
  bool transA, transB;
  int64_t strideA, strideB, strideC;  // elements between batches (0 broadcasts one matrix)
};

void matmul(const Tensor& a, const Tensor& b, const Tensor& c, const GemmShape& s, double alpha, double beta);

}  // namespace tcal::cpu
