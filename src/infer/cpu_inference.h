// The CPU reference as an InferenceEngine: Transformer<float>::forward_incremental over a KvCache.
#pragma once

#include <cstdint>
#include <optional>
#include <vector>

#include "infer/inference_engine.h"
#include "model/transformer.h"

namespace moeforge {

class CpuInference : public InferenceEngine {
 public:
  // The model (with its PrefillAttention) must outlive the engine.
  explicit CpuInference(Transformer<float>& model);

  const ModelConfig& config() const override { return model_.config(); }
  void start(int64_t capacity) override;
  const std::vector<float>& prefill(const int32_t* tokens, int64_t num_tokens) override;
  const std::vector<float>& decode(int32_t token) override;
  const std::vector<PrefillLayerStats>& prefill_stats() const override {
    return model_.prefill_stats();
  }

  // The CPU reference keeps every layer's queries of the last forward.
  void keep_prefill_qkv(int64_t layer) override;
  PrefillQkv prefill_qkv(int64_t layer) const override;

 private:
  Transformer<float>& model_;
  std::optional<KvCache<float>> cache_;
  std::vector<float> logits_;  // [vocab]
};

}  // namespace moeforge
