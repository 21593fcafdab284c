// Causal attention backward on the GPU (FlashAttention-2's algorithm, deterministic: no atomics).
//
// 1. rowDot: Dv[b,h,t] = Σ_d dO·o (f32), the softmax-Jacobian term of every query row.
// 2. bf16 / f16, dK/dV: one CTA of W warps per (key block of BKV = 16·W keys, KV head, sequence); each warp owns
//    16 keys and keeps their dK and dV (16 × D, fp32) in registers while the CTA walks every query block on or
//    below the diagonal for each query head of the GQA group (so the group's sum happens in registers). Per
//    query block of BQ rows, with Q and dO streamed through shared memory (cp.async, two stages):
//      Sᵀ = K Qᵀ, Pᵀ = exp2(Sᵀ·scale·log2e − lse·log2e), dPᵀ = V dOᵀ, dSᵀ = Pᵀ ∘ (dPᵀ − Dv),
//      dV += Pᵀ dO, dK += dSᵀ Q
//    on the tensor cores (mma.sync m16n8k16, fp32 accumulation; Pᵀ and dSᵀ go from the accumulators straight
//    into A fragments, as in the forward). D = 256 runs it twice (dV only, then dK only): both accumulators
//    would not fit in registers.
// 3. bf16 / f16, dQ: one CTA per (query block, head, sequence), the forward's layout: each warp owns 16 or 32
//    query rows and their dQ (fp32) in registers; K/V blocks stream through shared memory; S = Q Kᵀ, dP = dO Vᵀ,
//    dS = P ∘ (dP − Dv), dQ += dS K. Recomputing S and dP costs 2 of the 7 products (FA2 with atomics: 5) and
//    buys determinism.
// Shared-memory tiles use the forward's XOR swizzle (16-byte chunk c of row r at chunk c ^ (r & 7)), so every
// ldmatrix is conflict-free. f32: CUDA-core kernels, one warp per row, for parity tests.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <type_traits>
#include <vector>

#include "../core/runtime.h"
#include "attention_backward.h"
#include "check.h"
#include "device.h"
#include "mma.cuh"
#include "types.cuh"

