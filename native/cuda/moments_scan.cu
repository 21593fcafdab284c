// The γ₀ decay-grid scan and the context moments of the Taylor moment reduction (DESIGN.md §5.1; semantics:
// native/cpu/moments.h). Over the included tokens in order (entry i → token tok[i], first[i] = 1 at a sequence
// start), per KV head, decay γ_k and channel c: y_i = (first_i ? 0 : γ_k) y_{i−1} + v_i, ŷ_i = y_i·rsqrt(mean_c
// y_i² + ε); per query head of the KV head Σ ŷ∘o, and Σ ŷ² (the same for each of them); per head Σ o, Σ o².
// y depends only on (KV head, decay): it is formed once per KV head, and only the RMS crosses channels.
//
// The list is cut into chunks of L entries (an exact entering state per chunk) and the chunks into spans
// (one CTA each, its chunks in order):
//   1. scanStates: per (span, KV head) CTA, each chunk's own end state from y = 0 (fp32, ≤ L steps); for 16-bit v
//      scanStatesTC instead: per (chunk, KV head) the product W·V on the tensor cores (W = γ^(L−1−s), 3-term split);
//   2. scanCarry: per (KV head, decay, channel) the state entering each chunk, in chunk order in f64:
//      Y(c+1) = a_c Y(c) + e_c, a_c = 0 when chunk c holds a sequence start, else γ^len(c);
//   3. scanApply: per (span, KV head, ≤ 4 query heads) CTA of ≤ 12 warps; a warp owns KB decays × all channels
//      (lane: CB consecutive channels), so y needs no exchange. Stages of TS entries: rows of v and o gathered
//      with cp.async (the next stage during this one's compute), converted once to fp32 in shared memory for
//      all warps. Per batch of 8 steps: sweep 1 runs y and stores each lane's partial Σ y² per (step, decay);
//      one lane per (step, decay) sums the 32 partials in lane order into rs = rsqrt(mean + ε) — no dependent
//      shuffle chain per step; sweep 2 reruns y from the batch start (the same instructions, the same bits) and
//      accumulates Σ ŷ², Σ ŷ∘o in fp32 registers over the span. y restarts from the carried state at every
//      chunk start, so fp32 γ (error ≤ 2^-25) drifts at most L·2^-25 relative. The CTAs of the first decay
//      group also sum o and o² per column of the staged rows (Σ o, Σ o²: no second read of the context).
//   3'. or, the default for 16-bit v and context of one type, D 64 or 128, K0 ≤ 64 (TCAL_MOMENTS_SCAN=norm; =tc
//      takes any D % 16 == 0 with the kRms pass): scanRmsNorm writes rs per (entry, KV head, decay) from the norm
//      recurrence on the tensor cores (or scanApply's sweep 1 alone, kRms), then scanApplyTC forms Σ ŷ∘o on the
//      tensor cores with time segments (chunks) as the MMA's K dimension — see its comment. Session 7, run 2 (bench
//      shape): 0.188 + 0.730 ms against 3.'s 1.039; TCAL_MOMENTS_SCAN=v4 forces 3.;
//   4. scanSums / contextSums: f64 sums of the span partials, in span order, into the accumulators.
// Every order is fixed by the list and the device's SM count, so repeats give the same bits.
#include "moments_scan.h"

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
#include "check.h"
#include "device.h"
#include "mma.cuh"
#include "types.cuh"

namespace tcal::cuda {

namespace {

using namespace moments;
using ptx::cpAsync16;
using ptx::cpCommit;
using ptx::cpWait;
using ptx::smemAddr;

constexpr int kHeads = 4;      // query heads per apply CTA (a larger GQA group takes several CTAs)
constexpr int kMaxWarps = 12;  // decay blocks per CTA
constexpr int kThreads = kMaxWarps * 32;
constexpr int kBatch = 8;      // steps per RMS batch
constexpr int kPartRow = 36;   // floats per partial row: 32 lanes + 4 (16-byte reads by row are conflict-free)

// Decays per warp: the registers per lane are KB·CB·(y, its batch start, Σŷ², 4 cross sums) = 16·7.
template <int CB>
__host__ __device__ constexpr int decaysPerWarp() {
  return CB >= 8 ? 2 : 4;
}

enum : int { kF32 = 0, kBF16 = 1, kF16 = 2, kF64 = 3 };

struct ScanParams {
  const char* v;
  const char* o;
  int vType, oType, vSize, oSize;  // element codes and bytes
  long long vStride, oStride;      // elements between tokens
  const int* tok;
  const int* first;
  const double* decays;
  int count, L, chunks;
  int spanChunks, spans;  // chunks per CTA span
  int H, HKV, D, Dp, K0, G, gBlocks, kGroups, warps;
  int TS, copy16, sections;        // entries per stage; 16-byte copies; staged rows per entry (v, o heads)
  int vBytes, oRowBytes;           // bytes of a v row and of an o row
  int vPitch, oPitch, rowBytes;     // raw stage row: v at 0, o row g at vPitch + g·oPitch (16-byte aligned)
  float* state;      // [chunks][HKV][K0][D] chunk end states from 0 → scanCarry
  float* enter;      // [chunks][HKV][K0][D] entering states
  float* crossPart;  // [spans][H][K0][D]
  float* sqPart;     // [spans][HKV][K0][D]
  float* ctxPart;    // [spans][H][D][2]
  float* rs;         // [count][HKV][RP] rsqrt(mean y² + ε) in the tensor-core apply's order (kRms pass only)
  int RP, MT;        // rs row length = 16·MT (decay m-tiles)
};

// Shared-memory carve-up (bytes), the same on host and device.
struct Layout {
  int tok, flags, mask, raw, f32, part, rs, ctx, total;
};
__host__ __device__ inline int take(int& at, int bytes) {
  const int here = at;
  at += (bytes + 15) / 16 * 16;
  return here;
}
__host__ __device__ inline Layout layoutOf(int TS, int rowBytes, int sections, int Dp, int warps, int KB, int ctxCols) {
  Layout l{};
  int at = 0;
  l.tok = take(at, 2 * TS * 4);
  l.flags = take(at, TS * 4);
  l.mask = take(at, 4);
  l.raw = take(at, TS * rowBytes);
  l.f32 = take(at, TS * sections * Dp * 4);
  l.part = take(at, warps * kBatch * KB * kPartRow * 4);
  l.rs = take(at, warps * kBatch * KB * 4);
  l.ctx = take(at, ctxCols * 2 * 4);
  l.total = at;
  return l;
}

__device__ __forceinline__ void cpAsync4(unsigned dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(dst), "l"(src));
}

// Issues the copies of one stage (entries [i, i + n), token ids already in tokS) and of the next stage's token
// ids (entries [iNext, iNext + nNext) → tokNext), as one cp.async group. A thread keeps one copy unit of an entry
// row (v, or o of head g) and walks the entries: per copy a token load, one 64-bit multiply-add and the copy.
__device__ void issueStage(const ScanParams& p, unsigned char* raw, const int* tokS, int* flags, int* tokNext, int i, int n,
                           int iNext, int nNext, int hk, int h0, int nh) {
  const int cb = p.copy16 ? 16 : 4;
  const int unitsV = p.vBytes / cb, unitsO = p.oRowBytes / cb, units = unitsV + nh * unitsO;  // per entry
  const int dJ = max(1, int(blockDim.x) / units), j0 = threadIdx.x / units;
  if (j0 < dJ) {
    const int uStep = int(blockDim.x) >= units ? units : int(blockDim.x);
    for (int r = threadIdx.x - j0 * units; r < units; r += uStep) {
      const char* base;
      long long stride;
      int at;
      if (r < unitsV) {
        at = r * cb;
        base = p.v + (long long)hk * p.D * p.vSize + at;
        stride = p.vStride * p.vSize;
      } else {
        const int g = (r - unitsV) / unitsO, ro = r - unitsV - g * unitsO;
        at = p.vPitch + g * p.oPitch + ro * cb;
        base = p.o + (long long)(h0 + g) * p.D * p.oSize + ro * cb;
        stride = p.oStride * p.oSize;
      }
      const unsigned dst0 = smemAddr(raw + at);
      if (cb == 16)
        for (int j = j0; j < n; j += dJ) cpAsync16(dst0 + j * p.rowBytes, base + tokS[j] * stride, true);
      else
        for (int j = j0; j < n; j += dJ) cpAsync4(dst0 + j * p.rowBytes, base + tokS[j] * stride);
    }
  }
  for (int j = threadIdx.x; j < n; j += blockDim.x) cpAsync4(smemAddr(flags + j), p.first + i + j);
  for (int j = threadIdx.x; j < nNext; j += blockDim.x) cpAsync4(smemAddr(tokNext + j), p.tok + iNext + j);
  cpCommit();
}

template <int W>
__device__ __forceinline__ void loadW(const unsigned char* src, int type, float (&x)[W]) {
  if (type == kF32) {
    const float* s = reinterpret_cast<const float*>(src);
    if constexpr (W == 4) {
      const float4 a = *reinterpret_cast<const float4*>(s);
      x[0] = a.x, x[1] = a.y, x[2] = a.z, x[3] = a.w;
    } else {
      const float2 a = *reinterpret_cast<const float2*>(s);
      x[0] = a.x, x[1] = a.y;
    }
  } else if (type == kBF16) {
    const __nv_bfloat162* s = reinterpret_cast<const __nv_bfloat162*>(src);
#pragma unroll
    for (int q = 0; q < W / 2; ++q) {
      const float2 a = __bfloat1622float2(s[q]);
      x[2 * q] = a.x, x[2 * q + 1] = a.y;
    }
  } else if (type == kF16) {
    const __half2* s = reinterpret_cast<const __half2*>(src);
#pragma unroll
    for (int q = 0; q < W / 2; ++q) {
      const float2 a = __half22float2(s[q]);
      x[2 * q] = a.x, x[2 * q + 1] = a.y;
    }
  } else {
    const double2* s = reinterpret_cast<const double2*>(src);
#pragma unroll
    for (int q = 0; q < W / 2; ++q) {
      const double2 a = s[q];
      x[2 * q] = float(a.x), x[2 * q + 1] = float(a.y);
    }
  }
}

// raw rows → F[t][section][Dp] fp32 (zeros past the stage's entries, past D, and for absent heads); W channels
// per unit (D % W == 0). A thread keeps one (section, W channels) column unit and walks the entries (slot, slot
// + dT, …), so with ctx it also sums o and o² of its columns over the stage and adds them to its slot's row of
// ctx [slots][nh·D][2] (fixed slots, summed in order at the end: deterministic). Warp 0 also packs the stage's
// sequence starts into one bit mask.
template <int W>
__device__ void convertStage(const ScanParams& p, const unsigned char* raw, const int* flags, float* F, unsigned* mask, int n,
                             int nh, float* ctx) {
  const int per = p.Dp / W, perShift = __ffs(per) - 1, perTok = p.sections * per;  // per: a power of two
  const int dT = max(1, int(blockDim.x) / perTok), slot = threadIdx.x / perTok;
  if (slot < dT) {
    const int uStep = int(blockDim.x) >= perTok ? perTok : int(blockDim.x);
    for (int u = threadIdx.x - slot * perTok; u < perTok; u += uStep) {
      const int sct = u >> perShift, c = (u & (per - 1)) * W;
      const bool live = c < p.D && sct <= nh;
      const unsigned char* src = raw + (sct == 0 ? c * p.vSize : p.vPitch + (sct - 1) * p.oPitch + c * p.oSize);
      const int type = sct == 0 ? p.vType : p.oType;
      float* dst = F + (long long)sct * p.Dp + c;
      float sum[W], sq[W];
#pragma unroll
      for (int q = 0; q < W; ++q) sum[q] = sq[q] = 0.f;
      const int tEnd = live ? n : 0;  // entries past it (and dead columns) are stored as zeros
      auto walk = [&](auto typeTag) {
        constexpr int kType = decltype(typeTag)::value;
        int t = slot;
        for (; t < tEnd; t += dT) {
          float x[W];
          loadW<W>(src + t * p.rowBytes, kType, x);
          float* d = dst + (long long)t * p.sections * p.Dp;
          if constexpr (W == 4) *reinterpret_cast<float4*>(d) = make_float4(x[0], x[1], x[2], x[3]);
          else *reinterpret_cast<float2*>(d) = make_float2(x[0], x[1]);
#pragma unroll
          for (int q = 0; q < W; ++q) sum[q] += x[q], sq[q] = fmaf(x[q], x[q], sq[q]);
        }
        for (; t < p.TS; t += dT) {
          float* d = dst + (long long)t * p.sections * p.Dp;
          if constexpr (W == 4) *reinterpret_cast<float4*>(d) = make_float4(0.f, 0.f, 0.f, 0.f);
          else *reinterpret_cast<float2*>(d) = make_float2(0.f, 0.f);
        }
      };
      switch (type) {
        case kBF16: walk(std::integral_constant<int, kBF16>{}); break;
        case kF16: walk(std::integral_constant<int, kF16>{}); break;
        case kF32: walk(std::integral_constant<int, kF32>{}); break;
        default: walk(std::integral_constant<int, kF64>{}); break;
      }
      if (ctx && sct > 0 && live) {
        float* row = ctx + ((long long)slot * nh * p.D + (sct - 1) * p.D + c) * 2;
#pragma unroll
        for (int q = 0; q < W; ++q) row[2 * q] += sum[q], row[2 * q + 1] += sq[q];
      }
    }
  }
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    const unsigned m = __ballot_sync(0xffffffffu, lane < n && flags[lane] != 0);
    if (lane == 0) *mask = m;
  }
}

