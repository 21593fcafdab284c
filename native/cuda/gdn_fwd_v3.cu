// CUDA Gated DeltaNet forward, versions 3–7: the chunk-local work runs for all chunks at once, only the state
// recurrence is sequential, and that part is split over V so that the state lives in registers.
//
// Kernel 1 (prep), one block per (chunk, value head, sequence), all in parallel:
//   γ = cumsum(g) inside the chunk, rq / rk = L2-norm factors of q / k rows (1 without l2norm),
//   M = strictly-lower(diag(β)(K̃K̃ᵀ ⊙ exp(γ_i − γ_j))) (formed in the K Kᵀ fragments' epilogue),
//   A = (I + M)⁻¹ by 16×16 blocks (fp32: the diagonal blocks by substitution in registers, the off-diagonal
//   blocks by 3×TF32 tile products),  Ab = A·diag(β) (bf16, [tokens, HV, C]),
//   when o is wanted, Aqk = (Q̃K̃ᵀ ⊙ exp(γ_i − γ_j))_{j ≤ i} (bf16, [tokens, HV, C], lower blocks only: v6),
//   aux (f32, per chunk and value head, structure of arrays): exp γ·rk, rk·exp(γ_L − γ), scale·rq·exp γ, exp γ_L.
// Kernel 2 (state pass, v5, warp-specialised), one block per (sequence, value head, V tile); recurrence warps
// keep Sᵀ (16 columns × K, or × K/2 with the K split; fp32) in registers so that every product takes Sᵀ or νᵀ
// straight from the accumulators as its A operand (mma.sync m16n8k16, fp32 accumulate; the B operands by
// ldmatrix from padded shared memory filled by cp.async), output warps form O beside them. Per chunk:
//   νᵀ = (Vᵀ − Sᵀ K̃ᵀ) Abᵀ,  Sᵀ ← exp(γ_L) Sᵀ + νᵀ diag(exp(γ_L − γ)) K̃                 (recurrence warps)
//   Oᵀ = Sᵀ Q̃ᵀ diag(exp γ) + νᵀ Aqkᵀ                                                      (output warps)
// v7 (session 5): the prep forms Aqk and M in one pass over the lower tiles; a state pass (`ringKernel`, the
// default where its blocks fill the SMs since session 8) decouples the two roles with a load ring per role and an
// exchange slot between them.
// v9 (session 11, `ringWgKernel`, sm_90a, K = 128): the ring's products on wgmma, one warpgroup per 64 columns, so
// that a warpgroup reads each K / Q / Ab / Aqk tile from shared memory once instead of once per warp (the mma.sync
// ring's ldmatrix traffic held its L1 at 91 %). Those tiles arrive 128-byte swizzled; Sᵀ goes through a swizzled A
// tile for Pᵀ = Sᵀ K̃ᵀ (and the output warps' fragments), νᵀ, the state update and O take register fragments.
// Every exponent is γ_i − γ_j with i ≥ j, γ_L − γ_j with j ≤ L, or γ_i: all ≤ 0.
#include <cudaTypedefs.h>  // CUtensorMap, PFN_cuTensorMapEncodeTiled (types only: the function by entry point)
#include <mma.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <utility>

#include "../core/runtime.h"
#include "check.h"
#include "gdn_fwd_v3.h"
#include "gdn_inverse.cuh"
#include "types.cuh"
#include "wgmma.cuh"

namespace tcal::cuda::gdn_v3 {

namespace {

using namespace nvcuda;

constexpr int C = gdn::kChunk;  // 64
constexpr int LDC = C + 8;      // bf16 row of a C-wide tile (144 B: conflict-free ldmatrix)
constexpr int LDF = C + 4;      // fp32 row of a C × C tile
// aux of one (global chunk, value head), [blk][kAuxRows][C] f32 with blk = (chunkFirst[n] + c)·HV + hv, 0 past L:
// row 0 exp γ_j·rk_j (νᵀ's Pᵀ scaling), 1 rk_j·exp(γ_L − γ_j) (the state update), 2 sq_i·exp γ_i (o's Q̃ scaling),
// 3 exp γ_L in its first element. As rows (session 10; tokens of 32 bytes until then) the state pass reads a
// lane's pair (j, j + 1) as one conflict-free 8-byte load instead of two 2-way-conflicted scalar ones (fwdcount:
// 768 shared wavefronts per chunk, 384 of them excess), and the slot is one contiguous 1 KB copy.
constexpr int kAuxRows = 4, kAuxFloats = kAuxRows * C;
// The aux rows of global chunk gc, value head hv.
template <typename F>
__device__ __forceinline__ F* auxOf(F* aux, int gc, int HV, int hv) {
  return aux + (size_t(gc) * HV + hv) * kAuxFloats;
}

__device__ __forceinline__ float softplusF(float z) { return z > 20.f ? z : log1pf(__expf(z)); }

// PTX helpers of both kernels: cp.async, ldmatrix, the m16n8k16 mma and fp32 → packed pair conversion.
__device__ __forceinline__ unsigned smemAddr(const void* p) {
  return unsigned(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void cpAsync16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smemAddr(dst)), "l"(src),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cpAsyncCommit() { asm volatile("cp.async.commit_group;\n" ::); }
// Programmatic dependent launch (sm_90; no-ops where the grid was launched without it): the prep lets the state
// pass's grid launch once every prep block has started, and the state pass waits for the prep's completion (and
// its memory) before it reads Ab, Aqk or aux; its blocks take the SMs that the prep's last wave frees.
__device__ __forceinline__ void letDependentsLaunch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void waitForPrerequisite() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void cpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ void ldsm4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smemAddr(p)));
}
__device__ __forceinline__ void ldsm4t(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smemAddr(p)));
}

// Four 8×8 b16 matrices from mma fragments (register r of matrix r), each stored transposed: lanes 8r … 8r+7
// give the addresses of the rows of matrix r in memory (= its columns in the fragment).
// Called by all 32 lanes of a warp (1-D blocks).
__device__ __forceinline__ void stsm4t(void* p, uint32_t r0, uint32_t r1, uint32_t r2, uint32_t r3) {
#if __CUDA_ARCH__ >= 900
  asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1,%2,%3,%4};\n" ::"r"(smemAddr(p)), "r"(r0),
               "r"(r1), "r"(r2), "r"(r3)
               : "memory");
#else
  // sm_80 has no stmatrix: the same stores one 16-bit element at a time. Fragment element (row i = lane / 4,
  // column j = 2 (lane % 4) + h) of matrix m goes to row j of the stored matrix (whose address lane 8m + j holds),
  // element i.
  const uint32_t r[4] = {r0, r1, r2, r3};
  const int lane = threadIdx.x % 32, i = lane / 4;
#pragma unroll
  for (int m = 0; m < 4; ++m)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int j = 2 * (lane % 4) + h;
      auto* row = reinterpret_cast<uint16_t*>(__shfl_sync(0xffffffffu, reinterpret_cast<unsigned long long>(p), 8 * m + j));
      row[i] = uint16_t(r[m] >> (16 * h));
    }
#endif
}

// Four 8×8 b16 matrices from mma fragments (register r of matrix r) stored as they are: lanes 8r … 8r+7 give the
// addresses of matrix r's rows (sm_90: the wgmma state pass only).
__device__ __forceinline__ void stsm4(void* p, uint32_t r0, uint32_t r1, uint32_t r2, uint32_t r3) {
#if __CUDA_ARCH__ >= 900
  asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1,%2,%3,%4};\n" ::"r"(smemAddr(p)), "r"(r0), "r"(r1),
               "r"(r2), "r"(r3)
               : "memory");
#else
  __trap();
#endif
}
// Byte offset of 16-byte chunk c16 (0 … 7) of row r in a tile of 128-byte rows with the 128-byte swizzle (wgmma.cuh).
__device__ __forceinline__ int swz128(int r, int c16) { return r * 128 + ((c16 ^ (r & 7)) << 4); }

template <typename T>
__device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <typename T>
__device__ __forceinline__ uint32_t pack2(float x, float y);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float x, float y) {
  __nv_bfloat162 v = __floats2bfloat162_rn(x, y);
  return *reinterpret_cast<uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float x, float y) {
  __half2 v = __floats2half2_rn(x, y);
  return *reinterpret_cast<uint32_t*>(&v);
}

// ---------------------------------------------------------------------------------------------------------------
// Kernel 1: chunk-local preparation. 128 threads, four blocks per SM (A aliases the raw k rows).
constexpr int kPrepThreads = 128;

template <int K>
__host__ __device__ constexpr size_t prepRegion() {  // raw k rows (C × (K+8) bf16), later A (C × LDF f32)
  return 2 * size_t(C) * (K + 8) > 4 * size_t(C) * LDF ? 2 * size_t(C) * (K + 8) : 4 * size_t(C) * LDF;
}
template <int K>
constexpr size_t prepSmem() {
  // region, Gs (C × LDF f32: M), Ts (16 × LDF f32), 5 vectors of C floats: 40.4 KB at K = 64 and 128, five
  // blocks per SM (session 3 left an unused C × LDC bf16 tile here: 49.6 KB, four blocks per SM).
  return prepRegion<K>() + 4 * size_t(C) * LDF + 4 * (16 * LDF + 5 * C);
}

