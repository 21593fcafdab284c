// GDN backward, version 2 (bf16 / f16, K ∈ {64, 128}, V a multiple of 64): tensor-core kernels. See gdn_bwd_tc.cu.
#pragma once
#include <cuda_runtime.h>

#include "../cpu/gdn.h"

namespace tcal::cuda::gdn_bwd_tc {

constexpr int kTileV = 64;  // V columns per gradient block: dq/dk/dg/dβ come out as one partial sum per tile

// v and dO must start on 16-byte boundaries (they are copied as 16-byte vectors).
bool eligible(const gdn::Problem& p, DType in, DType dOType, DType dvType, const void* v, const void* dO);

// Everything on the device. qs / ks: normalised, q scaled, fp32 [NT, H, K]; g / beta: effective gates
// [NT, HV]; ckpt: chunk-start states [chunks, HV, K, V]; chunk table as in gdn.cu. Writes dv (valid tokens),
// the per-tile partials dqP / dkP [V/kTileV, NT, HV, K] and dgamP / dbetaP [V/kTileV, NT, HV] (valid tokens),
// and dh0 when given.
struct Args {
  const float *qs, *ks, *g, *beta, *ckpt, *dFinal;
  const void *v, *dO;
  const int *cu, *chunkFirst, *chunkStart, *chunkLen;
  int nChunks;
  int64_t NT;
  void* dv;
  float *dqP, *dkP, *dgamP, *dbetaP, *dh0;
};
void backward(const gdn::Problem& p, DType dt, Device dev, const Args& a, cudaStream_t stream);

}  // namespace tcal::cuda::gdn_bwd_tc
