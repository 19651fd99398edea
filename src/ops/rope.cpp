// Rotary position embedding on the CPU (HF rotate-half). Frequencies, angles, cos and sin are
// computed in double; the backward applies the rotation by the negated angle.
#include "ops/rope.h"

#include <cmath>
#include <vector>

#include "core/error.h"

namespace moeforge::ops {

namespace {

// Rotates each (i, i + head_dim/2) pair of every head by direction * position * inv_freq[i].
// out may alias inp: each pair is read before it is written.
template <typename T>
void rotate(T* out, const T* inp, const int32_t* positions, int64_t n, int64_t num_heads,
            int64_t head_dim, double theta, double direction, const char* what) {
  MF_CHECK(n >= 0 && num_heads > 0, "{}: invalid dims n={} num_heads={}", what, n, num_heads);
  MF_CHECK(head_dim > 0 && head_dim % 2 == 0, "{}: head_dim must be positive and even, got {}",
           what, head_dim);
  MF_CHECK(theta > 0.0, "{}: theta must be positive, got {}", what, theta);
  const int64_t half = head_dim / 2;
  std::vector<double> inv_freq(half);
  for (int64_t i = 0; i < half; ++i) {
    inv_freq[i] = 1.0 / std::pow(theta, static_cast<double>(2 * i) / static_cast<double>(head_dim));
  }
#pragma omp parallel
  {
    std::vector<double> cos_angle(half);
    std::vector<double> sin_angle(half);
#pragma omp for
    for (int64_t token_idx = 0; token_idx < n; ++token_idx) {
      for (int64_t i = 0; i < half; ++i) {
        const double angle = static_cast<double>(positions[token_idx]) * inv_freq[i];
        cos_angle[i] = std::cos(angle);
        sin_angle[i] = direction * std::sin(angle);
      }
      for (int64_t head_idx = 0; head_idx < num_heads; ++head_idx) {
        const int64_t base = (token_idx * num_heads + head_idx) * head_dim;
        for (int64_t i = 0; i < half; ++i) {
          const double x1 = static_cast<double>(inp[base + i]);
          const double x2 = static_cast<double>(inp[base + i + half]);
          out[base + i] = static_cast<T>(x1 * cos_angle[i] - x2 * sin_angle[i]);
          out[base + i + half] = static_cast<T>(x2 * cos_angle[i] + x1 * sin_angle[i]);
        }
      }
    }
  }
}

}  // namespace

template <typename T>
void rope_forward(T* out, const T* inp, const int32_t* positions, int64_t n, int64_t num_heads,
                  int64_t head_dim, double theta) {
  rotate(out, inp, positions, n, num_heads, head_dim, theta, 1.0, "rope_forward");
}

template <typename T>
void rope_backward(T* dinp, const T* dout, const int32_t* positions, int64_t n, int64_t num_heads,
                   int64_t head_dim, double theta) {
  rotate(dinp, dout, positions, n, num_heads, head_dim, theta, -1.0, "rope_backward");
}

template void rope_forward<float>(float*, const float*, const int32_t*, int64_t, int64_t, int64_t,
                                  double);
template void rope_forward<double>(double*, const double*, const int32_t*, int64_t, int64_t,
                                   int64_t, double);
template void rope_backward<float>(float*, const float*, const int32_t*, int64_t, int64_t, int64_t,
                                   double);
template void rope_backward<double>(double*, const double*, const int32_t*, int64_t, int64_t,
                                    int64_t, double);

}  // namespace moeforge::ops
