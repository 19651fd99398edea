// Sequence-parallel (Ulysses) attention of the Transformer over two in-process ranks: logits,
// losses and the group's summed gradients equal the single-rank model on the full sequences.
#include <gtest/gtest.h>

#include <cstdint>
#include <string>
#include <vector>

#include "core/error.h"
#include "model/group_equivalence.h"
#include "model/model_test_configs.h"
#include "model/thread_communicator.h"
#include "model/transformer.h"

namespace moeforge {
namespace {

constexpr int kNumRanks = 2;
constexpr int64_t kFullSeq = 6;

// Capacity dropping keeps the first tokens in the group's order (rank by rank), which equals the
// single-rank order only for batch 1; dropless runs match for any batch. Returns the assignments
// the single-rank model dropped.
int64_t check_two_ranks_match_one_rank(const ModelConfig& c, int64_t batch,
                                       const std::string& what) {
  const testing::TokenBatch data = testing::random_token_batch(c, batch, kFullSeq);
  SelfCommunicator self;
  const testing::GroupRunResult full =
      testing::run_rank_model(c, ParallelLayout::kSequenceExpert, EpDispatch::kAuto, self,
                              data.tokens, data.targets, batch, kFullSeq);
  const std::vector<testing::GroupRunResult> ranks = testing::run_group(
      c, ParallelLayout::kSequenceExpert, EpDispatch::kAuto, kNumRanks, data, batch, kFullSeq);
  testing::expect_group_matches_one_rank(full, ranks, batch, kFullSeq, c.vocab_size, what);
  return full.num_dropped;
}

ModelConfig moe_config(Architecture arch) {
  ModelConfig c = testing::tiny_config(arch);
  c.num_experts = 6;  // divisible by the two ranks
  return c;
}

TEST(SequenceParallel, TwoRanksMatchOneRankMixtral) {
  check_two_ranks_match_one_rank(moe_config(Architecture::kMixtral), 2, "mixtral");
}

TEST(SequenceParallel, TwoRanksMatchOneRankQwen3MoeWithQkNorm) {
  check_two_ranks_match_one_rank(moe_config(Architecture::kQwen3Moe), 2, "qwen3_moe");
}

TEST(SequenceParallel, TwoRanksMatchOneRankQwen2MoeWithSharedExpertAndBiases) {
  check_two_ranks_match_one_rank(moe_config(Architecture::kQwen2Moe), 2, "qwen2_moe");
}

// parallel.ep_dispatch per layer: each MoE layer runs its own entry, and the group still equals
// one rank.
TEST(SequenceParallel, PerLayerDispatchPlanRunsEachLayersEntryAndMatchesOneRank) {
  const ModelConfig c = moe_config(Architecture::kMixtral);
  ASSERT_EQ(c.num_layers, 2);
  ASSERT_TRUE(c.layer_is_moe(0) && c.layer_is_moe(1));
  const int64_t batch = 2;
  const testing::TokenBatch data = testing::random_token_batch(c, batch, kFullSeq);
  SelfCommunicator self;
  const testing::GroupRunResult full =
      testing::run_rank_model(c, ParallelLayout::kSequenceExpert, EpDispatch::kAuto, self,
                              data.tokens, data.targets, batch, kFullSeq);
  for (const std::vector<EpDispatch>& per_layer :
       {std::vector<EpDispatch>{EpDispatch::kAllGather, EpDispatch::kAllToAll},
        std::vector<EpDispatch>{EpDispatch::kAllToAll, EpDispatch::kAllGather}}) {
    const std::string what = ep_dispatch_name(per_layer[0]) + "," + ep_dispatch_name(per_layer[1]);
    const std::vector<testing::GroupRunResult> ranks =
        testing::run_group(c, ParallelLayout::kSequenceExpert, EpDispatchPlan(per_layer), kNumRanks,
                           data, batch, kFullSeq);
    testing::expect_group_matches_one_rank(full, ranks, batch, kFullSeq, c.vocab_size, what);
    for (const testing::GroupRunResult& rank : ranks) EXPECT_EQ(rank.dispatches, per_layer) << what;
  }
  EXPECT_THROW(Transformer<double>(c, self,
                                   EpDispatchPlan({EpDispatch::kAllGather, EpDispatch::kAllToAll,
                                                   EpDispatch::kAuto})),
               Error);
}

TEST(SequenceParallel, TwoRanksMatchOneRankWithTokenDropping) {
  ModelConfig c = moe_config(Architecture::kMixtral);
  c.capacity_factor = 0.75;
  EXPECT_GT(check_two_ranks_match_one_rank(c, 1, "mixtral capacity 0.75"), 0);
}

// The aux loss balancing each rank's experts as a group (router_balance_groups = the group size).
TEST(SequenceParallel, TwoRanksMatchOneRankWithPerRankBalance) {
  ModelConfig c = moe_config(Architecture::kQwen3Moe);
  c.router_balance_groups = kNumRanks;
  check_two_ranks_match_one_rank(c, 2, "qwen3_moe balance groups 2");
}

TEST(SequenceParallel, RejectsHeadsNotDivisibleByTheGroup) {
  testing::ThreadGroup group(kNumRanks);
  testing::ThreadCommunicator rank0(group, 0);
  ModelConfig c = moe_config(Architecture::kMixtral);
  c.num_kv_heads = 1;
  EXPECT_THROW(Transformer<double>(c, rank0), Error);
  c.num_heads = 3;
  c.num_kv_heads = 3;
  EXPECT_THROW(Transformer<double>(c, rank0), Error);
}

TEST(SequenceParallel, IncrementalDecodingNeedsOneRank) {
  testing::ThreadGroup group(kNumRanks);
  testing::ThreadCommunicator rank0(group, 0);
  const ModelConfig c = moe_config(Architecture::kMixtral);
  Transformer<double> model(c, rank0);
  KvCache<double> cache(c, 4);
  const int32_t token = 1;
  std::vector<double> logits(static_cast<size_t>(c.vocab_size));
  EXPECT_THROW(model.forward_incremental(&token, 1, cache, logits.data()), Error);
}

}  // namespace
}  // namespace moeforge