// Column slots of convertStage for a block of `threads` (rows of the context partial sums).
__host__ __device__ inline int ctxSlots(int threads, int sections, int Dp, int D) {
  const int W = D % 4 == 0 ? 4 : 2;
  return threads / (sections * (Dp / W)) > 1 ? threads / (sections * (Dp / W)) : 1;
}

__device__ __forceinline__ void convert(const ScanParams& p, const unsigned char* raw, const int* flags, float* F, unsigned* mask, int n,
                                        int nh, float* ctx) {
  if (p.D % 4 == 0) convertStage<4>(p, raw, flags, F, mask, n, nh, ctx);
  else convertStage<2>(p, raw, flags, F, mask, n, nh, ctx);
}

template <int CB>
__device__ __forceinline__ void loadF(const float* s, float (&x)[CB]) {
  if constexpr (CB % 4 == 0) {
#pragma unroll
    for (int q = 0; q < CB / 4; ++q) {
      const float4 a = reinterpret_cast<const float4*>(s)[q];
      x[4 * q] = a.x, x[4 * q + 1] = a.y, x[4 * q + 2] = a.z, x[4 * q + 3] = a.w;
    }
  } else if constexpr (CB == 2) {
    const float2 a = *reinterpret_cast<const float2*>(s);
    x[0] = a.x, x[1] = a.y;
  } else {
    x[0] = s[0];
  }
}

// The CTA's place: blockIdx.x the span, blockIdx.y (KV head, head block, decay group).
struct Place {
  int span, hk, gb, kg, h0, nh, i0, i1;
};
__device__ __forceinline__ Place placeOf(const ScanParams& p, int gBlocks) {
  Place c;
  c.span = blockIdx.x;
  int rem = blockIdx.y;
  c.kg = rem % p.kGroups;
  rem /= p.kGroups;
  c.gb = rem % gBlocks;
  c.hk = rem / gBlocks;
  c.h0 = c.hk * p.G + c.gb * kHeads;
  c.nh = min(kHeads, p.G - c.gb * kHeads);
  const int c0 = c.span * p.spanChunks, c1 = min(p.chunks, c0 + p.spanChunks);
  c.i0 = c0 * p.L;
  c.i1 = min(p.count, c1 * p.L);
  return c;
}

// y ← m·y + v with m = γ, or 0 at a sequence start (y finite, so 0·y + v = v exactly). Stages and batches
// without a start take the Starts = false copy: no per-step test, and loads can run ahead of the FMAs.
template <int KB, bool Starts>
__device__ __forceinline__ void multipliers(const float (&gam)[KB], unsigned bits, int j, float (&m)[KB]) {
  const bool start = Starts && ((bits >> j) & 1u);
#pragma unroll
  for (int b = 0; b < KB; ++b) m[b] = start ? 0.f : gam[b];
}

template <int CB, int KB, bool Starts>
__device__ __forceinline__ void stateSteps(const float* F, int rowF, int n, unsigned mask, const float (&gam)[KB], float (&y)[KB][CB]) {
#pragma unroll 8
  for (int t = 0; t < n; ++t) {
    float m[KB], vv[CB];
    multipliers<KB, Starts>(gam, mask, t, m);
    loadF<CB>(F + t * rowF, vv);
#pragma unroll
    for (int b = 0; b < KB; ++b)
#pragma unroll
      for (int u = 0; u < CB; ++u) y[b][u] = fmaf(m[b], y[b][u], vv[u]);
  }
}

// Sweep 1 of a batch: y and the lane's partial Σ y² per (step, decay) into part[(step·KB + decay)·kPartRow + lane].
template <int CB, int KB, bool Starts>
__device__ __forceinline__ void sweepPartials(const float* F, int rowF, unsigned bits, const float (&gam)[KB], float (&y)[KB][CB],
                                              float* part) {
  float vn[CB];  // the next step's v, loaded a step ahead (shared-memory latency was sweep 1's main stall)
  loadF<CB>(F, vn);
#pragma unroll 2
  for (int j = 0; j < kBatch; ++j) {
    float m[KB], vv[CB];
    multipliers<KB, Starts>(gam, bits, j, m);
#pragma unroll
    for (int u = 0; u < CB; ++u) vv[u] = vn[u];
    if (j + 1 < kBatch) loadF<CB>(F + (j + 1) * rowF, vn);
#pragma unroll
    for (int b = 0; b < KB; ++b) {
      float pp = 0.f;
#pragma unroll
      for (int u = 0; u < CB; ++u) {
        y[b][u] = fmaf(m[b], y[b][u], vv[u]);
        pp = fmaf(y[b][u], y[b][u], pp);
      }
      part[(j * KB + b) * kPartRow] = pp;
    }
  }
}

// Sweep 2 of a batch: y again (the same instructions as sweep 1), ŷ = y·rs, Σ ŷ², Σ ŷ∘o for the 4 heads. The
// next step's o rows are loaded before this step's ~125 FP32 instructions (3 warps per scheduler do not hide
// shared-memory latency alone; prefetching v and rs too would spill).
template <int CB, int KB, bool Starts>
__device__ __forceinline__ void stepSums(const float* row, const float* rsj, const float (&ov)[kHeads][CB], const float (&gam)[KB],
                                         unsigned bits, int j, float (&y)[KB][CB], float (&sq)[KB][CB], float (&cr)[KB][kHeads][CB]) {
  float m[KB], vv[CB], rs[KB];
  multipliers<KB, Starts>(gam, bits, j, m);
  loadF<CB>(row, vv);
  if constexpr (KB == 4) {
    const float4 r4 = *reinterpret_cast<const float4*>(rsj);
    rs[0] = r4.x, rs[1] = r4.y, rs[2] = r4.z, rs[3] = r4.w;
  } else {
#pragma unroll
    for (int b = 0; b < KB; ++b) rs[b] = rsj[b];
  }
#pragma unroll
  for (int b = 0; b < KB; ++b)
#pragma unroll
    for (int u = 0; u < CB; ++u) {
      y[b][u] = fmaf(m[b], y[b][u], vv[u]);
      const float z = y[b][u] * rs[b];
      sq[b][u] = fmaf(z, z, sq[b][u]);
#pragma unroll
      for (int g = 0; g < kHeads; ++g) cr[b][g][u] = fmaf(z, ov[g][u], cr[b][g][u]);
    }
}
template <int CB>
__device__ __forceinline__ void loadHeads(const float* row, int Dp, float (&ov)[kHeads][CB]) {
#pragma unroll
  for (int g = 0; g < kHeads; ++g) loadF<CB>(row + (1 + g) * Dp, ov[g]);
}
template <int CB, int KB, bool Starts>
__device__ __forceinline__ void sweepSums(const float* F, int rowF, int Dp, unsigned bits, const float (&gam)[KB], const float* rsb,
                                          float (&y)[KB][CB], float (&sq)[KB][CB], float (&cr)[KB][kHeads][CB]) {
  if constexpr (CB >= 8) {  // 32 registers per copy of the o operands: no room for a second
#pragma unroll 1
    for (int j = 0; j < kBatch; ++j) {
      float ov[kHeads][CB];
      loadHeads<CB>(F + j * rowF, Dp, ov);
      stepSums<CB, KB, Starts>(F + j * rowF, rsb + j * KB, ov, gam, bits, j, y, sq, cr);
    }
    return;
  }
  float oa[kHeads][CB], ob[kHeads][CB];
  loadHeads<CB>(F, Dp, oa);
#pragma unroll 1
  for (int j = 0; j < kBatch; j += 2) {
    const float* row = F + j * rowF;
    loadHeads<CB>(row + rowF, Dp, ob);
    stepSums<CB, KB, Starts>(row, rsb + j * KB, oa, gam, bits, j, y, sq, cr);
    if (j + 2 < kBatch) loadHeads<CB>(row + 2 * rowF, Dp, oa);
    stepSums<CB, KB, Starts>(row + rowF, rsb + (j + 1) * KB, ob, gam, bits, j + 1, y, sq, cr);
  }
}

// Per (span, KV head, decay group): each chunk's end state from y = 0, fp32 (the carry is f64).
template <int CB>
__global__ void __launch_bounds__(kThreads) scanStates(ScanParams p) {
  constexpr int KB = decaysPerWarp<CB>();
  extern __shared__ __align__(16) unsigned char smem[];
  const Layout ly = layoutOf(p.TS, p.rowBytes, 1, p.Dp, 0, KB, 0);  // no RMS partials
  int* tokS = reinterpret_cast<int*>(smem + ly.tok);
  int* flags = reinterpret_cast<int*>(smem + ly.flags);
  unsigned* maskS = reinterpret_cast<unsigned*>(smem + ly.mask);
  unsigned char* raw = smem + ly.raw;
  float* F = reinterpret_cast<float*>(smem + ly.f32);
  const Place at = placeOf(p, 1);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int k0 = (at.kg * p.warps + warp) * KB;
  float gam[KB], y[KB][CB];
#pragma unroll
  for (int b = 0; b < KB; ++b) {
    gam[b] = k0 + b < p.K0 ? float(p.decays[k0 + b]) : 0.f;
#pragma unroll
    for (int u = 0; u < CB; ++u) y[b][u] = 0.f;
  }
  const int TS = p.TS, stages = (at.i1 - at.i0 + TS - 1) / TS;
  for (int j = threadIdx.x; j < min(TS, at.i1 - at.i0); j += blockDim.x) tokS[j] = p.tok[at.i0 + j];
  __syncthreads();
  {
    const int n1 = min(TS, max(0, at.i1 - at.i0 - TS));
    issueStage(p, raw, tokS, flags, tokS + TS, at.i0, min(TS, at.i1 - at.i0), at.i0 + TS, n1, at.hk, 0, 0);
  }
  for (int s = 0; s < stages; ++s) {
    const int is = at.i0 + s * TS, n = min(TS, at.i1 - is);
    cpWait<0>();
    __syncthreads();
    convert(p, raw, flags, F, maskS, n, 0, nullptr);
    __syncthreads();
    if (s + 1 < stages) {
      const int in = is + TS, nn = min(TS, at.i1 - in), n2 = min(TS, max(0, at.i1 - in - TS));
      issueStage(p, raw, tokS + ((s + 1) & 1) * TS, flags, tokS + (s & 1) * TS, in, nn, in + TS, n2, at.hk, 0, 0);
    }
    if (is % p.L == 0) {
#pragma unroll
      for (int b = 0; b < KB; ++b)
#pragma unroll
        for (int u = 0; u < CB; ++u) y[b][u] = 0.f;
    }
    const unsigned mask = *maskS;
    if (mask) stateSteps<CB, KB, true>(F + lane * CB, p.Dp, n, mask, gam, y);
    else stateSteps<CB, KB, false>(F + lane * CB, p.Dp, n, 0u, gam, y);
    if ((is + n) % p.L == 0 || is + n == p.count) {  // the chunk's last stage (TS divides L)
      const int c = is / p.L;
#pragma unroll
      for (int b = 0; b < KB; ++b) {
        if (k0 + b >= p.K0) continue;
#pragma unroll
        for (int u = 0; u < CB; ++u) {
          const int ch = lane * CB + u;
          if (ch < p.D) p.state[(((long long)c * p.HKV + at.hk) * p.K0 + k0 + b) * p.D + ch] = y[b][u];
        }
      }
    }
  }
}

