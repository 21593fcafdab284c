// The Taylor attention-moment reduction on the GPU: the streaming formulation of native/cpu/moments.h.
//
// First version, CUDA cores, correctness first (the tensor-core version — P·[V | cos θσ | sin θσ | σ−ρ |
// (σ−ρ)²] through mma with the masked row sums on the P fragments — is the follow-up for the §6 target):
//   1. trigTable: cos / sin(θ_j σ) for every position σ < the longest sequence, made in f64, stored f32.
//   2. momentsAttention: one CTA of 4 warps per (query block of 16 rows, head); the rows share ρ. Key tiles of
//      32 keys (K, V, and the key-only trig channels) stream through shared memory. Per row a warp keeps the
//      online-softmax state: lane j scores key j, the warp takes the tile max and rescales, then walks the
//      tile's keys in order (p_j, a_j − m' by shuffle): every lane adds p_j·v_j into its channels of O and
//      p_j·(cos, sin) into its pairs of C / Sn, and lane r adds into its "role" scalar r: the distance bins
//      (lanes 0..19), the sink, local, l, entropy (max-relative), S1 and S2 channels (lanes 20..25). Rows are
//      finalised as in moments.h and written (f32) to a per-(token, head) row buffer; o to a context buffer.
//   3. reduceRows: per head and column, f64 sums of the row buffer over fixed chunks of 256 included tokens,
//      then over the chunks in order, added into the accumulators (deterministic).
//   4. scan: one warp per (head, decay), sequential over the included tokens in order (f64 y and sums).
//   5. outer: Σ z and Σ z zᵀ (keys with RoPE undone, values, x) in f64, 32×32 output tiles, token order.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "../core/runtime.h"
#include "check.h"
#include "device.h"
#include "moments.h"
#include "types.cuh"

namespace tcal::cuda {

namespace {

using namespace moments;

constexpr unsigned kFull = 0xffffffffu;
constexpr int kRows = 16;  // query rows per CTA, sharing ρ
constexpr int kWarps = 4;
constexpr int kRowsPerWarp = kRows / kWarps;
constexpr int kTile = 32;  // keys per tile: one per lane
constexpr int kRowScalars = kAttentionColumns;
// Lane roles of the scalar channels: lanes 0..kBins−1 hold the distance bins.
constexpr int kRoleSink = kBins, kRoleLocal = kBins + 1, kRoleL = kBins + 2, kRoleE = kBins + 3, kRoleS1 = kBins + 4,
              kRoleS2 = kBins + 5;
static_assert(kRoleS2 < 32, "the scalar channels must fit one warp");
constexpr int kChunk = 256;  // tokens per partial sum of the row reduction

__device__ __forceinline__ int binOf(int delta) {
  if (delta <= 0) return 0;
  const int b = 32 - __clz(delta);  // delta ∈ [2^{b−1}, 2^b)
  return b < kBins - 1 ? b : kBins - 1;
}

__device__ __forceinline__ float warpMax(float x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x = fmaxf(x, __shfl_xor_sync(kFull, x, off));
  return x;
}
__device__ __forceinline__ double warpSum(double x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(kFull, x, off);
  return x;
}

// cos / sin(θ_j σ) for σ < maxLen, j < half (f64 argument and functions, stored f32).
__global__ void trigTable(float2* __restrict__ table, const double* __restrict__ theta, int maxLen, int half) {
  const long long n = (long long)maxLen * half;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
    const int sigma = int(i / half), j = int(i % half);
    double s, c;
    sincos(theta[j] * double(sigma), &s, &c);
    table[i] = make_float2(float(c), float(s));
  }
}

struct AttnParams {
  const void* q;
  const void* k;
  const void* v;
  const int4* work;     // {sequence start, sequence end, first row, 0} per query block, longest first
  const float2* trig;   // [maxLen, half]
  float* rows;          // [tokens, H, R]
  float* o;             // [tokens, H, D]
  int H, group, D, half, R;
  long long qStride, kvStride;  // elements between tokens
  float scale;
};

// CPL: channels per lane (D ≤ 32·CPL); PPL: RoPE pairs per lane.
template <typename E, int CPL>
__global__ void __launch_bounds__(kWarps * 32) momentsAttention(AttnParams p) {
  constexpr int PPL = (CPL + 1) / 2;
  extern __shared__ float smem[];
  const int D = p.D, half = p.half;
  float* Qs = smem;                                              // [kRows][D], scaled
  float* Ks = Qs + kRows * D;                                    // [kTile][D+1] (padded: lane j reads row j)
  float* Vs = Ks + kTile * (D + 1);                              // [kTile][D]
  float2* Ts = reinterpret_cast<float2*>(Vs + kTile * D);        // [kTile][half]
  const int item = blockIdx.x / p.H, h = blockIdx.x % p.H, hk = h / p.group;
  const int4 w = p.work[item];
  const int seq0 = w.x, seq1 = w.y, row0 = w.z;
  const int row1 = min(seq1, row0 + kRows);
  const int rho = row0 - seq0;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const E* q = static_cast<const E*>(p.q);
  const E* k = static_cast<const E*>(p.k);
  const E* v = static_cast<const E*>(p.v);

  for (int i = threadIdx.x; i < kRows * D; i += blockDim.x) {
    const int r = i / D, c = i % D, row = row0 + r;
    Qs[i] = row < row1 ? toF(q[(long long)row * p.qStride + (long long)h * D + c]) * p.scale : 0.f;
  }
  float m[kRowsPerWarp], role[kRowsPerWarp], O[kRowsPerWarp][CPL], C[kRowsPerWarp][PPL], Sn[kRowsPerWarp][PPL];
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    m[rr] = -INFINITY;
    role[rr] = 0.f;
#pragma unroll
    for (int u = 0; u < CPL; ++u) O[rr][u] = 0.f;
#pragma unroll
    for (int u = 0; u < PPL; ++u) C[rr][u] = Sn[rr][u] = 0.f;
  }

