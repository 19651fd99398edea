// Tests of the all-to-all expert dispatch (model/moe_dispatch_a2a.h, run through moe_ffn): over
// 2 and 4 in-process ranks it gives the all-gather path's outputs, losses, statistics and
// gradients (the same routing and the experts' rows in the same order, exactly) and the
// single-rank layer's; experts and ranks that receive no rows; skewed routing; capacity
// dropping; the rows it sends and the communication volume per layer against the formulas; the
// "auto" rule; and whole Mixtral- and Qwen3-MoE-like models over 2 and 4 ranks.
#include "model/moe_dispatch_a2a.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <memory>
#include <optional>
#include <ostream>
#include <string>
#include <vector>

#include "comm/counting_communicator.h"
#include "core/error.h"
#include "core/rng.h"
#include "model/group_equivalence.h"
#include "model/model_test_configs.h"
#include "model/moe_ffn.h"
#include "model/moe_layer_case.h"
#include "model/thread_communicator.h"
#include "model/transformer.h"
#include "testing/gradcheck.h"

namespace moeforge {
namespace {

using testing::run_ranks;

// The cases run in double with values of order 1, so the two variants' different summation orders
// (the combine over a token's slots, the router sums over the group) leave differences of a few
// ulps of 1e-16; 1e-12 is the bound of the existing expert- and sequence-parallel tests.
constexpr double kAtol = 1e-12;
constexpr double kDaux = 0.5;
constexpr double kDz = 0.25;

// One layer over the group's tokens: every rank's inputs and output gradients, all experts (the
// shared expert, when there is one, with its gate).
struct LayerCase : testing::MoeLayerCase {
  std::vector<double> dout;

  LayerCase(const MoeFfnDims& d, uint64_t seed)
      : MoeLayerCase(d, true, seed),
        dout(testing::random_vector(d.num_tokens * d.hidden, seed + 9)) {}

