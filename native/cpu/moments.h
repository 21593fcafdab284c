// The Taylor attention-moment reduction (DESIGN.md §5.1 Pass 1): the problem description shared by the CPU
// reference and a CUDA kernel, the accumulator layout, the CPU entry point, and the streaming formulation a
// GPU kernel follows.
//
// Inputs (one teacher layer, one batch): post-RoPE q [B,T,H,D], k and v [B,T,HKV,D] (H a multiple of HKV;
// query head h reads KV head h / (H/HKV)), optionally the layer's normalised attention input x [B,T,Dx].
// Sequences are the rows of the batch, or (B = 1) the ranges [cu[n], cu[n+1]) of a packed batch; attention
// never crosses a sequence boundary and positions restart at 0 in each sequence. `include[n] = 0` leaves a
// sequence (padding) out of every statistic; tokens past cu[N] belong to no sequence and count nowhere.
//
// Notation, per query head and query token t at position τ in its sequence: keys s of the same sequence at
// positions σ ≤ τ, Δ = τ − σ, scores a_s = scale·q_t·k_s, A_s = softmax_s(a), θ_j the RoPE inverse frequency
// of the pair (j, j + D/2) (rotate-half pairing: q_j + i·q_{j+D/2} is multiplied by e^{iθ_j σ}).
// Per token and head the reduction forms
//   E[Δ] = Σ_s A_s Δ,   E[Δ²] = Σ_s A_s Δ²,   H = −Σ_s A_s ln A_s,   φ_j = Σ_s A_s e^{iθ_j Δ},
//   sink = A at σ = 0,  local = Σ_{Δ < kLocalWindow} A_s,  hist_b = Σ_{bin(Δ) = b} A_s,  o = Σ_s A_s v_s,
// with bin(0) = 0 and bin(Δ) = b for Δ ∈ [2^{b−1}, 2^b) (the last bin is open-ended), and adds them (f64)
// into per-head sums over every included token. Alongside (no attention needed):
//   γ₀ scan, per query head h, decay γ_k, channel c: y_t = γ_k y_{t−1} + v_t (v of h's KV head, y = 0 before
//   each sequence), ŷ_t = y_t / sqrt(mean_c y_{t,c}² + kScanEps); Σ ŷ_c o_c and Σ ŷ_c².
//   Per KV head: Σ k̄, Σ k̄ k̄ᵀ of the pre-RoPE keys k̄ = R_{−σ} k (RoPE undone at the token's position), Σ v,
//   Σ v vᵀ.  Per head: Σ o, Σ o² (per channel).  Per layer: token count, Σ x, Σ x xᵀ.
// o is the teacher's context when the caller passes it (Inputs::context), else the one the pass forms.
// Every accumulator is a sum (batches and devices combine by addition); the op adds into the caller's
// tensors, so zero them once and stream batches through.
//
// ---- The streaming formulation (what a flash-style kernel computes; cpu::taylorMoments(Stream) is it) ----
// Queries are processed in blocks of rows sharing a reference position ρ (the block's first position; on the
// CPU blocks of kQueryBlock rows, aligned to the sequence start); keys are streamed in blocks, never forming
// the T×T matrix. Per query row the state is the online-softmax pair (m, l) plus extra "value channels":
//   O_c = Σ p_s v_{s,c}                       (the context, D channels: the ordinary P·V)
//   S1  = Σ p_s (σ_s − ρ),  S2 = Σ p_s (σ_s − ρ)²      (key-only channels: P·[σ−ρ, (σ−ρ)²])
//   C_j = Σ p_s cos θ_j σ_s,  Sn_j = Σ p_s sin θ_j σ_s (key-only channels: P·[cos θσ, sin θσ], D of them;
//                                                        a table of cos/sin(θ_j σ) per position, made in f64)
//   E   = Σ p_s (a_s − m)                       (the entropy channel, kept relative to the running max)
//   Z   = Σ_{σ_s = 0} p_s,  L = Σ_{Δ_s < W} p_s,  G_b = Σ_{bin(Δ_s) = b} p_s   (masked row sums of P)
// where p_s = exp(a_s − m) and m is the running max. A key block with scores a_s (s in the block, σ_s ≤ τ):
//   m' = max(m, max_s a_s),  κ = exp(m − m')
//   E ← κ·(E + (m − m')·l)        (every old term (a − m) becomes (a − m'); skipped while l = 0)
//   l, O, S1, S2, C, Sn, Z, L, G ← κ·(…)
//   then for each key: p = exp(a_s − m'); l += p; E += p·(a_s − m'); O += p v_s; S1 += p(σ−ρ); … ; m = m'.
// At the end of the row (δ = τ − ρ, c_τ = cos θ_j τ, s_τ = sin θ_j τ, both from the same table):
//   lse = m + ln l;   o = O/l;   H = ln l − E/l
//   E[Δ] = δ − S1/l;  E[Δ²] = δ² − 2δ·S1/l + S2/l
//   φ_j = e^{iθ_j τ}·(C_j − i Sn_j)/l:  Re φ_j = (c_τ C_j + s_τ Sn_j)/l,  Im φ_j = (s_τ C_j − c_τ Sn_j)/l
//   sink = Z/l,  local = L/l,  hist_b = G_b/l.
// Numerics: positions relative to ρ keep E[Δ²] free of cancellation beyond the block size (|δ| < block);
// the max-relative entropy channel keeps H = ln l − E/l a sum of non-negative terms (E ≤ 0); e^{iθτ} from
// the table avoids reducing large fp32 angles on the device. Per-row results are summed per head in f64
// (on a GPU: per-block partials, then a fixed-order reduction, so results do not depend on scheduling).
// The CPU streaming path runs this in f64 and matches the materialising oracle (Materialize: each row's
// A_t· formed explicitly, H = −Σ A ln A, φ from cos/sin(θΔ) per pair, y_t = Σ_s γ^{t−s} v_s summed
// explicitly) to ≤ 1e-10 relative.
#pragma once
#include <cstdint>
#include <vector>

