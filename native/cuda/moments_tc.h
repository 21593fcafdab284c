// The tensor-core attention-statistics pass of the Taylor moment reduction (native/cuda/moments_tc.cu),
// called by native/cuda/moments.cu for bf16 / f16 inputs.
#pragma once
#include <cuda_runtime.h>

#include <vector>

#include "../core/tensor.h"
#include "../cpu/moments.h"

namespace tcal::cuda {

// Adds Σ E[Δ], Σ E[Δ²], Σ H, Σ sink, Σ local (acc.attention), the distance histogram and Σ φ of every token
// of the sequences `seqs` ({start, end} flat token ranges, included ones only) into the accumulators.
// q, k: bf16 or f16, [tokens, H|HKV, D] contiguous; trig: f32 (cos, sin)(θ_j τ) [maxLen, D/2] pairs.
// lse: the forward's f32 [B, H, T] row log-sum-exps of the scaled scores, or undefined (then the pass runs
// an online softmax).
void momentStatsTensorCore(const moments::Problem& p, const Tensor& q, const Tensor& k, const Tensor& lse,
                           const float2* trig, const std::vector<int2>& seqs, int maxLen,
                           const moments::Accumulators& acc, cudaStream_t stream);

}  // namespace tcal::cuda
