// The Taylor attention-moment reduction on the GPU (the statistics and the streaming formulation:
// native/cpu/moments.h).
//   1. trigTable: cos / sin(θ_j σ) for every position σ < the longest sequence, made in f64, stored f32.
//   2. The attention statistics (E[Δ], E[Δ²], entropy, sink, local, histogram, φ):
//      bf16 / f16 inputs with the teacher's context given — the tensor-core pass of moments_tc.cu;
//      otherwise (f32 inputs, or no context) momentsAttention below, on CUDA cores in fp32, which also forms
//      the context o: one CTA of 4 warps per (query block of 16 rows, head), key tiles of 32 keys through
//      shared memory, per row a warp keeps the online-softmax state (lane j scores key j; lanes hold O and the
//      φ channels; lane r a "role" scalar: bins, sink, local, l, entropy, S1, S2), rows written (f32) to a
//      row buffer summed in f64 over fixed chunks of tokens (deterministic).
//   3. The γ₀ scan and the context moments, chunk-parallel over the included tokens (moments_scan.cu), from
//      the given context or the CUDA-core pass's o.
//   4. Σ k̄k̄ᵀ (RoPE undone), Σ vvᵀ per KV head on moments_outer.cu's tensor-core kernel; Σ xxᵀ as bf16 hi/lo
//      GEMMs through cuBLAS (that kernel with one head when cuBLAS cannot be loaded).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <utility>
#include <type_traits>
#include <vector>

#include "../core/runtime.h"
#include "check.h"
#include "device.h"
#include "cublas.h"
#include "moments.h"
#include "moments_outer.h"
#include "moments_scan.h"
#include "moments_tc.h"
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

constexpr int kPart = 32;  // rows per fp32 column partial of the outer-product sums

// ---- Σ x, Σ x xᵀ of the layer input through cuBLAS (x is one wide "head": Dx² outputs, a GEMM-sized product;
// the per-head k̄ / v products run on moments_outer.cu's kernel): rows of included tokens gathered into bf16 hi
// and lo = bf16(x − hi) halves, per chunk of rows Σ x xᵀ ≈ hi·hiᵀ + hi·loᵀ + lo·hiᵀ as bf16 GEMMs with fp32
// accumulation (products of bf16 are exact; the dropped lo·loᵀ is ≤ 2^-16 relative), the fp32 chunk result
// added into the f64 accumulator. bf16 x is exact in hi: one GEMM.

constexpr int kOuterRows = 8192;  // rows per GEMM chunk

template <typename T>
__global__ void gatherSplit(const T* __restrict__ src, long long stride, int width, const int* __restrict__ tok, int i0, int rows,
                            __nv_bfloat16* __restrict__ hi, __nv_bfloat16* __restrict__ lo) {
  const long long n = (long long)rows * width;
  for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < n; e += (long long)gridDim.x * blockDim.x) {
    const int r = int(e / width), col = int(e % width);
    const float z = toF(src[(long long)tok[i0 + r] * stride + col]);
    const __nv_bfloat16 zh = __float2bfloat16_rn(z);
    hi[e] = zh;
    if (lo) lo[e] = __float2bfloat16_rn(z - __bfloat162float(zh));
  }
}

// part[rb, col] = Σ over rows [kPart·rb, kPart·rb + kPart) of hi + lo (fp32).
__global__ void columnPartials(const __nv_bfloat16* __restrict__ hi, const __nv_bfloat16* __restrict__ lo, int rows, int width,
                               float* __restrict__ part) {
  const int col = blockIdx.x * blockDim.x + threadIdx.x, rb = blockIdx.y;
  if (col >= width) return;
  float s = 0.f;
  const int r1 = min(rows, (rb + 1) * kPart);
#pragma unroll 8
  for (int r = rb * kPart; r < r1; ++r) {
    const long long e = (long long)r * width + col;
    s += __bfloat162float(hi[e]) + (lo ? __bfloat162float(lo[e]) : 0.f);
  }
  part[(long long)rb * width + col] = s;
}

