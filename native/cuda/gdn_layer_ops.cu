#include <type_traits>

#include "../core/runtime.h"
#include "check.h"
#include "device.h"
#include "gdn_layer_ops.h"
#include "types.cuh"

namespace tcal::cuda {

namespace {
constexpr int kThreads = 256;
constexpr int kMaxTaps = 8;  // the conv's kernel size on CUDA (fla uses 4)

template <typename T>
using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename A>
__device__ __forceinline__ A sigmoidOf(A x) {
  return A(1) / (A(1) + exp(-x));
}

template <typename T, typename A>
__device__ __forceinline__ T store(A v) {
  if constexpr (std::is_same_v<T, double>)
    return v;
  else
    return fromF<T>(float(v));
}

// The sequence [begin, end) holding token t (binary search over the N+1 offsets); {0, 0} past offsets[N].
__device__ __forceinline__ void spanOf(const int32_t* off, int N, int64_t t, int64_t& begin, int64_t& end) {
  if (t >= off[N]) {
    begin = end = 0;
    return;
  }
  int lo = 0, hi = N;  // off[lo] ≤ t < off[hi]
  while (hi - lo > 1) {
    int mid = (lo + hi) / 2;
    if (off[mid] <= t)
      lo = mid;
    else
      hi = mid;
  }
  begin = off[lo];
  end = off[hi];
}

template <typename T>
__global__ void convForwardKernel(const T* __restrict__ x, const T* __restrict__ w, const int32_t* __restrict__ off,
                                  int N, T* __restrict__ y, int64_t tokens, int64_t C, int W) {
  using A = Acc<T>;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < tokens * C;
       idx += int64_t(gridDim.x) * blockDim.x) {
    int64_t t = idx / C, c = idx % C, b, e;
    spanOf(off, N, t, b, e);
    A acc = 0;
    for (int j = 0; j < W; ++j) {
      int64_t src = t - (W - 1) + j;
      if (src >= b && src < e) acc += A(toF(w[c * W + j])) * A(toF(x[src * C + c]));
    }
    y[idx] = store<T>(acc);
  }
}

template <typename T>
__global__ void convDxKernel(const T* __restrict__ dy, const T* __restrict__ w, const int32_t* __restrict__ off, int N,
                             T* __restrict__ dx, int64_t tokens, int64_t C, int W) {
  using A = Acc<T>;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < tokens * C;
       idx += int64_t(gridDim.x) * blockDim.x) {
    int64_t t = idx / C, c = idx % C, b, e;
    spanOf(off, N, t, b, e);
    A acc = 0;
    for (int j = 0; j < W; ++j) {
      int64_t dst = t + (W - 1) - j;
      if (dst < e) acc += A(toF(w[c * W + j])) * A(toF(dy[dst * C + c]));
    }
    dx[idx] = store<T>(acc);
  }
}

// dw partials: block (channel block, token chunk) → partial[chunk, c, j] = Σ_{t in chunk} dy[t,c]·x[t−(W−1)+j, c].
template <typename T>
__global__ void convDwPartialKernel(const T* __restrict__ x, const T* __restrict__ dy, const int32_t* __restrict__ off,
                                    int N, Acc<T>* __restrict__ partial, int64_t tokens, int64_t C, int W, int64_t chunk) {
  using A = Acc<T>;
  int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (c >= C) return;
  A acc[kMaxTaps];
  for (int j = 0; j < kMaxTaps; ++j) acc[j] = 0;
  int64_t t0 = blockIdx.y * chunk, t1 = min(tokens, t0 + chunk);
  for (int64_t t = t0; t < t1; ++t) {
    int64_t b, e;
    spanOf(off, N, t, b, e);
    if (e == 0) continue;
    A g = A(toF(dy[t * C + c]));
#pragma unroll
    for (int j = 0; j < kMaxTaps; ++j) {
      int64_t src = t - (W - 1) + j;
      if (j < W && src >= b) acc[j] += g * A(toF(x[src * C + c]));
    }
  }
  A* out = partial + blockIdx.y * C * W + c * W;
  for (int j = 0; j < W; ++j) out[j] = acc[j];
}