  // Router row e = scale[e] * (1, 1.1, 1.2, ...): tokens with positive inputs prefer the experts
  // of the largest scales, tokens with negative inputs those of the smallest.
  void set_router_scales(const std::vector<double>& scale) {
    for (int64_t e = 0; e < dims.num_experts; ++e) {
      for (int64_t i = 0; i < dims.hidden; ++i) {
        router[e * dims.hidden + i] = scale[e] * (1.0 + 0.1 * static_cast<double>(i));
      }
    }
  }
  // Inputs of tokens [first, last) in [0.75, 1] (sign +1) or [-1, -0.75] (sign -1).
  void set_input_sign(int64_t first, int64_t last, double sign) {
    for (int64_t i = first * dims.hidden; i < last * dims.hidden; ++i) {
      inp[i] = sign * (0.75 + 0.25 * std::abs(inp[i]));
    }
  }
};

// What one rank's forward and backward produced.
struct RankRun {
  EpDispatch ran = EpDispatch::kAuto;
  std::vector<double> out, dinp;
  std::vector<double> router, gate_proj, up_proj, down_proj;
  std::vector<double> shared_gate_proj, shared_up_proj, shared_down_proj, shared_expert_gate;
  MoeFfnStats stats;
  std::vector<int32_t> expert_idx;  // routed tokens' (the group's for all-gather)
  std::vector<double> rows;         // the local experts' input rows, in GEMM order
  std::vector<size_t> send_rows;    // all-to-all: rows sent to each rank
};

// Forward and backward of rank comm.rank() of comm.size() on its shard of the group's tokens.
RankRun run_rank(const LayerCase& c, EpDispatch dispatch, Communicator& comm) {
  const int rank = comm.rank();
  const int num_ranks = comm.size();
  MoeFfnDims dims = c.dims;
  dims.num_tokens /= num_ranks;
  dims.dispatch = dispatch;
  const int64_t local = dims.num_tokens * dims.hidden;
  const int64_t expert_size = dims.expert_ffn * dims.hidden;
  const int64_t num_local_experts = dims.num_experts / num_ranks;
  RankRun run;
  run.router.assign(c.router.size(), 0.0);
  run.gate_proj.assign(static_cast<size_t>(num_local_experts * expert_size), 0.0);
  run.up_proj = run.gate_proj;
  run.down_proj = run.gate_proj;
  run.shared_gate_proj.assign(c.shared_gate_proj.size(), 0.0);
  run.shared_up_proj.assign(c.shared_up_proj.size(), 0.0);
  run.shared_down_proj.assign(c.shared_down_proj.size(), 0.0);
  run.shared_expert_gate.assign(c.shared_expert_gate.size(), 0.0);
  MoeFfnGrads<double> grads{run.router.data(),           run.gate_proj.data(),
                            run.up_proj.data(),          run.down_proj.data(),
                            run.shared_gate_proj.data(), run.shared_up_proj.data(),
                            run.shared_down_proj.data(), run.shared_expert_gate.data()};
  const MoeFfnWeights<double> w = c.weights(rank, num_ranks);
  MoeFfnSaved<double> saved;
  run.out.resize(static_cast<size_t>(local));
  run.dinp.resize(static_cast<size_t>(local));
  const double* inp = c.inp.data() + rank * local;
  moe_ffn_forward<double>(run.out.data(), saved, run.stats, inp, w, dims, comm);
  moe_ffn_backward<double>(run.dinp.data(), grads, c.dout.data() + rank * local, inp, saved, w,
                           dims, kDaux, kDz, comm);
  run.ran = saved.dispatch;
  run.expert_idx = saved.expert_idx;
  run.rows = saved.rows;
  run.send_rows = saved.a2a.send_rows;
  return run;
}

std::vector<RankRun> run_group(const LayerCase& c, EpDispatch dispatch, int num_ranks) {
  std::vector<RankRun> runs(static_cast<size_t>(num_ranks));
  run_ranks(num_ranks,
            [&](Communicator& comm) { runs[comm.rank()] = run_rank(c, dispatch, comm); });
  return runs;
}

RankRun run_one_rank(const LayerCase& c) {
  SelfCommunicator self;
  return run_rank(c, EpDispatch::kAllGather, self);
}

template <typename V>
V slice(const V& v, size_t part, size_t num_parts) {
  const size_t size = v.size() / num_parts;
  return V(v.begin() + part * size, v.begin() + (part + 1) * size);
}

std::vector<double> sum_over(const std::vector<RankRun>& runs,
                             std::vector<double> RankRun::*member) {
  std::vector<double> total((runs[0].*member).size(), 0.0);
  for (const RankRun& run : runs) {
    for (size_t i = 0; i < total.size(); ++i) total[i] += (run.*member)[i];
  }
  return total;
}

// Per rank: the same routing, rows (in GEMM order), outputs, gradients and statistics.
void expect_same_as_all_gather(const std::vector<RankRun>& a2a, const std::vector<RankRun>& ag,
                               const std::string& what) {
  const size_t n = a2a.size();
  for (size_t r = 0; r < n; ++r) {
    const std::string where = what + " rank " + std::to_string(r) + " ";
    ASSERT_EQ(a2a[r].ran, EpDispatch::kAllToAll) << where;
    ASSERT_EQ(ag[r].ran, EpDispatch::kAllGather) << where;
    EXPECT_EQ(a2a[r].expert_idx, slice(ag[r].expert_idx, r, n)) << where << "routing";
    EXPECT_EQ(a2a[r].rows, ag[r].rows) << where << "expert rows";
    testing::expect_close(a2a[r].out, ag[r].out, kAtol, 0, where + "out");
    testing::expect_close(a2a[r].dinp, ag[r].dinp, kAtol, 0, where + "dinp");
    testing::expect_close(a2a[r].router, ag[r].router, kAtol, 0, where + "drouter");
    testing::expect_close(a2a[r].gate_proj, ag[r].gate_proj, kAtol, 0, where + "dgate_proj");
    testing::expect_close(a2a[r].up_proj, ag[r].up_proj, kAtol, 0, where + "dup_proj");
    testing::expect_close(a2a[r].down_proj, ag[r].down_proj, kAtol, 0, where + "ddown_proj");
    testing::expect_close(a2a[r].shared_gate_proj, ag[r].shared_gate_proj, kAtol, 0,
                          where + "dshared_gate_proj");
    testing::expect_close(a2a[r].shared_expert_gate, ag[r].shared_expert_gate, kAtol, 0,
                          where + "dshared_expert_gate");
    EXPECT_NEAR(a2a[r].stats.aux_loss, ag[r].stats.aux_loss, kAtol) << where;
    EXPECT_NEAR(a2a[r].stats.z_loss, ag[r].stats.z_loss, kAtol) << where;
    EXPECT_EQ(a2a[r].stats.expert_load, ag[r].stats.expert_load) << where;
    EXPECT_EQ(a2a[r].stats.num_dropped, ag[r].stats.num_dropped) << where;
  }
}

// The ranks' shards, expert slices and summed replicated-weight gradients equal one rank's.
void expect_same_as_one_rank(const std::vector<RankRun>& runs, const RankRun& ref,
                             const std::string& what) {
  const size_t n = runs.size();
  int64_t num_dropped = 0;
  for (size_t r = 0; r < n; ++r) {
    const std::string where = what + " rank " + std::to_string(r) + " ";
    testing::expect_close(runs[r].out, slice(ref.out, r, n), kAtol, 0, where + "out");
    testing::expect_close(runs[r].dinp, slice(ref.dinp, r, n), kAtol, 0, where + "dinp");
    testing::expect_close(runs[r].gate_proj, slice(ref.gate_proj, r, n), kAtol, 0,
                          where + "dgate_proj");
    testing::expect_close(runs[r].up_proj, slice(ref.up_proj, r, n), kAtol, 0, where + "dup_proj");
    testing::expect_close(runs[r].down_proj, slice(ref.down_proj, r, n), kAtol, 0,
                          where + "ddown_proj");
    EXPECT_NEAR(runs[r].stats.aux_loss, ref.stats.aux_loss, kAtol) << where;
    EXPECT_NEAR(runs[r].stats.z_loss, ref.stats.z_loss, kAtol) << where;
    EXPECT_EQ(runs[r].stats.expert_load, ref.stats.expert_load) << where;
    num_dropped += runs[r].stats.num_dropped;
  }
  EXPECT_EQ(num_dropped, ref.stats.num_dropped) << what;
  testing::expect_close(sum_over(runs, &RankRun::router), ref.router, kAtol, 0, what + " drouter");
  testing::expect_close(sum_over(runs, &RankRun::shared_gate_proj), ref.shared_gate_proj, kAtol, 0,
                        what + " dshared_gate_proj");
  testing::expect_close(sum_over(runs, &RankRun::shared_expert_gate), ref.shared_expert_gate, kAtol,
                        0, what + " dshared_expert_gate");
}

// Runs all-to-all and all-gather over num_ranks and one rank, and compares them all.
std::vector<RankRun> check_variants_agree(const LayerCase& c, int num_ranks,
                                          const std::string& what) {
  const RankRun ref = run_one_rank(c);
  const std::vector<RankRun> ag = run_group(c, EpDispatch::kAllGather, num_ranks);
  const std::vector<RankRun> a2a = run_group(c, EpDispatch::kAllToAll, num_ranks);
  expect_same_as_all_gather(a2a, ag, what);
  expect_same_as_one_rank(a2a, ref, what + " vs one rank");
  return a2a;
}

struct LayerParam {
  const char* name;
  int num_ranks;
  MoeFfnDims dims;  // group tokens
  uint64_t seed;
};

void PrintTo(const LayerParam& p, std::ostream* os) {
  *os << p.name;
}

class MoeDispatchA2aLayer : public ::testing::TestWithParam<LayerParam> {};

TEST_P(MoeDispatchA2aLayer, MatchesAllGatherAndOneRank) {
  const LayerParam p = GetParam();
  const LayerCase c(p.dims, p.seed);
  const RankRun ref = run_one_rank(c);
  if (p.dims.capacity_factor > 0) {
    ASSERT_GT(ref.stats.num_dropped, 0) << "the case must drop assignments";
  }
  check_variants_agree(c, p.num_ranks, p.name);
}

// Mixtral-like (top-2) and Qwen3-MoE-like (top-3) layers, Qwen2-MoE-like ones with the gated
// shared expert and raw gates, with and without capacity dropping; experts divisible by the ranks.
INSTANTIATE_TEST_SUITE_P(
    Cases, MoeDispatchA2aLayer,
    ::testing::Values(
        LayerParam{"mixtral n2", 2, {16, 6, 5, 4, 2, true, 0.0, 0}, 100},
        LayerParam{"mixtral n4", 4, {16, 6, 5, 4, 2, true, 0.0, 0}, 110},
        LayerParam{"mixtral n4 capacity", 4, {16, 6, 5, 4, 2, true, 0.75, 0}, 120},
        LayerParam{"qwen3moe n2", 2, {12, 6, 5, 8, 3, true, 0.0, 0}, 130},
        LayerParam{"qwen3moe n4", 4, {16, 6, 5, 8, 3, true, 0.0, 0}, 140},
        LayerParam{"qwen3moe n4 capacity", 4, {16, 6, 5, 8, 3, true, 0.5, 0}, 150},
        LayerParam{"qwen2moe n2 shared raw gates", 2, {12, 6, 5, 4, 2, false, 0.0, 4}, 160},
        LayerParam{"qwen2moe n4 shared capacity", 4, {16, 6, 5, 8, 2, false, 0.75, 4}, 170}),
    [](const ::testing::TestParamInfo<LayerParam>& info) {
      std::string name = info.param.name;
      for (char& ch : name) {
        if (ch == ' ') ch = '_';
      }
      return name;
    });

TEST(MoeDispatchA2a, ExpertsAndRanksWithoutRows) {
  // Every token prefers experts 0 then 1, both on rank 0 of 4: ranks 1-3 receive no rows, their
  // experts stay without gradient, and every rank sends only to rank 0.
  LayerCase c({8, 4, 3, 8, 2, true, 0.0, 0}, 200);
  c.set_router_scales({2.0, 1.0, -0.1, -0.2, -0.3, -0.4, -1.0, -2.0});
  c.set_input_sign(0, 8, 1.0);
  const std::vector<RankRun> a2a = check_variants_agree(c, 4, "experts 0-1 only");
  for (size_t r = 0; r < 4; ++r) {
    EXPECT_EQ(a2a[r].stats.expert_load, (std::vector<int64_t>{8, 8, 0, 0, 0, 0, 0, 0}));
    EXPECT_EQ(a2a[r].send_rows, (std::vector<size_t>{4, 0, 0, 0})) << "rank " << r;
    if (r > 0) {
      EXPECT_TRUE(a2a[r].rows.empty()) << "rank " << r;
      for (const double g : a2a[r].down_proj) ASSERT_EQ(g, 0.0) << "rank " << r;
    }
  }
}

TEST(MoeDispatchA2a, SkewedRoutingWithoutCrossTraffic) {
  // Rank 0's tokens (positive inputs) pick experts 0-1 (its own), rank 1's (negative) experts 2-3
  // (its own): no row crosses, and both variants still agree.
  LayerCase c({8, 4, 3, 4, 2, true, 0.0, 3}, 210);
  c.set_router_scales({2.0, 1.0, -1.0, -2.0});
  c.set_input_sign(0, 4, 1.0);
  c.set_input_sign(4, 8, -1.0);
  const std::vector<RankRun> a2a = check_variants_agree(c, 2, "no cross traffic");
  EXPECT_EQ(a2a[0].send_rows, (std::vector<size_t>{8, 0}));
  EXPECT_EQ(a2a[1].send_rows, (std::vector<size_t>{0, 8}));
}

TEST(MoeDispatchA2a, UnevenRoutingWithCapacityDropsTheSameAssignments) {
  // Ranks 0 and 1 (positive inputs) crowd experts 0-1 of rank 0, ranks 2 and 3 (negative) experts
  // 6-7 of rank 3; capacity ceil(1.0 * 16 * 2 / 8) = 4 keeps the first four of each expert in
  // group order, so the lower ranks' tokens win and the higher ranks' rows are not sent.
  LayerCase c({16, 4, 3, 8, 2, true, 1.0, 0}, 220);
  c.set_router_scales({2.0, 1.5, 0.2, 0.1, -0.1, -0.2, -1.5, -2.0});
  c.set_input_sign(0, 8, 1.0);
  c.set_input_sign(8, 16, -1.0);
  const std::vector<RankRun> a2a = check_variants_agree(c, 4, "uneven with capacity");
  EXPECT_EQ(a2a[0].stats.expert_load, (std::vector<int64_t>{8, 8, 0, 0, 0, 0, 8, 8}));
  EXPECT_EQ(a2a[0].stats.num_dropped, 8);
  EXPECT_EQ(a2a[3].stats.num_dropped, 8);
  EXPECT_EQ(a2a[0].send_rows, (std::vector<size_t>{8, 0, 0, 0}));  // all kept
  EXPECT_EQ(a2a[1].send_rows, (std::vector<size_t>{0, 0, 0, 0}));  // all dropped
  EXPECT_EQ(a2a[2].send_rows, (std::vector<size_t>{0, 0, 0, 8}));
  EXPECT_EQ(a2a[3].send_rows, (std::vector<size_t>{0, 0, 0, 0}));
}

void expect_same_row_map(const ops::RowMap& got, const ops::RowMap& want, const std::string& what) {
  EXPECT_EQ(got.num_tokens, want.num_tokens) << what;
  EXPECT_EQ(got.top_k, want.top_k) << what;
  EXPECT_EQ(got.expert_begin, want.expert_begin) << what;
  EXPECT_EQ(got.expert_end, want.expert_end) << what;
  EXPECT_EQ(got.expert_offsets, want.expert_offsets) << what;
  EXPECT_EQ(got.row_token, want.row_token) << what;
  EXPECT_EQ(got.assignment_row, want.assignment_row) << what;
  EXPECT_EQ(got.tokens_per_expert, want.tokens_per_expert) << what;
  EXPECT_EQ(got.num_dropped, want.num_dropped) << what;
}

void expect_same_plan(const A2aDispatchPlan& got, const A2aDispatchPlan& want,
                      const std::string& what) {
  EXPECT_EQ(got.num_tokens, want.num_tokens) << what;
  EXPECT_EQ(got.group_tokens, want.group_tokens) << what;
  EXPECT_EQ(got.group_load, want.group_load) << what;
  EXPECT_EQ(got.num_dropped, want.num_dropped) << what;
  expect_same_row_map(got.send_map, want.send_map, what + " send_map");
  expect_same_row_map(got.recv_map, want.recv_map, what + " recv_map");
  EXPECT_EQ(got.send_rows, want.send_rows) << what;
  EXPECT_EQ(got.send_row_offsets, want.send_row_offsets) << what;
  EXPECT_EQ(got.recv_rows, want.recv_rows) << what;
  EXPECT_EQ(got.recv_row_offsets, want.recv_row_offsets) << what;
}

// The GPU engine plans with plan_a2a_dispatch_from_loads after gathering the counts on the
// device: from the same gathered loads it gives the collective plan field by field (4 ranks of 6
// tokens, top-2 of 8 experts, dropless and with a capacity that drops), and it refuses loads whose
// own row disagrees with the rank's routing.
TEST(MoeDispatchA2a, PlanFromGatheredLoadsEqualsTheCollectivePlan) {
  constexpr int kRanks = 4;
  constexpr int64_t kTokens = 6, kTopK = 2, kExperts = 8;
  // Rank r's routing: distinct experts per token, skewed toward the low experts.
  std::vector<std::vector<int32_t>> routing(kRanks);
  std::vector<int64_t> loads(static_cast<size_t>(kRanks * kExperts), 0);  // [ranks, experts]
  Rng rng(300);
  for (int r = 0; r < kRanks; ++r) {
    for (int64_t t = 0; t < kTokens; ++t) {
      const auto first = static_cast<int32_t>(rng.below(kExperts / 2));
      const auto second = static_cast<int32_t>((first + 1 + rng.below(kExperts - 1)) % kExperts);
      for (const int32_t e : {first, second}) {
        routing[r].push_back(e);
        ++loads[static_cast<size_t>(r * kExperts + e)];
      }
    }
  }
  for (const int64_t capacity : {int64_t{-1}, int64_t{2}}) {
    const std::string what = "capacity " + std::to_string(capacity);
    std::vector<A2aDispatchPlan> collective(kRanks), from_loads(kRanks);
    run_ranks(kRanks, [&](Communicator& comm) {
      const int r = comm.rank();
      collective[r] =
          plan_a2a_dispatch(routing[r].data(), kTokens, kTopK, kExperts, capacity, comm);
      from_loads[r] = plan_a2a_dispatch_from_loads(routing[r].data(), kTokens, kTopK, kExperts,
                                                   capacity, loads.data(), r, kRanks);
    });
    int64_t num_dropped = 0;
    for (int r = 0; r < kRanks; ++r) {
      expect_same_plan(from_loads[r], collective[r], what + " rank " + std::to_string(r));
      num_dropped += from_loads[r].num_dropped;
    }
    if (capacity >= 0) {
      EXPECT_GT(num_dropped, 0) << what << ": the case must drop assignments";
    }
  }

  std::vector<int64_t> wrong = loads;
  ++wrong[static_cast<size_t>(1 * kExperts + routing[1][0])];
  try {
    plan_a2a_dispatch_from_loads(routing[1].data(), kTokens, kTopK, kExperts, -1, wrong.data(), 1,
                                 kRanks);
    ADD_FAILURE() << "loads that disagree with the routing passed";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("the gathered loads give rank 1"), std::string::npos)
        << e.what();
  }
  EXPECT_THROW(plan_a2a_dispatch_from_loads(routing[0].data(), kTokens, kTopK, kExperts, -1,
                                            loads.data(), kRanks, kRanks),
               Error);
}

TEST(MoeDispatchA2a, OneRankEqualsTheAllGatherPath) {
  const LayerCase c({8, 4, 3, 4, 2, true, 0.5, 3}, 230);
  SelfCommunicator self;
  const RankRun a2a = run_rank(c, EpDispatch::kAllToAll, self);
  const RankRun ag = run_one_rank(c);
  expect_same_as_all_gather({a2a}, {ag}, "one rank");
}

TEST(MoeDispatchA2a, BackwardNeedsTheForwardsVariant) {
  const LayerCase c({4, 4, 3, 4, 2, true, 0.0, 0}, 240);
  SelfCommunicator self;
  MoeFfnDims dims = c.dims;
  dims.dispatch = EpDispatch::kAllToAll;
  MoeFfnSaved<double> saved;
  MoeFfnStats stats;
  std::vector<double> out(c.inp.size()), dinp(c.inp.size());
  moe_ffn_forward<double>(out.data(), saved, stats, c.inp.data(), c.weights(0, 1), dims, self);
  std::vector<double> drouter(c.router.size()), dgate(c.gate_proj.size()), dup(dgate.size()),
      ddown(dgate.size());
  MoeFfnGrads<double> g{drouter.data(), dgate.data(), dup.data(), ddown.data(),
                        nullptr,        nullptr,      nullptr,    nullptr};
  dims.dispatch = EpDispatch::kAllGather;
  try {
    moe_ffn_backward<double>(dinp.data(), g, c.dout.data(), c.inp.data(), saved, c.weights(0, 1),
                             dims, 0.0, 0.0, self);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("the forward ran the alltoall dispatch"),
              std::string::npos)
        << e.what();
  }
}

