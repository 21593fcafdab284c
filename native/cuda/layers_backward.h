// CUDA versions of native/cpu/layers_backward.h (same contracts). Every reduction runs in a fixed order (per-block
// partials, then an ordered sum; no float atomics), so two runs on the same shapes are bit-identical.
#pragma once
#include "../core/tensor.h"

namespace tcal::cuda {

void rmsNormBackward(const Tensor& x, const Tensor& w, const Tensor& dy, double eps, const Tensor& dx, const Tensor& dw);
void ropeBackward(const Tensor& dy, const Tensor& positions, const Tensor& invFreq, const Tensor& dx);
void swigluBackward(const Tensor& gate, const Tensor& up, const Tensor& dOut, const Tensor& dGate, const Tensor& dUp);
// ids are not checked on the device: positions whose id lies outside [0, V) contribute to no row.
void embeddingBackward(const Tensor& ids, const Tensor& dOut, const Tensor& dTable);
// Rows whose target lies outside [0, V) get 0 (the CPU refuses targets ≥ V).
void crossEntropyBackward(const Tensor& logits, const Tensor& targets, const Tensor& dLoss, const Tensor& dLogits);
void crossEntropyForwardBackward(const Tensor& logits, const Tensor& targets, double scale, const Tensor& loss,
                                 const Tensor& dLogits);
void klForwardBackward(const Tensor& student, const Tensor& teacher, const Tensor& rowMask, double scale,
                       const Tensor& loss, const Tensor& dStudent);

}  // namespace tcal::cuda
