// Tensor-core fused GDN forward (bf16 / f16 inputs, K ∈ {64, 128}, V a multiple of 64). See gdn_fwd_tc.cu.
#pragma once
#include <cuda_runtime.h>

#include "../cpu/gdn.h"
#include "gdn_fwd_v3.h"

namespace tcal::cuda::gdn_tc {

bool eligible(const gdn::Problem& p, DType in, DType out);
// The dtype forward() can write the chunk-start states in for these inputs (o may be undefined): bf16 where
// versions 3–5 run (gdn_fwd_v3.cu; the backward reads S0 as a 16-bit operand anyway), else f32.
// TCAL_GDN_STATES=f32 forces f32 (benchmark switch).
DType checkpointType(const gdn::Problem& p, const gdn::Inputs& in, const Tensor& o);
// Whether forward() can write a gdn_v3::Handover for these inputs: the v3 forward with o.
bool handsOver(const gdn::Problem& p, const gdn::Inputs& in, const Tensor& o);
// cu: the N+1 token offsets on the device; chunkFirst: the N+1 first global chunks of the sequences on the device
// (gdn::chunkTable's `first`). o / finalState may be undefined; with ckpt, the state at the start of every chunk
// is written there ([chunks, HV, K, V], chunk index chunkFirst[n] + c) in ckptType, which must be
// checkpointType(p, in, o) or f32. handover: written too (only where handsOver).
void forward(const gdn::Problem& p, const gdn::Inputs& in, const Tensor& o, const Tensor& finalState, const int* cu,
             const int* chunkFirst, cudaStream_t stream, void* ckpt = nullptr, DType ckptType = DType::F32,
             const gdn_v3::Handover* handover = nullptr);

}  // namespace tcal::cuda::gdn_tc
