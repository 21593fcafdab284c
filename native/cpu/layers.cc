#include "layers.h"

#include <cmath>
#include <type_traits>

#include "../core/dispatch.h"
#include "../core/parallel.h"

namespace tcal::cpu {

namespace {
// Arithmetic type of the per-token layers: fp32 as transformers computes them, fp64 for f64 tensors (the
// finite-difference checks of the training engine need the whole forward in double).
template <typename T>
using LayerMath = std::conditional_t<std::is_same_v<T, double>, double, float>;
}  // namespace

void rmsNorm(const Tensor& x, const Tensor& w, double eps, const Tensor& y) {
  int64_t d = w.numel(), rows = x.numel() / std::max<int64_t>(d, 1);
  dispatchFloat(x.dtype(), "x", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* px = x.ptr<T>();
    const T* pw = w.ptr<T>();
    T* py = y.ptr<T>();
    parallelFor(rows, std::max<int64_t>(1, 4096 / std::max<int64_t>(d, 1)), [&](int64_t s, int64_t e) {
      for (int64_t r = s; r < e; ++r) {
        double ss = 0;
        for (int64_t i = 0; i < d; ++i) {
          double v = toFloat(px[r * d + i]);
          ss += v * v;
        }
        using M = LayerMath<T>;
        M inv = M(1.0 / std::sqrt(ss / double(d) + eps));
        for (int64_t i = 0; i < d; ++i)
          py[r * d + i] = fromFloat<T>(M(toFloat(px[r * d + i])) * inv * M(toFloat(pw[i])));
      }
    });
  });
}

void rope(const Tensor& x, const Tensor& positions, const Tensor& invFreq, const Tensor& y) {
  int64_t B = x.dim(0), T = x.dim(1), H = x.dim(2), D = x.dim(3), half = D / 2;
  const int32_t* pos = positions.ptr<int32_t>();
  const float* inv = invFreq.ptr<float>();
  dispatchFloat(x.dtype(), "x", [&](auto tag) {
    using E = typename decltype(tag)::type;
    const E* px = x.ptr<E>();
    E* py = y.ptr<E>();
    parallelFor(B * T, std::max<int64_t>(1, 2048 / std::max<int64_t>(H * D, 1)), [&](int64_t s, int64_t e) {
      for (int64_t bt = s; bt < e; ++bt) {
        float p = float(pos[bt]);
        for (int64_t j = 0; j < half; ++j) {
          float angle = p * inv[j];  // fp32 product, as transformers computes it
          using M = LayerMath<E>;
          M c = std::cos(angle), sn = std::sin(angle);
          for (int64_t h = 0; h < H; ++h) {
            int64_t base = (bt * H + h) * D;
            M x1 = toFloat(px[base + j]), x2 = toFloat(px[base + j + half]);
            py[base + j] = fromFloat<E>(x1 * c - x2 * sn);
            py[base + j + half] = fromFloat<E>(x2 * c + x1 * sn);
          }
        }
      }
    });
  });
}

void embedding(const Tensor& table, const Tensor& ids, const Tensor& out) {
  int64_t V = table.dim(0), D = table.dim(1), n = ids.numel();
  const int32_t* pi = ids.ptr<int32_t>();
  for (int64_t i = 0; i < n; ++i)
    if (pi[i] < 0 || pi[i] >= V)
      throwInvalid("ids", "token id " + std::to_string(pi[i]) + " at position " + std::to_string(i) +
                              " is outside the vocabulary of " + std::to_string(V));
  size_t row = size_t(D) * dtypeSize(table.dtype());
  const char* src = static_cast<const char*>(table.data());
  char* dst = static_cast<char*>(out.data());
  parallelFor(n, 256, [&](int64_t s, int64_t e) {
    for (int64_t i = s; i < e; ++i) std::memcpy(dst + i * row, src + size_t(pi[i]) * row, row);
  });
}

void swiglu(const Tensor& gate, const Tensor& up, const Tensor& out) {
  dispatchFloat(gate.dtype(), "gate", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* pg = gate.ptr<T>();
    const T* pu = up.ptr<T>();
    T* po = out.ptr<T>();
    parallelFor(gate.numel(), 1 << 15, [&](int64_t s, int64_t e) {
      for (int64_t i = s; i < e; ++i) {
        using M = LayerMath<T>;
        M g = toFloat(pg[i]);
        po[i] = fromFloat<T>(g / (M(1) + std::exp(-g)) * M(toFloat(pu[i])));
      }
    });
  });
}

void crossEntropy(const Tensor& logits, const Tensor& targets, const Tensor& loss) {
  int64_t V = logits.dim(-1), rows = logits.numel() / std::max<int64_t>(V, 1);
  const int32_t* pt = targets.ptr<int32_t>();
  // f64 logits give an f64 loss (finite-difference checks need it); everything else f32.
  float* pl = loss.dtype() == DType::F64 ? nullptr : loss.ptr<float>();
  double* pl64 = loss.dtype() == DType::F64 ? loss.ptr<double>() : nullptr;
  auto put = [&](int64_t r, double v) {
    if (pl64) pl64[r] = v;
    else pl[r] = float(v);
  };
  dispatchFloat(logits.dtype(), "logits", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* px = logits.ptr<T>();
    parallelFor(rows, 1, [&](int64_t s, int64_t e) {
      for (int64_t r = s; r < e; ++r) {
        int32_t t = pt[r];
        if (t < 0) {
          put(r, 0);
          continue;
        }
        if (t >= V) throwInvalid("targets", "target " + std::to_string(t) + " outside the vocabulary");
        const T* row = px + r * V;
        double m = -INFINITY;
        for (int64_t i = 0; i < V; ++i) m = std::max(m, double(toFloat(row[i])));
        double z = 0;
        for (int64_t i = 0; i < V; ++i) z += std::exp(double(toFloat(row[i])) - m);
        put(r, m + std::log(z) - double(toFloat(row[t])));
      }
    });
  });
}

}  // namespace tcal::cpu