  for (int kt = seq0; kt < row1; kt += kTile) {
    const int nk = min(kTile, row1 - kt);
    __syncthreads();  // the previous tile is consumed (and Q is written)
    for (int i = threadIdx.x; i < kTile * D; i += blockDim.x) {
      const int j = i / D, c = i % D;
      const long long off = (long long)(kt + j) * p.kvStride + (long long)hk * D + c;
      Ks[j * (D + 1) + c] = j < nk ? toF(k[off]) : 0.f;
      Vs[j * D + c] = j < nk ? toF(v[off]) : 0.f;
    }
    for (int i = threadIdx.x; i < kTile * half; i += blockDim.x) {
      const int j = i / half, c = i % half;
      Ts[i] = j < nk ? p.trig[(long long)(kt + j - seq0) * half + c] : make_float2(0.f, 0.f);
    }
    __syncthreads();
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      const int r = rr * kWarps + warp, row = row0 + r;
      if (row >= row1 || kt > row) continue;  // warp-uniform
      const int tau = row - seq0;
      const int nValid = min(nk, row - kt + 1);
      const bool valid = lane < nValid;
      float a = -INFINITY;
      if (valid) {
        const float* qr = Qs + r * D;
        const float* kr = Ks + lane * (D + 1);
        float d0 = 0.f, d1 = 0.f;
        int c = 0;
        for (; c + 1 < D; c += 2) {
          d0 = fmaf(qr[c], kr[c], d0);
          d1 = fmaf(qr[c + 1], kr[c + 1], d1);
        }
        for (; c < D; ++c) d0 = fmaf(qr[c], kr[c], d0);
        a = d0 + d1;
      }
      const float mNew = fmaxf(m[rr], warpMax(a));
      const float kappa = expf(m[rr] - mNew);  // 0 on the first tile (m = −inf)
      const float lOld = __shfl_sync(kFull, role[rr], kRoleL);
      if (lane == kRoleE)
        role[rr] = lOld > 0.f ? kappa * (role[rr] + (m[rr] - mNew) * lOld) : 0.f;
      else
        role[rr] *= kappa;
#pragma unroll
      for (int u = 0; u < CPL; ++u) O[rr][u] *= kappa;
#pragma unroll
      for (int u = 0; u < PPL; ++u) {
        C[rr][u] *= kappa;
        Sn[rr][u] *= kappa;
      }
      const float de = valid ? a - mNew : 0.f;
      const float pe = valid ? expf(de) : 0.f;
      for (int j = 0; j < nValid; ++j) {
        const float pj = __shfl_sync(kFull, pe, j);
        const float dj = __shfl_sync(kFull, de, j);
        const int sigma = kt + j - seq0, delta = tau - sigma;
        const float rel = float(sigma - rho);
#pragma unroll
        for (int u = 0; u < CPL; ++u) {
          const int c = lane + 32 * u;
          if (c < D) O[rr][u] = fmaf(pj, Vs[j * D + c], O[rr][u]);
        }
#pragma unroll
        for (int u = 0; u < PPL; ++u) {
          const int i = lane + 32 * u;
          if (i < half) {
            const float2 cs = Ts[j * half + i];
            C[rr][u] = fmaf(pj, cs.x, C[rr][u]);
            Sn[rr][u] = fmaf(pj, cs.y, Sn[rr][u]);
          }
        }
        float add = 0.f;
        if (lane < kBins) add = binOf(delta) == lane ? pj : 0.f;
        else if (lane == kRoleSink) add = sigma == 0 ? pj : 0.f;
        else if (lane == kRoleLocal) add = delta < kLocalWindow ? pj : 0.f;
        else if (lane == kRoleL) add = pj;
        else if (lane == kRoleE) add = pj * dj;
        else if (lane == kRoleS1) add = pj * rel;
        else if (lane == kRoleS2) add = pj * rel * rel;
        role[rr] += add;
      }
      m[rr] = mNew;
    }
  }

  // Finalise the rows (moments.h).
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
    const int r = rr * kWarps + warp, row = row0 + r;
    if (row >= row1) continue;  // warp-uniform
    const int tau = row - seq0;
    const float l = __shfl_sync(kFull, role[rr], kRoleL);
    const float s2 = __shfl_sync(kFull, role[rr], kRoleS2);
    const float inv = 1.f / l;
    float* out = p.rows + ((long long)row * p.H + h) * p.R;
    if (lane < kBins) out[kRowScalars + lane] = role[rr] * inv;
    if (lane == kRoleSink) out[kSink] = role[rr] * inv;
    if (lane == kRoleLocal) out[kLocal] = role[rr] * inv;
    if (lane == kRoleE) out[kEntropy] = logf(l) - role[rr] * inv;
    if (lane == kRoleS1) {
      const float delta = float(tau - rho), m1 = role[rr] * inv;
      out[kDist] = delta - m1;
      out[kDistSq] = delta * delta - 2.f * delta * m1 + s2 * inv;
    }
    float* phi = out + kRowScalars + kBins;