namespace tcal::cuda {

namespace {

constexpr float kLog2e = 1.4426950408889634f;

using namespace ptx;  // mma.cuh

__device__ __forceinline__ float toF(float x) { return x; }
__device__ __forceinline__ float toF(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float toF(__half x) { return __half2float(x); }

// Per-lane ldmatrix bases for a swizzled [rows][D] tile. All rows a lane addresses are ≡ lane & 7 (mod 8), so
// the swizzle term is lane & 7 and chunk (2i + hi) ^ sw for k-step i is base[i & 3] + (i >> 2)·128 bytes.
//   A operand (16 rows × 16 k, rows at row0):        row (lane & 7) + ((lane >> 3) & 1)·8, hi = lane >> 4
//   B operand, not transposed (two n-blocks of 8):   row (lane & 7) + (lane >> 4)·8,       hi = (lane >> 3) & 1
//   B operand, transposed (k = rows, two n-blocks):  row (lane & 7) + ((lane >> 3) & 1)·8, hi = lane >> 4
enum class Frag { A, B, BT };
template <int D>
__device__ __forceinline__ void fragBases(unsigned (&base)[4], unsigned tile, int row0, Frag f, int lane) {
  const int sw = lane & 7;
  const int row = row0 + sw + (f == Frag::B ? (lane >> 4) : ((lane >> 3) & 1)) * 8;
  const int hi = f == Frag::B ? ((lane >> 3) & 1) : (lane >> 4);
#pragma unroll
  for (int i = 0; i < 4; ++i) base[i] = tile + unsigned((row * D + (((2 * i + hi) ^ sw) * 8)) * 2);
}
__device__ __forceinline__ unsigned kstep(const unsigned (&base)[4], int i) {
  return base[i & 3] + unsigned((i >> 2) * 128);
}

// ROWS × D elements of rows row0.. of a sequence (`seq` = its row 0 for this head, `stride` elements between
// rows) into a swizzled tile; rows ≥ len zero-filled. Thread t copies chunk t % DC of rows t / DC + k·LR.
template <typename E, int D, int NT, int ROWS>
__device__ __forceinline__ void loadTile(unsigned dst, const E* seq, long long stride, int row0, int len, int tid) {
  constexpr int DC = D / 8, LR = NT / DC;
  static_assert(NT % DC == 0 && LR % 8 == 0 && ROWS % LR == 0, "loader layout");
  const int ldRow = tid / DC, ldChunk = tid % DC;
  const unsigned off = unsigned((ldRow * D + ((ldChunk ^ (ldRow & 7)) * 8)) * 2);
  const int rem = len - row0 - ldRow;
  const E* g = seq + (long long)(row0 + ldRow) * stride + ldChunk * 8;
#pragma unroll
  for (int k = 0; k < ROWS / LR; ++k) {
    const bool ok = k * LR < rem;
    cpAsync16(dst + off + unsigned(k * LR * D * 2), ok ? g : seq, ok);
    g += (long long)LR * stride;
  }
}

// Accumulators [16 rows][D] of a warp (×mul) → its 16 rows of a swizzled tile → rows < len of global memory.
template <typename E, int D>
__device__ __forceinline__ void storeRows(const float (&acc)[D / 8][4], float mul, E* tile, E* g, long long stride,
                                          int row0, int len, int lane) {
  constexpr int DC = D / 8;
  const int r = lane >> 2;
#pragma unroll
  for (int d = 0; d < DC; ++d) {
    const int off = ((d ^ (r & 7)) * 8) + (lane & 3) * 2;
    *reinterpret_cast<unsigned*>(tile + r * D + off) = Elem<E>::pack(acc[d][0] * mul, acc[d][1] * mul);
    *reinterpret_cast<unsigned*>(tile + (r + 8) * D + off) = Elem<E>::pack(acc[d][2] * mul, acc[d][3] * mul);
  }
  __syncwarp();
#pragma unroll
  for (int i = lane; i < 16 * DC; i += 32) {
    const int rr = i / DC, c = i % DC;
    if (row0 + rr < len)
      *reinterpret_cast<uint4*>(g + (long long)(row0 + rr) * stride + c * 8) =
          *reinterpret_cast<const uint4*>(tile + rr * D + ((c ^ (rr & 7)) * 8));
  }
}

// ---------------------------------------------------------------------------------------------------------
// Dv = rowsum(dO ∘ o): one warp per (token, head), tokens < limit (the rest belong to no sequence).

template <typename E>
__global__ void rowDot(const E* __restrict__ dO, const E* __restrict__ o, float* __restrict__ dv, int D, int H,
                       int T, long long limit) {
  const long long g = (long long)blockIdx.x * 8 + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  const long long row = g / H;
  const int h = int(g % H);
  if (row >= limit) return;
  const E* a = dO + (row * H + h) * D;
  const E* b = o + (row * H + h) * D;
  float s = 0.f;
  for (int d = lane; d < D; d += 32) s = fmaf(toF(a[d]), toF(b[d]), s);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
  if (lane == 0) dv[((row / T) * H + h) * T + row % T] = s;
}

struct BwdParams {
  const void *q, *k, *v, *dO;
  void *dq, *dk, *dv;
  const float* lse;   // [B,H,T]
  const float* dvec;  // [B,H,T]
  const int4* work;   // varlen: {rowStart, len, tile, batch} per work item, longest first; null: uniform
  long long qStride, kvStride;
  int H, HKV, group, T, B, tiles;
  float scaleLog2, scale;
};

// ---------------------------------------------------------------------------------------------------------
// dK / dV.

template <int D_, int W_, int BQ_, bool DK_, bool DV_, int MinBlocks_ = 1>
struct KvCfg {
  static constexpr int D = D_, W = W_, BQ = BQ_, BKV = 16 * W_, MinBlocks = MinBlocks_;
  static constexpr bool DK = DK_, DV = DV_;
  static constexpr size_t smem(size_t elem) { return size_t(2 * BKV * D + 4 * BQ * D) * elem + 4 * BQ * sizeof(float); }
};
using Kv64 = KvCfg<64, 8, 64, true, true>;
// D = 128 (bench/NOTES.md "Backward" has both times): 4 warps × 64 keys, two CTAs per SM, so one CTA's barrier
// waits overlap the other's math (Q/dO are read twice as often from L2): 9% faster than the first version,
// 8 warps × 128 keys in one CTA (TCAL_ATTN_BWD_KV=w8 keeps it).
using Kv128 = KvCfg<128, 4, 32, true, true, 2>;
using Kv128w8 = KvCfg<128, 8, 32, true, true>;
using Kv256dV = KvCfg<256, 8, 32, false, true>;
using Kv256dK = KvCfg<256, 8, 32, true, false>;

template <typename E, typename C>
__global__ void __launch_bounds__(C::W * 32, C::MinBlocks) flashBackwardKV(BwdParams p) {
  constexpr int D = C::D, W = C::W, BQ = C::BQ, BKV = C::BKV, NT = 32 * W;
  constexpr int KS = D / 16, NB = BQ / 8, DB = D / 8;
  constexpr bool DK = C::DK, DV = C::DV;

  extern __shared__ __align__(128) unsigned char smem[];
  E* sK = reinterpret_cast<E*>(smem);
  E* sV = sK + BKV * D;
  E* sQ = sV + BKV * D;      // [2][BQ][D]
  E* sG = sQ + 2 * BQ * D;   // dO, [2][BQ][D]
  float* sL = reinterpret_cast<float*>(sG + 2 * BQ * D);  // lse·log2e, [2][BQ]
  float* sD = sL + 2 * BQ;                                 // Dv, [2][BQ]

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int hk = int(blockIdx.x % unsigned(p.HKV));
  const int w = int(blockIdx.x / unsigned(p.HKV));
  int rowStart, len, tile, batch;
  if (p.work) {
    const int4 wk = p.work[w];
    rowStart = wk.x;
    len = wk.y;
    tile = wk.z;
    batch = wk.w;
  } else {
    tile = w / p.B;  // key tile 0 sees the most queries: first
    batch = w % p.B;
    rowStart = batch * p.T;
    len = p.T;
  }
  const int k0 = tile * BKV, kw0 = k0 + warp * 16;
  const E* gK = static_cast<const E*>(p.k) + (long long)rowStart * p.kvStride + (long long)hk * D;
  const E* gV = static_cast<const E*>(p.v) + (long long)rowStart * p.kvStride + (long long)hk * D;
  const E* gQ = static_cast<const E*>(p.q) + (long long)rowStart * p.qStride;
  const E* gG = static_cast<const E*>(p.dO) + (long long)rowStart * p.qStride;
  const long long lrow0 = rowStart - (long long)batch * p.T;
  const int qb0 = k0 / BQ;  // query blocks below the first key block are fully masked
  const int nQB = (len + BQ - 1) / BQ - qb0;
  const int nIt = p.group * nQB;

  auto loadStep = [&](int it, int stage) {
    const int h = hk * p.group + it / nQB, q0 = (qb0 + it % nQB) * BQ;
    loadTile<E, D, NT, BQ>(smemAddr(sQ + stage * BQ * D), gQ + (long long)h * D, p.qStride, q0, len, tid);
    loadTile<E, D, NT, BQ>(smemAddr(sG + stage * BQ * D), gG + (long long)h * D, p.qStride, q0, len, tid);
    const long long lb = ((long long)batch * p.H + h) * p.T + lrow0;
    for (int i = tid; i < BQ; i += NT) {
      const bool ok = q0 + i < len;  // rows past the sequence: P = exp2(−inf) = 0
      sL[stage * BQ + i] = ok ? p.lse[lb + q0 + i] * kLog2e : INFINITY;
      sD[stage * BQ + i] = ok ? p.dvec[lb + q0 + i] : 0.f;
    }
  };
  loadTile<E, D, NT, BKV>(smemAddr(sK), gK, p.kvStride, k0, len, tid);
  loadTile<E, D, NT, BKV>(smemAddr(sV), gV, p.kvStride, k0, len, tid);
  loadStep(0, 0);
  cpCommit();

  unsigned kA[4], vA[4], qB[4], gB[4], qBT[4], gBT[4];
  fragBases<D>(kA, smemAddr(sK), warp * 16, Frag::A, lane);
  fragBases<D>(vA, smemAddr(sV), warp * 16, Frag::A, lane);
  fragBases<D>(qB, smemAddr(sQ), 0, Frag::B, lane);
  fragBases<D>(gB, smemAddr(sG), 0, Frag::B, lane);
  fragBases<D>(qBT, smemAddr(sQ), 0, Frag::BT, lane);
  fragBases<D>(gBT, smemAddr(sG), 0, Frag::BT, lane);

  float dk[DK ? DB : 1][4], dv[DV ? DB : 1][4];
#pragma unroll
  for (int d = 0; d < (DK ? DB : 1); ++d) dk[d][0] = dk[d][1] = dk[d][2] = dk[d][3] = 0.f;
#pragma unroll
  for (int d = 0; d < (DV ? DB : 1); ++d) dv[d][0] = dv[d][1] = dv[d][2] = dv[d][3] = 0.f;
  const float sl2 = p.scaleLog2;

  for (int it = 0; it < nIt; ++it) {
    const int stage = it & 1;
    if (it + 1 < nIt) {
      loadStep(it + 1, stage ^ 1);
      cpCommit();
      cpWait<1>();
    } else {
      cpWait<0>();
    }
    __syncthreads();
    const int q0 = (qb0 + it % nQB) * BQ;
    if (q0 + BQ - 1 >= kw0) {  // else every query of the block lies above this warp's keys
      const unsigned so = unsigned(stage * BQ * D * 2);
      float s[NB][4], dp[DK ? NB : 1][4];
#pragma unroll
      for (int n = 0; n < NB; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
      for (int ks = 0; ks < KS; ++ks) {  // Sᵀ = K Qᵀ
        unsigned a[4];
        ldsm4(a, kstep(kA, ks));
#pragma unroll
        for (int n2 = 0; n2 < NB / 2; ++n2) {
          unsigned b[4];
          ldsm4(b, kstep(qB, ks) + so + unsigned(n2 * 16 * D * 2));
          Elem<E>::mma(s[2 * n2], a, b[0], b[1]);
          Elem<E>::mma(s[2 * n2 + 1], a, b[2], b[3]);
        }
      }
      if constexpr (DK) {
#pragma unroll
        for (int n = 0; n < NB; ++n) dp[n][0] = dp[n][1] = dp[n][2] = dp[n][3] = 0.f;
#pragma unroll
        for (int ks = 0; ks < KS; ++ks) {  // dPᵀ = V dOᵀ
          unsigned a[4];
          ldsm4(a, kstep(vA, ks));
#pragma unroll
          for (int n2 = 0; n2 < NB / 2; ++n2) {
            unsigned b[4];
            ldsm4(b, kstep(gB, ks) + so + unsigned(n2 * 16 * D * 2));
            Elem<E>::mma(dp[2 * n2], a, b[0], b[1]);
            Elem<E>::mma(dp[2 * n2 + 1], a, b[2], b[3]);
          }
        }
      }
      // Pᵀ and dSᵀ: element (key kw0 + lane/4 + 8·(e>>1), query q0 + 8n + 2·(lane&3) + (e&1)).
      const bool diag = q0 < kw0 + 15;
      const float* L = sL + stage * BQ;
      const float* Dd = sD + stage * BQ;
#pragma unroll
      for (int n = 0; n < NB; ++n) {
        const int c = n * 8 + (lane & 3) * 2;
        const float2 l2 = *reinterpret_cast<const float2*>(L + c);
        const float2 d2 = *reinterpret_cast<const float2*>(Dd + c);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float pv = ex2(fmaf(s[n][e], sl2, -((e & 1) ? l2.y : l2.x)));
          if (diag && q0 + c + (e & 1) < kw0 + (lane >> 2) + (e >> 1) * 8) pv = 0.f;
          s[n][e] = pv;
          if constexpr (DK) dp[n][e] = pv * (dp[n][e] - ((e & 1) ? d2.y : d2.x));
        }
      }
#pragma unroll
      for (int kk = 0; kk < BQ / 16; ++kk) {
        if constexpr (DV) {  // dV += Pᵀ dO
          unsigned a[4] = {Elem<E>::pack(s[2 * kk][0], s[2 * kk][1]), Elem<E>::pack(s[2 * kk][2], s[2 * kk][3]),
                           Elem<E>::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                           Elem<E>::pack(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
          for (int d2 = 0; d2 < DB / 2; ++d2) {
            unsigned b[4];
            ldsm4t(b, kstep(gBT, d2) + so + unsigned(kk * 16 * D * 2));
            Elem<E>::mma(dv[2 * d2], a, b[0], b[1]);
            Elem<E>::mma(dv[2 * d2 + 1], a, b[2], b[3]);
          }
        }
        if constexpr (DK) {  // dK += dSᵀ Q
          unsigned a[4] = {Elem<E>::pack(dp[2 * kk][0], dp[2 * kk][1]), Elem<E>::pack(dp[2 * kk][2], dp[2 * kk][3]),
                           Elem<E>::pack(dp[2 * kk + 1][0], dp[2 * kk + 1][1]),
                           Elem<E>::pack(dp[2 * kk + 1][2], dp[2 * kk + 1][3])};
#pragma unroll
          for (int d2 = 0; d2 < DB / 2; ++d2) {
            unsigned b[4];
            ldsm4t(b, kstep(qBT, d2) + so + unsigned(kk * 16 * D * 2));
            Elem<E>::mma(dk[2 * d2], a, b[0], b[1]);
            Elem<E>::mma(dk[2 * d2 + 1], a, b[2], b[3]);
          }
        }
      }
    }
    __syncthreads();
  }

  // Epilogue: each warp stages its 16 rows in its own rows of sK / sV (free after the last barrier).
  const long long kvOff = (long long)rowStart * p.kvStride + (long long)hk * D;
  if constexpr (DK)
    storeRows<E, D>(dk, p.scale, sK + warp * 16 * D, static_cast<E*>(p.dk) + kvOff, p.kvStride, kw0, len, lane);
  if constexpr (DV)
    storeRows<E, D>(dv, 1.f, sV + warp * 16 * D, static_cast<E*>(p.dv) + kvOff, p.kvStride, kw0, len, lane);
}

// ---------------------------------------------------------------------------------------------------------
// dQ.

// MT m-tiles of 16 query rows per warp (BQ = 16·MT·W): with MT = 2 every K/V fragment loaded from shared
// memory feeds two MMAs (the forward's trick), at twice the dQ registers.
template <int D_, int W_, int BK_, int MT_ = 1>
struct QCfg {
  static constexpr int D = D_, W = W_, BK = BK_, MT = MT_, BQ = 16 * MT_ * W_;
  static constexpr size_t smem(size_t elem) { return size_t(2 * BQ * D + 4 * BK * D) * elem; }
};
using Q64 = QCfg<64, 4, 64>;
// D = 128: 4 warps × 32 rows (two m-tiles), 32-key tiles (255 registers, 52 bytes spilled), measured a little
// faster than 4 warps × 16 rows with 64-key tiles (TCAL_ATTN_BWD_Q=m1 keeps that).
using Q128 = QCfg<128, 4, 32, 2>;
using Q128m1 = QCfg<128, 4, 64>;
using Q256 = QCfg<256, 8, 32>;

template <typename E, typename C>
__global__ void __launch_bounds__(C::W * 32, C::W == 4 ? 2 : 1) flashBackwardQ(BwdParams p) {
  constexpr int D = C::D, W = C::W, BK = C::BK, BQ = C::BQ, MT = C::MT, NT = 32 * W, RW = 16 * MT;
  constexpr int KS = D / 16, NB = BK / 8, DB = D / 8;

  extern __shared__ __align__(128) unsigned char smem[];
  E* sQ = reinterpret_cast<E*>(smem);
  E* sG = sQ + BQ * D;
  E* sK = sG + BQ * D;      // [2][BK][D]
  E* sV = sK + 2 * BK * D;  // [2][BK][D]

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int h = int(blockIdx.x % unsigned(p.H));
  const int w = int(blockIdx.x / unsigned(p.H));
  int rowStart, len, tile, batch;
  if (p.work) {
    const int4 wk = p.work[w];
    rowStart = wk.x;
    len = wk.y;
    tile = wk.z;
    batch = wk.w;
  } else {
    tile = p.tiles - 1 - w / p.B;  // the last query tile sees the most keys: first
    batch = w % p.B;
    rowStart = batch * p.T;
    len = p.T;
  }
  const int hk = h / p.group;
  const int q0 = tile * BQ, warpRow0 = q0 + warp * RW;
  const E* gQ = static_cast<const E*>(p.q) + (long long)rowStart * p.qStride + (long long)h * D;
  const E* gG = static_cast<const E*>(p.dO) + (long long)rowStart * p.qStride + (long long)h * D;
  const E* gK = static_cast<const E*>(p.k) + (long long)rowStart * p.kvStride + (long long)hk * D;
  const E* gV = static_cast<const E*>(p.v) + (long long)rowStart * p.kvStride + (long long)hk * D;
  const int kEnd = min(q0 + BQ, len);
  const int nKT = (kEnd + BK - 1) / BK;

  loadTile<E, D, NT, BQ>(smemAddr(sQ), gQ, p.qStride, q0, len, tid);
  loadTile<E, D, NT, BQ>(smemAddr(sG), gG, p.qStride, q0, len, tid);
  loadTile<E, D, NT, BK>(smemAddr(sK), gK, p.kvStride, (nKT - 1) * BK, len, tid);
  loadTile<E, D, NT, BK>(smemAddr(sV), gV, p.kvStride, (nKT - 1) * BK, len, tid);
  cpCommit();

  // lse·log2e and Dv of this lane's rows (m-tile m: warpRow0 + 16m + lane/4 and + 8); rows past the sequence
  // give P = 0.
  float Lr[MT][2], Dr[MT][2];
  const long long lb = ((long long)batch * p.H + h) * p.T + (rowStart - (long long)batch * p.T);
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int x = 0; x < 2; ++x) {
      const int r = warpRow0 + m * 16 + (lane >> 2) + x * 8;
      Lr[m][x] = r < len ? p.lse[lb + r] * kLog2e : INFINITY;
      Dr[m][x] = r < len ? p.dvec[lb + r] : 0.f;
    }

  unsigned qA[4], gA[4], kB[4], vB[4], kBT[4];
  fragBases<D>(qA, smemAddr(sQ), warp * RW, Frag::A, lane);
  fragBases<D>(gA, smemAddr(sG), warp * RW, Frag::A, lane);
  fragBases<D>(kB, smemAddr(sK), 0, Frag::B, lane);
  fragBases<D>(vB, smemAddr(sV), 0, Frag::B, lane);
  fragBases<D>(kBT, smemAddr(sK), 0, Frag::BT, lane);

  float dq[MT][DB][4];
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int d = 0; d < DB; ++d) dq[m][d][0] = dq[m][d][1] = dq[m][d][2] = dq[m][d][3] = 0.f;
  const float sl2 = p.scaleLog2;

  for (int it = 0; it < nKT; ++it) {
    const int j = nKT - 1 - it, stage = it & 1;
    if (it + 1 < nKT) {
      loadTile<E, D, NT, BK>(smemAddr(sK + (stage ^ 1) * BK * D), gK, p.kvStride, (j - 1) * BK, len, tid);
      loadTile<E, D, NT, BK>(smemAddr(sV + (stage ^ 1) * BK * D), gV, p.kvStride, (j - 1) * BK, len, tid);
      cpCommit();
      cpWait<1>();
    } else {
      cpWait<0>();
    }
    __syncthreads();
    const int key0 = j * BK;
    if (key0 <= warpRow0 + RW - 1) {
      const unsigned so = unsigned(stage * BK * D * 2);
      float s[MT][NB][4], dp[MT][NB][4];
#pragma unroll
      for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int n = 0; n < NB; ++n) {
          s[m][n][0] = s[m][n][1] = s[m][n][2] = s[m][n][3] = 0.f;
          dp[m][n][0] = dp[m][n][1] = dp[m][n][2] = dp[m][n][3] = 0.f;
        }
#pragma unroll
      for (int ks = 0; ks < KS; ++ks) {  // S = Q Kᵀ, dP = dO Vᵀ
        unsigned a[MT][4], g[MT][4];
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          ldsm4(a[m], kstep(qA, ks) + unsigned(m * 16 * D * 2));
          ldsm4(g[m], kstep(gA, ks) + unsigned(m * 16 * D * 2));
        }
#pragma unroll
        for (int n2 = 0; n2 < NB / 2; ++n2) {
          unsigned b[4], c[4];
          ldsm4(b, kstep(kB, ks) + so + unsigned(n2 * 16 * D * 2));
          ldsm4(c, kstep(vB, ks) + so + unsigned(n2 * 16 * D * 2));
#pragma unroll
          for (int m = 0; m < MT; ++m) {
            Elem<E>::mma(s[m][2 * n2], a[m], b[0], b[1]);
            Elem<E>::mma(s[m][2 * n2 + 1], a[m], b[2], b[3]);
            Elem<E>::mma(dp[m][2 * n2], g[m], c[0], c[1]);
            Elem<E>::mma(dp[m][2 * n2 + 1], g[m], c[2], c[3]);
          }
        }
      }
      // dS: element (row warpRow0 + 16m + lane/4 + 8·(e>>1), key key0 + 8n + 2·(lane&3) + (e&1)).
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        const int mRow0 = warpRow0 + m * 16;
        const bool diag = key0 + BK - 1 > mRow0;
#pragma unroll
        for (int n = 0; n < NB; ++n)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            float pv = ex2(fmaf(s[m][n][e], sl2, -Lr[m][e >> 1]));
            if (diag && key0 + n * 8 + (lane & 3) * 2 + (e & 1) > mRow0 + (lane >> 2) + (e >> 1) * 8) pv = 0.f;
            dp[m][n][e] = pv * (dp[m][n][e] - Dr[m][e >> 1]);
          }
      }
#pragma unroll
      for (int kk = 0; kk < BK / 16; ++kk) {  // dQ += dS K
        unsigned a[MT][4];
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          a[m][0] = Elem<E>::pack(dp[m][2 * kk][0], dp[m][2 * kk][1]);
          a[m][1] = Elem<E>::pack(dp[m][2 * kk][2], dp[m][2 * kk][3]);
          a[m][2] = Elem<E>::pack(dp[m][2 * kk + 1][0], dp[m][2 * kk + 1][1]);
          a[m][3] = Elem<E>::pack(dp[m][2 * kk + 1][2], dp[m][2 * kk + 1][3]);
        }
#pragma unroll
        for (int d2 = 0; d2 < DB / 2; ++d2) {
          unsigned b[4];
          ldsm4t(b, kstep(kBT, d2) + so + unsigned(kk * 16 * D * 2));
#pragma unroll
          for (int m = 0; m < MT; ++m) {
            Elem<E>::mma(dq[m][2 * d2], a[m], b[0], b[1]);
            Elem<E>::mma(dq[m][2 * d2 + 1], a[m], b[2], b[3]);
          }
        }
      }
    }
    __syncthreads();
  }
  // Each warp read only its own rows of sQ: stage dQ there.
  E* gDq = static_cast<E*>(p.dq) + (long long)rowStart * p.qStride + (long long)h * D;
