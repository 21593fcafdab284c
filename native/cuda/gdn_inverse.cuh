// A = (I + M)⁻¹ of a chunk's strictly lower-triangular 64 × 64 M (DESIGN §3's UT transform): blockInverse64 in the
// backward's kernel 1 (gdn_bwd_tc.cu), blockInverse64Strips in the forward's prep (gdn_fwd_v3.cu).
#pragma once

#include <mma.h>

#include <cstdint>

namespace tcal::cuda::gdn_inverse {

namespace wmma = nvcuda::wmma;

// 3×TF32 tile products for the off-diagonal blocks: x = hi + lo with both parts in tf32; hi·hi + hi·lo + lo·hi
// with fp32 accumulation is accurate to about fp32 rounding.
using TfA = wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major>;
using TfB = wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::row_major>;
using TfC = wmma::fragment<wmma::accumulator, 16, 16, 8, float>;

template <typename Frag>
__device__ __forceinline__ void splitTf32(Frag& hi, Frag& lo) {
#pragma unroll
  for (int t = 0; t < hi.num_elements; ++t) {
    const float v = hi.x[t], h = wmma::__float_to_tf32(v);
    hi.x[t] = h;
    lo.x[t] = wmma::__float_to_tf32(v - h);
  }
}
// acc += a (16 × 8, row-major at lda) · b (8 × 16, row-major at ldb), both fp32 in shared memory.
__device__ __forceinline__ void mma3xTf32(TfC& acc, const float* a, int lda, const float* b, int ldb) {
  TfA ah, al;
  TfB bh, bl;
  wmma::load_matrix_sync(ah, a, lda);
  wmma::load_matrix_sync(bh, b, ldb);
  splitTf32(ah, al);
  splitTf32(bh, bl);
  wmma::mma_sync(acc, al, bh, acc);
  wmma::mma_sync(acc, ah, bl, acc);
  wmma::mma_sync(acc, ah, bh, acc);
}

// The four diagonal 16 × 16 blocks A_II = (I + M_II)⁻¹ into A (zero above the diagonal), warp I in registers: lane j
// (and its twin j + 16) owns column j, x[i] = A_ij, rows of M by broadcast float4 loads that do not depend on x.
__device__ __forceinline__ void diagonalBlocks(const float* M, float* A, int ld) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (warp < 4) {
    const int j = lane & 15;
    const float* Mb = M + 16 * warp * ld + 16 * warp;
    float x[16];
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      float mr[16];
#pragma unroll
      for (int q4 = 0; q4 < (i + 3) / 4; ++q4) {
        const float4 v = *reinterpret_cast<const float4*>(Mb + i * ld + 4 * q4);
        mr[4 * q4] = v.x, mr[4 * q4 + 1] = v.y, mr[4 * q4 + 2] = v.z, mr[4 * q4 + 3] = v.w;
      }
      float s = 0.f;
#pragma unroll
      for (int m = 0; m < i; ++m) s += mr[m] * x[m];
      x[i] = i == j ? 1.f : (i < j ? 0.f : -s);
    }
    if (lane < 16)
#pragma unroll
      for (int i = 0; i < 16; ++i) A[(16 * warp + i) * ld + 16 * warp + j] = x[i];
  }
}