#pragma unroll
    for (int u = 0; u < PPL; ++u) {
      const int i = lane + 32 * u;
      if (i < half) {
        const float2 ct = p.trig[(long long)tau * half + i];
        phi[2 * i] = (ct.x * C[rr][u] + ct.y * Sn[rr][u]) * inv;
        phi[2 * i + 1] = (ct.y * C[rr][u] - ct.x * Sn[rr][u]) * inv;
      }
    }
    float* o = p.o + ((long long)row * p.H + h) * D;
#pragma unroll
    for (int u = 0; u < CPL; ++u) {
      const int c = lane + 32 * u;
      if (c < D) o[c] = O[rr][u] * inv;
    }
  }
}

// partial[chunk, h, r] = Σ over the chunk's included tokens (in order) of rows[token, h, r], in f64.
__global__ void reduceRowsPartial(const float* __restrict__ rows, const int* __restrict__ tokens, int count, int H,
                                  int R, double* __restrict__ partial) {
  const int chunk = blockIdx.x, h = blockIdx.y;
  const int t0 = chunk * kChunk, t1 = min(count, t0 + kChunk);
  for (int r = threadIdx.x; r < R; r += blockDim.x) {
    double s = 0;
    for (int i = t0; i < t1; ++i) s += double(rows[((long long)tokens[i] * H + h) * R + r]);
    partial[((long long)chunk * H + h) * R + r] = s;
  }
}

// Sums the chunks in order and adds into attention [H,5], histogram [H,bins], phi [H,D].
__global__ void reduceRowsFinal(const double* __restrict__ partial, int chunks, int H, int R, int D,
                                double* __restrict__ attention, double* __restrict__ histogram, double* __restrict__ phi) {
  const long long n = (long long)H * R;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
    const int h = int(i / R), r = int(i % R);
    double s = 0;
    for (int c = 0; c < chunks; ++c) s += partial[((long long)c * H + h) * R + r];
    if (r < kRowScalars) attention[h * kAttentionColumns + r] += s;
    else if (r < kRowScalars + kBins) histogram[h * kBins + (r - kRowScalars)] += s;
    else phi[(long long)h * D + (r - kRowScalars - kBins)] += s;
  }
}

