#include "adamw.h"

#include "../core/dispatch.h"
#include "../core/parallel.h"

namespace tcal::cpu {

namespace {

// Work blocks of every item laid end to end: block b belongs to the item whose range holds it.
struct BlockMap {
  std::vector<int64_t> start;  // first block of each item; start.back() = total
  explicit BlockMap(const std::vector<int64_t>& sizes) {
    start.push_back(0);
    for (int64_t n : sizes) start.push_back(start.back() + (n + kAdamwBlockElems - 1) / kAdamwBlockElems);
  }
  int64_t total() const { return start.back(); }
  size_t itemOf(int64_t block) const {
    return size_t(std::upper_bound(start.begin(), start.end(), block) - start.begin() - 1);
  }
};

template <typename G, typename C>
void stepRange(const AdamwItem& it, int64_t b, int64_t e) {
  float* p = it.param.ptr<float>();
  float* m = it.m.ptr<float>();
  float* v = it.v.ptr<float>();
  const G* g = it.grad.ptr<G>();
  C* c = it.compute.defined() ? it.compute.ptr<C>() : nullptr;
  for (int64_t i = b; i < e; ++i) {
    adamwElement(p[i], m[i], v[i], toFloat(g[i]), it.c);
    if (c) c[i] = fromFloat<C>(p[i]);
  }
}

void stepBlock(const AdamwItem& it, int64_t begin, int64_t end) {
  DType cdt = it.compute.defined() ? it.compute.dtype() : DType::F32;
  dispatchFloat(it.grad.dtype(), "grad", [&](auto gt) {
    using G = typename decltype(gt)::type;
    dispatchFloat(cdt, "compute", [&](auto ct) {
      using C = typename decltype(ct)::type;
      stepRange<G, C>(it, begin, end);
    });
  });
}

}  // namespace

void adamwStep(const std::vector<AdamwItem>& items) {
  std::vector<int64_t> sizes;
  for (const auto& it : items) sizes.push_back(it.param.numel());
  BlockMap map(sizes);
  parallelFor(map.total(), 16, [&](int64_t bs, int64_t be) {
    for (int64_t blk = bs; blk < be; ++blk) {
      size_t k = map.itemOf(blk);
      int64_t first = (blk - map.start[k]) * kAdamwBlockElems;
      stepBlock(items[k], first, std::min(sizes[k], first + kAdamwBlockElems));
    }
  });
}

void gradNormSquared(const std::vector<Tensor>& grads, const Tensor& out) {
  std::vector<int64_t> sizes;
  for (const auto& g : grads) sizes.push_back(g.numel());
  BlockMap map(sizes);
  // One partial per block, summed in block order: the result does not depend on the thread count.
  std::vector<double> partial(size_t(map.total()), 0.0);
  parallelFor(map.total(), 16, [&](int64_t bs, int64_t be) {
    for (int64_t blk = bs; blk < be; ++blk) {
      size_t k = map.itemOf(blk);
      int64_t first = (blk - map.start[k]) * kAdamwBlockElems;
      int64_t last = std::min(sizes[k], first + kAdamwBlockElems);
      dispatchFloat(grads[k].dtype(), "grads", [&](auto tag) {
        using T = typename decltype(tag)::type;
        const T* x = grads[k].ptr<T>();
        double s = 0;
        for (int64_t i = first; i < last; ++i) {
          double d = double(toFloat(x[i]));
          s += d * d;
        }
        partial[size_t(blk)] = s;
      });
    }
  });
  double total = 0;
  for (double s : partial) total += s;
  *out.ptr<double>() = total;
}

}  // namespace tcal::cpu
