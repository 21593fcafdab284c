// The CPU Taylor attention-moment reduction: the materialising oracle and the streaming (online-softmax)
// path that a CUDA kernel follows. See moments.h for the statistics and the streaming formulation.
#include "moments.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../core/dispatch.h"
#include "../core/parallel.h"

namespace tcal::cpu {

using namespace moments;

namespace {

constexpr int64_t kQueryBlock = 32;  // query rows sharing a reference position ρ (aligned to the sequence start)
constexpr int64_t kKeyBlock = 64;    // keys streamed at a time
constexpr double kNegInf = -std::numeric_limits<double>::infinity();

// Per (token, head) row results, in this order, then φ (Re, Im per pair).
constexpr int kRowScalars = kAttentionColumns;
inline int64_t rowWidth(int64_t D) { return kRowScalars + kBins + D; }

struct Seq {
  int64_t start, end;
};

// A tensor's elements as doubles (any floating dtype).
std::vector<double> toDoubles(const Tensor& t, const char* arg) {
  std::vector<double> out(size_t(t.numel()));
  dispatchFloat(t.dtype(), arg, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* src = t.ptr<T>();
    parallelFor(t.numel(), 1 << 16, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) out[size_t(i)] = double(toFloat(src[i]));
    });
  });
  return out;
}

inline double dot(const double* a, const double* b, int64_t n) {
  double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    s0 += a[i] * b[i];
    s1 += a[i + 1] * b[i + 1];
    s2 += a[i + 2] * b[i + 2];
    s3 += a[i + 3] * b[i + 3];
  }
  for (; i < n; ++i) s0 += a[i] * b[i];
  return (s0 + s1) + (s2 + s3);
}

struct Task {
  int64_t start, end;  // the sequence
  int64_t head, row0, row1;
};

// Tasks over (included sequence, head, query block), longest first (cost grows with the position).
std::vector<Task> makeTasks(const Problem& p, const std::vector<Seq>& seqs) {
  std::vector<Task> tasks;
  for (const Seq& s : seqs)
    for (int64_t h = 0; h < p.H; ++h)
      for (int64_t r = s.start; r < s.end; r += kQueryBlock) tasks.push_back({s.start, s.end, h, r, std::min(s.end, r + kQueryBlock)});
  std::stable_sort(tasks.begin(), tasks.end(),
                   [](const Task& a, const Task& b) { return a.row1 - a.start > b.row1 - b.start; });
  return tasks;
}

struct Data {
  const Problem& p;
  std::vector<Seq> seqs;
  std::vector<double> q, k, v;  // [tokens, H|HKV, D]
  std::vector<double> o;        // [tokens, H, D]
  std::vector<double> rows;     // [tokens, H, rowWidth]
};