struct ScanParams {
  const void* v;
  const float* o;        // [tokens, H, D]
  const int2* seqs;      // included sequences, in order
  int nSeqs;
  const double* decays;  // [K0]
  int H, group, D, K0;
  long long kvStride;
  double* cross;         // [H, K0, D]
  double* sq;            // [H, K0, D]
  double* oSum;          // [H, D]
  double* oSq;           // [H, D]
};

// One warp per (head, decay): y_t = γ y_{t−1} + v_t per sequence, ŷ = y / sqrt(mean y² + ε); Σ ŷ∘o, Σ ŷ².
// The decay-0 warp of each head also sums o and o².
template <typename E, int CPL>
__global__ void __launch_bounds__(128) momentsScan(ScanParams p) {
  const int lane = threadIdx.x & 31;
  const long long wid = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (wid >= (long long)p.H * p.K0) return;
  const int h = int(wid / p.K0), kk = int(wid % p.K0), hk = h / p.group, D = p.D;
  const double g = p.decays[kk];
  const bool ctx = kk == 0;
  const E* v = static_cast<const E*>(p.v);
  double y[CPL], cr[CPL], sq[CPL], os[CPL], oq[CPL];
#pragma unroll
  for (int u = 0; u < CPL; ++u) cr[u] = sq[u] = os[u] = oq[u] = 0;
  for (int n = 0; n < p.nSeqs; ++n) {
    const int2 s = p.seqs[n];
#pragma unroll
    for (int u = 0; u < CPL; ++u) y[u] = 0;
    for (int t = s.x; t < s.y; ++t) {
      double ms = 0;
#pragma unroll
      for (int u = 0; u < CPL; ++u) {
        const int c = lane + 32 * u;
        const double vt = c < D ? double(toF(v[(long long)t * p.kvStride + (long long)hk * D + c])) : 0.0;
        y[u] = g * y[u] + vt;
        ms += y[u] * y[u];
      }
      ms = warpSum(ms);
      const double rs = 1.0 / sqrt(ms / double(D) + kScanEps);
#pragma unroll
      for (int u = 0; u < CPL; ++u) {
        const int c = lane + 32 * u;
        if (c < D) {
          const double o = p.o[((long long)t * p.H + h) * D + c];
          const double yh = y[u] * rs;
          cr[u] += yh * o;
          sq[u] += yh * yh;
          if (ctx) {
            os[u] += o;
            oq[u] += o * o;
          }
        }
      }
    }
  }
#pragma unroll
  for (int u = 0; u < CPL; ++u) {
    const int c = lane + 32 * u;
    if (c < D) {
      p.cross[((long long)h * p.K0 + kk) * D + c] += cr[u];
      p.sq[((long long)h * p.K0 + kk) * D + c] += sq[u];
      if (ctx) {
        p.oSum[(long long)h * D + c] += os[u];
        p.oSq[(long long)h * D + c] += oq[u];
      }
    }
  }
}

struct OuterParams {
  const void* z;         // element (token t, column c) at z[t·stride + c]
  long long stride;
  int n;                 // columns
  int ropeHalf;          // > 0: undo RoPE on the pairs (c, c + ropeHalf) at each token's position
  const float2* trig;    // [maxLen, ropeHalf]
  const int* tokens;     // included tokens, in order
  const int* pos;        // their positions in their sequences
  int count;
  double* sum;           // [n]
  double* outer;         // [n, n]
};

template <typename E>
__device__ __forceinline__ double loadZ(const OuterParams& p, int idx, int col) {
  const E* z = static_cast<const E*>(p.z) + (long long)p.tokens[idx] * p.stride;
  if (p.ropeHalf == 0) return double(toF(z[col]));
  const int hf = p.ropeHalf, i = col < hf ? col : col - hf;
  const float2 cs = p.trig[(long long)p.pos[idx] * hf + i];
  const double a = double(toF(z[i])), b = double(toF(z[i + hf]));
  return col < hf ? a * double(cs.x) + b * double(cs.y) : b * double(cs.x) - a * double(cs.y);
}

