// Gated DeltaNet (DESIGN.md §3): the problem description shared by the CPU reference and the CUDA kernels,
// and the CPU entry points (token-by-token recurrence forward/backward in fp32 or fp64, the chunked forward).
//
// Per (sequence, value head), state S ∈ R^{K×V}: q ← scale·q (optionally q, k ← x/sqrt(Σx²+1e-6) first);
// S ← exp(g)·S; ν = β(v − Sᵀk); S ← S + kνᵀ; o = Sᵀq. g is a LOG decay (≤ 0).
#pragma once
#include <cstdint>
#include <vector>

#include "../core/tensor.h"

namespace tcal::gdn {

constexpr int kChunk = 64;
constexpr double kNormEps = 1e-6;

// A validated problem. Tokens are addressed flat over B·T (the [B,T,...] layouts are [B·T,...]); sequences
// are the ranges [cu[n], cu[n+1]) of those tokens. Without varlen, cu = [0, T, 2T, ..., B·T].
struct Problem {
  int64_t B = 0, T = 0, H = 0, HV = 0, K = 0, V = 0;
  int64_t N = 0;             // sequences
  std::vector<int32_t> cu;   // N+1 offsets (host copy)
  double scale = 1.0;
  bool l2norm = false;
  bool fusedGates = false;   // g holds a, beta holds b; aLog / dtBias given
  bool hasH0 = false;
  int64_t tokens() const { return B * T; }
  int64_t group() const { return HV / H; }
};

// The inputs. q, k [B,T,H,K]; v [B,T,HV,V] (q, k, v one floating dtype); g, beta [B,T,HV] f32 (the raw
// a and b when fusedGates); h0 [N,HV,K,V] f32 (optional); aLog, dtBias [HV] f32 (fusedGates).
struct Inputs {
  Tensor q, k, v, g, beta, h0, aLog, dtBias;
};

// Forward outputs: o [B,T,HV,V]; finalState [N,HV,K,V] f32 or undefined.
struct ForwardOut {
  Tensor o, finalState;
};

// Backward: from dO [B,T,HV,V] and dFinal [N,HV,K,V] f32 (optional). dg / dbeta are d a / d b when the gates
// are fused (then dALog, dDtBias [HV] f32 are defined). dh0 only with an initial state.
struct BackwardOut {
  Tensor dq, dk, dv, dg, dbeta, dh0, dALog, dDtBias;
};

// Decode: q, k [N,H,K]; v [N,HV,V]; g, beta [N,HV] (raw a/b when fused); state [N,HV,K,V] f32 in place;
// o [N,HV,V]. (Leading dims may also carry a T=1 axis; shapes are validated by the caller.)
struct DecodeArgs {
  int64_t N = 0, H = 0, HV = 0, K = 0, V = 0;
  double scale = 1.0;
  bool l2norm = false;
  bool fusedGates = false;
};

// Per-sequence chunk table: chunk c of the flat list covers tokens [start, start+len) of sequence seq.
struct ChunkTable {
  std::vector<int32_t> start, len, seq;
  std::vector<int32_t> first;  // N+1: index of each sequence's first chunk
};
ChunkTable chunkTable(const Problem& p);

}  // namespace tcal::gdn

namespace tcal::cpu {

enum class GdnAlgorithm { Chunk, Recurrent };

// f64: compute in double (the oracle); otherwise fp32. Outputs keep their own dtypes.
void gdnForward(const gdn::Problem& p, const gdn::Inputs& in, const gdn::ForwardOut& out, GdnAlgorithm algo,
                bool f64);
void gdnBackward(const gdn::Problem& p, const gdn::Inputs& in, const Tensor& dO, const Tensor& dFinal,
                 const gdn::BackwardOut& out, bool f64);
void gdnDecodeStep(const gdn::DecodeArgs& a, const gdn::Inputs& in, const Tensor& state, const Tensor& o);

}  // namespace tcal::cpu
