// The attention statistics of the Taylor moment reduction on the tensor cores (DESIGN.md §5.1 Pass 1;
// the statistics and the streaming formulation: native/cpu/moments.h).
//
// A flash-style pass modelled on native/cuda/attention.cu's forward (kept self-contained: that file is not
// shared): one CTA of W warps per (query tile of BQ rows, head) of one sequence, K tiles of BK keys through
// shared memory (cp.async, two stages, XOR-swizzled rows), S = QKᵀ with mma.sync m16n8k16 (bf16 / f16 →
// fp32), online softmax in registers with ex2. The context A·V is NOT formed: the teacher's forward already
// produced it and its moments are taken from it (native/cuda/moments.cu). Instead:
//   φ: C_j = Σ p cos θ_j σ, Sn_j = Σ p sin θ_j σ is a second "PV" product P·F with the position features
//      F[σ] = [cos θ_j σ | sin θ_j σ] (D columns, an fp16 table), P and F in fp16 (11-bit mantissa: the
//      bf16 P of attention would miss the 1e-4 bar), fp32 accumulation; the rotation e^{iθ_j τ} is applied
//      per row in fp32 at the end (φ = e^{iθτ}(C − i Sn)/l).
//   Per row: E = Σ p·x per element (x = log2 p relative to the running max or lse: entropy H = ln l − ln2·E/l);
//      near the diagonal (key tiles < kNear rows below) also l = Σ p, S1 = Σ p Δ, S2 = Σ p Δ² per element
//      (Δ = τ − σ exact); on far tiles l, Σ p c', Σ p c'² come from an aux product P·[1, c', c'², 0…] over the
//      tile-local key offset c' (exact in fp16) and are expanded per row; Z = p at σ = 0 (sink).
//   Histogram (bins Δ = 0, [2^{b−1}, 2^b)): per (m-tile, key tile) the bin range of the tile's Δ span; a
//      tile inside one bin (every far tile) adds its row sums (in a register until the bin changes); a tile
//      crossing bin edges adds tail masses Σ_{Δ ≥ 2^{b−1}} p per crossed edge, read from the rows' prefix sums
//      over the tile's keys (a third product P·U, U the triangular ones). Bins live in shared memory per row,
//      rescaled with the row's max only when it moves (online). local (Δ < 16) = bins 0..4.
// With the forward's lse (template flag Exact): p = 2^{s·scale·log2e − lse·log2e} is known up front, so there
//   is no running max, no max shuffles and no rescaling of the φ accumulators, the row sums or the bins; every
//   row is still divided by its own Σp at the end (any per-row constant offset of lse cancels exactly there,
//   so lse only has to keep p in range).
// Rows are finalised in fp32, summed over the CTA's rows in a fixed order, written per CTA in f64, and a
// second kernel sums the CTAs in work-list order into the accumulators (deterministic).
#include "moments_tc.h"
#include "wgmma.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <type_traits>
#include <vector>

#include "../core/runtime.h"
#include "check.h"
#include "device.h"
#include "mma.cuh"
#include "types.cuh"

