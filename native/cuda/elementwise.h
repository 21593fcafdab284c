// CUDA casts and elementwise arithmetic (same contracts as native/cpu/elementwise.h).
#pragma once
#include "../core/tensor.h"

namespace tcal::cuda {

void cast(const Tensor& src, const Tensor& dst);
void add(const Tensor& a, const Tensor& b, const Tensor& out);
void mul(const Tensor& a, const Tensor& b, const Tensor& out);
void scale(const Tensor& x, double alpha, const Tensor& out);
void fill(const Tensor& t, double value);
void random(const Tensor& t, int kind, uint64_t seed, double a, double b);

}  // namespace tcal::cuda