struct Volume {
  size_t rows = 0;      // elements of hidden rows sent to other ranks, forward + backward
  size_t metadata = 0;  // routing elements
  int64_t off_rank_assignments = 0;  // kept assignments of this rank's tokens to other ranks
};

std::vector<Volume> measure(const LayerCase& c, EpDispatch dispatch, int num_ranks) {
  std::vector<Volume> volumes(static_cast<size_t>(num_ranks));
  run_ranks(num_ranks, [&](Communicator& comm) {
    CountingCommunicator counting(comm);
    const RankRun run = run_rank(c, dispatch, counting);
    Volume& v = volumes[comm.rank()];
    // Hidden rows (the layer's activations) and routing metadata (the plan's int64 counts, the
    // router sums and the gate gradients).
    using Collective = CountingCommunicator::Collective;
    v.rows = counting.elements(Collective::kAllGather, CommDType::kFloat64) +
             counting.elements(Collective::kReduceScatter) +
             counting.elements(Collective::kAllToAll);
    v.metadata = counting.elements(Collective::kAllReduce) +
                 counting.elements(Collective::kAllGather, CommDType::kInt64);
    for (int j = 0; j < num_ranks; ++j) {
      if (j != comm.rank() && !run.send_rows.empty()) {
        v.off_rank_assignments += static_cast<int64_t>(run.send_rows[j]);
      }
    }
  });
  return volumes;
}

