// Tests of the MoE router: exact top-k routing and gates, tie breaking, the aux and z losses and a
// finite-difference check of router_backward including both loss terms.
#include "ops/router.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "core/error.h"
#include "testing/gradcheck.h"

namespace moeforge::ops {
namespace {

struct Routed {
  std::vector<float> probs;
  std::vector<int32_t> expert_idx;
  std::vector<float> gates;
};

Routed route(const std::vector<float>& logits, const RouterDims& dims) {
  Routed r;
  r.probs.resize(static_cast<size_t>(dims.num_tokens * dims.num_experts));
  r.expert_idx.resize(static_cast<size_t>(dims.num_tokens * dims.top_k));
  r.gates.resize(r.expert_idx.size());
  router_forward<float>(r.probs.data(), r.expert_idx.data(), r.gates.data(), logits.data(), dims);
  return r;
}

constexpr float kInf = std::numeric_limits<float>::infinity();

TEST(Router, ExactIndicesAndGatesOnHandMadeLogits) {
  // Rows of equal finite logits (and -inf) give exact probabilities 1/m.
  const std::vector<float> logits = {
      0.0f,  -kInf, 0.0f,  0.0f,  // token 0: p = [1/3, 0, 1/3, 1/3]
      -kInf, 2.0f,  -kInf, 2.0f,  // token 1: p = [0, 1/2, 0, 1/2]
      -kInf, -kInf, -kInf, 7.0f,  // token 2: p = [0, 0, 0, 1]
  };
  const float third = static_cast<float>(1.0 / 3.0);
  {
    const Routed r = route(logits, {3, 4, 2, false});
    EXPECT_EQ(r.expert_idx, (std::vector<int32_t>{0, 2, 1, 3, 3, 0}));
    EXPECT_EQ(r.gates, (std::vector<float>{third, third, 0.5f, 0.5f, 1.0f, 0.0f}));
    EXPECT_EQ(r.probs, (std::vector<float>{third, 0, third, third, 0, 0.5f, 0, 0.5f, 0, 0, 0, 1}));
  }
  {
    const Routed r = route(logits, {3, 4, 2, true});
    EXPECT_EQ(r.expert_idx, (std::vector<int32_t>{0, 2, 1, 3, 3, 0}));
    EXPECT_EQ(r.gates, (std::vector<float>{0.5f, 0.5f, 0.5f, 0.5f, 1.0f, 0.0f}));
  }
}

TEST(Router, TiesBreakTowardTheLowerExpertIndex) {
  const std::vector<float> logits = {1.0f, 2.0f, 2.0f, 1.0f};
  EXPECT_EQ(route(logits, {1, 4, 2, false}).expert_idx, (std::vector<int32_t>{1, 2}));
  EXPECT_EQ(route(logits, {1, 4, 3, false}).expert_idx, (std::vector<int32_t>{1, 2, 0}));
  EXPECT_EQ(route(logits, {1, 4, 4, false}).expert_idx, (std::vector<int32_t>{1, 2, 0, 3}));
  const std::vector<float> equal(8, 0.25f);
  EXPECT_EQ(route(equal, {1, 8, 3, false}).expert_idx, (std::vector<int32_t>{0, 1, 2}));
}

TEST(Router, RandomLogitsGiveTheDescendingTopKAndDefinedGates) {
  const RouterDims dims{16, 8, 3, false};
  const std::vector<double> src = testing::random_vector(16 * 8, 7, 3.0);
  const std::vector<float> logits(src.begin(), src.end());
  for (const bool norm : {false, true}) {
    RouterDims d = dims;
    d.norm_topk_prob = norm;
    const Routed r = route(logits, d);
    for (int64_t t = 0; t < d.num_tokens; ++t) {
      // probs against a softmax in long double.
      long double sum = 0;
      for (int64_t e = 0; e < 8; ++e) sum += std::exp(static_cast<long double>(logits[t * 8 + e]));
      for (int64_t e = 0; e < 8; ++e) {
        const double expected = static_cast<double>(std::exp((long double)logits[t * 8 + e]) / sum);
        EXPECT_NEAR(r.probs[t * 8 + e], expected, 1e-7) << "token " << t << " expert " << e;
      }
      // Top-k set and order against a stable sort by descending probability.
      std::vector<int32_t> order(8);
      for (int32_t e = 0; e < 8; ++e) order[e] = e;
      std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) {
        return r.probs[t * 8 + a] > r.probs[t * 8 + b];
      });
      double selected_sum = 0.0;
      for (int64_t j = 0; j < 3; ++j) {
        EXPECT_EQ(r.expert_idx[t * 3 + j], order[j]) << "token " << t << " slot " << j;
        selected_sum += r.probs[t * 8 + order[j]];
      }
      for (int64_t j = 0; j < 3; ++j) {
        const float p = r.probs[t * 8 + order[j]];
        const float expected = norm ? static_cast<float>(p / selected_sum) : p;
        EXPECT_EQ(r.gates[t * 3 + j], expected) << "token " << t << " slot " << j;
      }
    }
  }
}

