// The γ₀ decay-grid scan and the context moments of the Taylor moment reduction (native/cuda/moments_scan.cu),
// called by native/cuda/moments.cu.
#pragma once
#include <cuda_runtime.h>

#include <functional>
#include <vector>

#include "../core/tensor.h"
#include <string>

#include "../cpu/moments.h"

namespace tcal::cuda {

// Adds Σ ŷ∘o (acc.scanCross), Σ ŷ² (acc.scanSq), Σ o (acc.contextSum) and Σ o² (acc.contextSq) over the
// listed tokens. v: [tokens, HKV, D], o: [tokens, H, D] contiguous, any floating dtype each; tok / first: the
// included tokens in order and 1 at each sequence start (device), `first` also on the host; decays: [K0] f64
// (device). D ≤ 256. `mark` is called after each phase with its name (the caller's profiler).
// TCAL_MOMENTS_SCAN (v4 | tc | norm; empty: the default), an InvalidArgument naming it otherwise. The op calls it
// before its first launch, so a bad value leaves the accumulators untouched.
std::string scanSwitch();

void gammaScan(const moments::Problem& p, const Tensor& v, const Tensor& o, const int* tok, const int* first,
               const std::vector<int>& hostFirst, const double* decays, const moments::Accumulators& acc,
               cudaStream_t stream, const std::function<void(const char*)>& mark);

}  // namespace tcal::cuda