// With o, one job per lower tile forms Q̃K̃ᵀ and K K̃ᵀ together (shared B fragments, one exp per element for both
// Aqk and M; v7) and stores the Aqk tile as 32-byte rows through a per-warp staging tile; the tile epilogue reads
// its row factors (sq, β·rk) and column factors (rk) once per tile into registers, and the Ab loop reads β as two
// float4 (session 6's lean epilogue: LDS 154 → 82, BRA 209 → 149 per tile in SASS; H200 session 8 run 2, prep
// alone 0.273 ms against 0.281, outputs bitwise the same). Without o (the backward's recompute) only M is formed.
// (Session 4's separate Aqk loop with 4-byte stores, 0.31 ms, is deleted.)
// SAVE (saveForBackward 'full', with o): also writes the Handover `ho` for the backward, whose prep
// then does not run — QKG from the Aqk tiles (all 16 rows, the blocks above the diagonal zeroed), A before the
// β scaling, the gate vectors beside aux (times the row factors sq, rk: the backward reads the raw q / k rows),
// the norm factors. (Until session 9 also the rows scale·n_q, n_k: 0.27 GB at B8·T4096·H16·D128, gradplan item 5.)
template <typename T, int K, bool SAVE>
__global__ void __launch_bounds__(kPrepThreads, 4) prepKernel(const int* __restrict__ cu, int H, int HV,
                                                           const T* __restrict__ q, const T* __restrict__ k,
                                                           const float* __restrict__ g,
                                                           const float* __restrict__ beta,
                                                           const float* __restrict__ aLog,
                                                           const float* __restrict__ dtBias,
                                                           T* __restrict__ About, T* __restrict__ AQout,
                                                           float* __restrict__ aux,
                                                           const int* __restrict__ chunkFirst, float scale,
                                                           bool l2norm, Handover ho) {
  constexpr int LDK = K + 8;
  constexpr int G = K / 8, RPP = kPrepThreads / G, IT = C / RPP;  // k / q rows as 16-byte vectors
  extern __shared__ __align__(128) unsigned char sm[];
  T* Kb = reinterpret_cast<T*>(sm);                                 // C × LDK (raw k, later K̃)
  float* As = reinterpret_cast<float*>(sm);                         // C × LDF (aliases Kb)
  float* Gs = reinterpret_cast<float*>(sm + prepRegion<K>());       // C × LDF (M)
  T* Qb = reinterpret_cast<T*>(Gs);                                 // C × LDK (raw q, before M)
  static_assert(2 * (K + 8) <= 4 * LDF, "prep: q rows fit M's region");
  float* Ts = Gs + C * LDF;                                         // 16 × LDF
  float* gam = Ts + 16 * LDF;
  float* bet = gam + C;
  float* rk = bet + C;
  float* sq = rk + C;
  float* ex = sq + C;

  letDependentsLaunch();
  const int tid = threadIdx.x, hv = blockIdx.y, n = blockIdx.z, h = hv / (HV / H);
  const int warp = tid / 32, lane = tid % 32, sub = tid % G;
  const int64_t seqBegin = cu[n], seqEnd = cu[n + 1];
  const int64_t t0 = seqBegin + int64_t(blockIdx.x) * C;
  if (t0 >= seqEnd) return;
  const int L = int(seqEnd - t0 < C ? seqEnd - t0 : C);

  // k rows (raw) into Kb; norms of q and k rows. Every load (k, q, g, β) is issued before the first use.
  {
    uint4 kv[IT], qv[IT];
    const bool needQ = l2norm || AQout;
#pragma unroll
    for (int u = 0; u < IT; ++u) {
      const int i = tid / G + u * RPP;
      kv[u] = make_uint4(0, 0, 0, 0);
      qv[u] = make_uint4(0, 0, 0, 0);
      if (i < L) {
        kv[u] = *reinterpret_cast<const uint4*>(k + ((t0 + i) * H + h) * K + sub * 8);
        if (needQ) qv[u] = *reinterpret_cast<const uint4*>(q + ((t0 + i) * H + h) * K + sub * 8);
      }
    }
    float gi = 0.f, bi = 0.f;
    if (tid < L) {
      size_t gidx = size_t(t0 + tid) * HV + hv;
      gi = g[gidx];
      bi = beta[gidx];
    }
    // Row sums of squares, 2·IT per thread (row u: k at 2u, q at 2u + 1; 2·IT = G), summed over the row's G lanes by a
    // reduce-scatter: at each xor offset a lane keeps half of its values and adds its partner's copy of them, so lane
    // `sub` ends with value `sub` (15 shuffles instead of 64 at K = 128), then one rsqrt and store per lane instead of
    // eight. The same pairs are added at each level as in the all-reduce butterfly it replaces, so the sums are bitwise
    // the same (fwdcount, session 8: the norm head was ≈ 15 % of the prep's stall samples).
    static_assert(2 * IT == G, "prep: one row sum per lane of a row group");
    float ss[2 * IT];
#pragma unroll
    for (int u = 0; u < IT; ++u) {
      const int i = tid / G + u * RPP;
      *reinterpret_cast<uint4*>(Kb + i * LDK + sub * 8) = kv[u];
      if (AQout) *reinterpret_cast<uint4*>(Qb + i * LDK + sub * 8) = qv[u];
      const T* ke = reinterpret_cast<const T*>(&kv[u]);
      const T* qe = reinterpret_cast<const T*>(&qv[u]);
      float sk = 0.f, sqq = 0.f;
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        float a = toF(ke[e]), b = toF(qe[e]);
        sk += a * a;
        sqq += b * b;
      }
      ss[2 * u] = sk;
      ss[2 * u + 1] = sqq;
    }
    constexpr int kLevels = G == 16 ? 4 : 3;  // log2 G (K = 128 or 64)
    static_assert(G == 1 << kLevels, "prep: G is 8 or 16");
#pragma unroll
    for (int lvl = 0; lvl < kLevels; ++lvl) {
      const int off = G >> (lvl + 1);
      const bool upper = sub & off;
#pragma unroll
      for (int j = 0; j < G / 2; ++j) {  // constant trip count: both loops unroll, ss stays in registers
        if (j >= off) break;
        const float keep = upper ? ss[j + off] : ss[j], send = upper ? ss[j] : ss[j + off];
        ss[j] = keep + __shfl_xor_sync(0xffffffffu, send, off);
      }
    }
    {
      const int i = tid / G + (sub / 2) * RPP;
      const bool isQ = sub & 1;
      const float r = rsqrtf(ss[0] + float(gdn::kNormEps));
      if (isQ)
        sq[i] = i < L ? (l2norm ? scale * r : scale) : 0.f;
      else
        rk[i] = i < L ? (l2norm ? r : 1.f) : 0.f;
      // The backward's norm factors ([tokens, H], once per key head), as its prep writes them.
      if (SAVE && ho.rq && i < L && hv % (HV / H) == 0) (isQ ? ho.rq : ho.rk)[(t0 + i) * H + h] = r;
    }
    if (tid < C) {
      if (tid < L && aLog) {
        gi = -__expf(aLog[hv]) * softplusF(gi + dtBias[hv]);
        bi = 1.f / (1.f + __expf(-bi));
      }
      gam[tid] = gi;
      bet[tid] = bi;
    }
  }
  __syncthreads();
  // This (global chunk, value head): aux's rows and the hand-over's, as the backward indexes them.
  const size_t blk = size_t(chunkFirst[n] + int(blockIdx.x)) * HV + hv;
  // Inclusive scan of the log decays (2 per lane), by every warp in registers (past L the sum stays γ_{L-1});
  // warp 0 publishes γ and exp γ after the next barrier (the other warps still read the raw g until then).
  float gs0, gs1;
  {
    const float a = gam[2 * lane], b = a + gam[2 * lane + 1];
    float s = b;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const float y = __shfl_up_sync(0xffffffffu, s, off);
      if (lane >= off) s += y;
    }
    gs0 = s - b + a;
    gs1 = s;
  }
  auto gammaAt = [&](int idx) {  // γ_idx from the lane that holds it (all lanes call it together)
    const float x0 = __shfl_sync(0xffffffffu, gs0, idx >> 1), x1 = __shfl_sync(0xffffffffu, gs1, idx >> 1);
    return idx & 1 ? x1 : x0;
  };
  // Lower 16×16 tile `tile` ∈ [0, 10) (row block tr ≥ column block tc) of A·Kᵀ over K from 16-bit rows in shared
  // memory (stride LDK) by mma.sync, with γ of the fragment's rows (gi) and columns (gj) gathered by shuffles.
  const int gq = lane / 4, tq = lane % 4;
  // With A2 (a second A operand, or nullptr: folded at each call site), acc2 = A2·Kᵀ of the same tile.
  auto lowerTile = [&](const T* A, int tile, int& tr, int& tc, float (&acc)[2][4], float (&gi)[2], float (&gj)[2][2],
                       const T* A2, float (&acc2)[2][4]) {
    tr = tile < 1 ? 0 : tile < 3 ? 1 : tile < 6 ? 2 : 3;
    tc = tile - tr * (tr + 1) / 2;
    const int lr = lane % 8, lm = lane / 8;
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[nt][e] = acc2[nt][e] = 0.f;
#pragma unroll
    for (int ks = 0; ks < K / 16; ++ks) {
      uint32_t a[4], b[4];
      ldsm4(a, A + (16 * tr + lane % 16) * LDK + 16 * ks + (lane / 16) * 8);
      ldsm4(b, Kb + (16 * tc + lr + (lm >> 1) * 8) * LDK + 16 * ks + (lm & 1) * 8);
      mma<T>(acc[0], a, b[0], b[1]);
      mma<T>(acc[1], a, b[2], b[3]);
      if (A2) {
        uint32_t a2[4];
        ldsm4(a2, A2 + (16 * tr + lane % 16) * LDK + 16 * ks + (lane / 16) * 8);
        mma<T>(acc2[0], a2, b[0], b[1]);
        mma<T>(acc2[1], a2, b[2], b[3]);
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) gi[r] = gammaAt(16 * tr + gq + 8 * r);
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int c = 0; c < 2; ++c) gj[nt][c] = gammaAt(16 * tc + 8 * nt + 2 * tq + c);
  };
  // Aqk = (Q Kᵀ ⊙ sq_i rk_j exp(γ_i − γ_j))_{j ≤ i < L} for the state pass's output warps (o wanted only):
  // the 10 lower 16×16 blocks (zero above the diagonal inside the diagonal blocks; the blocks above the
  // diagonal are never written nor read), bf16/f16 pairs straight from the fragments, [tokens, HV, C].
  // M of tile (tr, tc) from its K Kᵀ fragment (zero past L and on or above the diagonal), element pair (nt, r),
  // with the decay factors e0, e1 = exp(γ_i − γ_j), exp(γ_i − γ_{j+1}).
  auto mPair = [&](const float (&acc)[2][4], int tr, int tc, int nt, int r, float e0, float e1) {
    const int i = 16 * tr + gq + 8 * r, j = 16 * tc + 8 * nt + 2 * tq;
    const float fi = bet[i] * rk[i];
    float m0 = 0.f, m1 = 0.f;
    if (i < L) {
      if (j < i) m0 = fi * rk[j] * acc[nt][2 * r] * e0;
      if (j + 1 < i) m1 = fi * rk[j + 1] * acc[nt][2 * r + 1] * e1;
    }
    return make_float2(m0, m1);
  };
  float dummy[2][4];
  if (AQout) {
    // Warps 0, 1 take three tiles, warps 2, 3 two; M waits in registers until the q rows (M's region) are read.
    // The Aqk tile leaves through this warp's 16 × 16 slot of Ts as 32-byte rows.
    static_assert(16 * LDF * sizeof(float) >= 4 * 256 * sizeof(T), "prep: Aqk staging fits Ts");
    T* stg = reinterpret_cast<T*>(Ts) + warp * 256;
    float2 mv[3][2][2];
    int trs[3], tcs[3];
#pragma unroll
    for (int u = 0; u < 3; ++u) {
      const int job = warp + 4 * u;
      if (job >= 10) break;
      float accQ[2][4], accK[2][4], gi[2], gj[2][2];
      lowerTile(Qb, job, trs[u], tcs[u], accQ, gi, gj, Kb, accK);
      const int mi = trs[u], ni = tcs[u];
      // The factors of this tile's rows and columns, read once (the products below are the default's, factor
      // by factor in the same order, so Aqk and M are bitwise the same).
      float sqi[2], fi[2], rkj[2][2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int i = 16 * mi + gq + 8 * r;
        sqi[r] = sq[i];
        fi[r] = bet[i] * rk[i];
      }
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        const float2 rr = *reinterpret_cast<const float2*>(rk + 16 * ni + 8 * nt + 2 * tq);
        rkj[nt][0] = rr.x;
        rkj[nt][1] = rr.y;
      }
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int i = 16 * mi + gq + 8 * r, j = 16 * ni + 8 * nt + 2 * tq;
          const float e0 = __expf(gi[r] - gj[nt][0]), e1 = __expf(gi[r] - gj[nt][1]);
          const float x0 = j <= i ? accQ[nt][2 * r] * sqi[r] * rkj[nt][0] * e0 : 0.f;
          const float x1 = j + 1 <= i ? accQ[nt][2 * r + 1] * sqi[r] * rkj[nt][1] * e1 : 0.f;
          *reinterpret_cast<uint32_t*>(stg + (gq + 8 * r) * 16 + 8 * nt + 2 * tq) = pack2<T>(x0, x1);
          const bool live = i < L;  // mPair's masks: rows past L and entries on or above the diagonal are 0
          mv[u][nt][r] = make_float2(live && j < i ? fi[r] * rkj[nt][0] * accK[nt][2 * r] * e0 : 0.f,
                                     live && j + 1 < i ? fi[r] * rkj[nt][1] * accK[nt][2 * r + 1] * e1 : 0.f);
        }
      __syncwarp();
      {
        const int row = lane / 2, half = lane % 2, i = 16 * mi + row;
        if (i < L)
          *reinterpret_cast<uint4*>(AQout + ((t0 + i) * HV + hv) * C + 16 * ni + 8 * half) =
              *reinterpret_cast<const uint4*>(stg + row * 16 + 8 * half);
        if constexpr (SAVE)  // QKG: the same tile, every row (zero past L), [blk][C][C]
          *reinterpret_cast<uint4*>(static_cast<T*>(ho.QKG) + (blk * C + i) * C + 16 * ni + 8 * half) =
              *reinterpret_cast<const uint4*>(stg + row * 16 + 8 * half);
      }
      __syncwarp();
    }
    if constexpr (SAVE)  // QKG's six blocks above the diagonal: zero (warps 0, 1 take two)
      for (int job = warp; job < 6; job += kPrepThreads / 32) {
        const int tc = job < 3 ? 3 : job < 5 ? 2 : 1, tr = job < 3 ? job : job < 5 ? job - 3 : 0;
        const int row = lane / 2, half = lane % 2;
        *reinterpret_cast<uint4*>(static_cast<T*>(ho.QKG) + (blk * C + 16 * tr + row) * C + 16 * tc + 8 * half) =
            make_uint4(0u, 0u, 0u, 0u);
      }
    __syncthreads();  // q rows read: M takes their place
#pragma unroll
    for (int u = 0; u < 3; ++u) {
      if (warp + 4 * u >= 10) break;
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int r = 0; r < 2; ++r)
          *reinterpret_cast<float2*>(Gs + (16 * trs[u] + gq + 8 * r) * LDF + 16 * tcs[u] + 8 * nt + 2 * tq) = mv[u][nt][r];
    }
  }
  // M = strictly-lower(diag(β rk) K Kᵀ diag(rk) ⊙ exp(γ_i − γ_j)), rows past L zero: the 10 tiles on or below
  // the diagonal (the only ones read later), K Kᵀ by mma.sync from the raw k rows, M formed in the epilogue.
  if (!AQout)
    for (int tile = warp; tile < 10; tile += kPrepThreads / 32) {
      int tr, tc;
      float acc[2][4], gi[2], gj[2][2];
      lowerTile(Kb, tile, tr, tc, acc, gi, gj, nullptr, dummy);
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int r = 0; r < 2; ++r)
          *reinterpret_cast<float2*>(Gs + (16 * tr + gq + 8 * r) * LDF + 16 * tc + 8 * nt + 2 * tq) =
              mPair(acc, tr, tc, nt, r, __expf(gi[r] - gj[nt][0]), __expf(gi[r] - gj[nt][1]));
    }
  __syncthreads();  // Kb is dead from here on: As takes its place
  if (warp == 0) {
    gam[2 * lane] = gs0;
    gam[2 * lane + 1] = gs1;
    ex[2 * lane] = 2 * lane < L ? __expf(gs0) : 0.f;
    ex[2 * lane + 1] = 2 * lane + 1 < L ? __expf(gs1) : 0.f;
  }
  static_assert(kPrepThreads == 128, "prep: one warp per diagonal block");
  // Ab = A·diag(β) (zero above the diagonal blocks and past L), row i, columns c … c + 7.
  auto abUnit = [&](int i, int c) {
    const bool live = c / 16 <= i / 16;
    const float4 a0 = *reinterpret_cast<const float4*>(As + i * LDF + c);
    const float4 a1 = *reinterpret_cast<const float4*>(As + i * LDF + c + 4);
    const float av[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
    // β of the 8 columns as two 16-byte loads (bet is 16-byte aligned, c a multiple of 8)
    const float4 b0 = *reinterpret_cast<const float4*>(bet + c), b1 = *reinterpret_cast<const float4*>(bet + c + 4);
    const float bv[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
    uint32_t ab[4];
#pragma unroll
    for (int e = 0; e < 4; ++e)
      ab[e] = pack2<T>((live ? av[2 * e] : 0.f) * bv[2 * e], (live ? av[2 * e + 1] : 0.f) * bv[2 * e + 1]);
    // One 16-byte store (the compiler split the uint4 copy of a local T[8] into four 4-byte stores: 75 % excess L2
    // sectors on this store in session 8's counters).
    if (i < L)
      asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"l"(About + ((t0 + i) * HV + hv) * C + c), "r"(ab[0]),
                   "r"(ab[1]), "r"(ab[2]), "r"(ab[3])
                   : "memory");
    if constexpr (SAVE) {  // A itself (every row: identity past L), as the backward's prep rounds it
      alignas(16) T a16[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) a16[e] = fromF<T>(live ? av[e] : 0.f);
      *reinterpret_cast<uint4*>(static_cast<T*>(ho.A) + (blk * C + i) * C + c) = *reinterpret_cast<const uint4*>(a16);
    }
  };
  // aux of token j < C, zero past L (and with SAVE the backward's gate vectors e·sq, −βe·rk, d·rk, zero past L,
  // and e_L).
  auto auxToken = [&](int j) {
    if (j < C) {
      const float gL = gam[L - 1];
      const bool live = j < L;
      float* a = aux + blk * kAuxFloats + j;  // auxOf's row j of this chunk (blk computed above)
      a[0] = live ? ex[j] * rk[j] : 0.f;
      a[C] = live ? rk[j] * __expf(gL - gam[j]) : 0.f;
      a[2 * C] = live ? sq[j] * ex[j] : 0.f;
      a[3 * C] = j == 0 ? __expf(gL) : 0.f;
    }
    if constexpr (SAVE) {
      if (j < C) {
        float* gv = ho.gates + blk * 3 * C;
        gv[j] = ex[j] * sq[j];
        gv[C + j] = -bet[j] * ex[j] * rk[j];
        gv[2 * C + j] = j < L ? __expf(gam[L - 1] - gam[j]) * rk[j] : 0.f;
      }
      if (j == 0) ho.gateEnds[blk] = ex[L - 1];
    }
  };
  gdn_inverse::blockInverse64Strips(Gs, As, LDF);  // A = (I + M)⁻¹ by column strips (overwrites M)
  for (int idx = tid; idx < C * (C / 8); idx += kPrepThreads) abUnit(idx / (C / 8), (idx % (C / 8)) * 8);
  auxToken(tid);
}

