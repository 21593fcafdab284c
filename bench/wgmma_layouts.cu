// Microtest of the wgmma layouts that the GDN forward's wgmma state pass (native/cuda/gdn_fwd_v3.cu, ringWgKernel)
// relies on, each against a double-precision product on the host: an MN-major B of 128 columns in two swizzled halves
// (the state update; leading byte offset 8 KB right, 1 KB wrong on purpose), the same as two 64-column products, the
// lower 16 × 16 blocks of a K-major tile with garbage above them, by products of 64 / 48 / 32 / 16 columns from
// offset starts (the kernel takes one 16-column product per block instead: ptxas serialised these), and a K-major B
// whose k runs over two swizzled halves (Pᵀ = Sᵀ K̃ᵀ). Not part of the addon; built and run by hand on an sm_90a host:
//   nvcc -arch=sm_90a -std=c++17 -I native/cuda -o /tmp/wgmma_layouts bench/wgmma_layouts.cu && /tmp/wgmma_layouts
// Prints PASS / FAIL per case (the "lbo=1024" case is expected to FAIL); exit status 1 if any other case fails.
#include <cstdio>
#include <cstdlib>
#include <cmath>
#include <vector>
#include <cuda_bf16.h>
#include "wgmma.cuh"
using namespace tcal::cuda;
typedef __nv_bfloat16 T;
__device__ unsigned sa(const void* p) { return unsigned(__cvta_generic_to_shared(p)); }
// element (r, c) of a [rows][64] SW128 tile
__device__ int swz(int r, int c) { return r * 64 + (((c >> 3) ^ (r & 7)) << 3) + (c & 7); }
__device__ unsigned pk(float a, float b) { __nv_bfloat162 v = __floats2bfloat162_rn(a, b); return *reinterpret_cast<unsigned*>(&v); }
// A: [64][kdim] floats (row-major); frag for k-step ks
__device__ void frag(unsigned (&a)[4], const float* A, int kdim, int ks) {
  int lane = threadIdx.x % 32, w = threadIdx.x / 32, g = lane / 4, t = lane % 4;
  int r0 = 16 * w + g, r1 = r0 + 8, c0 = 16 * ks + 2 * t, c1 = c0 + 8;
  a[0] = pk(A[r0 * kdim + c0], A[r0 * kdim + c0 + 1]);
  a[1] = pk(A[r1 * kdim + c0], A[r1 * kdim + c0 + 1]);
  a[2] = pk(A[r0 * kdim + c1], A[r0 * kdim + c1 + 1]);
  a[3] = pk(A[r1 * kdim + c1], A[r1 * kdim + c1 + 1]);
}
__device__ void storeD(float* D, int ldd, const float* d, int nblocks, int nb0) {
  int lane = threadIdx.x % 32, w = threadIdx.x / 32, g = lane / 4, t = lane % 4;
  int r0 = 16 * w + g, r1 = r0 + 8;
  for (int j = 0; j < nblocks; ++j) {
    int c = 8 * (nb0 + j) + 2 * t;
    D[r0 * ldd + c] = d[4 * j]; D[r0 * ldd + c + 1] = d[4 * j + 1];
    D[r1 * ldd + c] = d[4 * j + 2]; D[r1 * ldd + c + 1] = d[4 * j + 3];
  }
}
// mode 0: MN-major N=128 one instr (lbo); mode 1: MN-major two N=64; mode 2: K-major variable N (Ab-like);
// mode 3: K-major two halves along K (P-like)
__global__ void k(int mode, unsigned lbo, const float* A, const float* B, float* D) {
  extern __shared__ __align__(1024) unsigned char smraw[];
  unsigned char* sm = smraw + ((1024u - (sa(smraw) & 1023u)) & 1023u);
  T* tile = reinterpret_cast<T*>(sm);
  int tid = threadIdx.x;
  if (mode <= 1) {  // B [64 k][128 n] → halves [64][64]
    for (int i = tid; i < 64 * 128; i += 128) { int r = i / 128, c = i % 128; tile[(c / 64) * 4096 + swz(r, c % 64)] = __float2bfloat16(B[i]); }
  } else if (mode == 2) {  // Ab [64 n][64 k]
    for (int i = tid; i < 64 * 64; i += 128) { int r = i / 64, c = i % 64; tile[swz(r, c)] = __float2bfloat16(B[i]); }
  } else {  // K [64 n][128 k] → halves
    for (int i = tid; i < 64 * 128; i += 128) { int r = i / 128, c = i % 128; tile[(c / 64) * 4096 + swz(r, c % 64)] = __float2bfloat16(B[i]); }
  }
  wg::fenceProxy();
  __syncthreads();
  unsigned base = sa(tile);
  if (mode == 0) {
    float d[64] = {};
    unsigned a[4][4];
    for (int ks = 0; ks < 4; ++ks) frag(a[ks], A, 64, ks);
    wg::fence();
    for (int ks = 0; ks < 4; ++ks) wg::mmaRS<T, 128, 1>(d, a[ks], wg::descMN(base + 2048 * ks, lbo), 1);
    wg::commit(); wg::wait0(); for (int i = 0; i < 64; ++i) asm volatile("" : "+f"(d[i])::"memory");
    storeD(D, 128, d, 16, 0);
  } else if (mode == 1) {
    float d[64] = {};
    unsigned a[4][4];
    for (int ks = 0; ks < 4; ++ks) frag(a[ks], A, 64, ks);
    wg::fence();
    for (int ks = 0; ks < 4; ++ks) {
      wg::mmaRS<T, 64, 1>(d, a[ks], wg::descMN(base + 2048 * ks, lbo), 1);
      wg::mmaRS<T, 64, 1>(d + 32, a[ks], wg::descMN(base + 8192 + 2048 * ks, lbo), 1);
    }
    wg::commit(); wg::wait0(); for (int i = 0; i < 64; ++i) asm volatile("" : "+f"(d[i])::"memory");
    storeD(D, 128, d, 16, 0);
  } else if (mode == 2) {
    float d[32] = {};
    unsigned a[4][4];
    for (int ks = 0; ks < 4; ++ks) frag(a[ks], A, 64, ks);
    wg::fence();
    wg::mmaRS<T, 64, 0>(d, a[0], wg::desc(base), 1);
    wg::mmaRS<T, 48, 0>(d + 8, a[1], wg::desc(base + 2048 + 32), 1);
    wg::mmaRS<T, 32, 0>(d + 16, a[2], wg::desc(base + 4096 + 64), 1);
    wg::mmaRS<T, 16, 0>(d + 24, a[3], wg::desc(base + 6144 + 96), 1);
    wg::commit(); wg::wait0(); for (int i = 0; i < 32; ++i) asm volatile("" : "+f"(d[i])::"memory");
    storeD(D, 64, d, 8, 0);
  } else {
    float d[32];
    unsigned a[8][4];
    for (int ks = 0; ks < 8; ++ks) frag(a[ks], A, 128, ks);
    wg::fence();
    for (int ks = 0; ks < 8; ++ks) wg::mmaRS<T, 64, 0>(d, a[ks], wg::desc(base + (ks / 4) * 8192 + 32 * (ks % 4)), ks > 0);
    wg::commit(); wg::wait0(); for (int i = 0; i < 32; ++i) asm volatile("" : "+f"(d[i])::"memory");
    storeD(D, 64, d, 8, 0);
  }
}
static float bfr(float x) { return __bfloat162float(__float2bfloat16(x)); }
int main() {
  srand(7);
  auto rnd = [] { return bfr(float(rand()) / RAND_MAX * 2 - 1); };
  int fails = 0;
  struct Case { int mode; unsigned lbo; const char* name; };
  Case cases[] = {{0, 8192, "MN N=128 lbo=8192"}, {0, 1024, "MN N=128 lbo=1024"}, {1, 8192, "MN 2xN=64"}, {2, 0, "K varN (Ab)"}, {3, 0, "K 2 halves (P)"}};
  for (auto c : cases) {
    int M = 64, Kd = c.mode == 3 ? 128 : 64, N = c.mode <= 1 ? 128 : 64;
    std::vector<float> A(M * Kd), B(c.mode <= 1 ? 64 * 128 : c.mode == 2 ? 64 * 64 : 64 * 128), D(M * N, NAN), E(M * N, 0);
    for (auto& x : A) x = rnd();
    for (auto& x : B) x = rnd();
    if (c.mode == 2)  // garbage above the diagonal blocks (must not be read)
      for (int r = 0; r < 64; ++r) for (int cc = 0; cc < 64; ++cc) if (cc / 16 > r / 16) B[r * 64 + cc] = 1e30f;
    for (int m = 0; m < M; ++m) for (int n = 0; n < N; ++n) {
      double s = 0;
      for (int kk = 0; kk < Kd; ++kk) {
        double b;
        if (c.mode <= 1) b = B[kk * 128 + n];
        else if (c.mode == 2) { if (kk / 16 > n / 16) continue; b = B[n * 64 + kk]; }
        else b = B[n * 128 + kk];
        s += double(A[m * Kd + kk]) * b;
      }
      E[m * N + n] = float(s);
    }
    float *dA, *dB, *dD;
    cudaMalloc(&dA, A.size() * 4); cudaMalloc(&dB, B.size() * 4); cudaMalloc(&dD, D.size() * 4);
    cudaMemcpy(dA, A.data(), A.size() * 4, cudaMemcpyHostToDevice);
    cudaMemcpy(dB, B.data(), B.size() * 4, cudaMemcpyHostToDevice);
    cudaMemcpy(dD, D.data(), D.size() * 4, cudaMemcpyHostToDevice);
    cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, 40000);
    k<<<1, 128, 40000>>>(c.mode, c.lbo, dA, dB, dD);
    cudaError_t e = cudaDeviceSynchronize();
    cudaMemcpy(D.data(), dD, D.size() * 4, cudaMemcpyDeviceToHost);
    double err = 0, ref = 0;
    for (size_t i = 0; i < D.size(); ++i) { err = fmax(err, fabs(double(D[i]) - E[i])); ref = fmax(ref, fabs(double(E[i]))); if (std::isnan(D[i])) err = INFINITY; }
    bool ok = e == cudaSuccess && err <= 1e-3 * ref;
    fails += !ok;
    printf("%-20s %s  max err %.3g (ref %.3g) %s\n", c.name, ok ? "PASS" : "FAIL", err, ref, cudaGetErrorString(e));
    if (e != cudaSuccess) return 2;
    cudaFree(dA); cudaFree(dB); cudaFree(dD);
  }
  return fails > 1 ? 1 : 0;  // the lbo = 1024 case fails by design
}
