// Tests of the dense SwiGLU FFN: forward against a direct formula, backward against finite
// differences, and weight gradients that accumulate.
#include "model/dense_ffn.h"

#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "testing/gradcheck.h"

namespace moeforge {
namespace {

constexpr int64_t kTokens = 3;
constexpr int64_t kHidden = 4;
constexpr int64_t kFfn = 5;

struct DenseCase {
  std::vector<double> inp = testing::random_vector(kTokens * kHidden, 1);
  std::vector<double> gate = testing::random_vector(kFfn * kHidden, 2, 0.7);
  std::vector<double> up = testing::random_vector(kFfn * kHidden, 3, 0.7);
  std::vector<double> down = testing::random_vector(kHidden * kFfn, 4, 0.7);

  std::vector<double> forward(DenseFfnSaved<double>& saved) const {
    std::vector<double> out(kTokens * kHidden);
    dense_ffn_forward<double>(out.data(), saved, inp.data(), gate.data(), up.data(), down.data(),
                              kTokens, kHidden, kFfn);
    return out;
  }
};

TEST(DenseFfn, ForwardMatchesTheFormula) {
  const DenseCase c;
  DenseFfnSaved<double> saved;
  const std::vector<double> out = c.forward(saved);
  for (int64_t t = 0; t < kTokens; ++t) {
    std::vector<double> act(kFfn);
    for (int64_t f = 0; f < kFfn; ++f) {
      double g = 0.0, u = 0.0;
      for (int64_t i = 0; i < kHidden; ++i) {
        g += c.inp[t * kHidden + i] * c.gate[f * kHidden + i];
        u += c.inp[t * kHidden + i] * c.up[f * kHidden + i];
      }
      act[f] = g / (1.0 + std::exp(-g)) * u;
    }
    for (int64_t o = 0; o < kHidden; ++o) {
      double expected = 0.0;
      for (int64_t f = 0; f < kFfn; ++f) expected += act[f] * c.down[o * kFfn + f];
      EXPECT_NEAR(out[t * kHidden + o], expected, 1e-14) << "token " << t << " out " << o;
    }
  }
}

TEST(DenseFfn, BackwardMatchesFiniteDifferences) {
  DenseCase c;
  const std::vector<double> r = testing::random_vector(kTokens * kHidden, 5);
  const auto loss = [&] {
    DenseFfnSaved<double> saved;
    const std::vector<double> out = c.forward(saved);
    double l = 0.0;
    for (size_t i = 0; i < out.size(); ++i) l += out[i] * r[i];
    return l;
  };
  DenseFfnSaved<double> saved;
  c.forward(saved);
  // Weight gradients start from a non-zero value to check that they accumulate.
  std::vector<double> dinp(c.inp.size(), 99.0);
  std::vector<double> dgate(c.gate.size(), 1.0), dup(c.up.size(), 1.0), ddown(c.down.size(), 1.0);
  dense_ffn_backward<double>(dinp.data(), dgate.data(), dup.data(), ddown.data(), r.data(),
                             c.inp.data(), saved, c.gate.data(), c.up.data(), c.down.data(),
                             kTokens, kHidden, kFfn);
  for (auto* grad : {&dgate, &dup, &ddown}) {
    for (auto& g : *grad) g -= 1.0;
  }
  testing::expect_close(dinp, testing::numerical_gradient(c.inp, loss), 1e-8, 1e-6, "dinp");
  testing::expect_close(dgate, testing::numerical_gradient(c.gate, loss), 1e-8, 1e-6, "dgate");
  testing::expect_close(dup, testing::numerical_gradient(c.up, loss), 1e-8, 1e-6, "dup");
  testing::expect_close(ddown, testing::numerical_gradient(c.down, loss), 1e-8, 1e-6, "ddown");
}

}  // namespace
}  // namespace moeforge
