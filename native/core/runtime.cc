#include "runtime.h"

#include <cstdlib>
#include <cstring>

#ifdef TCAL_WITH_CUDA
#include "../cuda/device.h"
#endif

namespace tcal {

namespace {
constexpr size_t kHostAlign = 64;

void* hostAlloc(size_t bytes) {
  size_t rounded = (std::max<size_t>(bytes, 1) + kHostAlign - 1) / kHostAlign * kHostAlign;
  void* p = std::aligned_alloc(kHostAlign, rounded);
  if (!p) {
    Error e(ErrorKind::OutOfMemory, "host allocation of " + std::to_string(bytes) + " bytes failed");
    e.requested = bytes;
    e.device = "cpu";
    e.op = "aligned_alloc";
    throw e;
  }
  return p;
}
}  // namespace

bool cudaCompiled() {
#ifdef TCAL_WITH_CUDA
  return true;
#else
  return false;
#endif
}

int cudaDeviceCount(std::string* reason) {
#ifdef TCAL_WITH_CUDA
  return cuda::deviceCount(reason);
#else
  if (reason) *reason = "this binary was built without CUDA (no nvcc at build time)";
  return 0;
#endif
}

DeviceInfo cudaDeviceInfo(int index) {
#ifdef TCAL_WITH_CUDA
  return cuda::deviceInfo(index);
#else
  (void)index;
  throwNotCompiled("CUDA");
#endif
}

std::vector<std::string> compiledKernels() {
  std::vector<std::string> k = {"cpu"};
#ifdef TCAL_WITH_CUDA
  for (auto& s : cuda::compiledArchitectures()) k.push_back(s);
#endif
  return k;
}

Tensor empty(const Shape& shape, DType dtype, Device device) {
  for (auto d : shape)
    if (d < 0) throwInvalid("shape", "negative dimension in " + shapeStr(shape));
  size_t bytes = size_t(numelOf(shape)) * dtypeSize(dtype);
  if (device.kind == Device::CPU) {
    void* p = hostAlloc(bytes);
    return Tensor(std::make_shared<Storage>(p, bytes, device, [](void* q) { std::free(q); }), shape, dtype);
  }
#ifdef TCAL_WITH_CUDA
  int idx = device.index;
  void* p = cuda::allocate(idx, bytes);
  return Tensor(std::make_shared<Storage>(p, bytes, device, [idx](void* q) { cuda::release(idx, q); }), shape,
                dtype);
#else
  throwNotCompiled("CUDA tensors");
#endif
}

Tensor wrapHost(void* ptr, const Shape& shape, DType dtype, std::function<void(void*)> release) {
  size_t bytes = size_t(numelOf(shape)) * dtypeSize(dtype);
  return Tensor(std::make_shared<Storage>(ptr, bytes, Device{Device::CPU, 0}, std::move(release)), shape, dtype);
}

void copyBytes(const Tensor& dst, const Tensor& src) {
  if (dst.nbytes() != src.nbytes())
    throwInvalid("src", "byte size " + std::to_string(src.nbytes()) + " differs from destination's " +
                            std::to_string(dst.nbytes()));
  if (dst.device().kind == Device::CPU && src.device().kind == Device::CPU) {
    std::memcpy(dst.data(), src.data(), src.nbytes());
    return;
  }
#ifdef TCAL_WITH_CUDA
  cuda::copy(dst.data(), dst.device(), src.data(), src.device(), src.nbytes());
#else
  throwNotCompiled("CUDA copies");
#endif
}

void copyFromHost(const Tensor& dst, const void* src, size_t bytes) {
  if (bytes != dst.nbytes())
    throwInvalid("data", std::to_string(bytes) + " bytes given for a tensor of " + std::to_string(dst.nbytes()));
  if (dst.device().kind == Device::CPU) {
    std::memcpy(dst.data(), src, bytes);
    return;
  }
#ifdef TCAL_WITH_CUDA
  cuda::copy(dst.data(), dst.device(), src, Device{Device::CPU, 0}, bytes);
#endif
}

void copyToHost(void* dst, const Tensor& src, size_t bytes) {
  if (bytes != src.nbytes()) throwInvalid("out", "host buffer size differs from tensor size");
  if (src.device().kind == Device::CPU) {
    std::memcpy(dst, src.data(), bytes);
    return;
  }
#ifdef TCAL_WITH_CUDA
  cuda::copy(dst, Device{Device::CPU, 0}, src.data(), src.device(), bytes);
#endif
}

void synchronize(Device device) {
  if (device.kind == Device::CPU) return;
#ifdef TCAL_WITH_CUDA
  cuda::synchronize(device.index);
#endif
}

MemoryStats memoryStats(Device device) {
  if (device.kind == Device::CPU) return MemoryStats{};
#ifdef TCAL_WITH_CUDA
  return cuda::memoryStats(device.index);
#else
  throwNotCompiled("CUDA");
#endif
}

void emptyCache(Device device) {
  if (device.kind == Device::CPU) return;
#ifdef TCAL_WITH_CUDA
  cuda::emptyCache(device.index);
#endif
}

}  // namespace tcal