#include "../core/tensor.h"

namespace tcal::moments {

constexpr int kBins = 20;            // distance histogram: Δ = 0, then [2^{b−1}, 2^b), the last open-ended
constexpr int kLocalWindow = 16;     // "local" mass: Δ < 16
constexpr double kScanEps = 1e-6;    // RMSNorm ε of the γ₀ scan
// Columns of Accumulators::attention.
enum AttentionColumn : int { kDist = 0, kDistSq = 1, kEntropy = 2, kSink = 3, kLocal = 4, kAttentionColumns = 5 };

inline int distanceBin(int64_t delta) {
  if (delta <= 0) return 0;
#if defined(__GNUC__) || defined(__clang__)
  int b = 64 - __builtin_clzll(uint64_t(delta));  // delta ∈ [2^{b−1}, 2^b)
#else
  int b = 0;
  for (uint64_t d = uint64_t(delta); d; d >>= 1) ++b;
#endif
  return b < kBins - 1 ? b : kBins - 1;
}

// A validated problem. Tokens are addressed flat over B·T.
struct Problem {
  int64_t B = 0, T = 0, H = 0, HKV = 0, D = 0;
  int64_t Dx = 0;               // x's last dimension; 0 when no x is given
  int64_t N = 0;                // sequences
  bool varlen = false;
  double scale = 1.0;
  std::vector<int32_t> cu;      // N+1 offsets (host copy); without varlen [0, T, …, B·T]
  std::vector<uint8_t> include; // N flags (host copy); empty = every sequence
  std::vector<double> invFreq;  // D/2 RoPE inverse frequencies θ_j
  std::vector<double> decays;   // K₀ decays γ_k ∈ (0, 1]
  int64_t tokens() const { return B * T; }
  int64_t group() const { return H / HKV; }
  int64_t K0() const { return int64_t(decays.size()); }
  bool included(int64_t n) const { return include.empty() || include[size_t(n)] != 0; }
};

struct Inputs {
  Tensor q, k, v;  // any floating dtype (all three the same)
  Tensor x;        // [B,T,Dx] any floating dtype, or undefined
  // [B,T,H,D] any floating dtype, or undefined: the teacher's own per-head context A·V. When given, the context
  // moments (Σ o, Σ o²) and the γ₀ scan's Σ ŷ∘o are taken from it, and the reduction need not form A·V (the
  // CUDA tensor-core pass does not); when undefined the reduction forms o itself.
  Tensor context;
  // f32 [B,H,T] or undefined: the forward's row log-sum-exp of the scaled scores (attentionForward's lse). The
  // CUDA tensor-core pass then knows each probability up front (no online softmax); the CPU paths ignore it.
  Tensor lse;
};

// f64 sums the op adds into (all on the inputs' device). x-moments are defined iff x is.
struct Accumulators {
  Tensor count;       // [1]        included tokens
  Tensor attention;   // [H, 5]     Σ E[Δ], Σ E[Δ²], Σ H, Σ sink, Σ local  (AttentionColumn)
  Tensor histogram;   // [H, kBins] Σ hist_b
  Tensor phi;         // [H, D/2, 2] Σ Re φ_j, Σ Im φ_j
  Tensor contextSum;  // [H, D]     Σ o
  Tensor contextSq;   // [H, D]     Σ o²
  Tensor scanCross;   // [H, K0, D] Σ ŷ∘o
  Tensor scanSq;      // [H, K0, D] Σ ŷ²
  Tensor keySum;      // [HKV, D]   Σ k̄ (pre-RoPE keys)
  Tensor keyOuter;    // [HKV, D, D] Σ k̄ k̄ᵀ
  Tensor valueSum;    // [HKV, D]
  Tensor valueOuter;  // [HKV, D, D]
  Tensor inputSum;    // [Dx]
  Tensor inputOuter;  // [Dx, Dx]  (symmetric: the upper triangle is summed and mirrored)
};

enum class Algorithm { Stream, Materialize };

}  // namespace tcal::moments

namespace tcal::cpu {

// f64 throughout; parallel over (sequence, head, query block), reductions in a fixed (token) order, so the
// sums do not depend on the thread count, and streaming a set through in several calls gives the same
// additions, in the same order, as one call over the concatenation of its sequences.
void taylorMoments(const moments::Problem& p, const moments::Inputs& in, const moments::Accumulators& acc,
                   moments::Algorithm algorithm);

}  // namespace tcal::cpu
