// Tests of ops::linear_forward / linear_backward against a triple loop and finite differences.
#include "ops/linear.h"

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
constexpr int64_t kOc = 3;

// out[n, oc] = sum_c inp[n, c] * weight[oc, c] + bias[oc], in double.
std::vector<double> naive_linear(const std::vector<double>& inp, const std::vector<double>& weight,
                                 const std::vector<double>* bias) {
  std::vector<double> out(kN * kOc);
  for (int64_t row = 0; row < kN; ++row) {
    for (int64_t o = 0; o < kOc; ++o) {
      double sum = bias != nullptr ? (*bias)[o] : 0.0;
      for (int64_t j = 0; j < kC; ++j) sum += inp[row * kC + j] * weight[o * kC + j];
      out[row * kOc + o] = sum;
    }
  }
  return out;
}

double dot(const std::vector<double>& a, const std::vector<double>& b) {
  double sum = 0.0;
  for (size_t i = 0; i < a.size(); ++i) sum += a[i] * b[i];
  return sum;
}

template <typename T>
void check_forward(bool with_bias, double atol) {
  const auto inp = random_vector(kN * kC, 1);
  const auto weight = random_vector(kOc * kC, 2);
  const auto bias = random_vector(kOc, 3);
  const std::vector<T> inp_t(inp.begin(), inp.end());
  const std::vector<T> weight_t(weight.begin(), weight.end());
  const std::vector<T> bias_t(bias.begin(), bias.end());
  std::vector<T> out(kN * kOc, std::numeric_limits<T>::quiet_NaN());
  linear_forward<T>(out.data(), inp_t.data(), weight_t.data(), with_bias ? bias_t.data() : nullptr,
                    kN, kC, kOc);
  const auto expected = naive_linear(inp, weight, with_bias ? &bias : nullptr);
  expect_close(std::vector<double>(out.begin(), out.end()), expected, atol, 0.0, "out");
}

TEST(Linear, ForwardMatchesTripleLoop) {
  check_forward<double>(true, 1e-14);
  check_forward<double>(false, 1e-14);
  check_forward<float>(true, 1e-5);
  check_forward<float>(false, 1e-5);
}

TEST(Linear, GradientsMatchFiniteDifferences) {
  auto inp = random_vector(kN * kC, 4);
  auto weight = random_vector(kOc * kC, 5);
  auto bias = random_vector(kOc, 6);
  const auto r = random_vector(kN * kOc, 7);
  std::vector<double> out(kN * kOc);
  auto loss = [&]() {
    linear_forward<double>(out.data(), inp.data(), weight.data(), bias.data(), kN, kC, kOc);
    return dot(out, r);
  };
  std::vector<double> dinp(kN * kC);
  std::vector<double> dweight(kOc * kC, 0.0);
  std::vector<double> dbias(kOc, 0.0);
  linear_backward<double>(dinp.data(), dweight.data(), dbias.data(), r.data(), inp.data(),
                          weight.data(), kN, kC, kOc);
  expect_close(dinp, numerical_gradient(inp, loss), 1e-7, 1e-6, "dinp");
  expect_close(dweight, numerical_gradient(weight, loss), 1e-7, 1e-6, "dweight");
  expect_close(dbias, numerical_gradient(bias, loss), 1e-7, 1e-6, "dbias");
}

TEST(Linear, WeightGradientsAccumulateActivationGradientsAssign) {
  const auto inp = random_vector(kN * kC, 8);
  const auto weight = random_vector(kOc * kC, 9);
  const auto dout = random_vector(kN * kOc, 10);
  std::vector<double> dinp_ref(kN * kC);
  std::vector<double> dweight_ref(kOc * kC, 0.0);
  std::vector<double> dbias_ref(kOc, 0.0);
  linear_backward<double>(dinp_ref.data(), dweight_ref.data(), dbias_ref.data(), dout.data(),
                          inp.data(), weight.data(), kN, kC, kOc);

  const auto dweight_init = random_vector(kOc * kC, 11);
  const auto dbias_init = random_vector(kOc, 12);
  std::vector<double> dinp(kN * kC, 1e30);
  std::vector<double> dweight = dweight_init;
  std::vector<double> dbias = dbias_init;
  for (int call = 0; call < 2; ++call) {
    linear_backward<double>(dinp.data(), dweight.data(), dbias.data(), dout.data(), inp.data(),
                            weight.data(), kN, kC, kOc);
  }
  std::vector<double> dweight_expected(kOc * kC);
  for (size_t i = 0; i < dweight_expected.size(); ++i) {
    dweight_expected[i] = dweight_init[i] + 2.0 * dweight_ref[i];
  }
  std::vector<double> dbias_expected(kOc);
  for (size_t i = 0; i < dbias_expected.size(); ++i) {
    dbias_expected[i] = dbias_init[i] + 2.0 * dbias_ref[i];
  }
  expect_close(dinp, dinp_ref, 1e-14, 0.0, "dinp");
  expect_close(dweight, dweight_expected, 1e-13, 0.0, "dweight");
  expect_close(dbias, dbias_expected, 1e-13, 0.0, "dbias");
}

TEST(Linear, NullDinpAndDbiasAreSkipped) {
  const auto inp = random_vector(kN * kC, 13);
  const auto weight = random_vector(kOc * kC, 14);
  const auto dout = random_vector(kN * kOc, 15);
  std::vector<double> dinp(kN * kC);
  std::vector<double> dweight_ref(kOc * kC, 0.0);
  std::vector<double> dbias(kOc, 0.0);
  linear_backward<double>(dinp.data(), dweight_ref.data(), dbias.data(), dout.data(), inp.data(),
                          weight.data(), kN, kC, kOc);
  std::vector<double> dweight(kOc * kC, 0.0);
  linear_backward<double>(nullptr, dweight.data(), nullptr, dout.data(), inp.data(), weight.data(),
                          kN, kC, kOc);
  expect_close(dweight, dweight_ref, 0.0, 0.0, "dweight");
}

TEST(Linear, InvalidDimsThrow) {
  std::vector<double> buf(16);
  EXPECT_THROW(linear_forward<double>(buf.data(), buf.data(), buf.data(), nullptr, 2, 0, 2), Error);
  EXPECT_THROW(linear_forward<double>(buf.data(), buf.data(), buf.data(), nullptr, -1, 2, 2),
               Error);
}

}  // namespace
}  // namespace moeforge::ops
