// Tensors: a dense, row-major view (shape, dtype, byte offset) over reference-counted storage on one device.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "dtype.h"
#include "error.h"

namespace tcal {

struct Device {
  enum Kind { CPU = 0, CUDA = 1 } kind = CPU;
  int index = 0;
  bool operator==(const Device& o) const { return kind == o.kind && index == o.index; }
  bool operator!=(const Device& o) const { return !(*this == o); }
  std::string str() const { return kind == CPU ? "cpu" : "cuda:" + std::to_string(index); }
};

// A block of memory on one device. Freed (returned to its allocator) when the last reference goes.
class Storage {
 public:
  Storage(void* ptr, size_t bytes, Device device, std::function<void(void*)> release)
      : ptr_(ptr), bytes_(bytes), device_(device), release_(std::move(release)) {}
  ~Storage() {
    if (release_) release_(ptr_);
  }
  Storage(const Storage&) = delete;
  Storage& operator=(const Storage&) = delete;
  void* data() const { return ptr_; }
  size_t bytes() const { return bytes_; }
  Device device() const { return device_; }

 private:
  void* ptr_;
  size_t bytes_;
  Device device_;
  std::function<void(void*)> release_;
};

using Shape = std::vector<int64_t>;

inline int64_t numelOf(const Shape& s) {
  int64_t n = 1;
  for (auto d : s) n *= d;
  return n;
}

inline std::string shapeStr(const Shape& s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? "," : "") + std::to_string(s[i]);
  return r + "]";
}

class Tensor {
 public:
  Tensor() = default;
  Tensor(std::shared_ptr<Storage> storage, Shape shape, DType dtype, size_t offset = 0)
      : storage_(std::move(storage)), shape_(std::move(shape)), dtype_(dtype), offset_(offset) {}

  bool defined() const { return storage_ != nullptr; }
  const Shape& shape() const { return shape_; }
  int64_t dim(int i) const { return shape_[i < 0 ? shape_.size() + i : i]; }
  int ndim() const { return int(shape_.size()); }
  DType dtype() const { return dtype_; }
  Device device() const { return storage_->device(); }
  int64_t numel() const { return numelOf(shape_); }
  size_t nbytes() const { return size_t(numel()) * dtypeSize(dtype_); }
  void* data() const { return static_cast<char*>(storage_->data()) + offset_; }
  template <typename T>
  T* ptr() const { return reinterpret_cast<T*>(data()); }
  const std::shared_ptr<Storage>& storage() const { return storage_; }
  size_t offset() const { return offset_; }

  // Same storage, new shape with the same element count.
  Tensor reshape(Shape s) const {
    if (numelOf(s) != numel()) throwInvalid("shape", "cannot reshape " + shapeStr(shape_) + " to " + shapeStr(s));
    return Tensor(storage_, std::move(s), dtype_, offset_);
  }
  // Rows [begin, end) of the first dimension, sharing storage.
  Tensor narrow0(int64_t begin, int64_t end) const {
    Shape s = shape_;
    int64_t row = numel() / (shape_.empty() || shape_[0] == 0 ? 1 : shape_[0]);
    s[0] = end - begin;
    return Tensor(storage_, s, dtype_, offset_ + size_t(begin * row) * dtypeSize(dtype_));
  }

 private:
  std::shared_ptr<Storage> storage_;
  Shape shape_;
  DType dtype_ = DType::F32;
  size_t offset_ = 0;
};

// Argument checks shared by every op; each names the argument it rejects.
inline void checkDType(const Tensor& t, DType want, const std::string& arg) {
  if (t.dtype() != want)
    throwInvalid(arg, std::string("expected dtype ") + dtypeName(want) + ", got " + dtypeName(t.dtype()));
}
inline void checkShape(const Tensor& t, const Shape& want, const std::string& arg) {
  if (t.shape() != want) throwInvalid(arg, "expected shape " + shapeStr(want) + ", got " + shapeStr(t.shape()));
}
inline void checkSameDevice(const Tensor& t, Device d, const std::string& arg) {
  if (t.device() != d) throwInvalid(arg, "expected a tensor on " + d.str() + ", got one on " + t.device().str());
}
inline void checkFloating(const Tensor& t, const std::string& arg) {
  if (!isFloat(t.dtype())) throwInvalid(arg, std::string("expected a floating dtype, got ") + dtypeName(t.dtype()));
}
inline void checkNdim(const Tensor& t, int n, const std::string& arg) {
  if (t.ndim() != n)
    throwInvalid(arg, "expected " + std::to_string(n) + " dimensions, got shape " + shapeStr(t.shape()));
}

}  // namespace tcal
