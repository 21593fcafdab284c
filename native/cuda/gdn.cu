// CUDA Gated DeltaNet, version 1 ("simple"): chunked (C = 64) forward and backward in fp32 arithmetic, one
// thread block per (sequence, value head, 32-column tile of V). The state tile (K × 32, fp32) lives in shared
// memory for the whole sequence; chunk intermediates (the C×C decay-weighted Gram matrices, ν = U − W·S) are
// recomputed per tile. Correctness first: q and k are normalised / scaled into fp32 workspaces by a prologue
// kernel, and the backward's per-token sums over V are written per tile and reduced by an epilogue kernel.
//
// Chunk algebra (DESIGN.md §3) with γ the in-chunk cumulative log decay, e_i = exp(γ_i), d_i = exp(γ_L − γ_i),
// Γ_ij = exp(γ_i − γ_j) (i ≥ j, so every exponent is ≤ 0):
//   (I + M) ν = diag(β)(V − diag(e) K S0),  M_ij = β_i (k_i·k_j) Γ_ij (i > j)
//   O = diag(e) Q S0 + (Q Kᵀ ⊙ Γ, lower incl. diagonal) ν
//   S_L = e_L S0 + Kᵀ diag(d) ν
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <list>
#include <mutex>
#include <utility>
#include <vector>

#include "check.h"
#include "device.h"
#include "gdn.h"
#include "gdn_bwd_tc.h"
#include "gdn_fwd_tc.h"
#include "types.cuh"

