// Reductions and elementwise helpers on the GPU: sum and sum_squares in double against fp64 and
// bit for bit from run to run, column_sum_accumulate against fp64 (accumulating into a nonzero
// dbias, deterministic), and add_bias, the casts, scaling and addition exactly equal to the
// host's arithmetic.
#include "cuda/reductions.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <iterator>
#include <limits>
#include <string>
#include <vector>

#include "gpu_test_util.h"

namespace moeforge::cuda {
namespace {

using testing::expect_close;
using testing::expect_equal;
using testing::kFloatEps;
using testing::to_device;
using testing::to_double;

constexpr int64_t kCounts[] = {1, 37, 1000, 1000003, (int64_t{1} << 21) + 7};

TEST(ReductionsCuda, SumAndSumSquaresInDoubleAreDeterministic) {
  MF_REQUIRE_GPU();
  uint64_t seed = 1;
  for (const int64_t count : kCounts) {
    SCOPED_TRACE("count=" + std::to_string(count));
    // A nonzero mean so that the plain sum is not dominated by cancellation.
    std::vector<float> x = testing::random_normal(count, seed++, 3.0);
    for (float& v : x) v += 0.5f;
    double sum_ref = 0.0, sum_sq_ref = 0.0, abs_sum = 0.0;
    for (const float v : x) {
      sum_ref += v;
      sum_sq_ref += static_cast<double>(v) * v;
      abs_sum += std::abs(v);
    }
    DeviceBuffer<float> x_dev = to_device(x);
    DeviceBuffer<double> scratch(std::max<int64_t>(reduction_scratch_doubles(count), 1));
    DeviceBuffer<double> out(4);
    testing::fill_garbage(out);
    sum(out.data(), x_dev.data(), count, scratch.data(), nullptr);
    sum_squares(out.data() + 1, x_dev.data(), count, scratch.data(), nullptr);
    sum(out.data() + 2, x_dev.data(), count, scratch.data(), nullptr);
    sum_squares(out.data() + 3, x_dev.data(), count, scratch.data(), nullptr);
    testing::synchronize();
    const std::vector<double> got = out.download();
    // Terms (and squares of floats) are exact in double; count roundings of 2^-53.
    const double eps = std::ldexp(1.0, -53) * static_cast<double>(count + 2);
    expect_close("sum", {got[0]}, {sum_ref}, eps * abs_sum);
    expect_close("sum_squares", {got[1]}, {sum_sq_ref}, eps * sum_sq_ref);
    expect_equal("sum of two runs", std::vector<double>{got[2]}, std::vector<double>{got[0]});
    expect_equal("sum_squares of two runs", std::vector<double>{got[3]},
                 std::vector<double>{got[1]});
  }
}

TEST(ReductionsCuda, ColumnSumAccumulatesDeterministically) {
  MF_REQUIRE_GPU();
  struct Shape {
    int64_t n, c;
  };
  uint64_t seed = 100;
  for (const Shape shape : {Shape{37, 100}, Shape{4096, 384}, Shape{1, 1}, Shape{1000, 2048}}) {
    SCOPED_TRACE("n=" + std::to_string(shape.n) + " c=" + std::to_string(shape.c));
    const std::vector<bf16> dy = to_bf16(testing::random_normal(shape.n * shape.c, seed++));
    const std::vector<float> dbias_start = testing::random_normal(shape.c, seed++);
    const std::vector<double> dy_d = to_double(dy);
    std::vector<double> dbias_ref = to_double(dbias_start), noise(shape.c);
    for (int64_t j = 0; j < shape.c; ++j) noise[j] = std::abs(dbias_start[j]);
    for (int64_t i = 0; i < shape.n; ++i) {
      for (int64_t j = 0; j < shape.c; ++j) {
        dbias_ref[j] += dy_d[i * shape.c + j];
        noise[j] += std::abs(dy_d[i * shape.c + j]);
      }
    }
    for (double& v : noise) v *= (shape.n + 2) * kFloatEps;

    DeviceBuffer<bf16> dy_dev = to_device(dy);
    std::vector<std::vector<float>> results;
    for (int run = 0; run < 2; ++run) {
      DeviceBuffer<float> dbias = to_device(dbias_start);
      column_sum_accumulate(dbias.data(), dy_dev.data(), shape.n, shape.c, nullptr);
      testing::synchronize();
      results.push_back(dbias.download());
    }
    expect_close("dbias", to_double(results[0]), dbias_ref, noise);
    expect_equal("dbias of two runs", results[1], results[0]);
  }
}

TEST(ReductionsCuda, AddBiasRoundsTheFp32SumOnce) {
  MF_REQUIRE_GPU();
  struct Shape {
    int64_t n, c;
  };
  uint64_t seed = 150;
  for (const Shape shape : {Shape{37, 100}, Shape{1, 1}, Shape{257, 1000}}) {
    SCOPED_TRACE("n=" + std::to_string(shape.n) + " c=" + std::to_string(shape.c));
    const std::vector<bf16> y = to_bf16(testing::random_normal(shape.n * shape.c, seed++));
    const std::vector<float> bias = testing::random_normal(shape.c, seed++);
    const std::vector<float> y_f = to_float(y);
    std::vector<float> expected(y.size());
    for (int64_t i = 0; i < shape.n * shape.c; ++i) expected[i] = y_f[i] + bias[i % shape.c];
    DeviceBuffer<bf16> y_dev = to_device(y);
    DeviceBuffer<float> bias_dev = to_device(bias);
    add_bias(y_dev.data(), bias_dev.data(), shape.n, shape.c, nullptr);
    testing::synchronize();
    expect_equal("y", y_dev.download(), to_bf16(expected));
  }
}

// Random values over many binades, exact bf16 ties, signed zeros and infinities.
std::vector<float> cast_inputs(int64_t count, uint64_t seed) {
  std::vector<float> x = testing::random_normal(count, seed);
  Rng rng(seed + 1);
  for (int64_t i = 0; i < count; ++i) {
    x[i] = static_cast<float>(std::ldexp(x[i], static_cast<int>(rng.below(60)) - 30));
    if (i % 5 == 1) {  // halfway between two bf16 values: sign, normal exponent, 7 bits, tie
      const uint32_t sign = static_cast<uint32_t>(rng.below(2)) << 31;
      const uint32_t exponent = static_cast<uint32_t>(1 + rng.below(253)) << 23;
      const uint32_t mantissa = static_cast<uint32_t>(rng.below(128)) << 16;
      x[i] = std::bit_cast<float>(sign | exponent | mantissa | 0x8000u);
    }
  }
  const float specials[] = {0.0f,
                            -0.0f,
                            std::numeric_limits<float>::infinity(),
                            -std::numeric_limits<float>::infinity(),
                            1.00390625f,
                            1.01171875f};
  for (size_t i = 0; i < std::size(specials) && static_cast<int64_t>(i) < count; ++i) {
    x[i] = specials[i];
  }
  return x;
}

TEST(ReductionsCuda, CastsAreExact) {
  MF_REQUIRE_GPU();
  uint64_t seed = 200;
  for (const int64_t count : {int64_t{1}, int64_t{37}, int64_t{1000003}}) {
    SCOPED_TRACE("count=" + std::to_string(count));
    const std::vector<float> x = cast_inputs(count, seed++);
    DeviceBuffer<float> x_dev = to_device(x);
    DeviceBuffer<bf16> rounded(count);
    testing::fill_garbage(rounded);
    cast_to_bf16(rounded.data(), x_dev.data(), count, nullptr);
    testing::synchronize();
    expect_equal("cast_to_bf16", rounded.download(), to_bf16(x));

    const std::vector<bf16> halves = to_bf16(x);
    DeviceBuffer<bf16> halves_dev = to_device(halves);
    DeviceBuffer<float> widened(count);
    testing::fill_garbage(widened);
    cast_to_float(widened.data(), halves_dev.data(), count, nullptr);
    testing::synchronize();
    expect_equal("cast_to_float", widened.download(), to_float(halves));
  }
}

TEST(ReductionsCuda, ScaleAndAddInPlaceAreExact) {
  MF_REQUIRE_GPU();
  uint64_t seed = 300;
  for (const int64_t count : {int64_t{1}, int64_t{37}, int64_t{1000003}}) {
    SCOPED_TRACE("count=" + std::to_string(count));
    const std::vector<float> x = testing::random_normal(count, seed++);
    const std::vector<float> y = testing::random_normal(count, seed++);
    const float factor = 0.3712f;
    std::vector<float> scaled(count), added(count);
    for (int64_t i = 0; i < count; ++i) {
      scaled[i] = x[i] * factor;
      added[i] = y[i] + x[i];
    }
    DeviceBuffer<float> x_dev = to_device(x), y_dev = to_device(y);
    add_inplace(y_dev.data(), x_dev.data(), count, nullptr);
    scale_inplace(x_dev.data(), factor, count, nullptr);
    testing::synchronize();
    expect_equal("add_inplace", y_dev.download(), added);
    expect_equal("scale_inplace", x_dev.download(), scaled);
  }
}

}  // namespace
}  // namespace moeforge::cuda
