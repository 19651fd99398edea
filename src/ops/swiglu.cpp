// SwiGLU on the CPU with a sigmoid that never overflows exp for large |x|.
#include "ops/swiglu.h"

#include <cmath>

#include "core/error.h"

namespace moeforge::ops {

namespace {

template <typename T>
T sigmoid(T x) {
  if (x >= T(0)) return T(1) / (T(1) + std::exp(-x));
  const T e = std::exp(x);
  return e / (T(1) + e);
}

}  // namespace

template <typename T>
void swiglu_forward(T* out, const T* gate, const T* up, int64_t n) {
  MF_CHECK(n >= 0, "swiglu_forward: negative length n={}", n);
#pragma omp parallel for
  for (int64_t i = 0; i < n; ++i) out[i] = gate[i] * sigmoid(gate[i]) * up[i];
}

// d silu(x)/dx = s + x * s * (1 - s) with s = sigmoid(x).
template <typename T>
void swiglu_backward(T* dgate, T* dup, const T* dout, const T* gate, const T* up, int64_t n) {
  MF_CHECK(n >= 0, "swiglu_backward: negative length n={}", n);
#pragma omp parallel for
  for (int64_t i = 0; i < n; ++i) {
    const T x = gate[i];
    const T s = sigmoid(x);
    dgate[i] = dout[i] * up[i] * s * (T(1) + x * (T(1) - s));
    dup[i] = dout[i] * x * s;
  }
}

template void swiglu_forward<float>(float*, const float*, const float*, int64_t);
template void swiglu_forward<double>(double*, const double*, const double*, int64_t);
template void swiglu_backward<float>(float*, float*, const float*, const float*, const float*,
                                     int64_t);
template void swiglu_backward<double>(double*, double*, const double*, const double*, const double*,
                                      int64_t);

}  // namespace moeforge::ops