TEST(MoeDispatchA2a, CommunicationVolumePerLayerFollowsTheFormulas) {
  // n = 4 ranks of N = 16 tokens, hidden h = 8, 8 experts, top-2, with capacity dropping.
  constexpr int kRanks = 4;
  const LayerCase c({64, 8, 3, 8, 2, true, 1.0, 0}, 250);
  const int64_t local_tokens = 16, h = 8, num_experts = 8, top_k = 2;
  const std::vector<Volume> ag = measure(c, EpDispatch::kAllGather, kRanks);
  const std::vector<Volume> a2a = measure(c, EpDispatch::kAllToAll, kRanks);
  int64_t group_off_rank = 0;
  size_t a2a_rows = 0;
  for (int r = 0; r < kRanks; ++r) {
    // All-gather: each way, forward and backward, (n - 1) N rows; plus the gate all-reduce.
    EXPECT_EQ(ag[r].rows, static_cast<size_t>(4 * (kRanks - 1) * local_tokens * h)) << r;
    EXPECT_EQ(ag[r].metadata, static_cast<size_t>((kRanks - 1) * kRanks * local_tokens * top_k));
    // All-to-all: the counts all-gather and the router sums all-reduce.
    EXPECT_EQ(a2a[r].metadata, static_cast<size_t>((kRanks - 1) * (2 * num_experts + 1))) << r;
    group_off_rank += a2a[r].off_rank_assignments;
    a2a_rows += a2a[r].rows;
  }
  // All-to-all: every kept off-rank assignment crosses once each way, forward and backward.
  EXPECT_EQ(a2a_rows, static_cast<size_t>(4 * group_off_rank * h));
  // Balanced routing would send k (n - 1) / n of the N k rows (24 of 32 per rank); this routing
  // with drops sends fewer, and at top-2 of 4 ranks always less than the all-gather's 3 N.
  EXPECT_GT(group_off_rank, 0);
  EXPECT_LE(group_off_rank, kRanks * local_tokens * top_k);
  EXPECT_LT(a2a_rows, static_cast<size_t>(kRanks) * ag[0].rows);
}