// ---------------------------------------------------------------------------------------------------------------
// Kernel 2, v5: warp-specialised state pass. Column group cg (16 state columns) has KS2 recurrence
// warps that keep Sᵀ (16 × K, split over K between them when KS2 = 2; fp32) in registers and run only what the
// next chunk depends on,
//   Pᵀ = Sᵀ kᵀ,  νᵀ = (Vᵀ − Pᵀ diag(exp γ·rk)) Abᵀ,  Sᵀ ← exp(γ_L) Sᵀ + νᵀ diag(rk exp(γ_L − γ)) K
// (with KS2 = 2 each forms its partial Pᵀ over its half of K, the pair adds them through shared memory, both
// form the whole νᵀ and update their own half), and KS2 output warps (each owning half of the chunk's token
// blocks when KS2 = 2) that form the chunk's output from the chunk-start Sᵀ and νᵀ, handed over through shared
// memory as raw bf16/f16 A fragments (each lane reads what the same lane wrote):
//   Oᵀ = Sᵀ Q̃ᵀ diag(sq·exp γ) + νᵀ Aqkᵀ (Aqk from the prep, loaded with the stage),  o stores.
// (Until session 4 the output warps formed Aqk themselves, once per V tile: ≈ 40 % of their instructions, and
// the recurrence warps waited for them at every chunk; H200 session 4 run 2: B2·T16384 1.33 → 1.00 ms.)
// The output warps wait for ν on a named barrier that the recurrence warps only arrive at, so O's products
// run beside the recurrence chain instead of on it. Without o (the backward's checkpoint pass) the output
// warps only help with the loads.
template <int K, int CG>
__host__ __device__ constexpr size_t wsStageBytes() {
  // Qs, Ks (C × (K+8)), Abs (C × LDC), Vs (C × (16·CG + 8)) bf16/f16, aux (kAuxFloats f32), AQs (C × LDC).
  return 2 * (2 * size_t(C) * (K + 8) + 2 * size_t(C) * LDC + size_t(C) * (16 * CG + 8)) + 4 * kAuxFloats;
}
// 32-bit words per column group: Sᵀ fragments (K/16 × 32 lanes × 4), ν fragments (4 × 32 × 4) and, with the K
// split, one fp32 partial Pᵀ per recurrence warp (8 × 32 × 4).
template <int K, int KS2>
__host__ __device__ constexpr int wsXchgWords() {
  return (K / 16) * 128 + 4 * 128 + (KS2 == 2 ? 2 * 1024 : 0);
}
template <int K, int CG, int KS2, int ST>
__host__ __device__ constexpr size_t wsSmem() {
  return ST * wsStageBytes<K, CG>() + 4 * size_t(CG) * wsXchgWords<K, KS2>();
}

// A chunk's C token rows (16-byte pieces, P per row) into shared memory rows of LD elements by cp.async:
// thread tid takes piece tid % P of rows tid / P + m·NT / P; rows ≥ Lc are zero-filled (read from row 0).
// src is row 0 of the chunk, rows rowStride elements apart. The per-thread offsets do not depend on the
// chunk, so the compiler keeps them out of the chunk loop (this was ≈ 15 instructions per piece).
template <int P, int LD, int NT, typename E>
__device__ __forceinline__ void tileAsync(E* dst, const E* src, int64_t rowStride, int Lc, int tid) {
  constexpr int EP = 16 / int(sizeof(E));  // elements per piece
  const int r0 = tid / P, c = (tid % P) * EP;
  if constexpr (C * P >= NT) {
    static_assert((C * P) % NT == 0 && NT % P == 0, "tileAsync: whole passes");
#pragma unroll
    for (int m = 0; m < C * P / NT; ++m) {
      const int i = r0 + m * (NT / P);
      const bool ok = i < Lc;
      cpAsync16(dst + i * LD + c, src + (ok ? int64_t(i) * rowStride : 0) + c, ok);
    }
  } else {
    if (tid < C * P) {
      const bool ok = r0 < Lc;
      cpAsync16(dst + r0 * LD + c, src + (ok ? int64_t(r0) * rowStride : 0) + c, ok);
    }
  }
}

// A chunk's aux (kAuxFloats contiguous floats, 16-byte aligned) by cp.async: one 16-byte piece per thread tid <
// kAuxFloats / 4 (the prep wrote every row in full, so there is nothing to zero-fill).
template <int NT>
__device__ __forceinline__ void auxAsync(float* dst, const float* src, int tid) {
  static_assert(NT >= kAuxFloats / 4, "auxAsync: one piece per thread");
  if (tid < kAuxFloats / 4) cpAsync16(dst + 4 * tid, src + 4 * tid, true);
}

// sm_90 tensor / bulk copies completing on mbarriers (the ring kernel's TCAL_GDN_WS=ringbulk), into the same padded
// (conflict-free) slot layouts as cp.async. Compiled only for sm_90+ (the ring kernel runs only there; on sm_80 its
// BULK instantiation is the cp.async one).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define TCAL_GDN_BULK 1
#else
#define TCAL_GDN_BULK 0
#endif
#if TCAL_GDN_BULK
__device__ __forceinline__ void mbarInit(uint64_t* b, unsigned count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smemAddr(b)), "r"(count) : "memory");
}
// The inits visible to the copy engine's complete_tx (and, with the block barrier after it, to every thread).
__device__ __forceinline__ void mbarInitFence() { asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"); }
__device__ __forceinline__ void mbarArriveTx(uint64_t* b, unsigned bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smemAddr(b)), "r"(bytes) : "memory");
}
// Until the phase of the given parity has completed (acquire: the bytes and the arriving warps' stores are visible).
__device__ __forceinline__ void mbarWait(uint64_t* b, unsigned parity) {
  unsigned done;
  do {
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(smemAddr(b)), "r"(parity)
        : "memory");
  } while (!done);
}
__device__ __forceinline__ void bulkCopy(void* dst, const void* src, unsigned bytes, uint64_t* b) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
                   smemAddr(dst)),
               "l"(src), "r"(bytes), "r"(smemAddr(b))
               : "memory");
}
// A box of a 3-D tensor map (columns c0…, head c1, tokens c2…) into shared memory, densely: the maps' boxes are as
// wide as the padded rows, so the slot layouts are those of the cp.async path (the padding gets the next columns
// or the out-of-bounds zeros, never read).
__device__ __forceinline__ void tmaLoad3(void* dst, const CUtensorMap* map, int c0, int c1, int c2, uint64_t* b) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], "
      "[%5];\n" ::"r"(smemAddr(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(smemAddr(b))
      : "memory");
}
// One warp's 32 rows (rows rowBase + lane) of a ring slot's tile, each warp arriving once per chunk on the slot's
// full barrier, expecting its bytes before its copies are issued (so the phase cannot complete early). All 32
// rows valid: one tensor copy (lane 0). Else (the tail chunk) rows < Lc by 1-D bulk copies from src (row r at
// src + r·tokStride bytes; the tensor map would read the next sequence's tokens) and rows ≥ Lc zeroed by plain
// stores, as cp.async's zero fill did — the consumers rely on it (f_j = 0 past L; no stale or uninitialised values
// times zero); lane 0's arrive releases those stores.
__device__ __forceinline__ void bulkRows(unsigned char* dst, int pitch, const unsigned char* src, int64_t tokStride,
                                         int rowBytes, const CUtensorMap* map, int c0, int c1, int tc, int rowBase,
                                         int Lc, uint64_t* full, int lane) {
  if (rowBase + 32 <= Lc) {
    if (lane == 0) {
      mbarArriveTx(full, unsigned(32 * pitch));  // the box's bytes, padding included
      tmaLoad3(dst + rowBase * pitch, map, c0, c1, tc + rowBase, full);
    }
    return;
  }
  const int row = rowBase + lane;
  if (row >= Lc) {
    for (int b = 0; b < rowBytes; b += 16) *reinterpret_cast<uint4*>(dst + row * pitch + b) = make_uint4(0, 0, 0, 0);
  }
  __syncwarp();
  if (lane == 0) {
    const int nv = Lc - rowBase < 0 ? 0 : (Lc - rowBase > 32 ? 32 : Lc - rowBase);
    mbarArriveTx(full, unsigned(nv * rowBytes));
  }
  __syncwarp();
  if (row < Lc) bulkCopy(dst + row * pitch, src + row * tokStride, unsigned(rowBytes), full);
}
// Half `half` of a chunk's aux (one 512-byte bulk copy by lane 0), arriving once on the slot's full barrier.
__device__ __forceinline__ void bulkAuxHalf(float* dst, const float* src, int half, uint64_t* full, int lane) {
  constexpr int kHalf = kAuxFloats / 2;
  if (lane == 0) {
    mbarArriveTx(full, unsigned(4 * kHalf));
    bulkCopy(dst + half * kHalf, src + half * kHalf, unsigned(4 * kHalf), full);
  }
}
// WG: one warp's 32 rows (rowBase + lane) of a tile of `halves` 128-byte-swizzled C × 128 B parts (K / Q: 2, Ab /
// Aqk: 1), by 128-byte-swizzled tensor copies where all 32 rows are valid (lane 0; the map's box is 32 rows × 64
// columns), else (the tail chunk) rows < Lc by 16-byte loads from src (row r at src + r·tokStride bytes) and rows ≥ Lc
// as zeros, stored by this warp and fenced for the tensor cores' (async proxy) reads; one arrival on `full`.
__device__ __forceinline__ void swzRows(unsigned char* dst, int halves, const unsigned char* src, int64_t tokStride,
                                        const CUtensorMap* map, int c1, int tc, int rowBase, int Lc, uint64_t* full,
                                        int lane) {
  if (rowBase + 32 <= Lc) {
    if (lane == 0) {
      mbarArriveTx(full, unsigned(32 * 128 * halves));
      for (int hh = 0; hh < halves; ++hh) tmaLoad3(dst + hh * C * 128 + rowBase * 128, map, 64 * hh, c1, tc + rowBase, full);
    }
    return;
  }
  const int r = rowBase + lane;
  for (int hh = 0; hh < halves; ++hh)
#pragma unroll
    for (int c = 0; c < 8; ++c) {
      uint4 x = make_uint4(0, 0, 0, 0);
      if (r < Lc) x = *reinterpret_cast<const uint4*>(src + r * tokStride + hh * 128 + c * 16);
      *reinterpret_cast<uint4*>(dst + hh * C * 128 + swz128(r, c)) = x;
    }
  wg::fenceProxy();
  __syncwarp();
  if (lane == 0) mbarArriveTx(full, 0u);
}
#endif

__device__ __forceinline__ void namedSync(int id, int n) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(n) : "memory");
}
__device__ __forceinline__ void namedArrive(int id, int n) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(n) : "memory");
}

// Steps of the recurrence and output warps, shared by the ws and ring kernels. Sᵀ fragments: element [nt][e] of
// a warp's Sᵀ (16 columns × KH rows of S from row kb) is state (kk = kb + 8nt + 2tq + (e&1), column
// col0 + gq + 8(e>>1)).
template <typename T>
__device__ __forceinline__ uint4 packFrag(const float (&a)[4], const float (&b)[4]) {
  return make_uint4(pack2<T>(a[0], a[1]), pack2<T>(a[2], a[3]), pack2<T>(b[0], b[1]), pack2<T>(b[2], b[3]));
}