namespace tcal::cuda {

namespace {

using namespace moments;

constexpr float kLn2 = 0.6931471805599453f;
constexpr float kLog2e = 1.4426950408889634f;
constexpr int kLocalBins = 5;  // Δ < kLocalWindow = 16 ⟺ bins 0..4
static_assert(kLocalWindow == 16, "local mass is bins 0..4");
constexpr int kScalars = 5;  // dist, distSq, entropy, sink, local (AttentionColumn order)
// Key tiles at least kNear (StatCfg::KNear, 128 by default) below an m-tile's first row take Σp, Σpc, Σpc² from
// the aux product; nearer ones sum p·Δ, p·Δ² per element (exact Δ: no cancellation for local heads).

using namespace ptx;  // mma.cuh: cp.async, ldmatrix, ex2, Elem<E>::mma / pack

// φ's product runs in fp16 whatever the inputs (P and the cos/sin table need its 11-bit mantissa).
__device__ __forceinline__ void mmaF16(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
  Elem<__half>::mma(c, a, b0, b1);
}
template <typename E>
__device__ __forceinline__ void mmaQK(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
  Elem<E>::mma(c, a, b0, b1);
}
__device__ __forceinline__ unsigned packHalf(float lo, float hi) { return Elem<__half>::pack(lo, hi); }
// Element (n-block n, accumulator slot e) of a probability tile packed as A fragments (pa[kk][4], see packing).
template <int KK>
__device__ __forceinline__ float packedP(const unsigned (&pa)[KK][4], int n, int e) {
  const unsigned w = pa[n >> 1][(n & 1) * 2 + (e >> 1)];
  const __half2 h = *reinterpret_cast<const __half2*>(&w);
  return (e & 1) ? __high2float(h) : __low2float(h);
}
// v[i] for a run-time i ∈ [0, N) (N a power of two) through log2 N levels of selects: registers stay registers.
template <int N>
__device__ __forceinline__ float selectAt(const float (&v)[N], int i) {
  static_assert((N & (N - 1)) == 0, "power of two");
  float t[N];
#pragma unroll
  for (int k = 0; k < N; ++k) t[k] = v[k];
  constexpr int L = N == 1 ? 0 : N == 2 ? 1 : N == 4 ? 2 : N == 8 ? 3 : N == 16 ? 4 : 5;
  static_assert(N <= 32, "up to 32 values");
#pragma unroll
  for (int l = 0; l < L; ++l) {  // a counted loop (a halving one was not unrolled: t went to local memory)
    const int w = N >> (l + 1);
    const bool hi = (i & w) != 0;
#pragma unroll
    for (int k = 0; k < N / 2; ++k)
      if (k < w) t[k] = hi ? t[k + w] : t[k];
  }
  return t[0];
}
__device__ __forceinline__ int binOf(int delta) {
  if (delta <= 0) return 0;
  const int b = 32 - __clz(delta);  // delta ∈ [2^{b−1}, 2^b)
  return b < kBins - 1 ? b : kBins - 1;
}

// ---- sm_90a: warpgroup MMA (wgmma) for QKᵀ and P·F (the `Wg` configs): native/cuda/wgmma.cuh ----

struct StatParams {
  const void* q;
  const void* k;
  const __half* feat;   // [maxLen, D]: cos θ_j σ at column j, sin θ_j σ at D/2 + j (0 for j ≥ half); Wg: [D, featLd]
  int featLd;
  const float2* trig;   // [maxLen, half]
  const int4* work;     // {rowStart, len, tile, 0}, longest first
  const float* lse;     // Exact: [B, H, T] natural-log row normalisers of the scaled scores (attentionForward's)
  double* partial;      // [blocks, R]
  long long qStride, kvStride;
  int H, group, half, R, T;
  float scaleLog2;
};

// Spare: latency helpers that cost registers (split Σp·x chains, two aux accumulators, the far tiles' bin mass
// in registers). Without them the 64-key lse kernel spilled more and ran 13% slower (run 3 of session 3).
// KNear: key tiles nearer than this (in rows below the m-tile) take the exact-Δ path. Tails: how tiles that
// cross histogram bin edges find their tail masses — 0: per edge a compare-and-add over every element of the
// lane and a quad reduction; 4: the rows' prefix sums on the tensor cores, each edge's tail read by the one
// lane that holds it (session 4: 0.54 → ~0.2 ms of crossing work at the bench shape, bench/NOTES.md).
// Wg (sm_90a): QKᵀ and P·F on wgmma, one warpgroup per 64 rows (MT = 1), the feature table transposed ([D][keys])
// so that both products read K-major tiles; +1 KB of shared memory to align the tiles to 1024 B.
// OneK (Wg, one warpgroup per CTA): a single K buffer — the next tile's K is loaded after a barrier that follows
// this tile's QKᵀ, under the statistics — so that three CTAs fit an SM's shared memory (72 KB each).
template <int D_, int W_, int MT_, int BK_, int MinBlocks_, bool Spare_ = true, int KNear_ = 128, int Tails_ = 0, bool Wg_ = false,
          bool OneK_ = false>
struct StatCfg {
  static constexpr int D = D_, W = W_, MT = MT_, BK = BK_, MinBlocks = MinBlocks_;
  static constexpr bool Spare = Spare_, Wg = Wg_, OneK = OneK_;
  static constexpr int KNear = KNear_, Tails = Tails_;
  static constexpr int BQ = 16 * MT * W, KStages = OneK ? 1 : 2;
  static constexpr size_t smem() {
    return size_t(BQ * D + (KStages + 2) * BK * D) * 2 + size_t(kBins * BQ + 3 * BQ) * 4 + size_t(BK * 8) * 2 + (Wg ? 1024 : 0);
  }
};
using Cfg64 = StatCfg<64, 4, 2, 64, 2>;
// D = 128: 64-key tiles (run 3 of session 3: 4.41 ms against 4.69 ms for 32-key tiles) with the tensor-core
// prefix tails (session 4, call 3: kernel 4.26 → 3.98 ms, and no spills in the lse kernel where the per-edge
// tails spilled 132 B). TCAL_MOMENTS_KERNEL=edges keeps the per-edge tails, bk32 the 32-key tiles (both Tails 0).
using Cfg128 = StatCfg<128, 4, 2, 64, 2, true, 128, 4>;
using Cfg128edges = StatCfg<128, 4, 2, 64, 2>;
using Cfg128bk32 = StatCfg<128, 4, 2, 32, 2>;
using Cfg256 = StatCfg<256, 8, 1, 32, 1>;
// sm_90a, D = 128 (where the build has sm_90a code): wgmma with one warpgroup per 64 rows, two CTAs per SM (the
// default: session 5, call 1: kernel 3.98 → 3.15 ms), or two warpgroups per 128 rows in one CTA per SM
// (TCAL_MOMENTS_KERNEL=wg2: 3.67 ms — the exposed prologue / epilogue and 8-warp barriers). TCAL_MOMENTS_KERNEL=mtail
// keeps the mma.sync kernel (Cfg128) for the same-run comparison.
using Cfg128wg2 = StatCfg<128, 8, 1, 64, 1, true, 128, 4, true>;
using Cfg128wg1 = StatCfg<128, 4, 1, 64, 2, true, 128, 4, true>;
using Cfg128wg1k = StatCfg<128, 4, 1, 64, 3, true, 128, 4, true, true>;  // TCAL_MOMENTS_KERNEL=wg1k: 3 CTAs/SM

template <typename E, typename C, bool Exact>
__global__ void __launch_bounds__(C::W * 32, C::MinBlocks) momentStats(StatParams p) {
  constexpr int D = C::D, W = C::W, MT = C::MT, BK = C::BK, BQ = C::BQ;
  constexpr int NT = 32 * W, RW = 16 * MT;
  constexpr int DC = D / 8, KS = D / 16, NB = BK / 8, DB = D / 8, HB = DB / 2;
  constexpr bool Spare = C::Spare;
  static_assert(NB % 2 == 0 && DB % 2 == 0 && BK % 32 == 0, "tile shapes");
  static_assert(C::Tails == 0 || C::Tails == 4, "crossing tails: per edge (0) or tensor-core prefix (4)");
  constexpr bool Wg = C::Wg;
  static_assert(!Wg || (MT == 1 && W % 4 == 0 && D == 128 && BK == 64), "wgmma: warpgroups of 64 rows, 128-byte rows");
  constexpr bool OneK = C::OneK;
  static_assert(!OneK || (Wg && W == 4), "one K buffer: one warpgroup per CTA (its barriers are the CTA's)");

  extern __shared__ __align__(128) unsigned char smemRaw[];
  unsigned char* smem = smemRaw;
  if constexpr (Wg) smem += (1024u - (smemAddr(smemRaw) & 1023u)) & 1023u;  // the 128-byte swizzle is address-based
  E* sQ = reinterpret_cast<E*>(smem);
  E* sK = sQ + BQ * D;                                              // [KStages][BK][D]
  __half* sF = reinterpret_cast<__half*>(sK + C::KStages * BK * D);  // [2][BK][D]
  float* sHist = reinterpret_cast<float*>(sF + 2 * BK * D);  // [kBins][BQ]
  float* sL = sHist + kBins * BQ;                        // [BQ] 1 / final row sums (0: row not counted)
  float* sZ = sL + BQ;                                   // [BQ] p at σ = 0 (written once per row, by its own lane)
  float* sLse = sZ + BQ;                                 // [BQ] Exact: the rows' lse·log2e
  __half* sAux = reinterpret_cast<__half*>(sLse + BQ);   // [BK][8] aux features of the far tiles

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int h = int(blockIdx.x % unsigned(p.H));
  const int4 wk = p.work[blockIdx.x / unsigned(p.H)];
  const int rowStart = wk.x, len = wk.y, tile = wk.z;
  const int hk = h / p.group;
  const int q0 = tile * BQ;
  const E* gQ = static_cast<const E*>(p.q) + (long long)rowStart * p.qStride + (long long)h * D;
  const E* gK = static_cast<const E*>(p.k) + (long long)rowStart * p.kvStride + (long long)hk * D;
  const int kEnd = min(q0 + BQ, len);
  const int nKT = (kEnd + BK - 1) / BK;

  for (int i = tid; i < kBins * BQ; i += NT) sHist[i] = 0.f;

  static_assert(NT % DC == 0 && (NT / DC) % 8 == 0, "loader layout");
  constexpr int LR = NT / DC;
  const int ldRow = tid / DC, ldChunk = tid % DC;
  // mma.sync: rows of D elements, chunk ^ (row & 7). Wg: two 64-column halves of ROWS rows × 128 B each.
  const unsigned ldSmem = unsigned((ldRow * D + ((ldChunk ^ (ldRow & 7)) * 8)) * 2);
  auto ldOff = [&](int rows) -> unsigned {
    if constexpr (Wg) return unsigned((ldChunk >> 3) * rows * 128 + ldRow * 128 + (((ldChunk & 7) ^ (ldRow & 7)) << 4));
    else return ldSmem;
  };
  constexpr int ldRowB = Wg ? 128 : D * 2;
  auto loadTile = [&](unsigned dst, const void* srcV, const void* safe, long long stepBytes, int row0, auto rowsTag) {
    constexpr int ROWS = decltype(rowsTag)::value;
    const int rem = len - row0 - ldRow;
    const char* g = static_cast<const char*>(srcV);
    const unsigned o = dst + ldOff(ROWS);
#pragma unroll
    for (int kk = 0; kk < (ROWS + LR - 1) / LR; ++kk) {
      if (ROWS % LR != 0 && kk * LR + ldRow >= ROWS) break;  // 12 warps: 24 rows per pass
      const bool ok = kk * LR < rem;
      cpAsync16(o + unsigned(kk * LR * ldRowB), ok ? static_cast<const void*>(g) : safe, ok);
      g += stepBytes;
    }
  };
  // Tiles below the last one (every tile the loop prefetches) lie wholly inside the sequence: no row checks.
  auto loadFull = [&](unsigned dst, const void* srcV, long long stepBytes) {
    const char* g = static_cast<const char*>(srcV);
    const unsigned o = dst + ldOff(BK);
#pragma unroll
    for (int kk = 0; kk < (BK + LR - 1) / LR; ++kk) {
      if (BK % LR != 0 && kk * LR + ldRow >= BK) break;
      cpAsync16(o + unsigned(kk * LR * ldRowB), g, true);
      g += stepBytes;
    }
  };
  // Wg: the transposed feature tile [D features][BK keys] (one 128-byte row per feature), from featT [D][featLd]
  // (featLd a multiple of BK: every tile is whole).
  constexpr int FR = NT / 8;
  const int fRow = tid >> 3, fChunk = tid & 7;
  const unsigned fOff = unsigned(fRow * 128 + ((fChunk ^ (fRow & 7)) << 4));
  auto loadFT = [&](unsigned dst, const void* srcV) {
    const char* g = static_cast<const char*>(srcV);
#pragma unroll
    for (int kk = 0; kk < (D + FR - 1) / FR; ++kk) {
      if (D % FR != 0 && kk * FR + fRow >= D) break;
      cpAsync16(dst + fOff + unsigned(kk * FR * 128), g, true);
      g += (long long)FR * p.featLd * 2;
    }
  };
  using QRows = std::integral_constant<int, BQ>;
  using KRows = std::integral_constant<int, BK>;

  const long long kStepB = (long long)LR * p.kvStride * 2, kTileB = (long long)BK * p.kvStride * 2;
  const long long fStepB = (long long)LR * D * 2, fTileB = Wg ? (long long)BK * 2 : (long long)BK * D * 2;
  const char* ldK = reinterpret_cast<const char*>(gK + (long long)(nKT - 1) * BK * p.kvStride + (long long)ldRow * p.kvStride + ldChunk * 8);
  const char* ldF = Wg ? reinterpret_cast<const char*>(p.feat + (long long)fRow * p.featLd + (nKT - 1) * BK + fChunk * 8)
                       : reinterpret_cast<const char*>(p.feat + (long long)((nKT - 1) * BK + ldRow) * D + ldChunk * 8);
  loadTile(smemAddr(sQ), gQ + (long long)(q0 + ldRow) * p.qStride + ldChunk * 8, gQ, (long long)LR * p.qStride * 2, q0, QRows{});
  loadTile(smemAddr(sK), ldK, gK, kStepB, (nKT - 1) * BK, KRows{});
  if constexpr (Wg) loadFT(smemAddr(sF), ldF);
  else loadTile(smemAddr(sF), ldF, p.feat, fStepB, (nKT - 1) * BK, KRows{});
  cpCommit();

  const int sw = lane & 7;
  const int aRow = warp * RW + (lane & 7) + ((lane >> 3) & 1) * 8;
  const int aHi = lane >> 4;
  const int kRow = (lane & 7) + (lane >> 4) * 8;
  const int kHi = (lane >> 3) & 1;
  const int vRow = (lane & 7) + ((lane >> 3) & 1) * 8;
  const int vHi = lane >> 4;
  const unsigned sQa = smemAddr(sQ), sKa = smemAddr(sK), sFa = smemAddr(sF);
  unsigned qBase[4], kBase4[4], fBase4[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    qBase[i] = sQa + unsigned((aRow * D + (((2 * i + aHi) ^ sw) * 8)) * 2);
    kBase4[i] = sKa + unsigned((kRow * D + (((2 * i + kHi) ^ sw) * 8)) * 2);
    fBase4[i] = sFa + unsigned((vRow * D + (((2 * i + vHi) ^ sw) * 8)) * 2);
  }

  float cacc[MT][DB][4];
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int d = 0; d < DB; ++d) cacc[m][d][0] = cacc[m][d][1] = cacc[m][d][2] = cacc[m][d][3] = 0.f;
  // Per row (two per lane per m-tile), per-lane partials over the lane's columns. mRow: the running max of
  // the scaled scores (online), or (Exact) the row's lse·log2e, the fixed base of x = log2 p.
  // eRow: Σp·x in two partial sums per row (even / odd key columns: half the dependent-FMA chain per tile).
  // hAcc: the row's mass in the bin hBin[m] of the far single-bin tiles so far (quad 0; flushed to sHist when
  // the bin changes: far tiles come in order of growing Δ).
  float mRow[MT][2], lRow[MT][2], eRow[MT][2][2], s1Row[MT][2], s2Row[MT][2], hAcc[MT][2];
  int hBin[MT];
  const float sl2 = p.scaleLog2;
  const int warpRow0 = q0 + warp * RW;
  const int ql = lane & 3;
  // The far tiles' aux features [BK keys][8 columns]: 1, c', c'², then 0 (c' = c − BK/2), read with ldmatrix.
  for (int i = tid; i < BK * 8; i += NT) {
    const float c = float(i / 8 - BK / 2);
    const int n = i % 8;
    sAux[i] = __float2half_rn(n == 0 ? 1.f : n == 1 ? c : n == 2 ? c * c : 0.f);
  }
  const unsigned auxAddr = smemAddr(sAux) + unsigned(lane * 16);  // ldmatrix row = key (lane), 16 bytes each
  const float* lseRow = nullptr;
  if constexpr (Exact) {
    const int b = rowStart / p.T;  // a sequence lies in one batch row (varlen: B = 1)
    lseRow = p.lse + ((long long)b * p.H + h) * p.T + (rowStart - b * p.T);
  }
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      if constexpr (Exact) {
        // In shared memory rather than registers (read once per tile): BK = 64 fits the register file.
        const int lr = warp * RW + m * 16 + (lane >> 2) + 8 * r;
        if (ql == 0) sLse[lr] = q0 + lr < len ? __ldg(lseRow + q0 + lr) * kLog2e : 0.f;  // past the end: any finite base
      } else {
        mRow[m][r] = -INFINITY;
      }
      lRow[m][r] = eRow[m][r][0] = eRow[m][r][1] = s1Row[m][r] = s2Row[m][r] = hAcc[m][r] = 0.f;
      hBin[m] = -1;
    }

