// Text generation with a KV cache: prefill the prompt in one forward, then decode token by token,
// on any InferenceEngine (the CPU reference or the GPU engine).
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "data/tokenizer.h"
#include "infer/inference_engine.h"
#include "infer/sampler.h"

namespace moeforge {

struct GenerateOptions {
  int64_t max_new_tokens = 128;
  SamplerOptions sampler;
  uint64_t seed = 0;
  bool stop_at_eos = true;
  // Called once after the prompt's prefill (may be null).
  std::function<void()> after_prefill;
};

struct GenerateResult {
  std::vector<int32_t> prompt_tokens;
  std::vector<int32_t> new_tokens;
  double prefill_seconds = 0.0;
  double decode_seconds = 0.0;
};

// Starts a new sequence on the engine (a cache of prompt + max_new_tokens positions). on_token is
// called with the text of each new token as it is produced (may be null).
GenerateResult generate(InferenceEngine& engine, const data::Tokenizer& tokenizer,
                        const std::string& prompt, const GenerateOptions& options,
                        const std::function<void(const std::string&)>& on_token);

}  // namespace moeforge