// Chunk-start state into the checkpoint (row kk of S at dst + kk·V): fp32, or bf16 (CK16 is a template argument:
// as a run-time flag it cost the other paths 7 registers and spills) where lanes gq and gq + 1 swap one element so
// that each stores a (col, col + 1) pair of one row — even gq row kk, odd gq row kk + 1 — as one 4-byte store.
template <int KH, bool CK16>
__device__ __forceinline__ void storeCkpt(const float (&S)[KH / 8][4], void* ckpt, size_t base, int V, int kb, int col0,
                                          int lane) {
  const int gq = lane / 4, tq = lane % 4;
  if constexpr (!CK16) {
    float* dst = static_cast<float*>(ckpt) + base;
#pragma unroll
    for (int nt = 0; nt < KH / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        int kk = kb + 8 * nt + 2 * tq + (e & 1), col = col0 + gq + 8 * (e >> 1);
        dst[size_t(kk) * V + col] = S[nt][e];
      }
  } else {
    __nv_bfloat16* dst = static_cast<__nv_bfloat16*>(ckpt) + base;
    const bool odd = gq & 1;
#pragma unroll
    for (int nt = 0; nt < KH / 8; ++nt)
#pragma unroll
      for (int hi = 0; hi < 2; ++hi) {
        const float a = S[nt][2 * hi], b = S[nt][2 * hi + 1];
        const float got = __shfl_xor_sync(0xffffffffu, odd ? a : b, 4);
        const int kk = kb + 8 * nt + 2 * tq + (odd ? 1 : 0), col = col0 + (gq & ~1) + 8 * hi;
        *reinterpret_cast<__nv_bfloat162*>(dst + size_t(kk) * V + col) =
            odd ? __floats2bfloat162_rn(got, b) : __floats2bfloat162_rn(a, got);
      }
  }
}

// A 16-byte shared-memory load the compiler cannot forward from an earlier store (see the ring kernel's formP).
__device__ __forceinline__ uint4 lds128(const void* p) {
  uint4 r;
  asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];\n" : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "r"(smemAddr(p)) : "memory");
  return r;
}

// Pᵀ (16 columns × 64 tokens) += Sᵀ kᵀ over this warp's rows kb … kb + KH of S; sFrag(ks) is Sᵀ's A fragment of
// k-step ks (uint4).
template <typename T, int KH, int LDK, typename SFrag>
__device__ __forceinline__ void formP(float (&P)[8][4], SFrag&& sFrag, const T* Ks, int kb, int lane) {
  const int lr = lane % 8, lm = lane / 8;
#pragma unroll
  for (int ks = 0; ks < KH / 16; ++ks) {
    const uint4 s4 = sFrag(ks);
    const uint32_t sa[4] = {s4.x, s4.y, s4.z, s4.w};
#pragma unroll
    for (int np = 0; np < 4; ++np) {
      uint32_t b[4];
      ldsm4(b, Ks + (16 * np + lr + (lm >> 1) * 8) * LDK + kb + 16 * ks + (lm & 1) * 8);
      mma<T>(P[2 * np], sa, b[0], b[1]);
      mma<T>(P[2 * np + 1], sa, b[2], b[3]);
    }
  }
}

// Xᵀ = Vᵀ − Pᵀ diag(exp γ_j · rk_j) as A fragments (V columns vw … vw + 16 of the stage).
template <typename T, int LDV>
__device__ __forceinline__ void formX(uint32_t (&Xa)[4][4], const float (&P)[8][4], const T* Vs, int vw,
                                      const float* auxs, int lane) {
  const int lr = lane % 8, lm = lane / 8, tq = lane % 4;
#pragma unroll
  for (int ks = 0; ks < 4; ++ks) {
    uint32_t a[4];
    ldsm4t(a, Vs + (16 * ks + lr + (lm >> 1) * 8) * LDV + vw + (lm & 1) * 8);
#pragma unroll
    for (int t = 0; t < 2; ++t) {
      const int j = 16 * ks + 8 * t + 2 * tq;
      const float2 f = *reinterpret_cast<const float2*>(auxs + j);  // exp γ·rk of tokens j, j + 1
      const float f0 = f.x, f1 = f.y;
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const T* ve = reinterpret_cast<const T*>(&a[2 * t + r]);
        Xa[ks][2 * t + r] =
            pack2<T>(toF(ve[0]) - P[2 * ks + t][2 * r] * f0, toF(ve[1]) - P[2 * ks + t][2 * r + 1] * f1);
      }
    }
  }
}
// νᵀ = Xᵀ Abᵀ (Ab lower triangular).
template <typename T, int LDV>
__device__ __forceinline__ void formNu(float (&N)[8][4], const float (&P)[8][4], const T* Vs, int vw,
                                       const float* auxs, const T* Abs, int lane) {
  const int lr = lane % 8, lm = lane / 8;
  uint32_t Xa[4][4];
  formX<T, LDV>(Xa, P, Vs, vw, auxs, lane);
#pragma unroll
  for (int ks = 0; ks < 4; ++ks)
#pragma unroll
    for (int np = ks; np < 4; ++np) {
      uint32_t b[4];
      ldsm4(b, Abs + (16 * np + lr + (lm >> 1) * 8) * LDC + 16 * ks + (lm & 1) * 8);
      mma<T>(N[2 * np], Xa[ks], b[0], b[1]);
      mma<T>(N[2 * np + 1], Xa[ks], b[2], b[3]);
    }
}

// The state update's factors: νᵀ diag(rk_j exp(γ_L − γ_j)) in place, Sᵀ ← exp(γ_L) Sᵀ.
template <int KH>
__device__ __forceinline__ void scaleForUpdate(float (&S)[KH / 8][4], float (&N)[8][4], const float* auxs, int lane) {
  const int tq = lane % 4;
  const float eL = auxs[3 * C];
#pragma unroll
  for (int nt = 0; nt < 8; ++nt) {
    const float2 f = *reinterpret_cast<const float2*>(auxs + C + 8 * nt + 2 * tq);  // rk·exp(γ_L − γ)
    N[nt][0] *= f.x;
    N[nt][2] *= f.x;
    N[nt][1] *= f.y;
    N[nt][3] *= f.y;
  }
#pragma unroll
  for (int nt = 0; nt < KH / 8; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) S[nt][e] *= eL;
}
// Sᵀ ← exp(γ_L) Sᵀ + (νᵀ diag(rk_j exp(γ_L − γ_j))) K (both factors from the prep; rows past L are zero-filled,
// so f_j = 0 there). N is scaled in place.
template <typename T, int KH, int LDK>
__device__ __forceinline__ void updateS(float (&S)[KH / 8][4], float (&N)[8][4], const T* Ks, const float* auxs,
                                        int kb, int lane) {
  const int lr = lane % 8, lm = lane / 8;
  scaleForUpdate<KH>(S, N, auxs, lane);
#pragma unroll
  for (int ks = 0; ks < 4; ++ks) {
    uint32_t a[4];
    a[0] = pack2<T>(N[2 * ks][0], N[2 * ks][1]);
    a[1] = pack2<T>(N[2 * ks][2], N[2 * ks][3]);
    a[2] = pack2<T>(N[2 * ks + 1][0], N[2 * ks + 1][1]);
    a[3] = pack2<T>(N[2 * ks + 1][2], N[2 * ks + 1][3]);
#pragma unroll
    for (int np = 0; np < KH / 16; ++np) {
      uint32_t b[4];
      ldsm4t(b, Ks + (16 * ks + lr + (lm & 1) * 8) * LDK + kb + 16 * np + (lm >> 1) * 8);
      mma<T>(S[2 * np], a, b[0], b[1]);
      mma<T>(S[2 * np + 1], a, b[2], b[3]);
    }
  }
}

// Oᵀ's columns scaled by sq_i exp γ_i.
__device__ __forceinline__ void scaleO(float (&O)[8][4], const float* auxs, int lane) {
  const int tq = lane % 4;
#pragma unroll
  for (int nt = 0; nt < 8; ++nt) {
    const float2 f = *reinterpret_cast<const float2*>(auxs + 2 * C + 8 * nt + 2 * tq);  // sq_i exp γ_i, i, i + 1
    O[nt][0] *= f.x;
    O[nt][2] *= f.x;
    O[nt][1] *= f.y;
    O[nt][3] *= f.y;
  }
}
// Oᵀ = Sᵀ Q̃ᵀ over the token blocks np with own(np), columns scaled by sq_i exp γ_i; sFrag(ks) is Sᵀ's A fragment
// of k-step ks (uint4).
template <typename T, int K, typename SFrag, typename Own>
__device__ __forceinline__ void outQS(float (&O)[8][4], SFrag&& sFrag, const T* Qs, const float* auxs, int lane,
                                      Own&& own) {
  constexpr int LDK = K + 8;
  const int lr = lane % 8, lm = lane / 8;
#pragma unroll
  for (int ks = 0; ks < K / 16; ++ks) {
    const uint4 s4 = sFrag(ks);
    const uint32_t sa[4] = {s4.x, s4.y, s4.z, s4.w};
#pragma unroll
    for (int np = 0; np < 4; ++np) {
      if (!own(np)) continue;
      uint32_t b[4];
      ldsm4(b, Qs + (16 * np + lr + (lm >> 1) * 8) * LDK + 16 * ks + (lm & 1) * 8);
      mma<T>(O[2 * np], sa, b[0], b[1]);
      mma<T>(O[2 * np + 1], sa, b[2], b[3]);
    }
  }
  scaleO(O, auxs, lane);
}

// Oᵀ += νᵀ Aqkᵀ (Aqk lower triangular: k-block ks feeds n-blocks np ≥ ks).
template <typename T, typename Own>
__device__ __forceinline__ void outNuAQ(float (&O)[8][4], const uint32_t (&Nf)[4][4], const T* AQs, int lane, Own&& own) {
  const int lr = lane % 8, lm = lane / 8;
#pragma unroll
  for (int np = 0; np < 4; ++np) {
    if (!own(np)) continue;
#pragma unroll
    for (int ks = 0; ks <= np; ++ks) {
      uint32_t b[4];
      ldsm4(b, AQs + (16 * np + lr + (lm >> 1) * 8) * LDC + 16 * ks + (lm & 1) * 8);
      mma<T>(O[2 * np], Nf[ks], b[0], b[1]);
      mma<T>(O[2 * np + 1], Nf[ks], b[2], b[3]);
    }
  }
}

// o rows from Oᵀ (16 columns): staged transposed in `stage` (token rows LDS elements apart) by stmatrix.trans —
// matrix m of token block np holds tokens 8(2np + (m >> 1)) + [0, 8) × columns 8(m & 1) + [0, 8) — then 16-byte
// stores to orow (token 0's first column; tokens rowStride elements apart), tokens < L.
template <typename T, int LDS, typename Own>
__device__ __forceinline__ void outStore(const float (&O)[8][4], T* stage, T* orow, int64_t rowStride, int L, int lane,
                                         Own&& own) {
#pragma unroll
  for (int np = 0; np < 4; ++np) {
    if (!own(np)) continue;
    const int m = lane / 8;
    stsm4t(stage + (16 * np + 8 * (m >> 1) + lane % 8) * LDS + 8 * (m & 1), pack2<T>(O[2 * np][0], O[2 * np][1]),
           pack2<T>(O[2 * np][2], O[2 * np][3]), pack2<T>(O[2 * np + 1][0], O[2 * np + 1][1]),
           pack2<T>(O[2 * np + 1][2], O[2 * np + 1][3]));
  }
  __syncwarp();
#pragma unroll
  for (int it = 0; it < 4; ++it) {
    const int i = (lane + 32 * it) / 2, half = lane % 2;
    if (i < L && own(i / 16))
      *reinterpret_cast<uint4*>(orow + i * rowStride + 8 * half) = *reinterpret_cast<const uint4*>(stage + i * LDS + 8 * half);
  }
}