// The same end states on the tensor cores for 16-bit v (bf16 / f16, D % 16 == 0, K0 ≤ 64): per (chunk, KV head)
// CTA, E[k][c] = Σ_s W[k][s] v[s][c] with W[k][s] = γ_k^(L−1−s) on m16n8k16. The chunk's rows are staged
// right-aligned in L rows (entry r at row r + L − len; rows before the chunk's last sequence start and before
// its first entry are zero), so every chunk shares one W: its A fragments are made once per call (scanWeights,
// f64 pow) and split in three 16-bit terms (v is exact in the 16-bit type), which keeps the product at fp32
// accuracy — as the fp32 recurrence it replaces (bit-for-bit equal results are not expected).
constexpr int kTcMaxMTiles = 4;  // K0 ≤ 64
constexpr int kTcPairs = 8;      // 16-channel pairs of n-tiles per accumulator group (64 registers)
constexpr int kTcGroups = 4;     // cp.async commit groups per chunk (L / 16 k-steps divide by it: L ∈ {64, 256})

// A fragments of W for m-tile m, k-step ks and lane: three terms × 4 registers, at table[((m·KS + ks)·32 + lane)·3 + term].
template <typename E>
__global__ void scanWeights(const double* __restrict__ decays, int K0, int L, int mTiles, uint4* __restrict__ table) {
  using ptx::Elem;
  const int KS = L / 16, n = mTiles * KS * 32;
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const int lane = i & 31, ks = (i >> 5) % KS, m = (i >> 5) / KS, g = lane >> 2, t4 = lane & 3;
  unsigned reg[3][4];
#pragma unroll
  for (int r = 0; r < 4; ++r) {  // register r: row g + 8·(r & 1), columns 2t4 + {0, 1} + 8·(r >> 1)
    const int k = m * 16 + g + 8 * (r & 1);
    float w[2], t[3][2];
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int col = ks * 16 + 2 * t4 + e + 8 * (r >> 1);
      w[e] = k < K0 ? float(pow(decays[k], double(L - 1 - col))) : 0.f;
      float rest = w[e];
#pragma unroll
      for (int q = 0; q < 3; ++q) {  // w = t0 + t1 + t2 (each residual exact in fp32)
        const unsigned one = Elem<E>::pack(rest, 0.f);
        t[q][e] = float(*reinterpret_cast<const E*>(&one));
        rest -= t[q][e];
      }
    }
#pragma unroll
    for (int q = 0; q < 3; ++q) reg[q][r] = Elem<E>::pack(t[q][0], t[q][1]);
  }
#pragma unroll
  for (int q = 0; q < 3; ++q) table[(long long)i * 3 + q] = make_uint4(reg[q][0], reg[q][1], reg[q][2], reg[q][3]);
}

