#pragma once
#include "../core/tensor.h"
#include "../cpu/matmul.h"

namespace tcal::cuda {

// Same contract as cpu::matmul; runs on cuBLAS (bf16/f16 in, fp32 accumulate; fp32 is strict fp32 unless
// allowTf32).
void matmul(const Tensor& a, const Tensor& b, const Tensor& c, const cpu::GemmShape& s, double alpha, double beta,
            bool allowTf32);

}  // namespace tcal::cuda
