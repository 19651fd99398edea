// Greedy, temperature and top-p sampling over one row of logits.
#include "infer/sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "core/error.h"

namespace moeforge {

void validate_sampler_options(const SamplerOptions& o) {
  MF_CHECK(std::isfinite(o.temperature) && o.temperature >= 0.0,
           "--temperature must be >= 0, got {}", o.temperature);
  MF_CHECK(o.top_p > 0.0 && o.top_p <= 1.0, "--top-p must be in (0, 1], got {}", o.top_p);
}

int32_t sample_token(const float* logits, int64_t vocab, const SamplerOptions& o, Rng& rng) {
  MF_CHECK(vocab > 0, "cannot sample from an empty vocabulary");
  if (o.temperature == 0.0) {
    return static_cast<int32_t>(std::max_element(logits, logits + vocab) - logits);
  }
  const double max_logit = *std::max_element(logits, logits + vocab);
  std::vector<double> probs(static_cast<size_t>(vocab));
  double total = 0.0;
  for (int64_t i = 0; i < vocab; ++i) {
    probs[i] = std::exp((logits[i] - max_logit) / o.temperature);
    total += probs[i];
  }
  std::vector<int32_t> order(static_cast<size_t>(vocab));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int32_t a, int32_t b) { return probs[a] > probs[b]; });
  // Nucleus: the shortest prefix of the sorted tokens whose mass reaches top_p.
  size_t keep = 0;
  double mass = 0.0;
  while (keep < order.size() && (keep == 0 || mass < o.top_p * total)) mass += probs[order[keep++]];
  double u = rng.uniform() * mass;
  for (size_t i = 0; i < keep; ++i) {
    u -= probs[order[i]];
    if (u < 0.0) return order[i];
  }
  return order[keep - 1];
}

}  // namespace moeforge
