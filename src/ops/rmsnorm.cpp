// RMSNorm on the CPU, following HF LlamaRMSNorm: the mean of squares is accumulated in double in
// column order, then out = (inp * rstd) * weight.
#include "ops/rmsnorm.h"

#include <cmath>

#include "core/error.h"

namespace moeforge::ops {

template <typename T>
void rmsnorm_forward(T* out, T* rstd, const T* inp, const T* weight, int64_t n, int64_t c,
                     double eps) {
  MF_CHECK(n >= 0 && c > 0, "rmsnorm_forward: invalid dims n={} c={}", n, c);
  MF_CHECK(eps >= 0.0, "rmsnorm_forward: eps must be non-negative, got {}", eps);
#pragma omp parallel for
  for (int64_t row = 0; row < n; ++row) {
    const T* x = inp + row * c;
    double sum_sq = 0.0;
    for (int64_t j = 0; j < c; ++j) sum_sq += static_cast<double>(x[j]) * static_cast<double>(x[j]);
    const T row_rstd = static_cast<T>(1.0 / std::sqrt(sum_sq / static_cast<double>(c) + eps));
    rstd[row] = row_rstd;
    T* y = out + row * c;
    for (int64_t j = 0; j < c; ++j) y[j] = (x[j] * row_rstd) * weight[j];
  }
}

// With r = rstd and y_j = x_j * r * w_j:
//   dx_j = r * w_j * dy_j - r^3 * x_j / c * sum_k(dy_k * w_k * x_k)
//   dw_j += sum over rows of dy_j * x_j * r
template <typename T>
void rmsnorm_backward(T* dinp, T* dweight, const T* dout, const T* inp, const T* weight,
                      const T* rstd, int64_t n, int64_t c) {
  MF_CHECK(n >= 0 && c > 0, "rmsnorm_backward: invalid dims n={} c={}", n, c);
#pragma omp parallel for
  for (int64_t row = 0; row < n; ++row) {
    const T* x = inp + row * c;
    const T* dy = dout + row * c;
    const double r = static_cast<double>(rstd[row]);
    double dot = 0.0;
    for (int64_t j = 0; j < c; ++j) {
      dot +=
          static_cast<double>(dy[j]) * static_cast<double>(weight[j]) * static_cast<double>(x[j]);
    }
    const double coeff = r * r * r * dot / static_cast<double>(c);
    T* dx = dinp + row * c;
    for (int64_t j = 0; j < c; ++j) {
      dx[j] = static_cast<T>(r * static_cast<double>(weight[j]) * static_cast<double>(dy[j]) -
                             coeff * static_cast<double>(x[j]));
    }
  }
  // Threads split the columns; each column sums the rows in order.
#pragma omp parallel for
  for (int64_t j = 0; j < c; ++j) {
    double sum = 0.0;
    for (int64_t row = 0; row < n; ++row) {
      sum += static_cast<double>(dout[row * c + j]) * static_cast<double>(inp[row * c + j]) *
             static_cast<double>(rstd[row]);
    }
    dweight[j] += static_cast<T>(sum);
  }
}

template void rmsnorm_forward<float>(float*, float*, const float*, const float*, int64_t, int64_t,
                                     double);
template void rmsnorm_forward<double>(double*, double*, const double*, const double*, int64_t,
                                      int64_t, double);
template void rmsnorm_backward<float>(float*, float*, const float*, const float*, const float*,
                                      const float*, int64_t, int64_t);
template void rmsnorm_backward<double>(double*, double*, const double*, const double*,
                                       const double*, const double*, int64_t, int64_t);

}  // namespace moeforge::ops
