#include <cfloat>
#include <type_traits>

#include <cub/device/device_radix_sort.cuh>

#include "../core/runtime.h"
#include "check.h"
#include "device.h"
#include "layers_backward.h"
#include "types.cuh"

namespace tcal::cuda {

namespace {
constexpr int kThreads = 256;

// Compute / accumulation type: float for f32, bf16, f16; double for f64.
template <typename T>
struct AccT {
  using type = float;
};
template <>
struct AccT<double> {
  using type = double;
};

template <typename T, typename A>
__device__ __forceinline__ T store(A v) {
  if constexpr (std::is_same_v<T, double>)
    return v;
  else
    return fromF<T>(float(v));
}

template <typename A>
__device__ __forceinline__ A amax(A a, A b) {
  return a > b ? a : b;
}

// Block-wide sum in a fixed order (warp butterflies, then warps 0, 1, ... in order); every thread gets it.
template <typename A>
__device__ A blockSum(A v, A* shared) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  __syncthreads();
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  A r = 0;
  for (int i = 0; i < int(blockDim.x / 32); ++i) r += shared[i];
  return r;
}

// Online (max, Σexp) pairs merged across the block; every thread gets the row's pair.
template <typename A>
__device__ void blockLse(A& m, A& s, A* sm, A* ss) {
  for (int o = 16; o > 0; o >>= 1) {
    A m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
    A M = amax(m, m2);
    s = s * exp(m - M) + s2 * exp(m2 - M);
    m = M;
  }
  int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  __syncthreads();
  if (lane == 0) {
    sm[warp] = m;
    ss[warp] = s;
  }
  __syncthreads();
  int warps = int(blockDim.x / 32);
  A M = sm[0];
  for (int i = 1; i < warps; ++i) M = amax(M, sm[i]);
  A S = 0;
  for (int i = 0; i < warps; ++i) S += ss[i] * exp(sm[i] - M);
  m = M;
  s = S;
}

// RMSNorm backward, pass 1 (one block per row): stats[r] = {inv, inv³/d · Σ dy·w·x}.
template <typename T, typename A>
__global__ void rmsStatsKernel(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ dy,
                               A* __restrict__ stats, int64_t d, A eps) {
  __shared__ A red[32];
  const T* xr = x + blockIdx.x * d;
  const T* gr = dy + blockIdx.x * d;
  A ss = 0, c = 0;
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
    A v = toF(xr[i]);
    ss += v * v;
    c += A(toF(gr[i])) * A(toF(w[i])) * v;
  }
  ss = blockSum(ss, red);
  c = blockSum(c, red);
  if (threadIdx.x == 0) {
    A inv = A(1) / sqrt(ss / A(d) + eps);
    stats[2 * blockIdx.x] = inv;
    stats[2 * blockIdx.x + 1] = inv * inv * inv * c / A(d);
  }
}

// Pass 2: a thread per column over a chunk of rows (grid.y): dx, and the chunk's partial of dw.
template <typename T, typename A>
__global__ void rmsColumnsKernel(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ dy,
                                 const A* __restrict__ stats, T* dx, A* __restrict__ partial, int64_t rows, int64_t d,
                                 int64_t chunk) {
  int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= d) return;
  int64_t r0 = int64_t(blockIdx.y) * chunk, r1 = min(rows, r0 + chunk);
  A wv = toF(w[i]), acc = 0;
  for (int64_t r = r0; r < r1; ++r) {
    A xv = toF(x[r * d + i]), g = toF(dy[r * d + i]);
    A inv = stats[2 * r], k = stats[2 * r + 1];
    acc += g * xv * inv;
    dx[r * d + i] = store<T>(inv * g * wv - k * xv);  // same thread read x, dy: in place is safe
  }
  partial[int64_t(blockIdx.y) * d + i] = acc;
}

// Pass 3: dw[i] = Σ_p partial[p, i] in order p = 0, 1, ...
template <typename A>
__global__ void sumPartialsKernel(const A* __restrict__ partial, A* __restrict__ out, int64_t parts, int64_t d) {
  int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= d) return;
  A acc = 0;
  for (int64_t p = 0; p < parts; ++p) acc += partial[p * d + i];
  out[i] = acc;
}

// The inverse rotation of ropeKernel (layers.cu): angle −pos · invFreq.
template <typename T>
__global__ void ropeBackwardKernel(const T* dy, const int32_t* __restrict__ pos, const float* __restrict__ inv, T* dx,
                                   int64_t bt, int64_t H, int64_t D) {
  using A = typename AccT<T>::type;
  int64_t half = D / 2, n = bt * H * half;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    int64_t j = i % half, h = (i / half) % H, r = i / (half * H);
    float angle = float(pos[r]) * inv[j];
    A s, c;
    if constexpr (std::is_same_v<A, double>) {
      sincos(double(angle), &s, &c);
    } else {
      sincosf(angle, &s, &c);
    }
    int64_t base = (r * H + h) * D;
    A g1 = toF(dy[base + j]), g2 = toF(dy[base + j + half]);
    dx[base + j] = store<T>(g1 * c + g2 * s);
    dx[base + j + half] = store<T>(g2 * c - g1 * s);
  }
}

