// Tensor parallelism (Megatron-LM's baseline, model/tensor_parallel.h) of the Transformer over 2
// and 4 in-process ranks: logits, losses and the group's summed gradients equal the single-rank
// model on the full sequences (MoE, dense, GQA with q/k norm, shared expert with biases, token
// dropping); each rank's gradient of a split weight stays in its slice; both layouts' measured
// communication per layer equals tensor_parallel.h's formulas; configs that do not split fail.
#include "model/tensor_parallel.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "comm/counting_communicator.h"
#include "core/error.h"
#include "model/group_equivalence.h"
#include "model/model_test_configs.h"
#include "model/thread_communicator.h"
#include "model/transformer.h"

namespace moeforge {
namespace {

using Collective = CountingCommunicator::Collective;

using testing::GroupRunResult;
using testing::TokenBatch;

constexpr int64_t kFullSeq = 8;

TokenBatch random_batch(const ModelConfig& c, int64_t batch) {
  return testing::random_token_batch(c, batch, kFullSeq);
}

std::vector<GroupRunResult> run_group(
    const ModelConfig& c, ParallelLayout layout, EpDispatch dispatch, int num_ranks,
    const TokenBatch& data, int64_t batch,
    const std::function<Communicator&(Communicator&)>& wrap = {}) {
  return testing::run_group(c, layout, dispatch, num_ranks, data, batch, kFullSeq, wrap);
}

// Capacity dropping keeps the first tokens in the group's order (rank by rank), which equals the
// single-rank order only for batch 1; dropless runs match for any batch. Returns the assignments
// the single-rank model dropped.
int64_t check_tp_matches_one_rank(const ModelConfig& c, int num_ranks, int64_t batch,
                                  const std::string& name) {
  const std::string what = name + " over " + std::to_string(num_ranks) + " ranks";
  const TokenBatch data = random_batch(c, batch);
  SelfCommunicator self;
  const GroupRunResult full =
      testing::run_rank_model(c, ParallelLayout::kSequenceExpert, EpDispatch::kAuto, self,
                              data.tokens, data.targets, batch, kFullSeq);
  const std::vector<GroupRunResult> ranks =
      run_group(c, ParallelLayout::kTensor, EpDispatch::kAuto, num_ranks, data, batch);
  testing::expect_group_matches_one_rank(full, ranks, batch, kFullSeq, c.vocab_size, what);
  // Every rank routes all the group's tokens: it sees every drop.
  for (int r = 0; r < num_ranks; ++r) {
    EXPECT_EQ(ranks[r].num_dropped, full.num_dropped) << what << " rank " << r;
  }
  return full.num_dropped;
}

// The tiny config of arch split n ways: 2n query heads over n KV heads (GQA), intermediate sizes
// that are multiples of n, and distinct where the architecture allows.
ModelConfig tp_config(Architecture arch, int64_t n) {
  ModelConfig c = testing::tiny_config(arch);
  c.num_heads = 2 * n;
  c.num_kv_heads = n;
  c.intermediate_size = 3 * n;
  if (c.is_moe()) {
    c.moe_intermediate_size = arch == Architecture::kMixtral ? c.intermediate_size : 2 * n;
    if (c.shared_expert_intermediate_size > 0) c.shared_expert_intermediate_size = n;
  }
  return c;
}

TEST(TensorParallel, MatchesOneRankMixtral) {
  for (const int n : {2, 4})
    check_tp_matches_one_rank(tp_config(Architecture::kMixtral, n), n, 2, "mixtral");
}

TEST(TensorParallel, MatchesOneRankQwen3MoeWithQkNormAndADenseLayer) {
  for (const int n : {2, 4}) {
    check_tp_matches_one_rank(tp_config(Architecture::kQwen3Moe, n), n, 2, "qwen3_moe");
  }
}

TEST(TensorParallel, MatchesOneRankQwen2MoeWithGatedSharedExpertAndBiases) {
  // 5 experts: tensor parallelism splits each expert, not the set of experts.
  for (const int n : {2, 4}) {
    const ModelConfig c = tp_config(Architecture::kQwen2Moe, n);
    ASSERT_EQ(c.num_experts % n, 1);
    check_tp_matches_one_rank(c, n, 2, "qwen2_moe");
  }
}

TEST(TensorParallel, MatchesOneRankDenseModels) {
  for (const int n : {2, 4}) {
    check_tp_matches_one_rank(tp_config(Architecture::kLlama, n), n, 2, "llama (tied)");
    check_tp_matches_one_rank(tp_config(Architecture::kQwen3, n), n, 2, "qwen3");
  }
}

TEST(TensorParallel, MatchesOneRankWithTokenDropping) {
  for (const int n : {2, 4}) {
    ModelConfig c = tp_config(Architecture::kMixtral, n);
    c.capacity_factor = 0.75;
    EXPECT_GT(check_tp_matches_one_rank(c, n, 1, "mixtral capacity 0.75"), 0);
  }
}

// Non-zero elements of the gradient tensor at offset, viewed as [rows, cols], inside and outside
// the columns of slice.
struct SliceCounts {
  int64_t inside = 0, outside = 0;
};
SliceCounts count_nonzero(const std::vector<double>& grads, int64_t offset,
                          const ColumnSlice& slice) {
  SliceCounts counts;
  for (int64_t i = 0; i < slice.rows; ++i) {
    for (int64_t j = 0; j < slice.cols; ++j) {
      if (grads[offset + i * slice.cols + j] == 0.0) continue;
      const bool inside = j >= slice.begin && j < slice.begin + slice.width;
      ++(inside ? counts.inside : counts.outside);
    }
  }
  return counts;
}

TEST(TensorParallel, GradientsOfSplitWeightsStayInTheRanksSlices) {
  constexpr int kRanks = 2;
  const ModelConfig c = tp_config(Architecture::kQwen2Moe, kRanks);
  const ParameterLayout layout(c);
  const std::vector<GroupRunResult> ranks =
      run_group(c, ParallelLayout::kTensor, EpDispatch::kAuto, kRanks, random_batch(c, 2), 2);
  const int64_t h = c.hidden_size, qd = c.q_dim(), kvd = c.kv_dim();
  const int64_t f = c.moe_intermediate_size / kRanks,
                s = c.shared_expert_intermediate_size / kRanks;
  for (int r = 0; r < kRanks; ++r) {
    const LayerOffsets& o = layout.layer(1);
    // Column-parallel weights by rows (a [1, out * in] view), row-parallel ones by columns.
    const std::vector<std::pair<std::string, std::pair<int64_t, ColumnSlice>>> tensors = {
        {"q_proj", {o.q_proj, {1, qd * h, r * qd / kRanks * h, qd / kRanks * h}}},
        {"q_bias", {o.q_bias, {1, qd, r * qd / kRanks, qd / kRanks}}},
        {"v_proj", {o.v_proj, {1, kvd * h, r * kvd / kRanks * h, kvd / kRanks * h}}},
        {"o_proj", {o.o_proj, {h, qd, r * qd / kRanks, qd / kRanks}}},
        {"experts gate", {o.experts_gate, {c.num_experts, 2 * f * h, r * f * h, f * h}}},
        {"experts down", {o.experts_down, {c.num_experts * h, 2 * f, r * f, f}}},
        {"shared up", {o.shared_up, {1, 2 * s * h, r * s * h, s * h}}},
        {"shared down", {o.shared_down, {h, 2 * s, r * s, s}}},
    };
    for (const auto& [name, tensor] : tensors) {
      const SliceCounts counts = count_nonzero(ranks[r].grads, tensor.first, tensor.second);
      EXPECT_GT(counts.inside, 0) << name << " rank " << r;
      EXPECT_EQ(counts.outside, 0) << name << " rank " << r;
    }
  }
}

// What one rank sends, measured over a forward and a backward of a two-layer Qwen2-MoE-like model
// (layer 0 dense, layer 1 MoE with a gated shared expert), against tensor_parallel.h's per-layer
// formulas summed over the layers, plus the loss's all-reduce of 2 doubles.
TEST(TensorParallel, CommunicationVolumePerLayerFollowsTheFormulas) {
  for (const int n : {2, 4}) {
    ModelConfig c = tp_config(Architecture::kQwen2Moe, n);
    c.num_experts = 8;  // divisible by n, for sp_ep
    c.dense_layers = {0};
    constexpr int64_t kBatch = 2;
    const int64_t local_tokens = kBatch * kFullSeq / n;  // N
    const int64_t h = c.hidden_size, k = c.num_experts_per_tok;
    const int64_t q = c.q_dim(), kv = c.kv_dim(), m = n - 1;
    const TokenBatch data = random_batch(c, kBatch);
    for (const ParallelLayout layout : {ParallelLayout::kTensor, ParallelLayout::kSequenceExpert}) {
      std::vector<std::unique_ptr<CountingCommunicator>> counters(n);
      run_group(c, layout, EpDispatch::kAllGather, n, data, kBatch,
                [&](Communicator& comm) -> Communicator& {
                  counters[comm.rank()] = std::make_unique<CountingCommunicator>(comm);
                  return *counters[comm.rank()];
                });
      // Per layer (forward + backward): all-gathers, reduce-scatters, all-to-alls, all-reduces.
      const int64_t rows = m * local_tokens * h;  // (n - 1) N h
      const int64_t gates = m * n * local_tokens * k;
      int64_t all_gather = 0, reduce_scatter = 0, all_to_all = 0, all_reduce = 2 * m;
      if (layout == ParallelLayout::kTensor) {
        all_gather = 2 * rows * 4;  // attention x 2 layers, the dense FFN, the MoE layer
        reduce_scatter = 2 * rows * 4;
        all_reduce += gates + m * n * local_tokens;  // gate gradients, shared gate scores
      } else {
        all_gather = 2 * rows;  // the MoE layer
        reduce_scatter = 2 * rows;
        all_to_all = 2 * 4 * m * local_tokens * (q + kv) / n;  // Ulysses attention x 2 layers
        all_reduce += gates;
      }
      const std::string what = parallel_layout_name(layout) + " over " + std::to_string(n);
      for (int r = 0; r < n; ++r) {
        const CountingCommunicator& counted = *counters[r];
        EXPECT_EQ(counted.elements(Collective::kAllGather), all_gather) << what << " rank " << r;
        EXPECT_EQ(counted.elements(Collective::kReduceScatter), reduce_scatter) << what;
        EXPECT_EQ(counted.elements(Collective::kAllToAll), all_to_all) << what;
        EXPECT_EQ(counted.elements(Collective::kAllReduce), all_reduce) << what;
        EXPECT_EQ(counted.bytes(),
                  sizeof(double) * (all_gather + reduce_scatter + all_to_all + all_reduce))
            << what;
      }
    }
  }
}

// The message of the Error that fn throws.
std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.what();
  }
  return "no error";
}