TEST(MoeDispatchA2a, ParsePerLayerPlans) {
  const EpDispatchPlan every = parse_ep_dispatch_plan("alltoall", 3);
  EXPECT_EQ(every.size(), 1u);
  for (int64_t l = 0; l < 3; ++l) EXPECT_EQ(every.layer(l), EpDispatch::kAllToAll);
  const EpDispatchPlan mixed = parse_ep_dispatch_plan("allgather,alltoall,auto", 3);
  EXPECT_EQ(mixed.size(), 3u);
  EXPECT_EQ(mixed.layer(0), EpDispatch::kAllGather);
  EXPECT_EQ(mixed.layer(1), EpDispatch::kAllToAll);
  EXPECT_EQ(mixed.layer(2), EpDispatch::kAuto);
  EXPECT_TRUE(mixed.uses(EpDispatch::kAllToAll));
  EXPECT_FALSE(parse_ep_dispatch_plan("allgather,auto", 2).uses(EpDispatch::kAllToAll));
  EXPECT_THROW(mixed.layer(3), Error);
  try {
    parse_ep_dispatch_plan("auto,auto", 3);
    ADD_FAILURE() << "a list of 2 entries passed for 3 layers";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("has 2 entries for a model of 3 decoder layers"),
              std::string::npos)
        << e.what();
  }
  EXPECT_THROW(parse_ep_dispatch_plan("alltoall,", 2), Error);
  EXPECT_THROW(parse_ep_dispatch_plan("alltoall,all-to-all", 2), Error);
  EXPECT_THROW(EpDispatchPlan(std::vector<EpDispatch>{}), Error);
}

