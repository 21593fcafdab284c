#include "common.h"

#include <cmath>

namespace tcal::napi {

namespace {
const char* kindName(ErrorKind k) {
  switch (k) {
    case ErrorKind::InvalidArgument: return "InvalidArgument";
    case ErrorKind::Cuda: return "Cuda";
    case ErrorKind::OutOfMemory: return "OutOfMemory";
    case ErrorKind::NotCompiled: return "NotCompiled";
    case ErrorKind::Internal: return "Internal";
  }
  return "Internal";
}

Napi::FunctionReference* g_tensorCtor = nullptr;
}  // namespace

Napi::Error toJsError(Napi::Env env, const Error& e) {
  Napi::Error err = Napi::Error::New(env, e.what());
  Napi::Object o = err.Value();
  o.Set("tcalKind", kindName(e.kind));
  if (!e.argument.empty()) o.Set("argument", e.argument);
  if (!e.cudaName.empty()) o.Set("cudaName", e.cudaName);
  if (e.kind == ErrorKind::Cuda) o.Set("number", e.number);
  if (!e.op.empty()) o.Set("op", e.op);
  if (e.kind == ErrorKind::OutOfMemory) {
    o.Set("requested", double(e.requested));
    o.Set("free", double(e.freeBytes));
    o.Set("device", e.device);
  }
  return err;
}

// ---- JsTensor ----

Napi::Function JsTensor::Init(Napi::Env env) {
  Napi::Function ctor = DefineClass(env, "NativeTensor",
                                    {
                                        InstanceAccessor<&JsTensor::Shape>("shape"),
                                        InstanceAccessor<&JsTensor::DTypeName>("dtype"),
                                        InstanceAccessor<&JsTensor::DeviceName>("device"),
                                        InstanceAccessor<&JsTensor::NBytes>("nbytes"),
                                        InstanceAccessor<&JsTensor::Disposed>("disposed"),
                                        InstanceMethod<&JsTensor::Dispose>("dispose"),
                                        InstanceMethod<&JsTensor::View>("view"),
                                        InstanceMethod<&JsTensor::SameStorage>("sameStorage"),
                                        InstanceMethod<&JsTensor::Rows>("rows"),
                                    });
  g_tensorCtor = new Napi::FunctionReference(Napi::Persistent(ctor));
  return ctor;
}

JsTensor::JsTensor(const Napi::CallbackInfo& info) : Napi::ObjectWrap<JsTensor>(info) {}

JsTensor::~JsTensor() { releaseExternal(); }

void JsTensor::releaseExternal() {
  if (external_ != 0) {
    Napi::MemoryManagement::AdjustExternalMemory(Env(), -external_);
    external_ = 0;
  }
}

Napi::Object JsTensor::Wrap(Napi::Env env, Tensor t) {
  Napi::Object obj = g_tensorCtor->New({});
  JsTensor* self = Napi::ObjectWrap<JsTensor>::Unwrap(obj);
  self->tensor_ = std::move(t);
  if (self->tensor_.device().kind == Device::CPU && self->tensor_.nbytes() > 0) {
    self->external_ = int64_t(self->tensor_.nbytes());
    Napi::MemoryManagement::AdjustExternalMemory(env, self->external_);
  }
  return obj;
}

bool JsTensor::Is(const Napi::Value& v) { return v.IsObject() && v.As<Napi::Object>().InstanceOf(g_tensorCtor->Value()); }

const Tensor& JsTensor::Get(const Napi::Value& v, const std::string& argument) {
  if (!Is(v)) throwInvalid(argument, "expected a Tensor");
  JsTensor* self = Napi::ObjectWrap<JsTensor>::Unwrap(v.As<Napi::Object>());
  if (!self->tensor_.defined()) throwInvalid(argument, "tensor has been disposed");
  return self->tensor_;
}

Napi::Value JsTensor::Shape(const Napi::CallbackInfo& info) {
  Napi::Array a = Napi::Array::New(info.Env());
  if (!tensor_.defined()) return a;
  for (size_t i = 0; i < tensor_.shape().size(); ++i) a.Set(uint32_t(i), double(tensor_.shape()[i]));
  return a;
}
Napi::Value JsTensor::DTypeName(const Napi::CallbackInfo& info) {
  return tensor_.defined() ? Napi::String::New(info.Env(), dtypeName(tensor_.dtype())) : info.Env().Undefined();
}
Napi::Value JsTensor::DeviceName(const Napi::CallbackInfo& info) {
  return tensor_.defined() ? Napi::String::New(info.Env(), tensor_.device().str()) : info.Env().Undefined();
}
Napi::Value JsTensor::NBytes(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), tensor_.defined() ? double(tensor_.nbytes()) : 0);
}
Napi::Value JsTensor::Disposed(const Napi::CallbackInfo& info) {
  return Napi::Boolean::New(info.Env(), !tensor_.defined());
}
Napi::Value JsTensor::Dispose(const Napi::CallbackInfo& info) {
  // Drops this handle's reference; memory returns to the allocator once in-flight ops holding it finish.
  tensor_ = Tensor();
  releaseExternal();
  return info.Env().Undefined();
}
Napi::Value JsTensor::View(const Napi::CallbackInfo& info) {
  return guard(info.Env(), [&]() -> Napi::Value {
    const Tensor& t = Get(info.This(), "this");
    return Wrap(info.Env(), t.reshape(parseShape(info[0], "shape")));
  });
}
Napi::Value JsTensor::SameStorage(const Napi::CallbackInfo& info) {
  return guard(info.Env(), [&]() -> Napi::Value {
    const Tensor& a = Get(info.This(), "this");
    const Tensor& b = Get(info[0], "other");
    return Napi::Boolean::New(info.Env(), a.storage() == b.storage());
  });
}

