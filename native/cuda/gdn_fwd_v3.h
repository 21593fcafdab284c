// GDN forward, versions 3–5 (bf16 / f16 inputs, K ∈ {64, 128}, V a multiple of 64): prep + state-pass kernels. See gdn_fwd_v3.cu.
#pragma once
#include <cuda_runtime.h>

#include "../cpu/gdn.h"

namespace tcal::cuda::gdn_v3 {

bool eligible(const gdn::Problem& p, DType in, DType out);
// q, k, v (and o when given) start on 16-byte boundaries (the kernels load and store 16-byte vectors).
bool alignedInputs(const gdn::Inputs& in, const Tensor& o);
// Same contract as gdn_tc::forward: cu = N+1 token offsets on the device; o / finalState may be undefined; with
// ckpt, the state at the start of every chunk is written there ([chunks, HV, K, V], index chunkFirst[n] + c) in
// ckptType: DType::F32 (float*) or DType::BF16 (__nv_bfloat16*, the fp32 state rounded once to nearest even).
void forward(const gdn::Problem& p, const gdn::Inputs& in, const Tensor& o, const Tensor& finalState, const int* cu,
             cudaStream_t stream, void* ckpt = nullptr, DType ckptType = DType::F32,
             const int* chunkFirst = nullptr);

}  // namespace tcal::cuda::gdn_v3
