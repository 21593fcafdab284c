// matmul: C = alpha·op(A)·op(B) + beta·C, either operand transposed, strided-batched with broadcast of a
// single matrix (batch 1 or 2-D operand) over the other's batch.
#include "../cpu/matmul.h"
#include "common.h"
#ifdef TCAL_WITH_CUDA
#include "../cuda/matmul.h"
#endif

namespace tcal::napi {

namespace {

double numOpt(const Napi::Object& o, const char* key, double dflt) {
  if (!o.Has(key) || o.Get(key).IsUndefined()) return dflt;
  if (!o.Get(key).IsNumber()) throwInvalid(key, "expected a number");
  return o.Get(key).As<Napi::Number>().DoubleValue();
}

// (batch, rows, cols) of a 2-D or 3-D operand.
void dims3(const Tensor& t, const char* arg, int64_t& batch, int64_t& rows, int64_t& cols) {
  if (t.ndim() == 2) {
    batch = 1;
    rows = t.dim(0);
    cols = t.dim(1);
  } else if (t.ndim() == 3) {
    batch = t.dim(0);
    rows = t.dim(1);
    cols = t.dim(2);
  } else {
    throwInvalid(arg, "expected 2 or 3 dimensions, got shape " + shapeStr(t.shape()));
  }
}

// matmul(a, b, {transA, transB, alpha, beta, c, outDtype, allowTf32}) → Promise<Tensor>
Napi::Value Matmul(const Napi::CallbackInfo& info) {
  return guard(info.Env(), [&]() -> Napi::Value {
    Tensor a = JsTensor::Get(info[0], "a");
    Tensor b = JsTensor::Get(info[1], "b");
    Napi::Object opts = info[2].IsObject() ? info[2].As<Napi::Object>() : Napi::Object::New(info.Env());
    if (!isFloat(a.dtype())) throwInvalid("a", "expected a floating dtype");
    checkDType(b, a.dtype(), "b");
    checkSameDevice(b, a.device(), "b");
    cpu::GemmShape s{};
    s.transA = boolOption(opts, "transA");
    s.transB = boolOption(opts, "transB");
    int64_t ba, ra, ca, bb, rb, cb;
    dims3(a, "a", ba, ra, ca);
    dims3(b, "b", bb, rb, cb);
    s.m = s.transA ? ca : ra;
    s.k = s.transA ? ra : ca;
    int64_t kb = s.transB ? cb : rb;
    s.n = s.transB ? rb : cb;
    if (kb != s.k)
      throwInvalid("b", "inner dimensions differ: op(a) is " + std::to_string(s.m) + "x" + std::to_string(s.k) +
                            ", op(b) is " + std::to_string(kb) + "x" + std::to_string(s.n));
    if (ba != bb && ba != 1 && bb != 1)
      throwInvalid("b", "batch " + std::to_string(bb) + " does not match a's batch " + std::to_string(ba));
    s.batch = std::max(ba, bb);
    s.strideA = ba == 1 ? 0 : ra * ca;
    s.strideB = bb == 1 ? 0 : rb * cb;
    s.strideC = s.m * s.n;
    Shape cShape = (a.ndim() == 3 || b.ndim() == 3) ? Shape{s.batch, s.m, s.n} : Shape{s.m, s.n};
    double alpha = numOpt(opts, "alpha", 1.0);
    double beta = numOpt(opts, "beta", 0.0);
    bool allowTf32 = boolOption(opts, "allowTf32");
    Napi::Value cArg = opts.Has("c") ? opts.Get("c") : info.Env().Undefined();
    Tensor c;
    if (auto given = optionalTensor(cArg, "c")) {
      checkShape(*given, cShape, "c");
      checkSameDevice(*given, a.device(), "c");
      if (given->dtype() != a.dtype() && given->dtype() != DType::F32)
        throwInvalid("c", std::string("dtype must be ") + dtypeName(a.dtype()) + " or f32");
      c = *given;
    } else {
      if (beta != 0) throwInvalid("beta", "nonzero beta needs an input/output tensor c");
      DType outType = a.dtype();
      if (opts.Has("outDtype") && !opts.Get("outDtype").IsUndefined()) {
        outType = parseDTypeArg(opts.Get("outDtype"), "outDtype");
        if (outType != a.dtype() && outType != DType::F32)
          throwInvalid("outDtype", std::string("must be ") + dtypeName(a.dtype()) + " or f32");
      }
      c = empty(cShape, outType, a.device());
    }
    return runOp(
        info.Env(), "matmul",
        [a, b, c, s, alpha, beta, allowTf32] {
#ifdef TCAL_WITH_CUDA
          if (a.device().kind == Device::CUDA) return cuda::matmul(a, b, c, s, alpha, beta, allowTf32);
#endif
          (void)allowTf32;
          cpu::matmul(a, b, c, s, alpha, beta);
        },
        cArg, c);
  });
}

}  // namespace

void registerMatmul(Napi::Env env, Napi::Object exports) {
  exports.Set("matmul", Napi::Function::New(env, Matmul));
}

}  // namespace tcal::napi
