#pragma once
#include "../core/tensor.h"

namespace tcal::cuda {

// out[o, i] = sum_j x[o, j, i] (times 1/n when mean); fp32 accumulation (fp64 for f64).
void reduceSum(const Tensor& x, int64_t outer, int64_t n, int64_t inner, bool mean, const Tensor& out);

}  // namespace tcal::cuda
