// Tests of ops::rmsnorm_forward / rmsnorm_backward against the HF formula and finite differences.
#include "ops/rmsnorm.h"

#include <gtest/gtest.h>

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

constexpr int64_t kN = 5;
constexpr int64_t kC = 7;
constexpr double kEps = 1e-5;

template <typename T>
void check_forward(double atol, double rtol) {
  const auto inp = random_vector(kN * kC, 1);
  const auto weight = random_vector(kC, 2, 2.0);
  const std::vector<T> inp_t(inp.begin(), inp.end());
  const std::vector<T> weight_t(weight.begin(), weight.end());
  std::vector<T> out(kN * kC, std::numeric_limits<T>::quiet_NaN());
  std::vector<T> rstd(kN, std::numeric_limits<T>::quiet_NaN());
  rmsnorm_forward<T>(out.data(), rstd.data(), inp_t.data(), weight_t.data(), kN, kC, kEps);

  std::vector<double> out_expected(kN * kC);
  std::vector<double> rstd_expected(kN);
  for (int64_t row = 0; row < kN; ++row) {
    double mean_sq = 0.0;
    for (int64_t j = 0; j < kC; ++j) mean_sq += inp[row * kC + j] * inp[row * kC + j] / kC;
    rstd_expected[row] = 1.0 / std::sqrt(mean_sq + kEps);
    for (int64_t j = 0; j < kC; ++j) {
      out_expected[row * kC + j] = inp[row * kC + j] * rstd_expected[row] * weight[j];
    }
  }
  expect_close(std::vector<double>(out.begin(), out.end()), out_expected, atol, rtol, "out");
  expect_close(std::vector<double>(rstd.begin(), rstd.end()), rstd_expected, atol, rtol, "rstd");
}

TEST(RmsNorm, ForwardMatchesFormula) {
  check_forward<double>(1e-14, 1e-14);
  check_forward<float>(1e-6, 1e-6);
}

TEST(RmsNorm, EpsGuardsAZeroRow) {
  const std::vector<double> inp(kC, 0.0);
  const std::vector<double> weight(kC, 1.0);
  std::vector<double> out(kC);
  double rstd = 0.0;
  rmsnorm_forward<double>(out.data(), &rstd, inp.data(), weight.data(), 1, kC, kEps);
  EXPECT_DOUBLE_EQ(rstd, 1.0 / std::sqrt(kEps));
  for (double y : out) EXPECT_EQ(y, 0.0);
}

TEST(RmsNorm, GradientsMatchFiniteDifferences) {
  auto inp = random_vector(kN * kC, 3);
  auto weight = random_vector(kC, 4, 2.0);
  const auto r = random_vector(kN * kC, 5);
  std::vector<double> out(kN * kC);
  std::vector<double> rstd(kN);
  auto loss = [&]() {
    rmsnorm_forward<double>(out.data(), rstd.data(), inp.data(), weight.data(), kN, kC, kEps);
    double sum = 0.0;
    for (size_t i = 0; i < out.size(); ++i) sum += out[i] * r[i];
    return sum;
  };
  loss();
  std::vector<double> dinp(kN * kC);
  std::vector<double> dweight(kC, 0.0);
  rmsnorm_backward<double>(dinp.data(), dweight.data(), r.data(), inp.data(), weight.data(),
                           rstd.data(), kN, kC);
  expect_close(dinp, numerical_gradient(inp, loss), 1e-7, 1e-6, "dinp");
  expect_close(dweight, numerical_gradient(weight, loss), 1e-7, 1e-6, "dweight");
}

TEST(RmsNorm, WeightGradientAccumulatesInputGradientAssigns) {
  const auto inp = random_vector(kN * kC, 6);
  const auto weight = random_vector(kC, 7);
  const auto dout = random_vector(kN * kC, 8);
  std::vector<double> out(kN * kC);
  std::vector<double> rstd(kN);
  rmsnorm_forward<double>(out.data(), rstd.data(), inp.data(), weight.data(), kN, kC, kEps);
  std::vector<double> dinp_ref(kN * kC);
  std::vector<double> dweight_ref(kC, 0.0);
  rmsnorm_backward<double>(dinp_ref.data(), dweight_ref.data(), dout.data(), inp.data(),
                           weight.data(), rstd.data(), kN, kC);

  const auto dweight_init = random_vector(kC, 9);
  std::vector<double> dinp(kN * kC, 1e30);
  std::vector<double> dweight = dweight_init;
  for (int call = 0; call < 2; ++call) {
    rmsnorm_backward<double>(dinp.data(), dweight.data(), dout.data(), inp.data(), weight.data(),
                             rstd.data(), kN, kC);
  }
  std::vector<double> dweight_expected(kC);
  for (int64_t j = 0; j < kC; ++j) dweight_expected[j] = dweight_init[j] + 2.0 * dweight_ref[j];
  expect_close(dinp, dinp_ref, 0.0, 0.0, "dinp");
  expect_close(dweight, dweight_expected, 1e-14, 0.0, "dweight");
}

TEST(RmsNorm, InvalidArgumentsThrow) {
  std::vector<double> buf(kC);
  EXPECT_THROW(rmsnorm_forward<double>(buf.data(), buf.data(), buf.data(), buf.data(), 1, 0, kEps),
               Error);
  EXPECT_THROW(rmsnorm_forward<double>(buf.data(), buf.data(), buf.data(), buf.data(), 1, kC, -1.0),
               Error);
}

}  // namespace
}  // namespace moeforge::ops
