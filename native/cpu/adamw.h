// AdamW, one fused step over a list of parameters, and the squared global gradient norm.
//
// The per-element arithmetic lives here once (adamwElement) and is compiled for the host (the CPU reference)
// and the device (native/cuda/adamw.cu): fp32 throughout, the same operations in the same order, so the two
// backends agree to the last bit or two. On the device each operation is an explicitly rounded intrinsic so
// that nvcc cannot contract a multiply and an add into an FMA that the host does not do.
#pragma once
#include <cmath>
#include <cstdint>
#include <vector>

#include "../core/tensor.h"

#ifdef __CUDACC__
#define TCAL_ADAMW_HD __host__ __device__ __forceinline__
#else
#define TCAL_ADAMW_HD inline
#endif

namespace tcal {

// Per-parameter constants of one step, precomputed on the host in double and rounded to float once.
struct AdamwConstants {
  float decay;       // 1 − lr·weightDecay (decoupled weight decay: p ← p − lr·wd·p)
  float stepSize;    // lr / (1 − beta1^step)
  float beta1, oneMinusBeta1;
  float beta2, oneMinusBeta2;
  float bc2Sqrt;     // sqrt(1 − beta2^step)
  float eps;
  float gradScale;   // the gradient is multiplied by this first (loss-scale undo, global-norm clipping)
};

namespace adamw_math {
#ifdef __CUDA_ARCH__
TCAL_ADAMW_HD float mul(float a, float b) { return __fmul_rn(a, b); }
TCAL_ADAMW_HD float add(float a, float b) { return __fadd_rn(a, b); }
TCAL_ADAMW_HD float sub(float a, float b) { return __fsub_rn(a, b); }
TCAL_ADAMW_HD float div(float a, float b) { return __fdiv_rn(a, b); }
TCAL_ADAMW_HD float root(float a) { return __fsqrt_rn(a); }
#else
inline float mul(float a, float b) { return a * b; }
inline float add(float a, float b) { return a + b; }
inline float sub(float a, float b) { return a - b; }
inline float div(float a, float b) { return a / b; }
inline float root(float a) { return std::sqrt(a); }
#endif
}  // namespace adamw_math

// One element, in the order of torch.optim.AdamW (non-fused, non-amsgrad):
//   g ← gradScale·g;  p ← p·(1 − lr·wd);  m ← β1·m + (1−β1)·g;  v ← β2·v + (1−β2)·g²;
//   p ← p − (lr / bc1) · m / (sqrt(v) / sqrt(bc2) + eps)
TCAL_ADAMW_HD void adamwElement(float& p, float& m, float& v, float grad, const AdamwConstants& c) {
  using namespace adamw_math;
  float g = mul(grad, c.gradScale);
  float pd = mul(p, c.decay);
  m = add(mul(c.beta1, m), mul(c.oneMinusBeta1, g));
  v = add(mul(c.beta2, v), mul(c.oneMinusBeta2, mul(g, g)));
  float denom = add(div(root(v), c.bc2Sqrt), c.eps);
  p = sub(pd, mul(c.stepSize, div(m, denom)));
}

// Host-side constants of one step for one parameter group. step ≥ 1.
inline AdamwConstants adamwConstants(double lr, double beta1, double beta2, double eps, double weightDecay, int64_t step,
                                     double gradScale) {
  AdamwConstants c;
  double bc1 = 1.0 - std::pow(beta1, double(step));
  double bc2 = 1.0 - std::pow(beta2, double(step));
  c.decay = float(1.0 - lr * weightDecay);
  c.stepSize = float(lr / bc1);
  c.beta1 = float(beta1);
  c.oneMinusBeta1 = float(1.0 - beta1);
  c.beta2 = float(beta2);
  c.oneMinusBeta2 = float(1.0 - beta2);
  c.bc2Sqrt = float(std::sqrt(bc2));
  c.eps = float(eps);
  c.gradScale = float(gradScale);
  return c;
}

// One parameter of a fused step. Shapes, dtypes and devices are checked by the caller (native/napi/adamw.cc):
// param, m, v f32 with n elements; grad f32 / bf16 / f16 with n elements; compute (optional) f32 / bf16 / f16
// with n elements, overwritten with the updated param rounded to its dtype.
struct AdamwItem {
  Tensor param, grad, m, v, compute;
  AdamwConstants c;
};

// Elements per work block, on both backends (the CPU splits work the same way the GPU grid does).
constexpr int64_t kAdamwBlockElems = 4096;

namespace cpu {

void adamwStep(const std::vector<AdamwItem>& items);
// Σ over every element of every tensor of x², accumulated in double; written to out (f64 scalar).
void gradNormSquared(const std::vector<Tensor>& grads, const Tensor& out);

}  // namespace cpu
}  // namespace tcal
