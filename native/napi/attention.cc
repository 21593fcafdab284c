// Causal attention: attentionForward(q, k, v, {scale, cuSeqlens, returnLse, out}) → {o, lse} and
// attentionBackward(q, k, v, o, lse, dO, {scale, cuSeqlens, out: {dq?, dk?, dv?}}) → {dq, dk, dv}. Shapes,
// dtypes and devices are validated here (typed InvalidArgument errors naming the argument); cu_seqlens values
// are read and checked on the worker.
#include "../cpu/attention.h"
#include "../cpu/attention_backward.h"
#include "common.h"
#ifdef TCAL_WITH_CUDA
#include "../cuda/attention.h"
#include "../cuda/attention_backward.h"
#endif

#include <cmath>
#include <memory>

namespace tcal::napi {

namespace {


// The problem of q [B,T,H,D], k and v [B,T,HKV,D] and the options' scale and cuSeqlens (returned, undefined
// without varlen; its values are read on the worker). Shared by the forward and the backward.
attn::Problem parseProblem(const Tensor& q, const Tensor& k, const Tensor& v, const Napi::Object& opts, Tensor& cu) {
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
  return p;
}

Napi::Object optionsArg(const Napi::CallbackInfo& info, size_t i) {
  return info.Length() > i && info[i].IsObject() ? info[i].As<Napi::Object>() : Napi::Object::New(info.Env());
}

// attentionForward(q, k, v, opts) → Promise<{o, lse}>
Napi::Value Forward(const Napi::CallbackInfo& info) {
  return guard(info.Env(), [&]() -> Napi::Value {
    Tensor q = JsTensor::Get(info[0], "q");
    Tensor k = JsTensor::Get(info[1], "k");
    Tensor v = JsTensor::Get(info[2], "v");
    Napi::Object opts = optionsArg(info, 3);
    const Device dev = q.device();
    Tensor cu;
    attn::Problem p = parseProblem(q, k, v, opts, cu);
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

// attentionBackward(q, k, v, o, lse, dO, opts) → Promise<{dq, dk, dv}>
Napi::Value Backward(const Napi::CallbackInfo& info) {
  return guard(info.Env(), [&]() -> Napi::Value {
    Tensor q = JsTensor::Get(info[0], "q");
    Tensor k = JsTensor::Get(info[1], "k");
    Tensor v = JsTensor::Get(info[2], "v");
    attn::BackwardIn in;
    in.o = JsTensor::Get(info[3], "o");
    in.lse = JsTensor::Get(info[4], "lse");
    in.dO = JsTensor::Get(info[5], "dO");
    Napi::Object opts = optionsArg(info, 6);
    const Device dev = q.device();
    Tensor cu;
    attn::Problem p = parseProblem(q, k, v, opts, cu);
    for (auto [t, name] : {std::pair<const Tensor*, const char*>{&in.o, "o"}, {&in.dO, "dO"}}) {
      checkShape(*t, q.shape(), name);
      checkDType(*t, q.dtype(), name);
      checkSameDevice(*t, dev, name);
    }
    checkShape(in.lse, {p.B, p.H, p.T}, "lse");
    checkDType(in.lse, DType::F32, "lse");
    checkSameDevice(in.lse, dev, "lse");
    Napi::Value outV = optionValue(opts, "out");
    Napi::Object outs = Napi::Object::New(info.Env());
    if (outV.IsObject() && !JsTensor::Is(outV)) outs = outV.As<Napi::Object>();
    else if (!outV.IsUndefined() && !outV.IsNull()) throwInvalid("out", "expected an object {dq?, dk?, dv?}");
    attn::BackwardOut out;
    out.dq = outputFor(optionValue(outs, "dq"), "out.dq", q.shape(), q.dtype(), dev);
    out.dk = outputFor(optionValue(outs, "dk"), "out.dk", k.shape(), q.dtype(), dev);
    out.dv = outputFor(optionValue(outs, "dv"), "out.dv", k.shape(), q.dtype(), dev);
    if (out.dk.numel() > 0 && out.dk.data() == out.dv.data()) throwInvalid("out.dv", "must not share memory with out.dk");
    auto pp = std::make_shared<attn::Problem>(p);
    return runAsync(
        info.Env(), "attentionBackward",
        [pp, q, k, v, in, cu, out] {
          pp->cu = readSeqOffsets(cu, pp->N, pp->T, pp->tokens());
#ifdef TCAL_WITH_CUDA
          if (q.device().kind == Device::CUDA) return cuda::attentionBackward(*pp, q, k, v, in, out);
#endif
          cpu::attentionBackward(*pp, q, k, v, in, out);
        },
        [out](Napi::Env env) -> Napi::Value {
          Napi::Object res = Napi::Object::New(env);
          res.Set("dq", JsTensor::Wrap(env, out.dq));
          res.Set("dk", JsTensor::Wrap(env, out.dk));
          res.Set("dv", JsTensor::Wrap(env, out.dv));
          return res;
        },
        {opts});
  });
}

}  // namespace

void registerAttention(Napi::Env env, Napi::Object exports) {
  exports.Set("attentionForward", Napi::Function::New(env, Forward));
  exports.Set("attentionBackward", Napi::Function::New(env, Backward));
}

}  // namespace tcal::napi