// Σ z per column, in token order.
template <typename E>
__global__ void columnSums(OuterParams p) {
  const int col = blockIdx.x * blockDim.x + threadIdx.x;
  if (col >= p.n) return;
  double s = 0;
  for (int i = 0; i < p.count; ++i) s += loadZ<E>(p, i, col);
  p.sum[col] += s;
}

// Σ z zᵀ: a 32×32 output tile per CTA of 32×8 threads (4 outputs each), tokens in order through shared memory.
template <typename E>
__global__ void __launch_bounds__(256) outerSums(OuterParams p) {
  __shared__ double Zi[32][33], Zj[32][33];
  const int i0 = blockIdx.y * 32, j0 = blockIdx.x * 32, tx = threadIdx.x, ty = threadIdx.y;
  double acc[4] = {0, 0, 0, 0};
  for (int t0 = 0; t0 < p.count; t0 += 32) {
    for (int e = ty * 32 + tx; e < 32 * 32; e += 256) {
      const int t = e / 32, c = e % 32;
      const bool ok = t0 + t < p.count;
      Zi[t][c] = ok && i0 + c < p.n ? loadZ<E>(p, t0 + t, i0 + c) : 0.0;
      Zj[t][c] = ok && j0 + c < p.n ? loadZ<E>(p, t0 + t, j0 + c) : 0.0;
    }
    __syncthreads();
    const int tn = min(32, p.count - t0);
    for (int t = 0; t < tn; ++t) {
      const double zj = Zj[t][tx];
#pragma unroll
      for (int u = 0; u < 4; ++u) acc[u] += Zi[t][ty + 8 * u] * zj;
    }
    __syncthreads();
  }
#pragma unroll
  for (int u = 0; u < 4; ++u) {
    const int i = i0 + ty + 8 * u, j = j0 + tx;
    if (i < p.n && j < p.n) p.outer[(long long)i * p.n + j] += acc[u];
  }
}

__global__ void addScalar(double* p, double v) { *p += v; }

// context[t] = o[t] for included tokens (the rest was zeroed).
template <typename T>
__global__ void scatterContext(const float* __restrict__ o, const int* __restrict__ tokens, int count, long long HD,
                               T* __restrict__ out) {
  const long long n = (long long)count * HD;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
    const long long t = tokens[i / HD], c = i % HD;
    out[t * HD + c] = T(o[t * HD + c]);
  }
}

template <typename E>
void outerFor(const OuterParams& prm, cudaStream_t stream) {
  columnSums<E><<<unsigned((prm.n + 127) / 128), 128, 0, stream>>>(prm);
  checkLaunch("taylorMoments (column sums)");
  const unsigned tiles = unsigned((prm.n + 31) / 32);
  outerSums<E><<<dim3(tiles, tiles), dim3(32, 8), 0, stream>>>(prm);
  checkLaunch("taylorMoments (outer sums)");
}

template <typename E, int CPL>
void launchAttention(const AttnParams& prm, long long blocks, size_t smem, cudaStream_t stream) {
  auto kern = momentsAttention<E, CPL>;
  check(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)), "cudaFuncSetAttribute");
  kern<<<unsigned(blocks), kWarps * 32, smem, stream>>>(prm);
  checkLaunch("taylorMoments (attention)");
}

template <typename E, int CPL>
void launchScan(const ScanParams& prm, cudaStream_t stream) {
  const long long warps = (long long)prm.H * prm.K0;
  momentsScan<E, CPL><<<unsigned((warps + 3) / 4), 128, 0, stream>>>(prm);
  checkLaunch("taylorMoments (scan)");
}