  // Two barriers per tile (the prefetch goes out before the wait; one barrier per tile with the prefetch after
  // it was 4% slower at BK = 64: run 4 of session 3).
  for (int it = 0; it < nKT; ++it) {
    const int j = nKT - 1 - it;
    const int stage = it & 1;
    if constexpr (OneK) {
      cpWait<0>();
    } else if (it + 1 < nKT) {
      ldK -= kTileB;
      ldF -= fTileB;
      loadFull(smemAddr(sK + (stage ^ 1) * BK * D), ldK, kStepB);
      if constexpr (Wg) loadFT(smemAddr(sF + (stage ^ 1) * BK * D), ldF);
      else loadFull(smemAddr(sF + (stage ^ 1) * BK * D), ldF, fStepB);
      cpCommit();
      cpWait<1>();
    } else {
      cpWait<0>();
    }
    if constexpr (Wg) wg::fenceProxy();
    __syncthreads();
    const int key0 = j * BK;
    // wgmma is a warpgroup instruction: a warp above the tile still joins its group's products (with P = 0).
    const bool warpActive = key0 <= warpRow0 + RW - 1;
    const bool groupActive = Wg ? key0 <= q0 + (warp >> 2) * 64 + 63 : warpActive;
    if (groupActive) {
      float s[MT][NB][4];
      const unsigned stageOff = unsigned(stage * BK * D * 2);
      if constexpr (Wg) {
        const unsigned qA = sQa + unsigned((warp >> 2) * 64 * 128), kB = sKa + (OneK ? 0u : stageOff);
        wg::fence();
#pragma unroll
        for (int ks = 0; ks < KS; ++ks)
          wg::qk<E>(s[0], wg::desc(qA + unsigned((ks >> 2) * BQ * 128 + (ks & 3) * 32)),
                    wg::desc(kB + unsigned((ks >> 2) * BK * 128 + (ks & 3) * 32)), ks);
        wg::commit();
        wg::wait0();
        wg::pin(s[0]);
        if constexpr (OneK) {  // (groupActive holds for every tile of a one-warpgroup CTA: the barrier is uniform)
          __syncthreads();     // every warp's share of QKᵀ is done: the K buffer is free
          if (it + 1 < nKT) {
            ldK -= kTileB;
            ldF -= fTileB;
            loadFull(smemAddr(sK), ldK, kStepB);
            loadFT(smemAddr(sF + (stage ^ 1) * BK * D), ldF);  // last read by the previous tile's P·F, done before the top barrier
            cpCommit();
          }
        }
      } else {
#pragma unroll
      for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int n = 0; n < NB; ++n) s[m][n][0] = s[m][n][1] = s[m][n][2] = s[m][n][3] = 0.f;
#pragma unroll
      for (int ks = 0; ks < KS; ++ks) {
        unsigned a[MT][4];
#pragma unroll
        for (int m = 0; m < MT; ++m) ldsm4(a[m], qBase[ks & 3] + unsigned(m * 16 * D * 2 + (ks >> 2) * 128));
#pragma unroll
        for (int n2 = 0; n2 < NB / 2; ++n2) {
          unsigned b[4];
          ldsm4(b, kBase4[ks & 3] + stageOff + unsigned(n2 * 16 * D * 2 + (ks >> 2) * 128));
#pragma unroll
          for (int m = 0; m < MT; ++m) {
            mmaQK<E>(s[m][2 * n2], a[m], b[0], b[1]);
            mmaQK<E>(s[m][2 * n2 + 1], a[m], b[2], b[3]);
          }
        }
      }
      }
      unsigned pa[MT][BK / 16][4];  // P in fp16 as A fragments
      if (!warpActive) {  // Wg only: every key of the tile lies after the warp's rows
#pragma unroll
        for (int kk = 0; kk < BK / 16; ++kk) pa[0][kk][0] = pa[0][kk][1] = pa[0][kk][2] = pa[0][kk][3] = 0u;
      } else {  // (the m-tile loop below is the mma.sync path's, unchanged)
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        const int mRow0 = warpRow0 + m * 16;
        const bool crossing = key0 + BK - 1 > mRow0;
        if (crossing) {
          const int r0 = mRow0 + (lane >> 2);
#pragma unroll
          for (int n = 0; n < NB; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int key = key0 + n * 8 + ql * 2 + (e & 1);
              if (key > r0 + (e >> 1) * 8) s[m][n][e] = -INFINITY;
            }
        }
        float base[2], alpha[2] = {1.f, 1.f}, rs[2] = {0.f, 0.f};
        if constexpr (Exact) {
          base[0] = sLse[mRow0 - q0 + (lane >> 2)];
          base[1] = sLse[mRow0 - q0 + (lane >> 2) + 8];
        } else {
          float mx[2] = {mRow[m][0], mRow[m][1]};
#pragma unroll
          for (int n = 0; n < NB; ++n) {
            mx[0] = fmaxf(mx[0], fmaxf(s[m][n][0], s[m][n][1]));
            mx[1] = fmaxf(mx[1], fmaxf(s[m][n][2], s[m][n][3]));
          }
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
            base[r] = mx[r] == -INFINITY ? 0.f : mx[r] * sl2;
            const float dlog = mRow[m][r] * sl2 - base[r];  // log2 alpha; −inf while nothing was seen
            alpha[r] = ex2(dlog);
            // Every old term p·x becomes (αp)(x + dlog).
            eRow[m][r][0] = mRow[m][r] == -INFINITY ? 0.f : alpha[r] * fmaf(dlog, lRow[m][r], eRow[m][r][0]);
            eRow[m][r][1] *= alpha[r];
            hAcc[m][r] *= alpha[r];
            lRow[m][r] *= alpha[r];
            s1Row[m][r] *= alpha[r];
            s2Row[m][r] *= alpha[r];
            mRow[m][r] = mx[r];
          }
        }
        // Δ = τ − σ for element (n, e): dBase[e >> 1] − c, c = 8n + (e & 1) (a compile-time constant).
        const float dBase[2] = {float(mRow0 + (lane >> 2) - key0 - ql * 2), float(mRow0 + (lane >> 2) + 8 - key0 - ql * 2)};
        const bool near = mRow0 - key0 < C::KNear;
        if (near) {
          // Near the diagonal: Δ per element (exact small integers; no cancellation for local heads).
#pragma unroll
          for (int n = 0; n < NB; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int r = e >> 1;
              const float x = fmaf(s[m][n][e], sl2, -base[r]);
              const float pe = ex2(x);
              rs[r] += pe;
              if (crossing) eRow[m][r][e & Spare] += pe > 0.f ? pe * x : 0.f;  // masked: x = −inf, p = 0
              else eRow[m][r][e & Spare] = fmaf(pe, x, eRow[m][r][e & Spare]);
              const float dl = dBase[r] - float(n * 8 + (e & 1));
              const float pd = pe * dl;
              s1Row[m][r] += pd;
              s2Row[m][r] = fmaf(pd, dl, s2Row[m][r]);
              s[m][n][e] = pe;
            }
        } else {
          // Far (Δ ≥ kNear − BK + 1): per element only p and p·x; Σp, Σp·c', Σp·c'² come from the aux product.
#pragma unroll
          for (int n = 0; n < NB; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const float x = fmaf(s[m][n][e], sl2, -base[e >> 1]);
              const float pe = ex2(x);
              eRow[m][e >> 1][e & Spare] = fmaf(pe, x, eRow[m][e >> 1][e & Spare]);
              s[m][n][e] = pe;
            }
        }
        if (key0 == 0 && ql == 0) {  // σ = 0 is element (n 0, e 0 / 2) of lane quad 0; tile 0 comes last
          const int lr = mRow0 - q0 + (lane >> 2);
          sZ[lr] = s[m][0][0];
          sZ[lr + 8] = s[m][0][2];
        }
        // P in fp16, once: the A fragments of the aux and φ products (two adjacent n-blocks per 16 keys).
#pragma unroll
        for (int kk = 0; kk < BK / 16; ++kk) {
          pa[m][kk][0] = packHalf(s[m][2 * kk][0], s[m][2 * kk][1]);
          pa[m][kk][1] = packHalf(s[m][2 * kk][2], s[m][2 * kk][3]);
          pa[m][kk][2] = packHalf(s[m][2 * kk + 1][0], s[m][2 * kk + 1][1]);
          pa[m][kk][3] = packHalf(s[m][2 * kk + 1][2], s[m][2 * kk + 1][3]);
        }
        if (!near) {
          // Aux columns [1, c', c'²] (c' = c − BK/2, exact in fp16): lane quad 0 gets Σp, Σp·c' of its two rows,
          // quad 1 gets Σp·c'². Σ pΔ = dc·Σp − Σpc', Σ pΔ² = dc(dc·Σp − 2Σpc') + Σpc'² with dc = dBase − BK/2
          // (relative rounding ≲ 3 ulp: Δ ≥ kNear − BK + 1 here). Lanes add what their role says; the quad
          // sums at the end.
          float ax[4] = {0.f, 0.f, 0.f, 0.f}, ay[4] = {0.f, 0.f, 0.f, 0.f};  // two chains: half the latency
#pragma unroll
          for (int k2 = 0; k2 < BK / 32; ++k2) {  // 32 keys per ldmatrix.x4: B fragments of two 16-key steps
            unsigned b[4];
            ldsm4t(b, auxAddr + unsigned(k2 * 32 * 16));
            mmaF16(ax, pa[m][2 * k2], b[0], b[1]);
            if constexpr (Spare) mmaF16(ay, pa[m][2 * k2 + 1], b[2], b[3]);
            else mmaF16(ax, pa[m][2 * k2 + 1], b[2], b[3]);
          }
          if constexpr (Spare) {
#pragma unroll
            for (int i = 0; i < 4; ++i) ax[i] += ay[i];
          }
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const float dc = dBase[r] + float(ql * 2 - BK / 2);  // dBase of lane quad 0
            const float sum = ax[2 * r], sc = ax[2 * r + 1];
            if (ql == 0) {  // Σp, Σpc' (the row sum also feeds the histogram's tail below, read on quad 0)
              rs[r] = sum;
              s1Row[m][r] += fmaf(dc, sum, -sc);
              s2Row[m][r] = fmaf(dc, fmaf(dc, sum, -2.f * sc), s2Row[m][r]);
            } else if (ql == 1) {  // Σpc'²
              s2Row[m][r] += sum;
            }
          }
        }
        const int lr0 = mRow0 - q0 + (lane >> 2);  // this lane's rows in the CTA: lr0, lr0 + 8
        lRow[m][0] += rs[0];
        lRow[m][1] += rs[1];
        if constexpr (!Exact) {
          if (__any_sync(0xffffffffu, alpha[0] < 1.f || alpha[1] < 1.f)) {  // most tiles leave every row max alone
#pragma unroll
            for (int d = 0; d < DB; ++d) {
              cacc[m][d][0] *= alpha[0];
              cacc[m][d][1] *= alpha[0];
              cacc[m][d][2] *= alpha[1];
              cacc[m][d][3] *= alpha[1];
            }
          }
        }
        // Histogram: rows of this m-tile span Δ ∈ [max(0, mRow0 − key0 − BK + 1), mRow0 + 15 − key0].
        const int bLo = binOf(max(0, mRow0 - key0 - BK + 1)), bHi = binOf(mRow0 + 15 - key0);
        if (!Exact && ql == 0) {
#pragma unroll
          for (int r = 0; r < 2; ++r)
            if (alpha[r] < 1.f)
              for (int b = 0; b < kBins; ++b) sHist[b * BQ + lr0 + 8 * r] *= alpha[r];
        }
        if (Spare && !near && bLo == bHi) {  // every far tile but the few crossing a bin edge: registers only
          if (bLo != hBin[m]) {
            if (hBin[m] >= 0 && ql == 0) {
              sHist[hBin[m] * BQ + lr0] += hAcc[m][0];
              sHist[hBin[m] * BQ + lr0 + 8] += hAcc[m][1];
            }
            hAcc[m][0] = hAcc[m][1] = 0.f;
            hBin[m] = bLo;
          }
          hAcc[m][0] += rs[0];  // the row sum on quad 0, 0 elsewhere
          hAcc[m][1] += rs[1];
        } else if constexpr (C::Tails == 4) {
          // Full-row prefix sums of the fp16 p over the tile's keys on the tensor cores: P·U with U[k][j] = [k ≤ j]
          // (blocks below the diagonal all ones, the diagonal 16×8 blocks one per-lane pattern, blocks above
          // skipped: 10 m16n8k16 per 32 keys), so row g's (g + 8's) prefix through key j sits in the lane of quad
          // position (j & 7) >> 1, n-block j >> 3, slot j & 1. Each edge's tail Σ_{Δ ≥ 2^{b−1}} p is the prefix
          // at one key and only the lane holding it adds it (to bin b, and subtracts it from bin b − 1): no
          // shuffles, no chain through the quad.
          constexpr unsigned kOnes = 0x3C003C00u;  // fp16 (1, 1)
          const int g = lane >> 2;
          const unsigned uDiag = packHalf(2 * ql <= g ? 1.f : 0.f, 2 * ql + 1 <= g ? 1.f : 0.f);
          // Row r of this lane (g + 8r): Δ at the tile's key 0.
          const int dr[2] = {int(dBase[0]) + 2 * ql, int(dBase[1]) + 2 * ql};
          constexpr int HN = NB / 2;  // n-blocks per half: the prefix in two halves of the keys (16 registers each)
#pragma unroll
          for (int hf = 0; hf < 2; ++hf) {
            float pf[HN][4];
#pragma unroll
            for (int i = 0; i < HN; ++i) {
              const int nb = hf * HN + i;
              pf[i][0] = pf[i][1] = pf[i][2] = pf[i][3] = 0.f;
#pragma unroll
              for (int ks = 0; ks <= nb / 2; ++ks) {
                if (2 * ks == nb) mmaF16(pf[i], pa[m][ks], uDiag, 0u);           // keys 16ks + 0..7 ≤ col 16ks + g
                else if (2 * ks + 1 == nb) mmaF16(pf[i], pa[m][ks], kOnes, uDiag);  // col 16ks + 8 + g
                else mmaF16(pf[i], pa[m][ks], kOnes, kOnes);
              }
            }
            if (hf == 1 && ql == 3) {  // key BK − 1: the whole tile (mass with Δ ≥ its lowest edge) → bin bLo
#pragma unroll
              for (int r = 0; r < 2; ++r) sHist[bLo * BQ + lr0 + 8 * r] += pf[HN - 1][2 * r + 1];
            }
            for (int b = bLo + 1; b <= bHi; ++b) {  // warp-uniform
#pragma unroll
              for (int r = 0; r < 2; ++r) {
                const int cut = dr[r] - (1 << (b - 1));  // Δ ≥ 2^{b−1} ⟺ key ≤ cut
                const int cc = min(cut, BK - 1);
                float v[2 * HN];
#pragma unroll
                for (int i = 0; i < HN; ++i) {
                  v[2 * i] = pf[i][2 * r];
                  v[2 * i + 1] = pf[i][2 * r + 1];
                }
                const float t = selectAt(v, 2 * ((cc >> 3) & (HN - 1)) + (cc & 1));
                if (cut >= 0 && cc / (BK / 2) == hf && ((cc >> 1) & 3) == ql) {
                  sHist[(b - 1) * BQ + lr0 + 8 * r] -= t;
                  sHist[b * BQ + lr0 + 8 * r] += t;
                }
              }
            }
          }
        } else if constexpr (C::Tails == 0) {
          float tail[2] = {rs[0], rs[1]};  // far: already the row sum on quad 0 (the only lanes that write)
          if (near) {
#pragma unroll
            for (int r = 0; r < 2; ++r) {
              tail[r] += __shfl_xor_sync(0xffffffffu, tail[r], 1);
              tail[r] += __shfl_xor_sync(0xffffffffu, tail[r], 2);
            }
          }
          for (int b = bLo + 1; b <= bHi + 1; ++b) {  // warp-uniform
            float next[2] = {0.f, 0.f};
            if (b <= bHi) {
              const float th = float(1 << (b - 1));  // mass with Δ ≥ 2^{b−1} lies in bins ≥ b
#pragma unroll
              for (int n = 0; n < NB; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                  const float dl = dBase[e >> 1] - float(n * 8 + (e & 1));
                  next[e >> 1] += dl >= th ? packedP(pa[m], n, e) : 0.f;  // fp16 p: s is dead by now
                }
#pragma unroll
              for (int r = 0; r < 2; ++r) {
                next[r] += __shfl_xor_sync(0xffffffffu, next[r], 1);
                next[r] += __shfl_xor_sync(0xffffffffu, next[r], 2);
              }
            }
            if (ql == 0) {
#pragma unroll
              for (int r = 0; r < 2; ++r) sHist[(b - 1) * BQ + lr0 + 8 * r] += tail[r] - next[r];
            }
            tail[0] = next[0];
            tail[1] = next[1];
          }
        }
      }
      }
      // C += P F on fp16 (P rounded to fp16, F an fp16 table).
      if constexpr (Wg) {
        wg::fence();
#pragma unroll
        for (int kk = 0; kk < BK / 16; ++kk) wg::pf(cacc[0], pa[0][kk], wg::desc(sFa + stageOff + unsigned(kk * 32)));
        wg::commit();
        wg::wait0();
        wg::pin(cacc[0]);
      } else {
#pragma unroll
        for (int kk = 0; kk < BK / 16; ++kk) {
#pragma unroll
          for (int d2 = 0; d2 < DB / 2; ++d2) {
            unsigned b[4];
            ldsm4t(b, fBase4[d2 & 3] + stageOff + unsigned(kk * 16 * D * 2 + (d2 >> 2) * 128));
#pragma unroll
            for (int m = 0; m < MT; ++m) {
              mmaF16(cacc[m][2 * d2], pa[m][kk], b[0], b[1]);
              mmaF16(cacc[m][2 * d2 + 1], pa[m][kk], b[2], b[3]);
            }
          }
        }
      }
    }
    if constexpr (!OneK) __syncthreads();
  }
