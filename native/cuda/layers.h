// CUDA versions of native/cpu/layers.h (same contracts).
#pragma once
#include "../core/tensor.h"

namespace tcal::cuda {

void rmsNorm(const Tensor& x, const Tensor& w, double eps, const Tensor& y);
void rope(const Tensor& x, const Tensor& positions, const Tensor& invFreq, const Tensor& y);
// ids are checked on the host by the caller; the kernel clamps so a bad id can never read out of bounds.
void embedding(const Tensor& table, const Tensor& ids, const Tensor& out);
void swiglu(const Tensor& gate, const Tensor& up, const Tensor& out);
void crossEntropy(const Tensor& logits, const Tensor& targets, const Tensor& loss);

}  // namespace tcal::cuda