#pragma unroll
  for (int m = 0; m < MT; ++m)
    storeRows<E, D>(dq[m], p.scale, sQ + (warp * RW + m * 16) * D, gDq, p.qStride, warpRow0 + m * 16, len, lane);
}

// ---------------------------------------------------------------------------------------------------------
// f32 (CUDA cores): one warp per (row, head); lane holds dims lane, lane + 32, ...

// The sequence [start, end) holding flat token `row` (varlen: binary search over cu).
__device__ __forceinline__ void seqOf(const int* cu, int N, int T, long long row, long long& start, long long& end) {
  if (cu) {
    int lo = 0, hi = N;  // largest n with cu[n] ≤ row
    while (hi - lo > 1) {
      const int mid = (lo + hi) >> 1;
      if (cu[mid] <= row) lo = mid;
      else hi = mid;
    }
    start = cu[lo];
    end = cu[lo + 1];
  } else {
    start = (row / T) * T;
    end = start + T;
  }
}

template <int D>
__device__ __forceinline__ float warpDot(const float (&a)[D / 32], const float* b, int lane) {
  float d = 0.f;
#pragma unroll
  for (int i = 0; i < D / 32; ++i) d = fmaf(a[i], b[lane + 32 * i], d);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) d += __shfl_xor_sync(0xffffffffu, d, off);
  return d;
}