template <typename E>
__global__ void __launch_bounds__(32 * kTcMaxMTiles) scanStatesTC(ScanParams p, const uint4* __restrict__ table, int pitch) {
  using ptx::Elem;
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ int lastStart;
  const int chunk = blockIdx.x, hk = blockIdx.y;
  const int i0 = chunk * p.L, len = min(p.L, p.count - i0), shift = p.L - len;
  if (threadIdx.x == 0) lastStart = 0;
  __syncthreads();
  for (int i = threadIdx.x; i < len; i += blockDim.x)
    if (p.first[i0 + i]) atomicMax(&lastStart, i);
  __syncthreads();
  const int s0 = lastStart;
  // Token ids first (one coalesced pass; a dependent global load per copy was this kernel's main stall), then
  // the rows in kTcGroups commit groups of L / kTcGroups rows, so the products start on the first group.
  int* tokS = reinterpret_cast<int*>(smem + p.L * pitch);
  for (int r = threadIdx.x; r < len; r += blockDim.x) tokS[r] = p.tok[i0 + r];
  __syncthreads();
  const int units = p.D * 2 / 16, rowsPer = p.L / kTcGroups;
#pragma unroll
  for (int grp = 0; grp < kTcGroups; ++grp) {
    for (int u = threadIdx.x; u < rowsPer * units; u += blockDim.x) {
      const int row = grp * rowsPer + u / units, q = u % units, r = row - shift;
      const bool valid = r >= s0;  // (r < len always)
      const long long t = valid ? tokS[r] : 0;
      ptx::cpAsync16(smemAddr(smem + row * pitch + q * 16), p.v + (t * p.vStride + (long long)hk * p.D) * 2 + (valid ? q * 16 : 0), valid);
    }
    cpCommit();
  }
  const int m = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
  const int KS = p.L / 16, pairs = p.D / 16;
  const uint4* tab = table + (long long)m * KS * 32 * 3 + lane * 3;
  // ldmatrix.x4.trans: lanes 0–15 address rows 0–15 of the k-step at the pair's channel 0, lanes 16–31 at channel 8.
  const unsigned bBase = smemAddr(smem + (lane & 15) * pitch + (lane >> 4) * 16);
  for (int pg = 0; pg < pairs; pg += kTcPairs) {
    float acc[kTcPairs][2][4];
#pragma unroll
    for (int q = 0; q < kTcPairs; ++q)
#pragma unroll
      for (int n = 0; n < 2; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[q][n][e] = 0.f;
#pragma unroll 2
    for (int ks = 0; ks < KS; ++ks) {
      if (pg == 0 && ks % (KS / kTcGroups) == 0) {  // the next group of rows has landed
        const int grp = ks / (KS / kTcGroups);
        if (grp == 0) cpWait<kTcGroups - 1>();
        else if (grp == 1) cpWait<kTcGroups - 2>();
        else if (grp == 2) cpWait<kTcGroups - 3>();
        else cpWait<0>();
        __syncthreads();
      }
      unsigned a[3][4];
#pragma unroll
      for (int q = 0; q < 3; ++q) {
        const uint4 x = __ldg(tab + ks * 32 * 3 + q);
        a[q][0] = x.x, a[q][1] = x.y, a[q][2] = x.z, a[q][3] = x.w;
      }
#pragma unroll
      for (int q = 0; q < kTcPairs; ++q) {
        if (pg + q >= pairs) break;
        unsigned b[4];
        ptx::ldsm4t(b, bBase + ks * 16 * pitch + (pg + q) * 32);
#pragma unroll
        for (int n = 0; n < 2; ++n)
#pragma unroll
          for (int t = 2; t >= 0; --t) Elem<E>::mma(acc[q][n], a[t], b[2 * n], b[2 * n + 1]);  // small terms first
      }
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int k = m * 16 + g + 8 * h;
      if (k >= p.K0) continue;
      float* dst = p.state + (((long long)chunk * p.HKV + hk) * p.K0 + k) * p.D;
#pragma unroll
      for (int q = 0; q < kTcPairs; ++q) {
        if (pg + q >= pairs) break;
#pragma unroll
        for (int n = 0; n < 2; ++n)
          *reinterpret_cast<float2*>(dst + (pg + q) * 16 + n * 8 + 2 * t4) = make_float2(acc[q][n][2 * h], acc[q][n][2 * h + 1]);
      }
    }
  }
}

// Per (KV head, decay, channel): the state entering each chunk, in chunk order, in f64 (loads batched ahead).
__global__ void scanCarry(const float* __restrict__ state, float* __restrict__ enter, const int* __restrict__ chunkReset,
                          const double* __restrict__ decays, int count, int L, int chunks, int HKV, int K0, int D) {
  const long long n = (long long)HKV * K0 * D;
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const double g = decays[int((i / D) % K0)];
  const double gL = pow(g, double(L)), gLast = pow(g, double(count - (chunks - 1) * L));
  double Y = 0;
  constexpr int kAhead = 8;
  for (int c0 = 0; c0 < chunks; c0 += kAhead) {
    float e[kAhead];
    int r[kAhead];
#pragma unroll
    for (int q = 0; q < kAhead; ++q) {
      const int c = c0 + q;
      e[q] = c < chunks ? state[(long long)c * n + i] : 0.f;
      r[q] = c < chunks ? chunkReset[c] : 0;
    }
#pragma unroll
    for (int q = 0; q < kAhead; ++q) {
      const int c = c0 + q;
      if (c >= chunks) break;
      enter[(long long)c * n + i] = float(Y);
      const double a = r[q] ? 0.0 : c == chunks - 1 ? gLast : gL;
      Y = fma(a, Y, double(e[q]));
    }
  }
}

// Position of decay k in an rs row of the tensor-core apply: lane g of the MMA's A fragment reads decays
// g + 8h + 16j (h < 2, j < MT) as 2·MT consecutive floats, in (j, h) order.
// The sum over the 4 lanes t4 of an MMA fragment row (lanes 4g … 4g + 3), in every one of them.
__device__ __forceinline__ float quadSum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

__host__ __device__ __forceinline__ int rsPos(int k, int MT) { return (k & 7) * 2 * MT + 2 * (k >> 4) + ((k >> 3) & 1); }

// Per (span, KV head, ≤ 4 query heads, decay group): the chunks' fp32 reruns from their entering states with
// Σ ŷ∘o, Σ ŷ² (and Σ o, Σ o² in decay group 0) over the span. kRms: sweep 1 only (v rows staged, no heads),
// each (entry, decay)'s rs written to p.rs for scanApplyTC.
template <int CB, bool kRms = false>
__global__ void __launch_bounds__(kThreads, kRms ? 2 : 1) scanApply(ScanParams p) {
  constexpr int KB = decaysPerWarp<CB>();
  constexpr int kRows = kBatch * KB;  // (step, decay) rows of a batch
  static_assert(kRows <= 32, "one lane per row");
  extern __shared__ __align__(16) unsigned char smem[];
  const int slots = ctxSlots(int(blockDim.x), p.sections, p.Dp, p.D);
  const Layout ly = layoutOf(p.TS, p.rowBytes, p.sections, p.Dp, p.warps, KB, slots * kHeads * p.D);
  int* tokS = reinterpret_cast<int*>(smem + ly.tok);
  int* flags = reinterpret_cast<int*>(smem + ly.flags);
  unsigned* maskS = reinterpret_cast<unsigned*>(smem + ly.mask);
  unsigned char* raw = smem + ly.raw;
  float* F = reinterpret_cast<float*>(smem + ly.f32);
  const Place at = placeOf(p, p.gBlocks);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  float* part = reinterpret_cast<float*>(smem + ly.part) + warp * kRows * kPartRow;
  float* rsb = reinterpret_cast<float*>(smem + ly.rs) + warp * kRows;
  float* ctx = reinterpret_cast<float*>(smem + ly.ctx);
  const int k0 = (at.kg * p.warps + warp) * KB;
  const bool ctxOn = !kRms && at.kg == 0;
  const int nhS = kRms ? 0 : at.nh;  // staged heads
  const int ctxCols = at.nh * p.D;
  const int rowF = p.sections * p.Dp;
  float gam[KB], y[KB][CB], sq[KB][CB], cr[KB][kHeads][CB];
#pragma unroll
  for (int b = 0; b < KB; ++b) {
    gam[b] = k0 + b < p.K0 ? float(p.decays[k0 + b]) : 0.f;
#pragma unroll
    for (int u = 0; u < CB; ++u) {
      y[b][u] = sq[b][u] = 0.f;
#pragma unroll
      for (int g = 0; g < kHeads; ++g) cr[b][g][u] = 0.f;
    }
  }
  if (ctxOn)
    for (int c = threadIdx.x; c < 2 * slots * ctxCols; c += blockDim.x) ctx[c] = 0.f;
  const float invD = 1.f / float(p.D), eps = float(kScanEps);
  const int TS = p.TS, stages = (at.i1 - at.i0 + TS - 1) / TS;
  for (int j = threadIdx.x; j < min(TS, at.i1 - at.i0); j += blockDim.x) tokS[j] = p.tok[at.i0 + j];
  __syncthreads();
  {
    const int n1 = min(TS, max(0, at.i1 - at.i0 - TS));
    issueStage(p, raw, tokS, flags, tokS + TS, at.i0, min(TS, at.i1 - at.i0), at.i0 + TS, n1, at.hk, at.h0, nhS);
  }
  for (int s = 0; s < stages; ++s) {
    const int is = at.i0 + s * TS, n = min(TS, at.i1 - is);
    if (is % p.L == 0) {  // a chunk starts: its carried state (TS divides L)
      const float* e = p.enter + ((long long)(is / p.L) * p.HKV + at.hk) * p.K0 * p.D;
#pragma unroll
      for (int b = 0; b < KB; ++b)
#pragma unroll
        for (int u = 0; u < CB; ++u) {
          const int ch = lane * CB + u;
          y[b][u] = k0 + b < p.K0 && ch < p.D ? e[(long long)(k0 + b) * p.D + ch] : 0.f;
        }
    }
    cpWait<0>();
    __syncthreads();
    convert(p, raw, flags, F, maskS, n, nhS, ctxOn ? ctx : nullptr);
    __syncthreads();
    if (s + 1 < stages) {
      const int in = is + TS, nn = min(TS, at.i1 - in), n2 = min(TS, max(0, at.i1 - in - TS));
      issueStage(p, raw, tokS + ((s + 1) & 1) * TS, flags, tokS + (s & 1) * TS, in, nn, in + TS, n2, at.hk, at.h0, nhS);
    }
    const unsigned mask = *maskS;
#pragma unroll 1
    for (int t0 = 0; t0 < TS; t0 += kBatch) {
      const unsigned mb = (mask >> t0) & ((1u << kBatch) - 1u);
      const float* Fb = F + t0 * rowF + lane * CB;
      float ys[KB][CB];  // sweep 1 runs a copy; y stays at the batch start for sweep 2
#pragma unroll
      for (int b = 0; b < KB; ++b)
#pragma unroll
        for (int u = 0; u < CB; ++u) ys[b][u] = y[b][u];
      if (mb) sweepPartials<CB, KB, true>(Fb, rowF, mb, gam, kRms ? y : ys, part + lane);
      else sweepPartials<CB, KB, false>(Fb, rowF, 0u, gam, kRms ? y : ys, part + lane);
      __syncwarp();
      if (lane < kRows) {  // row = (step j, decay b): the 32 partials in lane order
        const float4* r = reinterpret_cast<const float4*>(part + lane * kPartRow);
        float4 a = r[0];
#pragma unroll
        for (int q = 1; q < 8; ++q) {
          const float4 x = r[q];
          a.x += x.x, a.y += x.y, a.z += x.z, a.w += x.w;
        }
        const float ms = (a.x + a.y) + (a.z + a.w);
        const float rv = t0 + lane / KB < n ? rsqrtf(fmaf(ms, invD, eps)) : 0.f;  // past the stage: ŷ = 0, adds nothing
        if constexpr (kRms) {
          const int k = k0 + lane % KB;
          if (t0 + lane / KB < n && k < p.K0) p.rs[((long long)(is + t0 + lane / KB) * p.HKV + at.hk) * p.RP + rsPos(k, p.MT)] = rv;
        } else {
          rsb[lane] = rv;
        }
      }
      __syncwarp();
      if constexpr (kRms) continue;
      if (mb) sweepSums<CB, KB, true>(Fb, rowF, p.Dp, mb, gam, rsb, y, sq, cr);
      else sweepSums<CB, KB, false>(Fb, rowF, p.Dp, 0u, gam, rsb, y, sq, cr);
    }
  }
  if constexpr (kRms) return;
  __syncthreads();
#pragma unroll
  for (int b = 0; b < KB; ++b) {
    if (k0 + b >= p.K0) continue;
#pragma unroll
    for (int u = 0; u < CB; ++u) {
      const int ch = lane * CB + u;
      if (ch >= p.D) continue;
#pragma unroll
      for (int g = 0; g < kHeads; ++g)
        if (g < at.nh) p.crossPart[(((long long)at.span * p.H + at.h0 + g) * p.K0 + k0 + b) * p.D + ch] = cr[b][g][u];
      if (at.gb == 0) p.sqPart[(((long long)at.span * p.HKV + at.hk) * p.K0 + k0 + b) * p.D + ch] = sq[b][u];
    }
  }
  if (ctxOn)
    for (int c = threadIdx.x; c < 2 * ctxCols; c += blockDim.x) {
      float a = ctx[c];
      for (int q = 1; q < slots; ++q) a += ctx[q * 2 * ctxCols + c];
      p.ctxPart[((long long)at.span * p.H + at.h0) * p.D * 2 + c] = a;
    }
}

// ---- scanApplyTC: Σ ŷ∘o on the tensor cores over independent time segments (16-bit v and o, D % 16 == 0) ----
// One CTA per (group of kTcSegs chunks, KV head, ≤ 4 query heads, block of 4·W channels), W warps; warp w owns
// channels c0 = 4w … 4w + 3 of the block and every decay. Per channel pair (c0 + 2p, c0 + 2p + 1) and 16-decay
// m-tile j, one m16n8k8 TF32 product per step tau: A[k][κ] = ŷ(segment κ & 3, step tau, decay 16j + k, channel
// c0 + 2p + (κ >> 2)), B[κ][n] = o(segment κ & 3, step tau, head n & 3, channel c0 + 2p + (n >> 2)) where the two
// channel bits agree, else 0 (block-diagonal), so C[k][n] = Σ_segments ŷ∘o for both channels and the 4 heads.
// Lane (g, t4) thus owns segment t4 — its recurrences y = γy + v stay in the lane — for decays g + 8h + 16j and
// channels c0 + 2p + e. ŷ = y·rs (rs from the kRms pass) is split hi + lo in TF32 (hi: ŷ with its low 13 bits
// cleared, lo = ŷ − hi exactly; the MMA keeps lo's top 11 bits: ≤ 2^-22 of ŷ), o is exact in TF32. Σ ŷ² stays in
// fp32 registers; Σ o, Σ o² come from the B operand's nonzero element (each o value is loaded by exactly one lane).
// Rows of v, o (the block's channels), rs and the start flags of kTcStep steps × kTcSegs segments are staged by
// cp.async, double-buffered; entries past a segment's end are zeros (ŷ = 0 adds nothing).
constexpr int kTcSegs = 4;
constexpr int kTcStep = 16;

template <int MT>
__host__ __device__ constexpr int tcMaxWarps() {
  return MT <= 3 ? 16 : 8;  // ≤ 128 registers per thread at 512 threads (MT = 4: 96 of state alone)
}

struct TcLayout {
  int vP, stage, v, o, rs, fl, tok, total;
};
__host__ __device__ inline TcLayout tcLayoutOf(int W, int RP, int L) {
  TcLayout l{};
  l.vP = 8 * W + 16;  // bytes per staged row slice (4W 16-bit channels + 16: the 4 segments' rows hit distinct banks)
  const int rows = kTcStep * kTcSegs;
  l.v = 0;
  l.o = rows * l.vP;
  l.rs = l.o + rows * 4 * l.vP;
  l.fl = l.rs + rows * RP * 4;
  l.stage = (l.fl + rows * 4 + 15) / 16 * 16;
  l.tok = 2 * l.stage;
  l.total = l.tok + kTcSegs * L * 4;
  return l;
}

__device__ __forceinline__ void mmaTf32(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
  asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two 16-bit values in a word → fp32 (exact).
template <typename E>
__device__ __forceinline__ void unpack2(unsigned w, float& lo, float& hi) {
  if constexpr (std::is_same<E, __nv_bfloat16>::value) {
    lo = __uint_as_float(w << 16);
    hi = __uint_as_float(w & 0xffff0000u);
  } else {
    const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&w));
    lo = f.x;
    hi = f.y;
  }
}
// The low (hiHalf = false) or high 16-bit value of a word → fp32.
template <typename E>
__device__ __forceinline__ float unpack1(unsigned w, bool hiHalf) {
  if constexpr (std::is_same<E, __nv_bfloat16>::value) {
    return __uint_as_float(__byte_perm(w, 0u, hiHalf ? 0x3244u : 0x1044u));
  } else {
    return __half2float(__ushort_as_half((unsigned short)(hiHalf ? w >> 16 : w & 0xffffu)));
  }
}

struct TcParams {
  ScanParams s;
  int W, segGroups, chunkBlocks;
};

// Issues one stage's copies (steps [tau0, tau0 + kTcStep) of the CTA's segments) as one cp.async group. The
// 32W threads and the 64 rows × W/2 16-byte units of a v slice match one to one: a thread keeps unit u of row r0
// (v) and of rows r0 + 64i (the 4 heads' o rows), so no index is divided per copy.
template <int MT>
__device__ __forceinline__ void tcIssue(const TcParams& tp, const TcLayout& ly, unsigned char* buf, const int* tokS, const int* segLen,
                                        int tau0, int hk, int h0, int nh, int cb) {
  const ScanParams& p = tp.s;
  const int tid = threadIdx.x, nt = blockDim.x, r0 = tid / (tp.W / 2), u = tid - r0 * (tp.W / 2);
  const long long chOff = (long long)cb * 4 * tp.W * 2 + u * 16;
  constexpr int rows = kTcStep * kTcSegs;
  {  // v
    const int seg = r0 & 3, t = tau0 + (r0 >> 2);
    const bool ok = t < segLen[seg];
    const long long tok = ok ? tokS[seg * p.L + t] : 0;
    ptx::cpAsync16(smemAddr(buf + ly.v + r0 * ly.vP + u * 16), p.v + (tok * p.vStride + (long long)hk * p.D) * 2 + chOff, ok);
  }
#pragma unroll 1
  for (int i = 0; i < 4; ++i) {  // o of 4 heads (zeros for absent ones)
    const int r4 = r0 + 64 * i, row = r4 >> 2, g = r4 & 3, seg = row & 3, t = tau0 + (row >> 2);
    const bool ok = t < segLen[seg] && g < nh;
    const long long tok = ok ? tokS[seg * p.L + t] : 0;
    ptx::cpAsync16(smemAddr(buf + ly.o + r4 * ly.vP + u * 16), p.o + (tok * p.oStride + (long long)(h0 + (ok ? g : 0)) * p.D) * 2 + chOff, ok);
  }
  constexpr int ur = 4 * MT;  // 16-byte units of an rs row
  for (int i = tid; i < rows * ur; i += nt) {  // rs rows
    const int row = i / ur, u = i - row * ur, seg = row & 3, t = tau0 + (row >> 2);
    const bool ok = t < segLen[seg];
    const long long e = ok ? (long long)(blockIdx.x * kTcSegs + seg) * p.L + t : 0;
    ptx::cpAsync16(smemAddr(buf + ly.rs + (row * p.RP + u * 4) * 4), p.rs + (e * p.HKV + hk) * p.RP + u * 4, ok);
  }
  for (int row = tid; row < rows; row += nt) {  // start flags
    const int seg = row & 3, t = tau0 + (row >> 2);
    if (t < segLen[seg]) cpAsync4(smemAddr(buf + ly.fl + row * 4), p.first + (long long)(blockIdx.x * kTcSegs + seg) * p.L + t);
    else *reinterpret_cast<int*>(buf + ly.fl + row * 4) = 0;
  }
  cpCommit();
}

