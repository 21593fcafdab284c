#pragma once
#include "../core/tensor.h"
#include "../cpu/moments.h"

namespace tcal::cuda {

// Same contract as cpu::taylorMoments (Algorithm::Stream): the streaming formulation of native/cpu/moments.h
// on CUDA cores in fp32 (scores, online softmax, channels), per-row results summed in f64 in token order.
// Head dim ≤ 256.
void taylorMoments(const moments::Problem& p, const moments::Inputs& in, const moments::Accumulators& acc,
                   const moments::Outputs& out);

}  // namespace tcal::cuda
