// CPU reference: casts and elementwise arithmetic. Shapes and devices are checked by the caller
// (native/napi); these only compute.
#pragma once
#include "../core/tensor.h"

namespace tcal::cpu {

void cast(const Tensor& src, const Tensor& dst);
// out[i] = a[i] + b[i % b.numel()]  (b broadcast over a's leading dimensions)
void add(const Tensor& a, const Tensor& b, const Tensor& out);
void mul(const Tensor& a, const Tensor& b, const Tensor& out);
void scale(const Tensor& x, double alpha, const Tensor& out);
void fill(const Tensor& t, double value);
// Counter-based random fill (native/core/random.h): Uniform(a, b) or Normal(a, b).
void random(const Tensor& t, int kind, uint64_t seed, double a, double b);

}  // namespace tcal::cpu