// out[i] = (accumulate ? out[i] : 0) + Σ_p partial[p, i], in order of p.
template <typename A>
__global__ void sumPartials(const A* __restrict__ partial, A* __restrict__ out, int64_t parts, int64_t n, bool accumulate) {
  int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  A acc = 0;
  for (int64_t p = 0; p < parts; ++p) acc += partial[p * n + i];
  out[i] = accumulate ? out[i] + acc : acc;
}

template <typename A>
__device__ __forceinline__ A warpSum(A v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// One warp per row: y = x·inv·w ⊙ silu(gate).
template <typename T>
__global__ void gatedNormKernel(const T* x, const T* __restrict__ w, const T* gate, T* y, int64_t rows, int64_t d, Acc<T> eps) {
  using A = Acc<T>;
  int64_t r = blockIdx.x * int64_t(blockDim.x / 32) + threadIdx.x / 32;
  int lane = threadIdx.x % 32;
  if (r >= rows) return;
  const T* xr = x + r * d;
  A ss = 0;
  for (int64_t i = lane; i < d; i += 32) ss += A(toF(xr[i])) * A(toF(xr[i]));
  A inv = A(1) / sqrt(warpSum(ss) / A(d) + eps);
  for (int64_t i = lane; i < d; i += 32) {
    A g = A(toF(gate[r * d + i]));
    y[r * d + i] = store<T>(A(toF(xr[i])) * inv * A(toF(w[i])) * g * sigmoidOf(g));
  }
}

// Backward pass 1, one warp per row: stats[r] = {inv, inv³/d · Σ u·x} with u = dy ⊙ silu(gate) ⊙ w.
template <typename T>
__global__ void gatedNormStatsKernel(const T* x, const T* __restrict__ w, const T* gate, const T* dy, Acc<T>* __restrict__ stats,
                                     int64_t rows, int64_t d, Acc<T> eps) {
  using A = Acc<T>;
  int64_t r = blockIdx.x * int64_t(blockDim.x / 32) + threadIdx.x / 32;
  int lane = threadIdx.x % 32;
  if (r >= rows) return;
  A ss = 0, dot = 0;
  for (int64_t i = lane; i < d; i += 32) {
    A xv = A(toF(x[r * d + i])), g = A(toF(gate[r * d + i]));
    ss += xv * xv;
    dot += A(toF(dy[r * d + i])) * g * sigmoidOf(g) * A(toF(w[i])) * xv;
  }
  ss = warpSum(ss);
  dot = warpSum(dot);
  if (lane == 0) {
    A inv = A(1) / sqrt(ss / A(d) + eps);
    stats[2 * r] = inv;
    stats[2 * r + 1] = inv * inv * inv * dot / A(d);
  }
}

// Backward pass 2, block (column block, row chunk): each thread owns a column over the chunk's rows, writes dx and
// dGate (reading each element before writing it, so outputs may alias inputs) and its dw partial.
template <typename T>
__global__ void gatedNormColumnsKernel(const T* x, const T* __restrict__ w, const T* gate, const T* dy,
                                       const Acc<T>* __restrict__ stats, T* dx, T* dGate, Acc<T>* __restrict__ partial,
                                       int64_t rows, int64_t d, int64_t chunk) {
  using A = Acc<T>;
  int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= d) return;
  A wv = A(toF(w[i])), acc = 0;
  int64_t r0 = blockIdx.y * chunk, r1 = min(rows, r0 + chunk);
  for (int64_t r = r0; r < r1; ++r) {
    int64_t k = r * d + i;
    A xv = A(toF(x[k])), g = A(toF(gate[k])), o = A(toF(dy[k])), sg = sigmoidOf(g);
    A inv = stats[2 * r], c = stats[2 * r + 1];
    acc += o * xv * inv * g * sg;
    dx[k] = store<T>(inv * o * g * sg * wv - c * xv);
    dGate[k] = store<T>(o * xv * inv * wv * sg * (A(1) + g * (A(1) - sg)));
  }
  partial[blockIdx.y * d + i] = acc;
}