namespace tcal::cuda {

namespace {

constexpr int C = gdn::kChunk;
constexpr int BV = 32;        // V columns per block
constexpr int kThreads = 256;

__device__ __forceinline__ float softplusF(float z) { return z > 20.f ? z : log1pf(__expf(z)); }
__device__ __forceinline__ float sigmoidF(float z) { return 1.f / (1.f + __expf(-z)); }

// ---- prologue: q, k → fp32 (normalised, q scaled); fused gates → g, β ----

template <typename T>
__global__ void prepQK(const T* __restrict__ q, const T* __restrict__ k, float* __restrict__ qs,
                       float* __restrict__ ks, float* __restrict__ rq, float* __restrict__ rk, int64_t rows, int K,
                       float scale, bool l2norm) {
  int64_t row = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  int lane = threadIdx.x & 31;
  if (row >= rows) return;
  const T* qr = q + row * K;
  const T* kr = k + row * K;
  float sq = 0.f, sk = 0.f;
  if (l2norm) {
    for (int i = lane; i < K; i += 32) {
      float a = toF(qr[i]), b = toF(kr[i]);
      sq += a * a;
      sk += b * b;
    }
    for (int o = 16; o; o >>= 1) {
      sq += __shfl_xor_sync(0xffffffffu, sq, o);
      sk += __shfl_xor_sync(0xffffffffu, sk, o);
    }
  }
  float iq = l2norm ? rsqrtf(sq + float(gdn::kNormEps)) : 1.f;
  float ik = l2norm ? rsqrtf(sk + float(gdn::kNormEps)) : 1.f;
  for (int i = lane; i < K; i += 32) {
    qs[row * K + i] = toF(qr[i]) * iq * scale;
    ks[row * K + i] = toF(kr[i]) * ik;
  }
  if (l2norm && lane == 0) {
    rq[row] = iq;
    rk[row] = ik;
  }
}

__global__ void prepGates(const float* __restrict__ a, const float* __restrict__ b, const float* __restrict__ aLog,
                          const float* __restrict__ dtBias, float* __restrict__ g, float* __restrict__ beta,
                          int64_t n, int HV) {
  int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  int hv = int(i % HV);
  g[i] = -__expf(aLog[hv]) * softplusF(a[i] + dtBias[hv]);
  beta[i] = sigmoidF(b[i]);
}

struct Geo {
  const int* cu;         // N+1 token offsets
  const int* chunkFirst; // N+1 first global chunk of each sequence
  int H, HV, K, V, G;
};

// Loads γ (inclusive cumsum of g), e = exp(γ), β for chunk tokens [t0, t0+L) into shared memory.
__device__ void loadGates(const float* g, const float* beta, int64_t t0, int L, int HV, int hv, float* gam, float* ex,
                          float* bet) {
  if (threadIdx.x == 0) {
    float acc = 0.f;
    for (int i = 0; i < L; ++i) {
      acc += g[(t0 + i) * HV + hv];
      gam[i] = acc;
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < C; i += blockDim.x) {
    ex[i] = i < L ? __expf(gam[i]) : 0.f;
    bet[i] = i < L ? beta[(t0 + i) * HV + hv] : 0.f;
  }
}

// KKG_ij = (k_i·k_j) Γ_ij for i > j; QKG_ij = (q_i·k_j) Γ_ij for i ≥ j; zero elsewhere (C × C).
__device__ void gramMatrices(const float* qs, const float* ks, int64_t t0, int L, int H, int h, int K,
                             const float* gam, float* KKG, float* QKG) {
  for (int idx = threadIdx.x; idx < C * C; idx += blockDim.x) {
    int i = idx / C, j = idx % C;
    float kk = 0.f, qk = 0.f;
    if (i < L && j <= i) {
      const float4* ki = reinterpret_cast<const float4*>(ks + ((t0 + i) * H + h) * K);
      const float4* qi = reinterpret_cast<const float4*>(qs + ((t0 + i) * H + h) * K);
      const float4* kj = reinterpret_cast<const float4*>(ks + ((t0 + j) * H + h) * K);
      for (int d = 0; d < K / 4; ++d) {
        float4 a = __ldg(ki + d), b = __ldg(kj + d), c = __ldg(qi + d);
        kk += a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w;
        qk += c.x * b.x + c.y * b.y + c.z * b.z + c.w * b.w;
      }
      float decay = __expf(gam[i] - gam[j]);
      kk *= decay;
      qk *= decay;
    }
    KKG[idx] = j < i ? kk : 0.f;
    QKG[idx] = qk;
  }
}

// In place: solves (I + M) X = X column by column, M_ij = β_i KKG_ij. 8 lanes per column share the sum.
__device__ void forwardSubstitute(float* X, const float* KKG, const float* bet, int L) {
  int c = threadIdx.x / 8, sub = threadIdx.x % 8;  // 256 threads: 32 columns
  for (int i = 1; i < L; ++i) {
    float s = 0.f;
    for (int j = sub; j < i; j += 8) s += KKG[i * C + j] * X[j * BV + c];
    s += __shfl_xor_sync(0xffffffffu, s, 1);
    s += __shfl_xor_sync(0xffffffffu, s, 2);
    s += __shfl_xor_sync(0xffffffffu, s, 4);
    if (sub == 0) X[i * BV + c] -= bet[i] * s;
    __syncwarp();
  }
}

// In place: solves (I + M)ᵀ X = X.
__device__ void backSubstitute(float* X, const float* KKG, const float* bet, int L) {
  int c = threadIdx.x / 8, sub = threadIdx.x % 8;
  for (int i = L - 2; i >= 0; --i) {
    float s = 0.f;
    for (int j = i + 1 + sub; j < L; j += 8) s += bet[j] * KKG[j * C + i] * X[j * BV + c];
    s += __shfl_xor_sync(0xffffffffu, s, 1);
    s += __shfl_xor_sync(0xffffffffu, s, 2);
    s += __shfl_xor_sync(0xffffffffu, s, 4);
    if (sub == 0) X[i * BV + c] -= s;
    __syncwarp();
  }
}

// ---- forward ----

template <typename TV, typename TO>
__global__ void __launch_bounds__(kThreads) gdnForwardKernel(Geo geo, const float* __restrict__ qs,
                                                             const float* __restrict__ ks, const TV* __restrict__ v,
                                                             const float* __restrict__ g,
                                                             const float* __restrict__ beta,
                                                             const float* __restrict__ h0, TO* __restrict__ o,
                                                             float* __restrict__ hT, float* __restrict__ ckpt) {
  extern __shared__ float smem[];
  const int K = geo.K, V = geo.V, H = geo.H, HV = geo.HV;
  const int v0 = blockIdx.x * BV, hv = blockIdx.y, n = blockIdx.z, h = hv / geo.G;
  float* S = smem;                 // K × BV
  float* KKG = S + K * BV;         // C × C
  float* QKG = KKG + C * C;        // C × C
  float* nu = QKG + C * C;         // C × BV
  float* gam = nu + C * BV;        // C
  float* ex = gam + C;
  float* bet = ex + C;
  const int64_t seqBegin = geo.cu[n], seqEnd = geo.cu[n + 1];
  const size_t stateBase = (size_t(n) * HV + hv) * K * V;
  for (int idx = threadIdx.x; idx < K * BV; idx += blockDim.x) {
    int d = idx / BV, c = idx % BV;
    S[idx] = h0 ? h0[stateBase + size_t(d) * V + v0 + c] : 0.f;
  }
  int chunk = geo.chunkFirst[n];
  for (int64_t t0 = seqBegin; t0 < seqEnd; t0 += C, ++chunk) {
    const int L = int(seqEnd - t0 < C ? seqEnd - t0 : C);
    __syncthreads();
    if (ckpt) {
      float* dst = ckpt + (size_t(chunk) * HV + hv) * K * V;
      for (int idx = threadIdx.x; idx < K * BV; idx += blockDim.x)
        dst[size_t(idx / BV) * V + v0 + idx % BV] = S[idx];
    }
    loadGates(g, beta, t0, L, HV, hv, gam, ex, bet);
    __syncthreads();
    gramMatrices(qs, ks, t0, L, H, h, K, gam, KKG, QKG);
    // R_i = β_i (v_i − e_i S0ᵀ k_i)
    for (int idx = threadIdx.x; idx < L * BV; idx += blockDim.x) {
      int i = idx / BV, c = idx % BV;
      const float* ki = ks + ((t0 + i) * H + h) * K;
      float p = 0.f;
      for (int d = 0; d < K; ++d) p += S[d * BV + c] * __ldg(ki + d);
      nu[idx] = bet[i] * (toF(v[((t0 + i) * HV + hv) * V + v0 + c]) - ex[i] * p);
    }
    __syncthreads();
    forwardSubstitute(nu, KKG, bet, L);
    __syncthreads();
    // o_i = e_i S0ᵀ q_i + Σ_{j≤i} QKG_ij ν_j
    for (int idx = threadIdx.x; o && idx < L * BV; idx += blockDim.x) {
      int i = idx / BV, c = idx % BV;
      const float* qi = qs + ((t0 + i) * H + h) * K;
      float p = 0.f;
      for (int d = 0; d < K; ++d) p += S[d * BV + c] * __ldg(qi + d);
      float acc = ex[i] * p;
      for (int j = 0; j <= i; ++j) acc += QKG[i * C + j] * nu[j * BV + c];
      o[((t0 + i) * HV + hv) * V + v0 + c] = fromF<TO>(acc);
    }
    __syncthreads();
    // S ← e_L S + Σ_j d_j k_j ν_jᵀ
    const float eL = ex[L - 1];
    for (int idx = threadIdx.x; idx < K * BV; idx += blockDim.x) {
      int d = idx / BV, c = idx % BV;
      float acc = eL * S[idx];
      for (int j = 0; j < L; ++j)
        acc += __expf(gam[L - 1] - gam[j]) * __ldg(ks + ((t0 + j) * H + h) * K + d) * nu[j * BV + c];
      S[idx] = acc;
    }
  }
  __syncthreads();
  if (hT)
    for (int idx = threadIdx.x; idx < K * BV; idx += blockDim.x)
      hT[stateBase + size_t(idx / BV) * V + v0 + idx % BV] = S[idx];
}

// ---- backward ----

// Per tile of V columns, in reverse chunk order with dS (the gradient of the chunk's final state) on chip:
// dν = (QKG)ᵀ dO + diag(d) K dS; (I+M)ᵀ dR = dν; dV = diag(β) dR; dM = −dR νᵀ; dQK = dO νᵀ; then the
// per-token partial sums of dq, dk (K-vectors), dγ, dβ over this tile's columns; dS ← e_L dS + Qᵀdiag(e)dO −
// Kᵀdiag(βe)dR.
template <typename TV, typename TD>
__global__ void __launch_bounds__(kThreads) gdnBackwardKernel(
    Geo geo, const float* __restrict__ qs, const float* __restrict__ ks, const TV* __restrict__ v,
    const float* __restrict__ g, const float* __restrict__ beta, const float* __restrict__ ckpt,
    const TD* __restrict__ dO, const float* __restrict__ dFinal, TV* __restrict__ dv, float* __restrict__ dqP,
    float* __restrict__ dkP, float* __restrict__ dgamP, float* __restrict__ dbetaP, float* __restrict__ dh0,
    int64_t NT) {
  extern __shared__ float smem[];
  const int K = geo.K, V = geo.V, H = geo.H, HV = geo.HV;
  const int tile = blockIdx.x, v0 = tile * BV, hv = blockIdx.y, n = blockIdx.z, h = hv / geo.G;
  float* S0 = smem;                // K × BV
  float* dS = S0 + K * BV;         // K × BV
  float* KKG = dS + K * BV;        // C × C
  float* QKG = KKG + C * C;
  float* dQK = QKG + C * C;
  float* dM = dQK + C * C;
  float* nu = dM + C * C;          // C × BV
  float* dR = nu + C * BV;
  float* Pk = dR + C * BV;
  float* Pq = Pk + C * BV;
  float* dSk = Pq + C * BV;
  float* dOt = dSk + C * BV;
  float* vt = dOt + C * BV;
  float* gam = vt + C * BV;        // C
  float* ex = gam + C;
  float* bet = ex + C;
  float* Et = bet + C;             // C
  float* Zt = Et + C;              // C
  float* red = Zt + C;             // 1 scalar
  const int64_t seqBegin = geo.cu[n], seqEnd = geo.cu[n + 1];
  const size_t stateBase = (size_t(n) * HV + hv) * K * V;
  for (int idx = threadIdx.x; idx < K * BV; idx += blockDim.x)
    dS[idx] = dFinal ? dFinal[stateBase + size_t(idx / BV) * V + v0 + idx % BV] : 0.f;
  const int nChunks = geo.chunkFirst[n + 1] - geo.chunkFirst[n];
  for (int ci = nChunks - 1; ci >= 0; --ci) {
    const int64_t t0 = seqBegin + int64_t(ci) * C;
    const int L = int(seqEnd - t0 < C ? seqEnd - t0 : C);
    const int chunk = geo.chunkFirst[n] + ci;
    __syncthreads();
    const float* src = ckpt + (size_t(chunk) * HV + hv) * K * V;
    for (int idx = threadIdx.x; idx < K * BV; idx += blockDim.x) S0[idx] = src[size_t(idx / BV) * V + v0 + idx % BV];
    for (int idx = threadIdx.x; idx < L * BV; idx += blockDim.x) {
      int i = idx / BV, c = idx % BV;
      size_t off = ((t0 + i) * HV + hv) * V + v0 + c;
      dOt[idx] = toF(dO[off]);
      vt[idx] = toF(v[off]);
    }
    if (threadIdx.x == 0) red[0] = 0.f;
    loadGates(g, beta, t0, L, HV, hv, gam, ex, bet);
    __syncthreads();
    gramMatrices(qs, ks, t0, L, H, h, K, gam, KKG, QKG);
    float partial = 0.f;  // <dS, S0>
    for (int idx = threadIdx.x; idx < K * BV; idx += blockDim.x) partial += dS[idx] * S0[idx];
    atomicAdd(&red[0], partial);
    for (int idx = threadIdx.x; idx < L * BV; idx += blockDim.x) {
      int i = idx / BV, c = idx % BV;
      const float* ki = ks + ((t0 + i) * H + h) * K;
      const float* qi = qs + ((t0 + i) * H + h) * K;
      float pk = 0.f, pq = 0.f, dsk = 0.f;
      for (int d = 0; d < K; ++d) {
        float kd = __ldg(ki + d);
        pk += S0[d * BV + c] * kd;
        pq += S0[d * BV + c] * __ldg(qi + d);
        dsk += dS[d * BV + c] * kd;
      }
      Pk[idx] = pk;
      Pq[idx] = pq;
      dSk[idx] = dsk;
      nu[idx] = bet[i] * (vt[idx] - ex[i] * pk);
    }
    __syncthreads();
    forwardSubstitute(nu, KKG, bet, L);
    __syncthreads();
    // dν_i = Σ_{i'≥i} QKG_{i'i} dO_{i'} + d_i dSk_i
    for (int idx = threadIdx.x; idx < L * BV; idx += blockDim.x) {
      int i = idx / BV, c = idx % BV;
      float acc = __expf(gam[L - 1] - gam[i]) * dSk[idx];
      for (int j = i; j < L; ++j) acc += QKG[j * C + i] * dOt[j * BV + c];
      dR[idx] = acc;
    }
    __syncthreads();
    backSubstitute(dR, KKG, bet, L);
    __syncthreads();
    for (int idx = threadIdx.x; idx < L * BV; idx += blockDim.x) {
      int i = idx / BV, c = idx % BV;
      dv[((t0 + i) * HV + hv) * V + v0 + c] = fromF<TV>(bet[i] * dR[idx]);
    }
    // dQK_ij = dO_i·ν_j (i ≥ j), dM_ij = −dR_i·ν_j (i > j)
    for (int idx = threadIdx.x; idx < C * C; idx += blockDim.x) {
      int i = idx / C, j = idx % C;
      float a = 0.f, b = 0.f;
      if (i < L && j <= i)
        for (int c = 0; c < BV; ++c) {
          a += dOt[i * BV + c] * nu[j * BV + c];
          b += dR[i * BV + c] * nu[j * BV + c];
        }
      dQK[idx] = a;
      dM[idx] = j < i ? -b : 0.f;
    }
    __syncthreads();
    // Per-token terms: E_i (the e_i factors of O and R), Z_i (the d_i factor of the state update), dβ_i.
    if (threadIdx.x < L) {
      int i = threadIdx.x;
      float sO = 0.f, sR = 0.f, sZ = 0.f, sB = 0.f;
      for (int c = 0; c < BV; ++c) {
        sO += dOt[i * BV + c] * Pq[i * BV + c];
        sR += dR[i * BV + c] * Pk[i * BV + c];
        sZ += dSk[i * BV + c] * nu[i * BV + c];
        sB += dR[i * BV + c] * (vt[i * BV + c] - ex[i] * Pk[i * BV + c]);
      }
      for (int j = 0; j < i; ++j) sB += dM[i * C + j] * KKG[i * C + j];
      Et[i] = ex[i] * sO - bet[i] * ex[i] * sR;
      Zt[i] = __expf(gam[L - 1] - gam[i]) * sZ;
      dbetaP[(size_t(tile) * NT + t0 + i) * HV + hv] = sB;
    }
    __syncthreads();
    // dg_t = Σ_{i≥t} dγ_i, summed directly so that no two large terms cancel (strong decay): every term
    // below carries a factor exp(g_t) or smaller.
    //   dg_t = Σ_{i≥t} E_i + e_L <dS, S0> + Σ_{j<t} Z_j + Σ_{a≥t, b<t} (dQK_ab QKG_ab + dM_ab β_a KKG_ab)
    if (threadIdx.x < L) {
      int t = threadIdx.x;
      float dg = ex[L - 1] * red[0];
      for (int i = t; i < L; ++i) dg += Et[i];
      for (int j = 0; j < t; ++j) dg += Zt[j];
      for (int a = t; a < L; ++a)
        for (int b = 0; b < t; ++b) dg += dQK[a * C + b] * QKG[a * C + b] + dM[a * C + b] * bet[a] * KKG[a * C + b];
      dgamP[(size_t(tile) * NT + t0 + t) * HV + hv] = dg;
    }
    __syncthreads();
    // fold the decays into the weights used for dq and dk
    for (int idx = threadIdx.x; idx < C * C; idx += blockDim.x) {
      int i = idx / C, j = idx % C;
      if (i < L && j <= i) {
        float decay = __expf(gam[i] - gam[j]);
        dQK[idx] *= decay;
        dM[idx] *= bet[i] * decay;
      }
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < L * K; idx += blockDim.x) {
      int i = idx / K, d = idx % K;
      float sq = 0.f, sk1 = 0.f, sk2 = 0.f;
      for (int c = 0; c < BV; ++c) {
        sq += S0[d * BV + c] * dOt[i * BV + c];
        sk1 += S0[d * BV + c] * dR[i * BV + c];
        sk2 += dS[d * BV + c] * nu[i * BV + c];
      }
      float dq = ex[i] * sq;
      float dk = -bet[i] * ex[i] * sk1 + __expf(gam[L - 1] - gam[i]) * sk2;
      for (int j = 0; j <= i; ++j) dq += dQK[i * C + j] * __ldg(ks + ((t0 + j) * H + h) * K + d);
      for (int j = i; j < L; ++j) dk += dQK[j * C + i] * __ldg(qs + ((t0 + j) * H + h) * K + d);
      for (int j = 0; j < i; ++j) dk += dM[i * C + j] * __ldg(ks + ((t0 + j) * H + h) * K + d);
      for (int j = i + 1; j < L; ++j) dk += dM[j * C + i] * __ldg(ks + ((t0 + j) * H + h) * K + d);
      size_t off = ((size_t(tile) * NT + t0 + i) * HV + hv) * K + d;
      dqP[off] = dq;
      dkP[off] = dk;
    }
    __syncthreads();
    // dS ← e_L dS + Σ_i e_i q_i dO_iᵀ − Σ_i β_i e_i k_i dR_iᵀ
    for (int idx = threadIdx.x; idx < K * BV; idx += blockDim.x) {
      int d = idx / BV, c = idx % BV;
      float acc = ex[L - 1] * dS[idx];
      for (int i = 0; i < L; ++i) {
        acc += ex[i] * __ldg(qs + ((t0 + i) * H + h) * K + d) * dOt[i * BV + c];
        acc -= bet[i] * ex[i] * __ldg(ks + ((t0 + i) * H + h) * K + d) * dR[i * BV + c];
      }
      dS[idx] = acc;
    }
  }
  __syncthreads();
  if (dh0)
    for (int idx = threadIdx.x; idx < K * BV; idx += blockDim.x)
      dh0[stateBase + size_t(idx / BV) * V + v0 + idx % BV] = dS[idx];
}

// dg and dβ summed over tiles, and the fused gates' chain rule, for the n = valid tokens · HV elements (the
// valid tokens are [0, cu[N]); the launcher zeroes the rest). Each thread keeps one value head (the stride is a
// multiple of HV), so dA_log and dt_bias are summed in registers, then per block in shared memory, then by one
// global atomic per head and block. (Was one thread per (chunk, head) walking its 64 tokens: 8192 threads at the
// reference shape, 36 µs on the H200, session 8 run 3.)
constexpr int kGateGradThreads = 256;
__global__ void __launch_bounds__(kGateGradThreads) gateGrads(int64_t n, int HV, int tiles, int64_t NT,
                                                             const float* __restrict__ dgamP,
                                                             const float* __restrict__ dbetaP,
                                                             const float* __restrict__ gRaw,
                                                             const float* __restrict__ bRaw,
                                                             const float* __restrict__ aLog,
                                                             const float* __restrict__ dtBias,
                                                             const float* __restrict__ gEff, float* __restrict__ dg,
                                                             float* __restrict__ dbeta, float* __restrict__ dALog,
                                                             float* __restrict__ dDtBias) {
  extern __shared__ float headSums[];  // 2 · HV with the fused gates: Σ dγ·g, Σ dγ·∂g/∂dt
  const int64_t gtid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x / HV * HV;  // the launcher gives ≥ HV threads
  const int hv = int(gtid % HV);
  if (aLog) {
    for (int i = threadIdx.x; i < 2 * HV; i += blockDim.x) headSums[i] = 0.f;
    __syncthreads();
  }
  const float negA = aLog ? -__expf(aLog[hv]) : 0.f, bias = aLog ? dtBias[hv] : 0.f;
  float sumA = 0.f, sumDt = 0.f;
  for (int64_t off = gtid < stride ? gtid : n; off < n; off += stride) {
    float dgam = 0.f, db = 0.f;
    for (int t = 0; t < tiles; ++t) {
      dgam += dgamP[size_t(t) * NT * HV + off];
      db += dbetaP[size_t(t) * NT * HV + off];
    }
    float dgi = dgam;
    if (aLog) {
      sumA += dgam * gEff[off];
      dgi = dgam * negA * sigmoidF(gRaw[off] + bias);
      sumDt += dgi;
      const float s = sigmoidF(bRaw[off]);
      db = db * s * (1.f - s);
    }
    dg[off] = dgi;
    dbeta[off] = db;
  }
  if (aLog) {
    atomicAdd(&headSums[hv], sumA);
    atomicAdd(&headSums[HV + hv], sumDt);
    __syncthreads();
    for (int i = threadIdx.x; i < HV; i += blockDim.x) {
      atomicAdd(&dALog[i], headSums[i]);
      atomicAdd(&dDtBias[i], headSums[HV + i]);
    }
  }
}

// dq, dk: sum over tiles and over the value heads of each key head, scale, L2 norm's chain rule.
template <typename T>
__global__ void qkGrads(const float* __restrict__ dqP, const float* __restrict__ dkP, const T* __restrict__ q,
                        const T* __restrict__ k, const float* __restrict__ rq, const float* __restrict__ rk,
                        T* __restrict__ dq, T* __restrict__ dk, int64_t NT, int64_t validTokens, int H, int HV,
                        int K, int tiles, float scale, bool l2norm) {
  int64_t row = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;  // (token, key head)
  int lane = threadIdx.x & 31;
  if (row >= NT * H) return;
  int64_t t = row / H;
  int h = int(row % H), G = HV / H;
  constexpr int MaxPer = 8;  // K ≤ 256
  float aq[MaxPer], ak[MaxPer];
  int per = K / 32;
  for (int u = 0; u < per; ++u) aq[u] = ak[u] = 0.f;
  if (t < validTokens) {
    for (int tile = 0; tile < tiles; ++tile)
      for (int hv = h * G; hv < (h + 1) * G; ++hv) {
        size_t base = ((size_t(tile) * NT + t) * HV + hv) * K;
        for (int u = 0; u < per; ++u) {
          aq[u] += dqP[base + lane + 32 * u];
          ak[u] += dkP[base + lane + 32 * u];
        }
      }
  }
  for (int u = 0; u < per; ++u) aq[u] *= scale;
  if (l2norm && t < validTokens) {  // rq / rk past the valid tokens are not written by the tensor-core path
    float iq = rq[row], ik = rk[row], sq = 0.f, sk = 0.f;
    float nq[MaxPer], nk[MaxPer];
    for (int u = 0; u < per; ++u) {
      nq[u] = toF(q[row * K + lane + 32 * u]) * iq;
      nk[u] = toF(k[row * K + lane + 32 * u]) * ik;
      sq += nq[u] * aq[u];
      sk += nk[u] * ak[u];
    }
    for (int o = 16; o; o >>= 1) {
      sq += __shfl_xor_sync(0xffffffffu, sq, o);
      sk += __shfl_xor_sync(0xffffffffu, sk, o);
    }
    for (int u = 0; u < per; ++u) {
      aq[u] = (aq[u] - nq[u] * sq) * iq;
      ak[u] = (ak[u] - nk[u] * sk) * ik;
    }
  }
  for (int u = 0; u < per; ++u) {
    dq[row * K + lane + 32 * u] = fromF<T>(aq[u]);
    dk[row * K + lane + 32 * u] = fromF<T>(ak[u]);
  }
}

// ---- decode: one token per sequence, state in place ----

template <typename T>
__global__ void decodeKernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                             const float* __restrict__ g, const float* __restrict__ beta,
                             const float* __restrict__ aLog, const float* __restrict__ dtBias, float* __restrict__ S,
                             T* __restrict__ o, int H, int HV, int K, int V, float scale, bool l2norm) {
  __shared__ float qv[256], kv[256], red[2], gate[2];
  const int hv = blockIdx.x, n = blockIdx.y, h = hv / (HV / H);
  const T* qr = q + (size_t(n) * H + h) * K;
  const T* kr = k + (size_t(n) * H + h) * K;
  if (threadIdx.x < 2) red[threadIdx.x] = 0.f;
  __syncthreads();
  float sq = 0.f, sk = 0.f;
  for (int i = threadIdx.x; i < K; i += blockDim.x) {
    qv[i] = toF(qr[i]);
    kv[i] = toF(kr[i]);
    sq += qv[i] * qv[i];
    sk += kv[i] * kv[i];
  }
  if (l2norm) {
    atomicAdd(&red[0], sq);
    atomicAdd(&red[1], sk);
  }
  if (threadIdx.x == 0) {
    size_t gi = size_t(n) * HV + hv;
    float gg = g[gi], bb = beta[gi];
    if (aLog) {
      gg = -__expf(aLog[hv]) * softplusF(gg + dtBias[hv]);
      bb = sigmoidF(bb);
    }
    gate[0] = __expf(gg);
    gate[1] = bb;
  }
  __syncthreads();
  float iq = l2norm ? rsqrtf(red[0] + float(gdn::kNormEps)) : 1.f;
  float ik = l2norm ? rsqrtf(red[1] + float(gdn::kNormEps)) : 1.f;
  for (int i = threadIdx.x; i < K; i += blockDim.x) {
    qv[i] *= iq * scale;
    kv[i] *= ik;
  }
  __syncthreads();
  float alpha = gate[0], bt = gate[1];
  float* s = S + (size_t(n) * HV + hv) * K * V;
  for (int c = threadIdx.x; c < V; c += blockDim.x) {
    float p = 0.f;
    for (int d = 0; d < K; ++d) p += s[size_t(d) * V + c] * kv[d];
    float nuc = bt * (toF(v[(size_t(n) * HV + hv) * V + c]) - alpha * p);
    float oc = 0.f;
    for (int d = 0; d < K; ++d) {
      float x = alpha * s[size_t(d) * V + c] + kv[d] * nuc;
      s[size_t(d) * V + c] = x;
      oc += x * qv[d];
    }
    o[(size_t(n) * HV + hv) * V + c] = fromF<T>(oc);
  }
}

// ---- host side ----

struct Prepared {
  Tensor qs, ks, rq, rk, g, beta, table;  // table: cu (N+1), chunkFirst (N+1), chunkStart, chunkLen
  gdn::ChunkTable chunks;
  Geo geo;
};

// The ops' index tables (cu, each sequence's first chunk, …; read only) are the same from call to call in a training or
// benchmark loop: each distinct one is uploaded once per device and kept (the 16 most recent), so that a call does not
// queue a host → device copy in front of its first kernel (session 10). TCAL_GDN_TABLES=upload uploads every time
// (benchmark switch). The cache is never destroyed: at exit its tensors would outlive the allocator.
Tensor deviceInts(const std::vector<int32_t>& host, Device dev) {
  using Entry = std::pair<std::pair<int, std::vector<int32_t>>, Tensor>;
  static std::mutex mutex;
  static auto* cache = new std::list<Entry>();  // most recently used first
  const char* e = std::getenv("TCAL_GDN_TABLES");
  const bool reuse = !(e && std::strcmp(e, "upload") == 0);
  std::lock_guard<std::mutex> lock(mutex);
  if (reuse) {
    for (auto it = cache->begin(); it != cache->end(); ++it)
      if (it->first.first == dev.index && it->first.second == host) {
        cache->splice(cache->begin(), *cache, it);
        return it->second;
      }
  }
  Tensor t = empty({int64_t(std::max<size_t>(host.size(), 1))}, DType::I32, dev);
  if (!host.empty()) copyFromHost(t, host.data(), host.size() * sizeof(int32_t));
  if (reuse) {
    cache->emplace_front(std::make_pair(dev.index, host), t);
    if (cache->size() > 16) cache->pop_back();
  }
  return t;
}

// qkCopies = false: only rq / rk are allocated (the tensor-core backward normalises q, k itself and fills them).
template <typename T>
Prepared prepare(const gdn::Problem& p, const gdn::Inputs& in, cudaStream_t stream, bool qkCopies = true) {
  Prepared r;
  Device dev = in.q.device();
  const int64_t NT = p.tokens(), rows = NT * p.H;
  if (qkCopies) {
    r.qs = empty({NT, p.H, p.K}, DType::F32, dev);
    r.ks = empty({NT, p.H, p.K}, DType::F32, dev);
  }
  if (p.l2norm) {
    r.rq = empty({rows}, DType::F32, dev);
    r.rk = empty({rows}, DType::F32, dev);
  }
  if (rows > 0 && qkCopies) {
    prepQK<T><<<gridFor(rows, 8, INT32_MAX), 256, 0, stream>>>(
        in.q.ptr<T>(), in.k.ptr<T>(), r.qs.ptr<float>(), r.ks.ptr<float>(), p.l2norm ? r.rq.ptr<float>() : nullptr,
        p.l2norm ? r.rk.ptr<float>() : nullptr, rows, int(p.K), float(p.scale), p.l2norm);
    checkLaunch("gdn prepQK");
  }
  if (p.fusedGates) {
    r.g = empty({NT, p.HV}, DType::F32, dev);
    r.beta = empty({NT, p.HV}, DType::F32, dev);
    if (NT > 0) {
      prepGates<<<gridFor(NT * p.HV, 256, INT32_MAX), 256, 0, stream>>>(
          in.g.ptr<float>(), in.beta.ptr<float>(), in.aLog.ptr<float>(), in.dtBias.ptr<float>(), r.g.ptr<float>(),
          r.beta.ptr<float>(), NT * p.HV, int(p.HV));
      checkLaunch("gdn prepGates");
    }
  } else {
    r.g = in.g;
    r.beta = in.beta;
  }
  r.chunks = gdn::chunkTable(p);
  std::vector<int32_t> table;
  table.insert(table.end(), p.cu.begin(), p.cu.end());
  table.insert(table.end(), r.chunks.first.begin(), r.chunks.first.end());
  table.insert(table.end(), r.chunks.start.begin(), r.chunks.start.end());
  table.insert(table.end(), r.chunks.len.begin(), r.chunks.len.end());
  r.table = deviceInts(table, dev);
  const int* base = r.table.ptr<int>();
  r.geo = Geo{base, base + (p.N + 1), int(p.H), int(p.HV), int(p.K), int(p.V), int(p.group())};
  return r;
}

size_t forwardSmem(int K) { return sizeof(float) * (size_t(K) * BV + 2 * C * C + C * BV + 3 * C); }
size_t backwardSmem(int K) { return sizeof(float) * (2 * size_t(K) * BV + 4 * C * C + 7 * C * BV + 5 * C + 1); }

template <typename Kern>
void allowSmem(Kern kernel, size_t bytes) {
  check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)),
        "cudaFuncSetAttribute(gdn smem)");
}

