// The device fills behind the benchmarks' inputs and weights: range, moments, determinism, and the
// bf16 fill being the rounded fp32 fill of the same seed.
#include "cuda/random_fill.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "gpu_test_util.h"

namespace moeforge::cuda {
namespace {

TEST(RandomFillCuda, UniformFillHasTheRequestedSpreadAndRepeatsPerSeed) {
  MF_REQUIRE_GPU();
  constexpr int64_t kCount = 1 << 20;
  const float scale = 0.02f;
  DeviceBuffer<float> a(kCount), b(kCount), c(kCount);
  fill_uniform_f32(a.data(), kCount, 7, scale, nullptr);
  fill_uniform_f32(b.data(), kCount, 7, scale, nullptr);
  fill_uniform_f32(c.data(), kCount, 8, scale, nullptr);
  const std::vector<float> x = a.download();
  EXPECT_EQ(x, b.download());
  EXPECT_NE(x, c.download());
  double sum = 0.0, sum_sq = 0.0;
  const double half_width = std::sqrt(3.0) * scale;
  for (const float v : x) {
    ASSERT_LE(std::abs(v), half_width * (1.0 + 1e-6));
    sum += v;
    sum_sq += static_cast<double>(v) * v;
  }
  // Uniform on [-w, w]: mean 0 with standard error scale / sqrt(n); variance scale^2 with
  // standard error sqrt(4/5) scale^2 / sqrt(n) (fourth moment 9/5 scale^4). Six standard errors.
  const double n = static_cast<double>(kCount);
  EXPECT_NEAR(sum / n, 0.0, 6.0 * scale / std::sqrt(n));
  EXPECT_NEAR(sum_sq / n, scale * scale, 6.0 * std::sqrt(0.8) * scale * scale / std::sqrt(n));

  DeviceBuffer<bf16> h(kCount);
  fill_uniform_bf16(h.data(), kCount, 7, scale, nullptr);
  testing::expect_equal("bf16 fill", h.download(), to_bf16(x));
}

TEST(RandomFillCuda, ConstantFillWritesEveryElement) {
  MF_REQUIRE_GPU();
  for (const int64_t count : {int64_t{1}, int64_t{1000}, int64_t{1} << 21}) {
    DeviceBuffer<float> x(count);
    testing::fill_garbage(x);
    fill_constant_f32(x.data(), count, 1.5f, nullptr);
    const std::vector<float> got = x.download();
    EXPECT_TRUE(std::all_of(got.begin(), got.end(), [](float v) { return v == 1.5f; })) << count;
  }
}

}  // namespace
}  // namespace moeforge::cuda
