// count_params, the overflow-checked parameter count that validation bounds, against the layout it
// must agree with, and the layout's own size limits.
#include <gtest/gtest.h>

#include <cstdint>
#include <limits>
#include <vector>

#include "core/error.h"
#include "model/model_test_configs.h"
#include "model/parameters.h"

namespace moeforge {
namespace {

// Every architecture, plus the variants that change the count: untied embeddings, a shared expert,
// dense layers listed twice or out of order, more layers.
std::vector<ModelConfig> count_cases() {
  std::vector<ModelConfig> cases;
  for (Architecture arch : testing::all_architectures()) {
    cases.push_back(testing::tiny_config(arch));
    cases.push_back(cases.back());
    cases.back().tie_word_embeddings = !cases.back().tie_word_embeddings;
    cases.push_back(cases.back());
    cases.back().num_layers = 5;
    if (cases.back().is_moe()) cases.back().dense_layers = {3, 1, 3};
  }
  ModelConfig no_shared = testing::tiny_config(Architecture::kQwen2Moe);
  no_shared.shared_expert_intermediate_size = 0;
  cases.push_back(no_shared);
  return cases;
}

TEST(ParameterCountTest, EqualsTheLayoutsCount) {
  for (const ModelConfig& c : count_cases()) {
    const std::optional<int64_t> count = count_params(c);
    ASSERT_TRUE(count.has_value()) << architecture_name(c.architecture);
    EXPECT_EQ(*count, ParameterLayout(c).num_params())
        << architecture_name(c.architecture) << " with " << c.num_layers << " layers, "
        << c.dense_layers.size() << " dense layers listed, tied " << c.tie_word_embeddings;
  }
}

TEST(ParameterCountTest, OverflowIsNulloptNotAWrappedNumber) {
  ModelConfig c = testing::tiny_config(Architecture::kMixtral);
  c.vocab_size = int64_t{1} << 62;  // vocab_size x hidden_size (8) overflows
  EXPECT_FALSE(count_params(c).has_value());
  c = testing::tiny_config(Architecture::kMixtral);
  c.moe_intermediate_size = std::numeric_limits<int64_t>::max() / 16;  // fits x 8, not x 3 x 4 x 8
  EXPECT_FALSE(count_params(c).has_value());
  c = testing::tiny_config(Architecture::kQwen3);
  c.num_heads = int64_t{1} << 61;  // num_heads x head_dim (6) overflows
  EXPECT_FALSE(count_params(c).has_value());
  c = testing::tiny_config(Architecture::kLlama);
  c.num_layers = int64_t{1} << 60;  // the sum over the layers overflows
  EXPECT_FALSE(count_params(c).has_value());
}

TEST(ParameterCountTest, LayoutRefusesConfigsPastTheLimits) {
  ModelConfig c = testing::tiny_config(Architecture::kQwen3Moe);
  c.num_layers = kMaxNumLayers + 1;
  EXPECT_THROW(ParameterLayout{c}, Error);
  c = testing::tiny_config(Architecture::kQwen3Moe);
  c.num_experts = kMaxNumExperts + 1;
  EXPECT_THROW(ParameterLayout{c}, Error);
  c = testing::tiny_config(Architecture::kLlama);
  c.vocab_size = kMaxNumParams / c.hidden_size;  // the embedding alone reaches the limit
  EXPECT_THROW(ParameterLayout{c}, Error);
  c.vocab_size = int64_t{1} << 62;
  EXPECT_THROW(ParameterLayout{c}, Error);
}

}  // namespace
}  // namespace moeforge
