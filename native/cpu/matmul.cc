#include "matmul.h"

#include <vector>

#include "../core/dispatch.h"
#include "../core/parallel.h"

namespace tcal::cpu {

namespace {

// Rows [r0, r1) of op(A) unpacked to Acc, row-major [rows, k].
template <typename T, typename Acc>
void packA(const T* a, const GemmShape& s, int64_t r0, int64_t r1, Acc* dst) {
  for (int64_t i = r0; i < r1; ++i)
    for (int64_t p = 0; p < s.k; ++p)
      dst[(i - r0) * s.k + p] = Acc(toFloat(s.transA ? a[p * s.m + i] : a[i * s.k + p]));
}

// op(B) unpacked to Acc, row-major [k, n].
template <typename T, typename Acc>
void packB(const T* b, const GemmShape& s, Acc* dst) {
  for (int64_t p = 0; p < s.k; ++p)
    for (int64_t j = 0; j < s.n; ++j) dst[p * s.n + j] = Acc(toFloat(s.transB ? b[j * s.k + p] : b[p * s.n + j]));
}

}  // namespace

void matmul(const Tensor& a, const Tensor& b, const Tensor& c, const GemmShape& s, double alpha, double beta) {
  dispatchFloat(a.dtype(), "a", [&](auto atag) {
    using T = typename decltype(atag)::type;
    using Acc = typename AccOf<T>::type;
    dispatchFloat(c.dtype(), "c", [&](auto ctag) {
      using C = typename decltype(ctag)::type;
      const T* pa = a.ptr<T>();
      const T* pb = b.ptr<T>();
      C* pc = c.ptr<C>();
      constexpr int64_t kRowBlock = 16;
      constexpr int64_t kColBlock = 512;
      std::vector<Acc> bPacked(size_t(s.k * s.n));
      for (int64_t bi = 0; bi < s.batch; ++bi) {
        if (bi == 0 || s.strideB != 0) packB<T, Acc>(pb + bi * s.strideB, s, bPacked.data());
        const T* ab = pa + bi * s.strideA;
        C* cb = pc + bi * s.strideC;
        int64_t rowBlocks = (s.m + kRowBlock - 1) / kRowBlock;
        // Each task owns a block of rows of C: i-k-j order with a column block of C kept in cache.
        parallelFor(rowBlocks, 1, [&](int64_t rb0, int64_t rb1) {
          std::vector<Acc> aRows(size_t(kRowBlock * s.k));
          std::vector<Acc> acc(size_t(kRowBlock * kColBlock));
          for (int64_t rb = rb0; rb < rb1; ++rb) {
            int64_t r0 = rb * kRowBlock, r1 = std::min(s.m, r0 + kRowBlock);
            packA<T, Acc>(ab, s, r0, r1, aRows.data());
            for (int64_t j0 = 0; j0 < s.n; j0 += kColBlock) {
              int64_t j1 = std::min(s.n, j0 + kColBlock), w = j1 - j0;
              std::fill(acc.begin(), acc.end(), Acc(0));
              for (int64_t i = r0; i < r1; ++i) {
                Acc* ci = acc.data() + (i - r0) * kColBlock;
                const Acc* ai = aRows.data() + (i - r0) * s.k;
                for (int64_t p = 0; p < s.k; ++p) {
                  Acc av = ai[p];
                  const Acc* bp = bPacked.data() + p * s.n + j0;
                  for (int64_t j = 0; j < w; ++j) ci[j] += av * bp[j];
                }
              }
              for (int64_t i = r0; i < r1; ++i)
                for (int64_t j = j0; j < j1; ++j) {
                  double v = double(alpha) * double(acc[(i - r0) * kColBlock + (j - j0)]);
                  if (beta != 0) v += beta * double(toFloat(cb[i * s.n + j]));
                  cb[i * s.n + j] = fromFloat<C>(v);
                }
            }
          }
        });
      }
    });
  });
}

}  // namespace tcal::cpu