template <typename E>
void runTyped(const Problem& p, const Inputs& in, const Accumulators& acc, const Outputs& out,
              const std::vector<int2>& seqs, const std::vector<int>& tokens, const std::vector<int4>& work, int maxLen,
              cudaStream_t stream) {
  const Device dev = in.q.device();
  const int H = int(p.H), HKV = int(p.HKV), D = int(p.D), half = D / 2, K0 = int(p.K0());
  const int R = kRowScalars + kBins + D;
  const int count = int(tokens.size());
  // Device copies of the host lists.
  auto upload = [&](const void* data, int64_t n, DType t) {
    Tensor d = empty({n}, t, dev);
    copyFromHost(d, data, size_t(n) * dtypeSize(t));
    return d;
  };
  std::vector<int> pos(tokens.size());
  {
    size_t i = 0;
    for (const int2& s : seqs)
      for (int t = s.x; t < s.y; ++t) pos[i++] = t - s.x;
  }
  Tensor workD = upload(work.data(), int64_t(work.size()) * 4, DType::I32);
  Tensor seqsD = upload(seqs.data(), int64_t(seqs.size()) * 2, DType::I32);
  Tensor tokD = upload(tokens.data(), count, DType::I32);
  Tensor posD = upload(pos.data(), count, DType::I32);
  Tensor thetaD = upload(p.invFreq.data(), half, DType::F64);
  Tensor decayD = upload(p.decays.data(), K0, DType::F64);
  Tensor trig = empty({int64_t(maxLen) * half * 2}, DType::F32, dev);
  trigTable<<<gridFor(int64_t(maxLen) * half, 256), 256, 0, stream>>>(reinterpret_cast<float2*>(trig.data()),
                                                                         thetaD.ptr<double>(), maxLen, half);
  checkLaunch("taylorMoments (trig table)");
  Tensor rows = empty({p.tokens() * H * R}, DType::F32, dev);
  Tensor obuf = empty({p.tokens() * H * D}, DType::F32, dev);

  AttnParams ap{};
  ap.q = in.q.data();
  ap.k = in.k.data();
  ap.v = in.v.data();
  ap.work = reinterpret_cast<const int4*>(workD.data());
  ap.trig = reinterpret_cast<const float2*>(trig.data());
  ap.rows = rows.ptr<float>();
  ap.o = obuf.ptr<float>();
  ap.H = H;
  ap.group = int(p.group());
  ap.D = D;
  ap.half = half;
  ap.R = R;
  ap.qStride = p.H * p.D;
  ap.kvStride = p.HKV * p.D;
  ap.scale = float(p.scale);
  const long long blocks = (long long)work.size() * H;
  if (blocks > INT32_MAX) throwInvalid("q", "too many query blocks for one launch");
  const size_t smem = sizeof(float) * (size_t(kRows) * D + size_t(kTile) * (D + 1) + size_t(kTile) * D) +
                      sizeof(float2) * size_t(kTile) * half;
  if (D <= 32) launchAttention<E, 1>(ap, blocks, smem, stream);
  else if (D <= 64) launchAttention<E, 2>(ap, blocks, smem, stream);
  else if (D <= 128) launchAttention<E, 4>(ap, blocks, smem, stream);
  else launchAttention<E, 8>(ap, blocks, smem, stream);

  const int chunks = (count + kChunk - 1) / kChunk;
  Tensor partial = empty({int64_t(chunks) * H * R}, DType::F64, dev);
  reduceRowsPartial<<<dim3(unsigned(chunks), unsigned(H)), 128, 0, stream>>>(rows.ptr<float>(), tokD.ptr<int>(), count, H,
                                                                             R, partial.ptr<double>());
  checkLaunch("taylorMoments (row partials)");
  reduceRowsFinal<<<gridFor(int64_t(H) * R, 256), 256, 0, stream>>>(partial.ptr<double>(), chunks, H, R, D,
                                                                     acc.attention.ptr<double>(),
                                                                     acc.histogram.ptr<double>(), acc.phi.ptr<double>());
  checkLaunch("taylorMoments (row sums)");

  ScanParams sp{};
  sp.v = in.v.data();
  sp.o = obuf.ptr<float>();
  sp.seqs = reinterpret_cast<const int2*>(seqsD.data());
  sp.nSeqs = int(seqs.size());
  sp.decays = decayD.ptr<double>();
  sp.H = H;
  sp.group = int(p.group());
  sp.D = D;
  sp.K0 = K0;
  sp.kvStride = p.HKV * p.D;
  sp.cross = acc.scanCross.ptr<double>();
  sp.sq = acc.scanSq.ptr<double>();
  sp.oSum = acc.contextSum.ptr<double>();
  sp.oSq = acc.contextSq.ptr<double>();
  if (D <= 32) launchScan<E, 1>(sp, stream);
  else if (D <= 64) launchScan<E, 2>(sp, stream);
  else if (D <= 128) launchScan<E, 4>(sp, stream);
  else launchScan<E, 8>(sp, stream);

  OuterParams op{};
  op.trig = reinterpret_cast<const float2*>(trig.data());
  op.tokens = tokD.ptr<int>();
  op.pos = posD.ptr<int>();
  op.count = count;
  op.n = D;
  op.stride = p.HKV * p.D;
  for (int hk = 0; hk < HKV; ++hk) {
    op.z = static_cast<const E*>(in.k.data()) + int64_t(hk) * D;
    op.ropeHalf = half;
    op.sum = acc.keySum.ptr<double>() + int64_t(hk) * D;
    op.outer = acc.keyOuter.ptr<double>() + int64_t(hk) * D * D;
    outerFor<E>(op, stream);
    op.z = static_cast<const E*>(in.v.data()) + int64_t(hk) * D;
    op.ropeHalf = 0;
    op.sum = acc.valueSum.ptr<double>() + int64_t(hk) * D;
    op.outer = acc.valueOuter.ptr<double>() + int64_t(hk) * D * D;
    outerFor<E>(op, stream);
  }
  if (in.x.defined()) {
    dispatchDeviceFloat(in.x.dtype(), "x", [&](auto tag) {
      using X = typename decltype(tag)::type;
      OuterParams xp = op;
      xp.z = in.x.data();
      xp.stride = p.Dx;
      xp.n = int(p.Dx);
      xp.ropeHalf = 0;
      xp.sum = acc.inputSum.ptr<double>();
      xp.outer = acc.inputOuter.ptr<double>();
      outerFor<X>(xp, stream);
    });
  }
  addScalar<<<1, 1, 0, stream>>>(acc.count.ptr<double>(), double(count));
  checkLaunch("taylorMoments (count)");
  if (out.context.defined()) {
    check(cudaMemsetAsync(out.context.data(), 0, out.context.nbytes(), stream), "cudaMemsetAsync");
    const long long n = (long long)count * H * D;
    if (out.context.dtype() == DType::F64)
      scatterContext<double><<<gridFor(n, 256), 256, 0, stream>>>(obuf.ptr<float>(), tokD.ptr<int>(), count,
                                                                   (long long)H * D, out.context.ptr<double>());
    else
      scatterContext<float><<<gridFor(n, 256), 256, 0, stream>>>(obuf.ptr<float>(), tokD.ptr<int>(), count,
                                                                  (long long)H * D, out.context.ptr<float>());
    checkLaunch("taylorMoments (context)");
  }
}

}  // namespace