void inputOuterBlas(const moments_outer::Job& j, const int* tok, int count, Device dev, cudaStream_t stream) {
  const int width = j.heads * j.D;
  const bool split = j.dtype != DType::BF16;
  const int chunkRows = std::min(count, kOuterRows);
  Tensor hi = empty({int64_t(chunkRows) * width}, DType::BF16, dev);
  Tensor lo = split ? empty({int64_t(chunkRows) * width}, DType::BF16, dev) : Tensor();
  Tensor c32 = empty({int64_t(j.heads) * j.D * j.D}, DType::F32, dev);
  const int rowBlocks = (chunkRows + kPart - 1) / kPart;
  Tensor part = empty({int64_t(rowBlocks) * width}, DType::F32, dev);
  auto* hiP = reinterpret_cast<__nv_bfloat16*>(hi.data());
  auto* loP = split ? reinterpret_cast<__nv_bfloat16*>(lo.data()) : nullptr;
  const float one = 1.f, zero = 0.f;
  for (int i0 = 0; i0 < count; i0 += kOuterRows) {
    const int rows = std::min(kOuterRows, count - i0);
    dispatchDeviceFloat(j.dtype, "k", [&](auto tag) {
      using T = typename decltype(tag)::type;
      gatherSplit<T><<<gridFor(int64_t(rows) * width, 256), 256, 0, stream>>>(static_cast<const T*>(j.src), j.stride, width, tok, i0,
                                                                             rows, hiP, loP);
    });
    checkLaunch("taylorMoments (gather)");
    const int rb = (rows + kPart - 1) / kPart;
    columnPartials<<<dim3(unsigned((width + 127) / 128), unsigned(rb)), 128, 0, stream>>>(hiP, loP, rows, width, part.ptr<float>());
    checkLaunch("taylorMoments (column sums)");
    moments_outer::addPartialSums(part.ptr<float>(), rb, width, j.sum, stream);
    // Column-major: head h's rows are a D × rows matrix at hi + h·D with leading dimension `width`.
    auto gemm = [&](const void* a, const void* b, const float* beta) {
      blas::gemmStridedBatched(dev.index, stream, blas::OpN, blas::OpT, j.D, j.D, rows, &one, a, CUDA_R_16BF, width, j.D, b,
                               CUDA_R_16BF, width, j.D, beta, c32.data(), CUDA_R_32F, j.D, (long long)j.D * j.D, j.heads,
                               blas::Compute32F);
    };
    gemm(hiP, hiP, &zero);
    if (split) {
      gemm(hiP, loP, &one);
      gemm(loP, hiP, &one);
    }
    const long long n = (long long)j.heads * j.D * j.D;
    moments_outer::addPartialSums(c32.ptr<float>(), 1, n, j.outer, stream);
  }
}

__global__ void addScalar(double* p, double v) { *p += v; }

template <typename E, int CPL>
void launchAttention(const AttnParams& prm, long long blocks, size_t smem, cudaStream_t stream) {
  auto kern = momentsAttention<E, CPL>;
  check(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)), "cudaFuncSetAttribute");
  kern<<<unsigned(blocks), kWarps * 32, smem, stream>>>(prm);
  checkLaunch("taylorMoments (attention)");
}

// The CUDA-core statistics pass (f32 inputs, or no context given): rows → per-head sums; o into obuf.
template <typename E>
void statsCudaCores(const Problem& p, const Inputs& in, const Accumulators& acc, const std::vector<int4>& work, const Tensor& tokD,
                    int count, const float2* trig, const Tensor& obuf, Device dev, cudaStream_t stream) {
  const int H = int(p.H), D = int(p.D), half = D / 2;
  const int R = kRowScalars + kBins + D;
  Tensor workD = empty({int64_t(work.size()) * 4}, DType::I32, dev);
  copyFromHost(workD, work.data(), work.size() * sizeof(int4));
  Tensor rows = empty({p.tokens() * H * R}, DType::F32, dev);
  AttnParams ap{};
  ap.q = in.q.data();
  ap.k = in.k.data();
  ap.v = in.v.data();
  ap.work = reinterpret_cast<const int4*>(workD.data());
  ap.trig = trig;
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
  const size_t smem = sizeof(float) * (size_t(kRows) * D + size_t(kTile) * (D + 1) + size_t(kTile) * D) + sizeof(float2) * size_t(kTile) * half;
  if (D <= 32) launchAttention<E, 1>(ap, blocks, smem, stream);
  else if (D <= 64) launchAttention<E, 2>(ap, blocks, smem, stream);
  else if (D <= 128) launchAttention<E, 4>(ap, blocks, smem, stream);
  else launchAttention<E, 8>(ap, blocks, smem, stream);
  const int chunks = (count + kChunk - 1) / kChunk;
  Tensor partial = empty({int64_t(chunks) * H * R}, DType::F64, dev);
  reduceRowsPartial<<<dim3(unsigned(chunks), unsigned(H)), 128, 0, stream>>>(rows.ptr<float>(), tokD.ptr<int>(), count, H, R,
                                                                             partial.ptr<double>());
  checkLaunch("taylorMoments (row partials)");
  reduceRowsFinal<<<gridFor(int64_t(H) * R, 256), 256, 0, stream>>>(partial.ptr<double>(), chunks, H, R, D, acc.attention.ptr<double>(),
                                                                     acc.histogram.ptr<double>(), acc.phi.ptr<double>());
  checkLaunch("taylorMoments (row sums)");
}

