// CUDA Gated DeltaNet: chunked forward (C = 64), backward, decode step. Same contracts as native/cpu/gdn.h.
#pragma once
#include "../cpu/gdn.h"

namespace tcal::cuda {

// saveStates: also returns the state at the start of every chunk ([chunks, HV, K, V], chunks in gdn::chunkTable
// order; f32, or bf16 where the tensor-core forward and backward both run) for gdnBackward; else undefined.
Tensor gdnForward(const gdn::Problem& p, const gdn::Inputs& in, const gdn::ForwardOut& out, bool saveStates = false);
// chunkStates: the forward's saved states (shape checked by the caller); the backward then skips its forward
// recompute. Undefined: recomputed here.
void gdnBackward(const gdn::Problem& p, const gdn::Inputs& in, const Tensor& dO, const Tensor& dFinal,
                 const gdn::BackwardOut& out, const Tensor& chunkStates = Tensor());
void gdnDecodeStep(const gdn::DecodeArgs& a, const gdn::Inputs& in, const Tensor& state, const Tensor& o);

}  // namespace tcal::cuda