template <typename T>
__global__ void swigluBackwardKernel(const T* g, const T* u, const T* dOut, T* dGate, T* dUp, int64_t n) {
  using A = typename AccT<T>::type;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    A gv = toF(g[i]), uv = toF(u[i]), d = toF(dOut[i]);
    A sig = A(1) / (A(1) + exp(-gv));
    dGate[i] = store<T>(d * uv * sig * (A(1) + gv * (A(1) - sig)));
    dUp[i] = store<T>(d * gv * sig);
  }
}

__global__ void iotaKernel(int32_t* __restrict__ p, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    p[i] = int32_t(i);
}

__device__ __forceinline__ int64_t lowerBound(const int32_t* __restrict__ a, int64_t n, int64_t v) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    int64_t mid = (lo + hi) / 2;
    if (int64_t(a[mid]) < v)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo;
}

// One block per (vocabulary row, column tile): the row owns its sum, over its positions in increasing order
// (the radix sort is stable).
template <typename T, typename G>
__global__ void embeddingGradKernel(const int32_t* __restrict__ sortedIds, const int32_t* __restrict__ perm,
                                    const T* __restrict__ dOut, G* __restrict__ table, int64_t n, int64_t D) {
  int64_t v = blockIdx.x;
  int64_t j = int64_t(blockIdx.y) * blockDim.x + threadIdx.x;
  if (j >= D) return;
  int64_t lo = lowerBound(sortedIds, n, v), hi = lowerBound(sortedIds, n, v + 1);
  G acc = 0;
  for (int64_t k = lo; k < hi; ++k) acc += G(toF(dOut[int64_t(perm[k]) * D + j]));
  table[v * D + j] = acc;
}

// One block per row: (max, Σexp) online, then dLogits = s · (softmax − onehot); loss when asked.
template <typename T>
__global__ void crossEntropyBackwardKernel(const T* logits, const int32_t* __restrict__ targets,
                                           const float* __restrict__ dLoss, float scale, float* __restrict__ loss,
                                           T* dLogits, int64_t V) {
  using A = typename AccT<T>::type;
  __shared__ A sm[32], ss[32];
  const T* row = logits + blockIdx.x * V;
  T* drow = dLogits + blockIdx.x * V;
  int32_t t = targets[blockIdx.x];
  if (t < 0 || t >= V) {
    for (int64_t i = threadIdx.x; i < V; i += blockDim.x) drow[i] = store<T>(A(0));
    if (loss && threadIdx.x == 0) loss[blockIdx.x] = 0;
    return;
  }
  A xt = toF(row[t]);  // every read of the row precedes the block barrier below (dLogits may alias logits)
  A m = A(-FLT_MAX), s = 0;
  for (int64_t i = threadIdx.x; i < V; i += blockDim.x) {
    A v = toF(row[i]);
    if (v > m) {
      s = s * exp(m - v) + A(1);
      m = v;
    } else {
      s += exp(v - m);
    }
  }
  blockLse(m, s, sm, ss);
  A lse = m + log(s);
  A sc = dLoss ? A(dLoss[blockIdx.x]) : A(scale);
  if (loss && threadIdx.x == 0) loss[blockIdx.x] = float(lse - xt);
  for (int64_t i = threadIdx.x; i < V; i += blockDim.x) {
    A p = exp(A(toF(row[i])) - lse);
    drow[i] = store<T>(sc * (i == t ? p - A(1) : p));
  }
}

