// The grouped expert GEMMs, every compiled configuration, against double-precision products of the
// same bf16 values, per expert: row counts that are zero, one, below and above a tile, feature
// sizes that are multiples of 8 but not of the tiles. Also the MOEFORGE_GROUPED_GEMM choice. Bounds
// as in blas_test.cpp: (k + 4) * 2^-23 * sum |a| |b| (+ |C| when accumulating), plus one bf16 ulp
// for bf16 outputs; an expert with no rows leaves dW bit-exact.
#include "cuda/grouped_gemm.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <numeric>
#include <string>
#include <vector>

#include "core/error.h"
#include "gpu_test_util.h"

namespace moeforge::cuda {
namespace {

using testing::download_double;
using testing::expect_close;
using testing::to_device;
using testing::to_double;

struct Problem {
  ExpertGemmShape shape;
  std::vector<int32_t> offsets;  // [E + 1]
  int64_t rows() const { return offsets.back(); }
};

Problem make_problem(int64_t in, int64_t out, const std::vector<int32_t>& counts) {
  Problem p{{static_cast<int64_t>(counts.size()), in, out}, {0}};
  for (int32_t c : counts) p.offsets.push_back(p.offsets.back() + c);
  return p;
}

std::vector<bf16> random_bf16(size_t count, uint64_t seed, double scale) {
  return to_bf16(testing::random_normal(count, seed, scale));
}

// For each expert e and row r of it: out[r, j] = sum_p a(r, p) b(e, p, j), with the accessors
// giving the operands in double; magnitude gets sum |a| |b|.
template <typename A, typename B>
void expert_products(const Problem& p, int64_t n, int64_t k, A a, B b, std::vector<double>& out,
                     std::vector<double>& magnitude) {
  out.assign(static_cast<size_t>(p.rows() * n), 0.0);
  magnitude.assign(out.size(), 0.0);
  for (int64_t e = 0; e < p.shape.num_experts; ++e) {
    for (int64_t r = p.offsets[e]; r < p.offsets[e + 1]; ++r) {
      for (int64_t j = 0; j < n; ++j) {
        double sum = 0.0, mag = 0.0;
        for (int64_t q = 0; q < k; ++q) {
          const double term = a(r, q) * b(e, q, j);
          sum += term;
          mag += std::abs(term);
        }
        out[r * n + j] = sum;
        magnitude[r * n + j] = mag;
      }
    }
  }
}

class GroupedGemmTest : public ::testing::TestWithParam<GroupedGemmKernel> {
 protected:
  void SetUp() override {
    MF_REQUIRE_GPU();
    gemm_ = std::make_unique<GroupedGemm>(GroupedGemmKernels{GetParam(), GetParam(), GetParam()});
    if (!gemm_->available(problem_.shape)) {
      // The GPU machine is an H200: there the grouped kernels must run.
      if (testing::gpu_expected()) FAIL() << "grouped GEMM unavailable on the expected GPU";
      GTEST_SKIP() << "grouped GEMM needs an sm_90 device and an sm_90a build";
    }
  }

