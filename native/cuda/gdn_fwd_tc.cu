// CUDA Gated DeltaNet forward, version 2: one fused kernel per (sequence, value head, 64-column tile of V) on
// the tensor cores (WMMA bf16/f16 16×16×16, fp32 accumulate). Per chunk of C = 64 tokens everything stays in
// shared memory: q/k are normalised and scaled on load, the gates are computed in the kernel, the state tile
// S (K × 64) is kept in fp32 (a bf16 copy feeds the products), and nothing but o and the final state goes back
// to device memory.
//   G = K Kᵀ, QKᵀ, P = K S, Oq = Q S                       (tensor cores)
//   R = diag(β)(V − diag(e) P);  (I + M) ν = R by substitution, M_ij = β_i G_ij exp(γ_i − γ_j) (i > j)
//   O = diag(e) Oq + (QKᵀ ⊙ Γ) ν;  S ← e_L S + (diag(d) K)ᵀ ν   (tensor cores)
// Every exponent is γ_i − γ_j with i ≥ j, or γ_i ≤ 0.
#include <mma.h>

#include <cstdlib>
#include <cstring>

#include "check.h"
#include "gdn_fwd_tc.h"
#include "gdn_fwd_v3.h"
#include "types.cuh"

namespace tcal::cuda::gdn_tc {

namespace {

using namespace nvcuda;

constexpr int C = gdn::kChunk;
constexpr int BVT = 64;
constexpr int kThreads = 256;

__device__ __forceinline__ float softplusF(float z) { return z > 20.f ? z : log1pf(__expf(z)); }

template <int K>
constexpr size_t smemBytes() {
  return sizeof(float) * (size_t(K) * BVT + 2 * C * C + 3 * C * BVT + 4 * C) +
         2 * (size_t(K) * BVT + 2 * C * K + C * C + C * BVT);
}

template <typename T, int K>
__global__ void __launch_bounds__(kThreads) forwardKernel(const int* __restrict__ cu, int H, int HV, int V,
                                                          const T* __restrict__ q, const T* __restrict__ k,
                                                          const T* __restrict__ v, const float* __restrict__ g,
                                                          const float* __restrict__ beta,
                                                          const float* __restrict__ aLog,
                                                          const float* __restrict__ dtBias,
                                                          const float* __restrict__ h0, T* __restrict__ o,
                                                          float* __restrict__ hT, float* __restrict__ ckpt,
                                                          const int* __restrict__ chunkFirst, float scale,
                                                          bool l2norm) {
  extern __shared__ __align__(128) unsigned char sm[];
  float* Sf = reinterpret_cast<float*>(sm);  // K × BVT
  float* Gm = Sf + K * BVT;                  // C × C   (K Kᵀ, then M)
  float* QKf = Gm + C * C;                   // C × C
  float* Pf = QKf + C * C;                   // C × BVT (K S, later O)
  float* Of = Pf + C * BVT;                  // C × BVT (Q S)
  float* Nf = Of + C * BVT;                  // C × BVT (R, then ν)
  float* gam = Nf + C * BVT;                 // C
  float* ex = gam + C;
  float* dd = ex + C;
  float* bet = dd + C;
  T* Sb = reinterpret_cast<T*>(bet + C);     // K × BVT
  T* Qb = Sb + K * BVT;                      // C × K (later diag(d) K)
  T* Kb = Qb + C * K;                        // C × K
  T* QKb = Kb + C * K;                       // C × C
  T* Nb = QKb + C * C;                       // C × BVT

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int v0 = blockIdx.x * BVT, hv = blockIdx.y, n = blockIdx.z, h = hv / (HV / H);
  const int64_t seqBegin = cu[n], seqEnd = cu[n + 1];
  const size_t stateBase = (size_t(n) * HV + hv) * K * V;
  for (int idx = tid; idx < K * BVT; idx += kThreads) {
    float s = h0 ? h0[stateBase + size_t(idx / BVT) * V + v0 + idx % BVT] : 0.f;
    Sf[idx] = s;
    Sb[idx] = fromF<T>(s);
  }
  const float aExp = aLog ? __expf(aLog[hv]) : 0.f;
  const float dtb = dtBias ? dtBias[hv] : 0.f;

  int chunk = chunkFirst ? chunkFirst[n] : 0;
  for (int64_t t0 = seqBegin; t0 < seqEnd; t0 += C, ++chunk) {
    const int L = int(seqEnd - t0 < C ? seqEnd - t0 : C);
    __syncthreads();
    if (ckpt) {  // chunk-start states for the backward
      float* dst = ckpt + (size_t(chunk) * HV + hv) * K * V;
      for (int idx = tid; idx < K * BVT; idx += kThreads) dst[size_t(idx / BVT) * V + v0 + idx % BVT] = Sf[idx];
    }
    // q, k rows: normalise, scale, round to the operand type; rows past L are zero.
    for (int i = warp; i < C; i += kThreads / 32) {
      constexpr int PER = K / 32;
      float qa[PER], ka[PER];
      float sq = 0.f, sk = 0.f;
      if (i < L) {
        const T* qr = q + ((t0 + i) * H + h) * K;
        const T* kr = k + ((t0 + i) * H + h) * K;
#pragma unroll
        for (int u = 0; u < PER; ++u) {
          qa[u] = toF(qr[lane + 32 * u]);
          ka[u] = toF(kr[lane + 32 * u]);
          sq += qa[u] * qa[u];
          sk += ka[u] * ka[u];
        }
      } else {
#pragma unroll
        for (int u = 0; u < PER; ++u) qa[u] = ka[u] = 0.f;
      }
      float iq = scale, ik = 1.f;
      if (l2norm) {
#pragma unroll
        for (int off = 16; off; off >>= 1) {
          sq += __shfl_xor_sync(0xffffffffu, sq, off);
          sk += __shfl_xor_sync(0xffffffffu, sk, off);
        }
        iq = scale * rsqrtf(sq + float(gdn::kNormEps));
        ik = rsqrtf(sk + float(gdn::kNormEps));
      }
#pragma unroll
      for (int u = 0; u < PER; ++u) {
        Qb[i * K + lane + 32 * u] = fromF<T>(qa[u] * iq);
        Kb[i * K + lane + 32 * u] = fromF<T>(ka[u] * ik);
      }
    }
    if (tid < C) {
      float gi = 0.f, bi = 0.f;
      if (tid < L) {
        size_t gidx = size_t(t0 + tid) * HV + hv;
        gi = g[gidx];
        bi = beta[gidx];
        if (aLog) {
          gi = -aExp * softplusF(gi + dtb);
          bi = 1.f / (1.f + __expf(-bi));
        }
      }
      gam[tid] = gi;
      bet[tid] = bi;
    }
    __syncthreads();
    if (warp == 0) {  // inclusive scan of the log decays over 64 entries (2 per lane)
      float a = gam[2 * lane], b = a + gam[2 * lane + 1];
      float s = b;
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) {
        float y = __shfl_up_sync(0xffffffffu, s, off);
        if (lane >= off) s += y;
      }
      float prev = s - b;
      gam[2 * lane] = prev + a;
      gam[2 * lane + 1] = s;
    }
    __syncthreads();
    if (tid < C) {
      float gl = gam[L - 1];
      float gi = tid < L ? gam[tid] : gl;
      ex[tid] = tid < L ? __expf(gi) : 0.f;
      dd[tid] = tid < L ? __expf(gl - gi) : 0.f;
    }
    // G = K Kᵀ, QKᵀ (C × C) and P = K S, Oq = Q S (C × BVT): 16 + 16 + 16 + 16 tiles, 8 per warp.
    for (int job = warp; job < 64; job += kThreads / 32) {
      int kind = job / 16, tile = job % 16, tr = tile / 4, tc = tile % 4;
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.f);
      const T* A = (kind == 0 || kind == 2) ? Kb : Qb;
      if (kind < 2) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;  // Kᵀ
#pragma unroll
        for (int kk = 0; kk < K / 16; ++kk) {
          wmma::load_matrix_sync(fa, A + tr * 16 * K + kk * 16, K);
          wmma::load_matrix_sync(fb, Kb + tc * 16 * K + kk * 16, K);
          wmma::mma_sync(acc, fa, fb, acc);
        }
        wmma::store_matrix_sync((kind == 0 ? Gm : QKf) + tr * 16 * C + tc * 16, acc, C, wmma::mem_row_major);
      } else {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;  // S
#pragma unroll
        for (int kk = 0; kk < K / 16; ++kk) {
          wmma::load_matrix_sync(fa, A + tr * 16 * K + kk * 16, K);
          wmma::load_matrix_sync(fb, Sb + kk * 16 * BVT + tc * 16, BVT);
          wmma::mma_sync(acc, fa, fb, acc);
        }
        wmma::store_matrix_sync((kind == 2 ? Pf : Of) + tr * 16 * BVT + tc * 16, acc, BVT, wmma::mem_row_major);
      }
    }
    __syncthreads();
    for (int idx = tid; idx < C * C; idx += kThreads) {
      int i = idx / C, j = idx % C;
      float decay = (i < L && j <= i) ? __expf(gam[i] - gam[j]) : 0.f;
      Gm[idx] = j < i ? bet[i] * Gm[idx] * decay : 0.f;
      QKb[idx] = fromF<T>(QKf[idx] * decay);
    }
    for (int idx = tid; idx < C * BVT; idx += kThreads) {
      int i = idx / BVT, c = idx % BVT;
      float vv = i < L ? toF(v[((t0 + i) * HV + hv) * V + v0 + c]) : 0.f;
      Nf[idx] = bet[i] * (vv - ex[i] * Pf[idx]);
      Of[idx] *= ex[i];
    }
    __syncthreads();
    {  // (I + M) ν = R, 4 lanes per column
      const int c = tid / 4, sub = tid % 4;
      for (int i = 1; i < L; ++i) {
        float s = 0.f;
        for (int j = sub; j < i; j += 4) s += Gm[i * C + j] * Nf[j * BVT + c];
        s += __shfl_xor_sync(0xffffffffu, s, 1);
        s += __shfl_xor_sync(0xffffffffu, s, 2);
        if (sub == 0) Nf[i * BVT + c] -= s;
        __syncwarp();
      }
    }
    __syncthreads();
    for (int idx = tid; idx < C * BVT; idx += kThreads) Nb[idx] = fromF<T>(Nf[idx]);
    for (int idx = tid; idx < C * K; idx += kThreads) Qb[idx] = fromF<T>(dd[idx / K] * toF(Kb[idx]));
    __syncthreads();
    // O = diag(e) Oq + (QKᵀ ⊙ Γ) ν  (16 tiles) and S ← e_L S + (diag(d) K)ᵀ ν  (K/16 × 4 tiles)
    const float eL = ex[L - 1];
    for (int job = warp; job < 16 + (K / 16) * (BVT / 16); job += kThreads / 32) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;
      if (job < 16) {
        int tr = job / 4, tc = job % 4;
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
        wmma::load_matrix_sync(acc, Of + tr * 16 * BVT + tc * 16, BVT, wmma::mem_row_major);
#pragma unroll
        for (int kk = 0; kk < C / 16; ++kk) {
          wmma::load_matrix_sync(fa, QKb + tr * 16 * C + kk * 16, C);
          wmma::load_matrix_sync(fb, Nb + kk * 16 * BVT + tc * 16, BVT);
          wmma::mma_sync(acc, fa, fb, acc);
        }
        wmma::store_matrix_sync(Pf + tr * 16 * BVT + tc * 16, acc, BVT, wmma::mem_row_major);
      } else {
        int t = job - 16, tr = t / (BVT / 16), tc = t % (BVT / 16);
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> fa;  // (diag(d) K)ᵀ
        wmma::load_matrix_sync(acc, Sf + tr * 16 * BVT + tc * 16, BVT, wmma::mem_row_major);
#pragma unroll
        for (int e = 0; e < acc.num_elements; ++e) acc.x[e] *= eL;
#pragma unroll
        for (int kk = 0; kk < C / 16; ++kk) {
          wmma::load_matrix_sync(fa, Qb + kk * 16 * K + tr * 16, K);
          wmma::load_matrix_sync(fb, Nb + kk * 16 * BVT + tc * 16, BVT);
          wmma::mma_sync(acc, fa, fb, acc);
        }
        wmma::store_matrix_sync(Sf + tr * 16 * BVT + tc * 16, acc, BVT, wmma::mem_row_major);
      }
    }
    __syncthreads();
    for (int idx = tid; o && idx < L * BVT; idx += kThreads) {
      int i = idx / BVT, c = idx % BVT;
      o[((t0 + i) * HV + hv) * V + v0 + c] = fromF<T>(Pf[idx]);
    }
    for (int idx = tid; idx < K * BVT; idx += kThreads) Sb[idx] = fromF<T>(Sf[idx]);
  }
  __syncthreads();
  if (hT)
    for (int idx = tid; idx < K * BVT; idx += kThreads) hT[stateBase + size_t(idx / BVT) * V + v0 + idx % BVT] = Sf[idx];
}

