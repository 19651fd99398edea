// Linear layer on the CPU: the matrix products go through ops::gemm, the bias sums run per column
// over the rows in order, accumulated in double.
#include "ops/linear.h"

#include "core/error.h"
#include "ops/gemm.h"

namespace moeforge::ops {

template <typename T>
void linear_forward(T* out, const T* inp, const T* weight, const T* bias, int64_t n, int64_t c,
                    int64_t oc) {
  MF_CHECK(n >= 0 && c > 0 && oc > 0,
           "linear_forward: invalid dims n={} c={} oc={} (need n >= 0, c > 0, oc > 0)", n, c, oc);
  T beta = T(0);
  if (bias != nullptr) {
#pragma omp parallel for
    for (int64_t row = 0; row < n; ++row) {
      for (int64_t o = 0; o < oc; ++o) out[row * oc + o] = bias[o];
    }
    beta = T(1);
  }
  // out[n, oc] = inp[n, c] @ weight[oc, c]^T + beta * out
  gemm<T>(false, true, n, oc, c, T(1), inp, c, weight, c, beta, out, oc);
}

template <typename T>
void linear_backward(T* dinp, T* dweight, T* dbias, const T* dout, const T* inp, const T* weight,
                     int64_t n, int64_t c, int64_t oc) {
  MF_CHECK(n >= 0 && c > 0 && oc > 0,
           "linear_backward: invalid dims n={} c={} oc={} (need n >= 0, c > 0, oc > 0)", n, c, oc);
  if (dinp != nullptr) {
    // dinp[n, c] = dout[n, oc] @ weight[oc, c]
    gemm<T>(false, false, n, c, oc, T(1), dout, oc, weight, c, T(0), dinp, c);
  }
  // dweight[oc, c] += dout[n, oc]^T @ inp[n, c]
  gemm<T>(true, false, oc, c, n, T(1), dout, oc, inp, c, T(1), dweight, c);
  if (dbias != nullptr) {
#pragma omp parallel for
    for (int64_t o = 0; o < oc; ++o) {
      double sum = 0.0;
      for (int64_t row = 0; row < n; ++row) sum += static_cast<double>(dout[row * oc + o]);
      dbias[o] += static_cast<T>(sum);
    }
  }
}

template void linear_forward<float>(float*, const float*, const float*, const float*, int64_t,
                                    int64_t, int64_t);
template void linear_forward<double>(double*, const double*, const double*, const double*, int64_t,
                                     int64_t, int64_t);
template void linear_backward<float>(float*, float*, float*, const float*, const float*,
                                     const float*, int64_t, int64_t, int64_t);
template void linear_backward<double>(double*, double*, double*, const double*, const double*,
                                      const double*, int64_t, int64_t, int64_t);

}  // namespace moeforge::ops