// ---- The materialising oracle: each row of A formed explicitly. ----
void attentionMaterialize(Data& d) {
  const Problem& p = d.p;
  const int64_t D = p.D, H = p.H, HKV = p.HKV, G = p.group(), half = D / 2, R = rowWidth(D);
  std::vector<Task> tasks = makeTasks(p, d.seqs);
  parallelFor(int64_t(tasks.size()), 1, [&](int64_t t0, int64_t t1) {
    std::vector<double> a, A;
    for (int64_t ti = t0; ti < t1; ++ti) {
      const Task& task = tasks[size_t(ti)];
      const int64_t h = task.head, hk = h / G;
      for (int64_t row = task.row0; row < task.row1; ++row) {
        const int64_t n = row - task.start + 1;  // keys start .. row
        const double* qt = d.q.data() + (row * H + h) * D;
        a.assign(size_t(n), 0.0);
        A.assign(size_t(n), 0.0);
        double m = kNegInf;
        for (int64_t j = 0; j < n; ++j) {
          a[size_t(j)] = p.scale * dot(qt, d.k.data() + ((task.start + j) * HKV + hk) * D, D);
          m = std::max(m, a[size_t(j)]);
        }
        double l = 0;
        for (int64_t j = 0; j < n; ++j) l += (A[size_t(j)] = std::exp(a[size_t(j)] - m));
        for (int64_t j = 0; j < n; ++j) A[size_t(j)] /= l;
        double* r = d.rows.data() + (row * H + h) * R;
        double* hist = r + kRowScalars;
        double* phi = hist + kBins;
        std::fill(r, r + R, 0.0);
        double* o = d.o.data() + (row * H + h) * D;
        std::fill(o, o + D, 0.0);
        const int64_t tau = n - 1;
        for (int64_t j = 0; j < n; ++j) {
          const double w = A[size_t(j)];
          const int64_t delta = tau - j;
          r[kDist] += w * double(delta);
          r[kDistSq] += w * double(delta) * double(delta);
          if (w > 0) r[kEntropy] -= w * std::log(w);
          if (j == 0) r[kSink] += w;
          if (delta < kLocalWindow) r[kLocal] += w;
          hist[distanceBin(delta)] += w;
          for (int64_t i = 0; i < half; ++i) {
            const double ang = p.invFreq[size_t(i)] * double(delta);
            phi[2 * i] += w * std::cos(ang);
            phi[2 * i + 1] += w * std::sin(ang);
          }
          const double* vs = d.v.data() + ((task.start + j) * HKV + hk) * D;
          for (int64_t c = 0; c < D; ++c) o[c] += w * vs[c];
        }
      }
    }
  });
}