  // in 136 and out 264: multiples of 8, not of the 64/128/256 tiles. Rows: 0, 1, 130, 257, 63.
  Problem problem_ = make_problem(136, 264, {0, 1, 130, 257, 63});
  std::unique_ptr<GroupedGemm> gemm_;
};

TEST_P(GroupedGemmTest, ForwardMatchesPerExpertProducts) {
  const int64_t in = problem_.shape.in, out = problem_.shape.out, rows = problem_.rows();
  const auto x = random_bf16(rows * in, 1, 1.0);
  const auto w = random_bf16(problem_.shape.num_experts * out * in, 2, 0.1);
  const auto xd = to_double(x), wd = to_double(w);
  DeviceBuffer<bf16> x_dev = to_device(x), w_dev = to_device(w), y_dev(rows * out);
  DeviceBuffer<int32_t> offsets = to_device(problem_.offsets);
  testing::fill_garbage(y_dev);
  gemm_->forward(y_dev.data(), x_dev.data(), w_dev.data(), offsets.data(), problem_.shape, nullptr);
  std::vector<double> reference, magnitude;
  expert_products(
      problem_, out, in, [&](int64_t r, int64_t q) { return xd[r * in + q]; },
      [&](int64_t e, int64_t q, int64_t j) { return wd[(e * out + j) * in + q]; }, reference,
      magnitude);
  std::vector<double> noise(magnitude.size());
  for (size_t i = 0; i < noise.size(); ++i) noise[i] = (in + 4) * 0x1.0p-23 * magnitude[i];
  expect_close("grouped forward", download_double(y_dev), reference,
               testing::bf16_bound(reference, noise));
}

TEST_P(GroupedGemmTest, BackwardInputAssignsAndAccumulates) {
  const int64_t in = problem_.shape.in, out = problem_.shape.out, rows = problem_.rows();
  const auto dy = random_bf16(rows * out, 3, 1.0);
  const auto w = random_bf16(problem_.shape.num_experts * out * in, 4, 0.1);
  const auto start = random_bf16(rows * in, 5, 1.0);
  const auto dyd = to_double(dy), wd = to_double(w), startd = to_double(start);
  DeviceBuffer<bf16> dy_dev = to_device(dy), w_dev = to_device(w), dx_dev(rows * in);
  DeviceBuffer<int32_t> offsets = to_device(problem_.offsets);
  std::vector<double> reference, magnitude;
  expert_products(
      problem_, in, out, [&](int64_t r, int64_t q) { return dyd[r * out + q]; },
      [&](int64_t e, int64_t q, int64_t j) { return wd[(e * out + q) * in + j]; }, reference,
      magnitude);
  for (const bool accumulate : {false, true}) {
    SCOPED_TRACE(accumulate ? "accumulate" : "assign");
    if (accumulate) {
      dx_dev.upload(start);
    } else {
      testing::fill_garbage(dx_dev);
    }
    gemm_->backward_input(dx_dev.data(), dy_dev.data(), w_dev.data(), offsets.data(),
                          problem_.shape, accumulate, nullptr);
    std::vector<double> expected = reference, noise(magnitude.size());
    for (size_t i = 0; i < noise.size(); ++i) {
      const double c = accumulate ? startd[i] : 0.0;
      expected[i] += c;
      noise[i] = (out + 4) * 0x1.0p-23 * (magnitude[i] + std::abs(c));
    }
    expect_close("grouped backward input", download_double(dx_dev), expected,
                 testing::bf16_bound(expected, noise));
  }
}

// Accumulating: dW += dy^T x, an expert without rows keeps its gradient exactly. Assigning (the
// first micro-batch, no zeroing beforehand): dW = dy^T x over a NaN-filled buffer, an expert
// without rows gets exact zeros.
TEST_P(GroupedGemmTest, BackwardWeightAssignsAndAccumulates) {
  const int64_t in = problem_.shape.in, out = problem_.shape.out, rows = problem_.rows();
  const int64_t num_experts = problem_.shape.num_experts;
  const auto dy = random_bf16(rows * out, 6, 1.0);
  const auto x = random_bf16(rows * in, 7, 1.0);
  const auto start = testing::random_normal(num_experts * out * in, 8, 1.0);
  const auto dyd = to_double(dy), xd = to_double(x);
  DeviceBuffer<bf16> dy_dev = to_device(dy), x_dev = to_device(x);
  DeviceBuffer<float> dw_dev(start.size());
  DeviceBuffer<int32_t> offsets = to_device(problem_.offsets);
  for (const bool accumulate : {true, false}) {
    SCOPED_TRACE(accumulate ? "accumulate" : "assign");
    if (accumulate) {
      dw_dev.upload(start);
    } else {
      testing::fill_garbage(dw_dev);
    }
    gemm_->backward_weight(dw_dev.data(), dy_dev.data(), x_dev.data(), offsets.data(),
                           problem_.shape, accumulate, nullptr);
    std::vector<double> expected(start.size()), bound(start.size());
    for (int64_t e = 0; e < num_experts; ++e) {
      const int64_t begin = problem_.offsets[e], count = problem_.offsets[e + 1] - begin;
      for (int64_t o = 0; o < out; ++o) {
        for (int64_t i = 0; i < in; ++i) {
          const size_t idx = static_cast<size_t>((e * out + o) * in + i);
          const double c = accumulate ? start[idx] : 0.0;
          double sum = c, mag = std::abs(c);
          for (int64_t r = begin; r < begin + count; ++r) {
            const double term = dyd[r * out + o] * xd[r * in + i];
            sum += term;
            mag += std::abs(term);
          }
          expected[idx] = sum;
          bound[idx] = count == 0 ? 0.0 : (count + 4) * 0x1.0p-23 * mag;
        }
      }
    }
    expect_close("grouped backward weight", download_double(dw_dev), expected, bound);
  }
}

// The bench config's projection on imbalanced experts (16 experts, 2048 x 2048 weights) against a
// spot check of rows: the tile scheduler over many groups and full-size tiles.
TEST_P(GroupedGemmTest, ForwardAtBenchSizeSpotChecks) {
  const int64_t in = 2048, out = 2048;
  std::vector<int32_t> counts;
  for (int32_t e = 0; e < 16; ++e) counts.push_back(e == 3 ? 0 : 97 + 61 * e);
  const Problem p = make_problem(in, out, counts);
  const int64_t rows = p.rows();
  const auto x = random_bf16(rows * in, 9, 1.0);
  const auto w = random_bf16(16 * out * in, 10, 0.02);
  DeviceBuffer<bf16> x_dev = to_device(x), w_dev = to_device(w), y_dev(rows * out);
  DeviceBuffer<int32_t> offsets = to_device(p.offsets);
  testing::fill_garbage(y_dev);
  gemm_->forward(y_dev.data(), x_dev.data(), w_dev.data(), offsets.data(), p.shape, nullptr);
  const auto y = download_double(y_dev);
  // Every row was written (the buffer started as NaN).
  EXPECT_TRUE(std::all_of(y.begin(), y.end(), [](double v) { return std::isfinite(v); }));
  const auto xd = to_double(x), wd = to_double(w);
  std::vector<double> got, reference, bound;
  for (int64_t e = 0; e < 16; ++e) {
    if (p.offsets[e + 1] == p.offsets[e]) continue;
    for (const int64_t r : {int64_t{p.offsets[e]}, int64_t{p.offsets[e + 1]} - 1}) {
      for (int64_t j = 0; j < out; j += 37) {
        double sum = 0.0, mag = 0.0;
        for (int64_t q = 0; q < in; ++q) {
          const double term = xd[r * in + q] * wd[(e * out + j) * in + q];
          sum += term;
          mag += std::abs(term);
        }
        got.push_back(y[r * out + j]);
        reference.push_back(sum);
        bound.push_back(testing::bf16_ulp(sum) + (in + 4) * 0x1.0p-23 * mag);
      }
    }
  }
  expect_close("grouped forward, bench size", got, reference, bound);
}

INSTANTIATE_TEST_SUITE_P(AllKernels, GroupedGemmTest, ::testing::ValuesIn(kGroupedGemmKernels),
                         [](const ::testing::TestParamInfo<GroupedGemmKernel>& info) {
                           return std::string(grouped_gemm_kernel_name(info.param));
                         });

// Sets MOEFORGE_GROUPED_GEMM for one scope.
class ScopedKernelEnv {
 public:
  explicit ScopedKernelEnv(const char* value) { setenv("MOEFORGE_GROUPED_GEMM", value, 1); }
  ~ScopedKernelEnv() { unsetenv("MOEFORGE_GROUPED_GEMM"); }
};

TEST(GroupedGemmKernels, NamesRoundTrip) {
  for (const GroupedGemmKernel kernel : kGroupedGemmKernels) {
    EXPECT_EQ(parse_grouped_gemm_kernel(grouped_gemm_kernel_name(kernel)), kernel);
  }
  EXPECT_FALSE(parse_grouped_gemm_kernel("cooperative").has_value());
}

TEST(GroupedGemmKernels, EnvironmentPicksOneOrThreeKernels) {
  const GroupedGemmKernels defaults;
  {
    const GroupedGemmKernels k = grouped_gemm_kernels_from_env();
    EXPECT_EQ(k.forward, defaults.forward);
    EXPECT_EQ(k.backward_input, defaults.backward_input);
    EXPECT_EQ(k.backward_weight, defaults.backward_weight);
  }
  {
    const ScopedKernelEnv env("0");
    EXPECT_EQ(grouped_gemm_kernels_from_env().backward_weight, defaults.backward_weight);
  }
  {
    const ScopedKernelEnv env("cooperative_256x128");
    const GroupedGemmKernels k = grouped_gemm_kernels_from_env();
    EXPECT_EQ(k.forward, GroupedGemmKernel::kCooperative256x128);
    EXPECT_EQ(k.backward_input, GroupedGemmKernel::kCooperative256x128);
    EXPECT_EQ(k.backward_weight, GroupedGemmKernel::kCooperative256x128);
  }
  {
    const ScopedKernelEnv env("cooperative_128x256_cluster2,cooperative_256x128,pingpong_128x128");
    const GroupedGemmKernels k = grouped_gemm_kernels_from_env();
    EXPECT_EQ(k.forward, GroupedGemmKernel::kCooperative128x256Cluster2);
    EXPECT_EQ(k.backward_input, GroupedGemmKernel::kCooperative256x128);
    EXPECT_EQ(k.backward_weight, GroupedGemmKernel::kPingpong128x128);
  }
}

TEST(GroupedGemmKernels, EnvironmentRejectsUnknownNamesAndCounts) {
  for (const char* bad : {"pingpong", "cooperative_128x256,pingpong_128x128",
                          "pingpong_128x128,pingpong_128x128,pingpong_128x128,pingpong_128x128",
                          "cooperative_128x256,,pingpong_128x128"}) {
    SCOPED_TRACE(bad);
    const ScopedKernelEnv env(bad);
    EXPECT_THROW(grouped_gemm_kernels_from_env(), Error);
  }
}

}  // namespace
}  // namespace moeforge::cuda
