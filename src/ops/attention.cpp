// Causal grouped-query attention on the CPU: scores, a max-subtracted softmax and the weighted sum
// of values, one (batch, query head, query) row at a time; dot products accumulate in double.
#include "ops/attention.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "core/error.h"
#include "ops/dot.h"

namespace moeforge::ops {

namespace {

void check_dims(const AttentionDims& d, const char* what) {
  MF_CHECK(d.batch >= 0, "{}: batch must be non-negative, got {}", what, d.batch);
  MF_CHECK(d.num_q >= 0 && d.num_q <= d.num_k,
           "{}: need 0 <= num_q <= num_k, got num_q={} num_k={}", what, d.num_q, d.num_k);
  MF_CHECK(d.num_kv_heads > 0 && d.num_q_heads > 0,
           "{}: head counts must be positive, got num_q_heads={} num_kv_heads={}", what,
           d.num_q_heads, d.num_kv_heads);
  MF_CHECK(d.num_q_heads % d.num_kv_heads == 0,
           "{}: num_q_heads={} is not divisible by num_kv_heads={}", what, d.num_q_heads,
           d.num_kv_heads);
  MF_CHECK(d.head_dim > 0, "{}: head_dim must be positive, got {}", what, d.head_dim);
}

}  // namespace

template <typename T>
void attention_forward(T* out, T* probs, const T* q, const T* k, const T* v,
                       const AttentionDims& dims) {
  check_dims(dims, "attention_forward");
  const int64_t num_q = dims.num_q;
  const int64_t num_k = dims.num_k;
  const int64_t num_q_heads = dims.num_q_heads;
  const int64_t num_kv_heads = dims.num_kv_heads;
  const int64_t head_dim = dims.head_dim;
  const int64_t group_size = num_q_heads / num_kv_heads;
  const int64_t q_row = num_q_heads * head_dim;    // stride between positions of q and out
  const int64_t kv_row = num_kv_heads * head_dim;  // stride between positions of k and v
  const double scale = 1.0 / std::sqrt(static_cast<double>(head_dim));

#pragma omp parallel
  {
    std::vector<double> weights(num_k);  // softmax row, masked entries excluded
    std::vector<double> acc(head_dim);
#pragma omp for collapse(3)
    for (int64_t b = 0; b < dims.batch; ++b) {
      for (int64_t h = 0; h < num_q_heads; ++h) {
        for (int64_t i = 0; i < num_q; ++i) {
          const int64_t kv_head = h / group_size;
          const int64_t num_visible = num_k - num_q + i + 1;  // keys 0..absolute position
          const T* q_vec = q + (b * num_q + i) * q_row + h * head_dim;
          const T* k_base = k + b * num_k * kv_row + kv_head * head_dim;
          const T* v_base = v + b * num_k * kv_row + kv_head * head_dim;

          double max_score = -INFINITY;
          for (int64_t j = 0; j < num_visible; ++j) {
            weights[j] = scale * dot_double(q_vec, k_base + j * kv_row, head_dim);
            max_score = std::max(max_score, weights[j]);
          }
          double sum = 0.0;
          for (int64_t j = 0; j < num_visible; ++j) {
            weights[j] = std::exp(weights[j] - max_score);
            sum += weights[j];
          }
          for (int64_t j = 0; j < num_visible; ++j) weights[j] /= sum;

          if (probs != nullptr) {
            T* p_row = probs + ((b * num_q_heads + h) * num_q + i) * num_k;
            for (int64_t j = 0; j < num_visible; ++j) p_row[j] = static_cast<T>(weights[j]);
            for (int64_t j = num_visible; j < num_k; ++j) p_row[j] = T(0);
          }

          std::fill(acc.begin(), acc.end(), 0.0);
          for (int64_t j = 0; j < num_visible; ++j) {
            const T* v_vec = v_base + j * kv_row;
            for (int64_t d = 0; d < head_dim; ++d) {
              acc[d] += weights[j] * static_cast<double>(v_vec[d]);
            }
          }
          T* out_vec = out + (b * num_q + i) * q_row + h * head_dim;
          for (int64_t d = 0; d < head_dim; ++d) out_vec[d] = static_cast<T>(acc[d]);
        }
      }
    }
  }
}

// Per row (b, h, i) with p = probs[b, h, i, :]:
//   dv[j] += p[j] * dout[i];  dp[j] = dout[i] . v[j];  ds[j] = p[j] * (dp[j] - sum_l p[l] dp[l])
//   dq[i] = scale * sum_j ds[j] k[j];  dk[j] += scale * ds[j] q[i]
// One thread owns a (batch, kv head) pair: the dk/dv sums over its query heads and positions run
// in a fixed order, so the result does not depend on the thread count.
template <typename T>
void attention_backward(T* dq, T* dk, T* dv, const T* dout, const T* q, const T* k, const T* v,
                        const T* probs, const AttentionDims& dims) {
  check_dims(dims, "attention_backward");
  MF_CHECK(probs != nullptr,
           "attention_backward: probs is null; run attention_forward with a probs "
           "buffer [batch, num_q_heads, num_q, num_k] before the backward");
  const int64_t num_q = dims.num_q;
  const int64_t num_k = dims.num_k;
  const int64_t num_q_heads = dims.num_q_heads;
  const int64_t num_kv_heads = dims.num_kv_heads;
  const int64_t head_dim = dims.head_dim;
  const int64_t group_size = num_q_heads / num_kv_heads;
  const int64_t q_row = num_q_heads * head_dim;
  const int64_t kv_row = num_kv_heads * head_dim;
  const double scale = 1.0 / std::sqrt(static_cast<double>(head_dim));

#pragma omp parallel
  {
    std::vector<double> dk_acc(num_k * head_dim);  // [num_k, head_dim]
    std::vector<double> dv_acc(num_k * head_dim);  // [num_k, head_dim]
    std::vector<double> ds(num_k);
    std::vector<double> dq_acc(head_dim);
#pragma omp for collapse(2)
    for (int64_t b = 0; b < dims.batch; ++b) {
      for (int64_t kv_head = 0; kv_head < num_kv_heads; ++kv_head) {
        const T* k_base = k + b * num_k * kv_row + kv_head * head_dim;
        const T* v_base = v + b * num_k * kv_row + kv_head * head_dim;
        std::fill(dk_acc.begin(), dk_acc.end(), 0.0);
        std::fill(dv_acc.begin(), dv_acc.end(), 0.0);
        for (int64_t h = kv_head * group_size; h < (kv_head + 1) * group_size; ++h) {
          for (int64_t i = 0; i < num_q; ++i) {
            const int64_t num_visible = num_k - num_q + i + 1;
            const T* p_row = probs + ((b * num_q_heads + h) * num_q + i) * num_k;
            const T* dout_vec = dout + (b * num_q + i) * q_row + h * head_dim;
            const T* q_vec = q + (b * num_q + i) * q_row + h * head_dim;

            double p_dot_dp = 0.0;
            for (int64_t j = 0; j < num_visible; ++j) {
              const double p = static_cast<double>(p_row[j]);
              ds[j] = dot_double(dout_vec, v_base + j * kv_row, head_dim);
              p_dot_dp += p * ds[j];
              for (int64_t d = 0; d < head_dim; ++d) {
                dv_acc[j * head_dim + d] += p * static_cast<double>(dout_vec[d]);
              }
            }
            std::fill(dq_acc.begin(), dq_acc.end(), 0.0);
            for (int64_t j = 0; j < num_visible; ++j) {
              ds[j] = static_cast<double>(p_row[j]) * (ds[j] - p_dot_dp) * scale;
              const T* k_vec = k_base + j * kv_row;
              for (int64_t d = 0; d < head_dim; ++d) {
                dq_acc[d] += ds[j] * static_cast<double>(k_vec[d]);
                dk_acc[j * head_dim + d] += ds[j] * static_cast<double>(q_vec[d]);
              }
            }
            T* dq_vec = dq + (b * num_q + i) * q_row + h * head_dim;
            for (int64_t d = 0; d < head_dim; ++d) dq_vec[d] = static_cast<T>(dq_acc[d]);
          }
        }
        for (int64_t j = 0; j < num_k; ++j) {
          T* dk_vec = dk + (b * num_k + j) * kv_row + kv_head * head_dim;
          T* dv_vec = dv + (b * num_k + j) * kv_row + kv_head * head_dim;
          for (int64_t d = 0; d < head_dim; ++d) {
            dk_vec[d] = static_cast<T>(dk_acc[j * head_dim + d]);
            dv_vec[d] = static_cast<T>(dv_acc[j * head_dim + d]);
          }
        }
      }
    }
  }
}

template void attention_forward<float>(float*, float*, const float*, const float*, const float*,
                                       const AttentionDims&);
template void attention_forward<double>(double*, double*, const double*, const double*,
                                        const double*, const AttentionDims&);
template void attention_backward<float>(float*, float*, float*, const float*, const float*,
                                        const float*, const float*, const float*,
                                        const AttentionDims&);
template void attention_backward<double>(double*, double*, double*, const double*, const double*,
                                         const double*, const double*, const double*,
                                         const AttentionDims&);

}  // namespace moeforge::ops
