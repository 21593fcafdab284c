// Transformer per-token layers: rmsNorm, rope, embedding, swiglu, crossEntropy.
#include "../cpu/layers.h"
#include "common.h"
#ifdef TCAL_WITH_CUDA
#include "../cuda/layers.h"
#endif

namespace tcal::napi {

namespace {

// rmsNorm(x, w, eps, out?)
Napi::Value RmsNorm(const Napi::CallbackInfo& info) {
  return guard(info.Env(), [&]() -> Napi::Value {
    Tensor x = JsTensor::Get(info[0], "x");
    Tensor w = JsTensor::Get(info[1], "weight");
    checkFloating(x, "x");
    checkDType(w, x.dtype(), "weight");
    checkSameDevice(w, x.device(), "weight");
    checkNdim(w, 1, "weight");
    if (x.ndim() == 0 || x.dim(-1) != w.dim(0))
      throwInvalid("x", "last dimension of " + shapeStr(x.shape()) + " differs from the weight's " + shapeStr(w.shape()));
    if (!info[2].IsNumber()) throwInvalid("eps", "expected a number");
    double eps = info[2].As<Napi::Number>().DoubleValue();
    Tensor y = outputFor(info[3], "out", x.shape(), x.dtype(), x.device());
    return runOp(info.Env(), "rmsNorm", [x, w, eps, y] { TCAL_DISPATCH(x, rmsNorm, x, w, eps, y); }, info[3], y);
  });
}

// rope(x [B,T,H,D], positions int32 [B,T], invFreq f32 [D/2], out?)
Napi::Value Rope(const Napi::CallbackInfo& info) {
  return guard(info.Env(), [&]() -> Napi::Value {
    Tensor x = JsTensor::Get(info[0], "x");
    Tensor pos = JsTensor::Get(info[1], "positions");
    Tensor inv = JsTensor::Get(info[2], "invFreq");
    checkRopeArgs(x, "x", pos, inv);
    Tensor y = outputFor(info[3], "out", x.shape(), x.dtype(), x.device());
    return runOp(info.Env(), "rope", [x, pos, inv, y] { TCAL_DISPATCH(x, rope, x, pos, inv, y); }, info[3], y);
  });
}

// embedding(table [V,D], ids int32 [...], out?) → [..., D]
Napi::Value Embedding(const Napi::CallbackInfo& info) {
  return guard(info.Env(), [&]() -> Napi::Value {
    Tensor table = JsTensor::Get(info[0], "table");
    Tensor ids = JsTensor::Get(info[1], "ids");
    checkNdim(table, 2, "table");
    checkDType(ids, DType::I32, "ids");
    checkSameDevice(ids, table.device(), "ids");
    Shape s = ids.shape();
    s.push_back(table.dim(1));
    Tensor out = outputFor(info[2], "out", s, table.dtype(), table.device());
    return runOp(info.Env(), "embedding", [table, ids, out] { TCAL_DISPATCH(table, embedding, table, ids, out); },
                 info[2], out);
  });
}

// swiglu(gate, up, out?) = silu(gate) · up
Napi::Value Swiglu(const Napi::CallbackInfo& info) {
  return guard(info.Env(), [&]() -> Napi::Value {
    Tensor g = JsTensor::Get(info[0], "gate");
    Tensor u = JsTensor::Get(info[1], "up");
    checkFloating(g, "gate");
    checkDType(u, g.dtype(), "up");
    checkShape(u, g.shape(), "up");
    checkSameDevice(u, g.device(), "up");
    Tensor out = outputFor(info[2], "out", g.shape(), g.dtype(), g.device());
    return runOp(info.Env(), "swiglu", [g, u, out] { TCAL_DISPATCH(g, swiglu, g, u, out); }, info[2], out);
  });
}

// crossEntropy(logits [..., V], targets int32 [...], out?) → f32 [...] (f64 for f64 logits: gradient checks)
Napi::Value CrossEntropy(const Napi::CallbackInfo& info) {
  return guard(info.Env(), [&]() -> Napi::Value {
    Tensor logits = JsTensor::Get(info[0], "logits");
    Tensor targets = JsTensor::Get(info[1], "targets");
    checkFloating(logits, "logits");
    checkDType(targets, DType::I32, "targets");
    checkSameDevice(targets, logits.device(), "targets");
    if (logits.ndim() == 0 || targets.numel() * logits.dim(-1) != logits.numel())
      throwInvalid("targets", "shape " + shapeStr(targets.shape()) + " does not match logits " + shapeStr(logits.shape()));
    DType lossType = logits.dtype() == DType::F64 ? DType::F64 : DType::F32;
    Tensor loss = outputFor(info[2], "out", targets.shape(), lossType, logits.device());
    return runOp(info.Env(), "crossEntropy",
                 [logits, targets, loss] { TCAL_DISPATCH(logits, crossEntropy, logits, targets, loss); }, info[2], loss);
  });
}

}  // namespace

void registerLayers(Napi::Env env, Napi::Object exports) {
  exports.Set("rmsNorm", Napi::Function::New(env, RmsNorm));
  exports.Set("rope", Napi::Function::New(env, Rope));
  exports.Set("embedding", Napi::Function::New(env, Embedding));
  exports.Set("swiglu", Napi::Function::New(env, Swiglu));
  exports.Set("crossEntropy", Napi::Function::New(env, CrossEntropy));
}

}  // namespace tcal::napi
