// Σ z and Σ z zᵀ per head of the included tokens' rows, on the tensor cores: the keys (RoPE undone: k̄), the
// values and, where cuBLAS cannot be loaded, the layer input x (moments.cu calls this; DESIGN §5.1).
//
// One CTA per (block of rows, head, 128 × 128 tile of the D × D product): per stage of 32 rows it gathers the
// tile's row and column slices of z (through the token list; RoPE undone in fp32 exactly as the CPU
// reference does), splits each value into bf16 hi + lo = bf16(z − hi) in shared memory and accumulates
// hi·hiᵀ + hi·loᵀ + lo·hiᵀ with mma.sync m16n8k16 in fp32 registers (products of bf16 are exact; the dropped
// lo·loᵀ is ≤ 2^-16 relative); bf16 sources without RoPE are exact in hi and run hi·hiᵀ alone. Each block of
// at most kMaxRows rows leaves an fp32 partial; the partials are summed in f64 in block order
// (deterministic, and fp32 error bounded by the block length). The diagonal tiles also sum the columns.
// The cuBLAS batched GEMM this replaces ran 128 × 128 outputs per head with k = 8192 (few output tiles,
// long reductions): 0.5 ms for k̄k̄ᵀ at B8·T4096·HKV8·D128 against a ≈ 0.05 ms tensor-core floor.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>

#include "../core/runtime.h"
#include "check.h"
#include "device.h"
#include "mma.cuh"
#include "moments_outer.h"
#include "types.cuh"

