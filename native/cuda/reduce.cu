#include "../core/runtime.h"
#include "check.h"
#include "device.h"
#include "reduce.h"
#include "types.cuh"

namespace tcal::cuda {

namespace {
constexpr int kThreads = 256;

template <typename Acc>
__device__ Acc blockSum(Acc v) {
  __shared__ Acc warpSums[kThreads / 32];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warpSums[warp] = v;
  __syncthreads();
  v = threadIdx.x < kThreads / 32 ? warpSums[threadIdx.x] : Acc(0);
  if (warp == 0)
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

// inner == 1: block (o, slice) sums a contiguous slice of row o into partial[o * slices + slice].
template <typename T, typename Acc>
__global__ void rowPartialKernel(const T* __restrict__ x, int64_t n, int slices, Acc* __restrict__ partial) {
  int64_t o = blockIdx.x / slices;
  int slice = int(blockIdx.x % slices);
  int64_t per = (n + slices - 1) / slices;
  int64_t b = slice * per, e = min(n, b + per);
  const T* row = x + o * n;
  Acc acc = 0;
  for (int64_t j = b + threadIdx.x; j < e; j += kThreads) acc += Acc(toF(row[j]));
  acc = blockSum(acc);
  if (threadIdx.x == 0) partial[o * slices + slice] = acc;
}

template <typename T, typename Acc>
__global__ void rowFinishKernel(const Acc* __restrict__ partial, int slices, double k, T* __restrict__ out) {
  int64_t o = blockIdx.x;
  Acc acc = 0;
  for (int j = threadIdx.x; j < slices; j += kThreads) acc += partial[o * slices + j];
  acc = blockSum(acc);
  if (threadIdx.x == 0) out[o] = fromF<T>(float(acc * Acc(k)));
}

// inner > 1: one thread per (o, i) output, coalesced over i.
template <typename T, typename Acc>
__global__ void columnKernel(const T* __restrict__ x, int64_t outer, int64_t n, int64_t inner, double k,
                             T* __restrict__ out) {
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < outer * inner;
       t += int64_t(gridDim.x) * blockDim.x) {
    int64_t o = t / inner, i = t % inner;
    const T* base = x + o * n * inner + i;
    Acc acc = 0;
    for (int64_t j = 0; j < n; ++j) acc += Acc(toF(base[j * inner]));
    out[t] = fromF<T>(float(acc * Acc(k)));
  }
}
}  // namespace

void reduceSum(const Tensor& x, int64_t outer, int64_t n, int64_t inner, bool mean, const Tensor& out) {
  int dev = x.device().index;
  cudaStream_t s = use(dev);
  if (outer * inner == 0) return;
  double k = mean && n > 0 ? 1.0 / double(n) : 1.0;
  dispatchDeviceFloat(x.dtype(), "x", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;
    if (inner == 1) {
      // Enough slices to fill the machine when there are few rows.
      int64_t want = (2LL * multiprocessorCount(dev) + outer - 1) / outer;
      int slices = int(std::max<int64_t>(1, std::min<int64_t>({want, (n + 4095) / 4096, 1024})));
      Tensor partial = empty({outer * slices}, std::is_same_v<Acc, double> ? DType::F64 : DType::F32, x.device());
      rowPartialKernel<T, Acc><<<unsigned(outer * slices), kThreads, 0, s>>>(x.ptr<T>(), n, slices,
                                                                                   partial.ptr<Acc>());
      checkLaunch("reduceSum");
      rowFinishKernel<T, Acc><<<unsigned(outer), kThreads, 0, s>>>(partial.ptr<Acc>(), slices, k, out.ptr<T>());
      checkLaunch("reduceSum");
    } else {
      columnKernel<T, Acc><<<gridFor(outer * inner, kThreads), kThreads, 0, s>>>(x.ptr<T>(), outer, n, inner, k,
                                                                                  out.ptr<T>());
      checkLaunch("reduceSum");
    }
  });
}

}  // namespace tcal::cuda
