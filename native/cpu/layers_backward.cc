#include "layers_backward.h"

#include <cmath>
#include <vector>

#include "../core/dispatch.h"
#include "../core/parallel.h"
#include "param_grad.h"

namespace tcal::cpu {

namespace {

void checkTargets(const int32_t* pt, int64_t rows, int64_t V) {
  for (int64_t r = 0; r < rows; ++r)
    if (pt[r] >= V)
      throwInvalid("targets", "target " + std::to_string(pt[r]) + " at row " + std::to_string(r) +
                                  " is outside the vocabulary of " + std::to_string(V));
}

// Shared row kernel of the two cross-entropy backward ops: scale(r) gives the row's factor; loss may be null.
template <typename ScaleFn>
void crossEntropyRows(const Tensor& logits, const Tensor& targets, ScaleFn scaleOf, float* loss, const Tensor& dLogits) {
  int64_t V = logits.dim(-1), rows = logits.numel() / std::max<int64_t>(V, 1);
  const int32_t* pt = targets.ptr<int32_t>();
  checkTargets(pt, rows, V);
  dispatchFloat(logits.dtype(), "logits", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using C = typename AccOf<T>::type;
    const T* px = logits.ptr<T>();
    T* pd = dLogits.ptr<T>();
    parallelFor(rows, std::max<int64_t>(1, 8192 / std::max<int64_t>(V, 1)), [&](int64_t s, int64_t e) {
      for (int64_t r = s; r < e; ++r) {
        const T* row = px + r * V;
        T* drow = pd + r * V;
        int32_t t = pt[r];
        if (t < 0) {
          if (loss) loss[r] = 0;
          for (int64_t i = 0; i < V; ++i) drow[i] = fromFloat<T>(0.0);
          continue;
        }
        double m = -INFINITY;
        for (int64_t i = 0; i < V; ++i) m = std::max(m, double(toFloat(row[i])));
        double z = 0;
        for (int64_t i = 0; i < V; ++i) z += std::exp(double(toFloat(row[i])) - m);
        double lse = m + std::log(z);
        double xt = double(toFloat(row[t]));  // read before the row may be overwritten (in place)
        if (loss) loss[r] = float(lse - xt);
        C sc = C(scaleOf(r));
        for (int64_t i = 0; i < V; ++i) {
          C p = C(std::exp(double(toFloat(row[i])) - lse));
          drow[i] = fromFloat<T>(double(sc * (p - (i == t ? C(1) : C(0)))));
        }
      }
    });
  });
}

}  // namespace

void rmsNormBackward(const Tensor& x, const Tensor& w, const Tensor& dy, double eps, const Tensor& dx, const Tensor& dw) {
  int64_t d = w.numel(), rows = x.numel() / std::max<int64_t>(d, 1);
  dispatchFloat(x.dtype(), "x", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using C = typename AccOf<T>::type;
    const T* px = x.ptr<T>();
    const T* pw = w.ptr<T>();
    const T* pdy = dy.ptr<T>();
    T* pdx = dx.ptr<T>();
    // Row statistics first: inv and Σ dy·w·x (fp64), then dw (column-parallel, rows in order), then dx, so dx
    // may overwrite x or dy.
    std::vector<double> inv(static_cast<size_t>(rows)), dot(static_cast<size_t>(rows));
    int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(d, 1));
    parallelFor(rows, grain, [&](int64_t s, int64_t e) {
      for (int64_t r = s; r < e; ++r) {
        double ss = 0, c = 0;
        for (int64_t i = 0; i < d; ++i) {
          double v = toFloat(px[r * d + i]);
          ss += v * v;
          c += double(toFloat(pdy[r * d + i])) * double(toFloat(pw[i])) * v;
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
          for (int64_t r = 0; r < rows; ++r)
            acc += double(toFloat(pdy[r * d + i])) * double(toFloat(px[r * d + i])) * inv[size_t(r)];
          pdw[i] = G(acc);
        }
      });
    });
    parallelFor(rows, grain, [&](int64_t s, int64_t e) {
      for (int64_t r = s; r < e; ++r) {
        C iv = C(inv[size_t(r)]);
        C k = C(inv[size_t(r)] * inv[size_t(r)] * inv[size_t(r)] * dot[size_t(r)] / double(d));
        for (int64_t i = 0; i < d; ++i) {
          C xv = C(toFloat(px[r * d + i])), g = C(toFloat(pdy[r * d + i])), wv = C(toFloat(pw[i]));
          pdx[r * d + i] = fromFloat<T>(double(iv * g * wv - k * xv));
        }
      }
    });
  });
}