TEST(Router, ValidatesTopK) {
  const std::vector<float> logits(8, 0.0f);
  std::vector<float> probs(8), gates(8);
  std::vector<int32_t> idx(8);
  EXPECT_THROW(router_forward<float>(probs.data(), idx.data(), gates.data(), logits.data(),
                                     {2, 4, 0, false}),
               Error);
  EXPECT_THROW(router_forward<float>(probs.data(), idx.data(), gates.data(), logits.data(),
                                     {2, 4, 5, false}),
               Error);
}

TEST(Router, NonFiniteLogitsPropagateWithValidRouting) {
  // The NaN must reach the loss (the trainer's guard reports it on all ranks together), and the
  // routing must stay in range so that nothing reads out of bounds on the way.
  const std::vector<float> bad = {0.0f, 1.0f, 2.0f, 3.0f, 0.0f, std::nanf(""), 0.0f, 0.0f};
  std::vector<float> probs(8), gates(4);
  std::vector<int32_t> idx(4);
  router_forward<float>(probs.data(), idx.data(), gates.data(), bad.data(), {2, 4, 2, true});
  EXPECT_EQ(idx[0], 3);  // the finite row routes as usual
  EXPECT_EQ(idx[1], 2);
  EXPECT_TRUE(std::isfinite(gates[0]));
  EXPECT_EQ(idx[2], 0);  // the NaN row takes the lowest indices
  EXPECT_EQ(idx[3], 1);
  EXPECT_TRUE(std::isnan(gates[2]));
  EXPECT_TRUE(std::isnan(gates[3]));
}

TEST(Router, AuxLossIsOneForBalancedOrUniformRouting) {
  // Each token routes to a different expert and the mean probabilities are uniform.
  const std::vector<double> probs = {0.7, 0.1, 0.1, 0.1, 0.1, 0.7, 0.1, 0.1,
                                     0.1, 0.1, 0.7, 0.1, 0.1, 0.1, 0.1, 0.7};
  const std::vector<int32_t> idx = {0, 1, 2, 3};
  EXPECT_NEAR(router_aux_loss<double>(probs.data(), idx.data(), {4, 4, 1, false}), 1.0, 1e-15);
  // Uniform probabilities give 1 whatever the assignment.
  const std::vector<double> uniform(4 * 4, 0.25);
  const std::vector<int32_t> skewed = {0, 1, 0, 2, 0, 3, 0, 1};
  EXPECT_NEAR(router_aux_loss<double>(uniform.data(), skewed.data(), {4, 4, 2, false}), 1.0, 1e-15);
}

TEST(Router, AuxLossHandComputed) {
  // f = [2/4, 1/4, 1/4], P = [0.55, 0.2, 0.25]: aux = 3 * (0.275 + 0.05 + 0.0625) = 1.1625.
  const std::vector<double> probs = {0.5, 0.3, 0.2, 0.6, 0.1, 0.3};
  const std::vector<int32_t> idx = {0, 1, 0, 2};
  EXPECT_NEAR(router_aux_loss<double>(probs.data(), idx.data(), {2, 3, 2, false}), 1.1625, 1e-15);
  // Imbalance raises it: everything on expert 0 gives 3 * 0.55.
  const std::vector<int32_t> all_zero = {0, 0};
  EXPECT_NEAR(router_aux_loss<double>(probs.data(), all_zero.data(), {2, 3, 1, false}), 1.65,
              1e-15);
}

// Balance groups (MegaScale-MoE's per-GPU balance): aux = G * sum_g f_g P_g.
TEST(Router, AuxLossOverBalanceGroupsHandComputed) {
  const std::vector<double> probs = {0.5, 0.3, 0.1, 0.1, 0.4, 0.4, 0.1, 0.1};
  const std::vector<int32_t> idx = {0, 0};
  // Per expert: f = [1, 0, 0, 0], P = [0.45, 0.35, 0.1, 0.1]: 4 * 0.45.
  EXPECT_NEAR(router_aux_loss<double>(probs.data(), idx.data(), {2, 4, 1, false}), 1.8, 1e-15);
  EXPECT_EQ(router_aux_loss<double>(probs.data(), idx.data(), {2, 4, 1, false, 4}),
            router_aux_loss<double>(probs.data(), idx.data(), {2, 4, 1, false}));
  // Two groups {0, 1}, {2, 3}: f = [1, 0], P = [0.8, 0.2]: 2 * 0.8; a group balanced inside does
  // not lower it.
  EXPECT_NEAR(router_aux_loss<double>(probs.data(), idx.data(), {2, 4, 1, false, 2}), 1.6, 1e-15);
  const std::vector<int32_t> inside = {0, 1};
  EXPECT_NEAR(router_aux_loss<double>(probs.data(), inside.data(), {2, 4, 1, false, 2}), 1.6,
              1e-15);
  // Across the groups: f = [0.5, 0.5], P = [0.8, 0.2]: 2 * 0.5.
  const std::vector<int32_t> across = {0, 2};
  EXPECT_NEAR(router_aux_loss<double>(probs.data(), across.data(), {2, 4, 1, false, 2}), 1.0,
              1e-15);
  // One group: the constant 1.
  EXPECT_NEAR(router_aux_loss<double>(probs.data(), idx.data(), {2, 4, 1, false, 1}), 1.0, 1e-15);
  EXPECT_THROW(router_aux_loss<double>(probs.data(), idx.data(), {2, 4, 1, false, 3}), Error);
}