template <int MT, bool Starts, typename E>
__device__ __forceinline__ void tcSteps(const unsigned char* buf, const TcLayout& ly, int RP, unsigned bits, const float (&gam)[MT][2],
                                        bool hiHalf, unsigned mLo, float (&y)[MT][2][2][2], float (&sq)[MT][2][2][2],
                                        float (&acc)[MT][2][4], float (&cs)[2], float (&cq)[2]) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
  const unsigned char* vRow = buf + ly.v + t4 * ly.vP + warp * 8;
  const unsigned char* oRow = buf + ly.o + (t4 * 4 + (g & 3)) * ly.vP + warp * 8;
  const float* rsRow = reinterpret_cast<const float*>(buf + ly.rs) + t4 * RP + g * 2 * MT;
#pragma unroll 2
  for (int tau = 0; tau < kTcStep; ++tau) {
    const uint2 vw = *reinterpret_cast<const uint2*>(vRow + tau * kTcSegs * ly.vP);
    const uint2 ow = *reinterpret_cast<const uint2*>(oRow + tau * kTcSegs * 4 * ly.vP);
    float rs[MT][2];
#pragma unroll
    for (int j = 0; j < MT; ++j) {
      const float2 r = *reinterpret_cast<const float2*>(rsRow + tau * kTcSegs * RP + 2 * j);
      rs[j][0] = r.x, rs[j][1] = r.y;
    }
    float v[2][2];
    unpack2<E>(vw.x, v[0][0], v[0][1]);
    unpack2<E>(vw.y, v[1][0], v[1][1]);
    unsigned b[2][2];
#pragma unroll
    for (int p = 0; p < 2; ++p) {
      const float o = unpack1<E>(p ? ow.y : ow.x, hiHalf);
      cs[p] += o;
      cq[p] = fmaf(o, o, cq[p]);
      b[p][0] = __float_as_uint(o) & mLo;
      b[p][1] = __float_as_uint(o) & ~mLo;
    }
    const bool start = Starts && ((bits >> tau) & 1u);
#pragma unroll
    for (int j = 0; j < MT; ++j) {
#pragma unroll
      for (int p = 0; p < 2; ++p) {
        unsigned hi[4], lo[4];
#pragma unroll
        for (int e = 0; e < 2; ++e)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const float m = start ? 0.f : gam[j][h];
            float& yy = y[j][p][e][h];
            yy = fmaf(m, yy, v[p][e]);
            const float z = yy * rs[j][h];
            sq[j][p][e][h] = fmaf(z, z, sq[j][p][e][h]);
            const unsigned zh = __float_as_uint(z) & 0xffffe000u;
            hi[h + 2 * e] = zh;
            lo[h + 2 * e] = __float_as_uint(z - __uint_as_float(zh));
          }
        mmaTf32(acc[j][p], hi, b[p][0], b[p][1]);
        mmaTf32(acc[j][p], lo, b[p][0], b[p][1]);
      }
    }
  }
}

template <int MT, typename E>
__global__ void __launch_bounds__(32 * tcMaxWarps<MT>(), 1) scanApplyTC(TcParams tp) {
  const ScanParams& p = tp.s;
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ int segLen[kTcSegs];
  const TcLayout ly = tcLayoutOf(tp.W, p.RP, p.L);
  int* tokS = reinterpret_cast<int*>(smem + ly.tok);
  const int sg = blockIdx.x, cb = blockIdx.z;
  const int gb = blockIdx.y % p.gBlocks, hk = blockIdx.y / p.gBlocks;
  const int h0 = hk * p.G + gb * kHeads, nh = min(kHeads, p.G - gb * kHeads);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
  if (threadIdx.x < kTcSegs) {
    const int c = sg * kTcSegs + threadIdx.x;
    segLen[threadIdx.x] = c < p.chunks ? min(p.L, p.count - c * p.L) : 0;
  }
  for (int i = threadIdx.x; i < kTcSegs * p.L; i += blockDim.x) {
    const long long e = (long long)sg * kTcSegs * p.L + i;
    tokS[i] = e < p.count ? p.tok[e] : 0;
  }
  __syncthreads();
  const int myLen = segLen[t4], stages = (max(max(segLen[0], segLen[1]), max(segLen[2], segLen[3])) + kTcStep - 1) / kTcStep;
  tcIssue<MT>(tp, ly, smem, tokS, segLen, 0, hk, h0, nh, cb);

  const int c0 = cb * 4 * tp.W + warp * 4, chunk = sg * kTcSegs + t4;
  float gam[MT][2], y[MT][2][2][2], sq[MT][2][2][2], acc[MT][2][4], cs[2] = {0.f, 0.f}, cq[2] = {0.f, 0.f};
#pragma unroll
  for (int j = 0; j < MT; ++j)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int k = 16 * j + g + 8 * h;
      gam[j][h] = k < p.K0 ? float(p.decays[k]) : 0.f;
#pragma unroll
      for (int pp = 0; pp < 2; ++pp)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int ch = c0 + 2 * pp + e;
          y[j][pp][e][h] = k < p.K0 && myLen > 0 ? p.enter[(((long long)chunk * p.HKV + hk) * p.K0 + k) * p.D + ch] : 0.f;
          sq[j][pp][e][h] = 0.f;
        }
    }
#pragma unroll
  for (int j = 0; j < MT; ++j)
#pragma unroll
    for (int pp = 0; pp < 2; ++pp)
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[j][pp][q] = 0.f;
  const bool hiHalf = g >= 4;                // B: n = g is channel c0 + 2p + (g >> 2), head g & 3
  const unsigned mLo = hiHalf ? 0u : ~0u;    // b0 (κ = t4: channel bit 0) nonzero for g < 4, b1 for g ≥ 4

  for (int s = 0; s < stages; ++s) {
    cpWait<0>();
    __syncthreads();
    if (s + 1 < stages) tcIssue<MT>(tp, ly, smem + ((s + 1) & 1) * ly.stage, tokS, segLen, (s + 1) * kTcStep, hk, h0, nh, cb);
    const unsigned char* buf = smem + (s & 1) * ly.stage;
    unsigned bits = 0;
#pragma unroll
    for (int t = 0; t < kTcStep; ++t) bits |= (reinterpret_cast<const int*>(buf + ly.fl)[t * kTcSegs + t4] != 0 ? 1u : 0u) << t;
    if (__any_sync(0xffffffffu, bits != 0)) tcSteps<MT, true, E>(buf, ly, p.RP, bits, gam, hiHalf, mLo, y, sq, acc, cs, cq);
    else tcSteps<MT, false, E>(buf, ly, p.RP, 0u, gam, hiHalf, mLo, y, sq, acc, cs, cq);
    __syncthreads();  // the buffer is refilled by the next stage's issue
  }

  // Σ over the 4 segments (lanes t4) of Σŷ² and Σo, Σo²; the MMA already summed the cross term over them.
#pragma unroll
  for (int j = 0; j < MT; ++j)
#pragma unroll
    for (int pp = 0; pp < 2; ++pp)
#pragma unroll
      for (int e = 0; e < 2; ++e)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          sq[j][pp][e][h] = quadSum(sq[j][pp][e][h]);
        }
#pragma unroll
  for (int pp = 0; pp < 2; ++pp) {
    cs[pp] += __shfl_xor_sync(0xffffffffu, cs[pp], 1);
    cs[pp] += __shfl_xor_sync(0xffffffffu, cs[pp], 2);
    cq[pp] += __shfl_xor_sync(0xffffffffu, cq[pp], 1);
    cq[pp] += __shfl_xor_sync(0xffffffffu, cq[pp], 2);
  }
  const int span = sg;
#pragma unroll
  for (int j = 0; j < MT; ++j)
#pragma unroll
    for (int pp = 0; pp < 2; ++pp)
#pragma unroll
      for (int q = 0; q < 4; ++q) {  // C[g + 8(q >> 1)][2t4 + (q & 1)]
        const int k = 16 * j + g + 8 * (q >> 1), n = 2 * t4 + (q & 1), ch = c0 + 2 * pp + (n >> 2), hd = n & 3;
        if (k < p.K0 && hd < nh) p.crossPart[(((long long)span * p.H + h0 + hd) * p.K0 + k) * p.D + ch] = acc[j][pp][q];
      }
  if (t4 == 0) {
    if (gb == 0)
#pragma unroll
      for (int j = 0; j < MT; ++j)
#pragma unroll
        for (int pp = 0; pp < 2; ++pp)
#pragma unroll
          for (int e = 0; e < 2; ++e)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              const int k = 16 * j + g + 8 * h;
              if (k < p.K0) p.sqPart[(((long long)span * p.HKV + hk) * p.K0 + k) * p.D + c0 + 2 * pp + e] = sq[j][pp][e][h];
            }
    if ((g & 3) < nh)
#pragma unroll
      for (int pp = 0; pp < 2; ++pp) {
        const int ch = c0 + 2 * pp + (g >> 2);
        *reinterpret_cast<float2*>(p.ctxPart + (((long long)span * p.H + h0 + (g & 3)) * p.D + ch) * 2) = make_float2(cs[pp], cq[pp]);
      }
  }
}

