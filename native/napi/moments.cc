// The Taylor attention-moment reduction (DESIGN.md §5.1 Pass 1):
//   taylorMoments(q, k, v, invFreq, decays, acc, {scale, cuSeqlens, include, x, context, lse, algorithm})
//     (context: the teacher's per-head A·V [B,T,H,D]; lse: its attention's f32 [B,H,T] log-sum-exp; inputs)
//     → Promise<void>, adding into the caller's f64 accumulators `acc` (see native/cpu/moments.h).
// Shapes, dtypes and devices are validated here (typed InvalidArgument errors naming the argument);
// cu_seqlens, include, invFreq and decays are read and checked on the worker.
#include "../cpu/moments.h"
#include "common.h"
#ifdef TCAL_WITH_CUDA
#include "../cuda/moments.h"
#endif

#include <cmath>
#include <memory>

namespace tcal::napi {

namespace {


// The CUDA kernel (native/cuda/moments.cu) takes the same Problem / Inputs / Accumulators.
#ifdef TCAL_WITH_CUDA
constexpr bool kCudaMoments = true;
#else
constexpr bool kCudaMoments = false;
#endif

void checkAcc(const Tensor& t, const Shape& shape, Device dev, const std::string& arg) {
  checkDType(t, DType::F64, arg);
  checkShape(t, shape, arg);
  checkSameDevice(t, dev, arg);
}

Tensor accFor(const Napi::Object& acc, const char* name, const Shape& shape, Device dev) {
  const std::string arg = std::string("acc.") + name;
  auto t = optionalTensor(optionValue(acc, name), arg);
  if (!t) throwInvalid(arg, "missing accumulator (f64 " + shapeStr(shape) + ")");
  checkAcc(*t, shape, dev, arg);
  return *t;
}

// A small host vector out of a 1-D tensor (CPU or device) of the given dtypes, read on the worker.
template <typename T>
std::vector<T> readVector(const Tensor& t) {
  std::vector<T> out(size_t(t.numel()));
  copyToHost(out.data(), t, out.size() * sizeof(T));
  return out;
}

std::vector<double> readDoubles(const Tensor& t) {
  if (t.dtype() == DType::F64) return readVector<double>(t);
  std::vector<float> f = readVector<float>(t);
  return std::vector<double>(f.begin(), f.end());
}

void resolve(moments::Problem& p, const Tensor& cu, const Tensor& include, const Tensor& invFreq, const Tensor& decays) {
  p.cu = readSeqOffsets(cu, p.N, p.T, p.tokens());
  if (include.defined()) {
    std::vector<int32_t> inc = readVector<int32_t>(include);
    p.include.resize(inc.size());
    for (size_t i = 0; i < inc.size(); ++i) {
      if (inc[i] != 0 && inc[i] != 1) throwInvalid("include", "entries must be 0 or 1, got " + std::to_string(inc[i]));
      p.include[i] = uint8_t(inc[i]);
    }
  }
  p.invFreq = readDoubles(invFreq);
  for (double th : p.invFreq)
    if (!std::isfinite(th)) throwInvalid("invFreq", "must be finite");
  p.decays = readDoubles(decays);
  for (double g : p.decays)
    if (!(g > 0 && g <= 1)) throwInvalid("decays", "every decay must lie in (0, 1], got " + std::to_string(g));
}

Napi::Value TaylorMoments(const Napi::CallbackInfo& info) {
  return guard(info.Env(), [&]() -> Napi::Value {
    Napi::Env env = info.Env();
    moments::Inputs in;
    in.q = JsTensor::Get(info[0], "q");
    in.k = JsTensor::Get(info[1], "k");
    in.v = JsTensor::Get(info[2], "v");
    Tensor invFreq = JsTensor::Get(info[3], "invFreq");
    Tensor decays = JsTensor::Get(info[4], "decays");
    if (info.Length() < 6 || !info[5].IsObject()) throwInvalid("acc", "expected an object of f64 accumulators");
    Napi::Object accObj = info[5].As<Napi::Object>();
    Napi::Object opts = info.Length() > 6 && info[6].IsObject() ? info[6].As<Napi::Object>() : Napi::Object::New(env);
    const Device dev = in.q.device();
    if (dev.kind == Device::CUDA && !kCudaMoments)
      throwInvalid("q", "this binary has no CUDA moment kernel: pass CPU tensors (the CPU reference runs them)");

    moments::Problem p;
    checkNdim(in.q, 4, "q");
    if (!isFloat(in.q.dtype())) throwInvalid("q", std::string("expected a floating dtype, got ") + dtypeName(in.q.dtype()));
    p.B = in.q.dim(0);
    p.T = in.q.dim(1);
    p.H = in.q.dim(2);
    p.D = in.q.dim(3);
    if (p.H <= 0) throwInvalid("q", "needs at least one head");
    if (p.D <= 0 || p.D % 2 != 0 || p.D > 1024) throwInvalid("q", "head dim must be even, in [2, 1024], got " + std::to_string(p.D));
    if (dev.kind == Device::CUDA) {
      if (in.q.dtype() == DType::F64) throwInvalid("q", "f64 inputs run on the CPU only");
      if (p.D > 256) throwInvalid("q", "the CUDA moment reduction takes head dims up to 256, got " + std::to_string(p.D));
    }
    checkNdim(in.k, 4, "k");
    checkDType(in.k, in.q.dtype(), "k");
    checkSameDevice(in.k, dev, "k");
    if (in.k.dim(0) != p.B || in.k.dim(1) != p.T || in.k.dim(3) != p.D)
      throwInvalid("k", "expected shape [" + std::to_string(p.B) + "," + std::to_string(p.T) + ",HKV," +
                            std::to_string(p.D) + "], got " + shapeStr(in.k.shape()));
    p.HKV = in.k.dim(2);
    if (p.HKV <= 0 || p.H % p.HKV != 0)
      throwInvalid("k", "KV heads (" + std::to_string(p.HKV) + ") must divide the query heads (" + std::to_string(p.H) + ")");
    checkShape(in.v, in.k.shape(), "v");
    checkDType(in.v, in.q.dtype(), "v");
    checkSameDevice(in.v, dev, "v");
    if (p.tokens() > INT32_MAX / 2) throwInvalid("q", "too many tokens");

    checkNdim(invFreq, 1, "invFreq");
    if (invFreq.dim(0) != p.D / 2) throwInvalid("invFreq", "expected " + std::to_string(p.D / 2) + " entries (head dim / 2), got " + shapeStr(invFreq.shape()));
    if (invFreq.dtype() != DType::F32 && invFreq.dtype() != DType::F64) throwInvalid("invFreq", "expected dtype f32 or f64");
    if (invFreq.device() != dev && invFreq.device().kind != Device::CPU) throwInvalid("invFreq", "expected a tensor on " + dev.str() + " or the CPU");
    checkNdim(decays, 1, "decays");
    if (decays.dim(0) < 1) throwInvalid("decays", "needs at least one decay");
    if (decays.dtype() != DType::F32 && decays.dtype() != DType::F64) throwInvalid("decays", "expected dtype f32 or f64");
    if (decays.device() != dev && decays.device().kind != Device::CPU) throwInvalid("decays", "expected a tensor on " + dev.str() + " or the CPU");
    const int64_t K0 = decays.dim(0);

    p.scale = scaleOption(opts, p.D);
    Tensor cu, include;
    if (auto c = optionalTensor(optionValue(opts, "cuSeqlens"), "cuSeqlens")) {
      checkDType(*c, DType::I32, "cuSeqlens");
      checkNdim(*c, 1, "cuSeqlens");
      if (c->dim(0) < 2) throwInvalid("cuSeqlens", "needs at least 2 entries (N+1 offsets)");
      if (p.B != 1) throwInvalid("cuSeqlens", "varlen packs sequences into B = 1, got q with B = " + std::to_string(p.B));
      if (c->device() != dev && c->device().kind != Device::CPU) throwInvalid("cuSeqlens", "expected a tensor on " + dev.str() + " or the CPU");
      cu = *c;
      p.N = c->dim(0) - 1;
      p.varlen = true;
    } else {
      p.N = p.B;
    }
    if (auto c = optionalTensor(optionValue(opts, "include"), "include")) {
      checkDType(*c, DType::I32, "include");
      checkShape(*c, {p.N}, "include");
      if (c->device() != dev && c->device().kind != Device::CPU) throwInvalid("include", "expected a tensor on " + dev.str() + " or the CPU");
      include = *c;
    }
    if (auto x = optionalTensor(optionValue(opts, "x"), "x")) {
      checkNdim(*x, 3, "x");
      if (!isFloat(x->dtype())) throwInvalid("x", std::string("expected a floating dtype, got ") + dtypeName(x->dtype()));
      if (x->dim(0) != p.B || x->dim(1) != p.T)
        throwInvalid("x", "expected shape [" + std::to_string(p.B) + "," + std::to_string(p.T) + ",Dx], got " + shapeStr(x->shape()));
      checkSameDevice(*x, dev, "x");
      in.x = *x;
      p.Dx = x->dim(2);
      if (p.Dx <= 0) throwInvalid("x", "needs a positive last dimension");
    }
    moments::Algorithm algorithm = moments::Algorithm::Stream;
    Napi::Value algV = optionValue(opts, "algorithm");
    if (!algV.IsUndefined() && !algV.IsNull()) {
      std::string a = algV.IsString() ? algV.As<Napi::String>().Utf8Value() : "";
      if (a == "materialize")
        algorithm = moments::Algorithm::Materialize;
      else if (a != "stream")
        throwInvalid("algorithm", "expected 'stream' or 'materialize'");
      if (algorithm == moments::Algorithm::Materialize && dev.kind != Device::CPU)
        throwInvalid("algorithm", "'materialize' (the oracle) runs on the CPU only");
    }
    if (auto c = optionalTensor(optionValue(opts, "context"), "context")) {
      checkShape(*c, in.q.shape(), "context");
      if (!isFloat(c->dtype())) throwInvalid("context", std::string("expected a floating dtype, got ") + dtypeName(c->dtype()));
      if (dev.kind == Device::CUDA && c->dtype() == DType::F64) throwInvalid("context", "f64 runs on the CPU only");
      checkSameDevice(*c, dev, "context");
      in.context = *c;
    }
    if (auto l = optionalTensor(optionValue(opts, "lse"), "lse")) {
      // attentionForward's lse of the same q, k (and scale): f32 [B, H, T].
      checkDType(*l, DType::F32, "lse");
      checkShape(*l, {p.B, p.H, p.T}, "lse");
      checkSameDevice(*l, dev, "lse");
      in.lse = *l;
    }

    moments::Accumulators acc;
    acc.count = accFor(accObj, "count", {1}, dev);
    acc.attention = accFor(accObj, "attention", {p.H, moments::kAttentionColumns}, dev);
    acc.histogram = accFor(accObj, "histogram", {p.H, moments::kBins}, dev);
    acc.phi = accFor(accObj, "phi", {p.H, p.D / 2, 2}, dev);
    acc.contextSum = accFor(accObj, "contextSum", {p.H, p.D}, dev);
    acc.contextSq = accFor(accObj, "contextSq", {p.H, p.D}, dev);
    acc.scanCross = accFor(accObj, "scanCross", {p.H, K0, p.D}, dev);
    acc.scanSq = accFor(accObj, "scanSq", {p.H, K0, p.D}, dev);
    acc.keySum = accFor(accObj, "keySum", {p.HKV, p.D}, dev);
    acc.keyOuter = accFor(accObj, "keyOuter", {p.HKV, p.D, p.D}, dev);
    acc.valueSum = accFor(accObj, "valueSum", {p.HKV, p.D}, dev);
    acc.valueOuter = accFor(accObj, "valueOuter", {p.HKV, p.D, p.D}, dev);
    if (in.x.defined()) {
      acc.inputSum = accFor(accObj, "inputSum", {p.Dx}, dev);
      acc.inputOuter = accFor(accObj, "inputOuter", {p.Dx, p.Dx}, dev);
    }

    auto pp = std::make_shared<moments::Problem>(std::move(p));
    return runAsync(
        env, "taylorMoments",
        [pp, in, acc, cu, include, invFreq, decays, algorithm] {
          resolve(*pp, cu, include, invFreq, decays);
          if (!pp->include.empty() && int64_t(pp->include.size()) != pp->N) throwInvalid("include", "expected one flag per sequence");
#ifdef TCAL_WITH_CUDA
          if (in.q.device().kind == Device::CUDA) return cuda::taylorMoments(*pp, in, acc);
#endif
          cpu::taylorMoments(*pp, in, acc, algorithm);
        },
        [](Napi::Env e) -> Napi::Value { return e.Undefined(); }, {accObj, opts});
  });
}

}  // namespace

void registerMoments(Napi::Env env, Napi::Object exports) {
  exports.Set("taylorMoments", Napi::Function::New(env, TaylorMoments));
  exports.Set("taylorMomentsBins", Napi::Number::New(env, moments::kBins));
  exports.Set("taylorMomentsLocalWindow", Napi::Number::New(env, moments::kLocalWindow));
  exports.Set("taylorMomentsCuda", Napi::Boolean::New(env, kCudaMoments));
}

}  // namespace tcal::napi