void ropeBackward(const Tensor& dy, const Tensor& positions, const Tensor& invFreq, const Tensor& dx) {
  int64_t B = dy.dim(0), T = dy.dim(1), H = dy.dim(2), D = dy.dim(3), half = D / 2;
  const int32_t* pos = positions.ptr<int32_t>();
  const float* inv = invFreq.ptr<float>();
  dispatchFloat(dy.dtype(), "dy", [&](auto tag) {
    using E = typename decltype(tag)::type;
    using C = typename AccOf<E>::type;
    const E* pg = dy.ptr<E>();
    E* pd = dx.ptr<E>();
    parallelFor(B * T, std::max<int64_t>(1, 2048 / std::max<int64_t>(H * D, 1)), [&](int64_t s, int64_t e) {
      for (int64_t bt = s; bt < e; ++bt) {
        float p = float(pos[bt]);
        for (int64_t j = 0; j < half; ++j) {
          float angle = p * inv[j];  // the forward's fp32 angle
          C c = C(std::cos(C(angle))), sn = C(std::sin(C(angle)));
          for (int64_t h = 0; h < H; ++h) {
            int64_t base = (bt * H + h) * D;
            C g1 = C(toFloat(pg[base + j])), g2 = C(toFloat(pg[base + j + half]));
            pd[base + j] = fromFloat<E>(double(g1 * c + g2 * sn));
            pd[base + j + half] = fromFloat<E>(double(g2 * c - g1 * sn));
          }
        }
      }
    });
  });
}

void swigluBackward(const Tensor& gate, const Tensor& up, const Tensor& dOut, const Tensor& dGate, const Tensor& dUp) {
  dispatchFloat(gate.dtype(), "gate", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using C = typename AccOf<T>::type;
    const T* pg = gate.ptr<T>();
    const T* pu = up.ptr<T>();
    const T* po = dOut.ptr<T>();
    T* pdg = dGate.ptr<T>();
    T* pdu = dUp.ptr<T>();
    parallelFor(gate.numel(), 1 << 15, [&](int64_t s, int64_t e) {
      for (int64_t i = s; i < e; ++i) {
        C g = C(toFloat(pg[i])), u = C(toFloat(pu[i])), d = C(toFloat(po[i]));
        C sig = C(1) / (C(1) + std::exp(-g));
        pdg[i] = fromFloat<T>(double(d * u * sig * (C(1) + g * (C(1) - sig))));
        pdu[i] = fromFloat<T>(double(d * g * sig));
      }
    });
  });
}

