// CUDA Gated DeltaNet backward, version 2: tensor cores (WMMA bf16/f16 16×16×16, fp32 accumulate) and the
// chunk-local work run for all chunks at once; only the dS recurrence is sequential. The chunk-start states
// S0 come from the forward (gdn.cu writes them with the v3 forward before calling this).
//
// Chunk algebra (as in gdn.cu, DESIGN.md §3): γ in-chunk cumsum of g, e = exp γ, d = exp(γ_L − γ),
// Γ_ij = exp(γ_i − γ_j) (i ≥ j: every exponent ≤ 0), KKG = KKᵀ⊙Γ (strictly lower), QKG = QKᵀ⊙Γ (lower),
// M = diag(β)KKG, A = (I + M)⁻¹, ν = A diag(β)(V − diag(e) K S0). Backward per chunk with dS the gradient of
// the chunk's final state:
//   dR = Aᵀ(QKGᵀ dO + diag(d) K dS) = P dO + W dS,  P = Aᵀ QKGᵀ, W = Aᵀ diag(d) K
//   dS_prev = e_L dS + Qᵀ diag(e) dO − Kᵀ diag(βe) dR
// Kernel 1 (prep, per chunk × value head): A (inverse in fp32, stored 16-bit), P, W, Qe = diag(e)Q,
//   Kn = −diag(βe)K, the normalised Q and K (16-bit, so that kernel 3 loads them by cp.async), e_L.
// Kernel 2 (state, per sequence × value head × 32 V columns, chunks in reverse): dR and dS by the two lines
//   above; writes the dS entering every chunk (fp32) and dh0.
// Kernel 3 (gradients, per chunk × value head × 64 V columns): from S0, dS and A, every gradient of the
//   chunk: dv = β dR; dq, dk, dγ, dβ as per-tile partial sums that gdn.cu's epilogues reduce (the same
//   formulas as v1's gdnBackwardKernel, including the cancellation-free dg sum for strong decay).
#include <mma.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <type_traits>

#include "../core/runtime.h"
#include "check.h"
#include "gdn_bwd_tc.h"
#include "types.cuh"

namespace tcal::cuda::gdn_bwd_tc {

namespace {

using namespace nvcuda;
using RM = wmma::row_major;
using CM = wmma::col_major;
using Acc = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

constexpr int C = gdn::kChunk;  // 64
constexpr int VT = kTileV;      // 64 columns per gradient block
constexpr int VS = 32;          // columns per state-pass block
constexpr int LB = 72;          // 16-bit row of a 64-wide tile (padded: no bank conflicts on fragment loads)
constexpr int LF = 68;          // fp32 row of a 64-wide tile
constexpr int LBS = 40;         // 16-bit row of a 32-wide tile
constexpr int LFS = 36;         // fp32 row of a 32-wide tile

// acc += op(A) tile (mi, ·) · op(B) tile (·, nj) over kd; row-major: element (r, c) at X[r·ld + c],
// col-major: at X[c·ld + r] (i.e. the transpose of a row-major buffer).
template <typename T, typename LA, typename LBL>
__device__ __forceinline__ void mmaAcc(Acc& acc, const T* A, int lda, const T* B, int ldb, int mi, int nj, int kd) {
  constexpr bool aRow = std::is_same<LA, RM>::value;
  constexpr bool bRow = std::is_same<LBL, RM>::value;
  wmma::fragment<wmma::matrix_a, 16, 16, 16, T, LA> a;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, T, LBL> b;
  for (int kk = 0; kk < kd; kk += 16) {
    wmma::load_matrix_sync(a, aRow ? A + mi * 16 * lda + kk : A + kk * lda + mi * 16, lda);
    wmma::load_matrix_sync(b, bRow ? B + kk * ldb + nj * 16 : B + nj * 16 * ldb + kk, ldb);
    wmma::mma_sync(acc, a, b, acc);
  }
}

// D (M × N fp32, shared) = op(A) · op(B); 16×16 output tiles spread over the block's warps.
template <typename T, typename LA, typename LBL>
__device__ void gemm(float* D, int ldd, const T* A, int lda, const T* B, int ldb, int M, int N, int kd) {
  const int warp = threadIdx.x / 32, nw = blockDim.x / 32, tn = N / 16;
  for (int t = warp; t < (M / 16) * tn; t += nw) {
    Acc acc;
    wmma::fill_fragment(acc, 0.f);
    mmaAcc<T, LA, LBL>(acc, A, lda, B, ldb, t / tn, t % tn, kd);
    wmma::store_matrix_sync(D + (t / tn) * 16 * ldd + (t % tn) * 16, acc, ldd, wmma::mem_row_major);
  }
}

// Global loads are issued in batches (cp.async, or all of a thread's loads before its first store): with one
// or two blocks per SM nothing else hides a DRAM round trip, so a loop that waits on each load in turn costs
// ~1 µs per iteration (the first GPU run of this file: 15 ms at the reference shape, mostly that).
__device__ __forceinline__ void cpAsync16(void* dst, const void* src) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(src));
}
__device__ __forceinline__ void cpAsyncWaitAll() {
  asm volatile("cp.async.commit_group;\ncp.async.wait_group 0;\n" ::);
}