// ---- The streaming path: online softmax over key blocks with extra value channels (moments.h). ----
void attentionStream(Data& d) {
  const Problem& p = d.p;
  const int64_t D = p.D, H = p.H, HKV = p.HKV, G = p.group(), half = D / 2, R = rowWidth(D);
  const double* theta = p.invFreq.data();
  std::vector<Task> tasks = makeTasks(p, d.seqs);
  parallelFor(int64_t(tasks.size()), 1, [&](int64_t t0, int64_t t1) {
    const int64_t QB = kQueryBlock, KB = kKeyBlock;
    // Per-row state.
    std::vector<double> m(QB), l(QB), E(QB), S1(QB), S2(QB), Z(QB), L(QB), Gh(QB * kBins);
    std::vector<double> O(QB * D), C(QB * half), Sn(QB * half);
    // Per key block: scores and the key-only channels.
    std::vector<double> s(KB), rel(KB), cosT(KB * half), sinT(KB * half);
    std::vector<int64_t> sig(KB);
    for (int64_t ti = t0; ti < t1; ++ti) {
      const Task& task = tasks[size_t(ti)];
      const int64_t h = task.head, hk = h / G, rows = task.row1 - task.row0;
      const int64_t rho = task.row0 - task.start;
      std::fill(m.begin(), m.end(), kNegInf);
      for (auto* v : {&l, &E, &S1, &S2, &Z, &L, &Gh, &O, &C, &Sn}) std::fill(v->begin(), v->end(), 0.0);
      for (int64_t kb = task.start; kb < task.row1; kb += KB) {
        const int64_t kn = std::min(task.row1, kb + KB) - kb;
        for (int64_t j = 0; j < kn; ++j) {
          sig[size_t(j)] = kb + j - task.start;
          rel[size_t(j)] = double(sig[size_t(j)] - rho);
          for (int64_t i = 0; i < half; ++i) {
            const double ang = theta[i] * double(sig[size_t(j)]);
            cosT[size_t(j * half + i)] = std::cos(ang);
            sinT[size_t(j * half + i)] = std::sin(ang);
          }
        }
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t row = task.row0 + r, tau = row - task.start;
          const int64_t jn = std::min(kn, row - kb + 1);  // causal: keys ≤ row
          if (jn <= 0) continue;
          const double* qt = d.q.data() + (row * H + h) * D;
          double mx = m[size_t(r)];
          for (int64_t j = 0; j < jn; ++j) {
            s[size_t(j)] = p.scale * dot(qt, d.k.data() + ((kb + j) * HKV + hk) * D, D);
            mx = std::max(mx, s[size_t(j)]);
          }
          // Rescale the row's state to the new max.
          const double kappa = std::exp(m[size_t(r)] - mx);  // 0 on the first block (m = −inf)
          double lr = l[size_t(r)], Er = E[size_t(r)];
          if (lr > 0) Er = kappa * (Er + (m[size_t(r)] - mx) * lr);
          lr *= kappa;
          double s1 = S1[size_t(r)] * kappa, s2 = S2[size_t(r)] * kappa;
          double z = Z[size_t(r)] * kappa, loc = L[size_t(r)] * kappa;
          double* gr = Gh.data() + r * kBins;
          double* orow = O.data() + r * D;
          double* cr = C.data() + r * half;
          double* sr = Sn.data() + r * half;
          for (int b = 0; b < kBins; ++b) gr[b] *= kappa;
          for (int64_t c = 0; c < D; ++c) orow[c] *= kappa;
          for (int64_t i = 0; i < half; ++i) {
            cr[i] *= kappa;
            sr[i] *= kappa;
          }
          for (int64_t j = 0; j < jn; ++j) {
            const double sc = s[size_t(j)] - mx;
            const double pj = std::exp(sc);
            lr += pj;
            Er += pj * sc;
            const double* vs = d.v.data() + ((kb + j) * HKV + hk) * D;
            for (int64_t c = 0; c < D; ++c) orow[c] += pj * vs[c];
            const double rj = rel[size_t(j)];
            s1 += pj * rj;
            s2 += pj * rj * rj;
            const double* cj = cosT.data() + j * half;
            const double* sj = sinT.data() + j * half;
            for (int64_t i = 0; i < half; ++i) {
              cr[i] += pj * cj[i];
              sr[i] += pj * sj[i];
            }
            const int64_t delta = tau - sig[size_t(j)];
            if (sig[size_t(j)] == 0) z += pj;
            if (delta < kLocalWindow) loc += pj;
            gr[distanceBin(delta)] += pj;
          }
          m[size_t(r)] = mx;
          l[size_t(r)] = lr;
          E[size_t(r)] = Er;
          S1[size_t(r)] = s1;
          S2[size_t(r)] = s2;
          Z[size_t(r)] = z;
          L[size_t(r)] = loc;
        }
      }
      // Finalise the rows.
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t row = task.row0 + r, tau = row - task.start;
        const double inv = 1.0 / l[size_t(r)], delta = double(tau - rho);
        double* out = d.rows.data() + (row * H + h) * R;
        double* hist = out + kRowScalars;
        double* phi = hist + kBins;
        const double m1 = S1[size_t(r)] * inv;
        out[kDist] = delta - m1;
        out[kDistSq] = delta * delta - 2 * delta * m1 + S2[size_t(r)] * inv;
        out[kEntropy] = std::log(l[size_t(r)]) - E[size_t(r)] * inv;
        out[kSink] = Z[size_t(r)] * inv;
        out[kLocal] = L[size_t(r)] * inv;
        for (int b = 0; b < kBins; ++b) hist[b] = Gh[size_t(r * kBins + b)] * inv;
        for (int64_t i = 0; i < half; ++i) {
          const double ang = theta[i] * double(tau);
          const double ct = std::cos(ang), st = std::sin(ang);
          const double c = C[size_t(r * half + i)], sn = Sn[size_t(r * half + i)];
          phi[2 * i] = (ct * c + st * sn) * inv;
          phi[2 * i + 1] = (st * c - ct * sn) * inv;
        }
        double* o = d.o.data() + (row * H + h) * D;
        for (int64_t c = 0; c < D; ++c) o[c] = O[size_t(r * D + c)] * inv;
      }
    }
  });
}

