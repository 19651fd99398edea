// The harness of the multi-rank model tests: one run of a small Transformer<double> per rank of an
// in-process group (each on its sequence shard), the single-rank run on the full sequences, and
// the check that they agree (losses, logits of each rank's positions, the group's summed
// gradient). Used by the sequence/expert-parallel and the tensor-parallel tests.
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "core/rng.h"
#include "model/thread_communicator.h"
#include "model/transformer.h"
#include "testing/gradcheck.h"

namespace moeforge::testing {

inline constexpr uint64_t kGroupInitSeed = 7;
inline constexpr double kGroupInitStd = 0.5;
inline constexpr double kGroupDloss = 0.75;

struct GroupRunResult {
  LossBreakdown loss;
  std::vector<double> logits;  // [batch * seq, vocab]
  ParameterLayout layout;      // the rank's (its experts only under sp_ep)
  std::vector<double> params;  // after init
  std::vector<double> grads;
  int64_t num_dropped = 0;             // over the MoE layers
  std::vector<EpDispatch> dispatches;  // the variant each MoE layer ran
};

// Forward and backward of one rank's model on tokens/targets [batch, seq].
inline GroupRunResult run_rank_model(const ModelConfig& c, ParallelLayout layout,
                                     const EpDispatchPlan& dispatch, Communicator& comm,
                                     const std::vector<int32_t>& tokens,
                                     const std::vector<int32_t>& targets, int64_t batch,
                                     int64_t seq) {
  Transformer<double> model(c, comm, dispatch, layout);
  model.init_random(kGroupInitSeed, kGroupInitStd);
  model.zero_grads();
  GroupRunResult out{.layout = model.layout(), .params = model.params()};
  out.loss = model.forward(tokens.data(), targets.data(), batch, seq);
  out.logits = model.logits();
  for (const MoeFfnStats& stats : model.moe_stats()) {
    out.num_dropped += stats.num_dropped;
    out.dispatches.push_back(stats.dispatch);
  }
  model.backward(kGroupDloss);
  out.grads = model.grads();
  return out;
}

// Positions [rank * local_seq, (rank + 1) * local_seq) of every sequence of full
// [batch, full_seq].
inline std::vector<int32_t> sequence_shard(const std::vector<int32_t>& full, int64_t batch,
                                           int64_t full_seq, int64_t local_seq, int rank) {
  std::vector<int32_t> out;
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t t = 0; t < local_seq; ++t) {
      out.push_back(full[b * full_seq + rank * local_seq + t]);
    }
  }
  return out;
}

struct TokenBatch {
  std::vector<int32_t> tokens, targets;  // [batch, full_seq]
};

// Random tokens and targets; target 1 is ignored (-1), on rank 0 only, so the ranks count
// different numbers of targets.
inline TokenBatch random_token_batch(const ModelConfig& c, int64_t batch, int64_t full_seq) {
  Rng rng(11);
  TokenBatch out;
  for (int64_t i = 0; i < batch * full_seq; ++i) {
    out.tokens.push_back(static_cast<int32_t>(rng.below(c.vocab_size)));
    out.targets.push_back(static_cast<int32_t>(rng.below(c.vocab_size)));
  }
  out.targets[1] = -1;
  return out;
}

// Every rank's run of c under layout over num_ranks in-process ranks; wrap may put a decorator
// (a counting communicator, say) between each rank and its model.
inline std::vector<GroupRunResult> run_group(
    const ModelConfig& c, ParallelLayout layout, const EpDispatchPlan& dispatch, int num_ranks,
    const TokenBatch& data, int64_t batch, int64_t full_seq,
    const std::function<Communicator&(Communicator&)>& wrap = {}) {
  const int64_t local_seq = full_seq / num_ranks;
  std::vector<std::optional<GroupRunResult>> ranks(static_cast<size_t>(num_ranks));
  run_ranks(num_ranks, [&](Communicator& comm) {
    Communicator& group = wrap ? wrap(comm) : comm;
    const int rank = comm.rank();
    ranks[static_cast<size_t>(rank)] = run_rank_model(
        c, layout, dispatch, group, sequence_shard(data.tokens, batch, full_seq, local_seq, rank),
        sequence_shard(data.targets, batch, full_seq, local_seq, rank), batch, local_seq);
  });
  std::vector<GroupRunResult> out;
  for (std::optional<GroupRunResult>& rank : ranks) out.push_back(std::move(*rank));
  return out;
}

// Adds the values of a rank's tensors (in its layout's order) into sum, the whole model's buffer,
// tensor by tensor under the same names, after checking that the rank holds the whole model's
// weights there (exactly).
inline void add_rank_by_name(const GroupRunResult& rank, const std::vector<double>& values,
                             const GroupRunResult& full, std::vector<double>& sum,
                             const std::string& where) {
  for (const ParamSpec& spec : rank.layout.specs()) {
    const ParamSpec* whole = full.layout.find(spec.name);
    ASSERT_NE(whole, nullptr) << where << ": " << spec.name;
    ASSERT_EQ(whole->numel, spec.numel) << where << ": " << spec.name;
    for (int64_t i = 0; i < spec.numel; ++i) {
      ASSERT_EQ(rank.params[static_cast<size_t>(spec.offset + i)],
                full.params[static_cast<size_t>(whole->offset + i)])
          << where << ": weight " << spec.name << " [" << i << "]";
      sum[static_cast<size_t>(whole->offset + i)] += values[static_cast<size_t>(spec.offset + i)];
    }
  }
}

// Every rank holds the single-rank model's weights under the same names (exactly), reports the
// single-rank losses and counted targets and the logits of its positions (within 1e-12), and the
// ranks' gradients, added up by tensor name, sum to the single-rank gradient; a tensor several
// ranks hold is a replicated one, whose gradients the group sums, one rank's tensor (its experts)
// already has the whole gradient.
inline void expect_group_matches_one_rank(const GroupRunResult& full,
                                          const std::vector<GroupRunResult>& ranks, int64_t batch,
                                          int64_t full_seq, int64_t vocab,
                                          const std::string& what) {
  const auto num_ranks = static_cast<int64_t>(ranks.size());
  const int64_t local_seq = full_seq / num_ranks;
  std::vector<double> grad_sum(full.grads.size(), 0.0);
  for (int64_t r = 0; r < num_ranks; ++r) {
    const GroupRunResult& rank = ranks[static_cast<size_t>(r)];
    const std::string where = what + " rank " + std::to_string(r);
    EXPECT_EQ(rank.loss.num_counted, full.loss.num_counted) << where;
    EXPECT_NEAR(rank.loss.ce_loss, full.loss.ce_loss, 1e-12) << where;
    EXPECT_NEAR(rank.loss.aux_loss, full.loss.aux_loss, 1e-12) << where;
    EXPECT_NEAR(rank.loss.z_loss, full.loss.z_loss, 1e-12) << where;
    EXPECT_NEAR(rank.loss.loss, full.loss.loss, 1e-12) << where;
    std::vector<double> expected_logits;
    for (int64_t b = 0; b < batch; ++b) {
      const int64_t first_row = b * full_seq + r * local_seq;
      expected_logits.insert(expected_logits.end(), full.logits.begin() + first_row * vocab,
                             full.logits.begin() + (first_row + local_seq) * vocab);
    }
    expect_close(rank.logits, expected_logits, 1e-12, 1e-12, where + " logits");
    add_rank_by_name(rank, rank.grads, full, grad_sum, where);
  }
  expect_close(grad_sum, full.grads, 1e-12, 1e-10, what + " summed gradients");
}

}  // namespace moeforge::testing
