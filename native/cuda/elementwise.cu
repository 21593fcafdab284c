#include "check.h"
#include "device.h"
#include "elementwise.h"
#include "types.cuh"
#include "../core/random.h"

namespace tcal::cuda {

namespace {
constexpr int kThreads = 256;

template <typename S, typename D>
__global__ void castKernel(const S* __restrict__ src, D* __restrict__ dst, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    dst[i] = fromF<D>(toF(src[i]));
}

template <typename T, int Op>
__global__ void binaryKernel(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ out, int64_t n,
                             int64_t nb) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    float x = toF(a[i]), y = toF(b[nb == n ? i : i % nb]);
    out[i] = fromF<T>(Op == 0 ? x + y : x * y);
  }
}

template <typename T>
__global__ void scaleKernel(const T* __restrict__ x, T* __restrict__ out, float alpha, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = fromF<T>(alpha * toF(x[i]));
}

template <typename T>
__global__ void fillKernel(T* __restrict__ p, T v, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    p[i] = v;
}

template <typename T>
__global__ void randomKernel(T* __restrict__ p, int kind, uint64_t seed, double a, double b, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    p[i] = fromF<T>(float(randomValue(RandomKind(kind), seed, uint64_t(i), a, b)));
}

template <int Op>
void binary(const Tensor& a, const Tensor& b, const Tensor& out) {
  cudaStream_t s = use(a.device().index);
  int64_t n = a.numel();
  if (n == 0) return;
  dispatchDeviceFloat(a.dtype(), "a", [&](auto tag) {
    using T = typename decltype(tag)::type;
    binaryKernel<T, Op><<<gridFor(n, kThreads), kThreads, 0, s>>>(a.ptr<T>(), b.ptr<T>(), out.ptr<T>(), n, b.numel());
    checkLaunch(Op == 0 ? "add" : "mul");
  });
}
}  // namespace

void cast(const Tensor& src, const Tensor& dst) {
  cudaStream_t s = use(src.device().index);
  int64_t n = src.numel();
  if (n == 0) return;
  dispatchDeviceFloat(src.dtype(), "x", [&](auto st) {
    using S = typename decltype(st)::type;
    dispatchDeviceFloat(dst.dtype(), "dtype", [&](auto dt) {
      using D = typename decltype(dt)::type;
      castKernel<S, D><<<gridFor(n, kThreads), kThreads, 0, s>>>(src.ptr<S>(), dst.ptr<D>(), n);
      checkLaunch("cast");
    });
  });
}

void add(const Tensor& a, const Tensor& b, const Tensor& out) { binary<0>(a, b, out); }
void mul(const Tensor& a, const Tensor& b, const Tensor& out) { binary<1>(a, b, out); }

void scale(const Tensor& x, double alpha, const Tensor& out) {
  cudaStream_t s = use(x.device().index);
  int64_t n = x.numel();
  if (n == 0) return;
  dispatchDeviceFloat(x.dtype(), "x", [&](auto tag) {
    using T = typename decltype(tag)::type;
    scaleKernel<T><<<gridFor(n, kThreads), kThreads, 0, s>>>(x.ptr<T>(), out.ptr<T>(), float(alpha), n);
    checkLaunch("scale");
  });
}

void fill(const Tensor& t, double value) {
  cudaStream_t s = use(t.device().index);
  int64_t n = t.numel();
  if (n == 0) return;
  auto launch = [&](auto* p, auto v) {
    using T = std::remove_pointer_t<decltype(p)>;
    fillKernel<T><<<gridFor(n, kThreads), kThreads, 0, s>>>(p, v, n);
    checkLaunch("fill");
  };
  switch (t.dtype()) {
    case DType::F32: launch(t.ptr<float>(), float(value)); break;
    case DType::F64: launch(t.ptr<double>(), value); break;
    case DType::BF16: launch(t.ptr<__nv_bfloat16>(), __float2bfloat16_rn(float(value))); break;
    case DType::F16: launch(t.ptr<__half>(), __float2half_rn(float(value))); break;
    case DType::I32: launch(t.ptr<int32_t>(), int32_t(value)); break;
    case DType::I64: launch(t.ptr<int64_t>(), int64_t(value)); break;
  }
}

void random(const Tensor& t, int kind, uint64_t seed, double a, double b) {
  cudaStream_t s = use(t.device().index);
  int64_t n = t.numel();
  if (n == 0) return;
  dispatchDeviceFloat(t.dtype(), "t", [&](auto tag) {
    using T = typename decltype(tag)::type;
    randomKernel<T><<<gridFor(n, kThreads), kThreads, 0, s>>>(t.ptr<T>(), kind, seed, a, b, n);
    checkLaunch("random");
  });
}

}  // namespace tcal::cuda
