// GDN forward, versions 3–5 (bf16 / f16 inputs, K ∈ {64, 128}, V a multiple of 64): prep + state-pass kernels. See gdn_fwd_v3.cu.
#pragma once
#include <cuda_runtime.h>

#include "../cpu/gdn.h"

namespace tcal::cuda::gdn_v3 {

bool eligible(const gdn::Problem& p, DType in, DType out);

// The training forward's hand-over to the tensor-core backward (saveForBackward 'full'): what gdn_bwd_tc's prep
// would write, in its layouts, indexed by global chunk (chunkFirst[n] + c) and value head, blk = chunk·HV + hv.
struct Handover {
  void *A, *QKG;   // 16-bit [blk][C][C]: A = (I + M)⁻¹ and QKG = Q̂K̂ᵀ ⊙ Γ (scale·n_q·n_k), upper blocks 0
  // (no normalised q / k rows: the backward's kernels read the raw rows and the factors sq = scale·rq, rk)
  float* gates;    // [blk][3][C]: e·sq, −β e·rk, d·rk with e = exp γ, d = exp(γ_L − γ) (0 past the end)
  float* gateEnds; // [blk]: e_L
  float *rq, *rk;  // [tokens, H]: 1/‖q‖, 1/‖k‖ (with l2norm; else null)
};
// q, k, v (and o when given) start on 16-byte boundaries (the kernels load and store 16-byte vectors).
bool alignedInputs(const gdn::Inputs& in, const Tensor& o);
// Same contract as gdn_tc::forward: cu = N+1 token offsets on the device, chunkFirst = N+1 first global chunks on
// the device (required: the prep's per-chunk outputs are indexed by them); o / finalState may be undefined; with
// ckpt, the state at the start of every chunk is written there ([chunks, HV, K, V], index chunkFirst[n] + c) in
// ckptType: DType::F32 (float*) or DType::BF16 (__nv_bfloat16*, the fp32 state rounded once to nearest even).
// handover (o defined): the prep also writes it.
void forward(const gdn::Problem& p, const gdn::Inputs& in, const Tensor& o, const Tensor& finalState, const int* cu,
             cudaStream_t stream, void* ckpt, DType ckptType, const int* chunkFirst,
             const Handover* handover = nullptr);

}  // namespace tcal::cuda::gdn_v3