template <typename T, int K, int CG, int KS2, int ST, int MINB, bool CK16>
__global__ void __launch_bounds__(64 * CG * KS2, MINB) wsKernel(const int* __restrict__ cu, int H, int HV, int V,
                                                                const T* __restrict__ q, const T* __restrict__ k,
                                                                const T* __restrict__ v, const T* __restrict__ Ab,
                                                                const T* __restrict__ AQ,
                                                                const float* __restrict__ aux,
                                                                const float* __restrict__ h0, T* __restrict__ o,
                                                                float* __restrict__ hT, void* __restrict__ ckpt,
                                                                const int* __restrict__ chunkFirst) {
  constexpr int LDK = K + 8, VT = 16 * CG, LDV = VT + 8, NT = 64 * CG * KS2, KS = K / 16;
  constexpr int KH = K / KS2, KSH = KH / 16;  // a recurrence warp's rows of S and its k-steps over them
  constexpr int R = CG * KS2;                 // recurrence warps (0 … R−1), then as many output warps
  constexpr size_t SB = wsStageBytes<K, CG>();
  constexpr int XW = wsXchgWords<K, KS2>();
  // Named barriers (ids 1 … 15): "ν ready" per group 1 + cg, the recurrence pair (K split) 2 + CG + cg.
  constexpr int kNuCount = 64 * KS2, kPairBar = 2 + CG;
  static_assert(CG + 1 + (KS2 == 2 ? CG : 0) <= 15, "wsKernel: named barrier ids");
  extern __shared__ __align__(128) unsigned char sm[];
  unsigned char* stage0 = sm;
  uint32_t* xch = reinterpret_cast<uint32_t*>(stage0 + ST * SB);

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const bool rec = warp < R;
  const int role = rec ? warp : warp - R;  // index among the warps of this role
  const int cg = role / KS2, kh = role % KS2;
  const int gq = lane / 4, tq = lane % 4;
  const int hv = blockIdx.y, n = blockIdx.z, h = hv / (HV / H);
  const int v0 = blockIdx.x * VT, vw = 16 * cg;
  const int64_t seqBegin = cu[n], seqEnd = cu[n + 1];
  const size_t stateBase = (size_t(n) * HV + hv) * K * V;
  uint32_t* xS = xch + cg * XW + lane * 4;  // [ks] uint4 per lane
  uint32_t* xN = xS + KS * 128;             // [ks] uint4 per lane
  const bool wantO = o != nullptr;
  waitForPrerequisite();  // the prep's Ab, Aqk, aux

  auto issue = [&](int64_t tc, int st) {
    T* Qs = reinterpret_cast<T*>(stage0 + st * SB);
    T* Ks = Qs + C * LDK;
    T* Abs = Ks + C * LDK;
    T* Vs = Abs + C * LDC;
    float* auxs = reinterpret_cast<float*>(Vs + C * LDV);
    T* AQs = reinterpret_cast<T*>(auxs + kAuxFloats);
    const int Lc = int(seqEnd - tc < C ? seqEnd - tc : C);
    if (wantO) tileAsync<C / 8, LDC, NT>(AQs, AQ + (tc * HV + hv) * C, int64_t(HV) * C, Lc, tid);
    if (wantO) tileAsync<K / 8, LDK, NT>(Qs, q + (tc * H + h) * K, int64_t(H) * K, Lc, tid);
    tileAsync<K / 8, LDK, NT>(Ks, k + (tc * H + h) * K, int64_t(H) * K, Lc, tid);
    tileAsync<C / 8, LDC, NT>(Abs, Ab + (tc * HV + hv) * C, int64_t(HV) * C, Lc, tid);
    tileAsync<VT / 8, LDV, NT>(Vs, v + (tc * HV + hv) * V + v0, int64_t(HV) * V, Lc, tid);
    const int gc = chunkFirst[n] + int(uint64_t(tc - seqBegin) / C);  // tc's global chunk
    auxAsync<NT>(auxs, auxOf(aux, gc, HV, hv), tid);
  };
  // Top of a chunk, the same for both roles (they meet at its two block barriers): issue the loads, run `mid`
  // (between the barriers), wait for this chunk's stage.
  auto top = [&](int64_t t0, int st, auto&& mid) {
    __syncthreads();  // the previous chunk's reads of shared memory (stages, exchange, Aqk) are done
    if (ST == 1) {
      issue(t0, 0);
      cpAsyncCommit();
    } else {
      if (t0 + C < seqEnd) issue(t0 + C, st ^ 1);
      cpAsyncCommit();  // possibly empty: keeps one group per chunk
    }
    mid();
    cpAsyncWait<ST - 1>();
    __syncthreads();
  };
  if (ST == 2 && seqBegin < seqEnd) {
    issue(seqBegin, 0);
    cpAsyncCommit();
  }

  // The two roles run the chunk loop in separate code, so that the output warps do not carry Sᵀ's registers.
  if (rec) {
    const int kb = kh * KH;
    float S[KH / 8][4];
#pragma unroll
    for (int nt = 0; nt < KH / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        int kk = kb + 8 * nt + 2 * tq + (e & 1), col = v0 + vw + gq + 8 * (e >> 1);
        S[nt][e] = h0 ? h0[stateBase + size_t(kk) * V + col] : 0.f;
      }
    float* xP = reinterpret_cast<float*>(xch + cg * XW + KS * 128 + 4 * 128);  // [kh][nt] float4 per lane
    float* xPme = xP + kh * 1024 + lane * 4;
    const float* xPpa = xP + (kh ^ 1) * 1024 + lane * 4;
    int chunk = chunkFirst[n];
    int st = 0;
    for (int64_t t0 = seqBegin; t0 < seqEnd; t0 += C, ++chunk, st ^= (ST - 1)) {
      const T* Ks = reinterpret_cast<const T*>(stage0 + st * SB) + C * LDK;
      const T* Abs = Ks + C * LDK;
      const T* Vs = Abs + C * LDC;
      const float* auxs = reinterpret_cast<const float*>(Vs + C * LDV);
      top(t0, st, [&] {
        if (ckpt) storeCkpt<KH, CK16>(S, ckpt, (size_t(chunk) * HV + hv) * K * V, V, kb, v0 + vw, lane);
        if (wantO) {  // chunk-start Sᵀ for the output warps (visible after the barrier)
#pragma unroll
          for (int ks = 0; ks < KSH; ++ks)
            *reinterpret_cast<uint4*>(xS + (kb / 16 + ks) * 128) = packFrag<T>(S[2 * ks], S[2 * ks + 1]);
        }
      });

      float N[8][4] = {};
      {
        float P[8][4] = {};
        formP<T, KH, LDK>(P, [&](int ks) { return packFrag<T>(S[2 * ks], S[2 * ks + 1]); }, Ks, kb, lane);
        if constexpr (KS2 == 2) {  // the pair's partial products, added in the same order by both warps
#pragma unroll
          for (int nt = 0; nt < 8; ++nt)
            *reinterpret_cast<float4*>(xPme + nt * 128) = make_float4(P[nt][0], P[nt][1], P[nt][2], P[nt][3]);
          namedSync(kPairBar + cg, 64);
#pragma unroll
          for (int nt = 0; nt < 8; ++nt) {
            const float4 pp = *reinterpret_cast<const float4*>(xPpa + nt * 128);
            const float o4[4] = {pp.x, pp.y, pp.z, pp.w};
#pragma unroll
            for (int e = 0; e < 4; ++e) P[nt][e] = kh == 0 ? P[nt][e] + o4[e] : o4[e] + P[nt][e];
          }
        }
        formNu<T, LDV>(N, P, Vs, vw, auxs, Abs, lane);
      }
      if (wantO) {  // hand νᵀ to the output warps (every recurrence warp arrives: it has read Vs by now)
        if (kh == 0) {
#pragma unroll
          for (int ks = 0; ks < 4; ++ks) *reinterpret_cast<uint4*>(xN + ks * 128) = packFrag<T>(N[2 * ks], N[2 * ks + 1]);
        }
        namedArrive(1 + cg, kNuCount);
      }
      updateS<T, KH, LDK>(S, N, Ks, auxs, kb, lane);
    }
    if (hT) {
#pragma unroll
      for (int nt = 0; nt < KH / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          int kk = kb + 8 * nt + 2 * tq + (e & 1), col = v0 + vw + gq + 8 * (e >> 1);
          hT[stateBase + size_t(kk) * V + col] = S[nt][e];
        }
    }
  } else {
    // Token block np is this output warp's when KS2 = 1, or when it is in {0, 3} (kh = 0) / {1, 2} (kh = 1):
    // equal shares of the triangular νᵀ Aqkᵀ product.
    auto own = [&](int np) { return KS2 == 1 || (((np == 0) | (np == 3)) == (kh == 0)); };
    int st = 0;
    for (int64_t t0 = seqBegin; t0 < seqEnd; t0 += C, st ^= (ST - 1)) {
      const int L = int(seqEnd - t0 < C ? seqEnd - t0 : C);
      const T* Qs = reinterpret_cast<const T*>(stage0 + st * SB);
      const T* Ks = Qs + C * LDK;
      T* Vs = const_cast<T*>(Ks + C * LDK + C * LDC);
      const float* auxs = reinterpret_cast<const float*>(Vs + C * LDV);
      const T* AQs = reinterpret_cast<const T*>(auxs + kAuxFloats);  // Aqk from the prep, loaded with the stage
      top(t0, st, [] {});
      if (!wantO) continue;
      // Chunk-start Sᵀ from the recurrence warps.
      float O[8][4] = {};
      outQS<T, K>(O, [&](int ks) { return *reinterpret_cast<const uint4*>(xS + ks * 128); }, Qs, auxs, lane, own);
      namedSync(1 + cg, kNuCount);  // νᵀ from the recurrence warps
      uint32_t Nf[4][4];
#pragma unroll
      for (int ks = 0; ks < 4; ++ks) {
        const uint4 n4 = *reinterpret_cast<const uint4*>(xN + ks * 128);
        Nf[ks][0] = n4.x;
        Nf[ks][1] = n4.y;
        Nf[ks][2] = n4.z;
        Nf[ks][3] = n4.w;
      }
      outNuAQ<T>(O, Nf, AQs, lane, own);
      // o staged in this group's columns of Vs (the recurrence warps read them before they arrived).
      outStore<T, LDV>(O, Vs + vw, o + (t0 * HV + hv) * V + v0 + vw, int64_t(HV) * V, L, lane, own);
    }
  }
}

// Kernel 2, v7 (session 5, `ringKernel`): the two roles decoupled. One block per (sequence, value head, 128 columns
// of V), 8 recurrence + 8 output warps (one per 16 columns each), one block per SM. Each role loads what it
// consumes into its own two-slot ring by cp.async (recurrence: K, Ab, V, aux; output: Q, Aqk, aux) and meets only
// its own warps at one named barrier per chunk (the slot it refills was released by all of them), so loads are
// always a chunk ahead. The recurrence warps hand the chunk-start Sᵀ and νᵀ over through one exchange slot per
// group: "ready" (recurrence arrive, output sync) after both are written, "free" (output arrive, recurrence sync)
// once the output warps hold them in registers, before the exchange is written again (at the top of the next
// chunk). So the recurrence warps run up to a chunk ahead of the output warps and do not wait for their
// products or o stores unless those take longer than a chunk of the chain (v6: 22 % of the recurrence warps' time
// at the chunk-top barrier, 13 % on the single stage's cp.async). o only (the backward's checkpoint pass without o
// keeps the ws kernel); where it runs: see runWs. 218 KB of shared memory, so sm_90 only.
// WG: D (+)= A Bᵀ over the lower 16 × 16 blocks of a C × C K-major swizzled tile B at `b` (Ab or Aqk: row i, column
// j; blocks above the diagonal are never read), A the warp's four k-step fragments: token block np takes k-steps
// ks ≤ np, one m64n16k16 each into its own 8 accumulators (sub-ranges of one larger accumulator block made ptxas
// serialise the wgmma group).
template <typename T>
__device__ __forceinline__ void lowerRS(float (&d)[8][4], const uint32_t (&a)[4][4], unsigned b, int accumulate) {
#pragma unroll
  for (int np = 0; np < 4; ++np)
#pragma unroll
    for (int ks = 0; ks <= np; ++ks)
      wg::mmaRS<T, 16, 0>(&d[2 * np][0], a[ks], wg::desc(b + 16 * 128 * np + 32 * ks), ks > 0 || accumulate);
}

template <int K, bool WG = false>
struct RingLayout {
  // WG: K, Q, Ab, Aqk as 128-byte-swizzled tiles (wgmma operands: K / Q two 64-column halves of C × 128 B), no padding.
  static constexpr int LDK = WG ? K : K + 8, LDA = WG ? C : LDC, VT = 128, LDV = VT + 8, LDO = 24;  // LDO: 48-byte o rows, stmatrix conflict-free
  static constexpr size_t kRec = 2 * (size_t(C) * LDK + size_t(C) * LDA + size_t(C) * LDV) + 4 * kAuxFloats;  // K, Ab, V, aux
  static constexpr size_t kOut = 2 * (size_t(C) * LDK + size_t(C) * LDA) + 4 * kAuxFloats;                    // Q, Aqk, aux
  static constexpr size_t kXch = 8 * 4 * size_t(wsXchgWords<K, 1>());                                  // Sᵀ, νᵀ per group
  static constexpr size_t kO = 8 * size_t(C) * LDO * 2;                                                // o per output warp
  static constexpr size_t total = 2 * kRec + 2 * kOut + kXch + kO;  // 214 KB at K = 128 (WG: 206 KB)
  static constexpr size_t kBars = 4 * 8;                              // BULK: "full" mbarriers, rec[2] then out[2]
  static constexpr size_t kAlign = WG ? 1024 : 0;                     // WG: the swizzled tiles 1024-byte aligned
  static_assert(!WG || (kRec % 1024 == 0 && kOut % 1024 == 0 && K == 128), "ring WG: 1024-byte aligned tiles, K = 128");
};

// BULK (TCAL_GDN_WS=ringbulk, sm_90): each role's slots filled by bulk copies completing on a "full" mbarrier per
// slot instead of per-thread cp.async + cp.async.wait + a barrier of the role. Recurrence warp w copies 32 rows of
// tile w / 2 (K, Ab, V, aux), output warp w < 6 those of tile w / 2 (Q, Aqk, aux); consumers wait on the slot's
// phase parity. No "empty" barrier is needed: the block-wide exchange barriers already say when a slot is free —
// a recurrence warp passes kBarFree of chunk i only once every recurrence warp has arrived there, i.e. finished
// chunk i − 1 (its reads of the other slot), and an output warp passes kBarReady of chunk i only once every output
// warp has finished chunk i − 1. So the recurrence role refills after kBarFree, the output role after kBarReady,
// kBarRec / kBarOut go, and a recurrence warp issues at most one tensor copy per chunk (32 1-D row copies in the
// tail chunk) instead of 256 / 8 cp.async pieces per thread.
// WG: registers per thread of the recurrence / output warpgroups, (144 + 112) / 2 = 128 (ptxas serialised the wgmma
// groups for want of registers at 152 / 104, 136 / 120, 160 / 96 and 168 / 88).
constexpr int kWgRecRegs = 144, kWgOutRegs = 112;
struct RingMaps {  // BULK: [tokens, heads, columns] views of k, Ab, v, q, Aqk; boxes 32 tokens × a padded row
  CUtensorMap k, ab, v, q, aq;
};