// Adds the per-row results into the per-head sums, in token order.
void reduceRows(const Data& d, const Accumulators& acc) {
  const Problem& p = d.p;
  const int64_t H = p.H, D = p.D, R = rowWidth(D);
  double* att = acc.attention.ptr<double>();
  double* hist = acc.histogram.ptr<double>();
  double* phi = acc.phi.ptr<double>();
  parallelFor(H, 1, [&](int64_t h0, int64_t h1) {
    for (int64_t h = h0; h < h1; ++h)
      for (const Seq& s : d.seqs)
        for (int64_t t = s.start; t < s.end; ++t) {
          const double* r = d.rows.data() + (t * H + h) * R;
          for (int c = 0; c < kRowScalars; ++c) att[h * kAttentionColumns + c] += r[c];
          for (int b = 0; b < kBins; ++b) hist[h * kBins + b] += r[kRowScalars + b];
          for (int64_t i = 0; i < D; ++i) phi[h * D + i] += r[kRowScalars + kBins + i];
        }
  });
}

// Context moments and the γ₀ scan, per query head, in token order. Materialize sums y_t = Σ_s γ^{t−s} v_s
// explicitly; Stream runs the recurrence y_t = γ y_{t−1} + v_t.
void contextAndScan(const Data& d, const Accumulators& acc, Algorithm algorithm) {
  // o: the caller's context when given (Data::o holds it then), else the pass's own.
  const Problem& p = d.p;
  const int64_t H = p.H, HKV = p.HKV, D = p.D, G = p.group(), K0 = p.K0();
  double* oSum = acc.contextSum.ptr<double>();
  double* oSq = acc.contextSq.ptr<double>();
  double* cross = acc.scanCross.ptr<double>();
  double* sq = acc.scanSq.ptr<double>();
  parallelFor(H, 1, [&](int64_t h0, int64_t h1) {
    std::vector<double> y(size_t(K0 * D));
    for (int64_t h = h0; h < h1; ++h) {
      const int64_t hk = h / G;
      for (const Seq& s : d.seqs) {
        std::fill(y.begin(), y.end(), 0.0);
        for (int64_t t = s.start; t < s.end; ++t) {
          const double* o = d.o.data() + (t * H + h) * D;
          for (int64_t c = 0; c < D; ++c) {
            oSum[h * D + c] += o[c];
            oSq[h * D + c] += o[c] * o[c];
          }
          const double* vt = d.v.data() + (t * HKV + hk) * D;
          for (int64_t k = 0; k < K0; ++k) {
            const double g = p.decays[size_t(k)];
            double* yk = y.data() + k * D;
            if (algorithm == Algorithm::Stream) {
              for (int64_t c = 0; c < D; ++c) yk[c] = g * yk[c] + vt[c];
            } else {
              std::fill(yk, yk + D, 0.0);
              for (int64_t u = s.start; u <= t; ++u) {
                const double w = std::pow(g, double(t - u));
                const double* vu = d.v.data() + (u * HKV + hk) * D;
                for (int64_t c = 0; c < D; ++c) yk[c] += w * vu[c];
              }
            }
            double ms = 0;
            for (int64_t c = 0; c < D; ++c) ms += yk[c] * yk[c];
            const double rs = 1.0 / std::sqrt(ms / double(D) + kScanEps);
            double* xr = cross + (h * K0 + k) * D;
            double* sr = sq + (h * K0 + k) * D;
            for (int64_t c = 0; c < D; ++c) {
              const double yh = yk[c] * rs;
              xr[c] += yh * o[c];
              sr[c] += yh * yh;
            }
          }
        }
      }
    }
  });
}

// Σ z, Σ z zᵀ over the given rows of a [rows, n] matrix, into sum [n] and outer [n, n]: the upper triangle
// is summed in row order and mirrored. Work is split over pairs of output rows (i, n−1−i) for balance.
void outerMoments(const std::vector<const double*>& zs, int64_t n, double* sum, double* outer) {
  for (const double* z : zs)
    for (int64_t i = 0; i < n; ++i) sum[i] += z[i];
  const int64_t pairs = (n + 1) / 2;
  parallelFor(pairs, std::max<int64_t>(1, 4096 / std::max<int64_t>(n, 1)), [&](int64_t b, int64_t e) {
    for (int64_t pi = b; pi < e; ++pi) {
      const int64_t rowsOf[2] = {pi, n - 1 - pi};
      for (int w = 0; w < (rowsOf[0] == rowsOf[1] ? 1 : 2); ++w) {
        const int64_t i = rowsOf[w];
        double* out = outer + i * n;
        for (const double* z : zs) {
          const double zi = z[i];
          for (int64_t j = i; j < n; ++j) out[j] += zi * z[j];
        }
        for (int64_t j = i + 1; j < n; ++j) outer[j * n + i] = out[j];
      }
    }
  });
}

