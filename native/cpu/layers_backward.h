// CPU reference for the backward passes of the Transformer's per-token layers (native/cpu/layers.h): RMSNorm,
// RoPE, SwiGLU, embedding and cross-entropy. Math in the input's precision class (float for f32 / bf16 / f16,
// double for f64) with fp64 accumulation of every reduction; gradients in the input dtype, except the
// parameter gradients dw / dTable, which are f32 (f64 for f64 inputs). All are deterministic.
#pragma once
#include "../core/tensor.h"

namespace tcal::cpu {

// The dtype of a summed parameter gradient (rmsNorm's dw, embedding's dTable) for inputs of dtype t.
inline DType paramGradDType(DType t) { return t == DType::F64 ? DType::F64 : DType::F32; }

// y = x · inv · w, inv = 1/sqrt(mean(x²) + eps) per row of length d = w.numel():
//   dx = inv · (dy ⊙ w) − inv³/d · x · Σ(dy ⊙ w ⊙ x),   dw = Σ_rows dy ⊙ x · inv.
// dx may alias x or dy.
void rmsNormBackward(const Tensor& x, const Tensor& w, const Tensor& dy, double eps, const Tensor& dx, const Tensor& dw);
// The inverse rotation of rope (angle −positions[b, t] · invFreq[j]); dy [B, T, H, D]; in place allowed.
void ropeBackward(const Tensor& dy, const Tensor& positions, const Tensor& invFreq, const Tensor& dx);
// out = silu(gate) · up: dGate = dOut · up · σ(g)(1 + g(1 − σ(g))), dUp = dOut · silu(g). Outputs may alias inputs.
void swigluBackward(const Tensor& gate, const Tensor& up, const Tensor& dOut, const Tensor& dGate, const Tensor& dUp);
// dTable [V, D] = Σ over positions i with ids[i] = v of dOut[i] (every row written; ids checked against V).
void embeddingBackward(const Tensor& ids, const Tensor& dOut, const Tensor& dTable);
// dLogits[r] = dLoss[r] · (softmax(logits[r]) − onehot(target[r])); rows with target < 0 get 0.
// dLogits may alias logits.
void crossEntropyBackward(const Tensor& logits, const Tensor& targets, const Tensor& dLoss, const Tensor& dLogits);
// One pass per row: loss[r] = logsumexp(logits[r]) − logits[r, t] (unscaled) and
// dLogits[r] = scale · (softmax(logits[r]) − onehot(t)); target < 0 → loss 0, dLogits 0. dLogits may alias logits.
void crossEntropyForwardBackward(const Tensor& logits, const Tensor& targets, double scale, const Tensor& loss,
                                 const Tensor& dLogits);

// Forward KL(softmax(teacher) ‖ softmax(student)) per row (f32 loss) and dStudent = scale · (q − p); rows with a
// negative rowMask give 0 and 0. dStudent may be the student logits themselves.
void klForwardBackward(const Tensor& student, const Tensor& teacher, const Tensor& rowMask, double scale,
                       const Tensor& loss, const Tensor& dStudent);

}  // namespace tcal::cpu
