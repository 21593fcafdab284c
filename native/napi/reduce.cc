// sum / mean over one axis or over everything.
#include "../cpu/reduce.h"
#include "common.h"
#ifdef TCAL_WITH_CUDA
#include "../cuda/reduce.h"
#endif

namespace tcal::napi {

namespace {

// reduceSum(x, axis: number | null, mean: boolean, keepDims: boolean, out?) → Promise<Tensor>
Napi::Value ReduceSum(const Napi::CallbackInfo& info) {
  return guard(info.Env(), [&]() -> Napi::Value {
    Tensor x = JsTensor::Get(info[0], "x");
    if (!isFloat(x.dtype())) throwInvalid("x", "expected a floating dtype");
    bool mean = info[2].ToBoolean();
    bool keepDims = info[3].ToBoolean();
    const Shape& s = x.shape();
    int64_t outer = 1, n = x.numel(), inner = 1;
    Shape outShape;
    if (!info[1].IsNull() && !info[1].IsUndefined()) {
      if (!info[1].IsNumber()) throwInvalid("axis", "expected an integer or null");
      int axis = info[1].As<Napi::Number>().Int32Value();
      int nd = int(s.size());
      if (axis < -nd || axis >= nd) throwInvalid("axis", "out of range for shape " + shapeStr(s));
      if (axis < 0) axis += nd;
      outer = 1;
      inner = 1;
      for (int i = 0; i < axis; ++i) outer *= s[i];
      for (int i = axis + 1; i < nd; ++i) inner *= s[i];
      n = s[axis];
      for (int i = 0; i < nd; ++i)
        if (i != axis)
          outShape.push_back(s[i]);
        else if (keepDims)
          outShape.push_back(1);
    } else if (keepDims) {
      outShape.assign(s.size(), 1);
    }
    Tensor out = outputFor(info[4], "out", outShape, x.dtype(), x.device());
    return runOp(
        info.Env(), "reduceSum",
        [x, out, outer, n, inner, mean] {
#ifdef TCAL_WITH_CUDA
          if (x.device().kind == Device::CUDA) return cuda::reduceSum(x, outer, n, inner, mean, out);
#endif
          cpu::reduceSum(x, outer, n, inner, mean, out);
        },
        info[4], out);
  });
}

}  // namespace

void registerReduce(Napi::Env env, Napi::Object exports) {
  exports.Set("reduceSum", Napi::Function::New(env, ReduceSum));
}

}  // namespace tcal::napi
