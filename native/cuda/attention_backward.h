#pragma once
#include "../core/tensor.h"
#include "../cpu/attention_backward.h"

namespace tcal::cuda {

// Same contract as cpu::attentionBackward. bf16 / f16: FlashAttention-2-style tensor-core kernels (dK/dV per
// key block over the group's query heads, dQ in a second kernel per query block: deterministic, no atomics);
// f32: CUDA-core kernels in fp32. Head dims other than 64/128/256 run zero-padded.
void attentionBackward(const attn::Problem& p, const Tensor& q, const Tensor& k, const Tensor& v,
                       const attn::BackwardIn& in, const attn::BackwardOut& out);

}  // namespace tcal::cuda