void embeddingBackward(const Tensor& ids, const Tensor& dOut, const Tensor& dTable) {
  int64_t V = dTable.dim(0), D = dTable.dim(1), n = ids.numel();
  const int32_t* pi = ids.ptr<int32_t>();
  for (int64_t i = 0; i < n; ++i)
    if (pi[i] < 0 || pi[i] >= V)
      throwInvalid("ids", "token id " + std::to_string(pi[i]) + " at position " + std::to_string(i) +
                              " is outside the vocabulary of " + std::to_string(V));
  // Counting sort of the positions by id (stable): each vocabulary row then sums its positions in order.
  std::vector<int64_t> start(static_cast<size_t>(V) + 1, 0), order(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) ++start[size_t(pi[i]) + 1];
  for (int64_t v = 0; v < V; ++v) start[size_t(v) + 1] += start[size_t(v)];
  {
    std::vector<int64_t> cursor(start.begin(), start.end() - 1);
    for (int64_t i = 0; i < n; ++i) order[size_t(cursor[size_t(pi[i])]++)] = i;
  }
  dispatchFloat(dOut.dtype(), "dOut", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* pg = dOut.ptr<T>();
    withParamGrad(dTable, [&](auto* pt) {
      using G = std::remove_pointer_t<decltype(pt)>;
      parallelFor(V, std::max<int64_t>(1, 8192 / std::max<int64_t>(D, 1)), [&](int64_t s, int64_t e) {
        std::vector<double> acc(static_cast<size_t>(D));
        for (int64_t v = s; v < e; ++v) {
          std::fill(acc.begin(), acc.end(), 0.0);
          for (int64_t k = start[size_t(v)]; k < start[size_t(v) + 1]; ++k) {
            const T* row = pg + order[size_t(k)] * D;
            for (int64_t j = 0; j < D; ++j) acc[size_t(j)] += double(toFloat(row[j]));
          }
          for (int64_t j = 0; j < D; ++j) pt[v * D + j] = G(acc[size_t(j)]);
        }
      });
    });
  });
}

void crossEntropyBackward(const Tensor& logits, const Tensor& targets, const Tensor& dLoss, const Tensor& dLogits) {
  const float* pl = dLoss.ptr<float>();
  crossEntropyRows(logits, targets, [pl](int64_t r) { return double(pl[r]); }, nullptr, dLogits);
}

void crossEntropyForwardBackward(const Tensor& logits, const Tensor& targets, double scale, const Tensor& loss,
                                 const Tensor& dLogits) {
  crossEntropyRows(logits, targets, [scale](int64_t) { return scale; }, loss.ptr<float>(), dLogits);
}

void klForwardBackward(const Tensor& student, const Tensor& teacher, const Tensor& rowMask, double scale,
                       const Tensor& loss, const Tensor& dStudent) {
  int64_t V = student.dim(-1), rows = student.numel() / std::max<int64_t>(V, 1);
  const int32_t* pm = rowMask.ptr<int32_t>();
  float* pl = loss.ptr<float>();
  dispatchFloat(student.dtype(), "studentLogits", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using C = typename AccOf<T>::type;
    const T* ps = student.ptr<T>();
    const T* pt = teacher.ptr<T>();
    T* pd = dStudent.ptr<T>();
    parallelFor(rows, std::max<int64_t>(1, 8192 / std::max<int64_t>(V, 1)), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const T* srow = ps + r * V;
        const T* trow = pt + r * V;
        T* drow = pd + r * V;
        if (pm[r] < 0) {
          pl[r] = 0;
          for (int64_t i = 0; i < V; ++i) drow[i] = fromFloat<T>(0.0);
          continue;
        }
        double ms = -INFINITY, mt = -INFINITY;
        for (int64_t i = 0; i < V; ++i) {
          ms = std::max(ms, double(toFloat(srow[i])));
          mt = std::max(mt, double(toFloat(trow[i])));
        }
        double zs = 0, zt = 0;
        for (int64_t i = 0; i < V; ++i) {
          zs += std::exp(double(toFloat(srow[i])) - ms);
          zt += std::exp(double(toFloat(trow[i])) - mt);
        }
        const double lses = ms + std::log(zs), lset = mt + std::log(zt);
        // KL(p‖q) = Σ p (t − s) − lse_t + lse_s; d/ds = q − p. Each element is read before it is overwritten.
        double cross = 0;
        const C sc = C(scale);
        for (int64_t i = 0; i < V; ++i) {
          const double si = double(toFloat(srow[i])), ti = double(toFloat(trow[i]));
          const double p = std::exp(ti - lset), q = std::exp(si - lses);
          cross += p * (ti - si);
          drow[i] = fromFloat<T>(double(sc * C(q - p)));
        }
        pl[r] = float(cross - lset + lses);
      }
    });
  });
}

}  // namespace tcal::cpu