#pragma unroll
  for (int m = 0; m < MT; ++m)
    if (hBin[m] >= 0 && ql == 0) {
      const int lr0 = warp * RW + m * 16 + (lane >> 2);
      sHist[hBin[m] * BQ + lr0] += hAcc[m][0];
      sHist[hBin[m] * BQ + lr0 + 8] += hAcc[m][1];
    }

  // ---- Finalise rows and sum them over the CTA (fixed order). ----
  float* sRed = reinterpret_cast<float*>(smem);  // sQ is free now: [W][kScalars + D]
  constexpr int RS = 4 + D;                      // per warp: dist, distSq, entropy, sink, then φ (Re, Im per pair)
  float scal[4] = {0.f, 0.f, 0.f, 0.f};
  float phiAcc[HB][2][2];
#pragma unroll
  for (int d = 0; d < HB; ++d) phiAcc[d][0][0] = phiAcc[d][0][1] = phiAcc[d][1][0] = phiAcc[d][1][1] = 0.f;
#pragma unroll
  for (int m = 0; m < MT; ++m) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float l = lRow[m][r], e = eRow[m][r][0] + eRow[m][r][1], s1 = s1Row[m][r], s2 = s2Row[m][r];
#pragma unroll
      for (int off = 1; off <= 2; off <<= 1) {
        l += __shfl_xor_sync(0xffffffffu, l, off);
        e += __shfl_xor_sync(0xffffffffu, e, off);
        s1 += __shfl_xor_sync(0xffffffffu, s1, off);
        s2 += __shfl_xor_sync(0xffffffffu, s2, off);
      }
      const int lr = warp * RW + m * 16 + (lane >> 2) + 8 * r;  // row within the CTA
      const int tau = q0 + lr;
      const bool valid = tau < len;
      const float inv = valid ? 1.f / l : 0.f;
      if (ql == 0) sL[lr] = inv;  // 1/l (0: row not counted) for the histogram below
      if (valid && ql == 0) {
        scal[0] += s1 * inv;
        scal[1] += s2 * inv;
        scal[2] += logf(l) - kLn2 * e * inv;
        scal[3] += sZ[lr] * inv;  // written by this lane in tile 0
      }
      if (valid) {
        const float2* tr = p.trig + (long long)tau * p.half;
#pragma unroll
        for (int d = 0; d < HB; ++d)
#pragma unroll
          for (int e1 = 0; e1 < 2; ++e1) {
            const int jj = d * 8 + ql * 2 + e1;
            if (jj < p.half) {
              const float2 ct = tr[jj];
              const float cc = cacc[m][d][2 * r + e1], sn = cacc[m][d + HB][2 * r + e1];
              phiAcc[d][e1][0] = fmaf(fmaf(ct.x, cc, ct.y * sn), inv, phiAcc[d][e1][0]);
              phiAcc[d][e1][1] = fmaf(fmaf(ct.y, cc, -ct.x * sn), inv, phiAcc[d][e1][1]);
            }
          }
      }
    }
  }
  // Sum over the warp's row groups (lanes with the same lane & 3 hold the same columns).
