// Causal attention: attentionForward(q, k, v, {scale, cuSeqlens, returnLse, out}) → {o, lse}. Shapes,
// dtypes and devices are validated here (typed InvalidArgument errors naming the argument); cu_seqlens values
// are read and checked on the worker.
#include "../cpu/attention.h"
#include "common.h"
#ifdef TCAL_WITH_CUDA
#include "../cuda/attention.h"
#endif

#include <cmath>
#include <memory>

namespace tcal::napi {

namespace {


// attentionForward(q, k, v, opts) → Promise<{o, lse}>
Napi::Value Forward(const Napi::CallbackInfo& info) {
  return guard(info.Env(), [&]() -> Napi::Value {
    Tensor q = JsTensor::Get(info[0], "q");
    Tensor k = JsTensor::Get(info[1], "k");
    Tensor v = JsTensor::Get(info[2], "v");
    Napi::Object opts = info.Length() > 3 && info[3].IsObject() ? info[3].As<Napi::Object>() : Napi::Object::New(info.Env());
    const Device dev = q.device();
    const bool cuda = dev.kind == Device::CUDA;
    checkNdim(q, 4, "q");
    if (q.dtype() != DType::F32 && q.dtype() != DType::BF16 && q.dtype() != DType::F16 &&
        !(q.dtype() == DType::F64 && !cuda))
      throwInvalid("q", std::string("expected dtype bf16, f16 or f32 (f64 on the CPU), got ") + dtypeName(q.dtype()));
    attn::Problem p;
    p.B = q.dim(0);
    p.T = q.dim(1);
    p.H = q.dim(2);
    p.D = q.dim(3);
    // The CPU takes any head dim; CUDA runs 64, 128 and 256 natively and zero-pads other multiples of 8
    // below 256 (tiny teachers such as the parity fixtures have head dims of 16 or 32).
    if (p.D <= 0 || p.D > 256 || (cuda && p.D % 8 != 0))
      throwInvalid("q", "head dim must be in 1..256 (a multiple of 8 on CUDA), got " + std::to_string(p.D));
    if (p.H <= 0) throwInvalid("q", "needs at least one head");
    checkNdim(k, 4, "k");
    checkDType(k, q.dtype(), "k");
    checkSameDevice(k, dev, "k");
    if (k.dim(0) != p.B || k.dim(1) != p.T || k.dim(3) != p.D)
      throwInvalid("k", "expected shape [" + std::to_string(p.B) + "," + std::to_string(p.T) + ",HKV," +
                            std::to_string(p.D) + "], got " + shapeStr(k.shape()));
    p.HKV = k.dim(2);
    if (p.HKV <= 0 || p.H % p.HKV != 0)
      throwInvalid("k", "KV heads (" + std::to_string(p.HKV) + ") must divide the query heads (" + std::to_string(p.H) + ")");
    checkShape(v, k.shape(), "v");
    checkDType(v, q.dtype(), "v");
    checkSameDevice(v, dev, "v");
    if (p.B * p.T > INT32_MAX / 2) throwInvalid("q", "too many tokens");

    p.scale = scaleOption(opts, p.D);
    Tensor cu;
    if (auto c = optionalTensor(optionValue(opts, "cuSeqlens"), "cuSeqlens")) {
      checkDType(*c, DType::I32, "cuSeqlens");
      checkNdim(*c, 1, "cuSeqlens");
      if (c->dim(0) < 2) throwInvalid("cuSeqlens", "needs at least 2 entries (N+1 offsets)");
      if (p.B != 1)
        throwInvalid("cuSeqlens", "varlen packs sequences into B = 1, got q with B = " + std::to_string(p.B));
      if (c->device() != dev && c->device().kind != Device::CPU)
        throwInvalid("cuSeqlens", "expected a tensor on " + dev.str() + " or the CPU");
      cu = *c;
      p.N = c->dim(0) - 1;
      p.varlen = true;
    } else {
      p.N = p.B;
    }
    const bool wantLse = boolOption(opts, "returnLse");
    // out: a tensor (o) or {o, lse}.
    Napi::Value outV = optionValue(opts, "out");
    Napi::Value oGiven = info.Env().Undefined(), lseGiven = info.Env().Undefined();
    if (JsTensor::Is(outV)) {
      oGiven = outV;
    } else if (outV.IsObject()) {
      Napi::Object outs = outV.As<Napi::Object>();
      oGiven = optionValue(outs, "o");
      lseGiven = optionValue(outs, "lse");
    } else if (!outV.IsUndefined() && !outV.IsNull()) {
      throwInvalid("out", "expected a tensor or {o, lse}");
    }
    attn::ForwardOut out;
    out.o = outputFor(oGiven, JsTensor::Is(outV) ? "out" : "out.o", q.shape(), q.dtype(), dev);
    if (wantLse || optionalTensor(lseGiven, "out.lse"))
      out.lse = outputFor(lseGiven, "out.lse", {p.B, p.H, p.T}, DType::F32, dev);
    auto pp = std::make_shared<attn::Problem>(p);
    return runAsync(
        info.Env(), "attentionForward",
        [pp, q, k, v, cu, out] {
          pp->cu = readSeqOffsets(cu, pp->N, pp->T, pp->tokens());
#ifdef TCAL_WITH_CUDA
          if (q.device().kind == Device::CUDA) return cuda::attentionForward(*pp, q, k, v, out);
#endif
          cpu::attentionForward(*pp, q, k, v, out);
        },
        [out](Napi::Env env) -> Napi::Value {
          Napi::Object res = Napi::Object::New(env);
          res.Set("o", JsTensor::Wrap(env, out.o));
          res.Set("lse", out.lse.defined() ? Napi::Value(JsTensor::Wrap(env, out.lse)) : env.Null());
          return res;
        },
        {opts});
  });
}

}  // namespace

void registerAttention(Napi::Env env, Napi::Object exports) {
  exports.Set("attentionForward", Napi::Function::New(env, Forward));
}

}  // namespace tcal::napi