TEST(Router, ZLossMatchesTheDirectFormula) {
  const std::vector<double> logits = testing::random_vector(5 * 6, 3, 2.0);
  double expected = 0.0;
  for (int t = 0; t < 5; ++t) {
    double sum = 0.0;
    for (int e = 0; e < 6; ++e) sum += std::exp(logits[t * 6 + e]);
    expected += std::log(sum) * std::log(sum);
  }
  expected /= 5;
  EXPECT_NEAR(router_z_loss<double>(logits.data(), {5, 6, 2, false}), expected, 1e-13);
  // Large logits do not overflow: lse([1000, 1000]) = 1000 + ln 2.
  const std::vector<float> big = {1000.0f, 1000.0f};
  const double lse = 1000.0 + std::log(2.0);
  EXPECT_NEAR(router_z_loss<float>(big.data(), {1, 2, 1, false}), lse * lse, 1e-9 * lse * lse);
}

// Smallest gap between adjacent probabilities among the top k + 1 of any token: the routing (and
// the slot order) is stable under perturbations far below it.
double top_k_margin(const std::vector<double>& probs, int64_t num_tokens, int64_t num_experts,
                    int64_t top_k) {
  double margin = 1.0;
  for (int64_t t = 0; t < num_tokens; ++t) {
    std::vector<double> p(probs.begin() + t * num_experts, probs.begin() + (t + 1) * num_experts);
    std::sort(p.rbegin(), p.rend());
    const int64_t last = std::min(top_k, num_experts - 1);
    for (int64_t j = 0; j < last; ++j) margin = std::min(margin, p[j] - p[j + 1]);
  }
  return margin;
}

// The router's backward (aux, z and gate terms) against finite differences of its losses.
void check_backward_by_finite_differences(const RouterDims& dims) {
  const bool norm = dims.norm_topk_prob;
  const size_t num_logits = static_cast<size_t>(6 * dims.num_experts);
  std::vector<double> logits = testing::random_vector(num_logits, 11, 2.0);
  std::vector<double> probs(num_logits), gates(12);
  std::vector<int32_t> idx(12);
  router_forward<double>(probs.data(), idx.data(), gates.data(), logits.data(), dims);
  ASSERT_GT(top_k_margin(probs, 6, dims.num_experts, 2), 1e-3) << "choose a seed without near-ties";

  const std::vector<double> r = testing::random_vector(12, 12);
  const double d_aux = 0.7;
  const double d_z = 0.3;
  const auto loss = [&] {
    std::vector<double> p(num_logits), g(12);
    std::vector<int32_t> i(12);
    router_forward<double>(p.data(), i.data(), g.data(), logits.data(), dims);
    double l = d_aux * router_aux_loss<double>(p.data(), i.data(), dims) +
               d_z * router_z_loss<double>(logits.data(), dims);
    for (size_t a = 0; a < g.size(); ++a) l += g[a] * r[a];
    return l;
  };
  std::vector<double> dlogits(num_logits);
  router_backward<double>(dlogits.data(), r.data(), logits.data(), probs.data(), idx.data(), d_aux,
                          d_z, dims);
  const std::vector<double> numeric = testing::numerical_gradient(logits, loss);
  testing::expect_close(
      dlogits, numeric, 1e-8, 1e-6,
      (norm ? "dlogits_norm, groups " : "dlogits, groups ") + std::to_string(dims.balance_groups));
}

// Per expert (5 experts) and over balance groups (6 experts in 3 and in 1).
TEST(Router, BackwardMatchesFiniteDifferences) {
  for (const auto [num_experts, groups] : {std::pair<int64_t, int64_t>{5, 0}, {6, 3}, {6, 1}}) {
    for (const bool norm : {false, true}) {
      check_backward_by_finite_differences(RouterDims{6, num_experts, 2, norm, groups});
    }
  }
}

}  // namespace
}  // namespace moeforge::ops