namespace tcal::cuda::moments_outer {

namespace {

constexpr int kTile = 128;           // output tile: 128 rows × 128 columns of Σ z zᵀ (a whole head at D ≤ 128)
constexpr int kStep = 32;            // rows of z per shared-memory stage
constexpr int kLd = kTile + 8;       // bf16 per shared row: 272 bytes, so 8 ldmatrix rows hit 8 distinct 16-byte banks
constexpr int kThreads = 256;        // 8 warps; warp w owns output rows [32(w/2), +32) × columns [64(w%2), +64)
constexpr int kMaxRows = 4096;       // rows per fp32 partial
constexpr int kGroups = kTile / 8;   // 8-column groups per tile row
constexpr int kRowsPerPass = kThreads / kGroups;
constexpr int kUnits = kStep / kRowsPerPass;  // (row, 8-column group) units per thread, per slice and stage

struct Params {
  const void* src;
  long long stride;  // elements between tokens
  int heads, D, ropeHalf, tiles;
  const int* tok;
  const int* pos;
  int count, rowsPerBlock;
  bool vec;  // 8 consecutive columns load as one vector (aligned base, D and the RoPE half multiples of 8)
  const float2* trig;
  float* outerPart;  // [rowBlocks, heads, D, D]
  float* sumPart;    // [rowBlocks, heads, D]
};

template <typename T>
__device__ __forceinline__ void load8(const T* p, bool vec, int valid, float (&out)[8]) {
  if (vec) {
    if constexpr (sizeof(T) == 2) {
      const uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
      const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
      for (int i = 0; i < 8; ++i) out[i] = toF(e[i]);
    } else {
      const float4 a = __ldg(reinterpret_cast<const float4*>(p)), b = __ldg(reinterpret_cast<const float4*>(p) + 1);
      out[0] = toF(a.x), out[1] = toF(a.y), out[2] = toF(a.z), out[3] = toF(a.w);
      out[4] = toF(b.x), out[5] = toF(b.y), out[6] = toF(b.z), out[7] = toF(b.w);
    }
    return;
  }
#pragma unroll
  for (int i = 0; i < 8; ++i) out[i] = i < valid ? toF(p[i]) : 0.f;
}

// z for columns [c, c + 8) of `head` in token row `row` at position `pos` (0 past D).
template <typename T>
__device__ __forceinline__ void gatherZ(const Params& p, const T* row, int pos, int c, float (&z)[8]) {
  const int valid = min(8, p.D - c);
  if (valid <= 0) {
#pragma unroll
    for (int i = 0; i < 8; ++i) z[i] = 0.f;
    return;
  }
  if (p.ropeHalf == 0) {
    load8(row + c, p.vec, valid, z);
    return;
  }
  // RoPE undone on the pairs (j, j + half): z_j = a cos + b sin, z_{j+half} = b cos − a sin. With vec the 8
  // columns sit on one side of the half; otherwise each column finds its partner on its own.
  const int half = p.ropeHalf;
  if (p.vec) {
    const bool lower = c < half;
    const int j = lower ? c : c - half;
    float a[8], b[8];
    load8(row + j, true, 8, a);
    load8(row + j + half, true, 8, b);
    const float4* cs = reinterpret_cast<const float4*>(p.trig + (long long)pos * half + j);
#pragma unroll
    for (int i = 0; i < 8; i += 2) {
      const float4 t = __ldg(cs + i / 2);  // (cos, sin) of columns i and i + 1
      z[i] = lower ? fmaf(a[i], t.x, b[i] * t.y) : fmaf(b[i], t.x, -a[i] * t.y);
      z[i + 1] = lower ? fmaf(a[i + 1], t.z, b[i + 1] * t.w) : fmaf(b[i + 1], t.z, -a[i + 1] * t.w);
    }
    return;
  }
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int col = c + i;
    if (i >= valid) {
      z[i] = 0.f;
      continue;
    }
    const bool lower = col < half;
    const int j = lower ? col : col - half;
    const float a = toF(row[j]), b = toF(row[j + half]);
    const float2 t = __ldg(p.trig + (long long)pos * half + j);
    z[i] = lower ? fmaf(a, t.x, b * t.y) : fmaf(b, t.x, -a * t.y);
  }
}

__device__ __forceinline__ void storeSplit(__nv_bfloat16* hi, __nv_bfloat16* lo, const float (&z)[8]) {
  __align__(16) __nv_bfloat16 h[8], l[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    h[i] = __float2bfloat16_rn(z[i]);
    l[i] = __float2bfloat16_rn(z[i] - __bfloat162float(h[i]));
  }
  *reinterpret_cast<uint4*>(hi) = *reinterpret_cast<const uint4*>(h);
  if (lo) *reinterpret_cast<uint4*>(lo) = *reinterpret_cast<const uint4*>(l);
}

// Whole: D ≤ kTile, one (diagonal) tile per head — the common case, compiled without the J slices.
template <typename T, bool Split, bool Whole>
__global__ void __launch_bounds__(kThreads, 2) headOuterKernel(Params p) {
  constexpr int kJ = Whole ? 8 : kStep * kLd;
  __shared__ __align__(16) __nv_bfloat16 sIh[kStep * kLd], sJh[kJ], sIl[Split ? kStep * kLd : 8], sJl[Split ? kJ : 8];
  __shared__ float sSum[kRowsPerPass][kTile];
  const int rb = blockIdx.x, head = blockIdx.y, ti = blockIdx.z / p.tiles, tj = blockIdx.z % p.tiles;
  const bool diag = Whole || ti == tj;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, mb = warp >> 1, nb = warp & 1;
  const int g = tid % kGroups, rsub = tid / kGroups;
  const int r0 = rb * p.rowsPerBlock, r1 = min(p.count, r0 + p.rowsPerBlock);
  const T* src = static_cast<const T*>(p.src) + (long long)head * p.D;
  // The B operand comes from the I slices on diagonal tiles (no second gather).
  const __nv_bfloat16* bh = diag ? sIh : sJh;
  const __nv_bfloat16* bl = diag ? sIl : sJl;

  float acc[2][8][4] = {};
  float colSum[8] = {};
  // Token indices and positions one stage ahead, so a stage's row loads wait on one global load, not two.
  int tokNext[kUnits], posNext[kUnits];
  auto fetchIndex = [&](int s0) {
#pragma unroll
    for (int u = 0; u < kUnits; ++u) {
      const int rr = s0 + rsub + u * kRowsPerPass;
      tokNext[u] = rr < r1 ? __ldg(p.tok + rr) : -1;
      posNext[u] = rr < r1 && p.ropeHalf ? __ldg(p.pos + rr) : 0;
    }
  };
  fetchIndex(r0);
  for (int s0 = r0; s0 < r1; s0 += kStep) {
    // Gather: every unit's loads are issued before any is used.
    float zi[kUnits][8], zj[Whole ? 1 : kUnits][8];
    int tokNow[kUnits], posNow[kUnits];
#pragma unroll
    for (int u = 0; u < kUnits; ++u) tokNow[u] = tokNext[u], posNow[u] = posNext[u];
    if (s0 + kStep < r1) fetchIndex(s0 + kStep);
#pragma unroll
    for (int u = 0; u < kUnits; ++u) {
      if (tokNow[u] >= 0) {
        const int t = tokNow[u], ps = posNow[u];
        const T* row = src + (long long)t * p.stride;
        gatherZ(p, row, ps, ti * kTile + g * 8, zi[u]);
        if constexpr (!Whole)
          if (!diag) gatherZ(p, row, ps, tj * kTile + g * 8, zj[u]);
      } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) zi[u][i] = 0.f;
        if constexpr (!Whole)
#pragma unroll
          for (int i = 0; i < 8; ++i) zj[u][i] = 0.f;
      }
    }
    __syncthreads();  // the previous stage's fragments are read
#pragma unroll
    for (int u = 0; u < kUnits; ++u) {
      const int r = rsub + u * kRowsPerPass;
      storeSplit(sIh + r * kLd + g * 8, Split ? sIl + r * kLd + g * 8 : nullptr, zi[u]);
      if constexpr (!Whole)
        if (!diag) storeSplit(sJh + r * kLd + g * 8, Split ? sJl + r * kLd + g * 8 : nullptr, zj[u]);
#pragma unroll
      for (int i = 0; i < 8; ++i) colSum[i] += zi[u][i];
    }
    __syncthreads();
#pragma unroll
    for (int k0 = 0; k0 < kStep; k0 += 16) {
      const int q = lane >> 3, i8 = lane & 7;
      unsigned aH[2][4], aL[2][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        const int aOff = (k0 + i8 + (q >> 1) * 8) * kLd + mb * 32 + mt * 16 + (q & 1) * 8;
        ptx::ldsm4t(aH[mt], ptx::smemAddr(sIh + aOff));
        if constexpr (Split) ptx::ldsm4t(aL[mt], ptx::smemAddr(sIl + aOff));
      }
#pragma unroll
      for (int np = 0; np < 4; ++np) {
        unsigned bH[4], bL[4];
        const int bOff = (k0 + i8 + (q & 1) * 8) * kLd + nb * 64 + np * 16 + (q >> 1) * 8;
        ptx::ldsm4t(bH, ptx::smemAddr(bh + bOff));
        if constexpr (Split) ptx::ldsm4t(bL, ptx::smemAddr(bl + bOff));
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          ptx::Elem<__nv_bfloat16>::mma(acc[mt][2 * np], aH[mt], bH[0], bH[1]);
          ptx::Elem<__nv_bfloat16>::mma(acc[mt][2 * np + 1], aH[mt], bH[2], bH[3]);
          if constexpr (Split) {
            ptx::Elem<__nv_bfloat16>::mma(acc[mt][2 * np], aH[mt], bL[0], bL[1]);
            ptx::Elem<__nv_bfloat16>::mma(acc[mt][2 * np + 1], aH[mt], bL[2], bL[3]);
            ptx::Elem<__nv_bfloat16>::mma(acc[mt][2 * np], aL[mt], bH[0], bH[1]);
            ptx::Elem<__nv_bfloat16>::mma(acc[mt][2 * np + 1], aL[mt], bH[2], bH[3]);
          }
        }
      }
    }
  }

  const int D = p.D;
  float* out = p.outerPart + ((long long)rb * p.heads + head) * D * D;