template <typename T, int K, bool CK16, bool BULK, bool WG>
__device__ __forceinline__ void ringBody(const int* __restrict__ cu, int H, int HV, int V, const T* __restrict__ q,
                                         const T* __restrict__ k, const T* __restrict__ v, const T* __restrict__ Ab,
                                         const T* __restrict__ AQ, const float* __restrict__ aux,
                                         const float* __restrict__ h0, T* __restrict__ o, float* __restrict__ hT,
                                         void* __restrict__ ckpt, const int* __restrict__ chunkFirst,
                                         const RingMaps* maps) {
  using Lay = RingLayout<K, WG>;
  constexpr int LDK = Lay::LDK, LDA = Lay::LDA, VT = Lay::VT, LDV = Lay::LDV, LDO = Lay::LDO, KS = K / 16;
  constexpr int NR = 256;  // threads per role
  constexpr int XW = wsXchgWords<K, 1>();
  constexpr int kBarRec = 1, kBarOut = 2, kBarReady = 3, kBarFree = 4, kBarWg = 5;  // WG: 5, 6 per recurrence warpgroup
  extern __shared__ __align__(128) unsigned char smRaw[];
  unsigned char* sm = smRaw;
  if constexpr (WG) sm += (1024u - (smemAddr(smRaw) & 1023u)) & 1023u;  // the swizzle is address-based
  unsigned char* recSlots = sm;
  unsigned char* outSlots = sm + 2 * Lay::kRec;
  uint32_t* xch = reinterpret_cast<uint32_t*>(outSlots + 2 * Lay::kOut);
  T* oStage = reinterpret_cast<T*>(reinterpret_cast<unsigned char*>(xch) + Lay::kXch);
  constexpr bool bulk = BULK && TCAL_GDN_BULK;
  uint64_t* fullBar = reinterpret_cast<uint64_t*>(sm + Lay::total);  // BULK only: rec slots 0, 1; out slots 2, 3

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, rtid = tid % NR;
  const bool rec = warp < 8;
  const int cg = warp % 8;
  const int gq = lane / 4, tq = lane % 4;
  const int hv = blockIdx.y, n = blockIdx.z, h = hv / (HV / H);
  const int v0 = blockIdx.x * VT, vw = 16 * cg;
  const int64_t seqBegin = cu[n], seqEnd = cu[n + 1];
  // WG: Sᵀ of each recurrence warpgroup as a wgmma A tile (64 columns × K, two swizzled halves; the P product's
  // operand, the output warps' fragments by ldmatrix), then νᵀ per group as below.
  unsigned char* xSt = reinterpret_cast<unsigned char*>(xch) + (cg / 4) * (C * 2 * K);
  uint32_t* xS = WG ? nullptr : xch + cg * XW + lane * 4;  // [ks] uint4 per lane
  uint32_t* xN = WG ? reinterpret_cast<uint32_t*>(reinterpret_cast<unsigned char*>(xch) + 2 * C * 2 * K) + cg * 512 + lane * 4
                    : xS + KS * 128;  // [ks] uint4 per lane
  const int wr = cg % 4;  // WG: this warp's 16 rows of its warpgroup's 64
  auto chunkLen = [&](int64_t tc) { return int(seqEnd - tc < C ? seqEnd - tc : C); };
#if TCAL_GDN_BULK
  if constexpr (bulk) {
    if (tid == 0) {  // one arrival per issuing warp and chunk: 8 recurrence warps, output warps 0 … 5
      mbarInit(fullBar + 0, 8);
      mbarInit(fullBar + 1, 8);
      mbarInit(fullBar + 2, 6);
      mbarInit(fullBar + 3, 6);
      mbarInitFence();
    }
    __syncthreads();
  }
#endif
  waitForPrerequisite();  // the prep's Ab, Aqk, aux

  if (rec) {
#ifdef TCAL_WGMMA
    // WG: the register file split between the roles (the launch count is 128: the host checks it), so that the
    // recurrence warps hold Sᵀ, Pᵀ / νᵀ and the operands of their wgmma groups in flight without serialising them.
    if constexpr (WG) asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kWgRecRegs));
#endif
    auto slot = [&](int s) { return reinterpret_cast<T*>(recSlots + s * Lay::kRec); };
    auto issue = [&](int64_t tc, int gc, int s) {  // the chunk at token tc, global chunk gc, into slot s
      T* Ks = slot(s);
      T* Abs = Ks + C * LDK;
      T* Vs = Abs + C * LDA;
      float* auxs = reinterpret_cast<float*>(Vs + C * LDV);
      const int Lc = chunkLen(tc);
      // The thread index through an opaque move: the per-piece offsets are recomputed here instead of being
      // hoisted out of the chunk loop, where ≈ 30 registers of them stayed live through the chain (ptxas: spills).
      int me;
      asm volatile("mov.u32 %0, %1;\n" : "=r"(me) : "r"(rtid));
#if TCAL_GDN_BULK
      if constexpr (bulk) {
        const int w = me / 32, rowBase = 32 * (w & 1);
        if (w >> 1 == 3) {  // aux: one half per warp
          bulkAuxHalf(auxs, auxOf(aux, gc, HV, hv), w & 1, fullBar + s, me % 32);
          return;
        }
        if constexpr (WG) {
          if (w >> 1 == 0) {
            swzRows(reinterpret_cast<unsigned char*>(Ks), K / 64, reinterpret_cast<const unsigned char*>(k + (tc * H + h) * K),
                    2 * int64_t(H) * K, &maps->k, h, int(tc), rowBase, Lc, fullBar + s, me % 32);
            return;
          }
          if (w >> 1 == 1) {
            swzRows(reinterpret_cast<unsigned char*>(Abs), 1, reinterpret_cast<const unsigned char*>(Ab + (tc * HV + hv) * C),
                    2 * int64_t(HV) * C, &maps->ab, hv, int(tc), rowBase, Lc, fullBar + s, me % 32);
            return;
          }
        }
        unsigned char* dst;
        const unsigned char* src;
        const CUtensorMap* map;
        int64_t stride;
        int pitch, bytes, c0 = 0, c1 = hv;
        switch (w >> 1) {
          case 0:
            dst = reinterpret_cast<unsigned char*>(Ks), pitch = 2 * LDK, bytes = 2 * K, map = &maps->k, c1 = h;
            src = reinterpret_cast<const unsigned char*>(k + (tc * H + h) * K), stride = 2 * int64_t(H) * K;
            break;
          case 1:
            dst = reinterpret_cast<unsigned char*>(Abs), pitch = 2 * LDC, bytes = 2 * C, map = &maps->ab;
            src = reinterpret_cast<const unsigned char*>(Ab + (tc * HV + hv) * C), stride = 2 * int64_t(HV) * C;
            break;
          default:
            dst = reinterpret_cast<unsigned char*>(Vs), pitch = 2 * LDV, bytes = 2 * VT, map = &maps->v, c0 = v0;
            src = reinterpret_cast<const unsigned char*>(v + (tc * HV + hv) * V + v0), stride = 2 * int64_t(HV) * V;
            break;
        }
        bulkRows(dst, pitch, src, stride, bytes, map, c0, c1, int(tc), rowBase, Lc, fullBar + s, me % 32);
        return;
      }
#endif
      tileAsync<K / 8, LDK, NR>(Ks, k + (tc * H + h) * K, int64_t(H) * K, Lc, me);
      tileAsync<C / 8, LDC, NR>(Abs, Ab + (tc * HV + hv) * C, int64_t(HV) * C, Lc, me);
      tileAsync<VT / 8, LDV, NR>(Vs, v + (tc * HV + hv) * V + v0, int64_t(HV) * V, Lc, me);
      auxAsync<NR>(auxs, auxOf(aux, gc, HV, hv), me);
    };
    if (seqBegin < seqEnd) issue(seqBegin, chunkFirst[n], 0);
    if constexpr (!bulk) cpAsyncCommit();
    const size_t stateBase = (size_t(n) * HV + hv) * K * V;
    float S[K / 8][4];
#pragma unroll
    for (int nt = 0; nt < K / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        int kk = 8 * nt + 2 * tq + (e & 1), col = v0 + vw + gq + 8 * (e >> 1);
        S[nt][e] = h0 ? h0[stateBase + size_t(kk) * V + col] : 0.f;
      }
    int chunk = chunkFirst[n];
    int s = 0;
    unsigned ph = 0;  // BULK: parity of this chunk's phase of its slot's full barrier
    for (int64_t t0 = seqBegin; t0 < seqEnd; t0 += C, ++chunk, ph ^= s, s ^= 1) {
      if constexpr (!bulk) {
        cpAsyncWait<0>();        // this chunk's slot (issued a chunk ago) has landed for this thread …
        namedSync(kBarRec, NR);  // … and for all; every recurrence warp is done with the other slot
        if (t0 + C < seqEnd) issue(t0 + C, chunk + 1, s ^ 1);
        cpAsyncCommit();
      }
      const T* Ks = slot(s);
      const T* Abs = Ks + C * LDK;
      const T* Vs = Abs + C * LDA;
      const float* auxs = reinterpret_cast<const float*>(Vs + C * LDV);
      if (ckpt) storeCkpt<K, CK16>(S, ckpt, (size_t(chunk) * HV + hv) * K * V, V, 0, v0 + vw, lane);
      // The output warps hold the previous chunk's Sᵀ, νᵀ: write this chunk's Sᵀ now (written after νᵀ, with S
      // and N both live, it spilled 400 B — ptxas, K = 128).
      namedSync(kBarFree, 2 * NR);
      if constexpr (bulk) {  // every recurrence warp is past chunk i − 1: refill its slot
        if (t0 + C < seqEnd) issue(t0 + C, chunk + 1, s ^ 1);
      }
      if constexpr (WG) {  // the chunk on wgmma (one warpgroup per 64 columns)
        const int m = lane / 8, row = 16 * wr + lane % 8 + 8 * (m & 1);
#pragma unroll
        for (int ks = 0; ks < KS; ++ks)  // Sᵀ into the warpgroup's A tile, then visible to its tensor cores
          stsm4(xSt + (ks / 4) * C * 128 + swz128(row, 2 * (ks % 4) + (m >> 1)), pack2<T>(S[2 * ks][0], S[2 * ks][1]),
                pack2<T>(S[2 * ks][2], S[2 * ks][3]), pack2<T>(S[2 * ks + 1][0], S[2 * ks + 1][1]),
                pack2<T>(S[2 * ks + 1][2], S[2 * ks + 1][3]));
        wg::fenceProxy();
        namedSync(kBarWg + cg / 4, 128);
#if TCAL_GDN_BULK
        mbarWait(fullBar + s, ph);
#endif
        const unsigned xa = smemAddr(xSt), ka = smemAddr(Ks), aba = smemAddr(Abs);
        float P[8][4], N[8][4];
        wg::fence();
#pragma unroll
        for (int ks = 0; ks < KS; ++ks) {  // Pᵀ = Sᵀ Kᵀ
          const unsigned off = (ks / 4) * C * 128 + 32 * (ks % 4);
          wg::qk<T>(P, wg::desc(xa + off), wg::desc(ka + off), ks > 0);
        }
        wg::commit();
        wg::wait0();
        wg::pin(P);
        uint32_t Xa[4][4];
        formX<T, LDV>(Xa, P, Vs, vw, auxs, lane);
        wg::fence();  // νᵀ = Xᵀ Abᵀ (Ab lower triangular)
        lowerRS<T>(N, Xa, aba, 0);
        wg::commit();
        wg::wait0();
        wg::pin(N);
#pragma unroll
        for (int ks = 0; ks < 4; ++ks) *reinterpret_cast<uint4*>(xN + ks * 128) = packFrag<T>(N[2 * ks], N[2 * ks + 1]);
        namedArrive(kBarReady, 2 * NR);
        scaleForUpdate<K>(S, N, auxs, lane);
        uint32_t Na[4][4];
#pragma unroll
        for (int ks = 0; ks < 4; ++ks) {
          const uint4 a4 = packFrag<T>(N[2 * ks], N[2 * ks + 1]);
          Na[ks][0] = a4.x, Na[ks][1] = a4.y, Na[ks][2] = a4.z, Na[ks][3] = a4.w;
        }
        wg::fence();  // Sᵀ += Nᵀ K: K's rows are the k index (MN-major), the halves 8 KB apart
#pragma unroll
        for (int ks = 0; ks < 4; ++ks) wg::mmaRS<T, 128, 1>(&S[0][0], Na[ks], wg::descMN(ka + ks * 16 * 128, C * 128), 1);
        wg::commit();
        wg::wait0();
        wg::pin(S);
      } else {
#pragma unroll
        for (int ks = 0; ks < KS; ++ks) *reinterpret_cast<uint4*>(xS + ks * 128) = packFrag<T>(S[2 * ks], S[2 * ks + 1]);
#if TCAL_GDN_BULK
        if constexpr (bulk) mbarWait(fullBar + s, ph);  // this chunk's slot (issued a chunk ago) has landed
#endif
        float N[8][4] = {};
        {
          float P[8][4] = {};
          // The A fragments back from the exchange: packed again from S (or forwarded by the compiler), all 32
          // stay live through the products (ptxas: 192 B of spill instead of 76).
          formP<T, K, LDK>(P, [&](int ks) { return lds128(xS + ks * 128); }, Ks, 0, lane);
          formNu<T, LDV>(N, P, Vs, vw, auxs, Abs, lane);
        }
#pragma unroll
        for (int ks = 0; ks < 4; ++ks) *reinterpret_cast<uint4*>(xN + ks * 128) = packFrag<T>(N[2 * ks], N[2 * ks + 1]);
        namedArrive(kBarReady, 2 * NR);
        updateS<T, K, LDK>(S, N, Ks, auxs, 0, lane);
      }
    }
    if (hT) {
#pragma unroll
      for (int nt = 0; nt < K / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          int kk = 8 * nt + 2 * tq + (e & 1), col = v0 + vw + gq + 8 * (e >> 1);
          hT[stateBase + size_t(kk) * V + col] = S[nt][e];
        }
    }
  } else {
#ifdef TCAL_WGMMA
    if constexpr (WG) asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kWgOutRegs));
