// cast, add, mul, scale, fill: validation here, arithmetic in native/cpu and native/cuda.
#include "../cpu/elementwise.h"
#include "common.h"
#ifdef TCAL_WITH_CUDA
#include "../cuda/elementwise.h"
#endif

namespace tcal::napi {

namespace {

Napi::Value Cast(const Napi::CallbackInfo& info) {
  return guard(info.Env(), [&]() -> Napi::Value {
    Tensor x = JsTensor::Get(info[0], "x");
    DType dtype = parseDTypeArg(info[1], "dtype");
    checkFloating(x, "x");
    if (!isFloat(dtype)) throwInvalid("dtype", "cast supports floating dtypes only");
    Tensor out = outputFor(info[2], "out", x.shape(), dtype, x.device());
    return runOp(info.Env(), "cast", [x, out] { TCAL_DISPATCH(x, cast, x, out); }, info[2], out);
  });
}

template <int Op>
Napi::Value Binary(const Napi::CallbackInfo& info) {
  return guard(info.Env(), [&]() -> Napi::Value {
    Tensor a = JsTensor::Get(info[0], "a");
    Tensor b = JsTensor::Get(info[1], "b");
    checkFloating(a, "a");
    checkDType(b, a.dtype(), "b");
    checkSameDevice(b, a.device(), "b");
    // b equals a's shape or a suffix of it (broadcast over a's leading dimensions).
    const Shape& sa = a.shape();
    const Shape& sb = b.shape();
    bool suffix = sb.size() <= sa.size() && std::equal(sb.begin(), sb.end(), sa.end() - sb.size());
    if (!suffix || (b.numel() == 0 && a.numel() != 0))
      throwInvalid("b", "shape " + shapeStr(sb) + " is neither " + shapeStr(sa) + " nor a suffix of it");
    Tensor out = outputFor(info[2], "out", sa, a.dtype(), a.device());
    return runOp(
        info.Env(), Op == 0 ? "add" : "mul",
        [a, b, out] {
          if (Op == 0)
            TCAL_DISPATCH(a, add, a, b, out);
          else
            TCAL_DISPATCH(a, mul, a, b, out);
        },
        info[2], out);
  });
}

Napi::Value Scale(const Napi::CallbackInfo& info) {
  return guard(info.Env(), [&]() -> Napi::Value {
    Tensor x = JsTensor::Get(info[0], "x");
    checkFloating(x, "x");
    if (!info[1].IsNumber()) throwInvalid("alpha", "expected a number");
    double alpha = info[1].As<Napi::Number>().DoubleValue();
    Tensor out = outputFor(info[2], "out", x.shape(), x.dtype(), x.device());
    return runOp(info.Env(), "scale", [x, alpha, out] { TCAL_DISPATCH(x, scale, x, alpha, out); }, info[2], out);
  });
}

Napi::Value Fill(const Napi::CallbackInfo& info) {
  return guard(info.Env(), [&]() -> Napi::Value {
    Tensor t = JsTensor::Get(info[0], "t");
    if (!info[1].IsNumber()) throwInvalid("value", "expected a number");
    double v = info[1].As<Napi::Number>().DoubleValue();
    return runOp(info.Env(), "fill", [t, v] { TCAL_DISPATCH(t, fill, t, v); }, info[0], t);
  });
}

// random(t, kind: 'uniform' | 'normal', seed, a, b) → Promise<t>
Napi::Value Random(const Napi::CallbackInfo& info) {
  return guard(info.Env(), [&]() -> Napi::Value {
    Tensor t = JsTensor::Get(info[0], "t");
    checkFloating(t, "t");
    std::string kind = info[1].IsString() ? info[1].As<Napi::String>().Utf8Value() : "";
    if (kind != "uniform" && kind != "normal") throwInvalid("kind", "expected 'uniform' or 'normal'");
    for (int i = 2; i < 5; ++i)
      if (!info[i].IsNumber()) throwInvalid(i == 2 ? "seed" : i == 3 ? "a" : "b", "expected a number");
    double seedD = info[2].As<Napi::Number>().DoubleValue();
    if (seedD < 0 || seedD != double(uint64_t(seedD))) throwInvalid("seed", "expected a non-negative integer");
    uint64_t seed = uint64_t(seedD);
    double a = info[3].As<Napi::Number>().DoubleValue(), b = info[4].As<Napi::Number>().DoubleValue();
    int k = kind == "normal" ? 1 : 0;
    return runOp(info.Env(), "random", [t, k, seed, a, b] { TCAL_DISPATCH(t, random, t, k, seed, a, b); }, info[0], t);
  });
}

}  // namespace

void registerElementwise(Napi::Env env, Napi::Object exports) {
  exports.Set("cast", Napi::Function::New(env, Cast));
  exports.Set("add", Napi::Function::New(env, Binary<0>));
  exports.Set("mul", Napi::Function::New(env, Binary<1>));
  exports.Set("scale", Napi::Function::New(env, Scale));
  exports.Set("fill", Napi::Function::New(env, Fill));
  exports.Set("random", Napi::Function::New(env, Random));
}

}  // namespace tcal::napi
