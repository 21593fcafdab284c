// Gated DeltaNet ops: gdnForward, gdnBackward, gdnDecodeStep. Shapes, dtypes and devices are validated here
// (typed InvalidArgument errors naming the argument); cu_seqlens values are read and checked on the worker.
#include "../cpu/gdn.h"
#include "common.h"
#ifdef TCAL_WITH_CUDA
#include "../cuda/gdn.h"
#endif

#include <cmath>
#include <memory>

namespace tcal::napi {

namespace {

bool onCuda(const Tensor& t) { return t.device().kind == Device::CUDA; }

std::string strOpt(const Napi::Object& o, const char* key, const std::string& dflt) {
  Napi::Value v = optionValue(o, key);
  if (v.IsUndefined() || v.IsNull()) return dflt;
  if (!v.IsString()) throwInvalid(key, "expected a string");
  return v.As<Napi::String>().Utf8Value();
}

// An output: the caller's tensor in opts.out[name] (checked), or a new one.
Tensor outputFor(const Napi::Object& outs, const char* name, const Shape& shape, DType dtype, Device device) {
  return napi::outputFor(optionValue(outs, name), std::string("out.") + name, shape, dtype, device);
}

void checkF32(const Tensor& t, const Shape& shape, Device dev, const std::string& arg, DType want = DType::F32) {
  checkDType(t, want, arg);
  checkShape(t, shape, arg);
  checkSameDevice(t, dev, arg);
}

struct Parsed {
  gdn::Problem p;
  gdn::Inputs in;
  Tensor cu;  // i32 [N+1] or undefined
  Device dev;
  DType outType;
  DType sd;  // dtype of g, beta, gates and states: f32, or f64 with f64 inputs (the CPU reference)
};

// Common validation of q, k, v, g, beta and the options shared by forward and backward.
Parsed parse(const Napi::CallbackInfo& info, const Napi::Object& opts) {
  Parsed r;
  gdn::Inputs& in = r.in;
  in.q = JsTensor::Get(info[0], "q");
  in.k = JsTensor::Get(info[1], "k");
  in.v = JsTensor::Get(info[2], "v");
  in.g = JsTensor::Get(info[3], "g");
  in.beta = JsTensor::Get(info[4], "beta");
  r.dev = in.q.device();
  checkNdim(in.q, 4, "q");
  if (!isFloat(in.q.dtype())) throwInvalid("q", std::string("expected a floating dtype, got ") + dtypeName(in.q.dtype()));
  if (onCuda(in.q) && in.q.dtype() == DType::F64) throwInvalid("q", "f64 inputs run on the CPU only");
  gdn::Problem& p = r.p;
  p.B = in.q.dim(0);
  p.T = in.q.dim(1);
  p.H = in.q.dim(2);
  p.K = in.q.dim(3);
  checkShape(in.k, in.q.shape(), "k");
  checkDType(in.k, in.q.dtype(), "k");
  checkSameDevice(in.k, r.dev, "k");
  checkNdim(in.v, 4, "v");
  checkDType(in.v, in.q.dtype(), "v");
  checkSameDevice(in.v, r.dev, "v");
  if (in.v.dim(0) != p.B || in.v.dim(1) != p.T)
    throwInvalid("v", "expected shape [" + std::to_string(p.B) + "," + std::to_string(p.T) + ",HV,V], got " +
                          shapeStr(in.v.shape()));
  p.HV = in.v.dim(2);
  p.V = in.v.dim(3);
  if (p.H <= 0 || p.K <= 0 || p.HV <= 0 || p.V <= 0) throwInvalid("q", "head counts and head dims must be positive");
  if (p.HV % p.H != 0)
    throwInvalid("v", "value heads (" + std::to_string(p.HV) + ") must be a multiple of key heads (" +
                          std::to_string(p.H) + ")");
  if (onCuda(in.q)) {
    auto okDim = [](int64_t d) { return d == 64 || d == 128 || d == 256; };
    if (!okDim(p.K)) throwInvalid("q", "CUDA kernels take K in {64, 128, 256}, got " + std::to_string(p.K));
    if (!okDim(p.V)) throwInvalid("v", "CUDA kernels take V in {64, 128, 256}, got " + std::to_string(p.V));
  }
  r.sd = in.q.dtype() == DType::F64 ? DType::F64 : DType::F32;
  checkF32(in.g, {p.B, p.T, p.HV}, r.dev, "g", r.sd);
  checkF32(in.beta, {p.B, p.T, p.HV}, r.dev, "beta", r.sd);
  if (p.B * p.T > INT32_MAX / 2) throwInvalid("q", "too many tokens");

  Napi::Value scaleV = optionValue(opts, "scale");
  if (scaleV.IsUndefined() || scaleV.IsNull()) {
    p.scale = 1.0 / std::sqrt(double(p.K));
  } else {
    if (!scaleV.IsNumber()) throwInvalid("scale", "expected a number");
    p.scale = scaleV.As<Napi::Number>().DoubleValue();
    if (!std::isfinite(p.scale)) throwInvalid("scale", "must be finite");
  }
  p.l2norm = boolOption(opts, "l2norm");

  if (auto cu = optionalTensor(optionValue(opts, "cuSeqlens"), "cuSeqlens")) {
    checkDType(*cu, DType::I32, "cuSeqlens");
    checkNdim(*cu, 1, "cuSeqlens");
    if (cu->dim(0) < 2) throwInvalid("cuSeqlens", "needs at least 2 entries (N+1 offsets)");
    if (p.B != 1) throwInvalid("q", "varlen (cuSeqlens) packs sequences into B = 1, got B = " + std::to_string(p.B));
    if (cu->device() != r.dev && cu->device().kind != Device::CPU)
      throwInvalid("cuSeqlens", "expected a tensor on " + r.dev.str() + " or the CPU");
    r.cu = *cu;
    p.N = cu->dim(0) - 1;
  } else {
    p.N = p.B;
  }

  if (onCuda(in.q) && (p.N > 65535 || p.HV > 65535))
    throwInvalid(r.cu.defined() ? "cuSeqlens" : "q", "CUDA kernels take at most 65535 sequences and value heads");

  auto aLog = optionalTensor(optionValue(opts, "aLog"), "aLog");
  auto dtBias = optionalTensor(optionValue(opts, "dtBias"), "dtBias");
  if (bool(aLog) != bool(dtBias)) throwInvalid(aLog ? "dtBias" : "aLog", "fused gates need both aLog and dtBias");
  if (aLog) {
    checkF32(*aLog, {p.HV}, r.dev, "aLog", r.sd);
    checkF32(*dtBias, {p.HV}, r.dev, "dtBias", r.sd);
    in.aLog = *aLog;
    in.dtBias = *dtBias;
    p.fusedGates = true;
  }
  if (auto h0 = optionalTensor(optionValue(opts, "initialState"), "initialState")) {
    checkF32(*h0, {p.N, p.HV, p.K, p.V}, r.dev, "initialState", r.sd);
    in.h0 = *h0;
    p.hasH0 = true;
  }
  std::string od = strOpt(opts, "outDtype", dtypeName(in.v.dtype()));
  r.outType = parseDType(od, "outDtype");
  if (r.outType != in.v.dtype() && r.outType != DType::F32)
    throwInvalid("outDtype", std::string("must be ") + dtypeName(in.v.dtype()) + " or f32");
  return r;
}


struct CpuMode {
  cpu::GdnAlgorithm algo = cpu::GdnAlgorithm::Chunk;
  bool f64 = false;
};

CpuMode parseCpuMode(const Napi::Object& opts, Device dev) {
  CpuMode m;
  std::string a = strOpt(opts, "algorithm", "chunk");
  if (a == "recurrent")
    m.algo = cpu::GdnAlgorithm::Recurrent;
  else if (a != "chunk")
    throwInvalid("algorithm", "expected 'chunk' or 'recurrent', got '" + a + "'");
  std::string pr = strOpt(opts, "precision", "f32");
  if (pr == "f64")
    m.f64 = true;
  else if (pr != "f32")
    throwInvalid("precision", "expected 'f32' or 'f64', got '" + pr + "'");
  if (m.f64 && dev.kind != Device::CPU) throwInvalid("precision", "'f64' (the reference) runs on the CPU only");
  return m;
}

// The forward's chunk-start states handed to the backward (opts.chunkStates, `saved.chunkStates` in lib/ops/gdn.ts):
// [chunks, HV, K, V] in f32 or bf16 on the inputs' device. Dtype, device and the trailing dims here; the chunk
// count on the worker (checkStateCount), where the cu_seqlens values are known.
Tensor parseChunkStates(const Napi::Object& opts, const Parsed& r) {
  auto t = optionalTensor(optionValue(opts, "chunkStates"), "saved.chunkStates");
  if (!t) return Tensor();
  const char* arg = "saved.chunkStates";
  checkNdim(*t, 4, arg);
  if (t->dtype() != DType::F32 && t->dtype() != DType::BF16)
    throwInvalid(arg, std::string("expected f32 or bf16 chunk-start states, got ") + dtypeName(t->dtype()));
  checkSameDevice(*t, r.dev, arg);
  const gdn::Problem& p = r.p;
  if (t->dim(1) != p.HV || t->dim(2) != p.K || t->dim(3) != p.V)
    throwInvalid(arg, "expected [chunks, " + std::to_string(p.HV) + ", " + std::to_string(p.K) + ", " +
                          std::to_string(p.V) + "] (these inputs' HV, K, V), got " + shapeStr(t->shape()));
  return *t;
}

#ifdef TCAL_WITH_CUDA
// The forward's hand-over (opts.handover, `saved.A` … in lib/ops/gdn.ts; saveForBackward 'full'): every piece
// present, on the inputs' device, 16-byte aligned (the kernels read 16-byte vectors), in the dtype and shape the
// forward writes ([chunks, …]: the chunk count on the worker, with the states'). norms exactly with l2norm.
cuda::GdnSaved parseSaved(const Napi::Object& opts, const Parsed& r) {
  cuda::GdnSaved s;
  s.chunkStates = parseChunkStates(opts, r);
  Napi::Value hv = optionValue(opts, "handover");
  if (hv.IsUndefined() || hv.IsNull()) return s;
  if (!hv.IsObject()) throwInvalid("saved", "expected the forward's hand-over tensors");
  if (!s.chunkStates.defined()) throwInvalid("saved.chunkStates", "the hand-over (saved.A …) comes with the chunk states");
  const Napi::Object h = hv.As<Napi::Object>();
  const gdn::Problem& p = r.p;
  const int64_t C = gdn::kChunk, chunks = s.chunkStates.dim(0);
  auto get = [&](const char* name, const Shape& shape, DType dt) -> Tensor {
    const std::string arg = std::string("saved.") + name;
    auto t = optionalTensor(optionValue(h, name), arg);
    if (!t) throwInvalid(arg, "missing: the forward's hand-over comes whole (saveForBackward 'full')");
    checkDType(*t, dt, arg);
    checkShape(*t, shape, arg);
    checkSameDevice(*t, r.dev, arg);
    if (reinterpret_cast<uintptr_t>(t->data()) % 16 != 0) throwInvalid(arg, "must start on a 16-byte boundary");
    return *t;
  };
  const DType dt = r.in.q.dtype();
  s.A = get("A", {chunks, p.HV, C, C}, dt);
  s.QKG = get("QKG", {chunks, p.HV, C, C}, dt);
  s.gates = get("gates", {chunks, p.HV, 3, C}, DType::F32);
  s.gateEnds = get("gateEnds", {chunks, p.HV}, DType::F32);
  Napi::Value nv = optionValue(h, "norms");
  const bool hasNorms = !nv.IsUndefined() && !nv.IsNull();
  if (hasNorms != p.l2norm)
    throwInvalid("saved.norms", p.l2norm ? "missing: these options normalise q and k (l2norm)"
                                         : "given, but these options do not normalise q and k: saved by a forward of other options");
  if (p.l2norm) s.norms = get("norms", {2, p.B * p.T, p.H}, DType::F32);
  return s;
}
#endif

// One state per chunk of C tokens of every sequence: states saved by a forward of other inputs are refused.
void checkStateCount(const gdn::Problem& p, const Tensor& states) {
  if (!states.defined()) return;
  const int64_t chunks = int64_t(gdn::chunkTable(p).start.size());
  if (states.dim(0) != chunks)
    throwInvalid("saved.chunkStates", "holds " + std::to_string(states.dim(0)) + " chunk states, these inputs have " +
                                          std::to_string(chunks) + " chunks of " + std::to_string(gdn::kChunk) +
                                          " tokens: saved by a forward of other inputs");
}

Napi::Object optsOf(const Napi::CallbackInfo& info, size_t i) {
  return info.Length() > i && info[i].IsObject() ? info[i].As<Napi::Object>() : Napi::Object::New(info.Env());
}

// gdnForward(q, k, v, g, beta, opts) → Promise<{o, finalState, chunkStates}>
Napi::Value Forward(const Napi::CallbackInfo& info) {
  return guard(info.Env(), [&]() -> Napi::Value {
    Napi::Object opts = optsOf(info, 5);
    Parsed r = parse(info, opts);
    CpuMode mode = parseCpuMode(opts, r.dev);
    Napi::Object outs = optionValue(opts, "out").IsObject() ? optionValue(opts, "out").As<Napi::Object>() : Napi::Object::New(info.Env());
    gdn::ForwardOut out;
    out.o = outputFor(outs, "o", r.in.v.shape(), r.outType, r.dev);
    if (boolOption(opts, "outputFinalState"))
      out.finalState = outputFor(outs, "finalState", {r.p.N, r.p.HV, r.p.K, r.p.V}, r.sd, r.dev);
    auto p = std::make_shared<gdn::Problem>(r.p);
    gdn::Inputs in = r.in;
    Tensor cu = r.cu;
    // saveForBackward: the CUDA forward also writes the chunk-start states (the CPU backward recomputes its own);
    // 'full': and the backward prep's outputs where the tensor-core paths run.
    Napi::Value sv = optionValue(opts, "saveForBackward");
    const bool full = sv.IsString() && sv.As<Napi::String>().Utf8Value() == "full";
    if (sv.IsString() && !full) throwInvalid("saveForBackward", "expected a boolean or 'full'");
    const bool save = full || boolOption(opts, "saveForBackward");
#ifdef TCAL_WITH_CUDA
    auto saved = std::make_shared<cuda::GdnSaved>();
#else
    auto saved = std::make_shared<int>();
#endif
    std::vector<Napi::Value> keep{opts};
    return runAsync(
        info.Env(), "gdnForward",
        [p, in, cu, out, mode, save, full, saved] {
          p->cu = readSeqOffsets(cu, p->N, p->T, p->tokens());
#ifdef TCAL_WITH_CUDA
          if (onCuda(in.q)) {
            *saved = cuda::gdnForward(*p, in, out, full ? cuda::GdnSave::Full : save ? cuda::GdnSave::States : cuda::GdnSave::None);
            return;
          }
#endif
          cpu::gdnForward(*p, in, out, mode.algo, mode.f64);
        },
        [out, saved](Napi::Env env) -> Napi::Value {
          Napi::Object res = Napi::Object::New(env);
          auto wrap = [&](const Tensor& t) { return t.defined() ? Napi::Value(JsTensor::Wrap(env, t)) : env.Null(); };
          res.Set("o", JsTensor::Wrap(env, out.o));
          res.Set("finalState", wrap(out.finalState));
          res.Set("chunkStates", env.Null());
          res.Set("handover", env.Null());
#ifdef TCAL_WITH_CUDA
          res.Set("chunkStates", wrap(saved->chunkStates));
          if (saved->A.defined()) {
            Napi::Object h = Napi::Object::New(env);
            h.Set("A", wrap(saved->A));
            h.Set("QKG", wrap(saved->QKG));
            h.Set("gates", wrap(saved->gates));
            h.Set("gateEnds", wrap(saved->gateEnds));
            h.Set("norms", wrap(saved->norms));
            res.Set("handover", h);
          }
#endif
          return res;
        },
        keep);
  });
}

// gdnBackward(q, k, v, g, beta, dO, opts: {..., chunkStates?, handover?}) → Promise<{dq, dk, dv, dg, dbeta, dh0, dALog, dDtBias}>
Napi::Value Backward(const Napi::CallbackInfo& info) {
  return guard(info.Env(), [&]() -> Napi::Value {
    Napi::Object opts = optsOf(info, 6);
    Parsed r = parse(info, opts);
    CpuMode mode = parseCpuMode(opts, r.dev);
    const gdn::Problem& p = r.p;
    Tensor dO = JsTensor::Get(info[5], "dO");
    checkShape(dO, r.in.v.shape(), "dO");
    checkSameDevice(dO, r.dev, "dO");
    if (dO.dtype() != r.in.v.dtype() && dO.dtype() != DType::F32)
      throwInvalid("dO", std::string("dtype must be ") + dtypeName(r.in.v.dtype()) + " or f32");
    Tensor dFinal;
    if (auto t = optionalTensor(optionValue(opts, "dFinalState"), "dFinalState")) {
      checkF32(*t, {p.N, p.HV, p.K, p.V}, r.dev, "dFinalState", r.sd);
      dFinal = *t;
    }
#ifdef TCAL_WITH_CUDA
    cuda::GdnSaved saved = parseSaved(opts, r);
    Tensor states = saved.chunkStates;
#else
    Tensor states = parseChunkStates(opts, r);
#endif
    Napi::Object outs = optionValue(opts, "out").IsObject() ? optionValue(opts, "out").As<Napi::Object>() : Napi::Object::New(info.Env());
    gdn::BackwardOut out;
    DType gt = r.outType == DType::F32 ? DType::F32 : r.in.q.dtype();
    out.dq = outputFor(outs, "dq", r.in.q.shape(), gt, r.dev);
    out.dk = outputFor(outs, "dk", r.in.k.shape(), gt, r.dev);
    out.dv = outputFor(outs, "dv", r.in.v.shape(), gt, r.dev);
    out.dg = outputFor(outs, "dg", {p.B, p.T, p.HV}, r.sd, r.dev);
    out.dbeta = outputFor(outs, "dbeta", {p.B, p.T, p.HV}, r.sd, r.dev);
    if (p.hasH0) out.dh0 = outputFor(outs, "dh0", {p.N, p.HV, p.K, p.V}, r.sd, r.dev);
    if (p.fusedGates) {
      out.dALog = outputFor(outs, "dALog", {p.HV}, r.sd, r.dev);
      out.dDtBias = outputFor(outs, "dDtBias", {p.HV}, r.sd, r.dev);
    }
    auto pp = std::make_shared<gdn::Problem>(r.p);
    gdn::Inputs in = r.in;
    Tensor cu = r.cu;
    return runAsync(
        info.Env(), "gdnBackward",
#ifdef TCAL_WITH_CUDA
        [pp, in, cu, dO, dFinal, out, mode, states, saved] {
#else
        [pp, in, cu, dO, dFinal, out, mode, states] {
#endif
          pp->cu = readSeqOffsets(cu, pp->N, pp->T, pp->tokens());
          checkStateCount(*pp, states);  // the hand-over's chunk count was checked against the states' in parseSaved
#ifdef TCAL_WITH_CUDA
          if (onCuda(in.q)) return cuda::gdnBackward(*pp, in, dO, dFinal, out, saved);
#endif
          cpu::gdnBackward(*pp, in, dO, dFinal, out, mode.f64);
        },
        [out](Napi::Env env) -> Napi::Value {
          Napi::Object res = Napi::Object::New(env);
          auto set = [&](const char* name, const Tensor& t) {
            res.Set(name, t.defined() ? Napi::Value(JsTensor::Wrap(env, t)) : env.Null());
          };
          set("dq", out.dq);
          set("dk", out.dk);
          set("dv", out.dv);
          set("dg", out.dg);
          set("dbeta", out.dbeta);
          set("dh0", out.dh0);
          set("dALog", out.dALog);
          set("dDtBias", out.dDtBias);
          return res;
        },
        {opts});
  });
}

// gdnDecodeStep(q, k, v, g, beta, state, opts) → Promise<o>; state [N,HV,K,V] f32 is updated in place.
// q, k [N,H,K] or [N,1,H,K]; v [N,HV,V] or [N,1,HV,V]; g, beta [N,HV] or [N,1,HV].
Napi::Value DecodeStep(const Napi::CallbackInfo& info) {
  return guard(info.Env(), [&]() -> Napi::Value {
    Napi::Object opts = optsOf(info, 6);
    gdn::Inputs in;
    in.q = JsTensor::Get(info[0], "q");
    in.k = JsTensor::Get(info[1], "k");
    in.v = JsTensor::Get(info[2], "v");
    in.g = JsTensor::Get(info[3], "g");
    in.beta = JsTensor::Get(info[4], "beta");
    Tensor state = JsTensor::Get(info[5], "state");
    Device dev = in.q.device();
    bool four = in.q.ndim() == 4;
    if (in.q.ndim() != 3 && !four) throwInvalid("q", "expected [N,H,K] or [N,1,H,K], got " + shapeStr(in.q.shape()));
    if (four && in.q.dim(1) != 1) throwInvalid("q", "a decode step takes one token (T = 1), got " + shapeStr(in.q.shape()));
    if (!isFloat(in.q.dtype()) || in.q.dtype() == DType::F64)
      throwInvalid("q", std::string("expected f32, bf16 or f16, got ") + dtypeName(in.q.dtype()));
    gdn::DecodeArgs a;
    a.N = in.q.dim(0);
    a.H = in.q.dim(-2);
    a.K = in.q.dim(-1);
    checkShape(in.k, in.q.shape(), "k");
    checkDType(in.k, in.q.dtype(), "k");
    checkSameDevice(in.k, dev, "k");
    checkNdim(in.v, in.q.ndim(), "v");
    checkDType(in.v, in.q.dtype(), "v");
    checkSameDevice(in.v, dev, "v");
    if (in.v.dim(0) != a.N || (four && in.v.dim(1) != 1)) throwInvalid("v", "shape " + shapeStr(in.v.shape()) + " does not match q");
    a.HV = in.v.dim(-2);
    a.V = in.v.dim(-1);
    if (a.H <= 0 || a.K <= 0 || a.HV <= 0 || a.V <= 0) throwInvalid("q", "head counts and head dims must be positive");
    if (a.HV % a.H != 0) throwInvalid("v", "value heads must be a multiple of key heads");
    if (onCuda(in.q) && (a.K > 256 || a.V > 256 || a.K % 32 != 0 || a.V % 32 != 0))
      throwInvalid("q", "CUDA decode takes K, V multiples of 32 up to 256");
    if (onCuda(in.q) && (a.N > 65535 || a.HV > 65535)) throwInvalid("q", "CUDA decode takes at most 65535 sequences");
    Shape gs = four ? Shape{a.N, 1, a.HV} : Shape{a.N, a.HV};
    checkF32(in.g, gs, dev, "g");
    checkF32(in.beta, gs, dev, "beta");
    checkF32(state, {a.N, a.HV, a.K, a.V}, dev, "state");
    Napi::Value scaleV = optionValue(opts, "scale");
    if (!scaleV.IsUndefined() && !scaleV.IsNull() && !(scaleV.IsNumber() && std::isfinite(scaleV.As<Napi::Number>().DoubleValue())))
      throwInvalid("scale", "expected a finite number");
    a.scale = scaleV.IsNumber() ? scaleV.As<Napi::Number>().DoubleValue() : 1.0 / std::sqrt(double(a.K));
    a.l2norm = boolOption(opts, "l2norm");
    auto aLog = optionalTensor(optionValue(opts, "aLog"), "aLog");
    auto dtBias = optionalTensor(optionValue(opts, "dtBias"), "dtBias");
    if (bool(aLog) != bool(dtBias)) throwInvalid(aLog ? "dtBias" : "aLog", "fused gates need both aLog and dtBias");
    if (aLog) {
      checkF32(*aLog, {a.HV}, dev, "aLog");
      checkF32(*dtBias, {a.HV}, dev, "dtBias");
      in.aLog = *aLog;
      in.dtBias = *dtBias;
      a.fusedGates = true;
    }
    Napi::Value outArg = optionValue(opts, "out");
    Tensor o;
    if (auto t = optionalTensor(outArg, "out")) {
      checkShape(*t, in.v.shape(), "out");
      checkDType(*t, in.v.dtype(), "out");
      checkSameDevice(*t, dev, "out");
      o = *t;
    } else {
      o = empty(in.v.shape(), in.v.dtype(), dev);
    }
    return runOp(
        info.Env(), "gdnDecodeStep",
        [a, in, state, o] {
#ifdef TCAL_WITH_CUDA
          if (onCuda(in.q)) return cuda::gdnDecodeStep(a, in, state, o);
#endif
          cpu::gdnDecodeStep(a, in, state, o);
        },
        outArg, o, {info[5]});
  });
}

}  // namespace

void registerGdn(Napi::Env env, Napi::Object exports) {
  exports.Set("gdnForward", Napi::Function::New(env, Forward));
  exports.Set("gdnBackward", Napi::Function::New(env, Backward));
  exports.Set("gdnDecodeStep", Napi::Function::New(env, DecodeStep));
}

}  // namespace tcal::napi
