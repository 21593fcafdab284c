// Shared N-API plumbing: the tensor wrapper, argument parsing, typed-error conversion and promise workers.
#pragma once
#include <napi.h>

#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "../core/error.h"
#include "../core/runtime.h"
#include "../core/tensor.h"

namespace tcal::napi {

// A JS error object carrying `tcalKind` and the fields of tcal::Error; lib/native.ts turns it into a class.
Napi::Error toJsError(Napi::Env env, const Error& e);

// Runs fn, converting tcal::Error / std::exception into JS exceptions.
template <typename Fn>
auto guard(Napi::Env env, Fn&& fn) -> decltype(fn()) {
  try {
    return fn();
  } catch (const Error& e) {
    throw toJsError(env, e);
  } catch (const Napi::Error&) {
    throw;
  } catch (const std::exception& e) {
    throw toJsError(env, Error(ErrorKind::Internal, e.what()));
  }
}

class JsTensor : public Napi::ObjectWrap<JsTensor> {
 public:
  static Napi::Function Init(Napi::Env env);
  static Napi::Object Wrap(Napi::Env env, Tensor t);
  // The live tensor behind a JS value; a typed InvalidArgument error naming `argument` otherwise.
  static const Tensor& Get(const Napi::Value& v, const std::string& argument);
  static bool Is(const Napi::Value& v);

  explicit JsTensor(const Napi::CallbackInfo& info);
  ~JsTensor() override;

 private:
  Napi::Value Shape(const Napi::CallbackInfo& info);
  Napi::Value DTypeName(const Napi::CallbackInfo& info);
  Napi::Value DeviceName(const Napi::CallbackInfo& info);
  Napi::Value NBytes(const Napi::CallbackInfo& info);
  Napi::Value Disposed(const Napi::CallbackInfo& info);
  Napi::Value Dispose(const Napi::CallbackInfo& info);
  Napi::Value View(const Napi::CallbackInfo& info);
  Napi::Value SameStorage(const Napi::CallbackInfo& info);
  Napi::Value Rows(const Napi::CallbackInfo& info);
  void releaseExternal();

  Tensor tensor_;
  int64_t external_ = 0;  // bytes reported to V8 as external memory (CPU tensors)
};

Device parseDevice(const Napi::Value& v, const std::string& argument);
DType parseDTypeArg(const Napi::Value& v, const std::string& argument);
Shape parseShape(const Napi::Value& v, const std::string& argument);
// Optional tensor argument: undefined / null → nullopt.
std::optional<Tensor> optionalTensor(const Napi::Value& v, const std::string& argument);

// Option objects: a key's value (undefined when absent), a boolean option, and the attention-style score
// scale (`scale` key, default 1/sqrt(headDim), finite and positive).
Napi::Value optionValue(const Napi::Object& o, const char* key);
bool boolOption(const Napi::Object& o, const char* key);
double scaleOption(const Napi::Object& o, int64_t headDim);

// The output tensor of an op: the caller's (checked against shape, dtype and device, errors naming `arg`)
// or a fresh one.
Tensor outputFor(const Napi::Value& given, const std::string& arg, const Shape& shape, DType dtype, Device device);

// RoPE arguments: x [B,T,H,D] floating with D even, positions int32 [B,T], invFreq f32 [D/2], one device.
void checkRopeArgs(const Tensor& x, const char* xArg, const Tensor& positions, const Tensor& invFreq);

// Host copy of varlen offsets: cu_seqlens (N+1 entries, checked: starts at 0, non-decreasing, ends within
// `tokens`) or, when undefined, uniform rows [0, T, 2T, ..., N·T]. Reads device memory: call on a worker.
std::vector<int32_t> readSeqOffsets(const Tensor& cu, int64_t N, int64_t T, int64_t tokens);

// Runs `work` on a libuv worker thread and settles a promise on the JS thread with `done`'s value.
// `keep` holds JS objects (buffers, output tensors) alive until the promise settles.
class PromiseWorker : public Napi::AsyncWorker {
 public:
  using Work = std::function<void()>;
  using Done = std::function<Napi::Value(Napi::Env)>;
  PromiseWorker(Napi::Env env, const char* name, Work work, Done done);
  void keep(const Napi::Value& v);
  Napi::Promise promise() { return deferred_.Promise(); }
  void Execute() override;
  void OnOK() override;
  void OnError(const Napi::Error& e) override;

 private:
  Napi::Promise::Deferred deferred_;
  Work work_;
  Done done_;
  std::optional<Error> failure_;
  std::vector<Napi::Reference<Napi::Value>> kept_;
};

// Queue `work`; the promise resolves to done(env).
Napi::Promise runAsync(Napi::Env env, const char* name, PromiseWorker::Work work, PromiseWorker::Done done,
                       std::vector<Napi::Value> keep = {});

// Promise of a tensor op: resolves to `out` (the JS object given by the caller) or a new wrapper of result.
Napi::Promise runOp(Napi::Env env, const char* name, PromiseWorker::Work work, const Napi::Value& outArg,
                    const Tensor& result, std::vector<Napi::Value> keep = {});

// Multi-output ops: one named output, and the JS value the caller passed for it (undefined when none).
struct Output {
  const char* key;
  Napi::Value given;
  Tensor tensor;
};

// Promise of a multi-output op: resolves to {key: tensor}, reusing the caller's JS objects for given outputs.
Napi::Promise runMulti(Napi::Env env, const char* name, PromiseWorker::Work work, const std::vector<Output>& outs,
                       std::vector<Napi::Value> keep);

// t has ref's dtype, shape and device (InvalidArgument naming `arg` otherwise).
void checkLike(const Tensor& t, const Tensor& ref, const char* arg);

// An optional object argument at info[i]: an empty object when undefined / null, InvalidArgument naming `arg`
// ("expected <what>") when it is not a plain object.
Napi::Object objectArg(const Napi::CallbackInfo& info, size_t i, const char* arg, const std::string& what = "an object");

// Runs the CUDA or the CPU implementation of an op family's function `fn`, by the device of tensor t.
#ifdef TCAL_WITH_CUDA
#define TCAL_DISPATCH(t, fn, ...) \
  ((t).device().kind == Device::CUDA ? cuda::fn(__VA_ARGS__) : cpu::fn(__VA_ARGS__))
#else
#define TCAL_DISPATCH(t, fn, ...) cpu::fn(__VA_ARGS__)
#endif

// Registration of each op family (one file each).
void registerRuntime(Napi::Env env, Napi::Object exports);
void registerElementwise(Napi::Env env, Napi::Object exports);
void registerReduce(Napi::Env env, Napi::Object exports);
void registerMatmul(Napi::Env env, Napi::Object exports);
void registerLayers(Napi::Env env, Napi::Object exports);
void registerLayersBackward(Napi::Env env, Napi::Object exports);
void registerGdn(Napi::Env env, Napi::Object exports);
void registerAttention(Napi::Env env, Napi::Object exports);
void registerMoments(Napi::Env env, Napi::Object exports);
void registerAdamw(Napi::Env env, Napi::Object exports);

}  // namespace tcal::napi