template <typename T>
__global__ void siluKernel(const T* x, T* y, int64_t n) {
  using A = Acc<T>;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    A v = A(toF(x[i]));
    y[i] = store<T>(v * sigmoidOf(v));
  }
}

template <typename T>
__global__ void siluBackwardKernel(const T* x, const T* dy, T* dx, int64_t n) {
  using A = Acc<T>;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    A v = A(toF(x[i])), sg = sigmoidOf(v);
    dx[i] = store<T>(A(toF(dy[i])) * sg * (A(1) + v * (A(1) - sg)));
  }
}

Tensor deviceOffsets(const std::vector<int32_t>& host, Device dev) {
  Tensor t = empty({int64_t(host.size())}, DType::I32, dev);
  copyFromHost(t, host.data(), host.size() * sizeof(int32_t));
  return t;
}

void checkTaps(const Tensor& w) {
  if (w.dim(-1) > kMaxTaps)
    throwInvalid("weight", "CUDA kernels take a kernel size of at most " + std::to_string(kMaxTaps) + ", got " +
                               std::to_string(w.dim(-1)));
}

// Row chunks for parameter-gradient partials depend on the shape only (never on the device): reproducible sums.
int64_t chunkFor(int64_t rows) { return std::max<int64_t>(1, (rows + 127) / 128); }

}  // namespace

void causalConv1d(const Tensor& x, const Tensor& w, const std::vector<int32_t>& offsets, const Tensor& y) {
  checkTaps(w);
  const int64_t C = x.dim(-1), tokens = x.numel() / std::max<int64_t>(C, 1);
  if (tokens * C == 0) return;
  Device dev = x.device();
  cudaStream_t s = use(dev.index);
  Tensor off = deviceOffsets(offsets, dev);
  dispatchDeviceFloat(x.dtype(), "x", [&](auto tag) {
    using T = typename decltype(tag)::type;
    convForwardKernel<T><<<gridFor(tokens * C, kThreads), kThreads, 0, s>>>(
        x.ptr<T>(), w.ptr<T>(), off.ptr<int32_t>(), int(offsets.size() - 1), y.ptr<T>(), tokens, C, int(w.dim(-1)));
    checkLaunch("causalConv1d");
  });
}

void causalConv1dBackward(const Tensor& x, const Tensor& w, const Tensor& dy, const std::vector<int32_t>& offsets,
                          bool accumulate, const Tensor& dx, const Tensor& dw) {
  checkTaps(w);
  const int64_t C = x.dim(-1), tokens = x.numel() / std::max<int64_t>(C, 1), W = w.dim(-1);
  Device dev = x.device();
  cudaStream_t s = use(dev.index);
  if (C == 0) return;
  if (tokens == 0) {
    if (!accumulate) check(cudaMemsetAsync(dw.data(), 0, dw.nbytes(), s), "causalConv1dBackward");
    return;
  }
  Tensor off = deviceOffsets(offsets, dev);
  const int N = int(offsets.size() - 1);
  dispatchDeviceFloat(x.dtype(), "x", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = Acc<T>;
    convDxKernel<T><<<gridFor(tokens * C, kThreads), kThreads, 0, s>>>(dy.ptr<T>(), w.ptr<T>(), off.ptr<int32_t>(), N,
                                                                       dx.ptr<T>(), tokens, C, int(W));
    checkLaunch("causalConv1dBackward");
    const int64_t chunk = chunkFor(tokens), parts = (tokens + chunk - 1) / chunk;
    Tensor partial = empty({parts, C * W}, std::is_same_v<A, double> ? DType::F64 : DType::F32, dev);
    dim3 grid(unsigned((C + kThreads - 1) / kThreads), unsigned(parts));
    convDwPartialKernel<T><<<grid, kThreads, 0, s>>>(x.ptr<T>(), dy.ptr<T>(), off.ptr<int32_t>(), N, partial.ptr<A>(),
                                                     tokens, C, int(W), chunk);
    checkLaunch("causalConv1dBackward");
    sumPartials<A><<<gridFor(C * W, kThreads), kThreads, 0, s>>>(partial.ptr<A>(), dw.ptr<A>(), parts, C * W, accumulate);
    checkLaunch("causalConv1dBackward");
  });
}

