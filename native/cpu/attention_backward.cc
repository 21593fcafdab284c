#include "attention_backward.h"

#include <cmath>
#include <vector>

#include "../core/dispatch.h"
#include "../core/parallel.h"

namespace tcal::cpu {

namespace {

inline double dot(const double* a, const double* b, int64_t n) {
  double s0 = 0, s1 = 0;
  int64_t i = 0;
  for (; i + 2 <= n; i += 2) {
    s0 += a[i] * b[i];
    s1 += a[i + 1] * b[i + 1];
  }
  if (i < n) s0 += a[i] * b[i];
  return s0 + s1;
}

template <typename T>
void backwardTyped(const attn::Problem& p, const T* q, const T* k, const T* v, const T* o, const float* lse,
                   const T* dO, T* dq, T* dk, T* dv) {
  const int64_t D = p.D, H = p.H, HKV = p.HKV, T_ = p.T, group = p.group();
  const double scale = p.scale;
  // One task per (sequence, KV head): it owns dk/dv of that head over the sequence and dq of its group's heads.
  parallelFor(p.N * HKV, 1, [&](int64_t t0, int64_t t1) {
    std::vector<double> kf, vf, dkA, dvA, ds, qi(static_cast<size_t>(D)), gi(static_cast<size_t>(D)), dqi(static_cast<size_t>(D));
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t n = task / HKV, hk = task % HKV;
      const int64_t s0 = p.cu[size_t(n)], len = p.cu[size_t(n + 1)] - s0;
      if (len == 0) continue;
      kf.assign(size_t(len * D), 0.0);
      vf.assign(size_t(len * D), 0.0);
      dkA.assign(size_t(len * D), 0.0);
      dvA.assign(size_t(len * D), 0.0);
      ds.assign(size_t(len), 0.0);
      for (int64_t j = 0; j < len; ++j)
        for (int64_t d = 0; d < D; ++d) {
          kf[size_t(j * D + d)] = toFloat(k[((s0 + j) * HKV + hk) * D + d]);
          vf[size_t(j * D + d)] = toFloat(v[((s0 + j) * HKV + hk) * D + d]);
        }
      for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
        for (int64_t i = 0; i < len; ++i) {
          const int64_t row = s0 + i;
          const int64_t base = (row * H + h) * D;
          double Di = 0;
          for (int64_t d = 0; d < D; ++d) {
            qi[size_t(d)] = toFloat(q[base + d]);
            gi[size_t(d)] = toFloat(dO[base + d]);
            Di += gi[size_t(d)] * double(toFloat(o[base + d]));
          }
          const double L = lse[((row / T_) * H + h) * T_ + row % T_];
          for (int64_t j = 0; j <= i; ++j) {
            const double P = std::exp(scale * dot(qi.data(), kf.data() + j * D, D) - L);
            const double dp = dot(gi.data(), vf.data() + j * D, D);
            ds[size_t(j)] = P * (dp - Di);
            double* dvj = dvA.data() + j * D;
            for (int64_t d = 0; d < D; ++d) dvj[d] += P * gi[size_t(d)];
          }
          std::fill(dqi.begin(), dqi.end(), 0.0);
          for (int64_t j = 0; j <= i; ++j) {
            const double s = ds[size_t(j)];
            const double* kj = kf.data() + j * D;
            double* dkj = dkA.data() + j * D;
            for (int64_t d = 0; d < D; ++d) {
              dqi[size_t(d)] += s * kj[d];
              dkj[d] += s * qi[size_t(d)];
            }
          }
          for (int64_t d = 0; d < D; ++d) dq[base + d] = fromFloat<T>(scale * dqi[size_t(d)]);
        }
      }
      for (int64_t j = 0; j < len; ++j)
        for (int64_t d = 0; d < D; ++d) {
          const int64_t at = ((s0 + j) * HKV + hk) * D + d;
          dk[at] = fromFloat<T>(scale * dkA[size_t(j * D + d)]);
          dv[at] = fromFloat<T>(dvA[size_t(j * D + d)]);
        }
    }
  });
  // Tokens past the last sequence: zero gradients.
  for (int64_t row = p.cu[size_t(p.N)]; row < p.tokens(); ++row) {
    for (int64_t i = 0; i < H * D; ++i) dq[row * H * D + i] = fromFloat<T>(0.0);
    for (int64_t i = 0; i < HKV * D; ++i) dk[row * HKV * D + i] = dv[row * HKV * D + i] = fromFloat<T>(0.0);
  }
}

}  // namespace

void attentionBackward(const attn::Problem& p, const Tensor& q, const Tensor& k, const Tensor& v,
                       const attn::BackwardIn& in, const attn::BackwardOut& out) {
  dispatchFloat(q.dtype(), "q", [&](auto tag) {
    using T = typename decltype(tag)::type;
    backwardTyped<T>(p, q.ptr<T>(), k.ptr<T>(), v.ptr<T>(), in.o.ptr<T>(), in.lse.ptr<float>(), in.dO.ptr<T>(),
                     out.dq.ptr<T>(), out.dk.ptr<T>(), out.dv.ptr<T>());
  });
}

}  // namespace tcal::cpu