#pragma unroll
  for (int off = 4; off <= 16; off <<= 1) {
#pragma unroll
    for (int i = 0; i < 4; ++i) scal[i] += __shfl_xor_sync(0xffffffffu, scal[i], off);
#pragma unroll
    for (int d = 0; d < HB; ++d)
#pragma unroll
      for (int e1 = 0; e1 < 2; ++e1) {
        phiAcc[d][e1][0] += __shfl_xor_sync(0xffffffffu, phiAcc[d][e1][0], off);
        phiAcc[d][e1][1] += __shfl_xor_sync(0xffffffffu, phiAcc[d][e1][1], off);
      }
  }
  if (lane < 4) {
    float* out = sRed + warp * RS;
    if (lane == 0)
#pragma unroll
      for (int i = 0; i < 4; ++i) out[i] = scal[i];
#pragma unroll
    for (int d = 0; d < HB; ++d)
#pragma unroll
      for (int e1 = 0; e1 < 2; ++e1) {
        const int jj = d * 8 + lane * 2 + e1;  // < D/2
        out[4 + 2 * jj] = phiAcc[d][e1][0];
        out[4 + 2 * jj + 1] = phiAcc[d][e1][1];
      }
  }
  __syncthreads();
  // Histogram: Σ_rows hist_b(row) / l(row); warp w takes bins w, w + W, ….
  float* sHistTot = sRed + W * RS;  // [kBins]
  for (int b = warp; b < kBins; b += W) {
    float acc = 0.f;
    for (int r = lane; r < BQ; r += 32) acc += sHist[b * BQ + r] * sL[r];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if (lane == 0) sHistTot[b] = acc;
  }
  __syncthreads();
  double* out = p.partial + (long long)blockIdx.x * p.R;
  for (int i = tid; i < p.R; i += NT) {
    double v = 0;
    if (i < kScalars) {
      if (i == kLocal) {
        for (int b = 0; b < kLocalBins; ++b) v += double(sHistTot[b]);
      } else {
        const int src = i < kLocal ? i : i - 1;  // sRed scalars: dist, distSq, entropy, sink
        for (int w = 0; w < W; ++w) v += double(sRed[w * RS + src]);
      }
    } else if (i < kScalars + kBins) {
      v = double(sHistTot[i - kScalars]);
    } else {
      for (int w = 0; w < W; ++w) v += double(sRed[w * RS + 4 + (i - kScalars - kBins)]);
    }
    out[i] = v;
  }
}

