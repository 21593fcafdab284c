// CUDA Gated DeltaNet: chunked forward (C = 64), backward, decode step. Same contracts as native/cpu/gdn.h.
#pragma once
#include "../cpu/gdn.h"

namespace tcal::cuda {

// What a training forward keeps for gdnBackward. chunkStates: the state at the start of every chunk
// ([chunks, HV, K, V], chunks in gdn::chunkTable order; f32, or bf16 where the tensor-core forward and backward
// both run). With GdnSave::Full where the v3 forward runs with o (gdn_tc::handsOver), also the backward prep's
// outputs (gdn_v3::Handover): A, QKG [chunks, HV, C, C] in the inputs' dtype, gates [chunks, HV, 3, C] (e·sq,
// −βe·rk, d·rk) and gateEnds [chunks, HV] f32, with l2norm norms [2, tokens, H] f32 (1/‖q‖, 1/‖k‖).
struct GdnSaved {
  Tensor chunkStates, A, QKG, gates, gateEnds, norms;
};
enum class GdnSave { None, States, Full };
GdnSaved gdnForward(const gdn::Problem& p, const gdn::Inputs& in, const gdn::ForwardOut& out,
                    GdnSave save = GdnSave::None);
// saved: the forward's (shapes checked by the caller); chunkStates skip the backward's forward recompute, the
// hand-over (A defined) its prep where the tensor-core backward runs. Undefined: recomputed here.
void gdnBackward(const gdn::Problem& p, const gdn::Inputs& in, const Tensor& dO, const Tensor& dFinal,
                 const gdn::BackwardOut& out, const GdnSaved& saved = GdnSaved());
void gdnDecodeStep(const gdn::DecodeArgs& a, const gdn::Inputs& in, const Tensor& state, const Tensor& o);

}  // namespace tcal::cuda