// rows × cols 16-bit values, global (row stride lds) → shared (row stride ldd) by cp.async; rows ≥ valid are
// zeroed instead. Completes at cpAsyncWaitAll + barrier.
template <typename T>
__device__ void copyRowsAsync(T* dst, int ldd, const T* src, size_t lds, int rows, int cols, int valid) {
  const int per = cols / 8;
  for (int idx = threadIdx.x; idx < rows * per; idx += blockDim.x) {
    const int r = idx / per, c = (idx % per) * 8;
    if (r < valid)
      cpAsync16(dst + r * ldd + c, src + r * lds + c);
    else
      *reinterpret_cast<uint4*>(dst + r * ldd + c) = make_uint4(0u, 0u, 0u, 0u);
  }
}

template <typename T>
__device__ __forceinline__ void store4(T* d, float4 x) {
  d[0] = fromF<T>(x.x), d[1] = fromF<T>(x.y), d[2] = fromF<T>(x.z), d[3] = fromF<T>(x.w);
}

// γ (inclusive cumsum of g inside the chunk), e = exp γ, d = exp(γ_L − γ), β; zero past L. Needs ≥ 64 threads.
__device__ void loadGates(const float* g, const float* beta, int64_t t0, int L, int HV, int hv, float* gam,
                          float* ex, float* dd, float* bet) {
  const int i = threadIdx.x;
  if (i < C) {
    gam[i] = i < L ? g[(t0 + i) * HV + hv] : 0.f;
    bet[i] = i < L ? beta[(t0 + i) * HV + hv] : 0.f;
  }
  __syncthreads();
  if (i < 32) {  // warp scan, two tokens per lane
    const float a = gam[2 * i], b = gam[2 * i + 1];
    float s = a + b;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const float y = __shfl_up_sync(0xffffffffu, s, o);
      if (i >= o) s += y;
    }
    const float excl = s - (a + b);
    gam[2 * i] = excl + a;
    gam[2 * i + 1] = excl + a + b;
  }
  __syncthreads();
  if (i < C) {
    const float gL = gam[L - 1];
    ex[i] = i < L ? __expf(gam[i]) : 0.f;
    dd[i] = i < L ? __expf(gL - gam[i]) : 0.f;
  }
  __syncthreads();
}

constexpr int NTH = 256;  // threads of kernel 1
constexpr int NTG = 512;  // threads of kernel 3: one 208 KB block per SM, so its phases need all the warps

// Q (scaled, normalised) and K rows of a chunk, fp32 global → 16-bit shared (row stride K + 8); zero past L.
template <typename T, int K>
__device__ void loadQK(const float* qs, const float* ks, int64_t t0, int L, int H, int h, T* Qb, T* Kb) {
  constexpr int LK = K + 8, IT = C * K / 4 / NTH;
  float4 q[IT], k[IT];
#pragma unroll
  for (int u = 0; u < IT; ++u) {
    const int idx = threadIdx.x + u * NTH, i = idx / (K / 4), c = (idx % (K / 4)) * 4;
    q[u] = k[u] = make_float4(0.f, 0.f, 0.f, 0.f);
    if (i < L) {
      q[u] = __ldg(reinterpret_cast<const float4*>(qs + ((t0 + i) * H + h) * K + c));
      k[u] = __ldg(reinterpret_cast<const float4*>(ks + ((t0 + i) * H + h) * K + c));
    }
  }
#pragma unroll
  for (int u = 0; u < IT; ++u) {
    const int idx = threadIdx.x + u * NTH, i = idx / (K / 4), c = (idx % (K / 4)) * 4;
    store4(Qb + i * LK + c, q[u]);
    store4(Kb + i * LK + c, k[u]);
  }
}

