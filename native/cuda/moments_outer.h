// Σ z, Σ z zᵀ per head on the tensor cores (moments_outer.cu): the keys with RoPE undone, the values, and the
// layer input where cuBLAS is missing.
#pragma once
#include <cuda_runtime.h>

#include "../core/tensor.h"

namespace tcal::cuda::moments_outer {

struct Job {
  const void* src;
  DType dtype;
  long long stride;  // elements between tokens
  int heads, D;      // columns = heads·D; one D×D outer product per head
  int ropeHalf;      // > 0: undo RoPE on the pairs (c, c + ropeHalf) of each head
  double* sum;       // [heads·D] += Σ z
  double* outer;     // [heads, D, D] += Σ z zᵀ
};

// tok / pos: the `count` included rows (token index, position in its sequence) on the device; trig: cos, sin
// of θ_j·pos, [longest sequence, ropeHalf] (read only when ropeHalf > 0).
void headOuterSums(const Job& j, const int* tok, const int* pos, int count, const float2* trig, Device dev, cudaStream_t stream);

// dst[e] += Σ_b part[b·n + e] for e < n, in f64 with the `blocks` fp32 partials summed in order (deterministic).
void addPartialSums(const float* part, int blocks, long long n, double* dst, cudaStream_t stream);

}  // namespace tcal::cuda::moments_outer
