#include <algorithm>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <unordered_map>

#include "check.h"
#include "device.h"

namespace tcal::cuda {

namespace {

// Caching allocator: freed blocks go back to a size-sorted free list and are reused by later requests of a
// similar size. One stream per device means a block freed after its last use was enqueued is safe to hand
// to the next op on the same stream. On a failed cudaMalloc the cache is released and the call retried once.
class CachingAllocator {
 public:
  explicit CachingAllocator(int device) : device_(device) {}

  static size_t roundUp(size_t bytes) {
    constexpr size_t kSmall = 512, kLarge = size_t(2) << 20;
    bytes = std::max<size_t>(bytes, 1);
    size_t unit = bytes < (size_t(1) << 20) ? kSmall : kLarge;
    return (bytes + unit - 1) / unit * unit;
  }

  void* allocate(size_t bytes) {
    size_t want = roundUp(bytes);
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = free_.lower_bound(want);
    // Reuse a cached block unless it is much larger than asked (that would strand memory).
    if (it != free_.end() && it->first <= want + want / 4 + (size_t(2) << 20)) {
      void* p = it->second;
      size_t size = it->first;
      free_.erase(it);
      cached_ -= size;
      live_[p] = size;
      allocated_ += size;
      peak_ = std::max(peak_, allocated_);
      ++hits_;
      return p;
    }
    void* p = nullptr;
    cudaError_t s = cudaMalloc(&p, want);
    if (s == cudaErrorMemoryAllocation) {
      cudaGetLastError();
      releaseCacheLocked();
      s = cudaMalloc(&p, want);
    }
    if (s == cudaErrorMemoryAllocation) {
      cudaGetLastError();
      size_t freeB = 0, total = 0;
      cudaMemGetInfo(&freeB, &total);
      Error e(ErrorKind::OutOfMemory, "cuda:" + std::to_string(device_) + ": cannot allocate " +
                                          std::to_string(bytes) + " bytes (" + std::to_string(freeB) +
                                          " free of " + std::to_string(total) + ")");
      e.requested = bytes;
      e.freeBytes = freeB;
      e.device = "cuda:" + std::to_string(device_);
      e.op = "cudaMalloc";
      throw e;
    }
    check(s, "cudaMalloc");
    ++mallocs_;
    live_[p] = want;
    allocated_ += want;
    peak_ = std::max(peak_, allocated_);
    return p;
  }

  void release(void* p) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = live_.find(p);
    if (it == live_.end()) return;
    free_.emplace(it->second, p);
    cached_ += it->second;
    allocated_ -= it->second;
    live_.erase(it);
  }

  void emptyCache() {
    std::lock_guard<std::mutex> lock(mutex_);
    releaseCacheLocked();
  }

  MemoryStats stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    MemoryStats s;
    s.allocated = allocated_;
    s.reserved = allocated_ + cached_;
    s.peakAllocated = peak_;
    s.allocCalls = mallocs_;
    s.cacheHits = hits_;
    return s;
  }

 private:
  void releaseCacheLocked() {
    // cudaFree synchronises the device, so no enqueued kernel still reads a cached block.
    for (auto& kv : free_) cudaFree(kv.second);
    free_.clear();
    cached_ = 0;
  }

  int device_;
  std::mutex mutex_;
  std::multimap<size_t, void*> free_;
  std::unordered_map<void*, size_t> live_;
  size_t allocated_ = 0, cached_ = 0, peak_ = 0, mallocs_ = 0, hits_ = 0;
};

// Host → device uploads of up to kSlotBytes go through pinned staging slots and return without waiting for
// the stream: a pageable copy would have to synchronise (the JS buffer may change once the call returns),
// and that wait stalled every op that uploads a small list behind the kernels still queued before it (the
// moment op lost ≈ 0.5 ms per call this way). A slot is reused only after its previous copy has completed.
class UploadRing {
 public:
  static constexpr size_t kSlotBytes = size_t(1) << 20;
  static constexpr int kSlots = 16;

  ~UploadRing() {
    for (Slot& s : slots_) {
      if (s.event) cudaEventDestroy(s.event);
      if (s.host) cudaFreeHost(s.host);
    }
  }

  // False when the copy does not fit a slot or pinned memory cannot be had (then the caller copies directly).
  bool upload(void* dst, const void* src, size_t bytes, cudaStream_t stream) {
    if (bytes > kSlotBytes) return false;
    std::lock_guard<std::mutex> lock(mutex_);
    Slot& s = slots_[next_];
    if (!s.host) {
      if (cudaHostAlloc(&s.host, kSlotBytes, cudaHostAllocDefault) != cudaSuccess) {
        cudaGetLastError();
        s.host = nullptr;
        return false;
      }
      check(cudaEventCreateWithFlags(&s.event, cudaEventDisableTiming), "cudaEventCreateWithFlags");
    } else {
      check(cudaEventSynchronize(s.event), "cudaEventSynchronize");
    }
    std::memcpy(s.host, src, bytes);
    check(cudaMemcpyAsync(dst, s.host, bytes, cudaMemcpyHostToDevice, stream), "cudaMemcpyAsync");
    check(cudaEventRecord(s.event, stream), "cudaEventRecord");
    next_ = (next_ + 1) % kSlots;
    return true;
  }