// Runs the forward kernel; ckpt (chunk-start states) is written when given.
template <typename TV, typename TO>
void launchForward(const gdn::Problem& p, const Prepared& pr, const gdn::Inputs& in, TO* o, float* hT, float* ckpt,
                   cudaStream_t stream) {
  if (p.N == 0) return;
  size_t smem = forwardSmem(int(p.K));
  auto kern = gdnForwardKernel<TV, TO>;
  allowSmem(kern, smem);
  dim3 grid(unsigned(p.V / BV), unsigned(p.HV), unsigned(p.N));
  kern<<<grid, kThreads, smem, stream>>>(pr.geo, pr.qs.ptr<float>(), pr.ks.ptr<float>(), in.v.ptr<TV>(),
                                         pr.g.ptr<float>(), pr.beta.ptr<float>(),
                                         p.hasH0 ? in.h0.ptr<float>() : nullptr, o, hT, ckpt);
  checkLaunch("gdn forward");
}

template <typename Fn>
void dispatchIn(DType t, Fn&& fn) {
  switch (t) {
    case DType::F32: fn(DevTag<float>{}); return;
    case DType::BF16: fn(DevTag<__nv_bfloat16>{}); return;
    case DType::F16: fn(DevTag<__half>{}); return;
    default: throwInvalid("q", std::string("CUDA GDN takes f32, bf16 or f16, got ") + dtypeName(t));
  }
}