TEST(TensorParallel, RejectsConfigsThatDoNotSplit) {
  testing::ThreadGroup group(2);
  testing::ThreadCommunicator rank0(group, 0);
  const auto build = [&](const ModelConfig& c, ParallelLayout layout) {
    return error_of([&] { Transformer<double>(c, rank0, EpDispatch::kAuto, layout); });
  };
  const ModelConfig ok = tp_config(Architecture::kQwen2Moe, 2);
  EXPECT_EQ(build(ok, ParallelLayout::kTensor), "no error");
  // 5 experts split under sp_ep, not under tp.
  EXPECT_NE(build(ok, ParallelLayout::kSequenceExpert).find("num_experts (5)"), std::string::npos);
  ModelConfig c = ok;
  c.num_kv_heads = 1;
  EXPECT_NE(build(c, ParallelLayout::kTensor).find("num_kv_heads (1)"), std::string::npos);
  c = ok;
  c.moe_intermediate_size = 3;
  EXPECT_NE(build(c, ParallelLayout::kTensor).find("moe_intermediate_size (3)"), std::string::npos);
  c = ok;
  c.shared_expert_intermediate_size = 5;
  EXPECT_NE(build(c, ParallelLayout::kTensor).find("shared_expert_intermediate_size (5)"),
            std::string::npos);
  c = tp_config(Architecture::kQwen3Moe, 2);
  c.intermediate_size = 7;  // the dense layer 0
  EXPECT_NE(build(c, ParallelLayout::kTensor).find("intermediate_size (7)"), std::string::npos);
  c = ok;
  c.intermediate_size = 7;  // no dense layer uses it
  EXPECT_EQ(build(c, ParallelLayout::kTensor), "no error");
}

TEST(TensorParallel, LayoutNames) {
  for (const ParallelLayout layout : {ParallelLayout::kSequenceExpert, ParallelLayout::kTensor}) {
    EXPECT_EQ(parse_parallel_layout(parallel_layout_name(layout)), layout);
  }
  EXPECT_EQ(parallel_layout_name(ParallelLayout::kTensor), "tp");
  EXPECT_NE(error_of([] { parse_parallel_layout("megatron"); }).find("\"sp_ep\" or \"tp\""),
            std::string::npos);
}

}  // namespace
}  // namespace moeforge