template <int D>
__global__ void __launch_bounds__(128) naiveBackwardQ(BwdParams p, const int* __restrict__ cu, int N,
                                                      long long limit) {
  constexpr int PER = D / 32;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const long long row = (long long)blockIdx.x * 4 + warp;
  const int h = blockIdx.y, hk = h / p.group;
  if (row >= limit) return;
  long long start, end;
  seqOf(cu, N, p.T, row, start, end);
  const float *q = static_cast<const float*>(p.q), *k = static_cast<const float*>(p.k);
  const float *v = static_cast<const float*>(p.v), *g = static_cast<const float*>(p.dO);
  const long long li = ((row / p.T) * p.H + h) * p.T + row % p.T;
  const float L = p.lse[li], Dv = p.dvec[li];
  float qv[PER], gv[PER], acc[PER];
#pragma unroll
  for (int i = 0; i < PER; ++i) {
    qv[i] = q[row * p.qStride + (long long)h * D + lane + 32 * i];
    gv[i] = g[row * p.qStride + (long long)h * D + lane + 32 * i];
    acc[i] = 0.f;
  }
  for (long long s = start; s <= row; ++s) {
    const float* kr = k + s * p.kvStride + (long long)hk * D;
    const float P = expf(p.scale * warpDot<D>(qv, kr, lane) - L);
    const float dS = P * (warpDot<D>(gv, v + s * p.kvStride + (long long)hk * D, lane) - Dv);
#pragma unroll
    for (int i = 0; i < PER; ++i) acc[i] = fmaf(dS, kr[lane + 32 * i], acc[i]);
  }
  float* dq = static_cast<float*>(p.dq);
#pragma unroll
  for (int i = 0; i < PER; ++i) dq[row * p.qStride + (long long)h * D + lane + 32 * i] = acc[i] * p.scale;
  (void)end;
}

