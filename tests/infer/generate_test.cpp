// The generation loop over an InferenceEngine (infer/generate.h) with the CPU engine
// (infer/cpu_inference.h): greedy generation is the argmax chain of forward_incremental calls on a
// KV cache (one prefill, then one token at a time), the after_prefill hook runs once with the
// prompt in the cache, and bad inputs (a prompt beyond max_position_embeddings, a cache beyond it)
// give clear errors.
#include "infer/generate.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "core/error.h"
#include "data/byte_tokenizer.h"
#include "infer/cpu_inference.h"
#include "model/model_test_configs.h"

namespace moeforge {
namespace {

ModelConfig byte_model_config() {
  ModelConfig config = testing::tiny_config(Architecture::kMixtral);
  config.vocab_size = data::ByteTokenizer::kVocabSize;
  return config;
}

TEST(Generate, GreedyIsTheArgmaxChainOfIncrementalForwards) {
  const ModelConfig config = byte_model_config();
  SelfCommunicator self;
  Transformer<float> model(config, self);
  model.init_random(5, 0.5);
  const data::ByteTokenizer tokenizer;
  const std::string prompt = "the fox";
  GenerateOptions options;
  options.max_new_tokens = 12;
  options.sampler.temperature = 0.0;
  options.stop_at_eos = false;
  CpuInference engine(model);
  int64_t num_after_prefill = 0;
  options.after_prefill = [&] {
    ++num_after_prefill;
    EXPECT_EQ(engine.prefill_qkv(0).num_positions, static_cast<int64_t>(prompt.size()) + 1);
  };
  std::string streamed;
  const GenerateResult result = generate(engine, tokenizer, prompt, options,
                                         [&](const std::string& piece) { streamed += piece; });
  EXPECT_EQ(num_after_prefill, 1);

  std::vector<int32_t> tokens = {tokenizer.bos_id()};
  for (int32_t t : tokenizer.encode(prompt)) tokens.push_back(t);
  EXPECT_EQ(result.prompt_tokens, tokens);
  KvCache<float> cache(config, static_cast<int64_t>(tokens.size()) + options.max_new_tokens);
  std::vector<float> logits(static_cast<size_t>(config.vocab_size));
  model.forward_incremental(tokens.data(), static_cast<int64_t>(tokens.size()), cache,
                            logits.data());
  std::vector<int32_t> want;
  for (int64_t i = 0; i < options.max_new_tokens; ++i) {
    const auto next =
        static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
    want.push_back(next);
    model.forward_incremental(&next, 1, cache, logits.data());
  }
  EXPECT_EQ(result.new_tokens, want);
  std::vector<int32_t> text_tokens;
  for (int32_t t : want) {
    if (t < tokenizer.vocab_size()) text_tokens.push_back(t);
  }
  EXPECT_EQ(streamed, tokenizer.decode(text_tokens));
}

TEST(Generate, BadInputsGiveClearErrors) {
  const ModelConfig config = byte_model_config();
  SelfCommunicator self;
  Transformer<float> model(config, self);
  model.init_random(1, 0.02);
  const data::ByteTokenizer tokenizer;
  CpuInference engine(model);
  GenerateOptions options;
  options.max_new_tokens = 8;
  const std::string long_prompt(static_cast<size_t>(config.max_position_embeddings), 'a');
  try {
    generate(engine, tokenizer, long_prompt, options, nullptr);
    FAIL() << "a prompt beyond max_position_embeddings was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("max_position_embeddings"), std::string::npos) << e.what();
  }
  EXPECT_THROW(engine.start(config.max_position_embeddings + 1), Error);
  EXPECT_THROW(static_cast<void>(engine.prefill_qkv(0)), Error);  // no start()
  const int32_t token = 1;
  EXPECT_THROW(engine.decode(token), Error);  // no start()
}

}  // namespace
}  // namespace moeforge