template <typename T, int K>
void launch(const gdn::Problem& p, const gdn::Inputs& in, T* o, float* hT, const int* cu, float* ckpt,
            const int* chunkFirst, cudaStream_t stream) {
  constexpr size_t smem = smemBytes<K>();
  auto kern = forwardKernel<T, K>;
  check(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)),
        "cudaFuncSetAttribute(gdn tc forward)");
  dim3 grid(unsigned(p.V / BVT), unsigned(p.HV), unsigned(p.N));
  kern<<<grid, kThreads, smem, stream>>>(
      cu, int(p.H), int(p.HV), int(p.V), in.q.ptr<T>(), in.k.ptr<T>(), in.v.ptr<T>(), in.g.ptr<float>(),
      in.beta.ptr<float>(), p.fusedGates ? in.aLog.ptr<float>() : nullptr,
      p.fusedGates ? in.dtBias.ptr<float>() : nullptr, p.hasH0 ? in.h0.ptr<float>() : nullptr, o, hT, ckpt,
      chunkFirst, float(p.scale), p.l2norm);
  checkLaunch("gdn tc forward");
}

}  // namespace

bool eligible(const gdn::Problem& p, DType in, DType out) {
  return (in == DType::BF16 || in == DType::F16) && out == in && (p.K == 64 || p.K == 128) && p.V % BVT == 0;
}

