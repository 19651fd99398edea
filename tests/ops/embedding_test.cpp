// Tests of ops::embedding_forward / embedding_backward: lookup, scatter-add with repeated tokens,
// finite differences and the accumulate contract.
#include "ops/embedding.h"

#include <gtest/gtest.h>
#include <omp.h>

#include <vector>

#include "core/error.h"
#include "testing/gradcheck.h"

namespace moeforge::ops {
namespace {

using testing::expect_close;
using testing::numerical_gradient;
using testing::random_vector;

constexpr int64_t kVocab = 9;
constexpr int64_t kC = 5;
const std::vector<int32_t> kTokens = {3, 0, 8, 3, 5, 3, 1};  // 3 repeats
const int64_t kN = static_cast<int64_t>(kTokens.size());

template <typename T>
void check_forward() {
  const auto table_d = random_vector(kVocab * kC, 1);
  const std::vector<T> table(table_d.begin(), table_d.end());
  std::vector<T> out(kN * kC, T(-1));
  embedding_forward<T>(out.data(), kTokens.data(), table.data(), kN, kC);
  for (int64_t i = 0; i < kN; ++i) {
    for (int64_t j = 0; j < kC; ++j) {
      EXPECT_EQ(out[i * kC + j], table[kTokens[i] * kC + j]) << "row " << i << " col " << j;
    }
  }
}

TEST(Embedding, ForwardCopiesRows) {
  check_forward<float>();
  check_forward<double>();
}

TEST(Embedding, GradientMatchesFiniteDifferences) {
  auto table = random_vector(kVocab * kC, 2);
  const auto r = random_vector(kN * kC, 3);
  std::vector<double> out(kN * kC);
  auto loss = [&]() {
    embedding_forward<double>(out.data(), kTokens.data(), table.data(), kN, kC);
    double sum = 0.0;
    for (size_t i = 0; i < out.size(); ++i) sum += out[i] * r[i];
    return sum;
  };
  std::vector<double> dtable(kVocab * kC, 0.0);
  embedding_backward<double>(dtable.data(), r.data(), kTokens.data(), kN, kC);
  expect_close(dtable, numerical_gradient(table, loss), 1e-7, 1e-6, "dtable");
}

TEST(Embedding, BackwardAccumulates) {
  const auto dout = random_vector(kN * kC, 4);
  std::vector<double> once(kVocab * kC, 0.0);
  embedding_backward<double>(once.data(), dout.data(), kTokens.data(), kN, kC);
  const auto init = random_vector(kVocab * kC, 5);
  std::vector<double> dtable = init;
  embedding_backward<double>(dtable.data(), dout.data(), kTokens.data(), kN, kC);
  embedding_backward<double>(dtable.data(), dout.data(), kTokens.data(), kN, kC);
  std::vector<double> expected(kVocab * kC);
  for (size_t i = 0; i < expected.size(); ++i) expected[i] = init[i] + 2.0 * once[i];
  expect_close(dtable, expected, 1e-14, 0.0, "dtable");
}

// Wide rows span several column blocks; the float sums must equal a serial loop in row order
// bit for bit, whatever the thread count.
TEST(Embedding, BackwardIsSerialOrderWithAnyThreadCount) {
  constexpr int64_t kWide = 131;
  const auto dout_d = random_vector(kN * kWide, 6);
  const std::vector<float> dout(dout_d.begin(), dout_d.end());
  std::vector<float> expected(kVocab * kWide, 0.5f);
  for (int64_t i = 0; i < kN; ++i) {
    for (int64_t j = 0; j < kWide; ++j) expected[kTokens[i] * kWide + j] += dout[i * kWide + j];
  }
  const int saved_threads = omp_get_max_threads();
  for (int num_threads : {1, 3}) {
    omp_set_num_threads(num_threads);
    std::vector<float> dtable(kVocab * kWide, 0.5f);
    embedding_backward<float>(dtable.data(), dout.data(), kTokens.data(), kN, kWide);
    for (size_t i = 0; i < dtable.size(); ++i) {
      ASSERT_EQ(dtable[i], expected[i]) << "index " << i << " with " << num_threads << " threads";
    }
  }
  omp_set_num_threads(saved_threads);
}

TEST(Embedding, NegativeTokenThrows) {
  const std::vector<int32_t> tokens = {1, -4};
  std::vector<double> table(kVocab * kC, 0.0);
  std::vector<double> out(2 * kC);
  EXPECT_THROW(embedding_forward<double>(out.data(), tokens.data(), table.data(), 2, kC), Error);
  EXPECT_THROW(embedding_backward<double>(table.data(), out.data(), tokens.data(), 2, kC), Error);
}

}  // namespace
}  // namespace moeforge::ops