// Σ over the CTAs into attention [H,5], histogram [H,bins], phi [H,2·half]. One block per (head, 32 columns):
// thread (column x, group g) sums the work items g, g + kGroups, … in order, then group 0 adds the kGroups
// sums in order — a fixed order (bit-identical repeats) with kGroups times the loads in flight of one thread
// per column walking all items (that took ~items dependent-latency steps: 256 at the bench shape).
constexpr int kGroups = 8;
__global__ void __launch_bounds__(32 * kGroups) reducePartials(const double* __restrict__ partial, int items, int H, int R,
                                                              double* __restrict__ attention, double* __restrict__ histogram,
                                                              double* __restrict__ phi) {
  __shared__ double part[kGroups][32];
  const int chunks = (R + 31) / 32;
  const int h = int(blockIdx.x) / chunks, r = (int(blockIdx.x) % chunks) * 32 + int(threadIdx.x % 32);
  const int g = int(threadIdx.x / 32);
  double s = 0;
  if (r < R)
    for (int it = g; it < items; it += kGroups) s += partial[((long long)it * H + h) * R + r];
  part[g][threadIdx.x % 32] = s;
  __syncthreads();
  if (g != 0 || r >= R) return;
  s = 0;
#pragma unroll
  for (int i = 0; i < kGroups; ++i) s += part[i][threadIdx.x];
  if (r < kScalars) attention[h * kAttentionColumns + r] += s;
  else if (r < kScalars + kBins) histogram[h * kBins + (r - kScalars)] += s;
  else phi[(long long)h * (R - kScalars - kBins) + (r - kScalars - kBins)] += s;
}

