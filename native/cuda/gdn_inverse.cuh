// A = (I + M)⁻¹ of a chunk's strictly lower-triangular 64 × 64 M (DESIGN §3's UT transform), shared by the
// forward's prep (gdn_fwd_v3.cu) and the backward's kernel 1 (gdn_bwd_tc.cu).
#pragma once

#include <mma.h>

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

// The lower 16 × 16 blocks of A = (I + M)⁻¹ into A (fp32, row stride ld; blocks above the diagonal are not
// written), M (fp32, stride ld, only its strictly lower part read), T a 16 × ld fp32 scratch tile. Called by
// every thread of the block (it holds block barriers); warps 0–3 do the work. Diagonal block `warp` in
// registers: lane j (and its twin j + 16) owns column j, x[i] = A_ij, rows of M by broadcast float4 loads that do
// not depend on x; then block row I: warp J < I forms A_IJ = −A_II Σ_{J ≤ m < I} M_Im A_mJ (3×TF32) through its
// own 16 columns of T. (A 64-step substitution per column on 64 threads left the rest of the block waiting.)
__device__ __forceinline__ void blockInverse64(const float* M, float* A, float* T, int ld) {
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

}  // namespace tcal::cuda::gdn_inverse
