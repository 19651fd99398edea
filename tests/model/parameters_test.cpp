// The parameter layout against the closed-form parameter count of each architecture, and the
// HF tensor names it must use.
#include "model/parameters.h"

#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "core/error.h"
#include "model/model_test_configs.h"

namespace moeforge {
namespace {

int64_t closed_form_count(const ModelConfig& c) {
  const int64_t h = c.hidden_size, qd = c.num_heads * c.head_dim, kvd = c.num_kv_heads * c.head_dim;
  int64_t attention = h * qd + 2 * h * kvd + qd * h;
  if (c.attention_bias) attention += qd + 2 * kvd;
  if (c.qk_norm) attention += 2 * c.head_dim;
  int64_t total = c.vocab_size * h + h + (c.tie_word_embeddings ? 0 : c.vocab_size * h);
  for (int64_t l = 0; l < c.num_layers; ++l) {
    total += 2 * h + attention;
    if (c.layer_is_moe(l)) {
      total += c.num_experts * h + c.num_experts * 3 * h * c.moe_intermediate_size;
      if (c.shared_expert_intermediate_size > 0)
        total += 3 * h * c.shared_expert_intermediate_size + h;
    } else {
      total += 3 * h * c.intermediate_size;
    }
  }
  return total;
}

TEST(ParameterLayout, CountsMatchClosedFormForEveryArchitecture) {
  for (Architecture arch : testing::all_architectures()) {
    const ModelConfig c = testing::tiny_config(arch);
    const ParameterLayout layout(c);
    EXPECT_EQ(layout.num_params(), closed_form_count(c)) << architecture_name(arch);
    int64_t sum = 0;
    for (const ParamSpec& s : layout.specs()) sum += s.numel;
    EXPECT_EQ(sum, layout.num_params()) << architecture_name(arch);
  }
}

TEST(ParameterLayout, ActiveCountExcludesUnselectedExperts) {
  const ModelConfig c = testing::tiny_config(Architecture::kMixtral);
  const ParameterLayout layout(c);
  const int64_t per_expert = 3 * c.hidden_size * c.moe_intermediate_size;
  EXPECT_EQ(
      layout.num_active_params(),
      layout.num_params() - c.num_layers * (c.num_experts - c.num_experts_per_tok) * per_expert);
}

TEST(ParameterLayout, BenchConfigMatchesAnchorCounts) {
  // The anchors.md config: 1.83B parameters, 0.42B active (PyTorch counts its untied head too).
  ModelConfig c;
  c.architecture = Architecture::kMixtral;
  c.vocab_size = 32768;
  c.hidden_size = 2048;
  c.num_layers = 8;
  c.num_heads = 16;
  c.num_kv_heads = 4;
  c.head_dim = 128;
  c.num_experts = 16;
  c.num_experts_per_tok = 2;
  c.moe_intermediate_size = 2048;
  c.intermediate_size = 2048;
  const ParameterLayout layout(c);
  EXPECT_NEAR(layout.num_params() / 1e9, 1.83, 0.005);
  EXPECT_NEAR(layout.num_active_params() / 1e9, 0.42, 0.005);
}

TEST(ParameterLayout, UsesHuggingFaceNames) {
  const ParameterLayout mixtral(testing::tiny_config(Architecture::kMixtral));
  for (const char* name :
       {"model.embed_tokens.weight", "model.layers.1.block_sparse_moe.gate.weight",
        "model.layers.0.block_sparse_moe.experts.3.w1.weight",
        "model.layers.0.block_sparse_moe.experts.0.w2.weight",
        "model.layers.0.block_sparse_moe.experts.2.w3.weight",
        "model.layers.1.self_attn.o_proj.weight", "model.norm.weight", "lm_head.weight",
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.post_attention_layernorm.weight"}) {
    EXPECT_NE(mixtral.find(name), nullptr) << name;
  }
  const ParameterLayout qwen3moe(testing::tiny_config(Architecture::kQwen3Moe));
  EXPECT_NE(qwen3moe.find("model.layers.0.mlp.gate_proj.weight"), nullptr);  // dense layer 0
  EXPECT_NE(qwen3moe.find("model.layers.1.mlp.experts.5.down_proj.weight"), nullptr);
  EXPECT_NE(qwen3moe.find("model.layers.1.self_attn.q_norm.weight"), nullptr);
  const ParameterLayout qwen2moe(testing::tiny_config(Architecture::kQwen2Moe));
  EXPECT_NE(qwen2moe.find("model.layers.0.mlp.shared_expert.up_proj.weight"), nullptr);
  EXPECT_NE(qwen2moe.find("model.layers.0.mlp.shared_expert_gate.weight"), nullptr);
  EXPECT_NE(qwen2moe.find("model.layers.0.self_attn.k_proj.bias"), nullptr);
  const ParameterLayout llama(testing::tiny_config(Architecture::kLlama));
  EXPECT_EQ(llama.find("lm_head.weight"), nullptr);  // tied
  EXPECT_EQ(llama.lm_head(), llama.embed_tokens());
}

TEST(ParameterLayout, ExpertsAreContiguousPerProjection) {
  const ModelConfig c = testing::tiny_config(Architecture::kMixtral);
  const ParameterLayout layout(c);
  const int64_t numel = c.moe_intermediate_size * c.hidden_size;
  for (int64_t e = 0; e < c.num_experts; ++e) {
    const ParamSpec* w1 =
        layout.find("model.layers.1.block_sparse_moe.experts." + std::to_string(e) + ".w1.weight");
    ASSERT_NE(w1, nullptr);
    EXPECT_EQ(w1->offset, layout.layer(1).experts_gate + e * numel);
  }
}

// A shard of the experts keeps every other tensor and experts [r E / n, (r + 1) E / n) of each
// MoE layer under their global names, in the whole layout's order; each layer's experts are one
// range and the replicated ranges are the rest.
TEST(ParameterLayout, ExpertShardHoldsItsExpertsUnderGlobalNames) {
  ModelConfig c = testing::tiny_config(Architecture::kQwen2Moe);  // shared expert, biases
  c.num_experts = 6;
  const ParameterLayout whole(c);
  const int64_t per_expert = 3 * c.hidden_size * c.moe_intermediate_size;
  for (const int64_t n : {2, 3}) {
    int64_t covered = 0;
    for (int64_t r = 0; r < n; ++r) {
      const ParameterLayout shard(c, {r, n});
      const std::string what = std::to_string(r) + " of " + std::to_string(n);
      EXPECT_TRUE(shard.experts_sharded()) << what;
      EXPECT_EQ(shard.num_local_experts(), c.num_experts / n) << what;
      EXPECT_EQ(shard.num_model_params(), whole.num_params()) << what;
      EXPECT_EQ(shard.num_active_params(), whole.num_active_params()) << what;
      EXPECT_EQ(
          shard.num_params(),
          whole.num_params() - c.num_layers * (c.num_experts - c.num_experts / n) * per_expert)
          << what;
      std::vector<std::string> expected;
      for (const ParamSpec& spec : whole.specs()) {
        const size_t at = spec.name.find(".experts.");
        if (at != std::string::npos) {
          const int64_t e = std::stoll(spec.name.substr(at + 9));
          if (e < r * c.num_experts / n || e >= (r + 1) * c.num_experts / n) continue;
        }
        expected.push_back(spec.name);
      }
      std::vector<std::string> names;
      int64_t offset = 0;
      for (const ParamSpec& spec : shard.specs()) {
        names.push_back(spec.name);
        EXPECT_EQ(spec.offset, offset) << spec.name;
        offset += spec.numel;
      }
      EXPECT_EQ(names, expected) << what;
      // One range per MoE layer: its gate, up and down experts; the replicated ranges tile the
      // rest.
      ASSERT_EQ(shard.expert_ranges().size(), static_cast<size_t>(c.num_layers)) << what;
      int64_t in_ranges = 0;
      for (int64_t l = 0; l < c.num_layers; ++l) {
        const ParamRange& range = shard.expert_ranges()[static_cast<size_t>(l)];
        EXPECT_EQ(range.offset, shard.layer(l).experts_gate) << what;
        EXPECT_EQ(range.count, c.num_experts / n * per_expert) << what;
        in_ranges += range.count;
      }
      int64_t next = 0, replicated = 0;
      for (const ParamRange& range : shard.replicated_ranges()) {
        EXPECT_GT(range.count, 0);
        EXPECT_GE(range.offset, next);
        next = range.offset + range.count;
        replicated += range.count;
      }
      EXPECT_EQ(replicated + in_ranges, shard.num_params()) << what;
      covered += in_ranges;
    }
    EXPECT_EQ(covered, c.num_layers * c.num_experts * per_expert) << n;
  }
  // One shard: nothing sharded, no expert ranges, one replicated range.
  EXPECT_FALSE(whole.experts_sharded());
  EXPECT_TRUE(whole.expert_ranges().empty());
  ASSERT_EQ(whole.replicated_ranges().size(), 1u);
  EXPECT_EQ(whole.replicated_ranges()[0].count, whole.num_params());
}

TEST(ParameterLayout, ExpertShardsMustSplitTheExperts) {
  const ModelConfig c = testing::tiny_config(Architecture::kMixtral);  // 4 experts
  EXPECT_THROW(ParameterLayout(c, {0, 3}), Error);
  EXPECT_THROW(ParameterLayout(c, {2, 2}), Error);
  EXPECT_THROW(ParameterLayout(c, {-1, 2}), Error);
  EXPECT_THROW(ParameterLayout(c, {0, 0}), Error);
  // A dense model has nothing to shard.
  const ParameterLayout dense(testing::tiny_config(Architecture::kLlama), {1, 2});
  EXPECT_FALSE(dense.experts_sharded());
  EXPECT_EQ(dense.num_params(), dense.num_model_params());
}

// A shard's initial weights are the whole model's under the same names, bit for bit.
TEST(ParameterLayout, ShardInitialWeightsEqualTheWholeModels) {
  const ModelConfig c =
      testing::tiny_config(Architecture::kQwen3Moe);  // 6 experts, a dense layer 0
  const ParameterLayout whole(c);
  std::vector<float> all(static_cast<size_t>(whole.num_params()));
  init_random_params(whole, 3, 0.2, all.data());
  for (int64_t r = 0; r < 3; ++r) {
    const ParameterLayout shard(c, {r, 3});
    std::vector<float> mine(static_cast<size_t>(shard.num_params()));
    init_random_params(shard, 3, 0.2, mine.data());
    for (const ParamSpec& spec : shard.specs()) {
      const ParamSpec* at = whole.find(spec.name);
      ASSERT_NE(at, nullptr) << spec.name;
      for (int64_t i = 0; i < spec.numel; ++i) {
        ASSERT_EQ(mine[static_cast<size_t>(spec.offset + i)],
                  all[static_cast<size_t>(at->offset + i)])
            << spec.name << " [" << i << "]";
      }
    }
  }
}

}  // namespace
}  // namespace moeforge