// The fp16 position feature of position σ and column c: cos θ_j σ for c = j < Dp/2, sin θ_j σ for c = Dp/2 + j
// (f64 arguments), 0 for j ≥ half.
__device__ __forceinline__ __half featureValue(const double* __restrict__ theta, int sigma, int c, int half, int Dp) {
  const int hp = Dp / 2, j = c < hp ? c : c - hp;
  float v = 0.f;
  if (j < half) {
    double sn, cs;
    sincos(theta[j] * double(sigma), &sn, &cs);
    v = float(c < hp ? cs : sn);
  }
  return __float2half_rn(v);
}

// feat[σ, c] for σ < maxLen.
__global__ void featureTable(__half* __restrict__ feat, const double* __restrict__ theta, int maxLen, int half, int Dp) {
  const long long n = (long long)maxLen * Dp;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
    feat[i] = featureValue(theta, int(i / Dp), int(i % Dp), half, Dp);
}

// Wg: featT[c, σ] = feat[σ, c] for σ < featLd (a multiple of the key tile; entries past the longest sequence are
// finite and meet only masked probabilities).
__global__ void featureTableT(__half* __restrict__ featT, const double* __restrict__ theta, int featLd, int half, int Dp) {
  const long long n = (long long)featLd * Dp;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
    featT[i] = featureValue(theta, int(i % featLd), int(i / featLd), half, Dp);
}

// TCAL_MOMENTS_PROFILE=1: the statistics phase split into host set-up + feature table, the kernel, and the
// CTA sums (events; stderr), so the phase time of native/cuda/moments.cu can be read against the kernel alone.
struct StatsTimer {
  bool on = false;
  cudaStream_t stream;
  cudaEvent_t ev[4] = {};
  int n = 0;
  explicit StatsTimer(cudaStream_t s) : stream(s) {
    const char* e = std::getenv("TCAL_MOMENTS_PROFILE");
    on = e && *e && std::string(e) != "0";
    mark();
  }
  void mark() {
    if (!on || n >= 4) return;
    check(cudaEventCreate(&ev[n]), "cudaEventCreate");
    check(cudaEventRecord(ev[n], stream), "cudaEventRecord");
    ++n;
  }
  ~StatsTimer() {
    if (!on) return;
    if (n == 4 && cudaEventSynchronize(ev[3]) == cudaSuccess) {
      float t[3] = {};
      for (int i = 0; i < 3; ++i) cudaEventElapsedTime(&t[i], ev[i], ev[i + 1]);
      std::fprintf(stderr, "momentStats split (ms): setup %f kernel %f sums %f\n", t[0], t[1], t[2]);
    }
    for (int i = 0; i < n; ++i) cudaEventDestroy(ev[i]);
  }
};