// TCAL_MOMENTS_PROFILE=1: CUDA events between the phases, printed to stderr per call (for bench/NOTES).
struct Profiler {
  bool on = false;
  cudaStream_t stream = nullptr;
  std::vector<std::pair<const char*, cudaEvent_t>> marks;
  std::chrono::steady_clock::time_point host0 = std::chrono::steady_clock::now();
  explicit Profiler(cudaStream_t s) : stream(s) {
    const char* e = std::getenv("TCAL_MOMENTS_PROFILE");
    on = e && *e && std::string(e) != "0";
    mark("start");
  }
  void mark(const char* name) {
    if (!on) return;
    cudaEvent_t ev;
    check(cudaEventCreate(&ev), "cudaEventCreate");
    check(cudaEventRecord(ev, stream), "cudaEventRecord");
    marks.emplace_back(name, ev);
  }
  ~Profiler() {
    if (!on) return;
    // Wall time of the whole call on the host (lists, uploads, launches), before waiting for the GPU.
    const double hostMs = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - host0).count();
    if (cudaEventSynchronize(marks.back().second) == cudaSuccess) {
      std::string line = "taylorMoments profile (ms):";
      for (size_t i = 1; i < marks.size(); ++i) {
        float ms = 0;
        cudaEventElapsedTime(&ms, marks[i - 1].second, marks[i].second);
        line += std::string(" ") + marks[i].first + " " + std::to_string(ms);
      }
      line += " hostEnqueue " + std::to_string(hostMs);
      std::fprintf(stderr, "%s\n", line.c_str());
    }
    for (auto& m : marks) cudaEventDestroy(m.second);
  }
};

// Per-sequence lists are built before anything is queued; the per-token lists (tokens, pos, first) and the
// CUDA-core pass's work list only after the statistics pass is queued, so that on the tensor-core path the host
// builds them while the GPU runs it (they cost ≈ 0.1–0.3 ms of host time at 32k tokens).
struct Lists {
  std::vector<int2> seqs;  // {start, end} of each included, non-empty sequence
  int maxLen = 1;
  std::vector<int> tokens, pos, first;
  std::vector<int4> work;  // CUDA-core pass: {start, end, first row, 0} per block of kRows, longest first

  explicit Lists(const Problem& p) {
    for (int64_t n = 0; n < p.N; ++n) {
      const int s0 = p.cu[size_t(n)], s1 = p.cu[size_t(n + 1)];
      if (s1 <= s0 || !p.included(n)) continue;
      seqs.push_back(make_int2(s0, s1));
      maxLen = std::max(maxLen, s1 - s0);
    }
  }
  int tokenCount() const {
    int c = 0;
    for (const int2& s : seqs) c += s.y - s.x;
    return c;
  }
  void buildTokens() {
    const int count = tokenCount();
    tokens.resize(size_t(count));
    pos.resize(size_t(count));
    first.assign(size_t(count), 0);
    int i = 0;
    for (const int2& s : seqs) {
      first[size_t(i)] = 1;
      for (int t = s.x; t < s.y; ++t, ++i) {
        tokens[size_t(i)] = t;
        pos[size_t(i)] = t - s.x;
      }
    }
  }
  void buildWork() {
    for (const int2& s : seqs)
      for (int r = s.x; r < s.y; r += kRows) work.push_back(make_int4(s.x, s.y, r, 0));
    std::stable_sort(work.begin(), work.end(), [](const int4& a, const int4& b) {
      return std::min(a.z + kRows, a.y) - a.x > std::min(b.z + kRows, b.y) - b.x;
    });
  }
};

