// Backward of causal softmax attention (native/cpu/attention.h has the problem description).
//
// Given the forward's o and lse and the output gradient dO, with P = exp(scale·q_t·k_s − lse_t) (s ≤ t, same
// sequence) and D_t = Σ_d dO_t·o_t:
//   dV_s = Σ_t P_ts dO_t,  dS_ts = P_ts (dO_t·v_s − D_t),  dQ_t = scale Σ_s dS_ts k_s,  dK_s = scale Σ_t dS_ts q_t,
// dK and dV summed over the query heads of each KV head's group. Tokens past the last sequence: zero gradients.
#pragma once
#include "../core/tensor.h"
#include "attention.h"

namespace tcal::attn {

// o and dO [B,T,H,D] in q's dtype, lse [B,H,T] f32.
struct BackwardIn {
  Tensor o, lse, dO;
};

// dq [B,T,H,D], dk and dv [B,T,HKV,D], all in q's dtype.
struct BackwardOut {
  Tensor dq, dk, dv;
};

}  // namespace tcal::attn

namespace tcal::cpu {

// The reference: fp64 scores and accumulation (any head dim, any floating dtype); parallel over
// (sequence, KV head), each task owning its dK/dV rows, so the result is deterministic.
void attentionBackward(const attn::Problem& p, const Tensor& q, const Tensor& k, const Tensor& v,
                       const attn::BackwardIn& in, const attn::BackwardOut& out);

}  // namespace tcal::cpu
