// CPU reference reductions over the middle axis of a [outer, n, inner] view, accumulated in double.
#pragma once
#include "../core/tensor.h"

namespace tcal::cpu {

// out[o, i] = sum_j x[o, j, i] (times 1/n when mean)
void reduceSum(const Tensor& x, int64_t outer, int64_t n, int64_t inner, bool mean, const Tensor& out);

}  // namespace tcal::cpu