// One block per row of forward KL(softmax(t) ‖ softmax(s)): both rows' (max, Σexp) online, then one pass that
// sums p·(t − s) and writes dS = scale·(q − p) (each element is read by the thread that overwrites it).
template <typename T>
__global__ void klKernel(const T* student, const T* __restrict__ teacher, const int32_t* __restrict__ mask,
                         float scale, float* __restrict__ loss, T* dStudent, int64_t V) {
  using A = typename AccT<T>::type;
  __shared__ A sm[32], ss[32];
  const T* srow = student + blockIdx.x * V;
  const T* trow = teacher + blockIdx.x * V;
  T* drow = dStudent + blockIdx.x * V;
  if (mask[blockIdx.x] < 0) {
    for (int64_t i = threadIdx.x; i < V; i += blockDim.x) drow[i] = store<T>(A(0));
    if (threadIdx.x == 0) loss[blockIdx.x] = 0;
    return;
  }
  A ms = A(-FLT_MAX), zs = 0, mt = A(-FLT_MAX), zt = 0;
  for (int64_t i = threadIdx.x; i < V; i += blockDim.x) {
    A v = toF(srow[i]), u = toF(trow[i]);
    if (v > ms) {
      zs = zs * exp(ms - v) + A(1);
      ms = v;
    } else {
      zs += exp(v - ms);
    }
    if (u > mt) {
      zt = zt * exp(mt - u) + A(1);
      mt = u;
    } else {
      zt += exp(u - mt);
    }
  }
  blockLse(ms, zs, sm, ss);
  blockLse(mt, zt, sm, ss);
  const A lses = ms + log(zs), lset = mt + log(zt);
  A cross = 0;
  for (int64_t i = threadIdx.x; i < V; i += blockDim.x) {
    A v = toF(srow[i]), u = toF(trow[i]);
    A p = exp(u - lset), q = exp(v - lses);
    cross += p * (u - v);
    drow[i] = store<T>(A(scale) * (q - p));
  }
  cross = blockSum(cross, sm);
  if (threadIdx.x == 0) loss[blockIdx.x] = float(cross - lset + lses);
}

void crossEntropyLaunch(const Tensor& logits, const Tensor& targets, const float* dLoss, double scale, float* loss,
                        const Tensor& dLogits, const char* name) {
  cudaStream_t s = use(logits.device().index);
  int64_t V = logits.dim(-1), rows = logits.numel() / std::max<int64_t>(V, 1);
  if (rows == 0 || V == 0) return;
  int threads = V >= 8192 ? 512 : (V >= 1024 ? 256 : 128);
  dispatchDeviceFloat(logits.dtype(), "logits", [&](auto tag) {
    using T = typename decltype(tag)::type;
    crossEntropyBackwardKernel<T><<<unsigned(rows), threads, 0, s>>>(
        logits.ptr<T>(), targets.ptr<int32_t>(), dLoss, float(scale), loss, dLogits.ptr<T>(), V);
    checkLaunch(name);
  });
}
}  // namespace

void rmsNormBackward(const Tensor& x, const Tensor& w, const Tensor& dy, double eps, const Tensor& dx, const Tensor& dw) {
  Device dev = x.device();
  cudaStream_t s = use(dev.index);
  int64_t d = w.numel(), rows = x.numel() / std::max<int64_t>(d, 1);
  if (d == 0) return;
  if (rows == 0) {
    check(cudaMemsetAsync(dw.data(), 0, dw.nbytes(), s), "rmsNormBackward");
    return;
  }
  dispatchDeviceFloat(x.dtype(), "x", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = typename AccT<T>::type;
    DType accType = std::is_same_v<A, double> ? DType::F64 : DType::F32;
    // Row chunks for the dw partials depend on the shape only (never on the device), so results are reproducible.
    int64_t chunk = std::max<int64_t>(1, (rows + 127) / 128), parts = (rows + chunk - 1) / chunk;
    Tensor stats = empty({rows, 2}, accType, dev);
    Tensor partial = empty({parts, d}, accType, dev);
    int threads = d >= 1024 ? 512 : (d >= 256 ? 256 : 128);
    rmsStatsKernel<T, A><<<unsigned(rows), threads, 0, s>>>(x.ptr<T>(), w.ptr<T>(), dy.ptr<T>(), stats.ptr<A>(), d,
                                                            A(eps));
    checkLaunch("rmsNormBackward");
    dim3 grid(unsigned((d + kThreads - 1) / kThreads), unsigned(parts));
    rmsColumnsKernel<T, A><<<grid, kThreads, 0, s>>>(x.ptr<T>(), w.ptr<T>(), dy.ptr<T>(), stats.ptr<A>(), dx.ptr<T>(),
                                                     partial.ptr<A>(), rows, d, chunk);
    checkLaunch("rmsNormBackward");
    sumPartialsKernel<A><<<gridFor(d, kThreads), kThreads, 0, s>>>(partial.ptr<A>(), dw.ptr<A>(), parts, d);
    checkLaunch("rmsNormBackward");
  });
}

void ropeBackward(const Tensor& dy, const Tensor& positions, const Tensor& invFreq, const Tensor& dx) {
  cudaStream_t s = use(dy.device().index);
  int64_t bt = dy.dim(0) * dy.dim(1), H = dy.dim(2), D = dy.dim(3);
  if (bt * H * D == 0) return;
  dispatchDeviceFloat(dy.dtype(), "dy", [&](auto tag) {
    using T = typename decltype(tag)::type;
    ropeBackwardKernel<T><<<gridFor(bt * H * D / 2, kThreads), kThreads, 0, s>>>(
        dy.ptr<T>(), positions.ptr<int32_t>(), invFreq.ptr<float>(), dx.ptr<T>(), bt, H, D);
    checkLaunch("ropeBackward");
  });
}