Napi::Value JsTensor::Rows(const Napi::CallbackInfo& info) {
  return guard(info.Env(), [&]() -> Napi::Value {
    const Tensor& t = Get(info.This(), "this");
    if (t.ndim() == 0) throwInvalid("this", "a scalar has no rows");
    if (!info[0].IsNumber() || !info[1].IsNumber()) throwInvalid("begin", "expected numbers begin, end");
    int64_t b = info[0].As<Napi::Number>().Int64Value(), e = info[1].As<Napi::Number>().Int64Value();
    if (b < 0 || e < b || e > t.dim(0))
      throwInvalid("begin", "rows [" + std::to_string(b) + ", " + std::to_string(e) + ") outside " + shapeStr(t.shape()));
    return Wrap(info.Env(), t.narrow0(b, e));
  });
}

// ---- argument parsing ----

Device parseDevice(const Napi::Value& v, const std::string& argument) {
  if (!v.IsString()) throwInvalid(argument, "expected a device string ('cpu', 'cuda' or 'cuda:N')");
  std::string s = v.As<Napi::String>();
  if (s == "cpu") return Device{Device::CPU, 0};
  if (s == "cuda") return Device{Device::CUDA, 0};
  if (s.rfind("cuda:", 0) == 0 && s.size() > 5 && s.find_first_not_of("0123456789", 5) == std::string::npos)
    return Device{Device::CUDA, std::stoi(s.substr(5))};
  throwInvalid(argument, "unknown device '" + s + "' (expected 'cpu', 'cuda' or 'cuda:N')");
}

DType parseDTypeArg(const Napi::Value& v, const std::string& argument) {
  if (!v.IsString()) throwInvalid(argument, "expected a dtype string");
  return parseDType(v.As<Napi::String>(), argument);
}

Shape parseShape(const Napi::Value& v, const std::string& argument) {
  if (!v.IsArray()) throwInvalid(argument, "expected an array of dimensions");
  Napi::Array a = v.As<Napi::Array>();
  Shape s;
  for (uint32_t i = 0; i < a.Length(); ++i) {
    Napi::Value d = a.Get(i);
    if (!d.IsNumber()) throwInvalid(argument, "dimension " + std::to_string(i) + " is not a number");
    double x = d.As<Napi::Number>().DoubleValue();
    if (x < 0 || x != double(int64_t(x)) || x > 9007199254740991.0)
      throwInvalid(argument, "dimension " + std::to_string(i) + " must be a non-negative integer");
    s.push_back(int64_t(x));
  }
  return s;
}

std::optional<Tensor> optionalTensor(const Napi::Value& v, const std::string& argument) {
  if (v.IsUndefined() || v.IsNull()) return std::nullopt;
  return JsTensor::Get(v, argument);
}

Napi::Value optionValue(const Napi::Object& o, const char* key) {
  return o.Has(key) ? o.Get(key) : o.Env().Undefined();
}

bool boolOption(const Napi::Object& o, const char* key) {
  Napi::Value v = optionValue(o, key);
  return !v.IsUndefined() && !v.IsNull() && v.ToBoolean();
}

double scaleOption(const Napi::Object& o, int64_t headDim) {
  Napi::Value v = optionValue(o, "scale");
  if (v.IsUndefined() || v.IsNull()) return 1.0 / std::sqrt(double(headDim));
  if (!v.IsNumber()) throwInvalid("scale", "expected a number");
  double s = v.As<Napi::Number>().DoubleValue();
  if (!std::isfinite(s) || s <= 0) throwInvalid("scale", "must be finite and positive");
  return s;
}

Tensor outputFor(const Napi::Value& given, const std::string& arg, const Shape& shape, DType dtype, Device device) {
  if (auto t = optionalTensor(given, arg)) {
    checkShape(*t, shape, arg);
    checkDType(*t, dtype, arg);
    checkSameDevice(*t, device, arg);
    return *t;
  }
  return empty(shape, dtype, device);
}

void checkRopeArgs(const Tensor& x, const char* xArg, const Tensor& positions, const Tensor& invFreq) {
  checkFloating(x, xArg);
  checkNdim(x, 4, xArg);
  if (x.dim(3) % 2) throwInvalid(xArg, "head dimension must be even");
  checkDType(positions, DType::I32, "positions");
  checkShape(positions, {x.dim(0), x.dim(1)}, "positions");
  checkDType(invFreq, DType::F32, "invFreq");
  checkShape(invFreq, {x.dim(3) / 2}, "invFreq");
  checkSameDevice(positions, x.device(), "positions");
  checkSameDevice(invFreq, x.device(), "invFreq");
}

