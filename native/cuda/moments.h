#pragma once
#include "../core/tensor.h"
#include "../cpu/moments.h"

namespace tcal::cuda {

// Same contract as cpu::taylorMoments (Algorithm::Stream), head dim ≤ 256: bf16 / f16 inputs with the
// context given run the attention statistics on the tensor cores (moments_tc.cu); f32 inputs or no context,
// the CUDA-core pass (fp32, forms o). Sums in f64 in a fixed order (deterministic). See moments.cu.
void taylorMoments(const moments::Problem& p, const moments::Inputs& in, const moments::Accumulators& acc);

}  // namespace tcal::cuda
