// Tensor-core fused GDN forward (bf16 / f16 inputs, K ∈ {64, 128}, V a multiple of 64). See gdn_fwd_tc.cu.
#pragma once
#include <cuda_runtime.h>

#include "../cpu/gdn.h"

namespace tcal::cuda::gdn_tc {

bool eligible(const gdn::Problem& p, DType in, DType out);
// cu: the N+1 token offsets on the device. o / finalState may be undefined; with ckpt, the state at the start
// of every chunk is written there ([chunks, HV, K, V], chunk index chunkFirst[n] + c).
void forward(const gdn::Problem& p, const gdn::Inputs& in, const Tensor& o, const Tensor& finalState, const int* cu,
             cudaStream_t stream, float* ckpt = nullptr, const int* chunkFirst = nullptr);

}  // namespace tcal::cuda::gdn_tc