// ---- scanRmsNorm: the tensor-core apply's rs from the norm recurrence (TCAL_MOMENTS_SCAN=norm) ----
// Written in session 6; first run session 7 (run 3: the moments tests with it on; run 2: 0.188 ms at the bench shape).
// ‖y_t‖² = m_t²‖y_{t−1}‖² + 2m_t⟨y_{t−1}, v_t⟩ + ‖v_t‖² (m_t = γ, or 0 at a sequence start), so rs needs no
// per-element work but the inner products: inside a block of 16 steps from the block-start state Y,
// ⟨y_{τ−1}, v_τ⟩ = Horner over s < τ of (a ← m_s·a + G[s][τ]) from a = P[τ] = ⟨Y, v_τ⟩, G = V·Vᵀ the block's Gram.
// One CTA per (chunk, KV head), one warp per 16-decay m-tile holding Y (16 decays × D channels, fp32) in the
// m16n8 C-fragment layout; per block, on m16n8k8 TF32: P = Y·Vᵀ (Y split hi + lo, v exact in TF32), G = V·Vᵀ
// (exact products), and the next block-start state Y ← m_blk·Y + W·V (W[k][s] = γ_k^(15−s), three TF32 terms,
// columns before the block's last sequence start zeroed; m_blk = γ^16, 0 if the block holds a start). With the
// channel order of the k dimension permuted (κ = t4 ↔ channel 2t4, κ = t4 + 4 ↔ 2t4 + 1), Y's C fragments are its
// A fragments and one 32-bit word of a v row feeds both P's B and G's A — no shuffles, no transposes.
// Then lane (k, half) runs the Horner sums of its decay for the steps of its parity and both halves the 16 norm
// steps; rs = rsqrt(n/D + ε) goes to p.rs in the apply's order. Cancellation guard (test/moments-scan-norm.test.ts):
// the norm step's error scale M_τ = m²M_{τ−1} + 2m|d_τ| + w_τ (M = ‖Y‖² at the block start) is carried along; if
// some n_τ < M_τ/64 (anti-aligned v: never on real data in the study), the warp reruns the block directly —
// y = m·y + v and Σ y² per step in fp32, as the kRms pass does — and takes Y from that rerun.
constexpr int kNormStep = 16;                // steps per block (the Gram's size)
constexpr float kNormGuard = 1.f / 64.f;     // n_τ below this share of its error scale: the block is rerun directly
constexpr int kNormPG = 16 * 17 * 2 + 16;    // floats per warp: P [decay][step], G [step][step] (pitch 17), ‖Y‖²

struct NormLayout {
  int vP, stage, fl, pg, tok, total;
};
__host__ __device__ inline NormLayout normLayoutOf(int D, int warps, int L) {
  NormLayout l{};
  l.vP = 2 * D + 16;  // bytes per staged v row: 16-bit values + 16 (rows 4 banks apart: the fragment loads are conflict-free)
  l.fl = kNormStep * l.vP;
  l.stage = l.fl + kNormStep * 4;  // v rows and start flags of one block (double-buffered)
  l.pg = 2 * l.stage;
  l.tok = l.pg + warps * kNormPG * 4;
  l.total = l.tok + L * 4;
  return l;
}

// γ^e for 0 ≤ e < 16 in f64 (square-and-multiply).
__device__ __forceinline__ double powSmall(double g, int e) {
  double r = 1.0, x = g;
#pragma unroll
  for (int b = 0; b < 4; ++b) {
    if (e & (1 << b)) r *= x;
    x *= x;
  }
  return r;
}

template <int NT, typename E>
__global__ void __launch_bounds__(32 * kTcMaxMTiles) scanRmsNorm(ScanParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int warps = int(blockDim.x) >> 5;
  const NormLayout ly = normLayoutOf(p.D, warps, p.L);
  const int chunk = blockIdx.x, hk = blockIdx.y;
  const int i0 = chunk * p.L, len = min(p.L, p.count - i0), nBlocks = (len + kNormStep - 1) / kNormStep;
  const int tid = threadIdx.x, nt = blockDim.x, m = tid >> 5, lane = tid & 31, g = lane >> 2, t4 = lane & 3;
  int* tokS = reinterpret_cast<int*>(smem + ly.tok);
  float* Ps = reinterpret_cast<float*>(smem + ly.pg) + m * kNormPG;  // [decay][step], pitch 17
  float* Gs = Ps + 16 * 17;                                           // [step][step], pitch 17
  float* Ns = Gs + 16 * 17;                                           // [decay] ‖Y‖²
  for (int r = tid; r < len; r += nt) tokS[r] = p.tok[i0 + r];
  __syncthreads();
  const int units = p.D / 8;  // 16-byte units of a v row
  auto issue = [&](int b) {   // block b's v rows (zeros past the chunk) and start flags, one cp.async group
    unsigned char* buf = smem + (b & 1) * ly.stage;
    for (int u = tid; u < kNormStep * units; u += nt) {
      const int row = u / units, q = u - row * units, r = b * kNormStep + row;
      const bool ok = r < len;
      const long long t = ok ? tokS[r] : 0;
      ptx::cpAsync16(smemAddr(buf + row * ly.vP + q * 16), p.v + (t * p.vStride + (long long)hk * p.D) * 2 + (ok ? q * 16 : 0), ok);
    }
    if (tid < kNormStep) {
      int* fl = reinterpret_cast<int*>(buf + ly.fl);
      const int r = b * kNormStep + tid;
      if (r < len) cpAsync4(smemAddr(fl + tid), p.first + i0 + r);
      else fl[tid] = 0;
    }
    cpCommit();
  };
  if (nBlocks > 0) issue(0);

  // The lane's C-fragment rows (decays kC[h] = 16m + g + 8h), their γ and γ^16, and W's A fragments: k-step ks
  // (steps 8ks … 8ks + 7), register r at row g + 8(r & 1), column (step) 8ks + t4 + 4(r >> 1); three TF32 terms.
  float gamC[2], g16[2];
  unsigned wa[2][3][4];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int k = 16 * m + g + 8 * h;
    const double gd = k < p.K0 ? p.decays[k] : 0.0;
    gamC[h] = float(gd);
    const double g8 = powSmall(gd, 8);
    g16[h] = float(g8 * g8);
  }
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int k = 16 * m + g + 8 * (r & 1);
    const double gd = k < p.K0 ? p.decays[k] : 0.0;
#pragma unroll
    for (int ks = 0; ks < 2; ++ks) {
      const int s = 8 * ks + t4 + 4 * (r >> 1);
      const float w = float(powSmall(gd, kNormStep - 1 - s));
      const unsigned t0 = __float_as_uint(w) & 0xffffe000u;
      const float r1 = w - __uint_as_float(t0);
      const unsigned t1 = __float_as_uint(r1) & 0xffffe000u;
      wa[ks][0][r] = t0;
      wa[ks][1][r] = t1;
      wa[ks][2][r] = __float_as_uint(r1 - __uint_as_float(t1));  // the MMA keeps its top 11 bits: ≤ 2^-33 w
    }
  }
  // The scalar phase's decay (lane & 15 of the m-tile).
  const int kq = lane & 15, half = lane >> 4, kS = 16 * m + kq;
  const float gS = kS < p.K0 ? float(p.decays[kS]) : 0.f;

  // Y: the state entering the chunk (the carry's), C layout: Y[n][2h + e] = y(decay kC[h], channel 8n + 2t4 + e).
  float Y[NT][4];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int k = 16 * m + g + 8 * h;
    const float* src = p.enter + (((long long)chunk * p.HKV + hk) * p.K0 + k) * p.D + 2 * t4;
#pragma unroll
    for (int n = 0; n < NT; ++n) {
      const float2 e = k < p.K0 && len > 0 ? *reinterpret_cast<const float2*>(src + 8 * n) : make_float2(0.f, 0.f);
      Y[n][2 * h] = e.x;
      Y[n][2 * h + 1] = e.y;
    }
  }
  const float invD = 1.f / float(p.D), eps = float(kScanEps);
  float* rsOut = p.rs + hk * p.RP;
  const long long rsStride = (long long)p.HKV * p.RP;

  for (int b = 0; b < nBlocks; ++b) {
    cpWait<0>();
    __syncthreads();  // block b landed; every warp is done with the buffer block b + 1 refills
    if (b + 1 < nBlocks) issue(b + 1);
    const unsigned char* buf = smem + (b & 1) * ly.stage;
    const unsigned bits = __ballot_sync(0xffffffffu, lane < kNormStep && reinterpret_cast<const int*>(buf + ly.fl)[lane & 15] != 0) & 0xffffu;
    const int lenB = min(kNormStep, len - b * kNormStep);

    // ‖Y‖² of the lane's rows (over the 4 lanes t4 of the row).
    float s0 = 0.f, s1 = 0.f;
#pragma unroll
    for (int n = 0; n < NT; ++n) {
      s0 = fmaf(Y[n][0], Y[n][0], fmaf(Y[n][1], Y[n][1], s0));
      s1 = fmaf(Y[n][2], Y[n][2], fmaf(Y[n][3], Y[n][3], s1));
    }
    s0 = quadSum(s0);
    s1 = quadSum(s1);

    // P = Y·Vᵀ (two accumulators per n-tile: shorter dependent chains) and G = V·Vᵀ; k-step ks = channels 8ks …
    // 8ks + 7, κ = t4 ↔ 8ks + 2t4, κ = t4 + 4 ↔ 8ks + 2t4 + 1. n-tile nt = steps 8nt … 8nt + 7.
    float pc[2][2][4], gc[2][4];
#pragma unroll
    for (int a = 0; a < 2; ++a)
#pragma unroll
      for (int q = 0; q < 4; ++q) pc[a][0][q] = pc[a][1][q] = gc[a][q] = 0.f;
    const unsigned char* rowA = buf + g * ly.vP + t4 * 4;  // step g, channel 8ks + 2t4
    const unsigned char* rowB = rowA + 8 * ly.vP;          // step g + 8
#pragma unroll
    for (int ks = 0; ks < NT; ++ks) {
      float v00, v01, v10, v11;
      unpack2<E>(*reinterpret_cast<const unsigned*>(rowA + ks * 16), v00, v01);
      unpack2<E>(*reinterpret_cast<const unsigned*>(rowB + ks * 16), v10, v11);
      const unsigned b0[2] = {__float_as_uint(v00), __float_as_uint(v10)}, b1[2] = {__float_as_uint(v01), __float_as_uint(v11)};
      const unsigned av[4] = {b0[0], b0[1], b1[0], b1[1]};  // V as A: rows = steps g, g + 8
      const float ya[4] = {Y[ks][0], Y[ks][2], Y[ks][1], Y[ks][3]};
      unsigned ah[4], al[4];
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        ah[q] = __float_as_uint(ya[q]) & 0xffffe000u;
        al[q] = __float_as_uint(ya[q] - __uint_as_float(ah[q]));
      }
#pragma unroll
      for (int a = 0; a < 2; ++a) {
        mmaTf32(pc[a][ks & 1], al, b0[a], b1[a]);
        mmaTf32(pc[a][ks & 1], ah, b0[a], b1[a]);
        mmaTf32(gc[a], av, b0[a], b1[a]);
      }
    }
#pragma unroll
    for (int a = 0; a < 2; ++a)
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int row = g + 8 * (q >> 1), col = 8 * a + 2 * t4 + (q & 1);
        Ps[row * 17 + col] = pc[a][0][q] + pc[a][1][q];
        Gs[row * 17 + col] = gc[a][q];
      }
    if (t4 == 0) Ns[g] = s0, Ns[g + 8] = s1;
    __syncwarp();

    // Lane (kq, half): d_τ = ⟨y_{τ−1}, v_τ⟩ for τ = 2i + half, then both halves run the 16 norm steps.
    float mv[kNormStep];
#pragma unroll
    for (int s = 0; s < kNormStep; ++s) mv[s] = (bits >> s) & 1u ? 0.f : gS;
    float d[kNormStep / 2];
#pragma unroll
    for (int i = 0; i < kNormStep / 2; ++i) {
      const int tau = 2 * i + half;
      float a = Ps[kq * 17 + tau];
#pragma unroll
      for (int s = 0; s < 2 * i; ++s) a = fmaf(mv[s], a, Gs[s * 17 + tau]);
      if (half) a = fmaf(mv[2 * i], a, Gs[2 * i * 17 + tau]);
      d[i] = a;
    }
    float n = Ns[kq], M = n, rsv[kNormStep / 2];
    bool bad = false;