void taylorMoments(const Problem& p, const Inputs& in, const Accumulators& acc, const Outputs& out) {
  if (p.D > 256) throwInvalid("q", "the CUDA moment reduction takes head dims up to 256, got " + std::to_string(p.D));
  const int dev = in.q.device().index;
  cudaStream_t stream = use(dev);
  std::vector<int2> seqs;
  std::vector<int> tokens;
  std::vector<int4> work;
  int maxLen = 1;
  for (int64_t n = 0; n < p.N; ++n) {
    const int s0 = p.cu[size_t(n)], s1 = p.cu[size_t(n + 1)];
    if (s1 <= s0 || !p.included(n)) continue;
    seqs.push_back(make_int2(s0, s1));
    for (int t = s0; t < s1; ++t) tokens.push_back(t);
    for (int r = s0; r < s1; r += kRows) work.push_back(make_int4(s0, s1, r, 0));
    maxLen = std::max(maxLen, s1 - s0);
  }
  if (tokens.empty()) return;
  // Longest first: a query block's cost is its number of keys.
  std::stable_sort(work.begin(), work.end(), [](const int4& a, const int4& b) {
    return std::min(a.z + kRows, a.y) - a.x > std::min(b.z + kRows, b.y) - b.x;
  });
  if (int64_t(tokens.size()) * p.H * int64_t(p.D + kRowScalars + kBins) > (int64_t(1) << 40))
    throwInvalid("q", "problem too large");
  switch (in.q.dtype()) {
    case DType::F32: runTyped<float>(p, in, acc, out, seqs, tokens, work, maxLen, stream); break;
    case DType::BF16: runTyped<__nv_bfloat16>(p, in, acc, out, seqs, tokens, work, maxLen, stream); break;
    case DType::F16: runTyped<__half>(p, in, acc, out, seqs, tokens, work, maxLen, stream); break;
    default: throwInvalid("q", std::string("the CUDA moment reduction takes bf16, f16 or f32, got ") + dtypeName(in.q.dtype()));
  }
}

}  // namespace tcal::cuda