// out[i] = Σ_c f(i, c) over the VT columns; NTG / C = 8 lanes per row.
template <typename Fn>
__device__ __forceinline__ void rowSums(float* out, Fn f) {
  constexpr int LN = NTG / C;
  const int i = threadIdx.x / LN, sub = threadIdx.x % LN;
  float s = 0.f;
#pragma unroll
  for (int c = sub; c < VT; c += LN) s += f(i, c);
#pragma unroll
  for (int o = 1; o < LN; o <<= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  if (sub == 0) out[i] = s;
}

// ---- kernel 1: per (chunk, value head) ----

template <int K>
constexpr size_t prepSmem() {
  return sizeof(float) * (2 * size_t(C) * LF + 4 * C) + 2 * (3 * size_t(C) * (K + 8) + 2 * size_t(C) * LB);
}

template <typename T, int K>
__global__ void __launch_bounds__(256, 2) prepKernel(const float* __restrict__ qs, const float* __restrict__ ks,
                                                  const float* __restrict__ g, const float* __restrict__ beta,
                                                  const int* __restrict__ chunkStart, const int* __restrict__ chunkLen,
                                                  int H, int HV, int G, T* __restrict__ Aout,
                                                  T* __restrict__ Pout, T* __restrict__ Wout, T* __restrict__ Qeout,
                                                  T* __restrict__ Knout, T* __restrict__ Qhout, T* __restrict__ Khout,
                                                  float* __restrict__ eLout) {
  constexpr int LK = K + 8;
  extern __shared__ __align__(128) unsigned char smem[];
  float* Sqk = reinterpret_cast<float*>(smem);  // C × LF; later A, then (with Skk) the W staging
  float* Skk = Sqk + C * LF;                    // C × LF; M, then P
  T* Qb = reinterpret_cast<T*>(Skk + C * LF);
  T* Kb = Qb + C * LK;
  T* Kd = Kb + C * LK;  // diag(d) K
  T* Ab = Kd + C * LK;  // C × LB
  T* QKGb = Ab + C * LB;
  float* gam = reinterpret_cast<float*>(QKGb + C * LB);
  float* ex = gam + C;
  float* dd = ex + C;
  float* bet = dd + C;
  const int ch = blockIdx.x, hv = blockIdx.y, h = hv / G;
  const int64_t t0 = chunkStart[ch];
  const int L = chunkLen[ch];
  const size_t blk = size_t(ch) * HV + hv;
  loadGates(g, beta, t0, L, HV, hv, gam, ex, dd, bet);
  loadQK<T, K>(qs, ks, t0, L, H, h, Qb, Kb);
  __syncthreads();
  for (int idx = threadIdx.x; idx < C * K / 8; idx += blockDim.x) {  // 16-bit Q, K for kernel 3 (cp.async there)
    const int r = idx / (K / 8), c = (idx % (K / 8)) * 8;
    *reinterpret_cast<uint4*>(Qhout + blk * C * K + r * K + c) = *reinterpret_cast<const uint4*>(Qb + r * LK + c);
    *reinterpret_cast<uint4*>(Khout + blk * C * K + r * K + c) = *reinterpret_cast<const uint4*>(Kb + r * LK + c);
  }
  for (int idx = threadIdx.x; idx < C * K; idx += blockDim.x) {
    const int i = idx / K, c = idx % K;
    const float q = toF(Qb[i * LK + c]), k = toF(Kb[i * LK + c]);
    Kd[i * LK + c] = fromF<T>(dd[i] * k);
    Qeout[blk * C * K + idx] = fromF<T>(ex[i] * q);
    Knout[blk * C * K + idx] = fromF<T>(-bet[i] * ex[i] * k);
  }
  if (threadIdx.x == 0) eLout[blk] = ex[L - 1];
  gemm<T, RM, CM>(Sqk, LF, Qb, LK, Kb, LK, C, C, K);  // Q Kᵀ
  gemm<T, RM, CM>(Skk, LF, Kb, LK, Kb, LK, C, C, K);  // K Kᵀ
  __syncthreads();
  for (int idx = threadIdx.x; idx < C * C; idx += blockDim.x) {
    const int i = idx / C, j = idx % C;
    const float gm = (j <= i && i < L) ? __expf(gam[i] - gam[j]) : 0.f;
    QKGb[i * LB + j] = fromF<T>(Sqk[i * LF + j] * gm);
    Skk[i * LF + j] = j < i ? bet[i] * Skk[i * LF + j] * gm : 0.f;  // M
  }
  __syncthreads();
  if (threadIdx.x < C) {
    // (I + M) A = I by forward substitution in fp32: thread c owns column c in registers (fully unrolled, M
    // rows read as broadcast float4, four partial sums). The first GPU runs used 4 lanes per column with
    // shuffles per step: 1.26 ms for this kernel at the reference shape, K-independent, i.e. this loop.
    const int c = threadIdx.x;
    float x[C];
#pragma unroll
    for (int i = 0; i < C; ++i) {
      float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma unroll
      for (int j = 0; j + 4 <= i; j += 4) {
        const float4 m = *reinterpret_cast<const float4*>(Skk + i * LF + j);
        s0 += m.x * x[j], s1 += m.y * x[j + 1], s2 += m.z * x[j + 2], s3 += m.w * x[j + 3];
      }
#pragma unroll
      for (int j = i & ~3; j < i; ++j) s0 += Skk[i * LF + j] * x[j];
      x[i] = (i == c ? 1.f : 0.f) - ((s0 + s1) + (s2 + s3));
    }
#pragma unroll
    for (int i = 0; i < C; ++i) Sqk[i * LF + c] = x[i];
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < C * C; idx += blockDim.x) {
    const int i = idx / C, j = idx % C;
    const T a = fromF<T>(Sqk[i * LF + j]);
    Aout[blk * C * C + idx] = a;
    Ab[i * LB + j] = a;
  }
  __syncthreads();
  gemm<T, CM, CM>(Skk, LF, Ab, LB, QKGb, LB, C, C, C);  // P = Aᵀ QKGᵀ
  __syncthreads();
  for (int idx = threadIdx.x; idx < C * C; idx += blockDim.x)
    Pout[blk * C * C + idx] = fromF<T>(Skk[(idx / C) * LF + idx % C]);
  __syncthreads();
  gemm<T, CM, RM>(Sqk, K + 4, Ab, LB, Kd, LK, C, K, C);  // W = Aᵀ diag(d) K, staged over Sqk and Skk
  __syncthreads();
  for (int idx = threadIdx.x; idx < C * K; idx += blockDim.x)
    Wout[blk * C * K + idx] = fromF<T>(Sqk[(idx / K) * (K + 4) + idx % K]);
}

// ---- kernel 2: dS recurrence per (sequence, value head, 32 columns), chunks in reverse ----

constexpr int kStateThreads = 128;

template <int K>
constexpr size_t stateSmem() {
  return sizeof(float) * (size_t(K) * LFS + C * LFS) +
         2 * (size_t(C) * LB + 3 * size_t(C) * (K + 8) + C * LBS + size_t(K) * LBS + C * LBS);
}

template <typename T, int K>
__global__ void __launch_bounds__(kStateThreads) stateKernel(
    const T* __restrict__ Pg, const T* __restrict__ Wg, const T* __restrict__ Qeg, const T* __restrict__ Kng,
    const float* __restrict__ eLg, const T* __restrict__ dO, const float* __restrict__ dFinal,
    const int* __restrict__ cu, const int* __restrict__ chunkFirst, int HV, int V, T* __restrict__ dSout,
    float* __restrict__ dh0) {
  constexpr int LK = K + 8;
  extern __shared__ __align__(128) unsigned char smem[];
  float* dSf = reinterpret_cast<float*>(smem);  // K × LFS
  float* dRf = dSf + K * LFS;                   // C × LFS
  T* Pb = reinterpret_cast<T*>(dRf + C * LFS);  // C × LB
  T* Wb = Pb + C * LB;                          // C × LK
  T* Qe = Wb + C * LK;
  T* Kn = Qe + C * LK;
  T* dOb = Kn + C * LK;   // C × LBS
  T* dSb = dOb + C * LBS;  // K × LBS
  T* dRb = dSb + K * LBS;  // C × LBS
  const int v0 = blockIdx.x * VS, hv = blockIdx.y, n = blockIdx.z, warp = threadIdx.x / 32;
  const size_t sBase = (size_t(n) * HV + hv) * K * V;
  for (int idx = threadIdx.x; idx < K * VS; idx += blockDim.x) {
    const int d = idx / VS, c = idx % VS;
    const float x = dFinal ? dFinal[sBase + size_t(d) * V + v0 + c] : 0.f;
    dSf[d * LFS + c] = x;
    dSb[d * LBS + c] = fromF<T>(x);
  }
  const int64_t seqBegin = cu[n], seqEnd = cu[n + 1];
  const int first = chunkFirst[n], nCh = chunkFirst[n + 1] - first;
  for (int ci = nCh - 1; ci >= 0; --ci) {
    const int ch = first + ci;
    const int64_t t0 = seqBegin + int64_t(ci) * C;
    const int L = int(seqEnd - t0 < C ? seqEnd - t0 : C);
    const size_t blk = size_t(ch) * HV + hv;
    __syncthreads();
    copyRowsAsync(Pb, LB, Pg + blk * C * C, C, C, C, C);
    copyRowsAsync(Wb, LK, Wg + blk * C * K, K, C, K, C);
    copyRowsAsync(Qe, LK, Qeg + blk * C * K, K, C, K, C);
    copyRowsAsync(Kn, LK, Kng + blk * C * K, K, C, K, C);
    copyRowsAsync(dOb, LBS, dO + (t0 * HV + hv) * V + v0, size_t(HV) * V, C, VS, L);
    T* dst = dSout + blk * K * V + v0;  // the 16-bit copy: kernel 3 uses it as an operand only
    for (int idx = threadIdx.x; idx < K * VS / 8; idx += blockDim.x) {
      const int d = idx / (VS / 8), c = (idx % (VS / 8)) * 8;
      *reinterpret_cast<uint4*>(dst + size_t(d) * V + c) = *reinterpret_cast<const uint4*>(dSb + d * LBS + c);
    }
    const float eL = eLg[blk];
    cpAsyncWaitAll();
    __syncthreads();
    for (int t = warp; t < (C / 16) * (VS / 16); t += kStateThreads / 32) {  // dR = P dO + W dS
      const int mi = t / (VS / 16), nj = t % (VS / 16);
      Acc acc;
      wmma::fill_fragment(acc, 0.f);
      mmaAcc<T, RM, RM>(acc, Pb, LB, dOb, LBS, mi, nj, C);
      mmaAcc<T, RM, RM>(acc, Wb, LK, dSb, LBS, mi, nj, K);
      wmma::store_matrix_sync(dRf + mi * 16 * LFS + nj * 16, acc, LFS, wmma::mem_row_major);
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < C * VS; idx += blockDim.x)
      dRb[(idx / VS) * LBS + idx % VS] = fromF<T>(dRf[(idx / VS) * LFS + idx % VS]);
    __syncthreads();
    for (int t = warp; t < (K / 16) * (VS / 16); t += kStateThreads / 32) {  // dS ← e_L dS + Qeᵀ dO + Knᵀ dR
      const int mi = t / (VS / 16), nj = t % (VS / 16);
      Acc acc;
      float* tileP = dSf + mi * 16 * LFS + nj * 16;
      wmma::load_matrix_sync(acc, tileP, LFS, wmma::mem_row_major);
#pragma unroll
      for (int e = 0; e < acc.num_elements; ++e) acc.x[e] *= eL;
      mmaAcc<T, CM, RM>(acc, Qe, LK, dOb, LBS, mi, nj, C);
      mmaAcc<T, CM, RM>(acc, Kn, LK, dRb, LBS, mi, nj, C);
      wmma::store_matrix_sync(tileP, acc, LFS, wmma::mem_row_major);
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < K * VS; idx += blockDim.x)
      dSb[(idx / VS) * LBS + idx % VS] = fromF<T>(dSf[(idx / VS) * LFS + idx % VS]);
  }
  __syncthreads();
  if (dh0)
    for (int idx = threadIdx.x; idx < K * VS; idx += blockDim.x) {
      const int d = idx / VS, c = idx % VS;
      dh0[sBase + size_t(d) * V + v0 + c] = dSf[d * LFS + c];
    }
}

// ---- kernel 3: gradients per (chunk, value head, 64 columns) ----

template <int K>
constexpr size_t gradSmem() {
  return sizeof(float) * (4 * size_t(C) * LF + 10 * C + 8) +
         2 * (2 * size_t(C) * (K + 8) + 2 * size_t(K) * LB + 7 * size_t(C) * LB);
}

template <typename T, int K>
__global__ void __launch_bounds__(NTG, 1) gradKernel(
    const float* __restrict__ g, const float* __restrict__ beta, const T* __restrict__ v, const T* __restrict__ dO,
    const float* __restrict__ ckpt, const T* __restrict__ dSg, const T* __restrict__ Ag, const T* __restrict__ Qhg,
    const T* __restrict__ Khg,
    const int* __restrict__ chunkStart, const int* __restrict__ chunkLen, int HV, int V, int64_t NT,
    T* __restrict__ dv, float* __restrict__ dqP, float* __restrict__ dkP, float* __restrict__ dgamP,
    float* __restrict__ dbetaP) {
  constexpr int LK = K + 8;
  extern __shared__ __align__(128) unsigned char smem[];
  float* Fa = reinterpret_cast<float*>(smem);  // four C × LF fp32 slots, contiguous (dq/dk staging at the end)
  float* Fb = Fa + C * LF;
  float* Fc = Fb + C * LF;
  float* Fd = Fc + C * LF;
  T* Qb = reinterpret_cast<T*>(Fd + C * LF);  // C × LK
  T* Kb = Qb + C * LK;
  T* S0b = Kb + C * LK;  // K × LB
  T* dSb = S0b + K * LB;
  T* B0 = dSb + K * LB;  // seven C × LB slots
  T* B1 = B0 + C * LB;
  T* B2 = B1 + C * LB;
  T* B3 = B2 + C * LB;
  T* B4 = B3 + C * LB;
  T* B5 = B4 + C * LB;
  T* B6 = B5 + C * LB;
  float* gam = reinterpret_cast<float*>(B6 + C * LB);
  float* ex = gam + C;
  float* dd = ex + C;
  float* bet = dd + C;
  float* sO = bet + C;
  float* sR = sO + C;
  float* sZ = sR + C;
  float* sB = sZ + C;
  float* Et = sB + C;
  float* Zt = Et + C;
  float* red = Zt + C;
  const int ch = blockIdx.x, hv = blockIdx.y, tile = blockIdx.z, v0 = tile * VT;
  const int64_t t0 = chunkStart[ch];
  const int L = chunkLen[ch];
  const size_t blk = size_t(ch) * HV + hv;
  if (threadIdx.x == 0) red[0] = 0.f;
  loadGates(g, beta, t0, L, HV, hv, gam, ex, dd, bet);
  copyRowsAsync(Qb, LK, Qhg + blk * C * K, size_t(K), C, K, C);  // normalised Q, K (16-bit, from kernel 1)
  copyRowsAsync(Kb, LK, Khg + blk * C * K, size_t(K), C, K, C);
  copyRowsAsync(B1, LB, Ag + blk * C * C, size_t(C), C, C, C);   // A
  copyRowsAsync(B6, LB, dO + (t0 * HV + hv) * V + v0, size_t(HV) * V, C, VT, L);  // dO
  copyRowsAsync(B4, LB, v + (t0 * HV + hv) * V + v0, size_t(HV) * V, C, VT, L);   // v (B4 until dR)
  copyRowsAsync(dSb, LB, dSg + blk * K * V + v0, size_t(V), K, VT, K);  // dS (16-bit from kernel 2)
  {  // S0 tile (K × VT) → 16-bit
    constexpr int IT = K * VT / 4 / NTG;
    float4 a[IT];
    const float* s0 = ckpt + blk * K * V + v0;
#pragma unroll
    for (int u = 0; u < IT; ++u) {
      const int idx = threadIdx.x + u * NTG, d = idx / (VT / 4), c = (idx % (VT / 4)) * 4;
      a[u] = __ldg(reinterpret_cast<const float4*>(s0 + size_t(d) * V + c));
    }
#pragma unroll
    for (int u = 0; u < IT; ++u) {
      const int idx = threadIdx.x + u * NTG, d = idx / (VT / 4), c = (idx % (VT / 4)) * 4;
      store4(S0b + d * LB + c, a[u]);
    }
  }
  cpAsyncWaitAll();
  __syncthreads();
  {  // <dS, S0> over this tile (for dg), from the 16-bit copies
    float part = 0.f;
    for (int idx = threadIdx.x; idx < K * VT; idx += NTG)
      part += toF(S0b[(idx / VT) * LB + idx % VT]) * toF(dSb[(idx / VT) * LB + idx % VT]);
    for (int o = 16; o; o >>= 1) part += __shfl_xor_sync(0xffffffffu, part, o);
    if ((threadIdx.x & 31) == 0) atomicAdd(red, part);
  }
  gemm<T, RM, RM>(Fa, LF, Qb, LK, S0b, LB, C, VT, K);  // Pq = Q S0
  gemm<T, RM, CM>(Fb, LF, Qb, LK, Kb, LK, C, C, K);    // Q Kᵀ
  __syncthreads();
  rowSums(sO, [&](int i, int c) { return toF(B6[i * LB + c]) * Fa[i * LF + c]; });
  for (int idx = threadIdx.x; idx < C * C; idx += blockDim.x) {  // QKG
    const int i = idx / C, j = idx % C;
    const float gm = (j <= i && i < L) ? __expf(gam[i] - gam[j]) : 0.f;
    B3[i * LB + j] = fromF<T>(Fb[i * LF + j] * gm);
  }
  __syncthreads();
  gemm<T, RM, RM>(Fa, LF, Kb, LK, S0b, LB, C, VT, K);  // Pk = K S0
  gemm<T, RM, RM>(Fb, LF, Kb, LK, dSb, LB, C, VT, K);  // dSk = K dS
  __syncthreads();
  for (int idx = threadIdx.x; idx < C * VT; idx += blockDim.x) {  // X = diag(β)(V − diag(e) Pk)
    const int i = idx / VT, c = idx % VT;
    const float x = i < L ? bet[i] * (toF(B4[i * LB + c]) - ex[i] * Fa[i * LF + c]) : 0.f;
    B0[i * LB + c] = fromF<T>(x);
  }
  __syncthreads();
  gemm<T, RM, RM>(Fc, LF, B1, LB, B0, LB, C, VT, C);  // ν = A X
  gemm<T, CM, RM>(Fd, LF, B3, LB, B6, LB, C, VT, C);  // QKGᵀ dO
  __syncthreads();
  rowSums(sZ, [&](int i, int c) { return Fb[i * LF + c] * Fc[i * LF + c]; });
  for (int idx = threadIdx.x; idx < C * VT; idx += blockDim.x) {
    const int i = idx / VT, c = idx % VT;
    B2[i * LB + c] = fromF<T>(Fc[i * LF + c]);                            // ν
    B5[i * LB + c] = fromF<T>(Fd[i * LF + c] + dd[i] * Fb[i * LF + c]);  // dν
  }
  __syncthreads();
  gemm<T, CM, RM>(Fd, LF, B1, LB, B5, LB, C, VT, C);  // dR = Aᵀ dν
  __syncthreads();
  rowSums(sR, [&](int i, int c) { return Fd[i * LF + c] * Fa[i * LF + c]; });
  rowSums(sB, [&](int i, int c) { return Fd[i * LF + c] * (toF(B4[i * LB + c]) - ex[i] * Fa[i * LF + c]); });
  __syncthreads();  // v (B4) read above, overwritten below
  for (int idx = threadIdx.x; idx < C * VT; idx += blockDim.x) {
    const int i = idx / VT, c = idx % VT;
    const float r = Fd[i * LF + c];
    if (i < L) dv[((t0 + i) * HV + hv) * V + v0 + c] = fromF<T>(bet[i] * r);
    B0[i * LB + c] = fromF<T>(r);                               // dR
    B4[i * LB + c] = fromF<T>(-bet[i] * ex[i] * r);             // −diag(βe) dR
    B3[i * LB + c] = fromF<T>(dd[i] * Fc[i * LF + c]);          // diag(d) ν
    B1[i * LB + c] = fromF<T>(ex[i] * toF(B6[i * LB + c]));     // diag(e) dO
  }
  __syncthreads();
  gemm<T, RM, CM>(Fa, LF, B6, LB, B2, LB, C, C, VT);  // dQK = dO νᵀ
  gemm<T, RM, CM>(Fb, LF, B0, LB, B2, LB, C, C, VT);  // dR νᵀ (dM = −that, strictly lower)
  gemm<T, RM, CM>(Fc, LF, Qb, LK, Kb, LK, C, C, K);   // Q Kᵀ
  gemm<T, RM, CM>(Fd, LF, Kb, LK, Kb, LK, C, C, K);   // K Kᵀ
  __syncthreads();
  for (int idx = threadIdx.x; idx < C * C; idx += blockDim.x) {
    const int i = idx / C, j = idx % C;
    const float gm = (j <= i && i < L) ? __expf(gam[i] - gam[j]) : 0.f;
    const float dqk = Fa[i * LF + j], dm = j < i ? -Fb[i * LF + j] : 0.f;
    const float qkg = Fc[i * LF + j] * gm, kkg = Fd[i * LF + j] * gm;
    Fc[i * LF + j] = dqk * qkg + dm * bet[i] * kkg;  // the terms of dg's box sum
    Fd[i * LF + j] = dm * kkg;                      // dβ's row terms
    B5[i * LB + j] = fromF<T>(dqk * gm);            // dQK ⊙ Γ
    B0[i * LB + j] = fromF<T>(dm * bet[i] * gm);    // dM ⊙ βΓ
  }
  __syncthreads();
  if (threadIdx.x < C) {  // row a: exclusive prefix Σ_{b<t} F_ab in place
    const int a = threadIdx.x;
    float run = 0.f;
    for (int b = 0; b < C; ++b) {
      const float x = Fc[a * LF + b];
      Fc[a * LF + b] = run;
      run += x;
    }
  } else if (threadIdx.x < 2 * C) {
    const int i = threadIdx.x - C;
    float s = 0.f;
    for (int j = 0; j < i; ++j) s += Fd[i * LF + j];
    sB[i] += s;
    Et[i] = ex[i] * sO[i] - bet[i] * ex[i] * sR[i];
    Zt[i] = dd[i] * sZ[i];
  }
  __syncthreads();
  // dg_t = e_L <dS, S0> + Σ_{i≥t} E_i + Σ_{j<t} Z_j + Σ_{a≥t>b} F_ab: every term carries a factor ≤ exp(g_t),
  // so nothing large cancels under strong decay.
  if (threadIdx.x < L) {
    const int t = threadIdx.x;
    float dg = ex[L - 1] * red[0];
    for (int i = t; i < L; ++i) dg += Et[i] + Fc[i * LF + t];
    for (int j = 0; j < t; ++j) dg += Zt[j];
    const size_t off = (size_t(tile) * NT + t0 + t) * HV + hv;
    dgamP[off] = dg;
    dbetaP[off] = sB[t];
  }
  __syncthreads();
  constexpr int TN = K / 16;
  float* dqS = Fa;  // C × (K + 4) each
  float* dkS = Fc;
  for (int t = threadIdx.x / 32; t < (C / 16) * TN; t += NTG / 32) {
    const int mi = t / TN, nj = t % TN;
    Acc acc;
    wmma::fill_fragment(acc, 0.f);
    mmaAcc<T, RM, CM>(acc, B1, LB, S0b, LB, mi, nj, VT);  // diag(e) dO S0ᵀ
    mmaAcc<T, RM, RM>(acc, B5, LB, Kb, LK, mi, nj, C);    // (dQK ⊙ Γ) K
    wmma::store_matrix_sync(dqS + mi * 16 * (K + 4) + nj * 16, acc, K + 4, wmma::mem_row_major);
    wmma::fill_fragment(acc, 0.f);
    mmaAcc<T, RM, CM>(acc, B4, LB, S0b, LB, mi, nj, VT);  // −diag(βe) dR S0ᵀ
    mmaAcc<T, RM, CM>(acc, B3, LB, dSb, LB, mi, nj, VT);  // diag(d) ν dSᵀ
    mmaAcc<T, CM, RM>(acc, B5, LB, Qb, LK, mi, nj, C);    // (dQK ⊙ Γ)ᵀ Q
    mmaAcc<T, RM, RM>(acc, B0, LB, Kb, LK, mi, nj, C);    // (dM ⊙ βΓ) K
    mmaAcc<T, CM, RM>(acc, B0, LB, Kb, LK, mi, nj, C);    // (dM ⊙ βΓ)ᵀ K
    wmma::store_matrix_sync(dkS + mi * 16 * (K + 4) + nj * 16, acc, K + 4, wmma::mem_row_major);
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < L * K / 4; idx += blockDim.x) {
    const int i = idx / (K / 4), c = (idx % (K / 4)) * 4;
    const size_t off = ((size_t(tile) * NT + t0 + i) * HV + hv) * K + c;
    *reinterpret_cast<float4*>(dqP + off) = *reinterpret_cast<const float4*>(dqS + i * (K + 4) + c);
    *reinterpret_cast<float4*>(dkP + off) = *reinterpret_cast<const float4*>(dkS + i * (K + 4) + c);
  }
}

template <typename Kern>
void allowSmem(Kern kernel, size_t bytes) {
  check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)),
        "cudaFuncSetAttribute(gdn backward smem)");
}