#endif
    auto slot = [&](int s) { return reinterpret_cast<T*>(outSlots + s * Lay::kOut); };
    auto issue = [&](int64_t tc, int gc, int s) {  // as in the recurrence role
      T* Qs = slot(s);
      T* AQs = Qs + C * LDK;
      float* auxs = reinterpret_cast<float*>(AQs + C * LDA);
      const int Lc = chunkLen(tc);
      int me;  // as in the recurrence role
      asm volatile("mov.u32 %0, %1;\n" : "=r"(me) : "r"(rtid));
#if TCAL_GDN_BULK
      if constexpr (bulk) {
        const int w = me / 32, rowBase = 32 * (w & 1);
        if (w >= 2 * 3) return;  // three tiles, two warps each
        if (w >> 1 == 2) {  // aux: one half per warp
          bulkAuxHalf(auxs, auxOf(aux, gc, HV, hv), w & 1, fullBar + 2 + s, me % 32);
          return;
        }
        if constexpr (WG) {
          if (w >> 1 == 0)
            swzRows(reinterpret_cast<unsigned char*>(Qs), K / 64, reinterpret_cast<const unsigned char*>(q + (tc * H + h) * K),
                    2 * int64_t(H) * K, &maps->q, h, int(tc), rowBase, Lc, fullBar + 2 + s, me % 32);
          else
            swzRows(reinterpret_cast<unsigned char*>(AQs), 1, reinterpret_cast<const unsigned char*>(AQ + (tc * HV + hv) * C),
                    2 * int64_t(HV) * C, &maps->aq, hv, int(tc), rowBase, Lc, fullBar + 2 + s, me % 32);
          return;
        }
        unsigned char* dst;
        const unsigned char* src;
        const CUtensorMap* map;
        int64_t stride;
        int pitch, bytes, c1 = hv;
        switch (w >> 1) {
          case 0:
            dst = reinterpret_cast<unsigned char*>(Qs), pitch = 2 * LDK, bytes = 2 * K, map = &maps->q, c1 = h;
            src = reinterpret_cast<const unsigned char*>(q + (tc * H + h) * K), stride = 2 * int64_t(H) * K;
            break;
          default:
            dst = reinterpret_cast<unsigned char*>(AQs), pitch = 2 * LDC, bytes = 2 * C, map = &maps->aq;
            src = reinterpret_cast<const unsigned char*>(AQ + (tc * HV + hv) * C), stride = 2 * int64_t(HV) * C;
            break;
        }
        bulkRows(dst, pitch, src, stride, bytes, map, 0, c1, int(tc), rowBase, Lc, fullBar + 2 + s, me % 32);
        return;
      }
#endif
      tileAsync<K / 8, LDK, NR>(Qs, q + (tc * H + h) * K, int64_t(H) * K, Lc, me);
      tileAsync<C / 8, LDC, NR>(AQs, AQ + (tc * HV + hv) * C, int64_t(HV) * C, Lc, me);
      auxAsync<NR>(auxs, auxOf(aux, gc, HV, hv), me);
    };
    auto own = [](int) { return true; };
    T* Os = oStage + cg * C * LDO;
    if (seqBegin < seqEnd) {
      issue(seqBegin, chunkFirst[n], 0);
      namedArrive(kBarFree, 2 * NR);  // the exchange starts free
    }
    if constexpr (!bulk) cpAsyncCommit();
    int s = 0, chunk = chunkFirst[n];
    unsigned ph = 0;  // BULK: as in the recurrence role
    for (int64_t t0 = seqBegin; t0 < seqEnd; t0 += C, ++chunk, ph ^= s, s ^= 1) {
      const int L = chunkLen(t0);
      if constexpr (!bulk) {
        cpAsyncWait<0>();
        namedSync(kBarOut, NR);
        if (t0 + C < seqEnd) issue(t0 + C, chunk + 1, s ^ 1);
        cpAsyncCommit();
      }
      const T* Qs = slot(s);
      const T* AQs = Qs + C * LDK;
      const float* auxs = reinterpret_cast<const float*>(AQs + C * LDA);
      namedSync(kBarReady, 2 * NR);  // this chunk's Sᵀ, νᵀ
      uint4 Sf[KS];
      uint32_t Nf[4][4];
      if constexpr (WG) {  // this warp's rows of its warpgroup's Sᵀ tile as A fragments
#pragma unroll
        for (int ks = 0; ks < KS; ++ks) {
          uint32_t a[4];
          ldsm4(a, xSt + (ks / 4) * C * 128 + swz128(16 * wr + lane % 16, 2 * (ks % 4) + lane / 16));
          Sf[ks] = make_uint4(a[0], a[1], a[2], a[3]);
        }
      } else {
#pragma unroll
        for (int ks = 0; ks < KS; ++ks) Sf[ks] = *reinterpret_cast<const uint4*>(xS + ks * 128);
      }
#pragma unroll
      for (int ks = 0; ks < 4; ++ks) {
        const uint4 n4 = *reinterpret_cast<const uint4*>(xN + ks * 128);
        Nf[ks][0] = n4.x;
        Nf[ks][1] = n4.y;
        Nf[ks][2] = n4.z;
        Nf[ks][3] = n4.w;
      }
      if (t0 + C < seqEnd) namedArrive(kBarFree, 2 * NR);  // (one arrival per recurrence-side wait)
      if constexpr (bulk) {  // every output warp is past chunk i − 1 (kBarReady): refill its slot, wait for this one
        if (t0 + C < seqEnd) issue(t0 + C, chunk + 1, s ^ 1);
#if TCAL_GDN_BULK
        mbarWait(fullBar + 2 + s, ph);
#endif
      }
      float O[8][4] = {};
      if constexpr (WG) {
        const unsigned qa = smemAddr(Qs), aqa = smemAddr(AQs);
        wg::fence();
#pragma unroll
        for (int ks = 0; ks < KS; ++ks) {  // Oᵀ = Sᵀ Q̃ᵀ
          const uint32_t sa[4] = {Sf[ks].x, Sf[ks].y, Sf[ks].z, Sf[ks].w};
          wg::mmaRS<T, 64, 0>(&O[0][0], sa, wg::desc(qa + (ks / 4) * C * 128 + 32 * (ks % 4)), ks > 0);
        }
        wg::commit();
        wg::wait0();
        wg::pin(O);
        scaleO(O, auxs, lane);
        wg::fence();  // Oᵀ += νᵀ Aqkᵀ (the prep writes Aqk's lower blocks only)
        lowerRS<T>(O, Nf, aqa, 1);
        wg::commit();
        wg::wait0();
        wg::pin(O);
      } else {
        outQS<T, K>(O, [&](int ks) { return Sf[ks]; }, Qs, auxs, lane, own);
        outNuAQ<T>(O, Nf, AQs, lane, own);
      }
      outStore<T, LDO>(O, Os, o + (t0 * HV + hv) * V + v0 + vw, int64_t(HV) * V, L, lane, own);
      __syncwarp();  // every lane has read Os before the next chunk's stmatrix
    }
  }
}

#define TCAL_RING_PARAMS                                                                                            \
  const int *__restrict__ cu, int H, int HV, int V, const T *__restrict__ q, const T *__restrict__ k,              \
      const T *__restrict__ v, const T *__restrict__ Ab, const T *__restrict__ AQ, const float *__restrict__ aux,  \
      const float *__restrict__ h0, T *__restrict__ o, float *__restrict__ hT, void *__restrict__ ckpt,            \
      const int *__restrict__ chunkFirst
template <typename T, int K, bool CK16>
__global__ void __launch_bounds__(512, 1) ringKernel(TCAL_RING_PARAMS) {
  ringBody<T, K, CK16, false, false>(cu, H, HV, V, q, k, v, Ab, AQ, aux, h0, o, hT, ckpt, chunkFirst, nullptr);
}
// The tensor maps as a kernel parameter (__grid_constant__: the copy engine reads them from the parameter space).
template <typename T, int K, bool CK16>
__global__ void __launch_bounds__(512, 1) ringBulkKernel(TCAL_RING_PARAMS, const __grid_constant__ RingMaps maps) {
  ringBody<T, K, CK16, true, false>(cu, H, HV, V, q, k, v, Ab, AQ, aux, h0, o, hT, ckpt, chunkFirst, &maps);
}
// The ring on wgmma (sm_90a builds only; the maps of k, Ab, q, Aqk with the 128-byte swizzle).
template <typename T, int K, bool CK16>
__global__ void __launch_bounds__(512, 1) ringWgKernel(TCAL_RING_PARAMS, const __grid_constant__ RingMaps maps) {
#ifdef TCAL_WGMMA
  ringBody<T, K, CK16, true, true>(cu, H, HV, V, q, k, v, Ab, AQ, aux, h0, o, hT, ckpt, chunkFirst, &maps);
#else
  __trap();
#endif
}
#undef TCAL_RING_PARAMS

// Benchmark-only switch: TCAL_GDN_V3_SKIP=prep | state leaves one kernel out (the output is then wrong) so
// that the other can be timed alone; =out runs the state pass without o (the output warps only load), which
// times the recurrence warps' chain alone.
bool skipped(const char* which) {
  const char* e = std::getenv("TCAL_GDN_V3_SKIP");
  return e && std::strcmp(e, which) == 0;
}

int smCount() {
  int sms = 132, dev = 0;
  if (cudaGetDevice(&dev) == cudaSuccess) cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  return sms;
}
// Shared memory one block may opt in to (227 KB on sm_90, 163 KB on sm_80: the ring kernel needs sm_90's).
size_t smemOptin() {
  int bytes = 0, dev = 0;
  if (cudaGetDevice(&dev) == cudaSuccess) cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  return size_t(bytes);
}
int ccMajor() {  // bulk copies (cp.async.bulk) need sm_90
  int major = 0, dev = 0;
  if (cudaGetDevice(&dev) == cudaSuccess) cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  return major;
}

// A state-pass kernel, launched as a programmatic dependent of the prep before it on the stream where the device
// has sm_90 (the kernels wait in waitForPrerequisite). TCAL_GDN_PDL=0 launches it plainly (benchmark switch).
template <typename... P, typename... A>
void launchAfterPrep(void (*kern)(P...), dim3 grid, int threads, size_t smem, cudaStream_t stream, const char* what,
                     A&&... args) {
  const char* e = std::getenv("TCAL_GDN_PDL");
  const bool off = e && std::strcmp(e, "0") == 0;
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = grid;
  cfg.blockDim = dim3(unsigned(threads));
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = &attr;
  cfg.numAttrs = !off && ccMajor() >= 9 ? 1 : 0;
  check(cudaLaunchKernelEx(&cfg, kern, std::forward<A>(args)...), what);
}

// Where 64-column blocks give at least one per SM: CG = 4, one recurrence warp per group, two blocks per SM
// (MINB = 2: ≤ 128 registers) with two load stages where 2 × the shared memory fits, else one. Where the grid
// is small (B2·T16384): 32-column blocks, K split between two recurrence warps per group (half the chain per
// chunk), one block per SM with two stages. (H200, session 3 run 2: 128-column blocks were no faster than
// 64-column ones, 32-column blocks without the K split slower than with it; both deleted.)
// TCAL_GDN_WS=wide|small forces one of the two (benchmark variants).
template <typename T, int K, int CG, int KS2, int ST, int MINB>
void launchWs(const gdn::Problem& p, const gdn::Inputs& in, const int* cu, const T* Ab, const T* AQ, const float* aux, T* o,
              float* hT, void* ckpt, bool ckpt16, const int* chunkFirst, cudaStream_t stream) {
  constexpr size_t smem = wsSmem<K, CG, KS2, ST>();
  auto kern = ckpt && ckpt16 ? wsKernel<T, K, CG, KS2, ST, MINB, true> : wsKernel<T, K, CG, KS2, ST, MINB, false>;
  check(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)),
        "cudaFuncSetAttribute(gdn v5 state)");
  dim3 grid(unsigned(p.V / (16 * CG)), unsigned(p.HV), unsigned(p.N));
  launchAfterPrep(kern, grid, 64 * CG * KS2, smem, stream, "gdn v5 state", cu, int(p.H), int(p.HV), int(p.V),
                  in.q.ptr<T>(), in.k.ptr<T>(), in.v.ptr<T>(), Ab, AQ, aux, p.hasH0 ? in.h0.ptr<float>() : nullptr,
                  o, hT, ckpt, chunkFirst);
}

// cuTensorMapEncodeTiled through the runtime's driver entry point (no link to libcuda); null where unavailable.
PFN_cuTensorMapEncodeTiled_v12000 tensorMapEncoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult found{};
#if CUDART_VERSION >= 12050
    const cudaError_t e = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &found);
#else
    const cudaError_t e = cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &f, cudaEnableDefault, &found);
#endif
    if (e != cudaSuccess) cudaGetLastError();
    return e == cudaSuccess && found == cudaDriverEntryPointSuccess ? reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f)
                                                                    : nullptr;
  }();
  return fn;
}

