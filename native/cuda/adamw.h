// CUDA AdamW (same contracts and the same per-element arithmetic as native/cpu/adamw.h).
#pragma once
#include "../cpu/adamw.h"

namespace tcal::cuda {

// All items on one CUDA device; one launch for the whole list.
void adamwStep(const std::vector<AdamwItem>& items);
// out: f64 scalar on the grads' device. Deterministic (fixed per-block partials, summed in a fixed order).
void gradNormSquared(const std::vector<Tensor>& grads, const Tensor& out);

}  // namespace tcal::cuda
