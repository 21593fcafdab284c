// adamwStep, gradNormSquared: validation here, arithmetic in native/cpu/adamw and native/cuda/adamw.
#include <cmath>
#include <set>

#include "../cpu/adamw.h"
#include "common.h"
#ifdef TCAL_WITH_CUDA
#include "../cuda/adamw.h"
#endif

namespace tcal::napi {

namespace {

bool isHalfOrSingle(DType t) { return t == DType::F32 || t == DType::BF16 || t == DType::F16; }

double numberField(const Napi::Object& o, const char* key, const std::string& where, double fallback, bool required) {
  Napi::Value v = optionValue(o, key);
  if (v.IsUndefined() || v.IsNull()) {
    if (required) throwInvalid(where + "." + key, "is required");
    return fallback;
  }
  if (!v.IsNumber()) throwInvalid(where + "." + key, "expected a number");
  double x = v.As<Napi::Number>().DoubleValue();
  if (!std::isfinite(x)) throwInvalid(where + "." + key, "must be finite");
  return x;
}

// adamwStep(items: [{param, grad, m, v, compute?, lr, beta1, beta2, eps, weightDecay}], {step, gradScale?})
//   → Promise<void>. Updates param, m, v (and compute) in place.
Napi::Value AdamwStep(const Napi::CallbackInfo& info) {
  return guard(info.Env(), [&]() -> Napi::Value {
    if (!info[0].IsArray()) throwInvalid("items", "expected an array of parameter entries");
    if (!info[1].IsObject()) throwInvalid("options", "expected an object {step, gradScale?}");
    Napi::Object opts = info[1].As<Napi::Object>();
    double stepD = numberField(opts, "step", "options", 0, true);
    if (stepD < 1 || stepD != std::floor(stepD) || stepD > 9007199254740991.0)
      throwInvalid("options.step", "must be an integer ≥ 1 (the step being taken, counting from 1)");
    double gradScale = numberField(opts, "gradScale", "options", 1.0, false);
    if (gradScale < 0) throwInvalid("options.gradScale", "must be ≥ 0");

    Napi::Array arr = info[0].As<Napi::Array>();
    std::vector<AdamwItem> items;
    std::set<const void*> seen;
    Device device{};
    for (uint32_t i = 0; i < arr.Length(); ++i) {
      std::string at = "items[" + std::to_string(i) + "]";
      Napi::Value e = arr.Get(i);
      if (!e.IsObject()) throwInvalid(at, "expected an object");
      Napi::Object o = e.As<Napi::Object>();
      AdamwItem it;
      it.param = JsTensor::Get(optionValue(o, "param"), at + ".param");
      it.grad = JsTensor::Get(optionValue(o, "grad"), at + ".grad");
      it.m = JsTensor::Get(optionValue(o, "m"), at + ".m");
      it.v = JsTensor::Get(optionValue(o, "v"), at + ".v");
      if (auto c = optionalTensor(optionValue(o, "compute"), at + ".compute")) it.compute = *c;
      if (i == 0) device = it.param.device();
      checkSameDevice(it.param, device, at + ".param");
      checkDType(it.param, DType::F32, at + ".param");
      for (auto [t, name] : {std::pair<const Tensor*, const char*>{&it.m, ".m"}, {&it.v, ".v"}}) {
        checkDType(*t, DType::F32, at + name);
        checkShape(*t, it.param.shape(), at + name);
        checkSameDevice(*t, device, at + name);
      }
      checkShape(it.grad, it.param.shape(), at + ".grad");
      checkSameDevice(it.grad, device, at + ".grad");
      if (!isHalfOrSingle(it.grad.dtype()))
        throwInvalid(at + ".grad", std::string("expected f32, bf16 or f16, got ") + dtypeName(it.grad.dtype()));
      if (it.compute.defined()) {
        checkShape(it.compute, it.param.shape(), at + ".compute");
        checkSameDevice(it.compute, device, at + ".compute");
        if (!isHalfOrSingle(it.compute.dtype()))
          throwInvalid(at + ".compute", std::string("expected f32, bf16 or f16, got ") + dtypeName(it.compute.dtype()));
      }
      // Written buffers must be distinct (an element updated twice, or a moment aliasing the master, is a bug).
      if (it.param.numel() > 0) {
        std::vector<std::pair<const void*, std::string>> written = {
            {it.param.data(), ".param"}, {it.m.data(), ".m"}, {it.v.data(), ".v"}};
        if (it.compute.defined()) written.push_back({it.compute.data(), ".compute"});
        for (auto& [ptr, name] : written)
          if (!seen.insert(ptr).second) throwInvalid(at + name, "shares memory with another written buffer of this step");
      }
      double lr = numberField(o, "lr", at, 0, true);
      double beta1 = numberField(o, "beta1", at, 0.9, false);
      double beta2 = numberField(o, "beta2", at, 0.999, false);
      double eps = numberField(o, "eps", at, 1e-8, false);
      double wd = numberField(o, "weightDecay", at, 0.0, false);
      if (lr < 0) throwInvalid(at + ".lr", "must be ≥ 0");
      if (beta1 < 0 || beta1 >= 1) throwInvalid(at + ".beta1", "must be in [0, 1)");
      if (beta2 < 0 || beta2 >= 1) throwInvalid(at + ".beta2", "must be in [0, 1)");
      if (eps <= 0) throwInvalid(at + ".eps", "must be > 0");
      if (wd < 0) throwInvalid(at + ".weightDecay", "must be ≥ 0");
      it.c = adamwConstants(lr, beta1, beta2, eps, wd, int64_t(stepD), gradScale);
      items.push_back(std::move(it));
    }
    bool cudaItems = !items.empty() && device.kind == Device::CUDA;
    return runAsync(
        info.Env(), "adamwStep",
        [items = std::move(items), cudaItems] {
#ifdef TCAL_WITH_CUDA
          if (cudaItems) return cuda::adamwStep(items);
#endif
          (void)cudaItems;
          cpu::adamwStep(items);
        },
        nullptr);
  });
}

// gradNormSquared(grads: Tensor[], out?: f64 scalar) → Promise<Tensor>: Σ x² over every element, in double.
Napi::Value GradNormSquared(const Napi::CallbackInfo& info) {
  return guard(info.Env(), [&]() -> Napi::Value {
    if (!info[0].IsArray()) throwInvalid("grads", "expected an array of tensors");
    Napi::Array arr = info[0].As<Napi::Array>();
    if (arr.Length() == 0) throwInvalid("grads", "expected at least one tensor");
    std::vector<Tensor> grads;
    for (uint32_t i = 0; i < arr.Length(); ++i) {
      std::string at = "grads[" + std::to_string(i) + "]";
      Tensor g = JsTensor::Get(arr.Get(i), at);
      if (!isHalfOrSingle(g.dtype()))
        throwInvalid(at, std::string("expected f32, bf16 or f16, got ") + dtypeName(g.dtype()));
      if (i > 0) checkSameDevice(g, grads[0].device(), at);
      grads.push_back(g);
    }
    Tensor out = outputFor(info[1], "out", {}, DType::F64, grads[0].device());
    return runOp(
        info.Env(), "gradNormSquared",
        [grads, out] {
#ifdef TCAL_WITH_CUDA
          if (out.device().kind == Device::CUDA) return cuda::gradNormSquared(grads, out);
#endif
          cpu::gradNormSquared(grads, out);
        },
        info[1], out);
  });
}

}  // namespace

void registerAdamw(Napi::Env env, Napi::Object exports) {
  exports.Set("adamwStep", Napi::Function::New(env, AdamwStep));
  exports.Set("gradNormSquared", Napi::Function::New(env, GradNormSquared));
}

}  // namespace tcal::napi
