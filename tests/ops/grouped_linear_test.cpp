// Tests of the grouped linear: each row uses its group's weight (empty groups included), the
// backward matches finite differences and the weight gradient accumulates.
#include "ops/grouped_linear.h"

#include <gtest/gtest.h>

#include <vector>

#include "core/error.h"
#include "testing/gradcheck.h"

namespace moeforge::ops {
namespace {

// Four groups of 2, 0, 3 and 1 rows.
const std::vector<int64_t> kOffsets = {0, 2, 2, 5, 6};
constexpr int64_t kNumGroups = 4;
constexpr int64_t kRows = 6;
constexpr int64_t kIn = 5;
constexpr int64_t kOut = 3;

TEST(GroupedLinear, ForwardUsesEachRowsGroupWeight) {
  const std::vector<double> inp = testing::random_vector(kRows * kIn, 1);
  const std::vector<double> weight = testing::random_vector(kNumGroups * kOut * kIn, 2);
  std::vector<double> out(kRows * kOut);
  grouped_linear_forward<double>(out.data(), inp.data(), weight.data(), kOffsets.data(), kNumGroups,
                                 kIn, kOut);
  const std::vector<int64_t> row_group = {0, 0, 2, 2, 2, 3};
  for (int64_t r = 0; r < kRows; ++r) {
    for (int64_t o = 0; o < kOut; ++o) {
      double expected = 0.0;
      for (int64_t i = 0; i < kIn; ++i) {
        expected += inp[r * kIn + i] * weight[(row_group[r] * kOut + o) * kIn + i];
      }
      EXPECT_NEAR(out[r * kOut + o], expected, 1e-14) << "row " << r << " out " << o;
    }
  }

  const std::vector<float> inp_f(inp.begin(), inp.end()), weight_f(weight.begin(), weight.end());
  std::vector<float> out_f(kRows * kOut);
  grouped_linear_forward<float>(out_f.data(), inp_f.data(), weight_f.data(), kOffsets.data(),
                                kNumGroups, kIn, kOut);
  for (size_t i = 0; i < out.size(); ++i) EXPECT_NEAR(out_f[i], out[i], 1e-5);
}

TEST(GroupedLinear, BackwardMatchesFiniteDifferencesAndAccumulates) {
  std::vector<double> inp = testing::random_vector(kRows * kIn, 3);
  std::vector<double> weight = testing::random_vector(kNumGroups * kOut * kIn, 4);
  const std::vector<double> r = testing::random_vector(kRows * kOut, 5);
  const auto loss = [&] {
    std::vector<double> out(r.size());
    grouped_linear_forward<double>(out.data(), inp.data(), weight.data(), kOffsets.data(),
                                   kNumGroups, kIn, kOut);
    double l = 0.0;
    for (size_t i = 0; i < out.size(); ++i) l += out[i] * r[i];
    return l;
  };
  const std::vector<double> initial = testing::random_vector(weight.size(), 6);
  std::vector<double> dinp(inp.size(), 99.0);
  std::vector<double> dweight = initial;
  grouped_linear_backward<double>(dinp.data(), dweight.data(), r.data(), inp.data(), weight.data(),
                                  kOffsets.data(), kNumGroups, kIn, kOut);
  std::vector<double> dweight_added(dweight.size());
  for (size_t i = 0; i < dweight.size(); ++i) dweight_added[i] = dweight[i] - initial[i];
  testing::expect_close(dinp, testing::numerical_gradient(inp, loss), 1e-9, 1e-7, "dinp");
  testing::expect_close(dweight_added, testing::numerical_gradient(weight, loss), 1e-9, 1e-7,
                        "dweight");
  // The empty group's weight gradient is left as it was.
  for (int64_t i = kOut * kIn; i < 2 * kOut * kIn; ++i) EXPECT_EQ(dweight[i], initial[i]);
}

TEST(GroupedLinear, RejectsUnorderedOffsets) {
  const std::vector<int64_t> offsets = {0, 3, 2};
  std::vector<double> buf(64);
  EXPECT_THROW(
      grouped_linear_forward<double>(buf.data(), buf.data(), buf.data(), offsets.data(), 2, 2, 2),
      Error);
}

}  // namespace
}  // namespace moeforge::ops
