// A model whose experts are sharded over in-process ranks: the shards put together on rank 0 are
// the whole model's buffer, and the gradient norm over the shards is the whole gradient's.
#include "train/expert_shards.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "core/rng.h"
#include "model/model_test_configs.h"
#include "model/thread_communicator.h"
#include "train/adamw.h"

namespace moeforge {
namespace {

ModelConfig six_experts() {
  ModelConfig c = testing::tiny_config(Architecture::kQwen2Moe);  // shared expert, biases
  c.num_experts = 6;
  return c;
}

// Values that differ everywhere, so a misplaced tensor cannot go unnoticed.
std::vector<float> whole_values(const ParameterLayout& whole) {
  std::vector<float> values(static_cast<size_t>(whole.num_params()));
  Rng rng(5);
  for (float& v : values) v = static_cast<float>(rng.normal());
  return values;
}

// This rank's buffer: the whole buffer's values under its layout's names.
std::vector<float> shard_of(const ParameterLayout& shard, const ParameterLayout& whole,
                            const std::vector<float>& values) {
  std::vector<float> out(static_cast<size_t>(shard.num_params()));
  for (const ParamSpec& spec : shard.specs()) {
    const int64_t from = whole.find(spec.name)->offset;
    std::copy(values.begin() + from, values.begin() + from + spec.numel, out.begin() + spec.offset);
  }
  return out;
}

TEST(ExpertShards, GatherGivesRankZeroTheWholeBuffer) {
  const ModelConfig c = six_experts();
  const ParameterLayout whole(c);
  const std::vector<float> values = whole_values(whole);
  for (const int n : {1, 2, 3}) {
    std::vector<std::vector<float>> gathered(static_cast<size_t>(n));
    testing::run_ranks(n, [&](Communicator& comm) {
      const ParameterLayout shard(c, {comm.rank(), n});
      const std::vector<float> mine = shard_of(shard, whole, values);
      gathered[static_cast<size_t>(comm.rank())] = gather_expert_shards(shard, mine.data(), comm);
    });
    EXPECT_EQ(gathered[0], values) << n << " ranks";
    for (int r = 1; r < n; ++r) EXPECT_TRUE(gathered[static_cast<size_t>(r)].empty()) << r;
  }
}

TEST(ExpertShards, GatherChecksTheGroupHoldsTheShards) {
  const ModelConfig c = six_experts();
  testing::run_ranks(2, [&](Communicator& comm) {
    const ParameterLayout shard(c, {1 - comm.rank(), 2});  // ranks swapped
    const std::vector<float> mine(static_cast<size_t>(shard.num_params()));
    EXPECT_THROW(gather_expert_shards(shard, mine.data(), comm), Error);
  });
}

// The replicated tensors count once, each expert once: the norm equals the whole gradient's.
TEST(ExpertShards, GradientNormOverTheShardsIsTheWholeGradients) {
  const ModelConfig c = six_experts();
  const ParameterLayout whole(c);
  const std::vector<float> grads = whole_values(whole);
  const double want = global_grad_norm(grads.data(), whole.num_params());
  for (const int n : {2, 3}) {
    std::vector<double> norms(static_cast<size_t>(n));
    testing::run_ranks(n, [&](Communicator& comm) {
      const ParameterLayout shard(c, {comm.rank(), n});
      const std::vector<float> mine = shard_of(shard, whole, grads);
      const GradSquares squares = grad_squares(shard, mine.data(), 0, shard.num_params());
      EXPECT_GT(squares.experts, 0.0);
      norms[static_cast<size_t>(comm.rank())] = model_grad_norm(squares, &comm);
      // A piece of the buffer (a ZeRO-1 shard) splits at the expert ranges the same way.
      const int64_t half = shard.num_params() / 2;
      const GradSquares first = grad_squares(shard, mine.data(), 0, half);
      const GradSquares second = grad_squares(shard, mine.data() + half, half, shard.num_params());
      EXPECT_NEAR(first.replicated + second.replicated, squares.replicated,
                  1e-12 * squares.replicated);
      EXPECT_NEAR(first.experts + second.experts, squares.experts, 1e-12 * squares.experts);
    });
    for (const double norm : norms) EXPECT_NEAR(norm, want, 1e-12 * want) << n << " ranks";
  }
  // Unsharded: one replicated piece, the global norm's very sum.
  const GradSquares all = grad_squares(whole, grads.data(), 0, whole.num_params());
  EXPECT_EQ(all.experts, 0.0);
  EXPECT_EQ(std::sqrt(all.replicated), want);
  EXPECT_EQ(model_grad_norm(all, nullptr), want);
}

}  // namespace
}  // namespace moeforge