#pragma unroll
    for (int i = 0; i < kNormStep / 2; ++i) {
      const float other = __shfl_xor_sync(0xffffffffu, d[i], 16);
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int tau = 2 * i + e;
        const float dt = (e == half) ? d[i] : other, w = Gs[tau * 17 + tau], mt = mv[tau], m2 = mt * mt, m2x = 2.f * mt;
        n = fmaxf(0.f, fmaf(m2, n, fmaf(m2x, dt, w)));
        M = fmaf(m2, M, fmaf(m2x, fabsf(dt), w));
        bad |= tau < lenB && n < kNormGuard * M;
        if (e == half) rsv[i] = rsqrtf(fmaf(n, invD, eps));
      }
    }
    const long long e0 = (long long)i0 + b * kNormStep;
    if (!__any_sync(0xffffffffu, bad && kS < p.K0)) {
      if (kS < p.K0) {
        float* dst = rsOut + rsPos(kS, p.MT);
#pragma unroll
        for (int i = 0; i < kNormStep / 2; ++i) {
          const int tau = 2 * i + half;
          if (tau < lenB) dst[(e0 + tau) * rsStride] = rsv[i];
        }
      }
      // Y ← m_blk·Y + W·V, W's columns before the block's last sequence start zeroed.
      const float mb0 = bits ? 0.f : g16[0], mb1 = bits ? 0.f : g16[1];
#pragma unroll
      for (int n2 = 0; n2 < NT; ++n2) Y[n2][0] *= mb0, Y[n2][1] *= mb0, Y[n2][2] *= mb1, Y[n2][3] *= mb1;
      unsigned a[2][3][4];
      const int sigma = bits ? 31 - __clz(int(bits)) : 0;
#pragma unroll
      for (int ks = 0; ks < 2; ++ks)
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const bool keep = 8 * ks + t4 + 4 * (r >> 1) >= sigma;
#pragma unroll
          for (int q = 0; q < 3; ++q) a[ks][q][r] = keep ? wa[ks][q][r] : 0u;
        }
      // B[κ = step 8ks + t4 (+4)][channel 8n + g]: the 16-bit value in the word at channel 8n + (g & ~1).
      const unsigned char* colB = buf + t4 * ly.vP + (g & ~1) * 2;
      const bool hiHalf = g & 1;
#pragma unroll
      for (int n2 = 0; n2 < NT; ++n2)
#pragma unroll
        for (int ks = 0; ks < 2; ++ks) {
          const unsigned char* src = colB + 8 * ks * ly.vP + n2 * 16;
          const unsigned b0 = __float_as_uint(unpack1<E>(*reinterpret_cast<const unsigned*>(src), hiHalf));
          const unsigned b1 = __float_as_uint(unpack1<E>(*reinterpret_cast<const unsigned*>(src + 4 * ly.vP), hiHalf));
#pragma unroll
          for (int q = 2; q >= 0; --q) mmaTf32(Y[n2], a[ks][q], b0, b1);  // small terms first
        }
    } else {
      // Guarded: rerun the block directly (y = m·y + v, Σ y² in fp32), which also leaves the next block-start state.
#pragma unroll 1
      for (int tau = 0; tau < kNormStep; ++tau) {
        const bool start = (bits >> tau) & 1u;
        const float m0 = start ? 0.f : gamC[0], m1 = start ? 0.f : gamC[1];
        const unsigned char* row = buf + tau * ly.vP + t4 * 4;
        float q0 = 0.f, q1 = 0.f;
#pragma unroll
        for (int n2 = 0; n2 < NT; ++n2) {
          float v0, v1;
          unpack2<E>(*reinterpret_cast<const unsigned*>(row + n2 * 16), v0, v1);
          Y[n2][0] = fmaf(m0, Y[n2][0], v0);
          Y[n2][1] = fmaf(m0, Y[n2][1], v1);
          Y[n2][2] = fmaf(m1, Y[n2][2], v0);
          Y[n2][3] = fmaf(m1, Y[n2][3], v1);
          q0 = fmaf(Y[n2][0], Y[n2][0], fmaf(Y[n2][1], Y[n2][1], q0));
          q1 = fmaf(Y[n2][2], Y[n2][2], fmaf(Y[n2][3], Y[n2][3], q1));
        }
        q0 = quadSum(q0);
        q1 = quadSum(q1);
        if (t4 == 0 && tau < lenB) {
          const int k0 = 16 * m + g;
          if (k0 < p.K0) rsOut[(e0 + tau) * rsStride + rsPos(k0, p.MT)] = rsqrtf(fmaf(q0, invD, eps));
          if (k0 + 8 < p.K0) rsOut[(e0 + tau) * rsStride + rsPos(k0 + 8, p.MT)] = rsqrtf(fmaf(q1, invD, eps));
        }
      }
    }
  }
}

// 1 at each chunk that holds a sequence start (the carry's reset), from the device's start flags.
__global__ void chunkResets(const int* __restrict__ first, int count, int L, int* __restrict__ reset) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < count && first[i]) reset[i / L] = 1;
}

// f64 sums of the span partials, in span order, into Σ ŷ∘o [H,K0,D] and Σ ŷ² [H,K0,D].
__global__ void scanSums(const float* __restrict__ crossPart, const float* __restrict__ sqPart, int spans, int H, int HKV, int K0,
                         int D, double* __restrict__ cross, double* __restrict__ sq) {
  const long long n = (long long)H * K0 * D;
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const int h = int(i / ((long long)K0 * D)), hk = h / (H / HKV);
  const long long kd = i % ((long long)K0 * D), nKv = (long long)HKV * K0 * D;
  double a = 0, b = 0;
  for (int s = 0; s < spans; ++s) {
    a += double(crossPart[(long long)s * n + i]);
    b += double(sqPart[(long long)s * nKv + (long long)hk * K0 * D + kd]);
  }
  cross[i] += a;
  sq[i] += b;
}

// Σ o, Σ o² [H·D] from the span partials.
__global__ void contextSums(const float2* __restrict__ part, int spans, int HD, double* __restrict__ sum, double* __restrict__ sq) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= HD) return;
  double a = 0, b = 0;
  for (int s = 0; s < spans; ++s) {
    const float2 x = part[(long long)s * HD + i];
    a += double(x.x);
    b += double(x.y);
  }
  sum[i] += a;
  sq[i] += b;
}

int codeOf(DType t, const char* argument) {
  switch (t) {
    case DType::F32: return kF32;
    case DType::BF16: return kBF16;
    case DType::F16: return kF16;
    case DType::F64: return kF64;
    default: throwInvalid(argument, std::string("expected a floating dtype, got ") + dtypeName(t));
  }
}

// Blocks of `kern` per SM at `threads` threads and `smem` bytes (its dynamic limit raised to `smem` first).
template <typename K>
int residentBlocks(K kern, int threads, int smem) {
  check(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, smem), "cudaFuncSetAttribute");
  int n = 0;
  check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kern, threads, size_t(smem)), "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
  return std::max(1, n);
}

// The tensor-core apply for one m-tile count and 16-bit type: attribute raised, then launched.
template <int MT, typename E>
void launchTc(const TcParams& tp, int smem, cudaStream_t stream) {
  const ScanParams& p = tp.s;
  residentBlocks(scanApplyTC<MT, E>, 32 * tp.W, smem);
  scanApplyTC<MT, E><<<dim3(unsigned(tp.segGroups), unsigned(p.HKV * p.gBlocks), unsigned(tp.chunkBlocks)), unsigned(32 * tp.W), size_t(smem),
                       stream>>>(tp);
}
template <typename E>
void launchTcE(const TcParams& tp, int smem, cudaStream_t stream) {
  switch (tp.s.MT) {
    case 1: launchTc<1, E>(tp, smem, stream); break;
    case 2: launchTc<2, E>(tp, smem, stream); break;
    case 3: launchTc<3, E>(tp, smem, stream); break;
    default: launchTc<4, E>(tp, smem, stream); break;
  }
}

// scanRmsNorm for D 64 / 128 (16-bit v): rs per (entry, KV head, decay) in the tensor-core apply's order.
void launchRmsNorm(const ScanParams& prm, cudaStream_t stream) {
  const int smemN = normLayoutOf(prm.D, prm.MT, prm.L).total;
  auto go = [&](auto kern) {
    residentBlocks(kern, 32 * prm.MT, smemN);
    kern<<<dim3(unsigned(prm.chunks), unsigned(prm.HKV)), unsigned(32 * prm.MT), size_t(smemN), stream>>>(prm);
  };
  if (prm.vType == kBF16) prm.D == 128 ? go(scanRmsNorm<16, __nv_bfloat16>) : go(scanRmsNorm<8, __nv_bfloat16>);
  else prm.D == 128 ? go(scanRmsNorm<16, __half>) : go(scanRmsNorm<8, __half>);
}