std::vector<int32_t> readSeqOffsets(const Tensor& cu, int64_t N, int64_t T, int64_t tokens) {
  std::vector<int32_t> r(size_t(N + 1), 0);
  if (!cu.defined()) {
    for (int64_t n = 0; n <= N; ++n) r[size_t(n)] = int32_t(n * T);
    return r;
  }
  copyToHost(r.data(), cu, r.size() * sizeof(int32_t));
  if (r[0] != 0) throwInvalid("cuSeqlens", "must start at 0, got " + std::to_string(r[0]));
  for (int64_t n = 0; n < N; ++n)
    if (r[size_t(n + 1)] < r[size_t(n)])
      throwInvalid("cuSeqlens", "must be non-decreasing (entry " + std::to_string(n + 1) + ")");
  if (r[size_t(N)] > tokens)
    throwInvalid("cuSeqlens", "last entry " + std::to_string(r[size_t(N)]) + " exceeds the " + std::to_string(tokens) +
                                  " tokens");
  return r;
}

// ---- promise workers ----

PromiseWorker::PromiseWorker(Napi::Env env, const char* name, Work work, Done done)
    : Napi::AsyncWorker(env, name), deferred_(Napi::Promise::Deferred::New(env)), work_(std::move(work)),
      done_(std::move(done)) {}

void PromiseWorker::keep(const Napi::Value& v) { kept_.push_back(Napi::Persistent(v)); }

void PromiseWorker::Execute() {
  try {
    work_();
  } catch (const Error& e) {
    failure_ = e;
  } catch (const std::exception& e) {
    failure_ = Error(ErrorKind::Internal, e.what());
  }
}

void PromiseWorker::OnOK() {
  Napi::Env env = Env();
  if (failure_) {
    deferred_.Reject(toJsError(env, *failure_).Value());
    return;
  }
  try {
    deferred_.Resolve(done_ ? done_(env) : env.Undefined());
  } catch (const Napi::Error& e) {
    deferred_.Reject(e.Value());
  } catch (const Error& e) {
    deferred_.Reject(toJsError(env, e).Value());
  }
}

void PromiseWorker::OnError(const Napi::Error& e) { deferred_.Reject(e.Value()); }

Napi::Promise runAsync(Napi::Env env, const char* name, PromiseWorker::Work work, PromiseWorker::Done done,
                       std::vector<Napi::Value> keep) {
  auto* w = new PromiseWorker(env, name, std::move(work), std::move(done));
  for (auto& v : keep) w->keep(v);
  Napi::Promise p = w->promise();
  w->Queue();
  return p;
}

Napi::Promise runOp(Napi::Env env, const char* name, PromiseWorker::Work work, const Napi::Value& outArg,
                    const Tensor& result, std::vector<Napi::Value> keep) {
  bool given = JsTensor::Is(outArg);
  if (given) keep.push_back(outArg);
  auto outRef = std::make_shared<Napi::Reference<Napi::Value>>();
  if (given) *outRef = Napi::Persistent(outArg);
  return runAsync(
      env, name, std::move(work),
      [given, outRef, result](Napi::Env e) -> Napi::Value {
        if (given) return outRef->Value();
        return JsTensor::Wrap(e, result);
      },
      std::move(keep));
}

Napi::Promise runMulti(Napi::Env env, const char* name, PromiseWorker::Work work, const std::vector<Output>& outs,
                       std::vector<Napi::Value> keep) {
  struct Slot {
    std::string key;
    bool given;
    std::shared_ptr<Napi::Reference<Napi::Value>> ref;
    Tensor tensor;
  };
  std::vector<Slot> slots;
  for (const Output& o : outs) {
    Slot s{o.key, JsTensor::Is(o.given), std::make_shared<Napi::Reference<Napi::Value>>(), o.tensor};
    if (s.given) {
      *s.ref = Napi::Persistent(o.given);
      keep.push_back(o.given);
    }
    slots.push_back(std::move(s));
  }
  return runAsync(
      env, name, std::move(work),
      [slots](Napi::Env e) -> Napi::Value {
        Napi::Object res = Napi::Object::New(e);
        for (const Slot& s : slots) res.Set(s.key, s.given ? s.ref->Value() : Napi::Value(JsTensor::Wrap(e, s.tensor)));
        return res;
      },
      std::move(keep));
}

void checkLike(const Tensor& t, const Tensor& ref, const char* arg) {
  checkDType(t, ref.dtype(), arg);
  checkShape(t, ref.shape(), arg);
  checkSameDevice(t, ref.device(), arg);
}

Napi::Object objectArg(const Napi::CallbackInfo& info, size_t i, const char* arg, const std::string& what) {
  if (info.Length() <= i || info[i].IsUndefined() || info[i].IsNull()) return Napi::Object::New(info.Env());
  if (!info[i].IsObject() || JsTensor::Is(info[i])) throwInvalid(arg, "expected " + what);
  return info[i].As<Napi::Object>();
}

}  // namespace tcal::napi