 private:
  struct Slot {
    void* host = nullptr;
    cudaEvent_t event = nullptr;
  };
  std::mutex mutex_;
  Slot slots_[kSlots];
  int next_ = 0;
};

struct DeviceState {
  cudaStream_t stream = nullptr;
  std::unique_ptr<CachingAllocator> allocator;
  UploadRing uploads;
  int multiprocessors = 0;
};

std::mutex g_mutex;
std::vector<std::unique_ptr<DeviceState>> g_devices;
int g_count = -1;
std::string g_reason;

int countLocked() {
  if (g_count >= 0) return g_count;
  int n = 0;
  cudaError_t s = cudaGetDeviceCount(&n);
  if (s != cudaSuccess) {
    cudaGetLastError();
    g_reason = std::string("no usable CUDA device: ") + cudaGetErrorName(s) + ": " + cudaGetErrorString(s);
    n = 0;
  } else if (n == 0) {
    g_reason = "no CUDA device found";
  }
  g_count = n;
  g_devices.resize(n);
  return n;
}

DeviceState& state(int index) {
  std::lock_guard<std::mutex> lock(g_mutex);
  int n = countLocked();
  if (index < 0 || index >= n) {
    Error e(ErrorKind::Cuda, "cuda:" + std::to_string(index) + " does not exist (" + std::to_string(n) +
                                 " CUDA device(s) visible)");
    e.cudaName = "cudaErrorInvalidDevice";
    e.number = int(cudaErrorInvalidDevice);
    e.op = "cudaSetDevice";
    throw e;
  }
  auto& d = g_devices[index];
  if (!d) {
    check(cudaSetDevice(index), "cudaSetDevice");
    auto st = std::make_unique<DeviceState>();
    check(cudaStreamCreateWithFlags(&st->stream, cudaStreamNonBlocking), "cudaStreamCreateWithFlags");
    check(cudaDeviceGetAttribute(&st->multiprocessors, cudaDevAttrMultiProcessorCount, index),
          "cudaDeviceGetAttribute");
    st->allocator = std::make_unique<CachingAllocator>(index);
    d = std::move(st);
  }
  return *d;
}

}  // namespace

int deviceCount(std::string* reason) {
  std::lock_guard<std::mutex> lock(g_mutex);
  int n = countLocked();
  if (reason) *reason = g_reason;
  return n;
}

DeviceInfo deviceInfo(int index) {
  use(index);
  cudaDeviceProp p;
  check(cudaGetDeviceProperties(&p, index), "cudaGetDeviceProperties");
  DeviceInfo info;
  info.index = index;
  info.name = p.name;
  info.major = p.major;
  info.minor = p.minor;
  info.multiprocessors = p.multiProcessorCount;
  info.l2Bytes = p.l2CacheSize;
  info.sharedPerBlockOptin = p.sharedMemPerBlockOptin;
  check(cudaMemGetInfo(&info.freeMemory, &info.totalMemory), "cudaMemGetInfo");
  return info;
}

std::vector<std::string> compiledArchitectures() {
  std::vector<std::string> r;
#ifdef __CUDA_ARCH_LIST__
  const int archs[] = {__CUDA_ARCH_LIST__};
  for (int a : archs) r.push_back("cuda:sm_" + std::to_string(a / 10));
#else
  r.push_back("cuda");
#endif
  return r;
}

cudaStream_t use(int index) {
  DeviceState& d = state(index);
  check(cudaSetDevice(index), "cudaSetDevice");
  return d.stream;
}

int multiprocessorCount(int index) { return state(index).multiprocessors; }

void* allocate(int index, size_t bytes) {
  use(index);
  return state(index).allocator->allocate(bytes);
}

void release(int index, void* ptr) {
  // Runs from destructors: must not throw.
  try {
    state(index).allocator->release(ptr);
  } catch (...) {
  }
}

void copy(void* dst, Device dstDevice, const void* src, Device srcDevice, size_t bytes) {
  if (bytes == 0) return;
  if (dstDevice.kind == Device::CUDA && srcDevice.kind == Device::CUDA && dstDevice.index != srcDevice.index) {
    cudaStream_t s = use(dstDevice.index);
    check(cudaMemcpyPeerAsync(dst, dstDevice.index, src, srcDevice.index, bytes, s), "cudaMemcpyPeerAsync");
    return;
  }
  int dev = dstDevice.kind == Device::CUDA ? dstDevice.index : srcDevice.index;
  cudaStream_t s = use(dev);
  if (srcDevice.kind == Device::CPU && dstDevice.kind == Device::CUDA && state(dev).uploads.upload(dst, src, bytes, s)) return;
  check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, s), "cudaMemcpyAsync");
  // Host memory is pageable and owned by JS: finish before handing it back.
  if (dstDevice.kind == Device::CPU || srcDevice.kind == Device::CPU)
    check(cudaStreamSynchronize(s), "cudaStreamSynchronize");
}

void synchronize(int index) { check(cudaStreamSynchronize(use(index)), "cudaStreamSynchronize"); }

MemoryStats memoryStats(int index) { return state(index).allocator->stats(); }

void emptyCache(int index) {
  use(index);
  state(index).allocator->emptyCache();
}

}  // namespace tcal::cuda
