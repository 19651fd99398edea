// Tests of ops::attention_forward / attention_backward: a naive per-(b, h, i) reference, GQA group
// sizes 1, 2 and 4, decoding (num_q < num_k), causality, finite differences and thread counts.
#include "ops/attention.h"

#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <limits>
#include <vector>

#include "core/error.h"
#include "testing/gradcheck.h"

namespace moeforge::ops {
namespace {

using testing::expect_close;
using testing::numerical_gradient;
using testing::random_vector;

int64_t q_size(const AttentionDims& d) {
  return d.batch * d.num_q * d.num_q_heads * d.head_dim;
}
int64_t kv_size(const AttentionDims& d) {
  return d.batch * d.num_k * d.num_kv_heads * d.head_dim;
}
int64_t probs_size(const AttentionDims& d) {
  return d.batch * d.num_q_heads * d.num_q * d.num_k;
}

struct Reference {
  std::vector<double> out;    // [batch, num_q, num_q_heads, head_dim]
  std::vector<double> probs;  // [batch, num_q_heads, num_q, num_k]
};

// Textbook attention, one (b, h, i) at a time: softmax(q k^T / sqrt(d)) over keys 0..position.
Reference naive_attention(const std::vector<double>& q, const std::vector<double>& k,
                          const std::vector<double>& v, const AttentionDims& d) {
  Reference ref{std::vector<double>(q_size(d), 0.0), std::vector<double>(probs_size(d), 0.0)};
  const int64_t group = d.num_q_heads / d.num_kv_heads;
  for (int64_t b = 0; b < d.batch; ++b) {
    for (int64_t h = 0; h < d.num_q_heads; ++h) {
      const int64_t kv_head = h / group;
      for (int64_t i = 0; i < d.num_q; ++i) {
        const int64_t position = d.num_k - d.num_q + i;
        auto q_at = [&](int64_t x) {
          return q[((b * d.num_q + i) * d.num_q_heads + h) * d.head_dim + x];
        };
        auto kv_index = [&](int64_t j, int64_t x) {
          return ((b * d.num_k + j) * d.num_kv_heads + kv_head) * d.head_dim + x;
        };
        std::vector<double> e(position + 1);
        double denom = 0.0;
        for (int64_t j = 0; j <= position; ++j) {
          double s = 0.0;
          for (int64_t x = 0; x < d.head_dim; ++x) s += q_at(x) * k[kv_index(j, x)];
          e[j] = std::exp(s / std::sqrt(static_cast<double>(d.head_dim)));
          denom += e[j];
        }
        for (int64_t j = 0; j <= position; ++j) {
          const double p = e[j] / denom;
          ref.probs[((b * d.num_q_heads + h) * d.num_q + i) * d.num_k + j] = p;
          for (int64_t x = 0; x < d.head_dim; ++x) {
            ref.out[((b * d.num_q + i) * d.num_q_heads + h) * d.head_dim + x] +=
                p * v[kv_index(j, x)];
          }
        }
      }
    }
  }
  return ref;
}

template <typename T>
std::vector<T> cast(const std::vector<double>& x) {
  return std::vector<T>(x.begin(), x.end());
}

template <typename T>
std::vector<double> widen(const std::vector<T>& x) {
  return std::vector<double>(x.begin(), x.end());
}

template <typename T>
void check_forward(const AttentionDims& d, double atol) {
  const auto q = random_vector(q_size(d), 1);
  const auto k = random_vector(kv_size(d), 2);
  const auto v = random_vector(kv_size(d), 3);
  const auto q_t = cast<T>(q);
  const auto k_t = cast<T>(k);
  const auto v_t = cast<T>(v);
  std::vector<T> out(q_size(d), std::numeric_limits<T>::quiet_NaN());
  std::vector<T> probs(probs_size(d), std::numeric_limits<T>::quiet_NaN());
  attention_forward<T>(out.data(), probs.data(), q_t.data(), k_t.data(), v_t.data(), d);
  const Reference ref = naive_attention(q, k, v, d);
  expect_close(widen(out), ref.out, atol, 0.0, "out");
  expect_close(widen(probs), ref.probs, atol, 0.0, "probs");

  std::vector<T> out_no_probs(q_size(d));
  attention_forward<T>(out_no_probs.data(), nullptr, q_t.data(), k_t.data(), v_t.data(), d);
  expect_close(widen(out_no_probs), widen(out), 0.0, 0.0, "out_without_probs");
}

// batch, num_q, num_k, num_q_heads, num_kv_heads, head_dim
const AttentionDims kGroup1{2, 5, 5, 3, 3, 3};
const AttentionDims kGroup2{2, 5, 5, 6, 3, 3};
const AttentionDims kGroup4{1, 5, 5, 8, 2, 3};
const AttentionDims kDecode{2, 3, 7, 6, 3, 3};

TEST(Attention, ForwardMatchesNaiveLoop) {
  for (const AttentionDims& d : {kGroup1, kGroup2, kGroup4, kDecode}) {
    SCOPED_TRACE(::testing::Message()
                 << "num_q_heads=" << d.num_q_heads << " num_kv_heads=" << d.num_kv_heads
                 << " num_q=" << d.num_q << " num_k=" << d.num_k);
    check_forward<double>(d, 1e-14);
    check_forward<float>(d, 1e-6);
  }
}

TEST(Attention, ForwardIsStableForLargeScores) {
  const AttentionDims d{1, 4, 4, 2, 1, 3};
  auto q = random_vector(q_size(d), 4, 300.0);
  auto k = random_vector(kv_size(d), 5, 300.0);
  const auto v = random_vector(kv_size(d), 6);
  std::vector<double> out(q_size(d));
  std::vector<double> probs(probs_size(d));
  attention_forward<double>(out.data(), probs.data(), q.data(), k.data(), v.data(), d);
  for (double x : out) ASSERT_TRUE(std::isfinite(x));
  for (int64_t row = 0; row < d.num_q_heads * d.num_q; ++row) {
    double sum = 0.0;
    for (int64_t j = 0; j < d.num_k; ++j) sum += probs[row * d.num_k + j];
    EXPECT_NEAR(sum, 1.0, 1e-12) << "row " << row;
  }
}

// Decoding the last num_q queries against the full cache reproduces the last rows of the full
// (num_q == num_k) computation.
TEST(Attention, DecodeEqualsLastRowsOfFullSequence) {
  const AttentionDims full{2, 7, 7, 4, 2, 5};
  AttentionDims decode = full;
  decode.num_q = 2;
  const auto q = random_vector(q_size(full), 7);
  const auto k = random_vector(kv_size(full), 8);
  const auto v = random_vector(kv_size(full), 9);
  std::vector<double> out_full(q_size(full));
  std::vector<double> probs_full(probs_size(full));
  attention_forward<double>(out_full.data(), probs_full.data(), q.data(), k.data(), v.data(), full);

  const int64_t q_row = full.num_q_heads * full.head_dim;
  std::vector<double> q_last;
  std::vector<double> out_expected;
  std::vector<double> probs_expected;
  for (int64_t b = 0; b < full.batch; ++b) {
    for (int64_t i = full.num_q - decode.num_q; i < full.num_q; ++i) {
      const int64_t offset = (b * full.num_q + i) * q_row;
      q_last.insert(q_last.end(), q.begin() + offset, q.begin() + offset + q_row);
      out_expected.insert(out_expected.end(), out_full.begin() + offset,
                          out_full.begin() + offset + q_row);
    }
    for (int64_t h = 0; h < full.num_q_heads; ++h) {
      const int64_t offset =
          ((b * full.num_q_heads + h) * full.num_q + full.num_q - decode.num_q) * full.num_k;
      probs_expected.insert(probs_expected.end(), probs_full.begin() + offset,
                            probs_full.begin() + offset + decode.num_q * full.num_k);
    }
  }
  std::vector<double> out(q_size(decode));
  std::vector<double> probs(probs_size(decode));
  attention_forward<double>(out.data(), probs.data(), q_last.data(), k.data(), v.data(), decode);
  expect_close(out, out_expected, 0.0, 0.0, "out");
  expect_close(probs, probs_expected, 0.0, 0.0, "probs");
}

TEST(Attention, FutureKeysDoNotChangeEarlierOutputs) {
  const AttentionDims d{1, 6, 6, 4, 2, 3};
  const auto q = random_vector(q_size(d), 10);
  auto k = random_vector(kv_size(d), 11);
  auto v = random_vector(kv_size(d), 12);
  std::vector<double> before(q_size(d));
  attention_forward<double>(before.data(), nullptr, q.data(), k.data(), v.data(), d);
  constexpr int64_t kFirstChanged = 4;
  const int64_t kv_row = d.num_kv_heads * d.head_dim;
  for (int64_t idx = kFirstChanged * kv_row; idx < d.num_k * kv_row; ++idx) {
    k[idx] += 3.0;
    v[idx] -= 2.0;
  }
  std::vector<double> after(q_size(d));
  attention_forward<double>(after.data(), nullptr, q.data(), k.data(), v.data(), d);
  const int64_t q_row = d.num_q_heads * d.head_dim;
  for (int64_t idx = 0; idx < q_size(d); ++idx) {
    if (idx < kFirstChanged * q_row) {
      EXPECT_EQ(after[idx], before[idx]) << "output " << idx << " saw a future key";
    } else {
      EXPECT_NE(after[idx], before[idx]) << "output " << idx << " ignored a visible key";
    }
  }
}

void check_gradients(const AttentionDims& d) {
  auto q = random_vector(q_size(d), 13);
  auto k = random_vector(kv_size(d), 14);
  auto v = random_vector(kv_size(d), 15);
  const auto r = random_vector(q_size(d), 16);
  std::vector<double> out(q_size(d));
  std::vector<double> probs(probs_size(d));
  auto loss = [&]() {
    attention_forward<double>(out.data(), probs.data(), q.data(), k.data(), v.data(), d);
    double sum = 0.0;
    for (size_t i = 0; i < out.size(); ++i) sum += out[i] * r[i];
    return sum;
  };
  loss();
  // NaN garbage: the backward must overwrite every gradient entry without reading it.
  const double garbage = std::numeric_limits<double>::quiet_NaN();
  std::vector<double> dq(q_size(d), garbage);
  std::vector<double> dk(kv_size(d), garbage);
  std::vector<double> dv(kv_size(d), garbage);
  attention_backward<double>(dq.data(), dk.data(), dv.data(), r.data(), q.data(), k.data(),
                             v.data(), probs.data(), d);
  expect_close(dq, numerical_gradient(q, loss), 1e-7, 1e-6, "dq");
  expect_close(dk, numerical_gradient(k, loss), 1e-7, 1e-6, "dk");
  expect_close(dv, numerical_gradient(v, loss), 1e-7, 1e-6, "dv");
}

TEST(Attention, GradientsMatchFiniteDifferences) {
  for (const AttentionDims& d : {kGroup1, kGroup2, kGroup4, kDecode}) {
    SCOPED_TRACE(::testing::Message()
                 << "num_q_heads=" << d.num_q_heads << " num_kv_heads=" << d.num_kv_heads
                 << " num_q=" << d.num_q << " num_k=" << d.num_k);
    check_gradients(d);
  }
}

TEST(Attention, BackwardDoesNotDependOnThreadCount) {
  const AttentionDims d = kGroup2;
  const auto q = cast<float>(random_vector(q_size(d), 17));
  const auto k = cast<float>(random_vector(kv_size(d), 18));
  const auto v = cast<float>(random_vector(kv_size(d), 19));
  const auto dout = cast<float>(random_vector(q_size(d), 20));
  const int saved_threads = omp_get_max_threads();
  std::vector<std::vector<float>> results;
  for (int num_threads : {1, 3}) {
    omp_set_num_threads(num_threads);
    std::vector<float> out(q_size(d));
    std::vector<float> probs(probs_size(d));
    attention_forward<float>(out.data(), probs.data(), q.data(), k.data(), v.data(), d);
    std::vector<float> grads(q_size(d) + 2 * kv_size(d));
    float* dq = grads.data();
    float* dk = dq + q_size(d);
    float* dv = dk + kv_size(d);
    attention_backward<float>(dq, dk, dv, dout.data(), q.data(), k.data(), v.data(), probs.data(),
                              d);
    out.insert(out.end(), grads.begin(), grads.end());
    results.push_back(out);
  }
  omp_set_num_threads(saved_threads);
  ASSERT_EQ(results[0].size(), results[1].size());
  for (size_t i = 0; i < results[0].size(); ++i) {
    ASSERT_EQ(results[0][i], results[1][i]) << "index " << i;
  }
}

TEST(Attention, InvalidDimsThrow) {
  std::vector<double> buf(256, 0.0);
  const AttentionDims not_divisible{1, 2, 2, 3, 2, 4};
  EXPECT_THROW(attention_forward<double>(buf.data(), buf.data(), buf.data(), buf.data(), buf.data(),
                                         not_divisible),
               Error);
  const AttentionDims too_many_queries{1, 3, 2, 2, 1, 4};
  EXPECT_THROW(attention_forward<double>(buf.data(), buf.data(), buf.data(), buf.data(), buf.data(),
                                         too_many_queries),
               Error);
  EXPECT_THROW(
      attention_backward<double>(buf.data(), buf.data(), buf.data(), buf.data(), buf.data(),
                                 buf.data(), buf.data(), buf.data(), too_many_queries),
      Error);
  const AttentionDims valid{1, 2, 2, 2, 1, 4};
  EXPECT_THROW(attention_backward<double>(buf.data(), buf.data(), buf.data(), buf.data(),
                                          buf.data(), buf.data(), buf.data(), nullptr, valid),
               Error);
}

}  // namespace
}  // namespace moeforge::ops