template <int CB>
void launch(ScanParams prm, bool tcApply, bool normRms, int sms, int maxSmem, const Accumulators& acc, Device dev, cudaStream_t stream,
            const std::function<void(const char*)>& mark) {
  constexpr int KB = decaysPerWarp<CB>();
  const int threads = prm.warps * 32;
  // The stage length giving the most resident warps per SM (ties: the longest; TS divides L, ≤ 32 for the
  // one-word start mask); then spans so that one wave of CTAs fills the SMs.
  auto pickStage = [&](auto kern, ScanParams& q, int& smem) {
    int bestWarps = 0;
    for (int ts : {32, 16, 8}) {
      const int slots = ctxSlots(threads, q.sections, q.Dp, q.D);
      const int bytes = layoutOf(ts, q.rowBytes, q.sections, q.Dp, q.warps, KB, slots * kHeads * q.D).total;
      if (bytes > maxSmem) continue;
      const int w = residentBlocks(kern, threads, bytes) * q.warps;
      if (w > bestWarps) bestWarps = w, q.TS = ts, smem = bytes;
    }
    if (bestWarps == 0) throwInvalid("q", "the γ₀ scan's stage does not fit in shared memory");
    const int perSpan = q.HKV * q.gBlocks * q.kGroups;
    const int wanted = std::max(1, sms * (bestWarps / q.warps) / perSpan);
    q.spanChunks = (q.chunks + wanted - 1) / wanted;
    q.spans = (q.chunks + q.spanChunks - 1) / q.spanChunks;
  };
  int smemApply = 0, smemRms = 0, smemTc = 0;
  ScanParams rp = prm;  // the RMS pass of the tensor-core apply: v rows only, no heads
  TcParams tp{};
  if (tcApply) {
    rp.sections = 1;
    rp.rowBytes = prm.vPitch;
    rp.gBlocks = 1;
    pickStage(scanApply<CB, true>, rp, smemRms);
    prm.TS = rp.TS;  // (the CUDA-core states pass, if it runs, stages as the RMS pass)
    int W = std::min(prm.MT <= 3 ? tcMaxWarps<3>() : tcMaxWarps<4>(), prm.D / 4);
    if (const char* w = std::getenv("TCAL_MOMENTS_TCW")) W = std::max(2, std::min(W, std::atoi(w)));  // benchmark: warps per CTA
    while ((prm.D / 4) % W != 0 || W % 2 != 0) --W;
    tp.W = W;
    tp.chunkBlocks = prm.D / (4 * W);
    tp.segGroups = (prm.chunks + kTcSegs - 1) / kTcSegs;
    prm.spans = tp.segGroups;  // the partial sums' rows: one per segment group
    smemTc = tcLayoutOf(W, prm.RP, prm.L).total;
  } else {
    pickStage(scanApply<CB>, prm, smemApply);
  }
  const int perSpan = prm.HKV * prm.gBlocks * prm.kGroups;

  ScanParams sp = prm;  // the states pass: v rows only, spans of its own
  sp.sections = 1;
  sp.rowBytes = prm.vPitch;
  const int smemStates = layoutOf(sp.TS, sp.rowBytes, 1, sp.Dp, 0, KB, 0).total;
  const int wantedStates = std::max(1, sms * residentBlocks(scanStates<CB>, threads, smemStates) / (prm.HKV * prm.kGroups));
  sp.spanChunks = (prm.chunks + wantedStates - 1) / wantedStates;
  sp.spans = (prm.chunks + sp.spanChunks - 1) / sp.spanChunks;

  // The carry's per-chunk resets from the device's start flags (no host upload in the timed path).
  Tensor resetD = empty({int64_t(prm.chunks)}, DType::I32, dev);
  check(cudaMemsetAsync(resetD.ptr<int>(), 0, size_t(prm.chunks) * 4, stream), "cudaMemsetAsync");
  chunkResets<<<unsigned((prm.count + 255) / 256), 256, 0, stream>>>(prm.first, prm.count, prm.L, resetD.ptr<int>());
  const int64_t perChunk = int64_t(prm.HKV) * prm.K0 * prm.D;
  Tensor state = empty({int64_t(prm.chunks) * perChunk}, DType::F32, dev);
  Tensor enter = empty({int64_t(prm.chunks) * perChunk}, DType::F32, dev);
  Tensor crossPart = empty({int64_t(prm.spans) * prm.H * prm.K0 * prm.D}, DType::F32, dev);
  Tensor sqPart = empty({int64_t(prm.spans) * perChunk}, DType::F32, dev);
  Tensor ctxPart = empty({int64_t(prm.spans) * prm.H * prm.D * 2}, DType::F32, dev);
  Tensor rsBuf = empty({tcApply ? int64_t(prm.count) * prm.HKV * prm.RP : 1}, DType::F32, dev);
  prm.state = sp.state = rp.state = state.ptr<float>();
  prm.enter = sp.enter = rp.enter = enter.ptr<float>();
  prm.crossPart = crossPart.ptr<float>();
  prm.sqPart = sqPart.ptr<float>();
  prm.ctxPart = ctxPart.ptr<float>();
  prm.rs = rp.rs = rsBuf.ptr<float>();
  if (tcApply && prm.K0 < prm.RP)  // the m-tiles' unused decay rows: ŷ = 0 (their sums are not read)
    check(cudaMemsetAsync(rsBuf.ptr<float>(), 0, size_t(prm.count) * prm.HKV * prm.RP * 4, stream), "cudaMemsetAsync");

  const bool tc16 = prm.vType == kBF16 || prm.vType == kF16;
  const int pitch = prm.D * 2 + 16;  // 16-byte pad: the 8 rows of an ldmatrix hit distinct banks
  const int smemTC = prm.L * pitch + prm.L * 4, mTiles = (prm.K0 + 15) / 16;  // rows + token ids
  const bool statesTC = tc16 && prm.copy16 && prm.D % 16 == 0 && mTiles <= kTcMaxMTiles && smemTC <= maxSmem;
  const int tableN = mTiles * (prm.L / 16) * 32;
  Tensor table = empty({statesTC ? int64_t(tableN) * 3 * 4 : 4}, DType::I32, dev);  // lives until the launches are queued
  if (statesTC) {
    uint4* tab = reinterpret_cast<uint4*>(table.ptr<int>());
    const dim3 grid(unsigned(prm.chunks), unsigned(prm.HKV));
    const unsigned threadsTC = unsigned(32 * mTiles), blocksW = unsigned((tableN + 127) / 128);
    if (prm.vType == kBF16) {
      scanWeights<__nv_bfloat16><<<blocksW, 128, 0, stream>>>(prm.decays, prm.K0, prm.L, mTiles, tab);
      residentBlocks(scanStatesTC<__nv_bfloat16>, int(threadsTC), smemTC);
      scanStatesTC<__nv_bfloat16><<<grid, threadsTC, size_t(smemTC), stream>>>(prm, tab, pitch);
    } else {
      scanWeights<__half><<<blocksW, 128, 0, stream>>>(prm.decays, prm.K0, prm.L, mTiles, tab);
      residentBlocks(scanStatesTC<__half>, int(threadsTC), smemTC);
      scanStatesTC<__half><<<grid, threadsTC, size_t(smemTC), stream>>>(prm, tab, pitch);
    }
  } else {
    scanStates<CB><<<dim3(unsigned(sp.spans), unsigned(prm.HKV * prm.kGroups)), unsigned(threads), size_t(smemStates), stream>>>(sp);
  }
  checkLaunch("taylorMoments (scan states)");
  mark("scanStates");
  const long long nc = (long long)prm.HKV * prm.K0 * prm.D;
  scanCarry<<<unsigned((nc + 127) / 128), 128, 0, stream>>>(prm.state, prm.enter, resetD.ptr<int>(), prm.decays, prm.count, prm.L,
                                                           prm.chunks, prm.HKV, prm.K0, prm.D);
  checkLaunch("taylorMoments (scan carry)");
  mark("scanCarry");
  if (tcApply) {
    if (normRms && (prm.D == 128 || prm.D == 64)) {  // scanRmsNorm: the norm recurrence (the default where it applies)
      launchRmsNorm(prm, stream);
    } else {  // the v4 apply's sweep 1 (timed: session 5, run 5; tested: session 7, run 3)
      residentBlocks(scanApply<CB, true>, threads, smemRms);  // the chosen stage's limit
      scanApply<CB, true><<<dim3(unsigned(rp.spans), unsigned(rp.HKV * rp.kGroups)), unsigned(threads), size_t(smemRms), stream>>>(rp);
    }
    checkLaunch("taylorMoments (scan rms)");
    mark("scanRms");
    tp.s = prm;
    if (prm.vType == kBF16) launchTcE<__nv_bfloat16>(tp, smemTc, stream);
    else launchTcE<__half>(tp, smemTc, stream);
  } else {
    residentBlocks(scanApply<CB>, threads, smemApply);  // the chosen stage's limit
    scanApply<CB><<<dim3(unsigned(prm.spans), unsigned(perSpan)), unsigned(threads), size_t(smemApply), stream>>>(prm);
  }
  checkLaunch("taylorMoments (scan)");
  mark("scanApply");
  const long long nf = (long long)prm.H * prm.K0 * prm.D;
  scanSums<<<unsigned((nf + 127) / 128), 128, 0, stream>>>(prm.crossPart, prm.sqPart, prm.spans, prm.H, prm.HKV, prm.K0, prm.D,
                                                           acc.scanCross.ptr<double>(), acc.scanSq.ptr<double>());
  const int HD = prm.H * prm.D;
  contextSums<<<unsigned((HD + 127) / 128), 128, 0, stream>>>(reinterpret_cast<const float2*>(prm.ctxPart), prm.spans, HD,
                                                              acc.contextSum.ptr<double>(), acc.contextSq.ptr<double>());
  checkLaunch("taylorMoments (scan sums)");
  mark("scanSums");
}

}  // namespace

std::string scanSwitch() {
  const char* force = std::getenv("TCAL_MOMENTS_SCAN");
  const std::string forced = force ? force : "";
  if (!forced.empty() && forced != "v4" && forced != "tc" && forced != "norm")
    throwInvalid("TCAL_MOMENTS_SCAN", "expected v4, tc or norm, got '" + forced + "'");
  return forced;
}

void gammaScan(const Problem& p, const Tensor& v, const Tensor& o, const int* tok, const int* first, const std::vector<int>& hostFirst,
               const double* decays, const Accumulators& acc, cudaStream_t stream, const std::function<void(const char*)>& mark) {
  const int count = int(hostFirst.size());
  if (count == 0) return;
  const Device dev = v.device();
  const int H = int(p.H), HKV = int(p.HKV), D = int(p.D), K0 = int(p.K0()), G = H / HKV;
  if (D > 256) throwInvalid("q", "the γ₀ scan takes head dims up to 256, got " + std::to_string(D));
  const int CB = D <= 32 ? 1 : D <= 64 ? 2 : D <= 128 ? 4 : 8;
  const int KB = CB >= 8 ? 2 : 4;

  ScanParams prm{};
  prm.v = static_cast<const char*>(v.data());
  prm.o = static_cast<const char*>(o.data());
  prm.vType = codeOf(v.dtype(), "v");
  prm.oType = codeOf(o.dtype(), "context");
  prm.vSize = int(dtypeSize(v.dtype()));
  prm.oSize = int(dtypeSize(o.dtype()));
  prm.vStride = p.HKV * p.D;
  prm.oStride = p.H * p.D;
  prm.tok = tok;
  prm.first = first;
  prm.decays = decays;
  prm.count = count;
  prm.L = count >= 16384 ? 256 : 64;  // small batches: several chunks still (the tests cross chunk edges)
  prm.chunks = (count + prm.L - 1) / prm.L;
  prm.H = H;
  prm.HKV = HKV;
  prm.D = D;
  prm.Dp = 32 * CB;
  prm.K0 = K0;
  prm.G = G;
  prm.gBlocks = (G + kHeads - 1) / kHeads;
  prm.warps = std::min(kMaxWarps, (K0 + KB - 1) / KB);
  prm.kGroups = (K0 + prm.warps * KB - 1) / (prm.warps * KB);
  prm.sections = 1 + kHeads;
  prm.vBytes = D * prm.vSize;
  prm.oRowBytes = D * prm.oSize;
  prm.vPitch = (prm.vBytes + 15) / 16 * 16;
  prm.oPitch = (prm.oRowBytes + 15) / 16 * 16;
  prm.rowBytes = prm.vPitch + kHeads * prm.oPitch;
  auto aligned = [](const void* ptr, long long bytes) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && bytes % 16 == 0; };
  prm.copy16 = aligned(prm.v, (long long)prm.vBytes) && aligned(prm.o, (long long)prm.oRowBytes) && (prm.vStride * prm.vSize) % 16 == 0 &&
               (prm.oStride * prm.oSize) % 16 == 0;
  if (reinterpret_cast<uintptr_t>(prm.v) % 4 != 0 || reinterpret_cast<uintptr_t>(prm.o) % 4 != 0)
    throwInvalid("v", "the γ₀ scan needs 4-byte aligned v and context rows");

  int maxSmem = 0;
  check(cudaDeviceGetAttribute(&maxSmem, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev.index), "cudaDeviceGetAttribute");
  const int sms = std::max(1, multiprocessorCount(dev.index));
  // Σ ŷ∘o on the tensor cores (scanApplyTC) for 16-bit v and context of one type, D % 16 == 0, K0 ≤ 64, with rs from
  // scanRmsNorm where it applies (D 64 / 128), else from the kRms pass. Default: the norm path where it applies, else
  // the CUDA-core apply (session 7, run 2, bench shape: scanRmsNorm 0.188 + scanApplyTC 0.730 ms vs the CUDA-core apply
  // 1.039; the kRms pass + scanApplyTC was 1.20 in session 5, run 5). TCAL_MOMENTS_SCAN=v4 | tc | norm picks one.
  prm.MT = (K0 + 15) / 16;
  prm.RP = 16 * prm.MT;
  const std::string forced = scanSwitch();
  const bool tc16Ok = prm.vType == prm.oType && (prm.vType == kBF16 || prm.vType == kF16) && prm.copy16 && D % 16 == 0 && prm.MT <= 4;
  const bool normRms = forced == "norm" || (forced.empty() && (D == 64 || D == 128));
  const bool tcApply = (forced == "tc" || normRms) && tc16Ok;
  switch (CB) {
    case 1: launch<1>(prm, tcApply, normRms, sms, maxSmem, acc, dev, stream, mark); break;
    case 2: launch<2>(prm, tcApply, normRms, sms, maxSmem, acc, dev, stream, mark); break;
    case 4: launch<4>(prm, tcApply, normRms, sms, maxSmem, acc, dev, stream, mark); break;
    default: launch<8>(prm, tcApply, normRms, sms, maxSmem, acc, dev, stream, mark); break;
  }
}

}  // namespace tcal::cuda