template <typename E>
void runTyped(const Problem& p, const Inputs& in, const Accumulators& acc, Lists& ls, cudaStream_t stream, Profiler& prof) {
  const Device dev = in.q.device();
  const int H = int(p.H), D = int(p.D), half = D / 2, K0 = int(p.K0());
  auto upload = [&](const void* data, int64_t n, DType t) {
    Tensor d = empty({n}, t, dev);
    copyFromHost(d, data, size_t(n) * dtypeSize(t));
    return d;
  };
  Tensor thetaD = upload(p.invFreq.data(), half, DType::F64);
  Tensor trig = empty({int64_t(ls.maxLen) * half * 2}, DType::F32, dev);
  trigTable<<<gridFor(int64_t(ls.maxLen) * half, 256), 256, 0, stream>>>(reinterpret_cast<float2*>(trig.data()), thetaD.ptr<double>(),
                                                                          ls.maxLen, half);
  checkLaunch("taylorMoments (trig table)");
  const float2* trigP = reinterpret_cast<const float2*>(trig.data());
  prof.mark("setup");

  // Attention statistics: tensor cores for 16-bit inputs with the teacher's context given, else CUDA cores
  // (which also form the context o, in fp32).
  const bool tensorCores = !std::is_same<E, float>::value && in.context.defined();
  Tensor obuf, tokD;
  auto uploadTokens = [&] {
    ls.buildTokens();
    tokD = upload(ls.tokens.data(), int64_t(ls.tokens.size()), DType::I32);
  };
  if (tensorCores) {
    momentStatsTensorCore(p, in.q, in.k, in.lse, trigP, ls.seqs, ls.maxLen, acc, stream);
    uploadTokens();  // while the GPU runs the pass
  } else {
    uploadTokens();
    ls.buildWork();
    obuf = empty({p.tokens() * H * D}, DType::F32, dev);
    statsCudaCores<E>(p, in, acc, ls.work, tokD, int(ls.tokens.size()), trigP, obuf, dev, stream);
  }
  prof.mark(tensorCores ? "statsTensorCores" : "statsCudaCores");
  const int count = int(ls.tokens.size());
  Tensor posD = upload(ls.pos.data(), count, DType::I32);
  Tensor firstD = upload(ls.first.data(), count, DType::I32);
  Tensor decayD = upload(p.decays.data(), K0, DType::F64);

  // γ₀ scan and context moments (moments_scan.cu), from the caller's context whichever pass ran, else o.
  gammaScan(p, in.v, in.context.defined() ? in.context : obuf, tokD.ptr<int>(), firstD.ptr<int>(), ls.first, decayD.ptr<double>(), acc,
            stream, [&](const char* name) { prof.mark(name); });

  // Σ k̄, Σ k̄k̄ᵀ (RoPE undone), Σ v, Σ vvᵀ per KV head (moments_outer.cu); Σ x, Σ xxᵀ through cuBLAS where it
  // loads (one Dx × Dx product), else the same per-head kernel with one head.
  const long long kvStride = p.HKV * p.D;
  moments_outer::headOuterSums({in.k.data(), in.k.dtype(), kvStride, int(p.HKV), D, half, acc.keySum.ptr<double>(), acc.keyOuter.ptr<double>()},
                               tokD.ptr<int>(), posD.ptr<int>(), count, trigP, dev, stream);
  prof.mark("keyOuter");
  moments_outer::headOuterSums({in.v.data(), in.v.dtype(), kvStride, int(p.HKV), D, 0, acc.valueSum.ptr<double>(), acc.valueOuter.ptr<double>()},
                               tokD.ptr<int>(), posD.ptr<int>(), count, trigP, dev, stream);
  prof.mark("valueOuter");
  if (in.x.defined()) {
    const moments_outer::Job xj{in.x.data(), in.x.dtype(), p.Dx, 1, int(p.Dx), 0, acc.inputSum.ptr<double>(), acc.inputOuter.ptr<double>()};
    // TCAL_MOMENTS_XOUTER=kernel forces the per-head kernel (how the GPU tests reach the no-cuBLAS path).
    const char* force = std::getenv("TCAL_MOMENTS_XOUTER");
    if (blas::available(nullptr) && !(force && std::string(force) == "kernel"))
      inputOuterBlas(xj, tokD.ptr<int>(), count, dev, stream);
    else
      moments_outer::headOuterSums(xj, tokD.ptr<int>(), posD.ptr<int>(), count, trigP, dev, stream);
    prof.mark("inputOuter");
  }
  addScalar<<<1, 1, 0, stream>>>(acc.count.ptr<double>(), double(count));
  checkLaunch("taylorMoments (count)");
}

}  // namespace

void taylorMoments(const Problem& p, const Inputs& in, const Accumulators& acc) {
  if (p.D > 256) throwInvalid("q", "the CUDA moment reduction takes head dims up to 256, got " + std::to_string(p.D));
  scanSwitch();  // a bad TCAL_MOMENTS_SCAN fails here, before any launch
  const int dev = in.q.device().index;
  cudaStream_t stream = use(dev);
  Profiler prof(stream);  // "setup" = the host's sequence list, θ upload and trig table (the GPU idles if nothing is queued)
  Lists ls(p);
  if (ls.seqs.empty()) return;
  switch (in.q.dtype()) {
    case DType::F32: runTyped<float>(p, in, acc, ls, stream, prof); break;
    case DType::BF16: runTyped<__nv_bfloat16>(p, in, acc, ls, stream, prof); break;
    case DType::F16: runTyped<__half>(p, in, acc, ls, stream, prof); break;
    default: throwInvalid("q", std::string("the CUDA moment reduction takes bf16, f16 or f32, got ") + dtypeName(in.q.dtype()));
  }
}

}  // namespace tcal::cuda
