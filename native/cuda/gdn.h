// CUDA Gated DeltaNet: chunked forward (C = 64), backward, decode step. Same contracts as native/cpu/gdn.h.
#pragma once
#include "../cpu/gdn.h"

namespace tcal::cuda {

void gdnForward(const gdn::Problem& p, const gdn::Inputs& in, const gdn::ForwardOut& out);
void gdnBackward(const gdn::Problem& p, const gdn::Inputs& in, const Tensor& dO, const Tensor& dFinal,
                 const gdn::BackwardOut& out);
void gdnDecodeStep(const gdn::DecodeArgs& a, const gdn::Inputs& in, const Tensor& state, const Tensor& o);

}  // namespace tcal::cuda
