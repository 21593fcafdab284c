// Backward passes of the Transformer per-token layers: rmsNormBackward, ropeBackward, swigluBackward,
// embeddingBackward, crossEntropyBackward, crossEntropyForwardBackward. Validation here; arithmetic in
// native/cpu/layers_backward and native/cuda/layers_backward.
#include <cmath>

#include "../cpu/layers_backward.h"
#include "common.h"
#ifdef TCAL_WITH_CUDA
#include "../cuda/layers_backward.h"
#endif

namespace tcal::napi {

namespace {

// The `out` argument of a multi-output op: undefined / null, or an object whose keys name output tensors.
Napi::Object outObject(const Napi::CallbackInfo& info, size_t i, const char* keys) {
  return objectArg(info, i, "out", std::string("an object ") + keys);
}

void checkLogitsTargets(const Tensor& logits, const Tensor& targets, const char* logitsName = "logits",
                        const char* targetsName = "targets") {
  checkFloating(logits, logitsName);
  checkDType(targets, DType::I32, targetsName);
  checkSameDevice(targets, logits.device(), targetsName);
  if (logits.ndim() == 0 || targets.numel() * logits.dim(-1) != logits.numel())
    throwInvalid(targetsName, "shape " + shapeStr(targets.shape()) + " does not match " + logitsName + " " + shapeStr(logits.shape()));
}

// rmsNormBackward(x [..., d], w [d], dy [..., d], eps, out?: {dx?, dw?}) → {dx, dw (f32; f64 for f64 inputs)}
Napi::Value RmsNormBackward(const Napi::CallbackInfo& info) {
  return guard(info.Env(), [&]() -> Napi::Value {
    Tensor x = JsTensor::Get(info[0], "x");
    Tensor w = JsTensor::Get(info[1], "weight");
    Tensor dy = JsTensor::Get(info[2], "dy");
    checkFloating(x, "x");
    checkDType(w, x.dtype(), "weight");
    checkSameDevice(w, x.device(), "weight");
    checkNdim(w, 1, "weight");
    if (x.ndim() == 0 || x.dim(-1) != w.dim(0))
      throwInvalid("x", "last dimension of " + shapeStr(x.shape()) + " differs from the weight's " + shapeStr(w.shape()));
    checkLike(dy, x, "dy");
    if (!info[3].IsNumber()) throwInvalid("eps", "expected a number");
    double eps = info[3].As<Napi::Number>().DoubleValue();
    if (!std::isfinite(eps) || eps < 0) throwInvalid("eps", "must be finite and ≥ 0");
    Napi::Object outs = outObject(info, 4, "{dx?, dw?}");
    Napi::Value dxGiven = optionValue(outs, "dx"), dwGiven = optionValue(outs, "dw");
    Tensor dx = outputFor(dxGiven, "out.dx", x.shape(), x.dtype(), x.device());
    Tensor dw = outputFor(dwGiven, "out.dw", w.shape(), cpu::paramGradDType(x.dtype()), x.device());
    return runMulti(
        info.Env(), "rmsNormBackward", [x, w, dy, eps, dx, dw] { TCAL_DISPATCH(x, rmsNormBackward, x, w, dy, eps, dx, dw); },
        {{"dx", dxGiven, dx}, {"dw", dwGiven, dw}}, {outs});
  });
}

// ropeBackward(dy [B,T,H,D], positions int32 [B,T], invFreq f32 [D/2], out?) → dx (may be dy itself)
Napi::Value RopeBackward(const Napi::CallbackInfo& info) {
  return guard(info.Env(), [&]() -> Napi::Value {
    Tensor dy = JsTensor::Get(info[0], "dy");
    Tensor pos = JsTensor::Get(info[1], "positions");
    Tensor inv = JsTensor::Get(info[2], "invFreq");
    checkRopeArgs(dy, "dy", pos, inv);
    Tensor dx = outputFor(info[3], "out", dy.shape(), dy.dtype(), dy.device());
    return runOp(info.Env(), "ropeBackward", [dy, pos, inv, dx] { TCAL_DISPATCH(dy, ropeBackward, dy, pos, inv, dx); },
                 info[3], dx);
  });
}

// swigluBackward(gate, up, dOut, out?: {dGate?, dUp?}) → {dGate, dUp}
Napi::Value SwigluBackward(const Napi::CallbackInfo& info) {
  return guard(info.Env(), [&]() -> Napi::Value {
    Tensor g = JsTensor::Get(info[0], "gate");
    Tensor u = JsTensor::Get(info[1], "up");
    Tensor d = JsTensor::Get(info[2], "dOut");
    checkFloating(g, "gate");
    checkLike(u, g, "up");
    checkLike(d, g, "dOut");
    Napi::Object outs = outObject(info, 3, "{dGate?, dUp?}");
    Napi::Value dgGiven = optionValue(outs, "dGate"), duGiven = optionValue(outs, "dUp");
    Tensor dg = outputFor(dgGiven, "out.dGate", g.shape(), g.dtype(), g.device());
    Tensor du = outputFor(duGiven, "out.dUp", g.shape(), g.dtype(), g.device());
    if (g.numel() > 0 && dg.data() == du.data()) throwInvalid("out.dUp", "must not share memory with out.dGate");
    return runMulti(
        info.Env(), "swigluBackward", [g, u, d, dg, du] { TCAL_DISPATCH(g, swigluBackward, g, u, d, dg, du); },
        {{"dGate", dgGiven, dg}, {"dUp", duGiven, du}}, {outs});
  });
}

// embeddingBackward(ids int32 [...], dOut [..., D], vocabSize, out?) → dTable [V, D] (f32; f64 for f64 dOut)
Napi::Value EmbeddingBackward(const Napi::CallbackInfo& info) {
  return guard(info.Env(), [&]() -> Napi::Value {
    Tensor ids = JsTensor::Get(info[0], "ids");
    Tensor d = JsTensor::Get(info[1], "dOut");
    checkDType(ids, DType::I32, "ids");
    checkFloating(d, "dOut");
    checkSameDevice(ids, d.device(), "ids");
    if (d.ndim() != ids.ndim() + 1)
      throwInvalid("dOut", "expected shape [..." + shapeStr(ids.shape()) + ", D], got " + shapeStr(d.shape()));
    for (int i = 0; i < ids.ndim(); ++i)
      if (d.dim(i) != ids.dim(i))
        throwInvalid("dOut", "expected shape [..." + shapeStr(ids.shape()) + ", D], got " + shapeStr(d.shape()));
    if (!info[2].IsNumber()) throwInvalid("vocabSize", "expected a number");
    double vd = info[2].As<Napi::Number>().DoubleValue();
    if (!(vd >= 1) || vd != std::floor(vd) || vd > 2147483647.0) throwInvalid("vocabSize", "expected an integer in [1, 2^31)");
    int64_t V = int64_t(vd);
    Tensor table = outputFor(info[3], "out", {V, d.dim(-1)}, cpu::paramGradDType(d.dtype()), d.device());
    return runOp(info.Env(), "embeddingBackward", [ids, d, table] { TCAL_DISPATCH(d, embeddingBackward, ids, d, table); },
                 info[3], table);
  });
}

// crossEntropyBackward(logits [..., V], targets int32 [...], dLoss f32 [...], out?) → dLogits (may be logits)
Napi::Value CrossEntropyBackward(const Napi::CallbackInfo& info) {
  return guard(info.Env(), [&]() -> Napi::Value {
    Tensor logits = JsTensor::Get(info[0], "logits");
    Tensor targets = JsTensor::Get(info[1], "targets");
    Tensor dLoss = JsTensor::Get(info[2], "dLoss");
    checkLogitsTargets(logits, targets);
    checkDType(dLoss, DType::F32, "dLoss");
    checkShape(dLoss, targets.shape(), "dLoss");
    checkSameDevice(dLoss, logits.device(), "dLoss");
    Tensor dl = outputFor(info[3], "out", logits.shape(), logits.dtype(), logits.device());
    return runOp(
        info.Env(), "crossEntropyBackward",
        [logits, targets, dLoss, dl] { TCAL_DISPATCH(logits, crossEntropyBackward, logits, targets, dLoss, dl); }, info[3],
        dl);
  });
}

// crossEntropyForwardBackward(logits, targets, scale, out?: {loss?, dLogits?}) → {loss f32 [...], dLogits}
Napi::Value CrossEntropyForwardBackward(const Napi::CallbackInfo& info) {
  return guard(info.Env(), [&]() -> Napi::Value {
    Tensor logits = JsTensor::Get(info[0], "logits");
    Tensor targets = JsTensor::Get(info[1], "targets");
    checkLogitsTargets(logits, targets);
    if (!info[2].IsNumber()) throwInvalid("scale", "expected a number");
    double scale = info[2].As<Napi::Number>().DoubleValue();
    if (!std::isfinite(scale)) throwInvalid("scale", "must be finite");
    Napi::Object outs = outObject(info, 3, "{loss?, dLogits?}");
    Napi::Value lossGiven = optionValue(outs, "loss"), dlGiven = optionValue(outs, "dLogits");
    Tensor loss = outputFor(lossGiven, "out.loss", targets.shape(), DType::F32, logits.device());
    Tensor dl = outputFor(dlGiven, "out.dLogits", logits.shape(), logits.dtype(), logits.device());
    return runMulti(
        info.Env(), "crossEntropyForwardBackward",
        [logits, targets, scale, loss, dl] {
          TCAL_DISPATCH(logits, crossEntropyForwardBackward, logits, targets, scale, loss, dl);
        },
        {{"loss", lossGiven, loss}, {"dLogits", dlGiven, dl}}, {outs});
  });
}

// klForwardBackward(studentLogits, teacherLogits, rowMask int32, scale, out?: {loss?, dLogits?})
//   → {loss f32 [...] (KL(teacher ‖ student) per row), dLogits (d/d student, may be the student logits)}
Napi::Value KlForwardBackward(const Napi::CallbackInfo& info) {
  return guard(info.Env(), [&]() -> Napi::Value {
    Tensor student = JsTensor::Get(info[0], "studentLogits");
    Tensor teacher = JsTensor::Get(info[1], "teacherLogits");
    Tensor mask = JsTensor::Get(info[2], "rowMask");
    checkLogitsTargets(student, mask, "studentLogits", "rowMask");
    checkDType(teacher, student.dtype(), "teacherLogits");
    checkShape(teacher, student.shape(), "teacherLogits");
    checkSameDevice(teacher, student.device(), "teacherLogits");
    if (!info[3].IsNumber()) throwInvalid("scale", "expected a number");
    double scale = info[3].As<Napi::Number>().DoubleValue();
    if (!std::isfinite(scale)) throwInvalid("scale", "must be finite");
    Napi::Object outs = outObject(info, 4, "{loss?, dLogits?}");
    Napi::Value lossGiven = optionValue(outs, "loss"), dlGiven = optionValue(outs, "dLogits");
    Tensor loss = outputFor(lossGiven, "out.loss", mask.shape(), DType::F32, student.device());
    Tensor dl = outputFor(dlGiven, "out.dLogits", student.shape(), student.dtype(), student.device());
    if (dl.data() == teacher.data()) throwInvalid("out.dLogits", "must not be the teacher logits");
    return runMulti(
        info.Env(), "klForwardBackward",
        [student, teacher, mask, scale, loss, dl] {
          TCAL_DISPATCH(student, klForwardBackward, student, teacher, mask, scale, loss, dl);
        },
        {{"loss", lossGiven, loss}, {"dLogits", dlGiven, dl}}, {outs});
  });
}

}  // namespace

void registerLayersBackward(Napi::Env env, Napi::Object exports) {
  exports.Set("rmsNormBackward", Napi::Function::New(env, RmsNormBackward));
  exports.Set("ropeBackward", Napi::Function::New(env, RopeBackward));
  exports.Set("swigluBackward", Napi::Function::New(env, SwigluBackward));
  exports.Set("embeddingBackward", Napi::Function::New(env, EmbeddingBackward));
  exports.Set("crossEntropyBackward", Napi::Function::New(env, CrossEntropyBackward));
  exports.Set("crossEntropyForwardBackward", Napi::Function::New(env, CrossEntropyForwardBackward));
  exports.Set("klForwardBackward", Napi::Function::New(env, KlForwardBackward));
}

}  // namespace tcal::napi
