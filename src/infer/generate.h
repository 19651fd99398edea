// Text generation with a KV cache: prefill the prompt in one forward, then decode token by token.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "data/tokenizer.h"
#include "infer/sampler.h"
#include "model/transformer.h"

namespace moeforge {

struct GenerateOptions {
  int64_t max_new_tokens = 128;
  SamplerOptions sampler;
  uint64_t seed = 0;
  bool stop_at_eos = true;
  // Called once after the prompt's prefill, with the model and the filled KV cache (may be null).
  std::function<void(const Transformer<float>&, const KvCache<float>&)> after_prefill;
};

struct GenerateResult {
  std::vector<int32_t> prompt_tokens;
  std::vector<int32_t> new_tokens;
  double prefill_seconds = 0.0;
  double decode_seconds = 0.0;
};

// on_token is called with the text of each new token as it is produced (may be null).
GenerateResult generate(Transformer<float>& model, const data::Tokenizer& tokenizer,
                        const std::string& prompt, const GenerateOptions& options,
                        const std::function<void(const std::string&)>& on_token);

}  // namespace moeforge
