#include "reduce.h"

#include <mutex>
#include <vector>

#include "../core/dispatch.h"
#include "../core/parallel.h"

namespace tcal::cpu {

void reduceSum(const Tensor& x, int64_t outer, int64_t n, int64_t inner, bool mean, const Tensor& out) {
  dispatchFloat(x.dtype(), "x", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* px = x.ptr<T>();
    T* po = out.ptr<T>();
    double k = mean && n > 0 ? 1.0 / double(n) : 1.0;
    // Partial sums over slices of n for every output, so a full reduction (outer = inner = 1) also uses
    // every core; partials are added in slice order, so the result does not depend on thread timing.
    int64_t slices = std::min<int64_t>(cpuThreads(), std::max<int64_t>(1, n * inner / (1 << 16)));
    if (outer >= cpuThreads()) slices = 1;
    int64_t per = (n + slices - 1) / slices;
    std::vector<double> partial(size_t(slices * outer * inner), 0.0);
    parallelFor(outer * slices, 1, [&](int64_t s, int64_t e) {
      for (int64_t w = s; w < e; ++w) {
        int64_t o = w / slices, sl = w % slices;
        double* acc = partial.data() + (sl * outer + o) * inner;
        const T* base = px + o * n * inner;
        for (int64_t j = sl * per; j < std::min(n, (sl + 1) * per); ++j)
          for (int64_t i = 0; i < inner; ++i) acc[i] += double(toFloat(base[j * inner + i]));
      }
    });
    for (int64_t o = 0; o < outer; ++o)
      for (int64_t i = 0; i < inner; ++i) {
        double s = 0;
        for (int64_t sl = 0; sl < slices; ++sl) s += partial[(sl * outer + o) * inner + i];
        po[o * inner + i] = fromFloat<T>(s * k);
      }
  });
}

}  // namespace tcal::cpu