#pragma unroll
  for (int mt = 0; mt < 2; ++mt) {
    const int iBase = ti * kTile + mb * 32 + mt * 16 + (lane >> 2), jBase = tj * kTile + nb * 64 + 2 * (lane & 3);
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int i = iBase + 8 * h;
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int j = jBase + nt * 8 + e;
          if (i < D && j < D) out[(long long)i * D + j] = acc[mt][nt][2 * h + e];
        }
      }
    }
  }
  if (diag) {
    // Column sums of the tile's columns: per thread over its rows, then the row groups in a fixed order.
#pragma unroll
    for (int i = 0; i < 8; ++i) sSum[rsub][g * 8 + i] = colSum[i];
    __syncthreads();
    if (tid < kTile) {
      float s = 0.f;
      for (int r = 0; r < kRowsPerPass; ++r) s += sSum[r][tid];
      const int c = ti * kTile + tid;
      if (c < D) p.sumPart[((long long)rb * p.heads + head) * D + c] = s;
    }
  }
}

// dst[e] += Σ_b part[b, e] in f64, blocks in order.
__global__ void addPartials(const float* __restrict__ part, int blocks, long long n, double* __restrict__ dst) {
  for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < n; e += (long long)gridDim.x * blockDim.x) {
    double s = 0;
#pragma unroll 8
    for (int b = 0; b < blocks; ++b) s += double(part[(long long)b * n + e]);
    dst[e] += s;
  }
}