// What the trainer and bench train print: one name when the MoE layers agree, else a list.
TEST(MoeDispatchA2a, DescribesTheDispatchEachLayerRuns) {
  constexpr std::optional<EpDispatch> kDense = std::nullopt;
  EXPECT_EQ(describe_ep_dispatch({EpDispatch::kAllToAll, EpDispatch::kAllToAll}), "alltoall");
  EXPECT_EQ(describe_ep_dispatch({kDense, EpDispatch::kAllGather, EpDispatch::kAllGather}),
            "allgather");
  EXPECT_EQ(describe_ep_dispatch({EpDispatch::kAllToAll, kDense, EpDispatch::kAllGather}),
            "alltoall,dense,allgather");
}

TEST(MoeDispatchA2a, ParseAndAutoRule) {
  EXPECT_EQ(parse_ep_dispatch("allgather"), EpDispatch::kAllGather);
  EXPECT_EQ(parse_ep_dispatch("alltoall"), EpDispatch::kAllToAll);
  EXPECT_EQ(parse_ep_dispatch("auto"), EpDispatch::kAuto);
  for (const EpDispatch d : {EpDispatch::kAllGather, EpDispatch::kAllToAll, EpDispatch::kAuto}) {
    EXPECT_EQ(parse_ep_dispatch(ep_dispatch_name(d)), d);
  }
  EXPECT_THROW(parse_ep_dispatch("all-to-all"), Error);
  // all-to-all iff k (n - 1) / n < n - 1, i.e. k < n; equal volume and n = 1 keep the all-gather.
  const auto chosen = [](int64_t k, int64_t n) {
    return choose_ep_dispatch(EpDispatch::kAuto, k, n);
  };
  EXPECT_EQ(chosen(2, 1), EpDispatch::kAllGather);
  EXPECT_EQ(chosen(1, 2), EpDispatch::kAllToAll);
  EXPECT_EQ(chosen(2, 2), EpDispatch::kAllGather);
  EXPECT_EQ(chosen(2, 4), EpDispatch::kAllToAll);
  EXPECT_EQ(chosen(3, 4), EpDispatch::kAllToAll);
  EXPECT_EQ(chosen(4, 4), EpDispatch::kAllGather);
  EXPECT_EQ(chosen(7, 8), EpDispatch::kAllToAll);
  EXPECT_EQ(chosen(8, 8), EpDispatch::kAllGather);
  EXPECT_EQ(chosen(6, 4), EpDispatch::kAllGather);
  EXPECT_EQ(choose_ep_dispatch(EpDispatch::kAllToAll, 8, 2), EpDispatch::kAllToAll);
  EXPECT_EQ(choose_ep_dispatch(EpDispatch::kAllGather, 1, 8), EpDispatch::kAllGather);
}

