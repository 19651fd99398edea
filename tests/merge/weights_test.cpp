// Tests of the merge weights: exact SMA/WMA values, EMA equal to its recursion applied in fp64 bit
// for bit (and summing to 1), custom weights, the fp32 rounding of weights, and argument errors.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <numeric>

#include "io/io_test_util.h"
#include "merge/merge.h"

namespace moeforge::merge {
namespace {

using io::testing::expect_error;

double sum_of(const std::vector<double>& weights) {
  double sum = 0.0;
  for (const double w : weights) sum += w;
  return sum;
}

TEST(MergeWeights, SmaIsOneOverN) {
  for (int64_t n = 1; n <= 16; ++n) {
    const std::vector<double> weights = merge_weights(Method::kSma, n, 0.0, {});
    ASSERT_EQ(weights.size(), static_cast<size_t>(n));
    for (const double w : weights) EXPECT_EQ(w, 1.0 / static_cast<double>(n)) << "N=" << n;
  }
}

TEST(MergeWeights, WmaIsTwoIOverNNPlusOne) {
  EXPECT_EQ(merge_weights(Method::kWma, 4, 0.0, {}), (std::vector<double>{0.1, 0.2, 0.3, 0.4}));
  EXPECT_EQ(merge_weights(Method::kWma, 1, 0.0, {}), (std::vector<double>{1.0}));
  for (int64_t n = 1; n <= 16; ++n) {
    const std::vector<double> weights = merge_weights(Method::kWma, n, 0.0, {});
    for (int64_t i = 1; i <= n; ++i) {
      EXPECT_EQ(weights[i - 1], 2.0 * static_cast<double>(i) / static_cast<double>(n * (n + 1)))
          << "N=" << n << " i=" << i;
      if (i > 1) {
        EXPECT_GT(weights[i - 1], weights[i - 2]) << "newer checkpoints weigh more";
      }
    }
    EXPECT_NEAR(sum_of(weights), 1.0, 1e-15) << "N=" << n;
  }
}

TEST(MergeWeights, EmaClosedForm) {
  // N = 3, alpha = 0.25: w = (0.75^2, 0.25 * 0.75, 0.25), all exact in binary.
  EXPECT_EQ(merge_weights(Method::kEma, 3, 0.25, {}), (std::vector<double>{0.5625, 0.1875, 0.25}));
  const std::vector<double> weights = merge_weights(Method::kEma, 5, 0.2, {});
  EXPECT_NEAR(weights[0], std::pow(0.8, 4), 1e-16);
  for (int i = 2; i <= 5; ++i) EXPECT_NEAR(weights[i - 1], 0.2 * std::pow(0.8, 5 - i), 1e-16);
  // alpha = 1 keeps only the newest checkpoint.
  EXPECT_EQ(merge_weights(Method::kEma, 4, 1.0, {}), (std::vector<double>{0.0, 0.0, 0.0, 1.0}));
}

// The recursion M^(1) = M_1, M^(i) = a M_i + (1-a) M^(i-1) applied in fp64 to unit vectors gives
// each checkpoint's coefficient; the closed-form weights must be those very numbers.
TEST(MergeWeights, EmaEqualsTheRecursionBitForBit) {
  for (const double alpha : {0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0}) {
    for (int64_t n = 1; n <= 24; ++n) {
      const auto num = static_cast<size_t>(n);
      std::vector<double> merged(num, 0.0);  // coefficients of M^(i) over M_1..M_N
      merged[0] = 1.0;
      for (size_t i = 1; i < num; ++i) {
        std::vector<double> next(num);
        for (size_t j = 0; j < num; ++j) {
          const double unit = j == i ? 1.0 : 0.0;
          next[j] = alpha * unit + (1.0 - alpha) * merged[j];
        }
        merged = next;
      }
      const std::vector<double> weights = merge_weights(Method::kEma, n, alpha, {});
      for (size_t j = 0; j < num; ++j) {
        EXPECT_EQ(weights[j], merged[j]) << "alpha " << alpha << " N=" << n << " j=" << j;
      }
      EXPECT_NEAR(sum_of(weights), 1.0, 1e-15) << "alpha " << alpha << " N=" << n;
    }
  }
}

TEST(MergeWeights, CustomWeightsAreUsedAsGiven) {
  EXPECT_EQ(merge_weights(Method::kCustom, 3, 0.0, {0.5, 0.25, 2.0}),
            (std::vector<double>{0.5, 0.25, 2.0}));
  expect_error(
      [] {
        merge_weights(Method::kCustom, 3, 0.0, {0.5, 0.5});
      },
      {"2 custom weights for 3 checkpoints"});
  expect_error(
      [] {
        merge_weights(Method::kCustom, 2, 0.0, {0.5, std::numeric_limits<double>::quiet_NaN()});
      },
      {"custom weight", "input 2", "not finite"});
}

TEST(MergeWeights, RejectsBadArguments) {
  expect_error([] { merge_weights(Method::kSma, 0, 0.0, {}); }, {"at least one checkpoint"});
  expect_error([] { merge_weights(Method::kEma, 3, 0.0, {}); }, {"alpha", "(0, 1]", "0"});
  expect_error([] { merge_weights(Method::kEma, 3, 1.5, {}); }, {"alpha", "1.5"});
  expect_error([] { merge_weights(Method::kEma, 3, std::nan(""), {}); }, {"alpha"});
}

TEST(MergeWeights, MethodAndAccumulateNames) {
  for (const Method method : {Method::kSma, Method::kEma, Method::kWma, Method::kCustom}) {
    EXPECT_EQ(parse_method(method_name(method)), method);
  }
  expect_error([] { parse_method("slerp"); }, {"unknown merge method 'slerp'", "sma, ema, wma"});
  EXPECT_EQ(parse_accumulate("fp64"), Accumulate::kFp64);
  EXPECT_EQ(accumulate_name(Accumulate::kFp32), "fp32");
  expect_error([] { parse_accumulate("bf16"); }, {"unknown accumulation 'bf16'"});
}

TEST(MergeWeights, EffectiveWeightRoundsOnceToFp32) {
  EXPECT_EQ(effective_weight(1.0 / 3.0, Accumulate::kFp32), 0x1.555556p-2);
  EXPECT_EQ(effective_weight(1.0 / 3.0, Accumulate::kFp64), 1.0 / 3.0);
  EXPECT_EQ(effective_weight(0.25, Accumulate::kFp32), 0.25);
}

}  // namespace
}  // namespace moeforge::merge