void zeroTail(const Tensor& t, int64_t validTokens, int64_t totalTokens, cudaStream_t stream) {
  if (validTokens >= totalTokens) return;
  size_t per = t.nbytes() / size_t(totalTokens);
  check(cudaMemsetAsync(static_cast<char*>(t.data()) + per * size_t(validTokens), 0,
                        per * size_t(totalTokens - validTokens), stream),
        "cudaMemsetAsync");
}

}  // namespace

GdnSaved gdnForward(const gdn::Problem& p, const gdn::Inputs& in, const gdn::ForwardOut& out, GdnSave save) {
  cudaStream_t stream = use(in.q.device().index);
  Device dev = in.q.device();
  // Saved chunk-start states (a training forward): the backward then skips its recompute.
  const bool saveStates = save != GdnSave::None;
  GdnSaved saved;
  auto stateBuffer = [&](int64_t chunks, DType dt) -> void* {
    if (!saveStates) return nullptr;
    saved.chunkStates = empty({chunks, p.HV, p.K, p.V}, dt, dev);
    return chunks > 0 ? saved.chunkStates.data() : nullptr;
  };
  // The fused tensor-core kernel where it applies (TCAL_GDN_FORWARD=simple forces version 1).
  const char* force = std::getenv("TCAL_GDN_FORWARD");
  bool simple = force && std::strcmp(force, "simple") == 0;
  if (!simple && gdn_tc::eligible(p, in.q.dtype(), out.o.dtype())) {
    std::vector<int32_t> table(p.cu.begin(), p.cu.end());  // cu, then each sequence's first chunk
    const gdn::ChunkTable ct = gdn::chunkTable(p);
    table.insert(table.end(), ct.first.begin(), ct.first.end());
    const int64_t chunks = int64_t(ct.start.size());
    const DType ckptType = gdn_tc::checkpointType(p, in, out.o);  // bf16 where the v3 forward runs
    void* ckpt = saveStates ? stateBuffer(chunks, ckptType) : nullptr;
    Tensor t = deviceInts(table, dev);
    // GdnSave::Full: the v3 prep also writes the backward prep's outputs (gdn_v3::Handover).
    gdn_v3::Handover ho{};
    const bool full = save == GdnSave::Full && gdn_tc::handsOver(p, in, out.o);
    if (full) {
      const DType dt = in.q.dtype();
      saved.A = empty({chunks, p.HV, C, C}, dt, dev);
      saved.QKG = empty({chunks, p.HV, C, C}, dt, dev);
      saved.gates = empty({chunks, p.HV, 3, C}, DType::F32, dev);
      saved.gateEnds = empty({chunks, p.HV}, DType::F32, dev);
      if (p.l2norm) {
        saved.norms = empty({2, p.tokens(), p.H}, DType::F32, dev);
        // The prep writes rows below cu[N] only; the rows past it are returned to the caller, so zero them.
        if (p.cu[size_t(p.N)] < p.tokens())
          check(cudaMemsetAsync(saved.norms.data(), 0, saved.norms.nbytes(), stream), "cudaMemsetAsync");
      }
      float* norms = p.l2norm ? saved.norms.ptr<float>() : nullptr;
      ho = gdn_v3::Handover{saved.A.data(), saved.QKG.data(), saved.gates.ptr<float>(), saved.gateEnds.ptr<float>(),
                            norms, norms ? norms + p.tokens() * p.H : nullptr};
    }
    gdn_tc::forward(p, in, out.o, out.finalState, t.ptr<int>(), t.ptr<int>() + (p.N + 1), stream, ckpt, ckptType,
                    full ? &ho : nullptr);
    zeroTail(out.o, p.cu[size_t(p.N)], p.tokens(), stream);
    return saved;
  }
  dispatchIn(in.q.dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    Prepared pr = prepare<T>(p, in, stream);
    float* hT = out.finalState.defined() ? out.finalState.ptr<float>() : nullptr;
    float* ckpt = static_cast<float*>(stateBuffer(int64_t(pr.chunks.start.size()), DType::F32));
    const int64_t valid = p.cu[size_t(p.N)];
    if (out.o.dtype() == DType::F32) {
      launchForward<T, float>(p, pr, in, out.o.ptr<float>(), hT, ckpt, stream);
    } else {
      launchForward<T, T>(p, pr, in, out.o.ptr<T>(), hT, ckpt, stream);
    }
    zeroTail(out.o, valid, p.tokens(), stream);
    // A sequence of length 0 keeps its initial state (the kernel writes it too; nothing else to do).
  });
  return saved;
}