void keyValueMoments(const Data& d, const Accumulators& acc) {
  const Problem& p = d.p;
  const int64_t HKV = p.HKV, D = p.D, half = D / 2;
  // Pre-RoPE keys: undo the rotation at each token's position (rotate-half pairing).
  std::vector<double> kpre(d.k.size());
  std::vector<const double*> kRows, vRows;
  for (const Seq& s : d.seqs)
    for (int64_t t = s.start; t < s.end; ++t) {
      const double pos = double(t - s.start);
      for (int64_t hk = 0; hk < HKV; ++hk) {
        const double* src = d.k.data() + (t * HKV + hk) * D;
        double* dst = kpre.data() + (t * HKV + hk) * D;
        for (int64_t i = 0; i < half; ++i) {
          const double ang = p.invFreq[size_t(i)] * pos, c = std::cos(ang), sn = std::sin(ang);
          dst[i] = src[i] * c + src[i + half] * sn;
          dst[i + half] = src[i + half] * c - src[i] * sn;
        }
      }
    }
  for (int64_t hk = 0; hk < HKV; ++hk) {
    kRows.clear();
    vRows.clear();
    for (const Seq& s : d.seqs)
      for (int64_t t = s.start; t < s.end; ++t) {
        kRows.push_back(kpre.data() + (t * HKV + hk) * D);
        vRows.push_back(d.v.data() + (t * HKV + hk) * D);
      }
    outerMoments(kRows, D, acc.keySum.ptr<double>() + hk * D, acc.keyOuter.ptr<double>() + hk * D * D);
    outerMoments(vRows, D, acc.valueSum.ptr<double>() + hk * D, acc.valueOuter.ptr<double>() + hk * D * D);
  }
}

void inputMoments(const Data& d, const Tensor& x, const Accumulators& acc) {
  const int64_t Dx = d.p.Dx;
  std::vector<double> xs = toDoubles(x, "x");
  std::vector<const double*> rows;
  for (const Seq& s : d.seqs)
    for (int64_t t = s.start; t < s.end; ++t) rows.push_back(xs.data() + t * Dx);
  outerMoments(rows, Dx, acc.inputSum.ptr<double>(), acc.inputOuter.ptr<double>());
}

}  // namespace

void taylorMoments(const Problem& p, const Inputs& in, const Accumulators& acc, Algorithm algorithm) {
  Data d{p, {}, {}, {}, {}, {}, {}};
  int64_t counted = 0;
  for (int64_t n = 0; n < p.N; ++n) {
    const int64_t s0 = p.cu[size_t(n)], s1 = p.cu[size_t(n + 1)];
    if (s1 > s0 && p.included(n)) {
      d.seqs.push_back({s0, s1});
      counted += s1 - s0;
    }
  }
  d.q = toDoubles(in.q, "q");
  d.k = toDoubles(in.k, "k");
  d.v = toDoubles(in.v, "v");
  d.o.assign(size_t(p.tokens() * p.H * p.D), 0.0);
  d.rows.assign(size_t(p.tokens() * p.H * rowWidth(p.D)), 0.0);
  if (algorithm == Algorithm::Materialize)
    attentionMaterialize(d);
  else
    attentionStream(d);
  if (in.context.defined()) d.o = toDoubles(in.context, "context");
  acc.count.ptr<double>()[0] += double(counted);
  reduceRows(d, acc);
  contextAndScan(d, acc, algorithm);
  keyValueMoments(d, acc);
  if (in.x.defined()) inputMoments(d, in.x, acc);
}

}  // namespace tcal::cpu
