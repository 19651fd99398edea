// Next-token sampling from logits: greedy (temperature 0), temperature and nucleus (top-p).
#pragma once

#include <cstdint>

#include "core/rng.h"

namespace moeforge {

struct SamplerOptions {
  double temperature = 1.0;  // 0 = greedy (argmax, lowest index on ties)
  double top_p = 1.0;        // keep the smallest set of tokens whose probability reaches top_p
};

void validate_sampler_options(const SamplerOptions& options);

int32_t sample_token(const float* logits, int64_t vocab, const SamplerOptions& options, Rng& rng);

}  // namespace moeforge