template <typename T>
void launch(const Params& prm, int rowBlocks, bool split, cudaStream_t stream) {
  const dim3 grid(unsigned(rowBlocks), unsigned(prm.heads), unsigned(prm.tiles * prm.tiles));
  const bool whole = prm.tiles == 1;
  if (split && whole)
    headOuterKernel<T, true, true><<<grid, kThreads, 0, stream>>>(prm);
  else if (split)
    headOuterKernel<T, true, false><<<grid, kThreads, 0, stream>>>(prm);
  else if (whole)
    headOuterKernel<T, false, true><<<grid, kThreads, 0, stream>>>(prm);
  else
    headOuterKernel<T, false, false><<<grid, kThreads, 0, stream>>>(prm);
  checkLaunch("taylorMoments (head outer products)");
}

}  // namespace

void headOuterSums(const Job& j, const int* tok, const int* pos, int count, const float2* trig, Device dev, cudaStream_t stream) {
  if (count <= 0) return;
  Params prm{};
  prm.src = j.src;
  prm.stride = j.stride;
  prm.heads = j.heads;
  prm.D = j.D;
  prm.ropeHalf = j.ropeHalf;
  prm.tiles = (j.D + kTile - 1) / kTile;
  prm.tok = tok;
  prm.pos = pos;
  prm.count = count;
  prm.trig = trig;
  const int esz = int(dtypeSize(j.dtype));
  prm.vec = j.D % 8 == 0 && j.stride % 8 == 0 && (j.ropeHalf == 0 || j.ropeHalf % 8 == 0) &&
            reinterpret_cast<uintptr_t>(j.src) % 16 == 0 && (esz == 2 || esz == 4);
  // Enough CTAs for ≈ 4 per SM (two resident), rows per partial ≤ kMaxRows, and the fp32 partials within ≈ 64 MB.
  const long long perBlock = (long long)j.heads * prm.tiles * prm.tiles;
  const long long outerElems = (long long)j.heads * j.D * j.D;
  const int stages = (count + kStep - 1) / kStep;
  long long want = std::max<long long>((4LL * multiprocessorCount(dev.index) + perBlock - 1) / perBlock, (count + kMaxRows - 1) / kMaxRows);
  want = std::min<long long>(want, std::max<long long>(1, (64LL << 20) / (4 * outerElems)));
  want = std::max<long long>(1, std::min<long long>(want, stages));
  prm.rowsPerBlock = int(((stages + want - 1) / want) * kStep);
  const int rowBlocks = (count + prm.rowsPerBlock - 1) / prm.rowsPerBlock;
  Tensor outerPart = empty({int64_t(rowBlocks) * outerElems}, DType::F32, dev);
  Tensor sumPart = empty({int64_t(rowBlocks) * j.heads * j.D}, DType::F32, dev);
  prm.outerPart = outerPart.ptr<float>();
  prm.sumPart = sumPart.ptr<float>();
  const bool split = j.ropeHalf > 0 || j.dtype != DType::BF16;
  switch (j.dtype) {
    case DType::BF16: launch<__nv_bfloat16>(prm, rowBlocks, split, stream); break;
    case DType::F16: launch<__half>(prm, rowBlocks, split, stream); break;
    case DType::F32: launch<float>(prm, rowBlocks, split, stream); break;
    default: throwInvalid("k", std::string("the moment outer products take bf16, f16 or f32, got ") + dtypeName(j.dtype));
  }
  addPartialSums(prm.outerPart, rowBlocks, outerElems, j.outer, stream);
  addPartialSums(prm.sumPart, rowBlocks, (long long)j.heads * j.D, j.sum, stream);
}

void addPartialSums(const float* part, int blocks, long long n, double* dst, cudaStream_t stream) {
  addPartials<<<gridFor(n, 256), 256, 0, stream>>>(part, blocks, n, dst);
  checkLaunch("taylorMoments (partial sums)");
}

}  // namespace tcal::cuda::moments_outer