// A [tokens, heads, cols] view (element bytes eb, row pitch in elements): boxes of 32 tokens × boxCols columns,
// stored densely or (swizzle128: boxes of 128-byte rows) with the 128-byte swizzle of the wgmma operands.
void tokenMap(CUtensorMap* m, const void* base, int eb, int64_t tokens, int64_t heads, int64_t cols, int boxCols,
              bool swizzle128 = false) {
  const cuuint64_t dim[3] = {cuuint64_t(cols), cuuint64_t(heads), cuuint64_t(tokens)};
  const cuuint64_t stride[2] = {cuuint64_t(cols * eb), cuuint64_t(heads * cols * eb)};
  const cuuint32_t box[3] = {cuuint32_t(boxCols), 1, 32}, unit[3] = {1, 1, 1};
  const CUresult r = tensorMapEncoder()(m, eb == 2 ? CU_TENSOR_MAP_DATA_TYPE_UINT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 3,
                                        const_cast<void*>(base), dim, stride, box, unit, CU_TENSOR_MAP_INTERLEAVE_NONE,
                                        swizzle128 ? CU_TENSOR_MAP_SWIZZLE_128B : CU_TENSOR_MAP_SWIZZLE_NONE,
                                        CU_TENSOR_MAP_L2_PROMOTION_NONE,
                                        CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) {
    Error e(ErrorKind::Cuda, "cuTensorMapEncodeTiled (gdn ring bulk) failed: CUresult " + std::to_string(int(r)));
    e.op = "cuTensorMapEncodeTiled";
    e.number = int(r);
    throw e;
  }
}

// The wgmma ring's kernels launch with 128 registers per thread: setmaxnreg.inc in its recurrence warps waits for the
// registers its output warps release, so any other count would hang the block (checked once per instantiation).
template <typename T, int K>
bool ringWgLaunchRegs() {
  static const bool ok = [] {
    for (auto kern : {ringWgKernel<T, K, false>, ringWgKernel<T, K, true>}) {
      cudaFuncAttributes a{};
      if (cudaFuncGetAttributes(&a, kern) != cudaSuccess || a.numRegs != 128) {
        cudaGetLastError();
        return false;
      }
    }
    return true;
  }();
  return ok;
}

template <typename T, int K, bool BULK, bool WG = false>
void launchRing(const gdn::Problem& p, const gdn::Inputs& in, const int* cu, const T* Ab, const T* AQ, const float* aux,
                T* o, float* hT, void* ckpt, bool ckpt16, const int* chunkFirst, cudaStream_t stream) {
  using Lay = RingLayout<K, WG>;
  dim3 grid(unsigned(p.V / Lay::VT), unsigned(p.HV), unsigned(p.N));
  const float* h0 = p.hasH0 ? in.h0.ptr<float>() : nullptr;
  if constexpr (BULK) {  // WG (the wgmma ring): k, Ab, q, Aqk swizzled, boxes of 64 columns (128 B)
    constexpr size_t smem = Lay::total + Lay::kBars + Lay::kAlign;
    auto kern = [&] {
      if constexpr (WG)
        return ckpt && ckpt16 ? ringWgKernel<T, K, true> : ringWgKernel<T, K, false>;
      else
        return ckpt && ckpt16 ? ringBulkKernel<T, K, true> : ringBulkKernel<T, K, false>;
    }();
    const char* what = WG ? "gdn v9 state (wgmma)" : "gdn v7 state (bulk)";
    check(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)),
          WG ? "cudaFuncSetAttribute(gdn v9 state, wgmma)" : "cudaFuncSetAttribute(gdn v7 state, bulk)");
    const int64_t NT = p.tokens();  // token coordinates are 32-bit
    const int kBox = WG ? 64 : Lay::LDK;
    RingMaps maps;
    tokenMap(&maps.k, in.k.ptr<T>(), 2, NT, p.H, K, kBox, WG);
    tokenMap(&maps.ab, Ab, 2, NT, p.HV, C, Lay::LDA, WG);
    tokenMap(&maps.v, in.v.ptr<T>(), 2, NT, p.HV, p.V, Lay::LDV);
    tokenMap(&maps.q, in.q.ptr<T>(), 2, NT, p.H, K, kBox, WG);
    tokenMap(&maps.aq, AQ, 2, NT, p.HV, C, Lay::LDA, WG);
    launchAfterPrep(kern, grid, 512, smem, stream, what, cu, int(p.H), int(p.HV), int(p.V), in.q.ptr<T>(),
                    in.k.ptr<T>(), in.v.ptr<T>(), Ab, AQ, aux, h0, o, hT, ckpt, chunkFirst, maps);
  } else {
    constexpr size_t smem = Lay::total;
    auto kern = ckpt && ckpt16 ? ringKernel<T, K, true> : ringKernel<T, K, false>;
    check(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)),
          "cudaFuncSetAttribute(gdn v7 state)");
    launchAfterPrep(kern, grid, 512, smem, stream, "gdn v7 state", cu, int(p.H), int(p.HV), int(p.V), in.q.ptr<T>(),
                    in.k.ptr<T>(), in.v.ptr<T>(), Ab, AQ, aux, h0, o, hT, ckpt, chunkFirst);
  }
}

// The ring kernel (v7) where o is wanted, V % 128 = 0, the device has sm_90's shared memory and its 128-column
// blocks fill ≥ 90 % of the SMs (the reference shape: 128 blocks); else ws wide where 64-column blocks give at least
// one per SM, else ws small. H200, session 8 runs 2 and 3 (reference shape): ring 0.615 ms forward against ws wide's
// 0.649 (state pass 323 µs against 363 under ncu); at B2·T16384 (32 blocks) ring 1.525 against ws small's 0.966.
// Where the ring runs, its loads come by tensor / bulk copies on mbarriers (ringbulk, sm_90, session 9: state pass
// 0.303 ms against the cp.async ring's 0.337 at the reference shape, run 2) unless the driver lacks the tensor-map
// encoder; with K = 128 and sm_90a code it runs on wgmma (ringwg, session 11 run 2: state pass 0.281 → 0.221 ms).
// TCAL_GDN_WS=wide|small|ring forces one (ring: the cp.async ring, only where it can run); =ringbulk the bulk ring on
// mma.sync, =ringwg the wgmma ring, each wherever it can run (else what the default would pick).
template <typename T, int K>
void runWs(const gdn::Problem& p, const gdn::Inputs& in, const int* cu, const T* Ab, const T* AQ, const float* aux, T* o,
           float* hT, void* ckpt, bool ckpt16, const int* chunkFirst, cudaStream_t stream) {
  const int sms = smCount();
  constexpr int VT = RingLayout<K>::VT;
  const bool ringFits = o && p.V % VT == 0 && smemOptin() >= RingLayout<K>::total;
  bool wide = p.N * p.HV * (p.V / 64) >= sms;
  bool ring = ringFits && 10 * p.N * p.HV * (p.V / VT) >= 9 * int64_t(sms);
  const bool bulkFits = ringFits && ccMajor() >= 9 && smemOptin() >= RingLayout<K>::total + RingLayout<K>::kBars &&
                        p.tokens() < (int64_t(1) << 31);
  bool bulk = ring && bulkFits && tensorMapEncoder();
  // The ring on wgmma where the build has sm_90a code and K = 128 (the default in place of ringbulk since session 11).
  auto wgFits = [&] {
    if constexpr (K == 128)
      return bulkFits && smemOptin() >= RingLayout<K, true>::total + RingLayout<K, true>::kBars + RingLayout<K, true>::kAlign &&
             tensorMapEncoder() && hasWgmma(in.q.device(), stream) && ringWgLaunchRegs<T, K>();
    return false;
  };
  const char* e = std::getenv("TCAL_GDN_WS");
  bool wgmma = bulk && !e && wgFits();
  if (e) {
    if (std::strcmp(e, "ringwg") == 0) {  // wherever it can run (else the default)
      wgmma = wgFits();
    } else if (std::strcmp(e, "ringbulk") == 0) {
      bulk = bulkFits && tensorMapEncoder();
      ring = ring || bulk;
    } else {
      wide = std::strcmp(e, "small") != 0;
      ring = std::strcmp(e, "ring") == 0 && ringFits;
      bulk = false;
    }
  }
  if constexpr (K == 128) {
    if (wgmma) return launchRing<T, K, true, true>(p, in, cu, Ab, AQ, aux, o, hT, ckpt, ckpt16, chunkFirst, stream);
  }
  if (bulk) {
    launchRing<T, K, true>(p, in, cu, Ab, AQ, aux, o, hT, ckpt, ckpt16, chunkFirst, stream);
  } else if (ring) {
    launchRing<T, K, false>(p, in, cu, Ab, AQ, aux, o, hT, ckpt, ckpt16, chunkFirst, stream);
  } else if (!wide) {
    launchWs<T, K, 2, 2, 2, 1>(p, in, cu, Ab, AQ, aux, o, hT, ckpt, ckpt16, chunkFirst, stream);
  } else if constexpr (wsSmem<K, 4, 1, 2>() <= 113 * 1024) {
    launchWs<T, K, 4, 1, 2, 2>(p, in, cu, Ab, AQ, aux, o, hT, ckpt, ckpt16, chunkFirst, stream);
  } else {
    launchWs<T, K, 4, 1, 1, 2>(p, in, cu, Ab, AQ, aux, o, hT, ckpt, ckpt16, chunkFirst, stream);
  }
}

template <typename T, int K>
void run(const gdn::Problem& p, const gdn::Inputs& in, const int* cu, T* o, float* hT, void* ckpt, bool ckpt16,
         const int* chunkFirst, const Handover* ho, cudaStream_t stream) {
  const Device dev = in.q.device();
  const int64_t NT = p.tokens();
  Tensor Ab = empty({NT, p.HV, int64_t(C)}, in.q.dtype(), dev);
  int64_t maxLen = 0, chunks = 0;
  for (int64_t s = 0; s < p.N; ++s) {
    const int64_t len = p.cu[size_t(s) + 1] - p.cu[size_t(s)];
    maxLen = std::max(maxLen, len);
    chunks += (len + C - 1) / C;
  }
  Tensor aux = empty({std::max<int64_t>(chunks, 1), p.HV, int64_t(kAuxFloats)}, DType::F32, dev);
  if (skipped("out")) o = nullptr;
  // Aqk by the prep (once per chunk and head instead of once per V tile in the state pass), only for o.
  Tensor AQ = o ? empty({NT, p.HV, int64_t(C)}, in.q.dtype(), dev) : Tensor();
  T* AQp = AQ.defined() ? AQ.ptr<T>() : nullptr;
  if (ho && !AQp) throwInvalid("saveForBackward", "the GDN forward hands over the backward's prep outputs only with o");
  if (maxLen > 0 && !skipped("prep")) {
    constexpr size_t smem = prepSmem<K>();
    auto kern = ho ? prepKernel<T, K, true> : prepKernel<T, K, false>;
    check(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)),
          "cudaFuncSetAttribute(gdn v4 prep)");
    check(cudaFuncSetAttribute(kern, cudaFuncAttributePreferredSharedMemoryCarveout, 100),
          "cudaFuncSetAttribute(gdn v4 prep carveout)");
    dim3 grid(unsigned((maxLen + C - 1) / C), unsigned(p.HV), unsigned(p.N));
    kern<<<grid, kPrepThreads, smem, stream>>>(
        cu, int(p.H), int(p.HV), in.q.ptr<T>(), in.k.ptr<T>(), in.g.ptr<float>(), in.beta.ptr<float>(),
        p.fusedGates ? in.aLog.ptr<float>() : nullptr, p.fusedGates ? in.dtBias.ptr<float>() : nullptr,
        Ab.ptr<T>(), AQp, aux.ptr<float>(), chunkFirst, float(p.scale), p.l2norm, ho ? *ho : Handover{});
    checkLaunch("gdn v4 prep");
  }
  const T* Abp = Ab.ptr<T>();
  const float* auxp = aux.ptr<float>();
  if (skipped("state")) return;
  runWs<T, K>(p, in, cu, Abp, AQp, auxp, o, hT, ckpt, ckpt16, chunkFirst, stream);
}

bool aligned16(const Tensor& t) { return (reinterpret_cast<uintptr_t>(t.data()) & 15u) == 0; }

}  // namespace

bool alignedInputs(const gdn::Inputs& in, const Tensor& o);

bool eligible(const gdn::Problem& p, DType in, DType out) {
  return (in == DType::BF16 || in == DType::F16) && out == in && (p.K == 64 || p.K == 128) && p.V % 64 == 0;
}

void forward(const gdn::Problem& p, const gdn::Inputs& in, const Tensor& o, const Tensor& finalState, const int* cu,
             cudaStream_t stream, void* ckpt, DType ckptType, const int* chunkFirst, const Handover* handover) {
  if (p.N == 0) return;
  if (!chunkFirst) throwInvalid("chunkFirst", "GDN v3 forward needs each sequence's first global chunk");
  if (!alignedInputs(in, o)) throwInvalid("q", "GDN v3 forward needs 16-byte aligned q, k, v, o");
  if (ckpt && ckptType != DType::F32 && ckptType != DType::BF16)
    throwInvalid("ckpt", "GDN v3 forward writes checkpoints in f32 or bf16 only");
  const bool ckpt16 = ckptType == DType::BF16;
  auto go = [&](auto tag) {
    using T = typename decltype(tag)::type;
    T* op = o.defined() ? o.ptr<T>() : nullptr;
    float* hT = finalState.defined() ? finalState.ptr<float>() : nullptr;
    if (p.K == 64)
      run<T, 64>(p, in, cu, op, hT, ckpt, ckpt16, chunkFirst, handover, stream);
    else
      run<T, 128>(p, in, cu, op, hT, ckpt, ckpt16, chunkFirst, handover, stream);
  };
  if (in.q.dtype() == DType::BF16)
    go(DevTag<__nv_bfloat16>{});
  else
    go(DevTag<__half>{});
}

bool alignedInputs(const gdn::Inputs& in, const Tensor& o) {
  return aligned16(in.q) && aligned16(in.k) && aligned16(in.v) && (!o.defined() || aligned16(o));
}

}  // namespace tcal::cuda::gdn_v3