namespace {

// Versions 3–5 (gdn_fwd_v3.cu, needs 16-byte aligned q, k, v, o) by default; TCAL_GDN_FORWARD=v2 keeps this kernel.
bool useV3(const gdn::Problem& p, const gdn::Inputs& in, const Tensor& o) {
  const char* force = std::getenv("TCAL_GDN_FORWARD");
  return !(force && std::strcmp(force, "v2") == 0) && gdn_v3::eligible(p, in.q.dtype(), in.q.dtype()) &&
         gdn_v3::alignedInputs(in, o);
}

}  // namespace

DType checkpointType(const gdn::Problem& p, const gdn::Inputs& in, const Tensor& o) {
  const char* f = std::getenv("TCAL_GDN_STATES");
  if (f && std::strcmp(f, "f32") == 0) return DType::F32;
  return useV3(p, in, o) ? DType::BF16 : DType::F32;
}

bool handsOver(const gdn::Problem& p, const gdn::Inputs& in, const Tensor& o) { return o.defined() && useV3(p, in, o); }

void forward(const gdn::Problem& p, const gdn::Inputs& in, const Tensor& o, const Tensor& finalState, const int* cu,
             const int* chunkFirst, cudaStream_t stream, void* ckpt, DType ckptType,
             const gdn_v3::Handover* handover) {
  if (p.N == 0) return;
  if (useV3(p, in, o)) {
    gdn_v3::forward(p, in, o, finalState, cu, stream, ckpt, ckptType, chunkFirst, handover);
    return;
  }
  if (handover) throwInvalid("saveForBackward", "only the v3 GDN forward hands over the backward's prep outputs");
  if (ckpt && ckptType != DType::F32) throwInvalid("ckpt", "the v2 GDN forward writes f32 checkpoints only");
  auto run = [&](auto tag) {
    using T = typename decltype(tag)::type;
    T* op = o.defined() ? o.ptr<T>() : nullptr;
    float* hT = finalState.defined() ? finalState.ptr<float>() : nullptr;
    if (p.K == 64)
      launch<T, 64>(p, in, op, hT, cu, static_cast<float*>(ckpt), chunkFirst, stream);
    else
      launch<T, 128>(p, in, op, hT, cu, static_cast<float*>(ckpt), chunkFirst, stream);
  };
  if (in.q.dtype() == DType::BF16)
    run(DevTag<__nv_bfloat16>{});
  else
    run(DevTag<__half>{});
}

}  // namespace tcal::cuda::gdn_tc