void swigluBackward(const Tensor& gate, const Tensor& up, const Tensor& dOut, const Tensor& dGate, const Tensor& dUp) {
  cudaStream_t s = use(gate.device().index);
  int64_t n = gate.numel();
  if (n == 0) return;
  dispatchDeviceFloat(gate.dtype(), "gate", [&](auto tag) {
    using T = typename decltype(tag)::type;
    swigluBackwardKernel<T><<<gridFor(n, kThreads), kThreads, 0, s>>>(gate.ptr<T>(), up.ptr<T>(), dOut.ptr<T>(),
                                                                       dGate.ptr<T>(), dUp.ptr<T>(), n);
    checkLaunch("swigluBackward");
  });
}

void embeddingBackward(const Tensor& ids, const Tensor& dOut, const Tensor& dTable) {
  Device dev = dTable.device();
  cudaStream_t s = use(dev.index);
  int64_t V = dTable.dim(0), D = dTable.dim(1), n = ids.numel();
  if (V == 0 || D == 0) return;
  if (n == 0) {
    check(cudaMemsetAsync(dTable.data(), 0, dTable.nbytes(), s), "embeddingBackward");
    return;
  }
  if (n > int64_t(INT32_MAX)) throwInvalid("ids", "more than 2^31 − 1 positions");
  if (V > int64_t(INT32_MAX)) throwInvalid("vocabSize", "more than 2^31 − 1 rows");
  Tensor sortedIds = empty({n}, DType::I32, dev), perm = empty({n}, DType::I32, dev), iota = empty({n}, DType::I32, dev);
  iotaKernel<<<gridFor(n, kThreads), kThreads, 0, s>>>(iota.ptr<int32_t>(), n);
  checkLaunch("embeddingBackward");
  size_t tempBytes = 0;
  check(cub::DeviceRadixSort::SortPairs(nullptr, tempBytes, ids.ptr<int32_t>(), sortedIds.ptr<int32_t>(),
                                        iota.ptr<int32_t>(), perm.ptr<int32_t>(), int(n), 0, 32, s),
        "embeddingBackward (sort)");
  Tensor temp = empty({int64_t((tempBytes + 7) / 8) + 1}, DType::I64, dev);
  check(cub::DeviceRadixSort::SortPairs(temp.data(), tempBytes, ids.ptr<int32_t>(), sortedIds.ptr<int32_t>(),
                                        iota.ptr<int32_t>(), perm.ptr<int32_t>(), int(n), 0, 32, s),
        "embeddingBackward (sort)");
  int threads = D >= 256 ? 256 : (D >= 128 ? 128 : (D >= 64 ? 64 : 32));
  dim3 grid(unsigned(V), unsigned((D + threads - 1) / threads));
  if (grid.y > 65535) throwInvalid("dOut", "row length too large");
  dispatchDeviceFloat(dOut.dtype(), "dOut", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = typename AccT<T>::type;
    embeddingGradKernel<T, A><<<grid, threads, 0, s>>>(sortedIds.ptr<int32_t>(), perm.ptr<int32_t>(), dOut.ptr<T>(),
                                                       dTable.ptr<A>(), n, D);
    checkLaunch("embeddingBackward");
  });
}

void crossEntropyBackward(const Tensor& logits, const Tensor& targets, const Tensor& dLoss, const Tensor& dLogits) {
  crossEntropyLaunch(logits, targets, dLoss.ptr<float>(), 1.0, nullptr, dLogits, "crossEntropyBackward");
}

void crossEntropyForwardBackward(const Tensor& logits, const Tensor& targets, double scale, const Tensor& loss,
                                 const Tensor& dLogits) {
  crossEntropyLaunch(logits, targets, nullptr, scale, loss.ptr<float>(), dLogits, "crossEntropyForwardBackward");
}

void klForwardBackward(const Tensor& student, const Tensor& teacher, const Tensor& rowMask, double scale,
                       const Tensor& loss, const Tensor& dStudent) {
  cudaStream_t s = use(student.device().index);
  int64_t V = student.dim(-1), rows = student.numel() / std::max<int64_t>(V, 1);
  if (rows == 0 || V == 0) return;
  int threads = V >= 8192 ? 512 : (V >= 1024 ? 256 : 128);
  dispatchDeviceFloat(student.dtype(), "studentLogits", [&](auto tag) {
    using T = typename decltype(tag)::type;
    klKernel<T><<<unsigned(rows), threads, 0, s>>>(student.ptr<T>(), teacher.ptr<T>(), rowMask.ptr<int32_t>(),
                                                   float(scale), loss.ptr<float>(), dStudent.ptr<T>(), V);
    checkLaunch("klForwardBackward");
  });
}

}  // namespace tcal::cuda
