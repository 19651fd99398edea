// Sequence-parallel (Ulysses) attention of the Transformer over two in-process ranks: logits,
// losses and the group's summed gradients equal the single-rank model on the full sequences.
#include <gtest/gtest.h>

#include <cstdint>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/rng.h"
#include "model/model_test_configs.h"
#include "model/thread_communicator.h"
#include "model/transformer.h"
#include "testing/gradcheck.h"

namespace moeforge {
namespace {

constexpr int kNumRanks = 2;
constexpr int64_t kFullSeq = 6;
constexpr int64_t kLocalSeq = kFullSeq / kNumRanks;
constexpr uint64_t kSeed = 7;
constexpr double kInitStd = 0.5;
constexpr double kDloss = 0.75;

struct RunResult {
  LossBreakdown loss;
  std::vector<double> logits;  // [batch * seq, vocab]
  std::vector<double> grads;
  int64_t num_dropped = 0;  // over the MoE layers
};

// Forward and backward of one rank's model on tokens/targets [batch, seq].
RunResult run_model(const ModelConfig& c, Communicator& comm, const std::vector<int32_t>& tokens,
                    const std::vector<int32_t>& targets, int64_t batch, int64_t seq) {
  Transformer<double> model(c, comm);
  model.init_random(kSeed, kInitStd);
  model.zero_grads();
  RunResult out;
  out.loss = model.forward(tokens.data(), targets.data(), batch, seq);
  out.logits = model.logits();
  for (const MoeFfnStats& stats : model.moe_stats()) out.num_dropped += stats.num_dropped;
  model.backward(kDloss);
  out.grads = model.grads();
  return out;
}

// Positions [rank * kLocalSeq, (rank + 1) * kLocalSeq) of every sequence of full [batch, kFullSeq].
std::vector<int32_t> shard(const std::vector<int32_t>& full, int64_t batch, int rank) {
  std::vector<int32_t> out;
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t t = 0; t < kLocalSeq; ++t)
      out.push_back(full[b * kFullSeq + rank * kLocalSeq + t]);
  }
  return out;
}

// Capacity dropping keeps the first tokens in the group's order (rank by rank), which equals the
// single-rank order only for batch 1; dropless runs match for any batch. Returns the assignments
// the single-rank model dropped.
int64_t check_two_ranks_match_one_rank(const ModelConfig& c, int64_t batch,
                                       const std::string& what) {
  Rng rng(11);
  std::vector<int32_t> tokens, targets;
  for (int64_t i = 0; i < batch * kFullSeq; ++i) {
    tokens.push_back(static_cast<int32_t>(rng.below(c.vocab_size)));
    targets.push_back(static_cast<int32_t>(rng.below(c.vocab_size)));
  }
  targets[1] = -1;  // ignored, on rank 0 only: the ranks count different numbers of targets
  SelfCommunicator self;
  const RunResult full = run_model(c, self, tokens, targets, batch, kFullSeq);

  std::vector<RunResult> ranks(kNumRanks);
  testing::run_ranks(kNumRanks, [&](Communicator& comm) {
    ranks[comm.rank()] = run_model(c, comm, shard(tokens, batch, comm.rank()),
                                   shard(targets, batch, comm.rank()), batch, kLocalSeq);
  });

  const int64_t vocab = c.vocab_size;
  std::vector<double> grad_sum(full.grads.size(), 0.0);
  for (int r = 0; r < kNumRanks; ++r) {
    const RunResult& rank = ranks[r];
    const std::string where = what + " rank " + std::to_string(r);
    EXPECT_EQ(rank.loss.num_counted, full.loss.num_counted) << where;
    EXPECT_NEAR(rank.loss.ce_loss, full.loss.ce_loss, 1e-12) << where;
    EXPECT_NEAR(rank.loss.aux_loss, full.loss.aux_loss, 1e-12) << where;
    EXPECT_NEAR(rank.loss.z_loss, full.loss.z_loss, 1e-12) << where;
    EXPECT_NEAR(rank.loss.loss, full.loss.loss, 1e-12) << where;
    std::vector<double> expected_logits;
    for (int64_t b = 0; b < batch; ++b) {
      const int64_t first_row = b * kFullSeq + r * kLocalSeq;
      expected_logits.insert(expected_logits.end(), full.logits.begin() + first_row * vocab,
                             full.logits.begin() + (first_row + kLocalSeq) * vocab);
    }
    testing::expect_close(rank.logits, expected_logits, 1e-12, 1e-12, where + " logits");
    for (size_t i = 0; i < grad_sum.size(); ++i) grad_sum[i] += rank.grads[i];
  }
  testing::expect_close(grad_sum, full.grads, 1e-12, 1e-10, what + " summed gradients");
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

TEST(SequenceParallel, TwoRanksMatchOneRankWithTokenDropping) {
  ModelConfig c = moe_config(Architecture::kMixtral);
  c.capacity_factor = 0.75;
  EXPECT_GT(check_two_ranks_match_one_rank(c, 1, "mixtral capacity 0.75"), 0);
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
