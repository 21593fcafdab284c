#include "check.h"
#include "cublas.h"
#include "device.h"
#include "matmul.h"

namespace tcal::cuda {

namespace {
cudaDataType cudaTypeOf(DType t, const char* arg) {
  switch (t) {
    case DType::F32: return CUDA_R_32F;
    case DType::BF16: return CUDA_R_16BF;
    case DType::F16: return CUDA_R_16F;
    case DType::F64: return CUDA_R_64F;
    default: throwInvalid(arg, std::string("matmul takes floating tensors, got ") + dtypeName(t));
  }
}

int checkedInt(int64_t v, const char* what) {
  if (v > INT32_MAX) throwInvalid(what, "dimension " + std::to_string(v) + " exceeds cuBLAS's 32-bit limit");
  return int(v);
}
}  // namespace

void matmul(const Tensor& a, const Tensor& b, const Tensor& c, const cpu::GemmShape& s, double alpha, double beta,
            bool allowTf32) {
  int dev = a.device().index;
  cudaStream_t stream = use(dev);
  if (s.m == 0 || s.n == 0 || s.batch == 0) return;
  // Row-major C = op(A)·op(B) is column-major Cᵀ = op(B)ᵀ·op(A)ᵀ: pass B first, swap m and n.
  int m = checkedInt(s.n, "b"), n = checkedInt(s.m, "a"), k = checkedInt(s.k, "a");
  int ldb = checkedInt(s.transB ? s.k : s.n, "b");
  int lda = checkedInt(s.transA ? s.m : s.k, "a");
  bool f64 = a.dtype() == DType::F64;
  blas::ComputeType compute = f64 ? blas::Compute64F : (allowTf32 ? blas::Compute32FFastTF32 : blas::Compute32F);
  float alphaF = float(alpha), betaF = float(beta);
  const void* al = f64 ? static_cast<const void*>(&alpha) : &alphaF;
  const void* be = f64 ? static_cast<const void*>(&beta) : &betaF;
  blas::gemmStridedBatched(dev, stream, s.transB ? blas::OpT : blas::OpN, s.transA ? blas::OpT : blas::OpN, m, n,
                           k, al, b.data(), cudaTypeOf(b.dtype(), "b"), ldb, s.strideB, a.data(),
                           cudaTypeOf(a.dtype(), "a"), lda, s.strideA, be, c.data(), cudaTypeOf(c.dtype(), "c"), m,
                           s.strideC, checkedInt(s.batch, "a"), compute);
}

}  // namespace tcal::cuda
