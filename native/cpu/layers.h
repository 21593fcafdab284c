// CPU reference for the Transformer's per-token layers: RMSNorm, RoPE (rotate-half pairing), embedding
// lookup, SwiGLU, and the cross-entropy of logits rows. fp32 math (fp64 accumulation for reductions).
#pragma once
#include "../core/tensor.h"

namespace tcal::cpu {

// y[r] = x[r] / sqrt(mean(x[r]²) + eps) · w, rows of length d = w.numel().
void rmsNorm(const Tensor& x, const Tensor& w, double eps, const Tensor& y);
// x [B, T, H, D]: pairs (j, j + D/2) rotated by positions[b, t] · invFreq[j]; in place allowed.
void rope(const Tensor& x, const Tensor& positions, const Tensor& invFreq, const Tensor& y);
// out[i] = table[ids[i]] (ids int32, checked against the table's rows).
void embedding(const Tensor& table, const Tensor& ids, const Tensor& out);
// out = silu(gate) · up
void swiglu(const Tensor& gate, const Tensor& up, const Tensor& out);
// loss[r] = logsumexp(logits[r]) − logits[r, target[r]]; target < 0 → 0 (ignored row).
void crossEntropy(const Tensor& logits, const Tensor& targets, const Tensor& loss);

}  // namespace tcal::cpu