template <int D>
__global__ void __launch_bounds__(128) naiveBackwardKV(BwdParams p, const int* __restrict__ cu, int N,
                                                       long long limit) {
  constexpr int PER = D / 32;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const long long row = (long long)blockIdx.x * 4 + warp;  // key token
  const int hk = blockIdx.y;
  if (row >= limit) return;
  long long start, end;
  seqOf(cu, N, p.T, row, start, end);
  const float *q = static_cast<const float*>(p.q), *g = static_cast<const float*>(p.dO);
  const float *k = static_cast<const float*>(p.k), *v = static_cast<const float*>(p.v);
  float kv[PER], vv[PER], dk[PER], dv[PER];
#pragma unroll
  for (int i = 0; i < PER; ++i) {
    kv[i] = k[row * p.kvStride + (long long)hk * D + lane + 32 * i];
    vv[i] = v[row * p.kvStride + (long long)hk * D + lane + 32 * i];
    dk[i] = dv[i] = 0.f;
  }
  for (int h = hk * p.group; h < (hk + 1) * p.group; ++h)
    for (long long t = row; t < end; ++t) {
      const float* qr = q + t * p.qStride + (long long)h * D;
      const float* gr = g + t * p.qStride + (long long)h * D;
      const long long li = ((t / p.T) * p.H + h) * p.T + t % p.T;
      const float P = expf(p.scale * warpDot<D>(kv, qr, lane) - p.lse[li]);
      const float dS = P * (warpDot<D>(vv, gr, lane) - p.dvec[li]);
#pragma unroll
      for (int i = 0; i < PER; ++i) {
        dv[i] = fmaf(P, gr[lane + 32 * i], dv[i]);
        dk[i] = fmaf(dS, qr[lane + 32 * i], dk[i]);
      }
    }
  float *dkp = static_cast<float*>(p.dk), *dvp = static_cast<float*>(p.dv);
#pragma unroll
  for (int i = 0; i < PER; ++i) {
    dkp[row * p.kvStride + (long long)hk * D + lane + 32 * i] = dk[i] * p.scale;
    dvp[row * p.kvStride + (long long)hk * D + lane + 32 * i] = dv[i];
  }
  (void)start;
}

