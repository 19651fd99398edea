// Softmax cross-entropy on the CPU: a max-subtracted log-sum-exp per row in double; rows with
// target -1 are ignored.
#include "ops/cross_entropy.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "core/error.h"

namespace moeforge::ops {

namespace {

constexpr int32_t kIgnoreTarget = -1;

// Runs before the parallel loops, which must not throw.
void check_targets(const char* what, const int32_t* targets, int64_t n, int64_t vocab) {
  for (int64_t row = 0; row < n; ++row) {
    const int32_t t = targets[row];
    MF_CHECK(t == kIgnoreTarget || (t >= 0 && t < vocab),
             "{}: target {} at row {} is outside [0, {}) and is not the ignore value {}", what, t,
             row, vocab, kIgnoreTarget);
  }
}

// log(sum_j exp(x_j)) with the row max subtracted first.
template <typename T>
double log_sum_exp(const T* x, int64_t vocab) {
  double max_logit = -INFINITY;
  for (int64_t j = 0; j < vocab; ++j) max_logit = std::max(max_logit, static_cast<double>(x[j]));
  double sum = 0.0;
  for (int64_t j = 0; j < vocab; ++j) sum += std::exp(static_cast<double>(x[j]) - max_logit);
  return max_logit + std::log(sum);
}

}  // namespace

template <typename T>
double cross_entropy_forward(T* losses, const T* logits, const int32_t* targets, int64_t n,
                             int64_t vocab, int64_t* num_counted) {
  MF_CHECK(n >= 0 && vocab > 0, "cross_entropy_forward: invalid dims n={} vocab={}", n, vocab);
  MF_CHECK(num_counted != nullptr, "cross_entropy_forward: num_counted must not be null");
  check_targets("cross_entropy_forward", targets, n, vocab);
  std::vector<double> row_losses(n, 0.0);
#pragma omp parallel for
  for (int64_t row = 0; row < n; ++row) {
    if (targets[row] == kIgnoreTarget) continue;
    const T* x = logits + row * vocab;
    row_losses[row] = log_sum_exp(x, vocab) - static_cast<double>(x[targets[row]]);
  }
  double total = 0.0;
  int64_t counted = 0;
  for (int64_t row = 0; row < n; ++row) {
    losses[row] = static_cast<T>(row_losses[row]);
    if (targets[row] == kIgnoreTarget) continue;
    total += row_losses[row];
    ++counted;
  }
  *num_counted = counted;
  return total;
}

template <typename T>
void cross_entropy_backward(T* dlogits, const T* logits, const int32_t* targets, int64_t n,
                            int64_t vocab, double dloss) {
  MF_CHECK(n >= 0 && vocab > 0, "cross_entropy_backward: invalid dims n={} vocab={}", n, vocab);
  check_targets("cross_entropy_backward", targets, n, vocab);
#pragma omp parallel for
  for (int64_t row = 0; row < n; ++row) {
    T* dx = dlogits + row * vocab;
    if (targets[row] == kIgnoreTarget) {
      std::fill(dx, dx + vocab, T(0));
      continue;
    }
    const T* x = logits + row * vocab;
    const double lse = log_sum_exp(x, vocab);
    for (int64_t j = 0; j < vocab; ++j) {
      const double prob = std::exp(static_cast<double>(x[j]) - lse);
      dx[j] = static_cast<T>((prob - (j == targets[row] ? 1.0 : 0.0)) * dloss);
    }
  }
}

template double cross_entropy_forward<float>(float*, const float*, const int32_t*, int64_t, int64_t,
                                             int64_t*);
template double cross_entropy_forward<double>(double*, const double*, const int32_t*, int64_t,
                                              int64_t, int64_t*);
template void cross_entropy_backward<float>(float*, const float*, const int32_t*, int64_t, int64_t,
                                            double);
template void cross_entropy_backward<double>(double*, const double*, const int32_t*, int64_t,
                                             int64_t, double);

}  // namespace moeforge::ops
