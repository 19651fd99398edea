// Tests of the MoE FFN layer: finite-difference gradients of every weight and the input (with and
// without capacity dropping and the shared expert), the statistics, fully dropped tokens, and
// expert parallelism over two in-process ranks against the single-rank layer.
#include "model/moe_ffn.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <string>
#include <vector>

#include "core/error.h"
#include "model/moe_layer_case.h"
#include "model/thread_communicator.h"
#include "ops/router.h"
#include "testing/gradcheck.h"

namespace moeforge {
namespace {

using testing::MoeLayerCase;
using testing::run_ranks;
using testing::ThreadCommunicator;
using testing::ThreadGroup;

// Gradient buffers of the same layout as MoeLayerCase.
struct MoeGradBuffers {
  std::vector<double> router, gate_proj, up_proj, down_proj;
  std::vector<double> shared_gate_proj, shared_up_proj, shared_down_proj, shared_expert_gate;

  MoeGradBuffers(const MoeLayerCase& c, int64_t num_local_experts)
      : router(c.router.size()),
        gate_proj(num_local_experts * c.dims.expert_ffn * c.dims.hidden),
        up_proj(gate_proj.size()),
        down_proj(gate_proj.size()),
        shared_gate_proj(c.shared_gate_proj.size()),
        shared_up_proj(c.shared_up_proj.size()),
        shared_down_proj(c.shared_down_proj.size()),
        shared_expert_gate(c.shared_expert_gate.size()) {}

