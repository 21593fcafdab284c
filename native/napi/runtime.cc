// Runtime exports: backend facts, tensor creation, host <-> device copies, sync, memory statistics.
#include "common.h"

#include <cstdlib>
#ifdef TCAL_WITH_CUDA
#include "../cuda/cublas.h"
#endif

namespace tcal::napi {

namespace {

Napi::Value CudaDeviceCount(const Napi::CallbackInfo& info) {
  return guard(info.Env(), [&]() -> Napi::Value {
    std::string reason;
    int n = cudaDeviceCount(&reason);
    Napi::Object o = Napi::Object::New(info.Env());
    o.Set("compiled", cudaCompiled());
    o.Set("count", n);
    o.Set("reason", reason);
    return o;
  });
}

Napi::Value CudaDeviceInfo(const Napi::CallbackInfo& info) {
  return guard(info.Env(), [&]() -> Napi::Value {
    int index = info[0].IsNumber() ? info[0].As<Napi::Number>().Int32Value() : 0;
    DeviceInfo d = cudaDeviceInfo(index);
    Napi::Object o = Napi::Object::New(info.Env());
    o.Set("index", d.index);
    o.Set("name", d.name);
    o.Set("computeCapability", std::to_string(d.major) + "." + std::to_string(d.minor));
    o.Set("multiprocessors", d.multiprocessors);
    o.Set("totalMemory", double(d.totalMemory));
    o.Set("freeMemory", double(d.freeMemory));
    o.Set("l2Bytes", double(d.l2Bytes));
    o.Set("sharedPerBlockOptin", double(d.sharedPerBlockOptin));
    return o;
  });
}

Napi::Value CompiledKernels(const Napi::CallbackInfo& info) {
  Napi::Array a = Napi::Array::New(info.Env());
  uint32_t i = 0;
  for (auto& k : compiledKernels()) a.Set(i++, k);
  return a;
}

Napi::Value BlasStatus(const Napi::CallbackInfo& info) {
  Napi::Object o = Napi::Object::New(info.Env());
#ifdef TCAL_WITH_CUDA
  std::string reason;
  bool ok = cuda::blas::available(&reason);
  o.Set("available", ok);
  o.Set("detail", reason);
#else
  o.Set("available", false);
  o.Set("detail", "built without CUDA");
#endif
  return o;
}

Napi::Value Empty(const Napi::CallbackInfo& info) {
  return guard(info.Env(), [&]() -> Napi::Value {
    Shape shape = parseShape(info[0], "shape");
    DType dtype = parseDTypeArg(info[1], "dtype");
    Device device = parseDevice(info[2], "device");
    return JsTensor::Wrap(info.Env(), empty(shape, dtype, device));
  });
}

struct HostView {
  void* data;
  size_t bytes;
};

HostView hostView(const Napi::Value& v, const std::string& argument) {
  if (v.IsTypedArray()) {
    Napi::TypedArray t = v.As<Napi::TypedArray>();
    Napi::ArrayBuffer buf = t.ArrayBuffer();
    return {static_cast<char*>(buf.Data()) + t.ByteOffset(), t.ByteLength()};
  }
  if (v.IsDataView()) {
    Napi::DataView d = v.As<Napi::DataView>();
    return {static_cast<char*>(d.ArrayBuffer().Data()) + d.ByteOffset(), d.ByteLength()};
  }
  if (v.IsArrayBuffer()) {
    Napi::ArrayBuffer b = v.As<Napi::ArrayBuffer>();
    return {b.Data(), b.ByteLength()};
  }
  throwInvalid(argument, "expected a TypedArray, DataView or ArrayBuffer");
}

// upload(data, shape, dtype, device) → Promise<Tensor>: copies the bytes (dtype is not converted).
Napi::Value Upload(const Napi::CallbackInfo& info) {
  return guard(info.Env(), [&]() -> Napi::Value {
    HostView hv = hostView(info[0], "data");
    Shape shape = parseShape(info[1], "shape");
    DType dtype = parseDTypeArg(info[2], "dtype");
    Device device = parseDevice(info[3], "device");
    size_t want = size_t(numelOf(shape)) * dtypeSize(dtype);
    if (hv.bytes != want)
      throwInvalid("data", std::to_string(hv.bytes) + " bytes do not match shape " + shapeStr(shape) + " of " +
                               dtypeName(dtype) + " (" + std::to_string(want) + " bytes)");
    Tensor t = empty(shape, dtype, device);
    return runOp(
        info.Env(), "upload", [t, hv] { copyFromHost(t, hv.data, hv.bytes); }, info.Env().Undefined(), t,
        {info[0]});
  });
}

// wrapHost(data, shape, dtype) → Tensor on the CPU sharing the JS buffer's memory (zero-copy).
Napi::Value WrapHost(const Napi::CallbackInfo& info) {
  return guard(info.Env(), [&]() -> Napi::Value {
    HostView hv = hostView(info[0], "data");
    Shape shape = parseShape(info[1], "shape");
    DType dtype = parseDTypeArg(info[2], "dtype");
    size_t want = size_t(numelOf(shape)) * dtypeSize(dtype);
    if (hv.bytes != want) throwInvalid("data", "byte length does not match shape and dtype");
    if (reinterpret_cast<uintptr_t>(hv.data) % dtypeSize(dtype) != 0)
      throwInvalid("data", "buffer is not aligned to its element size");
    // The reference keeps the JS buffer alive; storage is released on the JS thread (tensors die there).
    auto* ref = new Napi::Reference<Napi::Value>(Napi::Persistent(info[0]));
    Tensor t = wrapHost(hv.data, shape, dtype, [ref](void*) { delete ref; });
    return JsTensor::Wrap(info.Env(), t);
  });
}

// download(t) → Promise<ArrayBuffer> holding a copy of the tensor's bytes.
Napi::Value Download(const Napi::CallbackInfo& info) {
  return guard(info.Env(), [&]() -> Napi::Value {
    Tensor t = JsTensor::Get(info[0], "tensor");
    Napi::ArrayBuffer buf = Napi::ArrayBuffer::New(info.Env(), t.nbytes());
    void* dst = buf.Data();
    return runAsync(
        info.Env(), "download", [t, dst] { copyToHost(dst, t, t.nbytes()); },
        [ref = std::make_shared<Napi::Reference<Napi::Value>>(Napi::Persistent(Napi::Value(buf)))](Napi::Env) {
          return ref->Value();
        });
  });
}

// copyInto(dst, src) → Promise<dst>: byte copy between any devices.
Napi::Value CopyInto(const Napi::CallbackInfo& info) {
  return guard(info.Env(), [&]() -> Napi::Value {
    Tensor dst = JsTensor::Get(info[0], "dst");
    Tensor src = JsTensor::Get(info[1], "src");
    checkDType(src, dst.dtype(), "src");
    checkShape(src, dst.shape(), "src");
    return runOp(info.Env(), "copyInto", [dst, src] { copyBytes(dst, src); }, info[0], dst);
  });
}

Napi::Value Synchronize(const Napi::CallbackInfo& info) {
  return guard(info.Env(), [&]() -> Napi::Value {
    Device d = parseDevice(info[0], "device");
    return runAsync(info.Env(), "synchronize", [d] { synchronize(d); }, nullptr);
  });
}

Napi::Value MemoryStatsJs(const Napi::CallbackInfo& info) {
  return guard(info.Env(), [&]() -> Napi::Value {
    MemoryStats s = memoryStats(parseDevice(info[0], "device"));
    Napi::Object o = Napi::Object::New(info.Env());
    o.Set("allocated", double(s.allocated));
    o.Set("reserved", double(s.reserved));
    o.Set("peakAllocated", double(s.peakAllocated));
    o.Set("allocCalls", double(s.allocCalls));
    o.Set("cacheHits", double(s.cacheHits));
    return o;
  });
}

Napi::Value EmptyCache(const Napi::CallbackInfo& info) {
  return guard(info.Env(), [&]() -> Napi::Value {
    emptyCache(parseDevice(info[0], "device"));
    return info.Env().Undefined();
  });
}

// setKernelSwitch(name, value | null): sets or clears one TCAL_* kernel switch in the process environment, where the
// native launchers read it (std::getenv per call). Node's process.env does the same in plain node, but a Jest test's
// process.env is a copy that never reaches the C environment (found in session 7: every in-test switch ran the
// default path). Call it only while no native work is in flight (setenv is not safe beside a concurrent getenv).
Napi::Value SetKernelSwitch(const Napi::CallbackInfo& info) {
  return guard(info.Env(), [&]() -> Napi::Value {
    const std::string name = info[0].IsString() ? info[0].As<Napi::String>().Utf8Value() : "";
    if (name.rfind("TCAL_", 0) != 0 || name.find('=') != std::string::npos)
      throwInvalid("name", "expected a TCAL_* kernel switch, got '" + name + "'");
    if (info[1].IsString()) setenv(name.c_str(), info[1].As<Napi::String>().Utf8Value().c_str(), 1);
    else unsetenv(name.c_str());
    return info.Env().Undefined();
  });
}

}  // namespace

void registerRuntime(Napi::Env env, Napi::Object exports) {
  exports.Set("cudaDeviceCount", Napi::Function::New(env, CudaDeviceCount));
  exports.Set("cudaDeviceInfo", Napi::Function::New(env, CudaDeviceInfo));
  exports.Set("compiledKernels", Napi::Function::New(env, CompiledKernels));
  exports.Set("blasStatus", Napi::Function::New(env, BlasStatus));
  exports.Set("empty", Napi::Function::New(env, Empty));
  exports.Set("upload", Napi::Function::New(env, Upload));
  exports.Set("wrapHost", Napi::Function::New(env, WrapHost));
  exports.Set("download", Napi::Function::New(env, Download));
  exports.Set("copyInto", Napi::Function::New(env, CopyInto));
  exports.Set("synchronize", Napi::Function::New(env, Synchronize));
  exports.Set("memoryStats", Napi::Function::New(env, MemoryStatsJs));
  exports.Set("emptyCache", Napi::Function::New(env, EmptyCache));
  exports.Set("setKernelSwitch", Napi::Function::New(env, SetKernelSwitch));
}

}  // namespace tcal::napi
