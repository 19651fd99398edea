// Sparse (FlexPrefill) prefill in the model: the full-budget setting equals dense attention, a
// sparse setting keeps the causal structure (the first two blocks stay exact) and records sane
// per-layer, per-head statistics, decode and continued prefills stay dense, training is untouched.
#include "model/prefill_attention.h"

#include <gtest/gtest.h>

#include <cmath>

#include "core/error.h"
#include "core/rng.h"
#include "model/model_test_configs.h"
#include "model/transformer.h"

namespace moeforge {
namespace {

constexpr int64_t kSeqLen = 300;  // five blocks of 64, the last one partial

std::vector<int32_t> random_tokens(const ModelConfig& c, int64_t num_tokens, uint64_t seed) {
  Rng rng(seed);
  std::vector<int32_t> tokens(static_cast<size_t>(num_tokens));
  for (int32_t& t : tokens) t = static_cast<int32_t>(rng.below(c.vocab_size));
  return tokens;
}

PrefillAttention flex(double gamma, int64_t min_budget, int64_t block_size) {
  PrefillAttention attention;
  attention.flex = true;
  attention.params.gamma = gamma;
  attention.params.tau = 0.1;
  attention.params.min_budget = min_budget;
  attention.params.block_size = block_size;
  return attention;
}

// Logits [num_tokens, vocab] of a prefill of tokens into a fresh cache.
std::vector<float> prefill_logits(Transformer<float>& model, const std::vector<int32_t>& tokens) {
  KvCache<float> cache(model.config(), static_cast<int64_t>(tokens.size()) + 1);
  std::vector<float> logits(tokens.size() * static_cast<size_t>(model.config().vocab_size));
  model.forward_prefill(tokens.data(), static_cast<int64_t>(tokens.size()), cache, logits.data());
  EXPECT_EQ(cache.length, static_cast<int64_t>(tokens.size()));
  return logits;
}

// Largest |a - b| / (1 + |b|) over the positions [first, last).
double max_rel_diff(const std::vector<float>& a, const std::vector<float>& b, int64_t vocab,
                    int64_t first, int64_t last) {
  double worst = 0.0;
  for (int64_t i = first * vocab; i < last * vocab; ++i) {
    EXPECT_TRUE(std::isfinite(a[i])) << "index " << i;
    worst = std::max(worst, std::abs(double(a[i]) - b[i]) / (1.0 + std::abs(double(b[i]))));
  }
  return worst;
}

TEST(PrefillAttention, FullBudgetEqualsDenseForEveryArchitecture) {
  for (Architecture arch : testing::all_architectures()) {
    const ModelConfig c = testing::tiny_config(arch);
    SelfCommunicator self;
    Transformer<float> model(c, self);
    model.init_random(3, 0.5);
    const std::vector<int32_t> tokens = random_tokens(c, kSeqLen, 5);
    const std::vector<float> dense = prefill_logits(model, tokens);
    EXPECT_TRUE(model.prefill_stats().empty());
    for (int64_t block_size : {64, 128}) {
      model.set_prefill_attention(flex(1.0, kSeqLen, block_size));
      const std::vector<float> sparse = prefill_logits(model, tokens);
      EXPECT_LT(max_rel_diff(sparse, dense, c.vocab_size, 0, kSeqLen), 1e-5)
          << architecture_name(arch) << " block " << block_size;
      ASSERT_EQ(model.prefill_stats().size(), static_cast<size_t>(c.num_layers));
      for (const PrefillLayerStats& layer : model.prefill_stats()) {
        EXPECT_TRUE(layer.dense_fallback);
        ASSERT_EQ(layer.head_stats.size(), static_cast<size_t>(c.num_heads));
        for (const ops::FlexPrefillHeadStats& head : layer.head_stats) {
          EXPECT_EQ(head.density, 1.0);
        }
      }
    }
  }
}

TEST(PrefillAttention, SparseSettingSelectsFewerBlocksAndDecodeFollows) {
  for (Architecture arch : {Architecture::kQwen3, Architecture::kMixtral}) {
    const ModelConfig c = testing::tiny_config(arch);
    const std::string what = architecture_name(arch);
    SelfCommunicator self;
    Transformer<float> model(c, self);
    model.init_random(3, 0.5);
    std::vector<int32_t> tokens = random_tokens(c, kSeqLen + 1, 9);
    const int32_t next = tokens.back();
    tokens.pop_back();
    const std::vector<float> dense = prefill_logits(model, tokens);

    model.set_prefill_attention(flex(0.5, 64, 64));
    KvCache<float> cache(c, kSeqLen + 1);
    std::vector<float> sparse(static_cast<size_t>(kSeqLen * c.vocab_size));
    model.forward_prefill(tokens.data(), kSeqLen, cache, sparse.data());
    // Every row keeps the first key block and its diagonal block, so the queries of the first two
    // blocks attend densely in every layer; later ones lose some blocks.
    EXPECT_LT(max_rel_diff(sparse, dense, c.vocab_size, 0, 128), 1e-5) << what;
    EXPECT_GT(max_rel_diff(sparse, dense, c.vocab_size, 128, kSeqLen), 1e-4) << what;

    const int64_t num_blocks = 5, num_causal_blocks = 15;
    ASSERT_EQ(model.prefill_stats().size(), static_cast<size_t>(c.num_layers)) << what;
    bool some_sparse_head = false;
    for (const PrefillLayerStats& layer : model.prefill_stats()) {
      EXPECT_FALSE(layer.dense_fallback) << what;
      ASSERT_EQ(layer.head_stats.size(), static_cast<size_t>(c.num_heads)) << what;
      for (const ops::FlexPrefillHeadStats& head : layer.head_stats) {
        EXPECT_GE(head.num_selected_blocks, num_blocks) << what;  // at least the diagonal
        EXPECT_LE(head.num_selected_blocks, num_causal_blocks) << what;
        EXPECT_DOUBLE_EQ(head.density,
                         static_cast<double>(head.num_selected_blocks) / num_causal_blocks);
        EXPECT_TRUE(std::isfinite(head.js_distance)) << what;
        EXPECT_GE(head.num_vertical_blocks, 1) << what;
        EXPECT_GE(head.num_slash_blocks, 1) << what;
        some_sparse_head |= head.density < 1.0;
      }
    }
    EXPECT_TRUE(some_sparse_head) << what;

    // tau above every JS distance (<= sqrt(ln 2)): every head is query-aware, both budgets are
    // min_budget's one block, and the block-level attention adds blocks to the set.
    PrefillAttention query_aware = flex(0.5, 64, 64);
    query_aware.params.tau = 1.0;
    model.set_prefill_attention(query_aware);
    prefill_logits(model, tokens);
    for (const PrefillLayerStats& layer : model.prefill_stats()) {
      for (const ops::FlexPrefillHeadStats& head : layer.head_stats) {
        EXPECT_TRUE(head.query_aware) << what;
        EXPECT_EQ(head.num_vertical_blocks, 1) << what;
        EXPECT_EQ(head.num_slash_blocks, 1) << what;
        EXPECT_GE(head.num_selected_blocks, 2 * num_blocks - 1) << what;
      }
    }

    // A decode step attends densely over the sparse prefill's cache and keeps its statistics.
    const std::vector<PrefillLayerStats> stats = model.prefill_stats();
    std::vector<float> logits(static_cast<size_t>(c.vocab_size));
    model.forward_incremental(&next, 1, cache, logits.data());
    EXPECT_EQ(cache.length, kSeqLen + 1);
    for (float x : logits) EXPECT_TRUE(std::isfinite(x)) << what;
    ASSERT_EQ(model.prefill_stats().size(), stats.size());
    EXPECT_EQ(model.prefill_stats()[0].head_stats[0].num_selected_blocks,
              stats[0].head_stats[0].num_selected_blocks);
  }
}

TEST(PrefillAttention, ContinuedPrefillAndTrainingForwardStayDense) {
  const ModelConfig c = testing::tiny_config(Architecture::kQwen2);
  SelfCommunicator self;
  Transformer<float> model(c, self);
  model.init_random(4, 0.5);
  const std::vector<int32_t> tokens = random_tokens(c, kSeqLen, 13);
  const std::vector<float> dense = prefill_logits(model, tokens);
  const std::vector<int32_t> targets = random_tokens(c, kSeqLen, 14);
  model.forward(tokens.data(), targets.data(), 1, kSeqLen);
  const std::vector<float> train_logits = model.logits();

  model.set_prefill_attention(flex(0.5, 64, 64));
  // One token, then the rest into the non-empty cache: both calls attend densely.
  KvCache<float> cache(c, kSeqLen);
  std::vector<float> logits(static_cast<size_t>((kSeqLen - 1) * c.vocab_size));
  model.forward_prefill(tokens.data(), 1, cache, logits.data());
  model.forward_prefill(tokens.data() + 1, kSeqLen - 1, cache, logits.data());
  EXPECT_TRUE(model.prefill_stats().empty());
  const std::vector<float> dense_tail(dense.begin() + c.vocab_size, dense.end());
  EXPECT_LT(max_rel_diff(logits, dense_tail, c.vocab_size, 0, kSeqLen - 1), 1e-5);

  model.forward(tokens.data(), targets.data(), 1, kSeqLen);
  EXPECT_EQ(model.logits(), train_logits);
  EXPECT_TRUE(model.prefill_stats().empty());
}

TEST(PrefillAttention, InvalidParametersAreRejected) {
  const ModelConfig c = testing::tiny_config(Architecture::kLlama);
  SelfCommunicator self;
  Transformer<float> model(c, self);
  EXPECT_THROW(model.set_prefill_attention(flex(0.0, 64, 64)), Error);
  EXPECT_THROW(model.set_prefill_attention(flex(0.9, 64, 100)), Error);
  EXPECT_THROW(model.set_prefill_attention(flex(0.9, 0, 64)), Error);
  EXPECT_FALSE(model.prefill_attention().flex);
  PrefillAttention dense = flex(0.0, 64, 64);
  dense.flex = false;  // dense attention ignores the flex parameters
  EXPECT_NO_THROW(model.set_prefill_attention(dense));
}

TEST(PrefillAttention, StatsSummaryAndJson) {
  std::vector<PrefillLayerStats> layers(2);
  layers[0].dense_fallback = true;
  layers[0].head_stats.resize(2);
  layers[0].head_stats[0] = {false, std::nan(""), 0, 0, 3, 1.0};
  layers[0].head_stats[1] = {false, std::nan(""), 0, 0, 3, 1.0};
  layers[1].head_stats.resize(2);
  layers[1].head_stats[0] = {true, 0.05, 1, 1, 2, 0.5};
  layers[1].head_stats[1] = {false, 0.3, 2, 1, 1, 0.25};
  const PrefillStatsSummary summary = summarize_prefill_stats(layers);
  EXPECT_EQ(summary.num_heads, 4);
  EXPECT_EQ(summary.num_query_aware, 1);
  EXPECT_EQ(summary.num_dense_fallback, 1);
  EXPECT_DOUBLE_EQ(summary.mean_density, 0.6875);
  const nlohmann::json json = prefill_stats_json(layers);
  EXPECT_DOUBLE_EQ(json["mean_density"].get<double>(), 0.6875);
  EXPECT_EQ(json["query_aware_heads"], 1);
  EXPECT_EQ(json["dense_fallback_layers"], 1);
  ASSERT_EQ(json["layers"].size(), 2u);
  EXPECT_TRUE(json["layers"][0]["heads"][0]["js_distance"].is_null());
  const nlohmann::json& head = json["layers"][1]["heads"][1];
  EXPECT_EQ(head["head"], 1);
  EXPECT_DOUBLE_EQ(head["js_distance"].get<double>(), 0.3);
  EXPECT_EQ(head["num_vertical_blocks"], 2);
  EXPECT_EQ(head["num_slash_blocks"], 1);
  EXPECT_EQ(head["num_selected_blocks"], 1);
  EXPECT_DOUBLE_EQ(head["density"].get<double>(), 0.25);
  EXPECT_EQ(head["query_aware"], false);
}

}  // namespace
}  // namespace moeforge
