// Tests of ops::cross_entropy_forward / cross_entropy_backward: naive log-softmax, ignored rows,
// invalid targets, large logits and finite differences.
#include "ops/cross_entropy.h"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "core/error.h"
#include "testing/gradcheck.h"

namespace moeforge::ops {
namespace {

using testing::expect_close;
using testing::numerical_gradient;
using testing::random_vector;

constexpr int64_t kVocab = 11;
const std::vector<int32_t> kTargets = {4, -1, 0, 10, -1, 7};
const int64_t kN = static_cast<int64_t>(kTargets.size());

template <typename T>
void check_forward(double atol) {
  const auto logits = random_vector(kN * kVocab, 1, 3.0);
  const std::vector<T> logits_t(logits.begin(), logits.end());
  std::vector<T> losses(kN, std::numeric_limits<T>::quiet_NaN());
  int64_t num_counted = -1;
  const double total = cross_entropy_forward<T>(losses.data(), logits_t.data(), kTargets.data(), kN,
                                                kVocab, &num_counted);
  std::vector<double> expected(kN, 0.0);
  double expected_total = 0.0;
  for (int64_t row = 0; row < kN; ++row) {
    if (kTargets[row] < 0) continue;
    double denom = 0.0;
    for (int64_t j = 0; j < kVocab; ++j) denom += std::exp(logits[row * kVocab + j]);
    expected[row] = -std::log(std::exp(logits[row * kVocab + kTargets[row]]) / denom);
    expected_total += expected[row];
  }
  expect_close(std::vector<double>(losses.begin(), losses.end()), expected, atol, 0.0, "losses");
  EXPECT_NEAR(total, expected_total, 10 * atol);
  EXPECT_EQ(num_counted, 4);
}

TEST(CrossEntropy, ForwardMatchesNaiveLogSoftmax) {
  check_forward<double>(1e-14);
  check_forward<float>(1e-5);
}

TEST(CrossEntropy, LargeLogitsAreStable) {
  const auto logits = random_vector(kN * kVocab, 2, 3.0);
  std::vector<double> shifted(logits.size());
  for (size_t i = 0; i < logits.size(); ++i) shifted[i] = logits[i] + 1000.0;
  std::vector<double> losses(kN);
  std::vector<double> losses_shifted(kN);
  int64_t num_counted = 0;
  cross_entropy_forward<double>(losses.data(), logits.data(), kTargets.data(), kN, kVocab,
                                &num_counted);
  cross_entropy_forward<double>(losses_shifted.data(), shifted.data(), kTargets.data(), kN, kVocab,
                                &num_counted);
  expect_close(losses_shifted, losses, 1e-10, 0.0, "losses_shifted");
  std::vector<double> dlogits(kN * kVocab);
  cross_entropy_backward<double>(dlogits.data(), shifted.data(), kTargets.data(), kN, kVocab, 1.0);
  for (double g : dlogits) ASSERT_TRUE(std::isfinite(g));
}

TEST(CrossEntropy, GradientMatchesFiniteDifferences) {
  auto logits = random_vector(kN * kVocab, 3, 3.0);
  constexpr double kDloss = 0.25;
  std::vector<double> losses(kN);
  int64_t num_counted = 0;
  auto loss = [&]() {
    return kDloss * cross_entropy_forward<double>(losses.data(), logits.data(), kTargets.data(), kN,
                                                  kVocab, &num_counted);
  };
  std::vector<double> dlogits(kN * kVocab, std::numeric_limits<double>::quiet_NaN());
  cross_entropy_backward<double>(dlogits.data(), logits.data(), kTargets.data(), kN, kVocab,
                                 kDloss);
  expect_close(dlogits, numerical_gradient(logits, loss), 1e-7, 1e-6, "dlogits");
}

TEST(CrossEntropy, IgnoredRowsHaveZeroLossAndGradientAndRowsSumToZero) {
  const auto logits = random_vector(kN * kVocab, 4, 3.0);
  std::vector<double> losses(kN, 5.0);
  int64_t num_counted = 0;
  cross_entropy_forward<double>(losses.data(), logits.data(), kTargets.data(), kN, kVocab,
                                &num_counted);
  std::vector<double> dlogits(kN * kVocab, 5.0);
  cross_entropy_backward<double>(dlogits.data(), logits.data(), kTargets.data(), kN, kVocab, 1.0);
  for (int64_t row = 0; row < kN; ++row) {
    double row_sum = 0.0;
    for (int64_t j = 0; j < kVocab; ++j) {
      row_sum += dlogits[row * kVocab + j];
      if (kTargets[row] < 0) {
        EXPECT_EQ(dlogits[row * kVocab + j], 0.0) << "row " << row;
      }
    }
    EXPECT_NEAR(row_sum, 0.0, 1e-15) << "row " << row;
    if (kTargets[row] < 0) {
      EXPECT_EQ(losses[row], 0.0) << "row " << row;
    } else {
      EXPECT_GT(losses[row], 0.0) << "row " << row;
    }
  }
}

TEST(CrossEntropy, InvalidTargetThrowsNamingRowAndValue) {
  const std::vector<int32_t> targets = {1, 2, -1, kVocab + 6};
  const int64_t n = static_cast<int64_t>(targets.size());
  std::vector<double> logits(n * kVocab, 0.0);
  std::vector<double> losses(n);
  int64_t num_counted = 0;
  try {
    cross_entropy_forward<double>(losses.data(), logits.data(), targets.data(), n, kVocab,
                                  &num_counted);
    FAIL() << "expected an Error for target " << kVocab + 6;
  } catch (const Error& e) {
    const std::string message = e.what();
    EXPECT_NE(message.find("row 3"), std::string::npos) << message;
    EXPECT_NE(message.find(std::to_string(kVocab + 6)), std::string::npos) << message;
  }
  std::vector<double> dlogits(n * kVocab);
  EXPECT_THROW(
      cross_entropy_backward<double>(dlogits.data(), logits.data(), targets.data(), n, kVocab, 1.0),
      Error);
  const std::vector<int32_t> negative = {-2};
  EXPECT_THROW(cross_entropy_forward<double>(losses.data(), logits.data(), negative.data(), 1,
                                             kVocab, &num_counted),
               Error);
}

}  // namespace
}  // namespace moeforge::ops