void gdnBackward(const gdn::Problem& p, const gdn::Inputs& in, const Tensor& dO, const Tensor& dFinal,
                 const gdn::BackwardOut& out, const GdnSaved& handed) {
  const Tensor& chunkStates = handed.chunkStates;
  cudaStream_t stream = use(in.q.device().index);
  Device dev = in.q.device();
  if (out.dv.dtype() != in.v.dtype())
    throwInvalid("outDtype", "the CUDA backward writes gradients in the input dtype");
  dispatchIn(in.q.dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    const int64_t NT = p.tokens(), valid = p.cu[size_t(p.N)];
    // Version 2+ (gdn_bwd_tc.cu, tensor cores) where it applies; TCAL_GDN_BACKWARD=simple keeps version 1.
    const char* forceB = std::getenv("TCAL_GDN_BACKWARD");
    const bool tc = !(forceB && std::strcmp(forceB, "simple") == 0) &&
                    gdn_bwd_tc::eligible(p, in.q.dtype(), dO.dtype(), out.dv.dtype(), in.q.data(), in.k.data(),
                                         in.v.data(), dO.data());
    const char* force = std::getenv("TCAL_GDN_FORWARD");
    const bool fwdTc = !(force && std::strcmp(force, "simple") == 0) && gdn_tc::eligible(p, in.q.dtype(), in.q.dtype());
    bool saved = chunkStates.defined();
    if (saved && chunkStates.dtype() != DType::F32 && !tc) {
      // bf16 states come from the tensor-core forward of 16-bit inputs; with those inputs the v1 backward (f32 dO,
      // unaligned tensors) recomputes fp32 states itself.
      if (in.q.dtype() == DType::F32)
        throwInvalid("saved.chunkStates", "bf16 chunk-start states with f32 inputs: saved by a forward of other inputs");
      saved = false;
    }
    // fp32 q/k copies only for the v1 kernels (the v1 backward, or the v1 forward's recompute)
    Prepared pr = prepare<T>(p, in, stream, !tc || (!saved && !fwdTc));
    const int tiles = int(p.V / (tc ? gdn_bwd_tc::tileV(p) : BV));
    const int nChunks = int(pr.chunks.start.size());
    // The chunk-start states: the forward's (saveForBackward), or recomputed here by a forward without o (bf16
    // where both tensor-core paths run: kernel 3 reads S0 as a 16-bit operand).
    const DType ckptType = tc && fwdTc ? gdn_tc::checkpointType(p, in, Tensor()) : DType::F32;
    Tensor ckpt = saved ? chunkStates : empty({std::max(nChunks, 1), p.HV, p.K, p.V}, ckptType, dev);
    // The forward's hand-over (GdnSave::Full) replaces the tensor-core backward's prep, norm factors included.
    const bool handover = tc && saved && handed.A.defined();
    const int64_t rows = NT * p.H;
    float* rq = !p.l2norm ? nullptr : handover ? handed.norms.ptr<float>() : pr.rq.ptr<float>();
    float* rk = !p.l2norm ? nullptr : handover ? handed.norms.ptr<float>() + rows : pr.rk.ptr<float>();
    if (saved) {
      // nothing to recompute
    } else if (fwdTc) {
      gdn_tc::forward(p, in, Tensor(), Tensor(), pr.geo.cu, pr.geo.chunkFirst, stream, ckpt.data(), ckptType);
    } else {
      launchForward<T, T>(p, pr, in, static_cast<T*>(nullptr), nullptr, ckpt.ptr<float>(), stream);
    }
    // The tensor-core kernel writes dq, dk itself where one tile covers V and G = 1 (no partials, no qkGrads).
    const bool fusedQK = tc && gdn_bwd_tc::fusedQK(p);
    Tensor dqP = fusedQK ? empty({1}, DType::F32, dev) : empty({tiles, NT, p.HV, p.K}, DType::F32, dev);
    Tensor dkP = fusedQK ? empty({1}, DType::F32, dev) : empty({tiles, NT, p.HV, p.K}, DType::F32, dev);
    Tensor dgamP = empty({tiles, NT, p.HV}, DType::F32, dev);
    Tensor dbetaP = empty({tiles, NT, p.HV}, DType::F32, dev);
    if (tc)
      zeroTail(out.dv, valid, NT, stream);  // the tensor-core kernels write dv for every valid token
    else
      check(cudaMemsetAsync(out.dv.data(), 0, out.dv.nbytes(), stream), "cudaMemsetAsync");
    if (p.fusedGates) {
      check(cudaMemsetAsync(out.dALog.data(), 0, out.dALog.nbytes(), stream), "cudaMemsetAsync");
      check(cudaMemsetAsync(out.dDtBias.data(), 0, out.dDtBias.nbytes(), stream), "cudaMemsetAsync");
    }
    if (p.N > 0 && tc) {
      const int* base = pr.table.ptr<int>();
      gdn_bwd_tc::Args a{in.q.data(), in.k.data(), rq, rk, float(p.scale), p.l2norm, pr.g.ptr<float>(),
                         pr.beta.ptr<float>(), ckpt.data(), ckpt.dtype() != DType::F32,
                         dFinal.defined() ? dFinal.ptr<float>() : nullptr, in.v.data(), dO.data(),
                         pr.geo.cu, pr.geo.chunkFirst, base + 2 * (p.N + 1), base + 2 * (p.N + 1) + nChunks,
                         nChunks, NT, out.dv.data(), dqP.ptr<float>(), dkP.ptr<float>(), dgamP.ptr<float>(),
                         dbetaP.ptr<float>(), out.dh0.defined() ? out.dh0.ptr<float>() : nullptr, out.dq.data(),
                         out.dk.data()};
      if (handover) {
        a.hA = handed.A.data();
        a.hQKG = handed.QKG.data();
        a.hGates = handed.gates.ptr<float>();
        a.hGateEnds = handed.gateEnds.ptr<float>();
      }
      gdn_bwd_tc::backward(p, in.q.dtype(), dev, a, stream);
    } else if (p.N > 0) {
      size_t smem = backwardSmem(int(p.K));
      auto launch = [&](auto dtag) {
        using TD = typename decltype(dtag)::type;
        auto kern = gdnBackwardKernel<T, TD>;
        allowSmem(kern, smem);
        dim3 grid(unsigned(tiles), unsigned(p.HV), unsigned(p.N));
        kern<<<grid, kThreads, smem, stream>>>(
            pr.geo, pr.qs.ptr<float>(), pr.ks.ptr<float>(), in.v.ptr<T>(), pr.g.ptr<float>(), pr.beta.ptr<float>(),
            ckpt.ptr<float>(), dO.ptr<TD>(), dFinal.defined() ? dFinal.ptr<float>() : nullptr, out.dv.ptr<T>(),
            dqP.ptr<float>(), dkP.ptr<float>(), dgamP.ptr<float>(), dbetaP.ptr<float>(),
            out.dh0.defined() ? out.dh0.ptr<float>() : nullptr, NT);
        checkLaunch("gdn backward");
      };
      if (dO.dtype() == DType::F32)
        launch(DevTag<float>{});
      else
        launch(DevTag<T>{});
    }
    if (valid > 0) {
      const int64_t n = valid * p.HV;
      // ≈ 4 blocks per SM, at least HV threads (one per head), fewer where the elements are fewer
      const int64_t blocks = std::max<int64_t>(std::min<int64_t>((n + kGateGradThreads - 1) / kGateGradThreads,
                                                                 4 * int64_t(multiprocessorCount(dev.index))),
                                               (p.HV + kGateGradThreads - 1) / kGateGradThreads);
      const size_t sums = p.fusedGates ? 2 * size_t(p.HV) * sizeof(float) : 0;
      if (sums > 48 * 1024) check(cudaFuncSetAttribute(gateGrads, cudaFuncAttributeMaxDynamicSharedMemorySize, int(sums)),
                                  "cudaFuncSetAttribute(gdn gate grads)");
      gateGrads<<<unsigned(blocks), kGateGradThreads, sums, stream>>>(
          n, int(p.HV), tiles, NT, dgamP.ptr<float>(), dbetaP.ptr<float>(), in.g.ptr<float>(), in.beta.ptr<float>(),
          p.fusedGates ? in.aLog.ptr<float>() : nullptr, p.fusedGates ? in.dtBias.ptr<float>() : nullptr,
          pr.g.ptr<float>(), out.dg.ptr<float>(), out.dbeta.ptr<float>(),
          p.fusedGates ? out.dALog.ptr<float>() : nullptr, p.fusedGates ? out.dDtBias.ptr<float>() : nullptr);
      checkLaunch("gdn gate grads");
    }
    zeroTail(out.dg, valid, NT, stream);
    zeroTail(out.dbeta, valid, NT, stream);
    if (fusedQK) {
      zeroTail(out.dq, valid, NT, stream);
      zeroTail(out.dk, valid, NT, stream);
    } else if (NT * p.H > 0) {
      qkGrads<T><<<gridFor(NT * p.H, 8, INT32_MAX), 256, 0, stream>>>(
          dqP.ptr<float>(), dkP.ptr<float>(), in.q.ptr<T>(), in.k.ptr<T>(), rq, rk, out.dq.ptr<T>(), out.dk.ptr<T>(), NT, valid, int(p.H),
          int(p.HV), int(p.K), tiles, float(p.scale), p.l2norm);
      checkLaunch("gdn qk grads");
    }
    // Sequences of length 0: dh0 = dFinal (the kernel's loop does not run, it writes dS = dFinal).
  });
}

void gdnDecodeStep(const gdn::DecodeArgs& a, const gdn::Inputs& in, const Tensor& state, const Tensor& o) {
  cudaStream_t stream = use(in.q.device().index);
  if (a.N == 0) return;
  dispatchIn(in.q.dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    int threads = int(std::min<int64_t>(256, std::max<int64_t>(32, a.V)));
    decodeKernel<T><<<dim3(unsigned(a.HV), unsigned(a.N)), threads, 0, stream>>>(
        in.q.ptr<T>(), in.k.ptr<T>(), in.v.ptr<T>(), in.g.ptr<float>(), in.beta.ptr<float>(),
        a.fusedGates ? in.aLog.ptr<float>() : nullptr, a.fusedGates ? in.dtBias.ptr<float>() : nullptr,
        state.ptr<float>(), o.ptr<T>(), int(a.H), int(a.HV), int(a.K), int(a.V), float(a.scale), a.l2norm);
    checkLaunch("gdn decode");
  });
}

}  // namespace tcal::cuda