// ---------------------------------------------------------------------------------------------------------
// Host side.

// Varlen work items {rowStart, len, tile, 0} over tiles of `rows` tokens, longest first: a dQ tile's cost is
// its number of keys (min((t+1)·rows, len)), a dK/dV tile's the number of queries at or after it (len − t·rows).
Tensor workList(const attn::Problem& p, int rows, bool keyTiles, Device dev, long long& items) {
  std::vector<int4> list;
  for (int64_t n = 0; n < p.N; ++n) {
    const int s0 = p.cu[size_t(n)], len = p.cu[size_t(n + 1)] - s0;
    for (int t = 0; t * rows < len; ++t) list.push_back(make_int4(s0, len, t, 0));
  }
  auto cost = [&](const int4& a) { return keyTiles ? a.y - a.z * rows : std::min((a.z + 1) * rows, a.y); };
  std::stable_sort(list.begin(), list.end(), [&](const int4& a, const int4& b) { return cost(a) > cost(b); });
  items = (long long)list.size();
  Tensor work;
  if (items > 0) {
    work = empty({int64_t(items) * 4}, DType::I32, dev);
    copyFromHost(work, list.data(), list.size() * sizeof(int4));
  }
  return work;
}

template <typename Kern>
void launch(Kern kern, long long blocks, int threads, size_t smem, cudaStream_t stream, const BwdParams& prm,
            const char* what) {
  if (blocks > INT32_MAX) throwInvalid("q", "too many tiles for one launch");
  check(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)), "cudaFuncSetAttribute");
  kern<<<unsigned(blocks), threads, smem, stream>>>(prm);
  checkLaunch(what);
}