  MoeFfnGrads<double> grads() {
    return {router.data(),           gate_proj.data(),         up_proj.data(),
            down_proj.data(),        shared_gate_proj.data(),  shared_up_proj.data(),
            shared_down_proj.data(), shared_expert_gate.data()};
  }
};

// Smallest gap between adjacent probabilities among the top k + 1 of any token.
double top_k_margin(const std::vector<double>& probs, int64_t num_experts, int64_t top_k) {
  double margin = 1.0;
  for (size_t t = 0; t * num_experts < probs.size(); ++t) {
    std::vector<double> p(probs.begin() + t * num_experts, probs.begin() + (t + 1) * num_experts);
    std::sort(p.rbegin(), p.rend());
    for (int64_t j = 0; j < std::min(top_k, num_experts - 1); ++j) {
      margin = std::min(margin, p[j] - p[j + 1]);
    }
  }
  return margin;
}

struct GradCase {
  double capacity_factor;
  bool norm_topk_prob;
  int64_t shared_ffn;
  bool shared_gate;
  uint64_t seed;
};

class MoeFfnGrad : public ::testing::TestWithParam<GradCase> {};

TEST_P(MoeFfnGrad, AllGradientsMatchFiniteDifferences) {
  const GradCase p = GetParam();
  const MoeFfnDims dims{6, 4, 3, 4, 2, p.norm_topk_prob, p.capacity_factor, p.shared_ffn};
  MoeLayerCase c(dims, p.shared_gate, p.seed);
  SelfCommunicator self;
  const std::vector<double> r = testing::random_vector(dims.num_tokens * dims.hidden, 99);
  const double d_aux = 0.5;
  const double d_z = 0.25;
  const auto loss = [&] {
    MoeFfnSaved<double> saved;
    MoeFfnStats stats;
    std::vector<double> out(r.size());
    moe_ffn_forward<double>(out.data(), saved, stats, c.inp.data(), c.weights(), dims, self);
    double l = d_aux * stats.aux_loss + d_z * stats.z_loss;
    for (size_t i = 0; i < out.size(); ++i) l += out[i] * r[i];
    return l;
  };

  MoeFfnSaved<double> saved;
  MoeFfnStats stats;
  std::vector<double> out(r.size());
  moe_ffn_forward<double>(out.data(), saved, stats, c.inp.data(), c.weights(), dims, self);
  // Perturbations of 1e-6 must not change the routing.
  ASSERT_GT(top_k_margin(saved.probs, dims.num_experts, dims.top_k), 1e-4)
      << "choose a seed without near-ties";
  if (p.capacity_factor > 0) {
    ASSERT_GT(stats.num_dropped, 0) << "the case must drop assignments";
  }

  MoeGradBuffers g(c, dims.num_experts);
  MoeFfnGrads<double> grads = g.grads();
  std::vector<double> dinp(c.inp.size());
  moe_ffn_backward<double>(dinp.data(), grads, r.data(), c.inp.data(), saved, c.weights(), dims,
                           d_aux, d_z, self);

  const double atol = 1e-8;
  const double rtol = 1e-6;
  testing::expect_close(dinp, testing::numerical_gradient(c.inp, loss), atol, rtol, "dinp");
  testing::expect_close(g.router, testing::numerical_gradient(c.router, loss), atol, rtol,
                        "drouter");
  testing::expect_close(g.gate_proj, testing::numerical_gradient(c.gate_proj, loss), atol, rtol,
                        "dgate_proj");
  testing::expect_close(g.up_proj, testing::numerical_gradient(c.up_proj, loss), atol, rtol,
                        "dup_proj");
  testing::expect_close(g.down_proj, testing::numerical_gradient(c.down_proj, loss), atol, rtol,
                        "ddown_proj");
  if (p.shared_ffn > 0) {
    testing::expect_close(g.shared_gate_proj, testing::numerical_gradient(c.shared_gate_proj, loss),
                          atol, rtol, "dshared_gate_proj");
    testing::expect_close(g.shared_up_proj, testing::numerical_gradient(c.shared_up_proj, loss),
                          atol, rtol, "dshared_up_proj");
    testing::expect_close(g.shared_down_proj, testing::numerical_gradient(c.shared_down_proj, loss),
                          atol, rtol, "dshared_down_proj");
  }
  if (p.shared_ffn > 0 && p.shared_gate) {
    testing::expect_close(g.shared_expert_gate,
                          testing::numerical_gradient(c.shared_expert_gate, loss), atol, rtol,
                          "dshared_expert_gate");
  }
}

INSTANTIATE_TEST_SUITE_P(
    Cases, MoeFfnGrad,
    ::testing::Values(GradCase{0.0, true, 3, true, 10},       // dropless, gated shared expert
                      GradCase{0.5, true, 3, true, 10},       // capacity dropping
                      GradCase{0.0, false, 0, false, 20},     // no shared expert, raw gates
                      GradCase{0.75, false, 3, false, 30}));  // ungated shared expert, dropping

TEST(MoeFfn, StatsDescribeTheGroupsRouting) {
  const MoeFfnDims dims{8, 4, 3, 4, 2, true, 0.5, 0};
  const MoeLayerCase c(dims, false, 40);
  SelfCommunicator self;
  MoeFfnSaved<double> saved;
  MoeFfnStats stats;
  std::vector<double> out(dims.num_tokens * dims.hidden);
  moe_ffn_forward<double>(out.data(), saved, stats, c.inp.data(), c.weights(), dims, self);

  // Routing from logits computed here.
  std::vector<double> logits(dims.num_tokens * dims.num_experts);
  for (int64_t t = 0; t < dims.num_tokens; ++t) {
    for (int64_t e = 0; e < dims.num_experts; ++e) {
      double l = 0.0;
      for (int64_t i = 0; i < dims.hidden; ++i) l += c.inp[t * 4 + i] * c.router[e * 4 + i];
      logits[t * dims.num_experts + e] = l;
    }
  }
  const ops::RouterDims rdims{dims.num_tokens, dims.num_experts, dims.top_k, true};
  std::vector<double> probs(logits.size()), gates(dims.num_tokens * dims.top_k);
  std::vector<int32_t> idx(gates.size());
  ops::router_forward<double>(probs.data(), idx.data(), gates.data(), logits.data(), rdims);
  EXPECT_EQ(saved.expert_idx, idx);
  EXPECT_NEAR(stats.aux_loss, ops::router_aux_loss<double>(probs.data(), idx.data(), rdims), 1e-14);
  EXPECT_NEAR(stats.z_loss, ops::router_z_loss<double>(logits.data(), rdims), 1e-14);
  std::vector<int64_t> load(dims.num_experts, 0);
  for (const int32_t e : idx) ++load[e];
  EXPECT_EQ(stats.expert_load, load);
  // Capacity ceil(0.5 * 8 * 2 / 4) = 2 per expert.
  int64_t dropped = 0;
  for (const int64_t l : load) dropped += std::max<int64_t>(l - 2, 0);
  EXPECT_EQ(stats.num_dropped, dropped);
  EXPECT_GT(dropped, 0);
}

TEST(MoeFfn, FullyDroppedTokensGetNoRoutedOutputOrGradient) {
  // Every token prefers experts 0 then 1; capacity ceil(1.0 * 6 * 2 / 4) = 3 keeps tokens 0-2.
  const MoeFfnDims dims{6, 4, 3, 4, 2, true, 1.0, 0};
  MoeLayerCase c(dims, false, 50);
  for (auto& x : c.inp) x = 0.75 + 0.25 * x;  // positive inputs
  const std::vector<double> row_scale = {2.0, 1.0, -1.0, -2.0};
  for (int64_t e = 0; e < 4; ++e) {
    for (int64_t i = 0; i < 4; ++i) c.router[e * 4 + i] = row_scale[e] * (1.0 + 0.1 * i);
  }
  SelfCommunicator self;
  MoeFfnSaved<double> saved;
  MoeFfnStats stats;
  std::vector<double> out(dims.num_tokens * dims.hidden);
  moe_ffn_forward<double>(out.data(), saved, stats, c.inp.data(), c.weights(), dims, self);
  EXPECT_EQ(stats.expert_load, (std::vector<int64_t>{6, 6, 0, 0}));
  EXPECT_EQ(stats.num_dropped, 6);
  for (int64_t t = 0; t < 3; ++t) {
    for (int64_t i = 0; i < 4; ++i) EXPECT_NE(out[t * 4 + i], 0.0) << "token " << t;
  }
  for (int64_t t = 3; t < 6; ++t) {
    for (int64_t i = 0; i < 4; ++i) EXPECT_EQ(out[t * 4 + i], 0.0) << "token " << t;
  }

  // Without aux and z terms the dropped tokens receive no gradient at all.
  MoeGradBuffers g(c, dims.num_experts);
  MoeFfnGrads<double> grads = g.grads();
  const std::vector<double> dout = testing::random_vector(out.size(), 51);
  std::vector<double> dinp(out.size());
  moe_ffn_backward<double>(dinp.data(), grads, dout.data(), c.inp.data(), saved, c.weights(), dims,
                           0.0, 0.0, self);
  for (int64_t t = 3; t < 6; ++t) {
    for (int64_t i = 0; i < 4; ++i) EXPECT_EQ(dinp[t * 4 + i], 0.0) << "token " << t;
  }
  // Experts 2 and 3 received no rows.
  for (size_t i = 2 * 3 * 4; i < g.gate_proj.size(); ++i) EXPECT_EQ(g.gate_proj[i], 0.0);
}

// Result of one rank (or of the single-rank reference).
struct RankResult {
  std::vector<double> out, dinp;
  MoeFfnStats stats;
  std::vector<double> router, gate_proj, up_proj, down_proj, shared_gate_proj, shared_expert_gate;
};

RankResult run_layer(const MoeLayerCase& c, const MoeFfnDims& local_dims,
                     const std::vector<double>& dout, Communicator& comm) {
  const int rank = comm.rank();
  const int num_ranks = comm.size();
  const int64_t local = local_dims.num_tokens * local_dims.hidden;
  const MoeFfnWeights<double> w = c.weights(rank, num_ranks);
  MoeGradBuffers g(c, local_dims.num_experts / num_ranks);
  MoeFfnGrads<double> grads = g.grads();
  MoeFfnSaved<double> saved;
  RankResult result;
  result.out.resize(local);
  result.dinp.resize(local);
  moe_ffn_forward<double>(result.out.data(), saved, result.stats, c.inp.data() + rank * local, w,
                          local_dims, comm);
  moe_ffn_backward<double>(result.dinp.data(), grads, dout.data() + rank * local,
                           c.inp.data() + rank * local, saved, w, local_dims, 0.5, 0.25, comm);
  result.router = g.router;
  result.gate_proj = g.gate_proj;
  result.up_proj = g.up_proj;
  result.down_proj = g.down_proj;
  result.shared_gate_proj = g.shared_gate_proj;
  result.shared_expert_gate = g.shared_expert_gate;
  return result;
}

std::vector<double> slice(const std::vector<double>& v, size_t part, size_t num_parts) {
  const size_t size = v.size() / num_parts;
  return {v.begin() + part * size, v.begin() + (part + 1) * size};
}

std::vector<double> sum(const std::vector<double>& a, const std::vector<double>& b) {
  std::vector<double> s(a.size());
  for (size_t i = 0; i < a.size(); ++i) s[i] = a[i] + b[i];
  return s;
}

class MoeFfnExpertParallel : public ::testing::TestWithParam<double> {};

TEST_P(MoeFfnExpertParallel, TwoRanksMatchOneRank) {
  const MoeFfnDims dims{8, 4, 3, 4, 2, true, GetParam(), 3};
  const MoeLayerCase c(dims, true, 60);
  const std::vector<double> dout = testing::random_vector(dims.num_tokens * dims.hidden, 61);
  SelfCommunicator self;
  const RankResult ref = run_layer(c, dims, dout, self);
  if (GetParam() > 0) {
    ASSERT_GT(ref.stats.num_dropped, 0) << "the case must drop assignments";
  }

  MoeFfnDims local_dims = dims;
  local_dims.num_tokens = dims.num_tokens / 2;
  std::vector<RankResult> ranks(2);
  run_ranks(2,
            [&](Communicator& comm) { ranks[comm.rank()] = run_layer(c, local_dims, dout, comm); });

  const double atol = 1e-12;
  for (size_t r = 0; r < 2; ++r) {
    const std::string rank = "rank" + std::to_string(r) + "_";
    testing::expect_close(ranks[r].out, slice(ref.out, r, 2), atol, 0, rank + "out");
    testing::expect_close(ranks[r].dinp, slice(ref.dinp, r, 2), atol, 0, rank + "dinp");
    testing::expect_close(ranks[r].gate_proj, slice(ref.gate_proj, r, 2), atol, 0,
                          rank + "dgate_proj");
    testing::expect_close(ranks[r].up_proj, slice(ref.up_proj, r, 2), atol, 0, rank + "dup_proj");
    testing::expect_close(ranks[r].down_proj, slice(ref.down_proj, r, 2), atol, 0,
                          rank + "ddown_proj");
    EXPECT_NEAR(ranks[r].stats.aux_loss, ref.stats.aux_loss, 1e-15);
    EXPECT_NEAR(ranks[r].stats.z_loss, ref.stats.z_loss, 1e-15);
    EXPECT_EQ(ranks[r].stats.expert_load, ref.stats.expert_load);
  }
  EXPECT_EQ(ranks[0].stats.num_dropped + ranks[1].stats.num_dropped, ref.stats.num_dropped);
  // Replicated weights hold per-rank partial gradients that sum to the full one.
  testing::expect_close(sum(ranks[0].router, ranks[1].router), ref.router, atol, 0, "drouter");
  testing::expect_close(sum(ranks[0].shared_gate_proj, ranks[1].shared_gate_proj),
                        ref.shared_gate_proj, atol, 0, "dshared_gate_proj");
  testing::expect_close(sum(ranks[0].shared_expert_gate, ranks[1].shared_expert_gate),
                        ref.shared_expert_gate, atol, 0, "dshared_expert_gate");
}

INSTANTIATE_TEST_SUITE_P(Capacity, MoeFfnExpertParallel, ::testing::Values(0.0, 0.75));

TEST(MoeFfn, RejectsExpertsNotDivisibleByTheGroup) {
  const MoeFfnDims dims{2, 4, 3, 4, 2, true, 0.0, 0};
  const MoeLayerCase c(dims, false, 70);
  ThreadGroup group(3);
  ThreadCommunicator rank0(group, 0);
  MoeFfnSaved<double> saved;
  MoeFfnStats stats;
  std::vector<double> out(8);
  EXPECT_THROW(
      moe_ffn_forward<double>(out.data(), saved, stats, c.inp.data(), c.weights(), dims, rank0),
      Error);
  SelfCommunicator self;
  MoeFfnDims bad_k = dims;
  bad_k.top_k = 5;
  EXPECT_THROW(
      moe_ffn_forward<double>(out.data(), saved, stats, c.inp.data(), c.weights(), bad_k, self),
      Error);
}

}  // namespace
}  // namespace moeforge
