// GPU inference (cuda/gpu_inference.h) on small random models of every architecture the CUDA
// backend runs: the last logits of a prefill against GpuTransformer's forward on the same tokens,
// prefill + decode steps (and a prefill that continues the cache) against full prefills of the
// same prefixes, both against the CPU reference's forward_incremental (also for a Qwen2-MoE shared
// expert of an odd size), FlexPrefill's selection against ops::flex_prefill_select on the engine's
// own q and k, and clear errors.
//
// Tolerances (relative L2 error of a logits vector; a wrong position, cache row or head gives
// errors of order 1):
//  - against GpuTransformer, the same kernels on the same shapes: kSameKernels = 1e-3 (the LM head
//    runs on one row instead of all, so its fp32 sums may be ordered differently);
//  - decode against prefill: kBf16Noise = 2e-2. The decode path attends with its own kernel (P in
//    fp32, where cuDNN rounds P to bf16) and runs its GEMMs on one row, so activations differ by a
//    few bf16 roundings (2^-9 each) per layer;
//  - against the CPU reference (fp32 throughout): kCpuReference = 5e-2, the whole-model gradient
//    bound of gpu_transformer_test.cpp.
// In MoE models bf16 noise can flip a near-tie in a token's top-k routing, which changes that
// step's logits by far more than the noise (gpu_transformer_test.cpp allows the experts' gradients
// 0.15 for the same reason): over a series of decode steps up to a tenth may then exceed the
// tolerance as long as they stay below kRoutingFlip = 0.5 (a broken cache or position breaks
// nearly every step).
#include "cuda/gpu_inference.h"

#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "comm/communicator.h"
#include "core/error.h"
#include "core/rng.h"
#include "cuda/gpu_transformer.h"
#include "gpu_test_models.h"
#include "gpu_test_util.h"
#include "infer/cpu_inference.h"
#include "model/transformer.h"
#include "ops/flex_prefill.h"

namespace moeforge::cuda {
namespace {

constexpr double kSameKernels = 1e-3;
constexpr double kBf16Noise = 2e-2;
constexpr double kCpuReference = 5e-2;
constexpr double kRoutingFlip = 0.5;

std::vector<int32_t> random_tokens(int64_t n, int64_t vocab, uint64_t seed) {
  Rng rng(seed);
  std::vector<int32_t> tokens(static_cast<size_t>(n));
  for (int32_t& t : tokens) t = static_cast<int32_t>(rng.below(static_cast<uint64_t>(vocab)));
  return tokens;
}

void expect_logits_close(const std::string& what, const std::vector<float>& got,
                         const std::vector<float>& want, double tolerance) {
  ASSERT_EQ(got.size(), want.size()) << what;
  for (size_t i = 0; i < got.size(); ++i) {
    ASSERT_TRUE(std::isfinite(got[i])) << what << ": logit " << i << " is not finite";
  }
  EXPECT_LT(testing::relative_l2(got.data(), want.data(), static_cast<int64_t>(want.size())),
            tolerance)
      << what;
}

// The relative L2 errors of a series of logits comparisons, checked as the top of the file says.
class StepErrors {
 public:
  StepErrors(std::string what, double tolerance, bool moe)
      : what_(std::move(what)), tolerance_(tolerance), moe_(moe) {}
  void add(const std::vector<float>& got, const std::vector<float>& want, int64_t step) {
    ASSERT_EQ(got.size(), want.size()) << what_;
    for (size_t i = 0; i < got.size(); ++i) {
      ASSERT_TRUE(std::isfinite(got[i])) << what_ << " step " << step << ": logit " << i;
    }
    const double err =
        testing::relative_l2(got.data(), want.data(), static_cast<int64_t>(want.size()));
    ++num_steps_;
    if (err < tolerance_) return;
    ++num_over_;
    EXPECT_TRUE(moe_ && err < kRoutingFlip) << what_ << " step " << step << ": relative L2 error "
                                            << err << " (tolerance " << tolerance_ << ")";
  }
  ~StepErrors() {
    EXPECT_LE(num_over_, moe_ ? num_steps_ / 10 : 0)
        << what_ << ": " << num_over_ << " of " << num_steps_ << " steps over " << tolerance_;
  }