template <typename E, typename C>
void runKV(const attn::Problem& p, BwdParams prm, Device dev, cudaStream_t stream) {
  long long items;
  Tensor work;
  if (p.varlen) {
    work = workList(p, C::BKV, true, dev, items);
    prm.work = reinterpret_cast<const int4*>(work.data());
  } else {
    items = (p.T + C::BKV - 1) / C::BKV * p.B;
  }
  if (items == 0) return;
  launch(flashBackwardKV<E, C>, items * p.HKV, C::W * 32, C::smem(sizeof(E)), stream, prm, "attentionBackward (dK/dV)");
}

template <typename E, typename C>
void runQ(const attn::Problem& p, BwdParams prm, Device dev, cudaStream_t stream) {
  long long items;
  Tensor work;
  if (p.varlen) {
    work = workList(p, C::BQ, false, dev, items);
    prm.work = reinterpret_cast<const int4*>(work.data());
  } else {
    prm.tiles = int((p.T + C::BQ - 1) / C::BQ);
    items = (long long)prm.tiles * p.B;
  }
  if (items == 0) return;
  launch(flashBackwardQ<E, C>, items * p.H, C::W * 32, C::smem(sizeof(E)), stream, prm, "attentionBackward (dQ)");
}

bool envIs(const char* name, const char* value) {
  const char* v = std::getenv(name);
  return v && std::string(v) == value;
}

// TCAL_ATTN_BWD_SKIP=kv|dq leaves one kernel out (benchmark only: the gradients are then incomplete) so that
// each kernel's time can be read off; TCAL_ATTN_BWD_KV=w8 and TCAL_ATTN_BWD_Q=m1 pick the first D = 128 versions.
template <typename E>
void runFlash(const attn::Problem& p, const BwdParams& prm, Device dev, cudaStream_t stream) {
  const bool kv = !envIs("TCAL_ATTN_BWD_SKIP", "kv"), dq = !envIs("TCAL_ATTN_BWD_SKIP", "dq");
  if (p.D == 64) {
    if (kv) runKV<E, Kv64>(p, prm, dev, stream);
    if (dq) runQ<E, Q64>(p, prm, dev, stream);
  } else if (p.D == 128) {
    if (kv && envIs("TCAL_ATTN_BWD_KV", "w8")) runKV<E, Kv128w8>(p, prm, dev, stream);
    else if (kv) runKV<E, Kv128>(p, prm, dev, stream);
    if (dq && envIs("TCAL_ATTN_BWD_Q", "m1")) runQ<E, Q128m1>(p, prm, dev, stream);
    else if (dq) runQ<E, Q128>(p, prm, dev, stream);
  } else {
    if (kv) runKV<E, Kv256dV>(p, prm, dev, stream);
    if (kv) runKV<E, Kv256dK>(p, prm, dev, stream);
    if (dq) runQ<E, Q256>(p, prm, dev, stream);
  }
}

template <int D>
void runNaive(const attn::Problem& p, const BwdParams& prm, const int* cu, long long limit, cudaStream_t stream) {
  naiveBackwardQ<D><<<dim3(unsigned((limit + 3) / 4), unsigned(p.H)), 128, 0, stream>>>(prm, cu, int(p.N), limit);
  checkLaunch("attentionBackward (f32 dQ)");
  naiveBackwardKV<D><<<dim3(unsigned((limit + 3) / 4), unsigned(p.HKV)), 128, 0, stream>>>(prm, cu, int(p.N), limit);
  checkLaunch("attentionBackward (f32 dK/dV)");
}

// Rows of width `from` elements copied into rows of width `to` (only min(from, to) elements per row).
void copyRows(void* dst, int64_t to, const void* src, int64_t from, int64_t rows, size_t elem, cudaStream_t s) {
  check(cudaMemcpy2DAsync(dst, size_t(to) * elem, src, size_t(from) * elem, size_t(std::min(to, from)) * elem,
                          size_t(rows), cudaMemcpyDeviceToDevice, s),
        "cudaMemcpy2DAsync");
}

}  // namespace