// Whole models: n ranks with either variant equal one rank on the full sequences.
using testing::GroupRunResult;

GroupRunResult run_model(const ModelConfig& c, EpDispatch dispatch, Communicator& comm,
                         const std::vector<int32_t>& tokens, const std::vector<int32_t>& targets,
                         int64_t batch, int64_t seq) {
  return testing::run_rank_model(c, ParallelLayout::kSequenceExpert, dispatch, comm, tokens,
                                 targets, batch, seq);
}

// Positions [rank * local_seq, (rank + 1) * local_seq) of every sequence of full [batch, seq].
std::vector<int32_t> shard(const std::vector<int32_t>& full, int64_t batch, int64_t seq, int rank,
                           int num_ranks) {
  const int64_t local_seq = seq / num_ranks;
  std::vector<int32_t> out;
  for (int64_t b = 0; b < batch; ++b) {
    const auto first = full.begin() + b * seq + rank * local_seq;
    out.insert(out.end(), first, first + local_seq);
  }
  return out;
}

void expect_model_runs_equal(const GroupRunResult& a, const GroupRunResult& b,
                             const std::string& what) {
  EXPECT_EQ(a.loss.num_counted, b.loss.num_counted) << what;
  EXPECT_NEAR(a.loss.loss, b.loss.loss, kAtol) << what;
  EXPECT_NEAR(a.loss.ce_loss, b.loss.ce_loss, kAtol) << what;
  EXPECT_NEAR(a.loss.aux_loss, b.loss.aux_loss, kAtol) << what;
  EXPECT_NEAR(a.loss.z_loss, b.loss.z_loss, kAtol) << what;
  testing::expect_close(a.logits, b.logits, kAtol, 0, what + " logits");
  testing::expect_close(a.grads, b.grads, kAtol, 1e-10, what + " gradients");
}

