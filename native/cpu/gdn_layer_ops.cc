#include "gdn_layer_ops.h"

#include <cmath>
#include <vector>

#include "../core/dispatch.h"
#include "../core/parallel.h"
#include "param_grad.h"

namespace tcal::cpu {

namespace {

// Per token: the [begin, end) of its sequence, or {0, 0} for tokens past offsets[N].
struct Span {
  int64_t begin = 0, end = 0;
};
std::vector<Span> spansOf(const std::vector<int32_t>& offsets, int64_t tokens) {
  std::vector<Span> s(static_cast<size_t>(tokens));
  for (size_t n = 0; n + 1 < offsets.size(); ++n)
    for (int64_t t = offsets[n]; t < offsets[n + 1]; ++t) s[size_t(t)] = {offsets[n], offsets[n + 1]};
  return s;
}

template <typename C>
C sigmoid(C x) {
  return C(1) / (C(1) + std::exp(-x));
}

}  // namespace

void causalConv1d(const Tensor& x, const Tensor& w, const std::vector<int32_t>& offsets, const Tensor& y) {
  const int64_t C = x.dim(-1), tokens = x.numel() / std::max<int64_t>(C, 1), W = w.dim(-1);
  std::vector<Span> span = spansOf(offsets, tokens);
  dispatchFloat(x.dtype(), "x", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = typename AccOf<T>::type;
    const T* px = x.ptr<T>();
    const T* pw = w.ptr<T>();
    T* py = y.ptr<T>();
    parallelFor(tokens, std::max<int64_t>(1, 4096 / std::max<int64_t>(C * W, 1)), [&](int64_t s, int64_t e) {
      for (int64_t t = s; t < e; ++t) {
        const Span sp = span[size_t(t)];
        for (int64_t c = 0; c < C; ++c) {
          A acc = 0;
          for (int64_t j = 0; j < W; ++j) {
            int64_t src = t - (W - 1) + j;
            if (src >= sp.begin && src < sp.end) acc += A(toFloat(pw[c * W + j])) * A(toFloat(px[src * C + c]));
          }
          py[t * C + c] = fromFloat<T>(double(acc));
        }
      }
    });
  });
}

void causalConv1dBackward(const Tensor& x, const Tensor& w, const Tensor& dy, const std::vector<int32_t>& offsets,
                          bool accumulate, const Tensor& dx, const Tensor& dw) {
  const int64_t C = x.dim(-1), tokens = x.numel() / std::max<int64_t>(C, 1), W = w.dim(-1);
  std::vector<Span> span = spansOf(offsets, tokens);
  dispatchFloat(x.dtype(), "x", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = typename AccOf<T>::type;
    const T* px = x.ptr<T>();
    const T* pw = w.ptr<T>();
    const T* pdy = dy.ptr<T>();
    T* pdx = dx.ptr<T>();
    parallelFor(tokens, std::max<int64_t>(1, 4096 / std::max<int64_t>(C * W, 1)), [&](int64_t s, int64_t e) {
      for (int64_t t = s; t < e; ++t) {
        const Span sp = span[size_t(t)];
        for (int64_t c = 0; c < C; ++c) {
          A acc = 0;
          for (int64_t j = 0; j < W; ++j) {
            int64_t dst = t + (W - 1) - j;  // the output that read x[t] through tap j
            if (dst < sp.end) acc += A(toFloat(pw[c * W + j])) * A(toFloat(pdy[dst * C + c]));
          }
          pdx[t * C + c] = fromFloat<T>(double(acc));
        }
      }
    });
    withParamGrad(dw, [&](auto* pdw) {
      using G = std::remove_pointer_t<decltype(pdw)>;
      parallelFor(C, std::max<int64_t>(1, 4096 / std::max<int64_t>(tokens * W, 1)), [&](int64_t s, int64_t e) {
        for (int64_t c = s; c < e; ++c)
          for (int64_t j = 0; j < W; ++j) {
            double acc = 0;
            for (int64_t t = 0; t < tokens; ++t) {
              int64_t src = t - (W - 1) + j;
              if (src >= span[size_t(t)].begin && src < span[size_t(t)].end)
                acc += double(toFloat(pdy[t * C + c])) * double(toFloat(px[src * C + c]));
            }
            G& out = pdw[c * W + j];
            out = G((accumulate ? double(out) : 0.0) + acc);
          }
      });
    });
  });
}

void gatedRmsNorm(const Tensor& x, const Tensor& w, const Tensor& gate, double eps, const Tensor& y) {
  const int64_t d = w.numel(), rows = x.numel() / std::max<int64_t>(d, 1);
  dispatchFloat(x.dtype(), "x", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = typename AccOf<T>::type;
    const T* px = x.ptr<T>();
    const T* pw = w.ptr<T>();
    const T* pg = gate.ptr<T>();
    T* py = y.ptr<T>();
    parallelFor(rows, std::max<int64_t>(1, 4096 / std::max<int64_t>(d, 1)), [&](int64_t s, int64_t e) {
      for (int64_t r = s; r < e; ++r) {
        double ss = 0;
        for (int64_t i = 0; i < d; ++i) ss += double(toFloat(px[r * d + i])) * double(toFloat(px[r * d + i]));
        A inv = A(1.0 / std::sqrt(ss / double(d) + eps));
        for (int64_t i = 0; i < d; ++i) {
          A g = A(toFloat(pg[r * d + i]));
          py[r * d + i] = fromFloat<T>(double(A(toFloat(px[r * d + i])) * inv * A(toFloat(pw[i])) * g * sigmoid(g)));
        }
      }
    });
  });
}

