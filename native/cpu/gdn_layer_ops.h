// CPU reference for the pieces of the GDN student layer (lib/model/gdn-layer.ts) that the Transformer ops lack:
// the short causal depthwise convolution (fla's ShortConvolution without bias or activation), the gated
// RMSNorm (fla's FusedRMSNormGated with SiLU) and SiLU itself, each with its backward. Math in the input's
// precision class (float for f32 / bf16 / f16, double for f64) with fp64 accumulation of the parameter-gradient
// sums; parameter gradients are f32 (f64 for f64 inputs), written or accumulated (`accumulate`).
#pragma once
#include <cstdint>
#include <vector>

#include "../core/tensor.h"

namespace tcal::cpu {

// y[t, c] = Σ_j w[c, j] · x[t − (W−1) + j, c] for x, y [tokens, C] (any leading shape), w with C·W elements
// ([C, W] or fla's [C, 1, W]). `offsets` (N+1, ascending) split the tokens into sequences: the window never
// reaches before its sequence's first token; tokens at or past offsets[N] get y = 0.
void causalConv1d(const Tensor& x, const Tensor& w, const std::vector<int32_t>& offsets, const Tensor& y);
// dx[s, c] = Σ_j w[c, j] · dy[s + (W−1) − j, c] (within the sequence), dw[c, j] (+)= Σ_t dy[t, c] · x[t − (W−1) + j, c].
// dx may not alias dy or x.
void causalConv1dBackward(const Tensor& x, const Tensor& w, const Tensor& dy, const std::vector<int32_t>& offsets,
                          bool accumulate, const Tensor& dx, const Tensor& dw);

// y = x · inv · w ⊙ silu(gate), inv = 1/sqrt(mean(x²) + eps) per row of length d = w.numel(). y may alias x or gate.
void gatedRmsNorm(const Tensor& x, const Tensor& w, const Tensor& gate, double eps, const Tensor& y);
// With n = x·inv, s = silu(gate), u = dy ⊙ s ⊙ w:
//   dx = inv·u − inv³/d · x · Σ(u ⊙ x),  dGate = dy ⊙ n ⊙ w ⊙ silu'(gate),  dw (+)= Σ_rows dy ⊙ n ⊙ s.
// dx and dGate may alias x, gate or dy (each row is read before it is written).
void gatedRmsNormBackward(const Tensor& x, const Tensor& w, const Tensor& gate, const Tensor& dy, double eps,
                          bool accumulate, const Tensor& dx, const Tensor& dw, const Tensor& dGate);

// y = x · σ(x); dx = dy · σ(x)(1 + x(1 − σ(x))). Outputs may alias inputs.
void silu(const Tensor& x, const Tensor& y);
void siluBackward(const Tensor& x, const Tensor& dy, const Tensor& dx);

}  // namespace tcal::cpu
