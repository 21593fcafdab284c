#pragma once
#include "../cpu/attention.h"
#include "../core/tensor.h"

namespace tcal::cuda {

// Same contract as cpu::attentionForward. bf16 / f16: a flash-style tensor-core kernel (mma.sync m16n8k16,
// fp32 accumulation, online softmax in registers); f32: a CUDA-core kernel in fp32 (for parity tests).
void attentionForward(const attn::Problem& p, const Tensor& q, const Tensor& k, const Tensor& v,
                      const attn::ForwardOut& out);

}  // namespace tcal::cuda
