// Prefill + incremental decode loop over an InferenceEngine.
#include "infer/generate.h"

#include <chrono>

#include "core/error.h"

namespace moeforge {

GenerateResult generate(InferenceEngine& engine, const data::Tokenizer& tokenizer,
                        const std::string& prompt, const GenerateOptions& options,
                        const std::function<void(const std::string&)>& on_token) {
  validate_sampler_options(options.sampler);
  MF_CHECK(options.max_new_tokens >= 0, "--max-new-tokens must be >= 0, got {}",
           options.max_new_tokens);
  const ModelConfig& config = engine.config();
  MF_CHECK(tokenizer.vocab_size() <= config.vocab_size,
           "the tokenizer has {} tokens but the model only {}", tokenizer.vocab_size(),
           config.vocab_size);
  GenerateResult result;
  result.prompt_tokens.push_back(tokenizer.bos_id());
  for (int32_t t : tokenizer.encode(prompt)) result.prompt_tokens.push_back(t);
  const int64_t total = static_cast<int64_t>(result.prompt_tokens.size()) + options.max_new_tokens;
  MF_CHECK(config.max_position_embeddings <= 0 || total <= config.max_position_embeddings,
           "prompt ({} tokens) + --max-new-tokens ({}) exceed the model's "
           "max_position_embeddings ({})",
           result.prompt_tokens.size(), options.max_new_tokens, config.max_position_embeddings);

  engine.start(total);
  Rng rng(options.seed);
  using Clock = std::chrono::steady_clock;
  auto start = Clock::now();
  const std::vector<float>* logits = &engine.prefill(
      result.prompt_tokens.data(), static_cast<int64_t>(result.prompt_tokens.size()));
  result.prefill_seconds = std::chrono::duration<double>(Clock::now() - start).count();
  if (options.after_prefill) options.after_prefill();
  start = Clock::now();
  for (int64_t i = 0; i < options.max_new_tokens; ++i) {
    const int32_t next = sample_token(logits->data(), config.vocab_size, options.sampler, rng);
    if (options.stop_at_eos && next == tokenizer.eos_id()) break;
    result.new_tokens.push_back(next);
    if (on_token && next < tokenizer.vocab_size()) {
      on_token(tokenizer.decode(std::span<const int32_t>(&next, 1)));
    }
    if (i + 1 < options.max_new_tokens) logits = &engine.decode(next);
  }
  result.decode_seconds = std::chrono::duration<double>(Clock::now() - start).count();
  return result;
}

}  // namespace moeforge
