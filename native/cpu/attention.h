// Causal softmax attention (the teacher's attention, DESIGN.md §4): the problem description shared by the CPU
// reference and the CUDA kernels, and the CPU entry point.
//
// q [B,T,H,D], k and v [B,T,HKV,D] (post-RoPE), H a multiple of HKV: query head h reads KV head h / (H/HKV).
// o[t] = Σ_{s ≤ t, same sequence} softmax_s(scale · q_t·k_s) v_s; lse[b,h,t] = ln Σ_s exp(scale · q_t·k_s).
// Varlen packs N sequences into B = 1 with cu offsets; tokens past the last offset belong to no sequence
// (o = 0, lse = −inf there).
#pragma once
#include <cstdint>
#include <vector>

#include "../core/tensor.h"

namespace tcal::attn {

// A validated problem. Tokens are addressed flat over B·T; sequences are the ranges [cu[n], cu[n+1]).
// Without varlen, cu = [0, T, 2T, ..., B·T].
struct Problem {
  int64_t B = 0, T = 0, H = 0, HKV = 0, D = 0;
  int64_t N = 0;            // sequences
  bool varlen = false;
  std::vector<int32_t> cu;  // N+1 offsets (host copy)
  double scale = 1.0;
  int64_t tokens() const { return B * T; }
  int64_t group() const { return H / HKV; }
};

// o [B,T,H,D] (q's dtype); lse [B,H,T] f32 or undefined.
struct ForwardOut {
  Tensor o, lse;
};

}  // namespace tcal::attn

namespace tcal::cpu {

// The reference: fp32 inputs (any floating dtype, converted), fp64 scores and accumulation, keys streamed in
// blocks with an online softmax (no T×T matrix); parallel over (sequence, head, query block).
void attentionForward(const attn::Problem& p, const Tensor& q, const Tensor& k, const Tensor& v,
                      const attn::ForwardOut& out);

}  // namespace tcal::cpu
