// CUDA versions of native/cpu/gdn_layer_ops.h (same contracts). Parameter-gradient sums run in a fixed order
// (per-block partials over fixed row chunks, then an ordered sum; no float atomics): reruns are bit-identical.
#pragma once
#include <cstdint>
#include <vector>

#include "../core/tensor.h"

namespace tcal::cuda {

void causalConv1d(const Tensor& x, const Tensor& w, const std::vector<int32_t>& offsets, const Tensor& y);
void causalConv1dBackward(const Tensor& x, const Tensor& w, const Tensor& dy, const std::vector<int32_t>& offsets,
                          bool accumulate, const Tensor& dx, const Tensor& dw);
void gatedRmsNorm(const Tensor& x, const Tensor& w, const Tensor& gate, double eps, const Tensor& y);
void gatedRmsNormBackward(const Tensor& x, const Tensor& w, const Tensor& gate, const Tensor& dy, double eps,
                          bool accumulate, const Tensor& dx, const Tensor& dw, const Tensor& dGate);
void silu(const Tensor& x, const Tensor& y);
void siluBackward(const Tensor& x, const Tensor& dy, const Tensor& dx);

}  // namespace tcal::cuda