void attentionBackward(const attn::Problem& p, const Tensor& q, const Tensor& k, const Tensor& v,
                       const attn::BackwardIn& in, const attn::BackwardOut& out) {
  const Device dev = q.device();
  cudaStream_t stream = use(dev.index);
  if (p.tokens() == 0) return;
  const size_t elem = dtypeSize(q.dtype());
  if (p.D != 64 && p.D != 128 && p.D != 256) {
    // Zero-padded head dims leave every score, Dv and the first D gradient dims unchanged.
    const int64_t Dp = p.D < 64 ? 64 : p.D < 128 ? 128 : 256, rows = p.tokens();
    attn::Problem pp = p;
    pp.D = Dp;
    auto padded = [&](const Tensor& t, int64_t heads) {
      Tensor r = empty({p.B, p.T, heads, Dp}, q.dtype(), dev);
      check(cudaMemsetAsync(r.data(), 0, r.nbytes(), stream), "cudaMemsetAsync");
      if (t.defined()) copyRows(r.data(), Dp, t.data(), p.D, rows * heads, elem, stream);
      return r;
    };
    attn::BackwardIn pin{padded(in.o, p.H), in.lse, padded(in.dO, p.H)};
    attn::BackwardOut pout{empty({p.B, p.T, p.H, Dp}, q.dtype(), dev), empty({p.B, p.T, p.HKV, Dp}, q.dtype(), dev),
                           empty({p.B, p.T, p.HKV, Dp}, q.dtype(), dev)};
    attentionBackward(pp, padded(q, p.H), padded(k, p.HKV), padded(v, p.HKV), pin, pout);
    copyRows(out.dq.data(), p.D, pout.dq.data(), Dp, rows * p.H, elem, stream);
    copyRows(out.dk.data(), p.D, pout.dk.data(), Dp, rows * p.HKV, elem, stream);
    copyRows(out.dv.data(), p.D, pout.dv.data(), Dp, rows * p.HKV, elem, stream);
    return;
  }
  const long long limit = p.cu[size_t(p.N)];  // tokens past it belong to no sequence
  Tensor dvec = empty({p.B, p.H, p.T}, DType::F32, dev);
  BwdParams prm{};
  prm.q = q.data();
  prm.k = k.data();
  prm.v = v.data();
  prm.dO = in.dO.data();
  prm.dq = out.dq.data();
  prm.dk = out.dk.data();
  prm.dv = out.dv.data();
  prm.lse = in.lse.ptr<float>();
  prm.dvec = dvec.ptr<float>();
  prm.qStride = p.H * p.D;
  prm.kvStride = p.HKV * p.D;
  prm.H = int(p.H);
  prm.HKV = int(p.HKV);
  prm.group = int(p.group());
  prm.T = int(p.T);
  prm.B = int(p.B);
  prm.scale = float(p.scale);
  prm.scaleLog2 = float(p.scale * double(kLog2e));
  const long long warps = limit * p.H;
  if (warps > 0) {
    const unsigned blocks = unsigned((warps + 7) / 8);
    switch (q.dtype()) {
      case DType::F32:
        rowDot<<<blocks, 256, 0, stream>>>(in.dO.ptr<float>(), in.o.ptr<float>(), dvec.ptr<float>(), int(p.D), int(p.H), int(p.T), limit);
        break;
      case DType::BF16:
        rowDot<<<blocks, 256, 0, stream>>>(static_cast<const __nv_bfloat16*>(in.dO.data()),
                                           static_cast<const __nv_bfloat16*>(in.o.data()), dvec.ptr<float>(), int(p.D),
                                           int(p.H), int(p.T), limit);
        break;
      case DType::F16:
        rowDot<<<blocks, 256, 0, stream>>>(static_cast<const __half*>(in.dO.data()),
                                           static_cast<const __half*>(in.o.data()), dvec.ptr<float>(), int(p.D),
                                           int(p.H), int(p.T), limit);
        break;
      default: throwInvalid("q", std::string("CUDA attention takes bf16, f16 or f32, got ") + dtypeName(q.dtype()));
    }
    checkLaunch("attentionBackward (rowDot)");
    switch (q.dtype()) {
      case DType::F32: {
        if (p.H > 65535) throwInvalid("q", "f32 kernel takes at most 65535 heads");
        Tensor cuDev;
        if (p.varlen) {
          cuDev = empty({p.N + 1}, DType::I32, dev);
          copyFromHost(cuDev, p.cu.data(), p.cu.size() * sizeof(int32_t));
        }
        const int* cu = p.varlen ? cuDev.ptr<int>() : nullptr;
        if (p.D == 64) runNaive<64>(p, prm, cu, limit, stream);
        else if (p.D == 128) runNaive<128>(p, prm, cu, limit, stream);
        else runNaive<256>(p, prm, cu, limit, stream);
        break;
      }
      case DType::BF16: runFlash<__nv_bfloat16>(p, prm, dev, stream); break;
      default: runFlash<__half>(p, prm, dev, stream); break;
    }
  }
  // Tokens past the last sequence: zero gradients.
  if (limit < p.tokens()) {
    const long long rest = p.tokens() - limit;
    char* dq = static_cast<char*>(out.dq.data());
    char* dk = static_cast<char*>(out.dk.data());
    char* dv = static_cast<char*>(out.dv.data());
    const size_t qRow = size_t(p.H * p.D) * elem, kvRow = size_t(p.HKV * p.D) * elem;
    check(cudaMemsetAsync(dq + size_t(limit) * qRow, 0, size_t(rest) * qRow, stream), "cudaMemsetAsync");
    check(cudaMemsetAsync(dk + size_t(limit) * kvRow, 0, size_t(rest) * kvRow, stream), "cudaMemsetAsync");
    check(cudaMemsetAsync(dv + size_t(limit) * kvRow, 0, size_t(rest) * kvRow, stream), "cudaMemsetAsync");
  }
}

}  // namespace tcal::cuda