 private:
  std::string what_;
  double tolerance_;
  bool moe_;
  int64_t num_steps_ = 0, num_over_ = 0;
};

class GpuInferenceTest : public ::testing::TestWithParam<Architecture> {};

TEST_P(GpuInferenceTest, PrefillLogitsMatchGpuTransformer) {
  MF_REQUIRE_GPU();
  const ModelConfig config = testing::gpu_config(GetParam());
  const std::vector<float> params = testing::make_params(ParameterLayout(config), 7);
  GpuTransformer trainer(config);
  trainer.upload_params(params);
  GpuInference engine(config, params);
  for (const int64_t seq : {2, 77, 128}) {
    SCOPED_TRACE("seq " + std::to_string(seq));
    const std::vector<int32_t> tokens = random_tokens(seq, config.vocab_size, 11 + seq);
    const std::vector<int32_t> targets(tokens.size(), -1);
    LossBreakdown loss;
    const std::vector<float> all =
        trainer.forward_logits(tokens.data(), targets.data(), 1, seq, &loss);
    const std::vector<float> want(all.end() - config.vocab_size, all.end());
    engine.start(seq);
    expect_logits_close("prefill", engine.prefill(tokens.data(), seq), want, kSameKernels);
    EXPECT_EQ(engine.length(), seq);
  }
  // A one-token prompt (the decode kernel over a cache of one) against the CPU reference.
  SelfCommunicator self;
  Transformer<float> cpu(config, self);
  cpu.params() = params;
  KvCache<float> cache(config, 1);
  std::vector<float> want(static_cast<size_t>(config.vocab_size));
  const int32_t token = 5;
  cpu.forward_incremental(&token, 1, cache, want.data());
  engine.start(1);
  expect_logits_close("one-token prompt", engine.prefill(&token, 1), want, kCpuReference);
}

// Prefill 20 tokens, continue with a prefill of 15, then decode one token at a time; every step's
// logits against a full prefill of the same prefix on a second engine and against the CPU
// reference's forward_incremental of the same calls.
TEST_P(GpuInferenceTest, DecodeStepsMatchFullPrefillsAndTheCpuReference) {
  MF_REQUIRE_GPU();
  const ModelConfig config = testing::gpu_config(GetParam());
  SelfCommunicator self;
  Transformer<float> cpu(config, self);
  cpu.params() = testing::make_params(cpu.layout(), 5);
  GpuInference engine(config, cpu.params());
  GpuInference full(config, cpu.params());
  const int64_t total = config.max_position_embeddings;
  const std::vector<int32_t> tokens = random_tokens(total, config.vocab_size, 3);
  KvCache<float> cache(config, total);
  std::vector<float> cpu_logits(static_cast<size_t>(config.vocab_size));
  StepErrors vs_prefill("against full prefills", kBf16Noise, config.is_moe());
  StepErrors vs_cpu("against the CPU reference", kCpuReference, config.is_moe());
  engine.start(total);
  int64_t length = 0;
  while (length < total) {
    // Two prefills (the second continues the cache), then one token at a time.
    const int64_t step = length == 0 ? 20 : length == 20 ? 15 : 1;
    const std::vector<float> got = step == 1 ? engine.decode(tokens[static_cast<size_t>(length)])
                                             : engine.prefill(tokens.data() + length, step);
    cpu.forward_incremental(tokens.data() + length, step, cache, cpu_logits.data());
    length += step;
    full.start(length);
    vs_prefill.add(got, full.prefill(tokens.data(), length), length);
    vs_cpu.add(got, cpu_logits, length);
  }
  EXPECT_EQ(engine.length(), total);
  // Layer 0's cache (before any FFN, so no routing in it) holds the CPU reference's keys and values
  // up to the bf16 roundings of the normed input and of the projections.
  for (const bool keys : {true, false}) {
    const std::vector<float> got = engine.download_cache(0, keys);
    const std::vector<float>& want = keys ? cache.k[0] : cache.v[0];
    ASSERT_EQ(got.size(), want.size());
    EXPECT_LT(testing::relative_l2(got.data(), want.data(), static_cast<int64_t>(want.size())),
              kBf16Noise)
        << (keys ? "keys" : "values");
  }
}

TEST_P(GpuInferenceTest, PerExpertGemmPathMatchesGroupedPath) {
  MF_REQUIRE_GPU();
  const ModelConfig config = testing::gpu_config(GetParam());
  if (!config.is_moe()) GTEST_SKIP() << "dense model";
  const std::vector<float> params = testing::make_params(ParameterLayout(config), 9);
  const std::vector<int32_t> tokens = random_tokens(50, config.vocab_size, 4);
  GpuInference grouped(config, params);
  setenv("MOEFORGE_GROUPED_GEMM", "0", 1);
  GpuInference per_expert(config, params);
  unsetenv("MOEFORGE_GROUPED_GEMM");
  ASSERT_FALSE(per_expert.grouped_expert_gemms());
  grouped.start(51);
  per_expert.start(51);
  expect_logits_close("prefill", per_expert.prefill(tokens.data(), 50),
                      grouped.prefill(tokens.data(), 50), kBf16Noise);
  expect_logits_close("decode", per_expert.decode(7), grouped.decode(7), kBf16Noise);
}

// A shared expert of an odd size (rows not 16-byte aligned for cuBLASLt): a prefill, then decode
// steps, against the CPU reference's forward_incremental of the same calls.
TEST(GpuInference, OddSharedExpertSizeMatchesCpuReference) {
  MF_REQUIRE_GPU();
  const ModelConfig config = testing::gpu_config_odd_shared_expert();
  SelfCommunicator self;
  Transformer<float> cpu(config, self);
  cpu.params() = testing::make_params(cpu.layout(), 21);
  GpuInference engine(config, cpu.params());
  const int64_t total = 40;
  const std::vector<int32_t> tokens = random_tokens(total, config.vocab_size, 25);
  KvCache<float> cache(config, total);
  std::vector<float> cpu_logits(static_cast<size_t>(config.vocab_size));
  StepErrors vs_cpu("against the CPU reference", kCpuReference, config.is_moe());
  engine.start(total);
  int64_t length = 0;
  while (length < total) {
    const int64_t step = length == 0 ? 20 : 1;
    const std::vector<float> got = step == 1 ? engine.decode(tokens[static_cast<size_t>(length)])
                                             : engine.prefill(tokens.data(), step);
    cpu.forward_incremental(tokens.data() + length, step, cache, cpu_logits.data());
    length += step;
    vs_cpu.add(got, cpu_logits, length);
  }
}

INSTANTIATE_TEST_SUITE_P(Architectures, GpuInferenceTest, testing::every_architecture(),
                         testing::architecture_test_name);

// A Qwen3-MoE model (q/k norm, dense and MoE layers) long enough for sparse prefills.
ModelConfig flex_config() {
  ModelConfig config = testing::gpu_config(Architecture::kQwen3Moe);
  config.max_position_embeddings = 512;
  return config;
}

ops::FlexPrefillParams flex_params(int64_t min_budget) {
  ops::FlexPrefillParams params;
  params.gamma = 0.9;
  params.tau = 0.1;
  params.min_budget = min_budget;
  params.block_size = 64;
  return params;
}

// The engine's per-head selection of every layer equals the reference's on the same bf16 q and k
// (the engine's own, from prefill_qkv: the queries it kept, and the keys in its cache).
TEST(GpuInference, FlexPrefillSelectsWhatTheReferenceSelects) {
  MF_REQUIRE_GPU();
  const ModelConfig config = flex_config();
  GpuInference engine(config, testing::make_params(ParameterLayout(config), 13));
  const ops::FlexPrefillParams params = flex_params(64);
  engine.set_prefill_attention(PrefillAttention{true, params});
  const int64_t n = 450;
  const std::vector<int32_t> tokens = random_tokens(n, config.vocab_size, 17);
  for (int64_t layer = 0; layer < config.num_layers; ++layer) {
    SCOPED_TRACE("layer " + std::to_string(layer));
    engine.keep_prefill_qkv(layer);
    engine.start(n + 2);
    engine.prefill(tokens.data(), n);
    const std::vector<PrefillLayerStats>& stats = engine.prefill_stats();
    ASSERT_EQ(static_cast<int64_t>(stats.size()), config.num_layers);
    const PrefillQkv qkv = engine.prefill_qkv(layer);
    ASSERT_EQ(qkv.num_positions, n);
    const ops::FlexPrefillSelection want = ops::flex_prefill_select<float>(
        qkv.q.data(), qkv.k.data(),
        ops::SparseAttentionDims{n, config.num_heads, config.num_kv_heads, config.head_dim},
        params);
    const PrefillLayerStats& got = stats[static_cast<size_t>(layer)];
    ASSERT_FALSE(want.dense_fallback);
    EXPECT_EQ(got.dense_fallback, want.dense_fallback);
    ASSERT_EQ(got.head_stats.size(), want.head_stats.size());
    for (size_t h = 0; h < want.head_stats.size(); ++h) {
      SCOPED_TRACE("head " + std::to_string(h));
      EXPECT_EQ(got.head_stats[h].query_aware, want.head_stats[h].query_aware);
      EXPECT_EQ(got.head_stats[h].num_vertical_blocks, want.head_stats[h].num_vertical_blocks);
      EXPECT_EQ(got.head_stats[h].num_slash_blocks, want.head_stats[h].num_slash_blocks);
      EXPECT_EQ(got.head_stats[h].num_selected_blocks, want.head_stats[h].num_selected_blocks);
      EXPECT_DOUBLE_EQ(got.head_stats[h].density, want.head_stats[h].density);
      EXPECT_NEAR(got.head_stats[h].js_distance, want.head_stats[h].js_distance, 1e-12);
    }
  }
  const std::vector<PrefillLayerStats> stats = engine.prefill_stats();
  // Decode steps after a sparse prefill attend densely and keep the statistics.
  engine.decode(tokens[0]);
  EXPECT_EQ(engine.prefill_stats().size(), stats.size());
}

// Layer 0's prefill q, k and v (before any FFN, so no routing in them) are the CPU reference's up
// to the bf16 roundings of the normed input and the projections; the engine refuses a layer it
// did not keep and a cache that decode steps have grown.
TEST(GpuInference, PrefillQkvMatchesTheCpuReference) {
  MF_REQUIRE_GPU();
  const ModelConfig config = testing::gpu_config(Architecture::kQwen3);
  SelfCommunicator self;
  Transformer<float> model(config, self);
  model.params() = testing::make_params(model.layout(), 27);
  CpuInference cpu(model);
  GpuInference engine(config, model.params());
  const int64_t n = 37;
  const std::vector<int32_t> tokens = random_tokens(n, config.vocab_size, 29);
  cpu.start(n + 1);
  engine.start(n + 1);
  engine.keep_prefill_qkv(0);
  cpu.prefill(tokens.data(), n);
  engine.prefill(tokens.data(), n);
  const PrefillQkv want = cpu.prefill_qkv(0), got = engine.prefill_qkv(0);
  EXPECT_EQ(got.num_positions, n);
  EXPECT_EQ(got.num_heads, want.num_heads);
  EXPECT_EQ(got.num_kv_heads, want.num_kv_heads);
  EXPECT_EQ(got.head_dim, want.head_dim);
  for (const auto& [name, g, w] :
       {std::tuple{"q", &got.q, &want.q}, std::tuple{"k", &got.k, &want.k},
        std::tuple{"v", &got.v, &want.v}}) {
    ASSERT_EQ(g->size(), w->size()) << name;
    EXPECT_LT(testing::relative_l2(g->data(), w->data(), static_cast<int64_t>(w->size())),
              kBf16Noise)
        << name;
  }
  EXPECT_THROW(static_cast<void>(engine.prefill_qkv(1)), Error);
  engine.decode(tokens[0]);
  EXPECT_THROW(static_cast<void>(engine.prefill_qkv(0)), Error);
  EXPECT_THROW(engine.keep_prefill_qkv(config.num_layers), Error);
}

// A budget of the whole sequence falls back to dense attention in every layer: density 1 and the
// logits of the dense prefill (the block-sparse kernel over every causal block instead of cuDNN).
TEST(GpuInference, FlexPrefillWithAFullBudgetIsDense) {
  MF_REQUIRE_GPU();
  const ModelConfig config = flex_config();
  const std::vector<float> weights = testing::make_params(ParameterLayout(config), 19);
  const int64_t n = 300;
  const std::vector<int32_t> tokens = random_tokens(n, config.vocab_size, 23);
  GpuInference dense(config, weights), flex(config, weights);
  flex.set_prefill_attention(PrefillAttention{true, flex_params(n)});
  dense.start(n);
  flex.start(n);
  const std::vector<float> want = dense.prefill(tokens.data(), n);
  expect_logits_close("flex", flex.prefill(tokens.data(), n), want, kBf16Noise);
  ASSERT_EQ(static_cast<int64_t>(flex.prefill_stats().size()), config.num_layers);
  for (const PrefillLayerStats& layer : flex.prefill_stats()) {
    EXPECT_TRUE(layer.dense_fallback);
    for (const ops::FlexPrefillHeadStats& head : layer.head_stats) EXPECT_EQ(head.density, 1.0);
  }
  EXPECT_TRUE(dense.prefill_stats().empty());
}

// Token dropping by capacity (factor 0.5) in a prefill longer than one FFN chunk
// (kFfnChunkTokens), so the capacity of the whole prompt is carried across chunks, then decode
// steps (which never drop): the CPU reference's logits.
TEST(GpuInference, CapacityDroppingAcrossChunksMatchesCpuReference) {
  MF_REQUIRE_GPU();
  ModelConfig config = testing::gpu_config(Architecture::kMixtral);
  config.capacity_factor = 0.5;
  const int64_t prompt = kFfnChunkTokens + 300, total = prompt + 3;
  config.max_position_embeddings = total;
  SelfCommunicator self;
  Transformer<float> cpu(config, self);
  cpu.params() = testing::make_params(cpu.layout(), 31);
  GpuInference engine(config, cpu.params());
  const std::vector<int32_t> tokens = random_tokens(total, config.vocab_size, 33);
  KvCache<float> cache(config, total);
  std::vector<float> cpu_logits(static_cast<size_t>(config.vocab_size));
  StepErrors vs_cpu("against the CPU reference", kCpuReference, config.is_moe());
  engine.start(total);
  for (int64_t length = 0; length < total;) {
    const int64_t step = length == 0 ? prompt : 1;
    const std::vector<float> got = step == 1 ? engine.decode(tokens[static_cast<size_t>(length)])
                                             : engine.prefill(tokens.data(), step);
    cpu.forward_incremental(tokens.data() + length, step, cache, cpu_logits.data());
    if (length == 0) {
      for (const MoeFfnStats& stats : cpu.moe_stats()) EXPECT_GT(stats.num_dropped, 0);
    }
    length += step;
    vs_cpu.add(got, cpu_logits, length);
  }
}

TEST(GpuInference, BadInputsGiveClearErrors) {
  MF_REQUIRE_GPU();
  const ModelConfig config = testing::gpu_config(Architecture::kMixtral);
  const std::vector<float> params = testing::make_params(ParameterLayout(config), 1);
  GpuInference engine(config, params);
  const std::vector<int32_t> tokens = random_tokens(40, config.vocab_size, 2);
  EXPECT_THROW(engine.prefill(tokens.data(), 4), Error);  // no start()
  EXPECT_THROW(engine.start(config.max_position_embeddings + 1), Error);
  EXPECT_THROW(engine.start(0), Error);
  engine.start(30);
  EXPECT_THROW(engine.prefill(tokens.data(), 40), Error);  // longer than the cache
  EXPECT_THROW(engine.prefill(tokens.data(), 0), Error);
  const int32_t bad = static_cast<int32_t>(config.vocab_size);
  EXPECT_THROW(engine.decode(bad), Error);
  EXPECT_THROW(engine.decode(-1), Error);
  engine.prefill(tokens.data(), 30);
  EXPECT_THROW(engine.decode(tokens[0]), Error);  // the cache is full
  EXPECT_THROW(GpuInference(config, std::vector<float>(params.size() - 1)), Error);
  ModelConfig odd_head = config;
  odd_head.head_dim = 36;
  EXPECT_THROW(GpuInference(odd_head, testing::make_params(ParameterLayout(odd_head), 1)), Error);
}

// Without a device the constructor says so (the CLI prints it for --device cuda).
TEST(GpuInference, NoDeviceIsAClearError) {
  if (testing::gpu_available()) GTEST_SKIP() << "this machine has a GPU";
  const ModelConfig config = testing::gpu_config(Architecture::kLlama);
  try {
    GpuInference engine(config, testing::make_params(ParameterLayout(config), 1));
    FAIL() << "GpuInference constructed without a CUDA device";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("CUDA"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace moeforge::cuda
