// Counter-based random numbers: element i of a fill draws from hash(seed, i), so the CPU and CUDA produce the
// same stream for the same seed whatever the thread layout.
#pragma once
#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define TCAL_HD __host__ __device__ __forceinline__
#else
#define TCAL_HD inline
#endif

namespace tcal {

TCAL_HD uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// Uniform in (0, 1): 53 random bits, never exactly 0 (safe for log).
TCAL_HD double uniform01(uint64_t seed, uint64_t i, uint64_t stream) {
  uint64_t h = splitmix64(seed ^ splitmix64(i * 2 + stream));
  return (double(h >> 11) + 0.5) * (1.0 / 9007199254740992.0);
}

enum class RandomKind : int { Uniform = 0, Normal = 1 };

// Element i: Uniform(a, b) or Normal(mean a, std b) by Box–Muller on two streams.
TCAL_HD double randomValue(RandomKind kind, uint64_t seed, uint64_t i, double a, double b) {
  double u1 = uniform01(seed, i, 0);
  if (kind == RandomKind::Uniform) return a + (b - a) * u1;
  double u2 = uniform01(seed, i, 1);
  return a + b * sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

}  // namespace tcal
