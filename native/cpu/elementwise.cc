#include "elementwise.h"

#include "../core/dispatch.h"
#include "../core/parallel.h"
#include "../core/random.h"
#include <cmath>

namespace tcal::cpu {

namespace {
constexpr int64_t kGrain = 1 << 16;

template <typename Op>
void binary(const Tensor& a, const Tensor& b, const Tensor& out, Op op) {
  dispatchFloat(a.dtype(), "a", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using Acc = typename AccOf<T>::type;
    const T* pa = a.ptr<T>();
    const T* pb = b.ptr<T>();
    T* po = out.ptr<T>();
    int64_t nb = b.numel();
    parallelFor(a.numel(), kGrain, [&](int64_t s, int64_t e) {
      for (int64_t i = s; i < e; ++i) po[i] = fromFloat<T>(op(Acc(toFloat(pa[i])), Acc(toFloat(pb[i % nb]))));
    });
  });
}
}  // namespace

void cast(const Tensor& src, const Tensor& dst) {
  dispatchFloat(src.dtype(), "x", [&](auto stag) {
    using S = typename decltype(stag)::type;
    dispatchFloat(dst.dtype(), "dtype", [&](auto dtag) {
      using D = typename decltype(dtag)::type;
      const S* ps = src.ptr<S>();
      D* pd = dst.ptr<D>();
      parallelFor(src.numel(), kGrain, [&](int64_t s, int64_t e) {
        for (int64_t i = s; i < e; ++i) pd[i] = fromFloat<D>(toFloat(ps[i]));
      });
    });
  });
}

void add(const Tensor& a, const Tensor& b, const Tensor& out) {
  binary(a, b, out, [](auto x, auto y) { return x + y; });
}

void mul(const Tensor& a, const Tensor& b, const Tensor& out) {
  binary(a, b, out, [](auto x, auto y) { return x * y; });
}

void scale(const Tensor& x, double alpha, const Tensor& out) {
  dispatchFloat(x.dtype(), "x", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using Acc = typename AccOf<T>::type;
    const T* px = x.ptr<T>();
    T* po = out.ptr<T>();
    Acc al = Acc(alpha);
    parallelFor(x.numel(), kGrain, [&](int64_t s, int64_t e) {
      for (int64_t i = s; i < e; ++i) po[i] = fromFloat<T>(al * Acc(toFloat(px[i])));
    });
  });
}

void fill(const Tensor& t, double value) {
  auto body = [&](auto* p) {
    using T = std::remove_pointer_t<decltype(p)>;
    T v;
    if constexpr (std::is_same_v<T, int32_t> || std::is_same_v<T, int64_t>)
      v = T(value);
    else
      v = fromFloat<T>(value);
    parallelFor(t.numel(), kGrain, [&](int64_t s, int64_t e) {
      for (int64_t i = s; i < e; ++i) p[i] = v;
    });
  };
  switch (t.dtype()) {
    case DType::I32: body(t.ptr<int32_t>()); break;
    case DType::I64: body(t.ptr<int64_t>()); break;
    default:
      dispatchFloat(t.dtype(), "t", [&](auto tag) { body(t.ptr<typename decltype(tag)::type>()); });
  }
}

void random(const Tensor& t, int kind, uint64_t seed, double a, double b) {
  dispatchFloat(t.dtype(), "t", [&](auto tag) {
    using T = typename decltype(tag)::type;
    T* p = t.ptr<T>();
    parallelFor(t.numel(), kGrain, [&](int64_t s, int64_t e) {
      for (int64_t i = s; i < e; ++i) p[i] = fromFloat<T>(randomValue(RandomKind(kind), seed, uint64_t(i), a, b));
    });
  });
}

}  // namespace tcal::cpu
