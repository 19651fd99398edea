// RMSNorm on the GPU against ops/rmsnorm.h in fp64: forward from the fp32 residual stream and from
// bf16 (q/k norm), backward for both instantiations with assigned and accumulated dinp and an
// accumulating dweight, on both ways of summing dweight (fused into the backward kernel, or a
// second kernel for wide rows), bit-identical from run to run.
#include "cuda/rmsnorm.h"

#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <type_traits>
#include <vector>

#include "gpu_test_util.h"
#include "ops/rmsnorm.h"

namespace moeforge::cuda {
namespace {

using testing::bf16_bound;
using testing::download_double;
using testing::expect_close;
using testing::kFloatEps;
using testing::to_device;
using testing::to_double;

constexpr float kEps = 1e-5f;

// The values of a T tensor made from x, and the tensor for the device.
template <typename T>
std::vector<float> representable(const std::vector<float>& x) {
  if constexpr (std::is_same_v<T, bf16>) {
    return testing::round_to_bf16(x);
  } else {
    return x;
  }
}

template <typename T>
DeviceBuffer<T> upload_as(const std::vector<float>& x) {
  if constexpr (std::is_same_v<T, bf16>) {
    return to_device(to_bf16(x));
  } else {
    return to_device(x);
  }
}

// Bound for an output of type T around the reference: fp32 arithmetic noise, plus one bf16 ulp
// when the output is rounded to bf16.
template <typename T>
std::vector<double> output_bound(const std::vector<double>& reference,
                                 const std::vector<double>& noise) {
  if constexpr (std::is_same_v<T, bf16>) {
    return bf16_bound(reference, noise);
  } else {
    return noise;
  }
}

// Rows of standard deviation 2, every fourth of 2e-3 (mean square comparable to eps, so that
// eps matters).
std::vector<float> random_rows(int64_t n, int64_t c, uint64_t seed) {
  std::vector<float> x = testing::random_normal(n * c, seed, 2.0);
  for (int64_t row = 1; row < n; row += 4) {
    for (int64_t j = 0; j < c; ++j) x[row * c + j] *= 1e-3f;
  }
  return x;
}

template <typename In>
void check_forward(int64_t n, int64_t c, uint64_t seed) {
  SCOPED_TRACE("n=" + std::to_string(n) + " c=" + std::to_string(c));
  const std::vector<float> x = representable<In>(random_rows(n, c, seed));
  const std::vector<float> weight = testing::random_uniform(c, seed + 1, 0.5, 1.5);

  std::vector<double> out_ref(n * c), rstd_ref(n);
  const std::vector<double> x_d = to_double(x), weight_d = to_double(weight);
  ops::rmsnorm_forward<double>(out_ref.data(), rstd_ref.data(), x_d.data(), weight_d.data(), n, c,
                               static_cast<double>(kEps));

  DeviceBuffer<In> x_dev = upload_as<In>(x);
  DeviceBuffer<float> weight_dev = to_device(weight);
  DeviceBuffer<bf16> out(n * c);
  DeviceBuffer<float> rstd(n);
  testing::fill_garbage(out);
  testing::fill_garbage(rstd);
  rmsnorm_forward<In>(out.data(), rstd.data(), x_dev.data(), weight_dev.data(), n, c, kEps,
                      nullptr);

  // fp32: the sum of c squares (c roundings), rsqrt (2 ulp) and two products.
  std::vector<double> out_noise(n * c), rstd_noise(n);
  for (int64_t i = 0; i < n * c; ++i) out_noise[i] = (c + 8) * kFloatEps * std::abs(out_ref[i]);
  for (int64_t i = 0; i < n; ++i) rstd_noise[i] = (c + 8) * kFloatEps * rstd_ref[i];
  expect_close("out", download_double(out), out_ref, bf16_bound(out_ref, out_noise));
  expect_close("rstd", download_double(rstd), rstd_ref, rstd_noise);
}

TEST(RmsNormCuda, ForwardFromFloat) {
  MF_REQUIRE_GPU();
  check_forward<float>(37, 96, 1);
  check_forward<float>(1, 100, 2);
  check_forward<float>(300, 2048, 3);
  check_forward<float>(5, 98, 6);  // c % 4 != 0: the one-column-per-lane kernel
}

TEST(RmsNormCuda, ForwardFromBf16) {
  MF_REQUIRE_GPU();
  check_forward<bf16>(600, 128, 4);
  check_forward<bf16>(37, 64, 5);
  check_forward<bf16>(9, 30, 7);
}

// Backward shapes named for the split of dweight they exercise (rmsnorm_dweight_split; the test
// BackwardShapesCoverTheSplits checks that they still do). The blocks have 8 warps.
struct Shape {
  int64_t n, c;
};
// Fused, one row per warp, c = 2048 (the training bench's width), several hundred rows.
constexpr Shape kWideRows{600, 2048};
// Fused, several rows per warp, the last block's range cut short (n not a multiple of it).
constexpr Shape kWideRowsManyPerWarp{2100, 2048};
// The same at q/k norm's width (bf16, c = head_dim).
constexpr Shape kHeadRowsManyPerWarp{9003, 128};
// The same on the one-column-per-lane kernel (c % 4 != 0).
constexpr Shape kOddRowsManyPerWarp{8500, 30};
// Fused, 4 column groups (of 32 lanes' columns) loaded at a time, the last load batch and the last
// group cut short; 4- and 1-column.
constexpr Shape kUnrolledPartialGroups{300, 1000};
constexpr Shape kUnrolledOdd{70, 1001};
// Fused, fewer rows than one block's range.
constexpr Shape kOneRow{1, 100};
constexpr Shape kFewOddRows{5, 98};
// Wider than the fused kernel holds: the two-pass path, over two chunks of rows; 4- and 1-column.
constexpr Shape kTooWide{300, kRmsNormFusedMaxColumns + 4};
constexpr Shape kTooWideOdd{40, kRmsNormFusedMaxColumns + 2};

TEST(RmsNormCuda, BackwardShapesCoverTheSplits) {
  for (const Shape s : {kWideRows, kWideRowsManyPerWarp, kHeadRowsManyPerWarp, kOddRowsManyPerWarp,
                        kUnrolledPartialGroups, kUnrolledOdd, kOneRow, kFewOddRows}) {
    SCOPED_TRACE("n=" + std::to_string(s.n) + " c=" + std::to_string(s.c));
    const RmsNormDweightSplit split = rmsnorm_dweight_split(s.n, s.c);
    EXPECT_TRUE(split.fused);
    EXPECT_EQ(split.num_partials, (s.n + split.rows_per_partial - 1) / split.rows_per_partial);
  }
  EXPECT_EQ(rmsnorm_dweight_split(kWideRows.n, kWideRows.c).rows_per_partial, 8);
  for (const Shape s : {kWideRowsManyPerWarp, kHeadRowsManyPerWarp, kOddRowsManyPerWarp}) {
    SCOPED_TRACE("n=" + std::to_string(s.n) + " c=" + std::to_string(s.c));
    const RmsNormDweightSplit split = rmsnorm_dweight_split(s.n, s.c);
    EXPECT_GE(split.rows_per_partial, 2 * 8);
    EXPECT_NE(s.n % split.rows_per_partial, 0);
    EXPECT_GT(split.num_partials, 1);
  }
  EXPECT_GT(rmsnorm_dweight_split(kOneRow.n, kOneRow.c).rows_per_partial, kOneRow.n);
  EXPECT_GT(rmsnorm_dweight_split(kFewOddRows.n, kFewOddRows.c).rows_per_partial, kFewOddRows.n);
  for (const Shape s : {kTooWide, kTooWideOdd}) {
    SCOPED_TRACE("n=" + std::to_string(s.n) + " c=" + std::to_string(s.c));
    EXPECT_FALSE(rmsnorm_dweight_split(s.n, s.c).fused);
  }
  EXPECT_GT(rmsnorm_dweight_split(kTooWide.n, kTooWide.c).num_partials, 1);
  // The widest fused rows are those of the limit.
  EXPECT_TRUE(rmsnorm_dweight_split(1, kRmsNormFusedMaxColumns).fused);
}

// In, DOut and DIn are all T (the two instantiations of the header).
template <typename T>
void check_backward(Shape shape, bool accumulate, uint64_t seed) {
  const int64_t n = shape.n, c = shape.c;
  SCOPED_TRACE("n=" + std::to_string(n) + " c=" + std::to_string(c) +
               " accumulate=" + std::to_string(accumulate));
  const std::vector<float> x = representable<T>(random_rows(n, c, seed));
  const std::vector<float> dout = representable<T>(testing::random_normal(n * c, seed + 1));
  const std::vector<float> weight = testing::random_uniform(c, seed + 2, 0.5, 1.5);
  const std::vector<float> dweight_start = testing::random_normal(c, seed + 3);
  const std::vector<float> dinp_start = representable<T>(testing::random_normal(n * c, seed + 4));
  const std::vector<double> x_d = to_double(x), dout_d = to_double(dout),
                            weight_d = to_double(weight);

  // rstd as saved by a forward, rounded to fp32 once; the reference uses the same values.
  std::vector<float> rstd(n);
  {
    std::vector<double> out_ref(n * c), rstd_ref(n);
    ops::rmsnorm_forward<double>(out_ref.data(), rstd_ref.data(), x_d.data(), weight_d.data(), n, c,
                                 static_cast<double>(kEps));
    for (int64_t i = 0; i < n; ++i) rstd[i] = static_cast<float>(rstd_ref[i]);
  }
  const std::vector<double> rstd_d = to_double(rstd);

  std::vector<double> dinp_ref(n * c);
  std::vector<double> dweight_ref = to_double(dweight_start);
  ops::rmsnorm_backward<double>(dinp_ref.data(), dweight_ref.data(), dout_d.data(), x_d.data(),
                                weight_d.data(), rstd_d.data(), n, c);
  if (accumulate) {
    for (int64_t i = 0; i < n * c; ++i) dinp_ref[i] += dinp_start[i];
  }

  DeviceBuffer<T> x_dev = upload_as<T>(x), dout_dev = upload_as<T>(dout);
  DeviceBuffer<T> dinp = upload_as<T>(dinp_start);
  if (!accumulate) testing::fill_garbage(dinp);
  DeviceBuffer<float> weight_dev = to_device(weight), rstd_dev = to_device(rstd),
                      dweight = to_device(dweight_start);
  // The residual norms' fp32 gradient also comes out in bf16 (NaN-filled first): exactly dinp
  // rounded.
  DeviceBuffer<bf16> dinp_bf16(std::is_same_v<T, float> ? n * c : 0);
  testing::fill_garbage(dinp_bf16);
  rmsnorm_backward<T, T, T>(dinp.data(), dweight.data(), dout_dev.data(), x_dev.data(),
                            weight_dev.data(), rstd_dev.data(), n, c, accumulate, nullptr,
                            std::is_same_v<T, float> ? dinp_bf16.data() : nullptr);
  if constexpr (std::is_same_v<T, float>) {
    std::vector<bf16> rounded = to_bf16(dinp.download());
    testing::expect_equal("dinp bf16", dinp_bf16.download(), rounded);
  }

  // Noise from the magnitudes of the terms: dx_j = r w_j dy_j - r^3 x_j / c * sum_k dy_k w_k x_k.
  std::vector<double> dinp_noise(n * c);
  std::vector<double> dweight_mag(c);
  for (int64_t j = 0; j < c; ++j) dweight_mag[j] = std::abs(dweight_start[j]);
  for (int64_t row = 0; row < n; ++row) {
    const double r = rstd_d[row];
    double dot_mag = 0.0;
    for (int64_t j = 0; j < c; ++j)
      dot_mag += std::abs(dout_d[row * c + j] * weight_d[j] * x_d[row * c + j]);
    for (int64_t j = 0; j < c; ++j) {
      const int64_t i = row * c + j;
      double mag =
          r * std::abs(weight_d[j] * dout_d[i]) + r * r * r * std::abs(x_d[i]) * dot_mag / c;
      if (accumulate) mag += std::abs(dinp_start[i]);
      dinp_noise[i] = (c + 8) * kFloatEps * mag;
      dweight_mag[j] += std::abs(dout_d[i] * x_d[i]) * r;
    }
  }
  std::vector<double> dweight_noise(c);
  for (int64_t j = 0; j < c; ++j) dweight_noise[j] = (n + 8) * kFloatEps * dweight_mag[j];

  expect_close("dinp", download_double(dinp), dinp_ref, output_bound<T>(dinp_ref, dinp_noise));
  expect_close("dweight", download_double(dweight), dweight_ref, dweight_noise);
}

TEST(RmsNormCuda, BackwardFloatAssignsOrAccumulatesDinp) {
  MF_REQUIRE_GPU();
  check_backward<float>({37, 96}, false, 10);
  check_backward<float>({37, 96}, true, 11);
  check_backward<float>(kOneRow, false, 12);
  check_backward<float>(kWideRows, true, 13);
  check_backward<float>(kFewOddRows, true, 14);
  check_backward<float>(kWideRowsManyPerWarp, false, 15);
  check_backward<float>(kOddRowsManyPerWarp, true, 16);
  check_backward<float>(kUnrolledPartialGroups, true, 17);
  check_backward<float>(kUnrolledOdd, false, 18);
}

TEST(RmsNormCuda, BackwardBf16) {
  MF_REQUIRE_GPU();
  check_backward<bf16>({600, 128}, false, 20);
  check_backward<bf16>({37, 64}, false, 21);
  check_backward<bf16>({9, 30}, true, 22);
  check_backward<bf16>(kHeadRowsManyPerWarp, true, 23);
  check_backward<bf16>(kOddRowsManyPerWarp, false, 24);
  check_backward<bf16>(kUnrolledPartialGroups, false, 25);
  check_backward<bf16>(kUnrolledOdd, true, 26);
}

TEST(RmsNormCuda, BackwardTwoPassForWideRows) {
  MF_REQUIRE_GPU();
  check_backward<float>(kTooWide, true, 30);
  check_backward<float>(kTooWideOdd, false, 31);
  check_backward<bf16>(kTooWide, false, 32);
  check_backward<bf16>(kTooWideOdd, true, 33);
}

// The same inputs twice give the same dweight bits (fixed-order sums, no atomics).
template <typename T>
void check_backward_deterministic(Shape shape, uint64_t seed) {
  const int64_t n = shape.n, c = shape.c;
  SCOPED_TRACE("n=" + std::to_string(n) + " c=" + std::to_string(c));
  const std::vector<float> x = random_rows(n, c, seed);
  const std::vector<float> rstd = testing::random_uniform(n, seed + 1, 0.5, 2.0);
  DeviceBuffer<T> x_dev = upload_as<T>(x);
  DeviceBuffer<T> dout = upload_as<T>(testing::random_normal(n * c, seed + 2));
  DeviceBuffer<float> weight = to_device(testing::random_uniform(c, seed + 3, 0.5, 1.5));
  DeviceBuffer<float> rstd_dev = to_device(rstd);
  const std::vector<float> dweight_start = testing::random_normal(c, seed + 4);
  DeviceBuffer<T> dinp(n * c);
  std::vector<std::vector<float>> dweights;
  for (int run = 0; run < 2; ++run) {
    DeviceBuffer<float> dweight = to_device(dweight_start);
    rmsnorm_backward<T, T, T>(dinp.data(), dweight.data(), dout.data(), x_dev.data(), weight.data(),
                              rstd_dev.data(), n, c, false, nullptr);
    testing::synchronize();
    dweights.push_back(dweight.download());
  }
  testing::expect_equal("dweight", dweights[1], dweights[0]);
}

TEST(RmsNormCuda, BackwardDweightIsDeterministic) {
  MF_REQUIRE_GPU();
  check_backward_deterministic<float>(kWideRowsManyPerWarp, 40);
  check_backward_deterministic<bf16>(kHeadRowsManyPerWarp, 41);
  check_backward_deterministic<bf16>(kOddRowsManyPerWarp, 42);
  check_backward_deterministic<float>(kTooWide, 43);
}

}  // namespace
}  // namespace moeforge::cuda
