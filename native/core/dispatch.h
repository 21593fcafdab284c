// Run a templated body for the C++ type behind a floating dtype. Host code sees bf16 / f16 as 16-bit
// wrappers with float conversions (CPU reference arithmetic happens in float or double).
#pragma once
#include "dtype.h"

namespace tcal {

struct bf16_t {
  uint16_t bits;
};
struct f16_t {
  uint16_t bits;
};

inline float toFloat(float v) { return v; }
inline double toFloat(double v) { return v; }
inline float toFloat(bf16_t v) { return bf16ToFloat(v.bits); }
inline float toFloat(f16_t v) { return f16ToFloat(v.bits); }

template <typename T>
inline T fromFloat(double v);
template <>
inline float fromFloat<float>(double v) { return float(v); }
template <>
inline double fromFloat<double>(double v) { return v; }
template <>
inline bf16_t fromFloat<bf16_t>(double v) { return bf16_t{floatToBf16(float(v))}; }
template <>
inline f16_t fromFloat<f16_t>(double v) { return f16_t{floatToF16(float(v))}; }

// Accumulator type of the reference: double for f64, float otherwise.
template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

template <typename T>
struct TypeTag {
  using type = T;
};

template <typename Fn>
auto dispatchFloat(DType t, const char* argument, Fn&& fn) {
  switch (t) {
    case DType::F32: return fn(TypeTag<float>{});
    case DType::F64: return fn(TypeTag<double>{});
    case DType::BF16: return fn(TypeTag<bf16_t>{});
    case DType::F16: return fn(TypeTag<f16_t>{});
    default: throwInvalid(argument, std::string("expected a floating dtype, got ") + dtypeName(t));
  }
}

}  // namespace tcal
