// Test helpers: central finite differences in double precision and error reporting.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace moeforge::testing {

// Numerical gradient of scalar loss() with respect to every entry of x (x is perturbed in place
// and restored). eps is the central-difference step.
inline std::vector<double> numerical_gradient(std::vector<double>& x,
                                              const std::function<double()>& loss,
                                              double eps = 1e-6) {
  std::vector<double> grad(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    const double saved = x[i];
    x[i] = saved + eps;
    const double plus = loss();
    x[i] = saved - eps;
    const double minus = loss();
    x[i] = saved;
    grad[i] = (plus - minus) / (2 * eps);
  }
  return grad;
}

// Asserts |a - b| <= atol + rtol * |b| elementwise; reports the first mismatches and the max error.
inline void expect_close(const std::vector<double>& actual, const std::vector<double>& expected,
                         double atol, double rtol, const std::string& what) {
  ASSERT_EQ(actual.size(), expected.size()) << what;
  double max_abs = 0.0;
  int reported = 0;
  for (size_t i = 0; i < actual.size(); ++i) {
    ASSERT_TRUE(std::isfinite(actual[i])) << what << "[" << i << "] is not finite";
    const double err = std::abs(actual[i] - expected[i]);
    max_abs = std::max(max_abs, err);
    if (err > atol + rtol * std::abs(expected[i]) && reported < 5) {
      ADD_FAILURE() << what << "[" << i << "]: got " << actual[i] << ", expected " << expected[i]
                    << " (abs err " << err << ")";
      ++reported;
    }
  }
  ::testing::Test::RecordProperty(what + "_max_abs_err", std::to_string(max_abs));
}

// Deterministic pseudo-random doubles in [-scale, scale).
inline std::vector<double> random_vector(size_t n, uint64_t seed, double scale = 1.0) {
  std::vector<double> v(n);
  uint64_t s = seed * 6364136223846793005ull + 1442695040888963407ull;
  for (auto& x : v) {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    x = scale * (static_cast<double>(s >> 11) * 0x1.0p-53 * 2.0 - 1.0);
  }
  return v;
}

}  // namespace moeforge::testing
