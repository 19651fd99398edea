// Deterministic random numbers: a counter-based generator (SplitMix64 over a seed and a counter)
// whose whole state is two integers, so it is saved in checkpoints and gives the same stream on
// every machine and thread count.
#pragma once

#include <cmath>
#include <cstdint>

namespace moeforge {

inline uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

class Rng {
 public:
  explicit Rng(uint64_t seed = 0, uint64_t counter = 0) : seed_(seed), counter_(counter) {}

  uint64_t next_u64() { return splitmix64(seed_ ^ splitmix64(counter_++)); }
  // Uniform in [0, 1) with 53 bits.
  double uniform() { return static_cast<double>(next_u64() >> 11) * 0x1.0p-53; }
  // Uniform integer in [0, n).
  uint64_t below(uint64_t n) { return n == 0 ? 0 : next_u64() % n; }
  // Standard normal by Box-Muller (one value per call; two uniforms consumed).
  double normal() {
    double u1 = uniform();
    double u2 = uniform();
    if (u1 < 1e-300) u1 = 1e-300;
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
  }
  // Moves past n calls of normal() without computing them.
  void skip_normals(uint64_t n) { counter_ += 2 * n; }

  uint64_t seed() const { return seed_; }
  uint64_t counter() const { return counter_; }

 private:
  uint64_t seed_;
  uint64_t counter_;
};

}  // namespace moeforge
