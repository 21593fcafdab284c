#include <cfloat>

#include "check.h"
#include "device.h"
#include "layers.h"
#include "types.cuh"

namespace tcal::cuda {

namespace {
constexpr int kThreads = 256;

__device__ float blockReduceSum(float v, float* shared) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  __syncthreads();
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  float r = 0;
  for (int i = 0; i < int(blockDim.x / 32); ++i) r += shared[i];
  return r;
}

__device__ float blockReduceMax(float v, float* shared) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  __syncthreads();
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  float r = -FLT_MAX;
  for (int i = 0; i < int(blockDim.x / 32); ++i) r = fmaxf(r, shared[i]);
  return r;
}

// One block per row.
template <typename T>
__global__ void rmsNormKernel(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ y, int64_t d,
                              float eps) {
  __shared__ float red[32];
  const T* xr = x + blockIdx.x * d;
  T* yr = y + blockIdx.x * d;
  float ss = 0;
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
    float v = toF(xr[i]);
    ss += v * v;
  }
  ss = blockReduceSum(ss, red);
  float inv = rsqrtf(ss / float(d) + eps);
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x) yr[i] = fromF<T>(toF(xr[i]) * inv * toF(w[i]));
}

// One thread per (b·t, h, j) pair.
template <typename T>
__global__ void ropeKernel(const T* __restrict__ x, const int32_t* __restrict__ pos, const float* __restrict__ inv,
                           T* __restrict__ y, int64_t bt, int64_t H, int64_t D) {
  int64_t half = D / 2, n = bt * H * half;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    int64_t j = i % half, h = (i / half) % H, r = i / (half * H);
    float angle = float(pos[r]) * inv[j];
    float s, c;
    sincosf(angle, &s, &c);
    int64_t base = (r * H + h) * D;
    float x1 = toF(x[base + j]), x2 = toF(x[base + j + half]);
    y[base + j] = fromF<T>(x1 * c - x2 * s);
    y[base + j + half] = fromF<T>(x2 * c + x1 * s);
  }
}

__global__ void embeddingKernel(const char* __restrict__ table, const int32_t* __restrict__ ids, char* __restrict__ out,
                                int64_t n, int64_t rowBytes, int64_t vocab) {
  // 16-byte copies when rows allow it (they do for D a multiple of 8 in 16-bit types).
  int64_t i = blockIdx.x;
  if (i >= n) return;
  int64_t id = min(max(int64_t(ids[i]), int64_t(0)), vocab - 1);
  const char* src = table + id * rowBytes;
  char* dst = out + i * rowBytes;
  if (rowBytes % 16 == 0) {
    for (int64_t b = threadIdx.x * 16; b < rowBytes; b += blockDim.x * 16)
      *reinterpret_cast<int4*>(dst + b) = *reinterpret_cast<const int4*>(src + b);
  } else {
    for (int64_t b = threadIdx.x; b < rowBytes; b += blockDim.x) dst[b] = src[b];
  }
}

template <typename T>
__global__ void swigluKernel(const T* __restrict__ g, const T* __restrict__ u, T* __restrict__ o, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    float gv = toF(g[i]);
    o[i] = fromF<T>(gv / (1.0f + __expf(-gv)) * toF(u[i]));
  }
}

template <typename T>
__global__ void crossEntropyKernel(const T* __restrict__ logits, const int32_t* __restrict__ targets,
                                   float* __restrict__ loss, int64_t V) {
  __shared__ float red[32];
  const T* row = logits + blockIdx.x * V;
  int32_t t = targets[blockIdx.x];
  float m = -FLT_MAX;
  for (int64_t i = threadIdx.x; i < V; i += blockDim.x) m = fmaxf(m, toF(row[i]));
  m = blockReduceMax(m, red);
  float z = 0;
  for (int64_t i = threadIdx.x; i < V; i += blockDim.x) z += __expf(toF(row[i]) - m);
  z = blockReduceSum(z, red);
  if (threadIdx.x == 0) loss[blockIdx.x] = (t < 0 || t >= V) ? 0.0f : m + logf(z) - toF(row[t]);
}
}  // namespace

void rmsNorm(const Tensor& x, const Tensor& w, double eps, const Tensor& y) {
  cudaStream_t s = use(x.device().index);
  int64_t d = w.numel(), rows = x.numel() / std::max<int64_t>(d, 1);
  if (rows == 0) return;
  dispatchDeviceFloat(x.dtype(), "x", [&](auto tag) {
    using T = typename decltype(tag)::type;
    int threads = d >= 1024 ? 512 : (d >= 256 ? 256 : 128);
    rmsNormKernel<T><<<unsigned(rows), threads, 0, s>>>(x.ptr<T>(), w.ptr<T>(), y.ptr<T>(), d, float(eps));
    checkLaunch("rmsNorm");
  });
}

void rope(const Tensor& x, const Tensor& positions, const Tensor& invFreq, const Tensor& y) {
  cudaStream_t s = use(x.device().index);
  int64_t bt = x.dim(0) * x.dim(1), H = x.dim(2), D = x.dim(3);
  if (bt * H * D == 0) return;
  dispatchDeviceFloat(x.dtype(), "x", [&](auto tag) {
    using T = typename decltype(tag)::type;
    ropeKernel<T><<<gridFor(bt * H * D / 2, kThreads), kThreads, 0, s>>>(
        x.ptr<T>(), positions.ptr<int32_t>(), invFreq.ptr<float>(), y.ptr<T>(), bt, H, D);
    checkLaunch("rope");
  });
}

void embedding(const Tensor& table, const Tensor& ids, const Tensor& out) {
  cudaStream_t s = use(table.device().index);
  int64_t n = ids.numel();
  if (n == 0) return;
  int64_t rowBytes = table.dim(1) * int64_t(dtypeSize(table.dtype()));
  embeddingKernel<<<unsigned(n), 128, 0, s>>>(static_cast<const char*>(table.data()), ids.ptr<int32_t>(),
                                              static_cast<char*>(out.data()), n, rowBytes, table.dim(0));
  checkLaunch("embedding");
}

void swiglu(const Tensor& gate, const Tensor& up, const Tensor& out) {
  cudaStream_t s = use(gate.device().index);
  int64_t n = gate.numel();
  if (n == 0) return;
  dispatchDeviceFloat(gate.dtype(), "gate", [&](auto tag) {
    using T = typename decltype(tag)::type;
    swigluKernel<T><<<gridFor(n, kThreads), kThreads, 0, s>>>(gate.ptr<T>(), up.ptr<T>(), out.ptr<T>(), n);
    checkLaunch("swiglu");
  });
}

void crossEntropy(const Tensor& logits, const Tensor& targets, const Tensor& loss) {
  cudaStream_t s = use(logits.device().index);
  int64_t V = logits.dim(-1), rows = logits.numel() / std::max<int64_t>(V, 1);
  if (rows == 0) return;
  dispatchDeviceFloat(logits.dtype(), "logits", [&](auto tag) {
    using T = typename decltype(tag)::type;
    crossEntropyKernel<T><<<unsigned(rows), 512, 0, s>>>(logits.ptr<T>(), targets.ptr<int32_t>(), loss.ptr<float>(), V);
    checkLaunch("crossEntropy");
  });
}

}  // namespace tcal::cuda
