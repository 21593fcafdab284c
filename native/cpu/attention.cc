#include "attention.h"

#include <type_traits>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../core/dispatch.h"
#include "../core/parallel.h"

namespace tcal::cpu {

namespace {

constexpr int64_t kQueryBlock = 32;  // query rows per task (K/V blocks are reused across them)
constexpr int64_t kKeyBlock = 64;    // keys converted and scored at a time

struct Task {
  int64_t seq, head, row0, row1;  // rows are flat token indices [row0, row1)
};

// Dot product in double with four independent partial sums (vectorisable, still fp64 accumulation).
template <typename S>
inline double dot(const S* a, const S* b, int64_t n) {
  double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    s0 += double(a[i]) * double(b[i]);
    s1 += double(a[i + 1]) * double(b[i + 1]);
    s2 += double(a[i + 2]) * double(b[i + 2]);
    s3 += double(a[i + 3]) * double(b[i + 3]);
  }
  for (; i < n; ++i) s0 += double(a[i]) * double(b[i]);
  return (s0 + s1) + (s2 + s3);
}

template <typename T>
void forwardTyped(const attn::Problem& p, const T* q, const T* k, const T* v, T* o, float* lse) {
  const int64_t D = p.D, H = p.H, HKV = p.HKV, T_ = p.T, group = p.group();
  std::vector<Task> tasks;
  for (int64_t n = 0; n < p.N; ++n) {
    int64_t s0 = p.cu[size_t(n)], s1 = p.cu[size_t(n + 1)];
    for (int64_t h = 0; h < H; ++h)
      for (int64_t r = s0; r < s1; r += kQueryBlock) tasks.push_back({n, h, r, std::min(s1, r + kQueryBlock)});
  }
  // Longest tasks first (a query block's cost grows with its position in the sequence).
  std::stable_sort(tasks.begin(), tasks.end(), [&](const Task& a, const Task& b) {
    return a.row1 - p.cu[size_t(a.seq)] > b.row1 - p.cu[size_t(b.seq)];
  });
  const double scale = p.scale;
  // Inputs are staged in fp32 (exact for bf16 / f16 / f32), in fp64 for f64 (gradient checks).
  using S = std::conditional_t<std::is_same_v<T, double>, double, float>;
  parallelFor(int64_t(tasks.size()), 1, [&](int64_t t0, int64_t t1) {
    std::vector<S> qf(size_t(kQueryBlock * D)), kf(size_t(kKeyBlock * D)), vf(size_t(kKeyBlock * D));
    std::vector<double> acc(size_t(kQueryBlock * D)), m(kQueryBlock), l(kQueryBlock), s(kKeyBlock);
    for (int64_t ti = t0; ti < t1; ++ti) {
      const Task& task = tasks[size_t(ti)];
      const int64_t start = p.cu[size_t(task.seq)], h = task.head, hk = h / group;
      const int64_t rows = task.row1 - task.row0;
      for (int64_t i = 0; i < rows; ++i) {
        const T* src = q + ((task.row0 + i) * H + h) * D;
        for (int64_t d = 0; d < D; ++d) qf[size_t(i * D + d)] = toFloat(src[d]);
        m[size_t(i)] = -std::numeric_limits<double>::infinity();
        l[size_t(i)] = 0;
      }
      std::fill(acc.begin(), acc.begin() + rows * D, 0.0);
      for (int64_t kb = start; kb < task.row1; kb += kKeyBlock) {
        const int64_t kn = std::min(task.row1, kb + kKeyBlock) - kb;
        for (int64_t j = 0; j < kn; ++j) {
          const T* ks = k + ((kb + j) * HKV + hk) * D;
          const T* vs = v + ((kb + j) * HKV + hk) * D;
          for (int64_t d = 0; d < D; ++d) {
            kf[size_t(j * D + d)] = toFloat(ks[d]);
            vf[size_t(j * D + d)] = toFloat(vs[d]);
          }
        }
        for (int64_t i = 0; i < rows; ++i) {
          const int64_t row = task.row0 + i;
          const int64_t jn = std::min(kn, row - kb + 1);  // causal: keys ≤ row
          if (jn <= 0) continue;
          const S* qi = qf.data() + i * D;
          double mx = m[size_t(i)];
          for (int64_t j = 0; j < jn; ++j) {
            s[size_t(j)] = scale * dot(qi, kf.data() + j * D, D);
            mx = std::max(mx, s[size_t(j)]);
          }
          double* ai = acc.data() + i * D;
          const double corr = std::exp(m[size_t(i)] - mx);  // exp(−inf) = 0 on the first block
          double li = l[size_t(i)] * corr;
          for (int64_t d = 0; d < D; ++d) ai[d] *= corr;
          for (int64_t j = 0; j < jn; ++j) {
            const double pj = std::exp(s[size_t(j)] - mx);
            li += pj;
            const S* vj = vf.data() + j * D;
            for (int64_t d = 0; d < D; ++d) ai[d] += pj * double(vj[d]);
          }
          m[size_t(i)] = mx;
          l[size_t(i)] = li;
        }
      }
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t row = task.row0 + i;
        const double inv = 1.0 / l[size_t(i)];
        T* dst = o + (row * H + h) * D;
        for (int64_t d = 0; d < D; ++d) dst[d] = fromFloat<T>(acc[size_t(i * D + d)] * inv);
        if (lse) {
          const int64_t b = row / T_, t = row % T_;
          lse[(b * H + h) * T_ + t] = float(m[size_t(i)] + std::log(l[size_t(i)]));
        }
      }
    }
  });
  // Tokens past the last sequence: o = 0, lse = −inf.
  const int64_t tail = p.cu[size_t(p.N)];
  for (int64_t row = tail; row < p.tokens(); ++row) {
    for (int64_t i = 0; i < H * D; ++i) o[row * H * D + i] = fromFloat<T>(0.0);
    if (lse) {
      const int64_t b = row / T_, t = row % T_;
      for (int64_t h = 0; h < H; ++h) lse[(b * H + h) * T_ + t] = -std::numeric_limits<float>::infinity();
    }
  }
}

}  // namespace

void attentionForward(const attn::Problem& p, const Tensor& q, const Tensor& k, const Tensor& v,
                      const attn::ForwardOut& out) {
  dispatchFloat(q.dtype(), "q", [&](auto tag) {
    using T = typename decltype(tag)::type;
    forwardTyped<T>(p, q.ptr<T>(), k.ptr<T>(), v.ptr<T>(), out.o.ptr<T>(),
                    out.lse.defined() ? out.lse.ptr<float>() : nullptr);
  });
}

}  // namespace tcal::cpu
