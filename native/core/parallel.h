// A small fork-join helper for the CPU reference kernels: splits [0, n) into contiguous ranges over the
// machine's cores. Work below `grain` items runs inline so tiny ops pay no thread cost.
#pragma once
#include <algorithm>
#include <cstdint>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace tcal {

inline int cpuThreads() {
  static const int n = std::max(1u, std::thread::hardware_concurrency());
  return n;
}

template <typename Fn>
void parallelFor(int64_t n, int64_t grain, Fn fn) {
  if (n <= 0) return;
  int64_t chunks = std::min<int64_t>(cpuThreads(), (n + grain - 1) / std::max<int64_t>(grain, 1));
  if (chunks <= 1) {
    fn(int64_t(0), n);
    return;
  }
  std::vector<std::thread> threads;
  std::exception_ptr failure;
  std::mutex m;
  int64_t per = (n + chunks - 1) / chunks;
  for (int64_t c = 0; c < chunks; ++c) {
    int64_t b = c * per, e = std::min(n, b + per);
    if (b >= e) break;
    threads.emplace_back([&, b, e] {
      try {
        fn(b, e);
      } catch (...) {
        std::lock_guard<std::mutex> lock(m);
        if (!failure) failure = std::current_exception();
      }
    });
  }
  for (auto& t : threads) t.join();
  if (failure) std::rethrow_exception(failure);
}

}  // namespace tcal