template <typename E, typename C>
void runStats(const Problem& p, const void* q, const void* k, const float* lse, int Dp, const float2* trig,
              const std::vector<int2>& seqs, int maxLen, const Accumulators& acc, const Device dev, cudaStream_t stream) {
  constexpr int BQ = C::BQ;
  StatsTimer prof(stream);
  const int half = int(p.D / 2);
  std::vector<int4> list;
  for (const int2& s : seqs) {
    const int len = s.y - s.x;
    for (int t = 0; t * BQ < len; ++t) list.push_back(make_int4(s.x, len, t, 0));
  }
  std::stable_sort(list.begin(), list.end(), [](const int4& a, const int4& b) {
    return std::min((a.z + 1) * BQ, a.y) > std::min((b.z + 1) * BQ, b.y);
  });
  const long long items = (long long)list.size();
  if (items == 0) return;
  const long long blocks = items * p.H;
  if (blocks > INT32_MAX) throwInvalid("q", "too many query tiles for one launch");
  Tensor work = empty({items * 4}, DType::I32, dev);
  copyFromHost(work, list.data(), list.size() * sizeof(int4));
  std::vector<double> theta(p.invFreq);
  Tensor thetaD = empty({int64_t(half)}, DType::F64, dev);
  copyFromHost(thetaD, theta.data(), theta.size() * sizeof(double));
  const int featLd = (maxLen + C::BK - 1) / C::BK * C::BK;
  Tensor feat = empty({int64_t(C::Wg ? featLd : maxLen) * Dp}, DType::F16, dev);
  if constexpr (C::Wg)
    featureTableT<<<gridFor(int64_t(featLd) * Dp, 256), 256, 0, stream>>>(reinterpret_cast<__half*>(feat.data()), thetaD.ptr<double>(),
                                                                         featLd, half, Dp);
  else
    featureTable<<<gridFor(int64_t(maxLen) * Dp, 256), 256, 0, stream>>>(reinterpret_cast<__half*>(feat.data()), thetaD.ptr<double>(),
                                                                        maxLen, half, Dp);
  checkLaunch("taylorMoments (feature table)");
  const int R = kScalars + kBins + 2 * half;
  Tensor partial = empty({blocks * R}, DType::F64, dev);
  StatParams prm{};
  prm.q = q;
  prm.k = k;
  prm.feat = reinterpret_cast<const __half*>(feat.data());
  prm.featLd = featLd;
  prm.trig = trig;
  prm.work = reinterpret_cast<const int4*>(work.data());
  prm.lse = lse;
  prm.T = int(p.T);
  prm.partial = partial.ptr<double>();
  prm.qStride = p.H * Dp;
  prm.kvStride = p.HKV * Dp;
  prm.H = int(p.H);
  prm.group = int(p.group());
  prm.half = half;
  prm.R = R;
  prm.scaleLog2 = float(p.scale * double(kLog2e));
  const size_t smem = C::smem();
  auto kern = lse ? momentStats<E, C, true> : momentStats<E, C, false>;
  check(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)), "cudaFuncSetAttribute");
  if constexpr (C::Wg)  // all of the SM's shared memory (three 72-KB CTAs for OneK)
    check(cudaFuncSetAttribute(kern, cudaFuncAttributePreferredSharedMemoryCarveout, int(cudaSharedmemCarveoutMaxShared)),
          "cudaFuncSetAttribute");
  prof.mark();
  kern<<<unsigned(blocks), C::W * 32, smem, stream>>>(prm);
  checkLaunch("taylorMoments (tensor-core statistics)");
  prof.mark();
  reducePartials<<<unsigned(p.H * ((R + 31) / 32)), 32 * kGroups, 0, stream>>>(partial.ptr<double>(), int(items), int(p.H), R,
                                                                            acc.attention.ptr<double>(), acc.histogram.ptr<double>(),
                                                                            acc.phi.ptr<double>());
  checkLaunch("taylorMoments (statistics sums)");
  prof.mark();
}

template <typename E>
void runStatsFor(const Problem& p, const void* q, const void* k, const float* lse, int Dp, const float2* trig,
                 const std::vector<int2>& seqs, int maxLen, const Accumulators& acc, Device dev, cudaStream_t stream) {
  if (Dp == 64) runStats<E, Cfg64>(p, q, k, lse, Dp, trig, seqs, maxLen, acc, dev, stream);
  else if (Dp == 128) {
    const char* variant = std::getenv("TCAL_MOMENTS_KERNEL");
    const std::string v = variant ? variant : "";
    if (v == "bk32") return runStats<E, Cfg128bk32>(p, q, k, lse, Dp, trig, seqs, maxLen, acc, dev, stream);
    if (v == "edges") return runStats<E, Cfg128edges>(p, q, k, lse, Dp, trig, seqs, maxLen, acc, dev, stream);
    if (v != "mtail" && hasWgmma(dev, stream)) {
      if constexpr (std::is_same_v<E, __nv_bfloat16>) {  // the other shapes, for the same-run comparison (bench dtype only)
        if (v == "wg2") return runStats<E, Cfg128wg2>(p, q, k, lse, Dp, trig, seqs, maxLen, acc, dev, stream);
        if (v == "wg1k") return runStats<E, Cfg128wg1k>(p, q, k, lse, Dp, trig, seqs, maxLen, acc, dev, stream);
      }
      return runStats<E, Cfg128wg1>(p, q, k, lse, Dp, trig, seqs, maxLen, acc, dev, stream);
    }
    runStats<E, Cfg128>(p, q, k, lse, Dp, trig, seqs, maxLen, acc, dev, stream);
  }
  else runStats<E, Cfg256>(p, q, k, lse, Dp, trig, seqs, maxLen, acc, dev, stream);
}

}  // namespace

void momentStatsTensorCore(const Problem& p, const Tensor& q, const Tensor& k, const Tensor& lse, const float2* trig,
                           const std::vector<int2>& seqs, int maxLen, const Accumulators& acc, cudaStream_t stream) {
  if (seqs.empty()) return;
  const Device dev = q.device();
  const int64_t D = p.D, Dp = D <= 64 ? 64 : D <= 128 ? 128 : 256;
  if (D > 256) throwInvalid("q", "the tensor-core moment pass takes head dims up to 256");
  const void* qp = q.data();
  const void* kp = k.data();
  Tensor qPad, kPad;
  if (Dp != D) {
    // Zero-padded head dims leave every score unchanged; the padded feature columns are 0.
    const size_t elem = dtypeSize(q.dtype());
    const int64_t rows = p.tokens();
    qPad = empty({rows * p.H * Dp}, q.dtype(), dev);
    kPad = empty({rows * p.HKV * Dp}, q.dtype(), dev);
    check(cudaMemsetAsync(qPad.data(), 0, qPad.nbytes(), stream), "cudaMemsetAsync");
    check(cudaMemsetAsync(kPad.data(), 0, kPad.nbytes(), stream), "cudaMemsetAsync");
    check(cudaMemcpy2DAsync(qPad.data(), size_t(Dp) * elem, q.data(), size_t(D) * elem, size_t(D) * elem, size_t(rows * p.H),
                            cudaMemcpyDeviceToDevice, stream),
          "cudaMemcpy2DAsync");
    check(cudaMemcpy2DAsync(kPad.data(), size_t(Dp) * elem, k.data(), size_t(D) * elem, size_t(D) * elem, size_t(rows * p.HKV),
                            cudaMemcpyDeviceToDevice, stream),
          "cudaMemcpy2DAsync");
    qp = qPad.data();
    kp = kPad.data();
  }
  const float* lp = lse.defined() ? lse.ptr<float>() : nullptr;
  if (q.dtype() == DType::BF16) runStatsFor<__nv_bfloat16>(p, qp, kp, lp, int(Dp), trig, seqs, maxLen, acc, dev, stream);
  else if (q.dtype() == DType::F16) runStatsFor<__half>(p, qp, kp, lp, int(Dp), trig, seqs, maxLen, acc, dev, stream);
  else throwInvalid("q", "the tensor-core moment pass takes bf16 or f16");
}

// wgmma.cuh: whether this build runs sm_90a code on the device, one probe per device.
namespace {
__global__ void wgmmaProbe(int* out) {
#ifdef TCAL_WGMMA
  *out = 1;
#else
  *out = 0;
#endif
}
}  // namespace
bool hasWgmma(Device dev, cudaStream_t stream) {
  static std::atomic<int> known[64];  // 0 unknown, 1 no, 2 yes
  if (dev.index < 0 || dev.index >= 64) return false;
  int k = known[dev.index].load();
  if (k == 0) {
    Tensor flag = empty({1}, DType::I32, dev);
    wgmmaProbe<<<1, 1, 0, stream>>>(flag.ptr<int>());
    checkLaunch("sm_90a probe");
    check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
    int v = 0;
    copyToHost(&v, flag, sizeof(int));
    k = v ? 2 : 1;
    known[dev.index].store(k);
  }
  return k == 2;
}

}  // namespace tcal::cuda
