// Fused multi-tensor AdamW: one launch updates every parameter of a step. The parameter list goes to the
// device as a table of descriptors; block b finds its parameter by binary search over the table's first-block
// column, then updates kAdamwBlockElems consecutive elements (coalesced, a block never spans two tensors).
#include "adamw.h"
#include "check.h"
#include "device.h"
#include "types.cuh"

#include <algorithm>

namespace tcal::cuda {

namespace {
constexpr int kThreads = 256;

// 0 f32, 1 bf16, 2 f16; -1: no compute copy.
int typeCode(DType t) {
  switch (t) {
    case DType::F32: return 0;
    case DType::BF16: return 1;
    case DType::F16: return 2;
    default: throwInvalid("dtype", std::string("expected f32, bf16 or f16, got ") + dtypeName(t));
  }
}

struct StepDesc {
  float* p;
  float* m;
  float* v;
  const void* g;
  void* c;
  long long n;
  long long firstBlock;
  AdamwConstants k;
  int gradType;
  int computeType;
};

struct NormDesc {
  const void* x;
  long long n;
  long long firstBlock;
  int type;
  int pad;
};

template <typename D>
__device__ __forceinline__ int findItem(const D* d, int count, long long block) {
  int lo = 0, hi = count - 1;  // the last item whose firstBlock ≤ block
  while (lo < hi) {
    int mid = (lo + hi + 1) >> 1;
    if (d[mid].firstBlock <= block)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

__device__ __forceinline__ float loadAs(const void* base, int type, long long i) {
  if (type == 1) return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[i]);
  if (type == 2) return __half2float(static_cast<const __half*>(base)[i]);
  return static_cast<const float*>(base)[i];
}

__device__ __forceinline__ void storeAs(void* base, int type, long long i, float x) {
  if (type == 1)
    static_cast<__nv_bfloat16*>(base)[i] = __float2bfloat16_rn(x);
  else if (type == 2)
    static_cast<__half*>(base)[i] = __float2half_rn(x);
  else
    static_cast<float*>(base)[i] = x;
}

__global__ void adamwKernel(const StepDesc* __restrict__ descs, int count) {
  const long long block = blockIdx.x;
  __shared__ StepDesc d;
  if (threadIdx.x == 0) d = descs[findItem(descs, count, block)];
  __syncthreads();
  const long long first = (block - d.firstBlock) * kAdamwBlockElems;
  const long long last = min(d.n, first + kAdamwBlockElems);
  for (long long i = first + threadIdx.x; i < last; i += kThreads) {
    float p = d.p[i], m = d.m[i], v = d.v[i];
    adamwElement(p, m, v, loadAs(d.g, d.gradType, i), d.k);
    d.p[i] = p;
    d.m[i] = m;
    d.v[i] = v;
    if (d.computeType >= 0) storeAs(d.c, d.computeType, i, p);
  }
}

__device__ __forceinline__ double blockSum(double s) {
  __shared__ double warpSums[kThreads / 32];
  for (int o = 16; o > 0; o >>= 1) s += __shfl_down_sync(0xffffffffu, s, o);
  if ((threadIdx.x & 31) == 0) warpSums[threadIdx.x >> 5] = s;
  __syncthreads();
  double t = 0;
  if (threadIdx.x < 32) {
    t = threadIdx.x < kThreads / 32 ? warpSums[threadIdx.x] : 0.0;
    for (int o = 16; o > 0; o >>= 1) t += __shfl_down_sync(0xffffffffu, t, o);
  }
  return t;  // valid in thread 0
}

__global__ void normPartialKernel(const NormDesc* __restrict__ descs, int count, double* __restrict__ partial) {
  const long long block = blockIdx.x;
  const NormDesc d = descs[findItem(descs, count, block)];
  const long long first = (block - d.firstBlock) * kAdamwBlockElems;
  const long long last = min(d.n, first + kAdamwBlockElems);
  double s = 0;
  for (long long i = first + threadIdx.x; i < last; i += kThreads) {
    double x = double(loadAs(d.x, d.type, i));
    s += x * x;
  }
  s = blockSum(s);
  if (threadIdx.x == 0) partial[block] = s;
}

__global__ void normFinalKernel(const double* __restrict__ partial, long long n, double* __restrict__ out) {
  double s = 0;
  for (long long i = threadIdx.x; i < n; i += kThreads) s += partial[i];
  s = blockSum(s);
  if (threadIdx.x == 0) *out = s;
}

// A device copy of a host table (freed with the returned tensor; the allocator is stream-ordered).
template <typename D>
Tensor upload(const std::vector<D>& table, Device dev) {
  static_assert(sizeof(D) % 8 == 0, "descriptor size must be a multiple of 8 bytes");
  Tensor t = empty({int64_t(table.size() * sizeof(D) / 8)}, DType::I64, dev);
  copyFromHost(t, table.data(), table.size() * sizeof(D));
  return t;
}
}  // namespace

void adamwStep(const std::vector<AdamwItem>& items) {
  if (items.empty()) return;
  Device dev = items[0].param.device();
  cudaStream_t s = use(dev.index);
  std::vector<StepDesc> table;
  long long blocks = 0;
  for (const auto& it : items) {
    long long n = it.param.numel();
    if (n == 0) continue;
    StepDesc d{};
    d.p = it.param.ptr<float>();
    d.m = it.m.ptr<float>();
    d.v = it.v.ptr<float>();
    d.g = it.grad.data();
    d.c = it.compute.defined() ? it.compute.data() : nullptr;
    d.n = n;
    d.firstBlock = blocks;
    d.k = it.c;
    d.gradType = typeCode(it.grad.dtype());
    d.computeType = it.compute.defined() ? typeCode(it.compute.dtype()) : -1;
    table.push_back(d);
    blocks += (n + kAdamwBlockElems - 1) / kAdamwBlockElems;
  }
  if (table.empty()) return;
  if (blocks > INT32_MAX) throwInvalid("params", "too many elements for one AdamW launch");
  Tensor dtab = upload(table, dev);
  adamwKernel<<<unsigned(blocks), kThreads, 0, s>>>(reinterpret_cast<const StepDesc*>(dtab.data()), int(table.size()));
  checkLaunch("adamwStep");
}

void gradNormSquared(const std::vector<Tensor>& grads, const Tensor& out) {
  Device dev = out.device();
  cudaStream_t s = use(dev.index);
  std::vector<NormDesc> table;
  long long blocks = 0;
  for (const auto& g : grads) {
    long long n = g.numel();
    if (n == 0) continue;
    NormDesc d{};
    d.x = g.data();
    d.n = n;
    d.firstBlock = blocks;
    d.type = typeCode(g.dtype());
    table.push_back(d);
    blocks += (n + kAdamwBlockElems - 1) / kAdamwBlockElems;
  }
  if (table.empty()) {
    check(cudaMemsetAsync(out.data(), 0, sizeof(double), s), "cudaMemsetAsync");
    return;
  }
  if (blocks > INT32_MAX) throwInvalid("grads", "too many elements for one launch");
  Tensor dtab = upload(table, dev);
  Tensor partial = empty({int64_t(blocks)}, DType::F64, dev);
  normPartialKernel<<<unsigned(blocks), kThreads, 0, s>>>(reinterpret_cast<const NormDesc*>(dtab.data()),
                                                          int(table.size()), partial.ptr<double>());
  checkLaunch("gradNormSquared (partials)");
  normFinalKernel<<<1, kThreads, 0, s>>>(partial.ptr<double>(), blocks, out.ptr<double>());
  checkLaunch("gradNormSquared (sum)");
}

}  // namespace tcal::cuda
