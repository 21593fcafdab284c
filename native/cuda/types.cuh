// Device-side element types and float conversions shared by the kernels.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../core/dtype.h"
#include "../core/error.h"

namespace tcal::cuda {

__device__ __forceinline__ float toF(float v) { return v; }
__device__ __forceinline__ double toF(double v) { return v; }
__device__ __forceinline__ float toF(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float toF(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T fromF(float v);
template <>
__device__ __forceinline__ float fromF<float>(float v) { return v; }
template <>
__device__ __forceinline__ double fromF<double>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 fromF<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half fromF<__half>(float v) { return __float2half_rn(v); }

template <typename T>
struct DevTag {
  using type = T;
};

template <typename Fn>
void dispatchDeviceFloat(DType t, const char* argument, Fn&& fn) {
  switch (t) {
    case DType::F32: fn(DevTag<float>{}); return;
    case DType::BF16: fn(DevTag<__nv_bfloat16>{}); return;
    case DType::F16: fn(DevTag<__half>{}); return;
    case DType::F64: fn(DevTag<double>{}); return;
    default: throwInvalid(argument, std::string("expected a floating dtype, got ") + dtypeName(t));
  }
}

inline unsigned gridFor(int64_t n, int threads, int64_t cap = 65535LL * 16) {
  int64_t g = (n + threads - 1) / threads;
  return unsigned(g < 1 ? 1 : (g > cap ? cap : g));
}

}  // namespace tcal::cuda
