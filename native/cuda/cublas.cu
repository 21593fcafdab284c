#include <dlfcn.h>

#include <mutex>
#include <vector>

#include "check.h"
#include "cublas.h"

namespace tcal::cuda::blas {

namespace {
using Handle = void*;
using CreateFn = int (*)(Handle*);
using SetStreamFn = int (*)(Handle, cudaStream_t);
using SetWorkspaceFn = int (*)(Handle, void*, size_t);
using StatusNameFn = const char* (*)(int);
using GemmFn = int (*)(Handle, int, int, int, int, int, const void*, const void*, cudaDataType, int, long long,
                       const void*, cudaDataType, int, long long, const void*, void*, cudaDataType, int, long long,
                       int, int, int);

constexpr int kGemmDefaultAlgo = -1;
// cuBLAS on Hopper wants a workspace for its best kernels; 32 MiB is what PyTorch gives it.
constexpr size_t kWorkspaceBytes = size_t(32) << 20;

struct Library {
  void* so = nullptr;
  std::string name, error;
  CreateFn create = nullptr;
  SetStreamFn setStream = nullptr;
  SetWorkspaceFn setWorkspace = nullptr;
  StatusNameFn statusName = nullptr;
  GemmFn gemm = nullptr;
  std::vector<Handle> handles;     // per device
  std::vector<void*> workspaces;   // per device
};

std::mutex g_mutex;
Library g_lib;
bool g_tried = false;

void loadLocked() {
  if (g_tried) return;
  g_tried = true;
  for (const char* n : {"libcublas.so.13", "libcublas.so.12", "libcublas.so"}) {
    g_lib.so = dlopen(n, RTLD_NOW | RTLD_LOCAL);
    if (g_lib.so) {
      g_lib.name = n;
      break;
    }
    g_lib.error = dlerror();
  }
  if (!g_lib.so) {
    g_lib.error = "cuBLAS could not be loaded (tried libcublas.so.13, .12, .so): " + g_lib.error;
    return;
  }
  g_lib.create = reinterpret_cast<CreateFn>(dlsym(g_lib.so, "cublasCreate_v2"));
  g_lib.setStream = reinterpret_cast<SetStreamFn>(dlsym(g_lib.so, "cublasSetStream_v2"));
  g_lib.setWorkspace = reinterpret_cast<SetWorkspaceFn>(dlsym(g_lib.so, "cublasSetWorkspace_v2"));
  g_lib.statusName = reinterpret_cast<StatusNameFn>(dlsym(g_lib.so, "cublasGetStatusName"));
  g_lib.gemm = reinterpret_cast<GemmFn>(dlsym(g_lib.so, "cublasGemmStridedBatchedEx"));
  if (!g_lib.create || !g_lib.setStream || !g_lib.gemm) {
    g_lib.error = g_lib.name + " lacks cublasCreate_v2 / cublasSetStream_v2 / cublasGemmStridedBatchedEx";
    dlclose(g_lib.so);
    g_lib.so = nullptr;
  }
}

[[noreturn]] void throwBlas(int status, const char* op) {
  Error e(ErrorKind::Cuda, "");
  std::string name = g_lib.statusName ? g_lib.statusName(status) : "CUBLAS_STATUS_" + std::to_string(status);
  if (status == 3) {  // CUBLAS_STATUS_ALLOC_FAILED
    Error oom(ErrorKind::OutOfMemory, std::string(op) + ": cuBLAS could not allocate device memory (" + name + ")");
    oom.op = op;
    throw oom;
  }
  e = Error(ErrorKind::Cuda, std::string(op) + " failed: " + name + " (" + std::to_string(status) + ")");
  e.cudaName = name;
  e.number = status;
  e.op = op;
  throw e;
}

Handle handleLocked(int device) {
  if (!g_lib.so) {
    Error e(ErrorKind::Cuda, g_lib.error);
    e.cudaName = "CUBLAS_STATUS_NOT_INITIALIZED";
    e.number = 1;
    e.op = "dlopen(libcublas)";
    throw e;
  }
  if (int(g_lib.handles.size()) <= device) {
    g_lib.handles.resize(device + 1, nullptr);
    g_lib.workspaces.resize(device + 1, nullptr);
  }
  if (!g_lib.handles[device]) {
    Handle h = nullptr;
    int st = g_lib.create(&h);
    if (st != 0) throwBlas(st, "cublasCreate");
    g_lib.handles[device] = h;
    if (g_lib.setWorkspace) {
      check(cudaMalloc(&g_lib.workspaces[device], kWorkspaceBytes), "cudaMalloc(cublas workspace)");
      st = g_lib.setWorkspace(h, g_lib.workspaces[device], kWorkspaceBytes);
      if (st != 0) throwBlas(st, "cublasSetWorkspace");
    }
  }
  return g_lib.handles[device];
}
}  // namespace

std::string status() {
  std::lock_guard<std::mutex> lock(g_mutex);
  loadLocked();
  return g_lib.so ? g_lib.name : g_lib.error;
}

bool available(std::string* reason) {
  std::lock_guard<std::mutex> lock(g_mutex);
  loadLocked();
  if (reason) *reason = g_lib.so ? g_lib.name : g_lib.error;
  return g_lib.so != nullptr;
}

void gemmStridedBatched(int device, cudaStream_t stream, Operation opA, Operation opB, int m, int n, int k,
                        const void* alpha, const void* A, cudaDataType aType, int lda, long long strideA,
                        const void* B, cudaDataType bType, int ldb, long long strideB, const void* beta, void* C,
                        cudaDataType cType, int ldc, long long strideC, int batch, ComputeType compute) {
  // One handle per device, used by one thread at a time (cuBLAS handles are not thread-safe).
  std::lock_guard<std::mutex> lock(g_mutex);
  loadLocked();
  Handle h = handleLocked(device);
  int st = g_lib.setStream(h, stream);
  if (st != 0) throwBlas(st, "cublasSetStream");
  st = g_lib.gemm(h, opA, opB, m, n, k, alpha, A, aType, lda, strideA, B, bType, ldb, strideB, beta, C, cType, ldc,
                  strideC, batch, compute, kGemmDefaultAlgo);
  if (st != 0) throwBlas(st, "cublasGemmStridedBatchedEx");
}

}  // namespace tcal::cuda::blas
