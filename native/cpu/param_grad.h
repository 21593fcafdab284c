// Summed parameter gradients of the CPU backward ops are f32, or f64 for f64 inputs: run fn with the typed pointer.
#pragma once
#include "../core/tensor.h"

namespace tcal::cpu {

template <typename Fn>
void withParamGrad(const Tensor& g, Fn&& fn) {
  if (g.dtype() == DType::F64)
    fn(g.ptr<double>());
  else
    fn(g.ptr<float>());
}

}  // namespace tcal::cpu
