// Tests of ops::swiglu_forward / swiglu_backward: formula, extreme gates, finite differences.
#include "ops/swiglu.h"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <vector>

#include "testing/gradcheck.h"

namespace moeforge::ops {
namespace {

using testing::expect_close;
using testing::numerical_gradient;
using testing::random_vector;

constexpr int64_t kLen = 29;

template <typename T>
void check_forward(double atol, double rtol) {
  const auto gate = random_vector(kLen, 1, 6.0);
  const auto up = random_vector(kLen, 2);
  const std::vector<T> gate_t(gate.begin(), gate.end());
  const std::vector<T> up_t(up.begin(), up.end());
  std::vector<T> out(kLen, std::numeric_limits<T>::quiet_NaN());
  swiglu_forward<T>(out.data(), gate_t.data(), up_t.data(), kLen);
  std::vector<double> expected(kLen);
  for (int64_t i = 0; i < kLen; ++i) expected[i] = gate[i] / (1.0 + std::exp(-gate[i])) * up[i];
  expect_close(std::vector<double>(out.begin(), out.end()), expected, atol, rtol, "out");
}

TEST(SwiGlu, ForwardMatchesFormula) {
  check_forward<double>(1e-15, 1e-14);
  check_forward<float>(1e-6, 1e-6);
}

template <typename T>
void check_extreme_gates() {
  const std::vector<T> gate = {T(-1000), T(-100), T(100), T(1000)};
  const std::vector<T> up = {T(2), T(2), T(2), T(2)};
  const std::vector<T> dout = {T(1), T(1), T(1), T(1)};
  const int64_t n = static_cast<int64_t>(gate.size());
  std::vector<T> out(n);
  swiglu_forward<T>(out.data(), gate.data(), up.data(), n);
  std::vector<T> dgate(n);
  std::vector<T> dup(n);
  swiglu_backward<T>(dgate.data(), dup.data(), dout.data(), gate.data(), up.data(), n);
  for (int64_t i = 0; i < n; ++i) {
    ASSERT_TRUE(std::isfinite(out[i]) && std::isfinite(dgate[i]) && std::isfinite(dup[i]))
        << "gate " << gate[i];
  }
  EXPECT_NEAR(out[0], T(0), T(1e-30));
  EXPECT_FLOAT_EQ(out[3], T(2000));
  EXPECT_FLOAT_EQ(dgate[3], T(2));
  EXPECT_FLOAT_EQ(dup[3], T(1000));
  EXPECT_NEAR(dgate[0], T(0), T(1e-30));
}

TEST(SwiGlu, ExtremeGatesStayFinite) {
  check_extreme_gates<float>();
  check_extreme_gates<double>();
}

TEST(SwiGlu, GradientsMatchFiniteDifferences) {
  auto gate = random_vector(kLen, 3, 6.0);
  auto up = random_vector(kLen, 4);
  const auto r = random_vector(kLen, 5);
  std::vector<double> out(kLen);
  auto loss = [&]() {
    swiglu_forward<double>(out.data(), gate.data(), up.data(), kLen);
    double sum = 0.0;
    for (int64_t i = 0; i < kLen; ++i) sum += out[i] * r[i];
    return sum;
  };
  std::vector<double> dgate(kLen, std::numeric_limits<double>::quiet_NaN());
  std::vector<double> dup(kLen, std::numeric_limits<double>::quiet_NaN());
  swiglu_backward<double>(dgate.data(), dup.data(), r.data(), gate.data(), up.data(), kLen);
  expect_close(dgate, numerical_gradient(gate, loss), 1e-7, 1e-6, "dgate");
  expect_close(dup, numerical_gradient(up, loss), 1e-7, 1e-6, "dup");
}

}  // namespace
}  // namespace moeforge::ops