// The lower 16 × 16 blocks of A = (I + M)⁻¹ into A (fp32, row stride ld; blocks above the diagonal are not
// written), M (fp32, stride ld, only its strictly lower part read), T a 16 × ld fp32 scratch tile. Called by
// every thread of the block (it holds block barriers); warps 0–3 do the work. Diagonal block `warp` in
// registers: lane j (and its twin j + 16) owns column j, x[i] = A_ij, rows of M by broadcast float4 loads that do
// not depend on x; then block row I: warp J < I forms A_IJ = −A_II Σ_{J ≤ m < I} M_Im A_mJ (3×TF32) through its
// own 16 columns of T. (A 64-step substitution per column on 64 threads left the rest of the block waiting.)
__device__ __forceinline__ void blockInverse64(const float* M, float* A, float* T, int ld) {
  const int warp = threadIdx.x / 32;
  diagonalBlocks(M, A, ld);
  __syncthreads();
  for (int I = 1; I < 4; ++I) {
    const int J = warp;
    if (J < I) {
      TfC acc;
      wmma::fill_fragment(acc, 0.f);
      for (int m = J; m < I; ++m)
#pragma unroll
        for (int kk = 0; kk < 2; ++kk) mma3xTf32(acc, M + 16 * I * ld + 16 * m + 8 * kk, ld, A + (16 * m + 8 * kk) * ld + 16 * J, ld);
      float* Tw = T + 16 * warp;
      wmma::store_matrix_sync(Tw, acc, ld, wmma::mem_row_major);
      __syncwarp();
      TfC d;
      wmma::fill_fragment(d, 0.f);
#pragma unroll
      for (int kk = 0; kk < 2; ++kk) mma3xTf32(d, A + 16 * I * ld + 16 * I + 8 * kk, ld, Tw + 8 * kk * ld, ld);
#pragma unroll
      for (int t = 0; t < d.num_elements; ++t) d.x[t] = -d.x[t];
      wmma::store_matrix_sync(A + 16 * I * ld + 16 * J, d, ld, wmma::mem_row_major);
    }
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------------------------------------------
// The forward prep's inverse (session 8): the same A, with the off-diagonal blocks by column strips of 8 and
// mma.sync m16n8k8 tf32 on explicit shared addresses (3×TF32 as above). blockInverse64's block rows left 56–63 % of
// the warps idle at its barriers (warp 0 carried 36 of the 64 16×8×8 products in one dependent chain; H200 session 8
// ncu: 29 % of the prep's samples). Here, after the diagonal blocks,
//   U_Im = A_II M_Im for the 6 blocks I > m (12 halves of 16 × 8, 3 per warp, written over M_Im), one barrier, then
//   A_IJ = −Σ_{J ≤ m < I} U_Im A_mJ per strip of 8 columns: warps 0, 1 the strips of block column 0 (12 products),
//   warps 2, 3 one strip of block column 1 and one of block column 2 (8): each strip's chain is 3 steps of 2
//   products, its A_mJ read back as B fragments after __syncwarp, no block barrier between.
// Fragments carry the k index permuted (logical k = t ↔ column/row 2t, k = t + 4 ↔ 2t + 1 with t = lane % 4), which
// a product does not see: A operands as two 8-byte loads per lane, B operands from rows 2t, 2t + 1, which are
// conflict-free at ld ≡ 4 (mod 32).
struct Tf32A {
  uint32_t h[4], l[4];
};
struct Tf32B {
  uint32_t h[2], l[2];
};
__device__ __forceinline__ void tf32Split(float v, uint32_t& hi, uint32_t& lo) {
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(hi) : "f"(v));
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(lo) : "f"(v - __uint_as_float(hi)));
}
// A operand: the 16 × 8 block at x (row stride ld).
__device__ __forceinline__ Tf32A loadTf32A(const float* x, int ld, int lane) {
  const int g = lane / 4, t = lane % 4;
  const float2 u = *reinterpret_cast<const float2*>(x + g * ld + 2 * t);
  const float2 v = *reinterpret_cast<const float2*>(x + (g + 8) * ld + 2 * t);
  Tf32A f;
  tf32Split(u.x, f.h[0], f.l[0]);
  tf32Split(v.x, f.h[1], f.l[1]);
  tf32Split(u.y, f.h[2], f.l[2]);
  tf32Split(v.y, f.h[3], f.l[3]);
  return f;
}
// A operand already split: hi parts at x, lo parts at xl.
__device__ __forceinline__ Tf32A loadTf32A(const float* x, const float* xl, int ld, int lane) {
  const int g = lane / 4, t = lane % 4;
  const float2 u = *reinterpret_cast<const float2*>(x + g * ld + 2 * t);
  const float2 v = *reinterpret_cast<const float2*>(x + (g + 8) * ld + 2 * t);
  const float2 ul = *reinterpret_cast<const float2*>(xl + g * ld + 2 * t);
  const float2 vl = *reinterpret_cast<const float2*>(xl + (g + 8) * ld + 2 * t);
  return Tf32A{{__float_as_uint(u.x), __float_as_uint(v.x), __float_as_uint(u.y), __float_as_uint(v.y)},
               {__float_as_uint(ul.x), __float_as_uint(vl.x), __float_as_uint(ul.y), __float_as_uint(vl.y)}};
}
// B operand: the 8 × 8 block at y (row stride ld).
__device__ __forceinline__ Tf32B loadTf32B(const float* y, int ld, int lane) {
  const int g = lane / 4, t = lane % 4;
  Tf32B f;
  tf32Split(y[2 * t * ld + g], f.h[0], f.l[0]);
  tf32Split(y[(2 * t + 1) * ld + g], f.h[1], f.l[1]);
  return f;
}
__device__ __forceinline__ void mmaTf32(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
// acc += a·b in 3×TF32 (cross terms first).
__device__ __forceinline__ void mma3(float (&acc)[4], const Tf32A& a, const Tf32B& b) {
  mmaTf32(acc, a.l, b.h[0], b.h[1]);
  mmaTf32(acc, a.h, b.l[0], b.l[1]);
  mmaTf32(acc, a.h, b.h[0], b.h[1]);
}
// The 16 × 8 accumulator tile, negated, into x (row stride ld).
__device__ __forceinline__ void storeTileNeg(float* x, int ld, const float (&acc)[4], int lane) {
  const int g = lane / 4, t = lane % 4;
  *reinterpret_cast<float2*>(x + g * ld + 2 * t) = make_float2(-acc[0], -acc[1]);
  *reinterpret_cast<float2*>(x + (g + 8) * ld + 2 * t) = make_float2(-acc[2], -acc[3]);
}
// The 16 × 8 accumulator tile split into tf32 parts: hi at x, lo at xl.
__device__ __forceinline__ void storeTileSplit(float* x, float* xl, int ld, const float (&acc)[4], int lane) {
  const int g = lane / 4, t = lane % 4;
  uint32_t h[4], l[4];
#pragma unroll
  for (int e = 0; e < 4; ++e) tf32Split(acc[e], h[e], l[e]);
  *reinterpret_cast<float2*>(x + g * ld + 2 * t) = make_float2(__uint_as_float(h[0]), __uint_as_float(h[1]));
  *reinterpret_cast<float2*>(x + (g + 8) * ld + 2 * t) = make_float2(__uint_as_float(h[2]), __uint_as_float(h[3]));
  *reinterpret_cast<float2*>(xl + g * ld + 2 * t) = make_float2(__uint_as_float(l[0]), __uint_as_float(l[1]));
  *reinterpret_cast<float2*>(xl + (g + 8) * ld + 2 * t) = make_float2(__uint_as_float(l[2]), __uint_as_float(l[3]));
}
// Strip of block column J at column c (and for J = 1 a second one of block column 2 at c + 16): A_IJ for I > J.
template <int J>
__device__ __forceinline__ void columnStrips(const float* U, float* A, int ld, int c, int lane) {
  float acc[3 - J][4], accX[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
  for (int r = 0; r < 3 - J; ++r)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[r][e] = 0.f;
#pragma unroll
  for (int m = J; m < 3; ++m) {
    const bool x = J == 1 && m == 2;  // the block-column-2 strip's only product, U_32 A_22, shares U_32
    Tf32B b[2], bx[2];
#pragma unroll
    for (int kk = 0; kk < 2; ++kk) {
      b[kk] = loadTf32B(A + (16 * m + 8 * kk) * ld + c, ld, lane);
      if (x) bx[kk] = loadTf32B(A + (16 * m + 8 * kk) * ld + c + 16, ld, lane);
    }
#pragma unroll
    for (int I = m + 1; I < 4; ++I)  // I = m + 1 first: the next step waits for it
#pragma unroll
      for (int kk = 0; kk < 2; ++kk) {
        const Tf32A a = loadTf32A(U + 16 * I * ld + 16 * m + 8 * kk, U + 16 * m * ld + 16 * I + 8 * kk, ld, lane);
        mma3(acc[I - 1 - J], a, b[kk]);
        if (x) mma3(accX, a, bx[kk]);
      }
    storeTileNeg(A + 16 * (m + 1) * ld + c, ld, acc[m - J], lane);
    if (m < 2) __syncwarp();  // A_{m+1,J} is the next step's B operand, written by other lanes
  }
  if constexpr (J == 1) storeTileNeg(A + 48 * ld + c + 16, ld, accX, lane);
}

// As blockInverse64 (A's lower blocks; called by every thread of the block, warps 0–3 work), but M's blocks off the
// diagonal are overwritten (U_Im's tf32 hi parts over M_Im, its lo parts in block (m, I) above the diagonal, so
// that each U element is split once, not once per reading warp) and no scratch tile is used.
__device__ __forceinline__ void blockInverse64Strips(float* M, float* A, int ld) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  diagonalBlocks(M, A, ld);
  __syncthreads();
  if (warp < 4) {  // U halves t = 3 warp … 3 warp + 2 in the order (I, m, half): (1,0,0), (1,0,1), (2,0,0), …, (3,2,1)
    Tf32A a[2];
    int Ia = 0;
#pragma unroll
    for (int u = 0; u < 3; ++u) {
      const int t = 3 * warp + u, p = t / 2, h = t % 2;
      const int I = p < 1 ? 1 : p < 3 ? 2 : 3, m = p - I * (I - 1) / 2;
      if (I != Ia) {  // warp 0 changes I once, the others never
        Ia = I;
#pragma unroll
        for (int kk = 0; kk < 2; ++kk) a[kk] = loadTf32A(A + 16 * I * ld + 16 * I + 8 * kk, ld, lane);
      }
      float* y = M + 16 * I * ld + 16 * m + 8 * h;  // M_Im's half, read then overwritten by this warp only
      float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int kk = 0; kk < 2; ++kk) mma3(acc, a[kk], loadTf32B(y + 8 * kk * ld, ld, lane));
      storeTileSplit(y, M + 16 * m * ld + 16 * I + 8 * h, ld, acc, lane);
    }
  }
  __syncthreads();
  if (warp < 2)
    columnStrips<0>(M, A, ld, 8 * warp, lane);
  else if (warp < 4)
    columnStrips<1>(M, A, ld, 8 * warp, lane);
  __syncthreads();
}

}  // namespace tcal::cuda::gdn_inverse
