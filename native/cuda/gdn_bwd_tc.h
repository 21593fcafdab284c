// GDN backward, version 4 (bf16 / f16, K ∈ {64, 128}, V a multiple of 64): tensor-core kernels. See gdn_bwd_tc.cu.
#pragma once
#include <cuda_runtime.h>

#include "../cpu/gdn.h"

namespace tcal::cuda::gdn_bwd_tc {

constexpr int kTileV = 64;  // V columns per gradient block where V % 128 ≠ 0

// V columns per gradient block: 128 where V % 128 = 0, else 64; dq/dk/dg/dβ come out as one partial sum per
// tile.
int tileV(const gdn::Problem& p);
// One tile and one value head per key head: kernel 3 writes the final dq, dk itself (scale and the L2 norm's
// chain rule included) and gdn.cu's qkGrads epilogue does not run; the per-tile dq/dk partials are not used.
bool fusedQK(const gdn::Problem& p);

// Kernel 3's fused dq/dk epilogue (on = fusedQK).
struct Fused {
  bool on;
  const float *rq, *rk;
  float scale;
  bool l2norm;
  void *dq, *dk;
};

// q, k, v and dO must start on 16-byte boundaries (they are read as 16-byte vectors).
bool eligible(const gdn::Problem& p, DType in, DType dOType, DType dvType, const void* q, const void* k, const void* v,
              const void* dO);

// Everything on the device. q / k: the raw inputs (normalised and scaled in kernel 1, which writes the norm
// factors rq / rk [NT, H] when l2norm); g / beta: effective gates [NT, HV]; ckpt: chunk-start states
// [chunks, HV, K, V], f32 or (ckpt16) bf16; chunk table as in gdn.cu. Writes dv (valid tokens),
// the per-tile partials dqP / dkP [V/tileV, NT, HV, K] and dgamP / dbetaP [V/tileV, NT, HV] (valid tokens),
// and dh0 when given; with fusedQK, dq / dk (valid tokens) instead of the dq/dk partials.
struct Args {
  const void *q, *k;
  float *rq, *rk;
  float scale;
  bool l2norm;
  const float *g, *beta;
  const void* ckpt;
  bool ckpt16;
  const float* dFinal;
  const void *v, *dO;
  const int *cu, *chunkFirst, *chunkStart, *chunkLen;
  int nChunks;
  int64_t NT;
  void* dv;
  float *dqP, *dkP, *dgamP, *dbetaP, *dh0;
  void *dq, *dk;
  // The training forward's hand-over (gdn_v3::Handover, saveForBackward 'full'): kernel 1's outputs A, QKG
  // (16-bit), the gate vectors (times the row factors) and e_L; kernel 1 then does not run (rq / rk above are the
  // forward's too).
  const void *hA = nullptr, *hQKG = nullptr;
  const float *hGates = nullptr, *hGateEnds = nullptr;
};
void backward(const gdn::Problem& p, DType dt, Device dev, const Args& a, cudaStream_t stream);

}  // namespace tcal::cuda::gdn_bwd_tc
