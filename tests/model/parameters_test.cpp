// The parameter layout against the closed-form parameter count of each architecture, and the
// HF tensor names it must use.
#include "model/parameters.h"

#include <gtest/gtest.h>

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

}  // namespace
}  // namespace moeforge