void gatedRmsNormBackward(const Tensor& x, const Tensor& w, const Tensor& gate, const Tensor& dy, double eps,
                          bool accumulate, const Tensor& dx, const Tensor& dw, const Tensor& dGate) {
  const int64_t d = w.numel(), rows = x.numel() / std::max<int64_t>(d, 1);
  dispatchFloat(x.dtype(), "x", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = typename AccOf<T>::type;
    const T* px = x.ptr<T>();
    const T* pw = w.ptr<T>();
    const T* pg = gate.ptr<T>();
    const T* pdy = dy.ptr<T>();
    T* pdx = dx.ptr<T>();
    T* pdg = dGate.ptr<T>();
    // Row statistics (inv, Σ u·x) first, then dw column by column, then the rows' dx and dGate, so the outputs
    // may overwrite the inputs.
    std::vector<double> inv(static_cast<size_t>(rows)), dot(static_cast<size_t>(rows));
    const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(d, 1));
    parallelFor(rows, grain, [&](int64_t s, int64_t e) {
      for (int64_t r = s; r < e; ++r) {
        double ss = 0, c = 0;
        for (int64_t i = 0; i < d; ++i) {
          double xv = toFloat(px[r * d + i]), g = toFloat(pg[r * d + i]);
          ss += xv * xv;
          c += double(toFloat(pdy[r * d + i])) * g * sigmoid(g) * double(toFloat(pw[i])) * xv;
        }
        inv[size_t(r)] = 1.0 / std::sqrt(ss / double(d) + eps);
        dot[size_t(r)] = c;
      }
    });
    withParamGrad(dw, [&](auto* pdw) {
      using G = std::remove_pointer_t<decltype(pdw)>;
      parallelFor(d, std::max<int64_t>(1, 4096 / std::max<int64_t>(rows, 1)), [&](int64_t s, int64_t e) {
        for (int64_t i = s; i < e; ++i) {
          double acc = 0;
          for (int64_t r = 0; r < rows; ++r) {
            double g = toFloat(pg[r * d + i]);
            acc += double(toFloat(pdy[r * d + i])) * double(toFloat(px[r * d + i])) * inv[size_t(r)] * g * sigmoid(g);
          }
          pdw[i] = G((accumulate ? double(pdw[i]) : 0.0) + acc);
        }
      });
    });
    parallelFor(rows, grain, [&](int64_t s, int64_t e) {
      for (int64_t r = s; r < e; ++r) {
        A iv = A(inv[size_t(r)]);
        A k = A(inv[size_t(r)] * inv[size_t(r)] * inv[size_t(r)] * dot[size_t(r)] / double(d));
        for (int64_t i = 0; i < d; ++i) {
          A xv = A(toFloat(px[r * d + i])), g = A(toFloat(pg[r * d + i])), o = A(toFloat(pdy[r * d + i]));
          A wv = A(toFloat(pw[i])), sg = sigmoid(g);
          A dxv = iv * o * g * sg * wv - k * xv;
          A dgv = o * xv * iv * wv * sg * (A(1) + g * (A(1) - sg));
          pdx[r * d + i] = fromFloat<T>(double(dxv));
          pdg[r * d + i] = fromFloat<T>(double(dgv));
        }
      }
    });
  });
}

void silu(const Tensor& x, const Tensor& y) {
  dispatchFloat(x.dtype(), "x", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = typename AccOf<T>::type;
    const T* px = x.ptr<T>();
    T* py = y.ptr<T>();
    parallelFor(x.numel(), 16384, [&](int64_t s, int64_t e) {
      for (int64_t i = s; i < e; ++i) {
        A v = A(toFloat(px[i]));
        py[i] = fromFloat<T>(double(v * sigmoid(v)));
      }
    });
  });
}

void siluBackward(const Tensor& x, const Tensor& dy, const Tensor& dx) {
  dispatchFloat(x.dtype(), "x", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = typename AccOf<T>::type;
    const T* px = x.ptr<T>();
    const T* pdy = dy.ptr<T>();
    T* pdx = dx.ptr<T>();
    parallelFor(x.numel(), 16384, [&](int64_t s, int64_t e) {
      for (int64_t i = s; i < e; ++i) {
        A v = A(toFloat(px[i])), sg = sigmoid(v);
        pdx[i] = fromFloat<T>(double(A(toFloat(pdy[i])) * sg * (A(1) + v * (A(1) - sg))));
      }
    });
  });
}

}  // namespace tcal::cpu