// Capacity dropping keeps the group's first tokens rank by rank, which is the single-rank order
// only for batch 1 (sequence_parallel_test.cpp); the two variants agree for any batch.
void check_model(const ModelConfig& c, int num_ranks, int64_t batch, const std::string& what) {
  constexpr int64_t kSeq = 8;
  Rng rng(11);
  std::vector<int32_t> tokens, targets;
  for (int64_t i = 0; i < batch * kSeq; ++i) {
    tokens.push_back(static_cast<int32_t>(rng.below(c.vocab_size)));
    targets.push_back(static_cast<int32_t>(rng.below(c.vocab_size)));
  }
  targets[1] = -1;
  SelfCommunicator self;
  const GroupRunResult full =
      run_model(c, EpDispatch::kAllGather, self, tokens, targets, batch, kSeq);

  std::vector<std::optional<GroupRunResult>> ag(num_ranks), a2a(num_ranks);
  for (const EpDispatch dispatch : {EpDispatch::kAllGather, EpDispatch::kAllToAll}) {
    std::vector<std::optional<GroupRunResult>>& runs =
        dispatch == EpDispatch::kAllGather ? ag : a2a;
    run_ranks(num_ranks, [&](Communicator& comm) {
      const int r = comm.rank();
      runs[r] = run_model(c, dispatch, comm, shard(tokens, batch, kSeq, r, num_ranks),
                          shard(targets, batch, kSeq, r, num_ranks), batch, kSeq / num_ranks);
    });
  }
  const int64_t vocab = c.vocab_size;
  const int64_t local_seq = kSeq / num_ranks;
  std::vector<double> grad_sum(full.grads.size(), 0.0);
  for (int r = 0; r < num_ranks; ++r) {
    const std::string where = what + " rank " + std::to_string(r);
    const GroupRunResult& rank = *a2a[r];
    expect_model_runs_equal(rank, *ag[r], where + " all-to-all vs all-gather");
    EXPECT_EQ(rank.num_dropped, ag[r]->num_dropped) << where;
    EXPECT_NEAR(rank.loss.loss, full.loss.loss, kAtol) << where;
    EXPECT_NEAR(rank.loss.aux_loss, full.loss.aux_loss, kAtol) << where;
    EXPECT_NEAR(rank.loss.z_loss, full.loss.z_loss, kAtol) << where;
    std::vector<double> expected_logits;
    for (int64_t b = 0; b < batch; ++b) {
      const int64_t first_row = b * kSeq + r * local_seq;
      expected_logits.insert(expected_logits.end(), full.logits.begin() + first_row * vocab,
                             full.logits.begin() + (first_row + local_seq) * vocab);
    }
    testing::expect_close(rank.logits, expected_logits, kAtol, 0, where + " logits");
    testing::add_rank_by_name(rank, rank.grads, full, grad_sum, where);
  }
  testing::expect_close(grad_sum, full.grads, kAtol, 1e-10, what + " summed gradients");
}

ModelConfig mixtral_like() {
  ModelConfig c = testing::tiny_config(Architecture::kMixtral);  // 4 experts, top-2
  c.num_kv_heads = 4;                                            // divisible by 4 ranks
  return c;
}

ModelConfig qwen3_moe_like() {
  ModelConfig c = testing::tiny_config(Architecture::kQwen3Moe);  // top-3, a dense layer 0
  c.num_experts = 8;
  c.num_kv_heads = 4;
  return c;
}

TEST(MoeDispatchA2aModel, MixtralTwoAndFourRanks) {
  check_model(mixtral_like(), 2, 2, "mixtral n2");
  check_model(mixtral_like(), 4, 2, "mixtral n4");
}

TEST(MoeDispatchA2aModel, Qwen3MoeTwoAndFourRanks) {
  check_model(qwen3_moe_like(), 2, 2, "qwen3_moe n2");
  check_model(qwen3_moe_like(), 4, 2, "qwen3_moe n4");
}

// The all-to-all dispatch's group aux loss over balance groups (one per rank).
TEST(MoeDispatchA2aModel, BalanceGroupsTwoAndFourRanks) {
  ModelConfig c = qwen3_moe_like();  // 8 experts
  for (const int ranks : {2, 4}) {
    c.router_balance_groups = ranks;
    check_model(c, ranks, 2, "qwen3_moe balance groups " + std::to_string(ranks));
  }
}

TEST(MoeDispatchA2aModel, TokenDroppingFourRanks) {
  ModelConfig c = mixtral_like();
  c.capacity_factor = 0.75;
  check_model(c, 4, 1, "mixtral capacity 0.75 n4");
}

}  // namespace
}  // namespace moeforge