void gatedRmsNorm(const Tensor& x, const Tensor& w, const Tensor& gate, double eps, const Tensor& y) {
  const int64_t d = w.numel(), rows = x.numel() / std::max<int64_t>(d, 1);
  if (rows * d == 0) return;
  cudaStream_t s = use(x.device().index);
  dispatchDeviceFloat(x.dtype(), "x", [&](auto tag) {
    using T = typename decltype(tag)::type;
    gatedNormKernel<T><<<unsigned((rows + 3) / 4), 128, 0, s>>>(x.ptr<T>(), w.ptr<T>(), gate.ptr<T>(), y.ptr<T>(), rows, d,
                                                                 Acc<T>(eps));
    checkLaunch("gatedRmsNorm");
  });
}

void gatedRmsNormBackward(const Tensor& x, const Tensor& w, const Tensor& gate, const Tensor& dy, double eps,
                          bool accumulate, const Tensor& dx, const Tensor& dw, const Tensor& dGate) {
  const int64_t d = w.numel(), rows = x.numel() / std::max<int64_t>(d, 1);
  Device dev = x.device();
  cudaStream_t s = use(dev.index);
  if (d == 0) return;
  if (rows == 0) {
    if (!accumulate) check(cudaMemsetAsync(dw.data(), 0, dw.nbytes(), s), "gatedRmsNormBackward");
    return;
  }
  dispatchDeviceFloat(x.dtype(), "x", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = Acc<T>;
    DType accType = std::is_same_v<A, double> ? DType::F64 : DType::F32;
    const int64_t chunk = chunkFor(rows), parts = (rows + chunk - 1) / chunk;
    Tensor stats = empty({rows, 2}, accType, dev);
    Tensor partial = empty({parts, d}, accType, dev);
    gatedNormStatsKernel<T><<<unsigned((rows + 3) / 4), 128, 0, s>>>(x.ptr<T>(), w.ptr<T>(), gate.ptr<T>(), dy.ptr<T>(),
                                                                      stats.ptr<A>(), rows, d, A(eps));
    checkLaunch("gatedRmsNormBackward");
    dim3 grid(unsigned((d + kThreads - 1) / kThreads), unsigned(parts));
    gatedNormColumnsKernel<T><<<grid, kThreads, 0, s>>>(x.ptr<T>(), w.ptr<T>(), gate.ptr<T>(), dy.ptr<T>(), stats.ptr<A>(),
                                                        dx.ptr<T>(), dGate.ptr<T>(), partial.ptr<A>(), rows, d, chunk);
    checkLaunch("gatedRmsNormBackward");
    sumPartials<A><<<gridFor(d, kThreads), kThreads, 0, s>>>(partial.ptr<A>(), dw.ptr<A>(), parts, d, accumulate);
    checkLaunch("gatedRmsNormBackward");
  });
}

void silu(const Tensor& x, const Tensor& y) {
  const int64_t n = x.numel();
  if (n == 0) return;
  cudaStream_t s = use(x.device().index);
  dispatchDeviceFloat(x.dtype(), "x", [&](auto tag) {
    using T = typename decltype(tag)::type;
    siluKernel<T><<<gridFor(n, kThreads), kThreads, 0, s>>>(x.ptr<T>(), y.ptr<T>(), n);
    checkLaunch("silu");
  });
}

void siluBackward(const Tensor& x, const Tensor& dy, const Tensor& dx) {
  const int64_t n = x.numel();
  if (n == 0) return;
  cudaStream_t s = use(x.device().index);
  dispatchDeviceFloat(x.dtype(), "x", [&](auto tag) {
    using T = typename decltype(tag)::type;
    siluBackwardKernel<T><<<gridFor(n, kThreads), kThreads, 0, s>>>(x.ptr<T>(), dy.ptr<T>(), dx.ptr<T>(), n);
    checkLaunch("siluBackward");
  });
}

}  // namespace tcal::cuda
