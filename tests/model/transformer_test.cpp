// Whole-model checks: finite-difference gradients in double for every architecture (aux and z
// losses included, with and without token dropping), KV-cache decoding equal to the full forward,
// and the tied-embedding gradient path.
#include "model/transformer.h"

#include <gtest/gtest.h>

#include <cmath>

#include "core/error.h"
#include "core/rng.h"

#include "model/model_test_configs.h"
#include "testing/gradcheck.h"

namespace moeforge {
namespace {

struct Batch {
  std::vector<int32_t> tokens, targets;
  int64_t batch, seq;
};

Batch make_batch(const ModelConfig& c, int64_t batch, int64_t seq, uint64_t seed) {
  Batch b{{}, {}, batch, seq};
  Rng rng(seed);
  for (int64_t i = 0; i < batch * seq; ++i) {
    b.tokens.push_back(static_cast<int32_t>(rng.below(c.vocab_size)));
    b.targets.push_back(static_cast<int32_t>(rng.below(c.vocab_size)));
  }
  b.targets[1] = -1;  // an ignored position
  return b;
}

void check_gradients(ModelConfig c, const std::string& what) {
  SelfCommunicator self;
  Transformer<double> model(c, self);
  model.init_random(7, 0.5);
  const Batch b = make_batch(c, 2, 5, 11);
  const double dloss = 0.75;
  model.zero_grads();
  model.forward(b.tokens.data(), b.targets.data(), b.batch, b.seq);
  model.backward(dloss);
  const std::vector<double> analytic = model.grads();
  const std::vector<double> numeric = testing::numerical_gradient(model.params(), [&] {
    return dloss * model.forward(b.tokens.data(), b.targets.data(), b.batch, b.seq).loss;
  });
  testing::expect_close(analytic, numeric, 2e-7, 2e-5, what);
}

TEST(Transformer, GradientsMatchFiniteDifferencesForEveryArchitecture) {
  for (Architecture arch : testing::all_architectures()) {
    check_gradients(testing::tiny_config(arch), architecture_name(arch));
  }
}

TEST(Transformer, GradientsMatchFiniteDifferencesWithTokenDropping) {
  ModelConfig c = testing::tiny_config(Architecture::kMixtral);
  c.capacity_factor = 0.5;
  check_gradients(c, "mixtral capacity 0.5");
}

// The aux loss over balance groups of experts (MegaScale-MoE's per-GPU balance): the gradients
// still match, and the loss is the grouped one (a different value from the per-expert loss).
TEST(Transformer, GradientsMatchFiniteDifferencesWithBalanceGroups) {
  ModelConfig c = testing::tiny_config(Architecture::kMixtral);  // 4 experts
  c.router_aux_loss_coef = 0.5;  // large enough that a wrong aux gradient shows
  c.router_balance_groups = 2;
  check_gradients(c, "mixtral balance groups 2");
  SelfCommunicator self;
  const Batch b = make_batch(c, 1, 6, 5);
  double aux[2];
  for (const int64_t groups : {0, 2}) {
    c.router_balance_groups = groups;
    Transformer<double> model(c, self);
    model.init_random(3, 0.5);
    aux[groups / 2] = model.forward(b.tokens.data(), b.targets.data(), b.batch, b.seq).aux_loss;
  }
  EXPECT_GT(std::abs(aux[0] - aux[1]), 1e-6) << aux[0] << " " << aux[1];
}

TEST(Transformer, AuxAndZLossesEnterTheTotal) {
  ModelConfig c = testing::tiny_config(Architecture::kMixtral);
  SelfCommunicator self;
  Transformer<double> model(c, self);
  model.init_random(3, 0.5);
  const Batch b = make_batch(c, 1, 6, 5);
  const LossBreakdown loss = model.forward(b.tokens.data(), b.targets.data(), b.batch, b.seq);
  EXPECT_GT(loss.aux_loss, 0.0);
  EXPECT_GT(loss.z_loss, 0.0);
  EXPECT_NEAR(
      loss.loss,
      loss.ce_loss + c.router_aux_loss_coef * loss.aux_loss + c.router_z_loss_coef * loss.z_loss,
      1e-12);
  EXPECT_EQ(loss.num_counted, 5);  // one ignored target
  ASSERT_EQ(model.moe_stats().size(), 2u);
  int64_t load = 0;
  for (int64_t l : model.moe_stats()[0].expert_load) load += l;
  EXPECT_EQ(load, 6 * c.num_experts_per_tok);
}

TEST(Transformer, IncrementalDecodingMatchesFullForward) {
  for (Architecture arch : testing::all_architectures()) {
    const ModelConfig c = testing::tiny_config(arch);
    SelfCommunicator self;
    Transformer<double> model(c, self);
    model.init_random(5, 0.3);
    const Batch b = make_batch(c, 1, 9, 2);
    model.forward(b.tokens.data(), b.targets.data(), 1, b.seq);
    const std::vector<double> full = model.logits();

    KvCache<double> cache(c, b.seq);
    std::vector<double> logits(c.vocab_size);
    model.forward_incremental(b.tokens.data(), 4, cache, logits.data());  // prefill 4
    for (int64_t v = 0; v < c.vocab_size; ++v) {
      EXPECT_NEAR(logits[v], full[3 * c.vocab_size + v], 1e-12) << architecture_name(arch);
    }
    for (int64_t t = 4; t < b.seq; ++t) {
      model.forward_incremental(b.tokens.data() + t, 1, cache, logits.data());
      for (int64_t v = 0; v < c.vocab_size; ++v) {
        EXPECT_NEAR(logits[v], full[t * c.vocab_size + v], 1e-12)
            << architecture_name(arch) << " t=" << t;
      }
    }
    EXPECT_EQ(cache.length, b.seq);
    EXPECT_THROW(model.forward_incremental(b.tokens.data(), 1, cache, logits.data()), Error);
  }
}

TEST(Transformer, FloatForwardTracksDouble) {
  const ModelConfig c = testing::tiny_config(Architecture::kQwen3Moe);
  SelfCommunicator self;
  Transformer<double> md(c, self);
  Transformer<float> mf(c, self);
  md.init_random(9, 0.3);
  mf.init_random(9, 0.3);
  const Batch b = make_batch(c, 2, 7, 4);
  const double ld = md.forward(b.tokens.data(), b.targets.data(), 2, 7).loss;
  const double lf = mf.forward(b.tokens.data(), b.targets.data(), 2, 7).loss;
  EXPECT_NEAR(lf, ld, 1e-5 * std::abs(ld));
}

TEST(Transformer, RejectsTokensOutsideTheVocabulary) {
  const ModelConfig c = testing::tiny_config(Architecture::kLlama);
  SelfCommunicator self;
  Transformer<float> model(c, self);
  std::vector<int32_t> tokens = {1, 2, static_cast<int32_t>(c.vocab_size)}, targets = {1, 2, 3};
  try {
    model.forward(tokens.data(), targets.data(), 1, 3);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("outside the vocabulary"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace moeforge
