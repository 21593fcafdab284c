// Ops of the GDN student layer: causalConv1d(+Backward), gatedRmsNorm(+Backward), silu(+Backward). Validation
// here; arithmetic in native/cpu/gdn_layer_ops and native/cuda/gdn_layer_ops. cu_seqlens are read and checked on
// the worker (readSeqOffsets).
#include <cmath>

#include "../cpu/gdn_layer_ops.h"
#include "../cpu/layers_backward.h"  // paramGradDType
#include "common.h"
#ifdef TCAL_WITH_CUDA
#include "../cuda/gdn_layer_ops.h"
#endif

namespace tcal::napi {

namespace {

Napi::Object outsOf(const Napi::Object& opts) {
  Napi::Value v = optionValue(opts, "out");
  if (v.IsUndefined() || v.IsNull()) return Napi::Object::New(opts.Env());
  if (!v.IsObject() || JsTensor::Is(v)) throwInvalid("out", "expected an object of output tensors");
  return v.As<Napi::Object>();
}

double epsArg(const Napi::Value& v) {
  if (!v.IsNumber()) throwInvalid("eps", "expected a number");
  double eps = v.As<Napi::Number>().DoubleValue();
  if (!std::isfinite(eps) || eps < 0) throwInvalid("eps", "must be finite and ≥ 0");
  return eps;
}

// Resolves to {key: tensor} (the caller's JS tensors come back through lib/ops/gdn-layer-ops.ts).
Napi::Promise runOutputs(Napi::Env env, const char* name, PromiseWorker::Work work,
                         std::vector<std::pair<const char*, Tensor>> outs, std::vector<Napi::Value> keep) {
  return runAsync(
      env, name, std::move(work),
      [outs](Napi::Env e) -> Napi::Value {
        Napi::Object res = Napi::Object::New(e);
        for (const auto& [key, t] : outs) res.Set(key, JsTensor::Wrap(e, t));
        return res;
      },
      std::move(keep));
}

// The convolution's arguments: x [B, T, C] floating, weight [C, W] or [C, 1, W] of x's dtype, cuSeqlens i32
// [N+1] (B = 1) on x's device or the CPU.
struct ConvArgs {
  Tensor x, w, cu;
  int64_t N = 0, T = 0;
};
ConvArgs convArgs(const Napi::CallbackInfo& info, const Napi::Object& opts) {
  ConvArgs a;
  a.x = JsTensor::Get(info[0], "x");
  a.w = JsTensor::Get(info[1], "weight");
  checkFloating(a.x, "x");
  checkNdim(a.x, 3, "x");
  checkDType(a.w, a.x.dtype(), "weight");
  checkSameDevice(a.w, a.x.device(), "weight");
  const int64_t C = a.x.dim(2);
  bool shapeOk = (a.w.ndim() == 2 && a.w.dim(0) == C) || (a.w.ndim() == 3 && a.w.dim(0) == C && a.w.dim(1) == 1);
  if (!shapeOk || a.w.dim(-1) < 1)
    throwInvalid("weight", "expected [" + std::to_string(C) + ", W] or [" + std::to_string(C) + ", 1, W], got " +
                               shapeStr(a.w.shape()));
  a.T = a.x.dim(1);
  a.N = a.x.dim(0);
  if (auto cu = optionalTensor(optionValue(opts, "cuSeqlens"), "cuSeqlens")) {
    checkDType(*cu, DType::I32, "cuSeqlens");
    checkNdim(*cu, 1, "cuSeqlens");
    if (cu->dim(0) < 2) throwInvalid("cuSeqlens", "needs at least 2 entries (N+1 offsets)");
    if (a.x.dim(0) != 1) throwInvalid("x", "varlen (cuSeqlens) packs sequences into B = 1, got B = " + std::to_string(a.x.dim(0)));
    if (cu->device() != a.x.device() && cu->device().kind != Device::CPU)
      throwInvalid("cuSeqlens", "expected a tensor on " + a.x.device().str() + " or the CPU");
    a.cu = *cu;
    a.N = cu->dim(0) - 1;
  }
  return a;
}

// causalConv1d(x [B,T,C], weight [C,(1,)W], opts?: {cuSeqlens?, out?}) → y like x
Napi::Value CausalConv1d(const Napi::CallbackInfo& info) {
  return guard(info.Env(), [&]() -> Napi::Value {
    Napi::Object opts = objectArg(info, 2, "options");
    ConvArgs a = convArgs(info, opts);
    Napi::Value given = optionValue(opts, "out");
    Tensor y = outputFor(given, "out", a.x.shape(), a.x.dtype(), a.x.device());
    if (y.numel() > 0 && (y.data() == a.x.data())) throwInvalid("out", "must not share memory with x");
    return runOp(
        info.Env(), "causalConv1d",
        [a, y] {
          auto off = readSeqOffsets(a.cu, a.N, a.T, a.x.numel() / std::max<int64_t>(a.x.dim(2), 1));
          TCAL_DISPATCH(a.x, causalConv1d, a.x, a.w, off, y);
        },
        given, y, {opts});
  });
}

// causalConv1dBackward(x, weight, dy, opts?: {cuSeqlens?, accumulate?, out?: {dx?, dw?}}) → {dx, dw}
// dw has the weight's shape, f32 (f64 for f64 inputs); with `accumulate` the given out.dw is added to.
Napi::Value CausalConv1dBackward(const Napi::CallbackInfo& info) {
  return guard(info.Env(), [&]() -> Napi::Value {
    Napi::Object opts = objectArg(info, 3, "options");
    ConvArgs a = convArgs(info, opts);
    Tensor dy = JsTensor::Get(info[2], "dy");
    checkLike(dy, a.x, "dy");
    bool accumulate = boolOption(opts, "accumulate");
    Napi::Object outs = outsOf(opts);
    if (accumulate && !JsTensor::Is(optionValue(outs, "dw"))) throwInvalid("out.dw", "accumulate needs the dw to add to");
    Tensor dx = outputFor(optionValue(outs, "dx"), "out.dx", a.x.shape(), a.x.dtype(), a.x.device());
    Tensor dw = outputFor(optionValue(outs, "dw"), "out.dw", a.w.shape(), cpu::paramGradDType(a.x.dtype()), a.x.device());
    if (dx.numel() > 0 && (dx.data() == dy.data() || dx.data() == a.x.data()))
      throwInvalid("out.dx", "must not share memory with x or dy");
    return runOutputs(
        info.Env(), "causalConv1dBackward",
        [a, dy, accumulate, dx, dw] {
          auto off = readSeqOffsets(a.cu, a.N, a.T, a.x.numel() / std::max<int64_t>(a.x.dim(2), 1));
          TCAL_DISPATCH(a.x, causalConv1dBackward, a.x, a.w, dy, off, accumulate, dx, dw);
        },
        {{"dx", dx}, {"dw", dw}}, {opts});
  });
}

// x [..., d] floating, weight [d], gate like x.
void checkGatedNorm(const Tensor& x, const Tensor& w, const Tensor& gate) {
  checkFloating(x, "x");
  checkDType(w, x.dtype(), "weight");
  checkSameDevice(w, x.device(), "weight");
  checkNdim(w, 1, "weight");
  if (x.ndim() == 0 || x.dim(-1) != w.dim(0))
    throwInvalid("x", "last dimension of " + shapeStr(x.shape()) + " differs from the weight's " + shapeStr(w.shape()));
  checkLike(gate, x, "gate");
}

// gatedRmsNorm(x, weight, gate, eps, out?) → x/rms(x)·weight ⊙ silu(gate)
Napi::Value GatedRmsNorm(const Napi::CallbackInfo& info) {
  return guard(info.Env(), [&]() -> Napi::Value {
    Tensor x = JsTensor::Get(info[0], "x");
    Tensor w = JsTensor::Get(info[1], "weight");
    Tensor g = JsTensor::Get(info[2], "gate");
    checkGatedNorm(x, w, g);
    double eps = epsArg(info[3]);
    Tensor y = outputFor(info[4], "out", x.shape(), x.dtype(), x.device());
    return runOp(info.Env(), "gatedRmsNorm", [x, w, g, eps, y] { TCAL_DISPATCH(x, gatedRmsNorm, x, w, g, eps, y); },
                 info[4], y);
  });
}

// gatedRmsNormBackward(x, weight, gate, dy, eps, opts?: {accumulate?, out?: {dx?, dw?, dGate?}}) → {dx, dw, dGate}
Napi::Value GatedRmsNormBackward(const Napi::CallbackInfo& info) {
  return guard(info.Env(), [&]() -> Napi::Value {
    Tensor x = JsTensor::Get(info[0], "x");
    Tensor w = JsTensor::Get(info[1], "weight");
    Tensor g = JsTensor::Get(info[2], "gate");
    Tensor dy = JsTensor::Get(info[3], "dy");
    checkGatedNorm(x, w, g);
    checkLike(dy, x, "dy");
    double eps = epsArg(info[4]);
    Napi::Object opts = objectArg(info, 5, "options");
    bool accumulate = boolOption(opts, "accumulate");
    Napi::Object outs = outsOf(opts);
    if (accumulate && !JsTensor::Is(optionValue(outs, "dw"))) throwInvalid("out.dw", "accumulate needs the dw to add to");
    Tensor dx = outputFor(optionValue(outs, "dx"), "out.dx", x.shape(), x.dtype(), x.device());
    Tensor dw = outputFor(optionValue(outs, "dw"), "out.dw", w.shape(), cpu::paramGradDType(x.dtype()), x.device());
    Tensor dg = outputFor(optionValue(outs, "dGate"), "out.dGate", x.shape(), x.dtype(), x.device());
    if (x.numel() > 0 && dx.data() == dg.data()) throwInvalid("out.dGate", "must not share memory with out.dx");
    return runOutputs(
        info.Env(), "gatedRmsNormBackward",
        [x, w, g, dy, eps, accumulate, dx, dw, dg] {
          TCAL_DISPATCH(x, gatedRmsNormBackward, x, w, g, dy, eps, accumulate, dx, dw, dg);
        },
        {{"dx", dx}, {"dw", dw}, {"dGate", dg}}, {opts});
  });
}

// silu(x, out?) → x·σ(x)
Napi::Value Silu(const Napi::CallbackInfo& info) {
  return guard(info.Env(), [&]() -> Napi::Value {
    Tensor x = JsTensor::Get(info[0], "x");
    checkFloating(x, "x");
    Tensor y = outputFor(info[1], "out", x.shape(), x.dtype(), x.device());
    return runOp(info.Env(), "silu", [x, y] { TCAL_DISPATCH(x, silu, x, y); }, info[1], y);
  });
}

// siluBackward(x, dy, out?) → dy·silu'(x) (out may be dy or x)
Napi::Value SiluBackward(const Napi::CallbackInfo& info) {
  return guard(info.Env(), [&]() -> Napi::Value {
    Tensor x = JsTensor::Get(info[0], "x");
    Tensor dy = JsTensor::Get(info[1], "dy");
    checkFloating(x, "x");
    checkLike(dy, x, "dy");
    Tensor dx = outputFor(info[2], "out", x.shape(), x.dtype(), x.device());
    return runOp(info.Env(), "siluBackward", [x, dy, dx] { TCAL_DISPATCH(x, siluBackward, x, dy, dx); }, info[2], dx);
  });
}

}  // namespace

void registerGdnLayerOps(Napi::Env env, Napi::Object exports) {
  exports.Set("causalConv1d", Napi::Function::New(env, CausalConv1d));
  exports.Set("causalConv1dBackward", Napi::Function::New(env, CausalConv1dBackward));
  exports.Set("gatedRmsNorm", Napi::Function::New(env, GatedRmsNorm));
  exports.Set("gatedRmsNormBackward", Napi::Function::New(env, GatedRmsNormBackward));
  exports.Set("silu", Napi::Function::New(env, Silu));
  exports.Set("siluBackward", Napi::Function::New(env, SiluBackward));
}

}  // namespace tcal::napi