template <typename T, int K>
void run(const gdn::Problem& p, Device dev, const Args& a, cudaStream_t stream) {
  const int HV = int(p.HV), V = int(p.V), H = int(p.H), G = int(p.group());
  const int64_t nb = int64_t(a.nChunks) * HV;
  // Workspaces (16-bit buffers allocated as f32 of half the count).
  Tensor Aw = empty({std::max<int64_t>(nb * C * C / 2, 1)}, DType::F32, dev);
  Tensor Qhw = empty({std::max<int64_t>(nb * C * K / 2, 1)}, DType::F32, dev);
  Tensor Khw = empty({std::max<int64_t>(nb * C * K / 2, 1)}, DType::F32, dev);
  Tensor Pw = empty({std::max<int64_t>(nb * C * C / 2, 1)}, DType::F32, dev);
  Tensor Ww = empty({std::max<int64_t>(nb * C * K / 2, 1)}, DType::F32, dev);
  Tensor Qw = empty({std::max<int64_t>(nb * C * K / 2, 1)}, DType::F32, dev);
  Tensor Kw = empty({std::max<int64_t>(nb * C * K / 2, 1)}, DType::F32, dev);
  Tensor eL = empty({std::max<int64_t>(nb, 1)}, DType::F32, dev);
  Tensor dS = empty({std::max<int64_t>(nb * K * V / 2, 1)}, DType::F32, dev);  // 16-bit
  T* P = static_cast<T*>(Pw.data());
  T* W = static_cast<T*>(Ww.data());
  T* Qe = static_cast<T*>(Qw.data());
  T* Kn = static_cast<T*>(Kw.data());
  T* A = static_cast<T*>(Aw.data());
  T* Qh = static_cast<T*>(Qhw.data());
  T* Kh = static_cast<T*>(Khw.data());
  // TCAL_GDN_BWD_TIMING=1: per-kernel times on stderr (benchmark diagnostics; synchronises the stream).
  const bool timing = std::getenv("TCAL_GDN_BWD_TIMING") != nullptr;
  cudaEvent_t ev[4];
  if (timing)
    for (auto& e : ev) check(cudaEventCreate(&e), "cudaEventCreate");
  if (timing) check(cudaEventRecord(ev[0], stream), "cudaEventRecord");
  if (a.nChunks > 0) {
    auto k1 = prepKernel<T, K>;
    allowSmem(k1, prepSmem<K>());
    k1<<<dim3(unsigned(a.nChunks), unsigned(HV)), 256, prepSmem<K>(), stream>>>(
        a.qs, a.ks, a.g, a.beta, a.chunkStart, a.chunkLen, H, HV, G, A, P, W, Qe, Kn, Qh, Kh, eL.ptr<float>());
    checkLaunch("gdn backward prep");
  }
  if (timing) check(cudaEventRecord(ev[1], stream), "cudaEventRecord");
  auto k2 = stateKernel<T, K>;
  allowSmem(k2, stateSmem<K>());
  k2<<<dim3(unsigned(V / VS), unsigned(HV), unsigned(p.N)), kStateThreads, stateSmem<K>(), stream>>>(
      P, W, Qe, Kn, eL.ptr<float>(), static_cast<const T*>(a.dO), a.dFinal, a.cu, a.chunkFirst, HV, V,
      static_cast<T*>(dS.data()), a.dh0);
  checkLaunch("gdn backward state pass");
  if (timing) check(cudaEventRecord(ev[2], stream), "cudaEventRecord");
  if (a.nChunks > 0) {
    auto k3 = gradKernel<T, K>;
    allowSmem(k3, gradSmem<K>());
    k3<<<dim3(unsigned(a.nChunks), unsigned(HV), unsigned(V / VT)), NTG, gradSmem<K>(), stream>>>(
        a.g, a.beta, static_cast<const T*>(a.v), static_cast<const T*>(a.dO), a.ckpt,
        static_cast<const T*>(dS.data()), A, Qh, Kh, a.chunkStart, a.chunkLen, HV, V, a.NT, static_cast<T*>(a.dv), a.dqP, a.dkP,
        a.dgamP, a.dbetaP);
    checkLaunch("gdn backward gradients");
  }
  if (timing) {
    check(cudaEventRecord(ev[3], stream), "cudaEventRecord");
    check(cudaEventSynchronize(ev[3]), "cudaEventSynchronize");
    float ms[3];
    for (int i = 0; i < 3; ++i) check(cudaEventElapsedTime(&ms[i], ev[i], ev[i + 1]), "cudaEventElapsedTime");
    std::fprintf(stderr, "gdn backward v2: prep %.3f ms, state pass %.3f ms, gradients %.3f ms\n", ms[0], ms[1], ms[2]);
    for (auto& e : ev) cudaEventDestroy(e);
  }
}

}  // namespace

bool eligible(const gdn::Problem& p, DType in, DType dO, DType dv, const void* vPtr, const void* dOPtr) {
  const bool aligned = reinterpret_cast<uintptr_t>(vPtr) % 16 == 0 && reinterpret_cast<uintptr_t>(dOPtr) % 16 == 0;
  return (in == DType::BF16 || in == DType::F16) && dO == in && dv == in && (p.K == 64 || p.K == 128) &&
         p.V % kTileV == 0 && p.V > 0 && aligned;
}

void backward(const gdn::Problem& p, DType dt, Device dev, const Args& a, cudaStream_t stream) {
  if (p.N == 0) return;
  const bool k128 = p.K == 128;
  if (dt == DType::BF16) {
    if (k128) run<__nv_bfloat16, 128>(p, dev, a, stream);
    else run<__nv_bfloat16, 64>(p, dev, a, stream);
  } else {
    if (k128) run<__half, 128>(p, dev, a, stream);
    else run<__half, 64>(p, dev, a, stream);
  }
}

}  // namespace tcal::cuda::gdn_bwd_tc
