// CpuInference: each call is one Transformer<float>::forward_incremental.
#include "infer/cpu_inference.h"

#include "core/error.h"

namespace moeforge {

CpuInference::CpuInference(Transformer<float>& model)
    : model_(model), logits_(static_cast<size_t>(model.config().vocab_size)) {}

void CpuInference::start(int64_t capacity) {
  const int64_t max_positions = model_.config().max_position_embeddings;
  MF_CHECK(max_positions <= 0 || capacity <= max_positions,
           "a KV cache of {} positions exceeds the model's max_position_embeddings ({})", capacity,
           max_positions);
  cache_.emplace(model_.config(), capacity);
}

const std::vector<float>& CpuInference::prefill(const int32_t* tokens, int64_t num_tokens) {
  MF_CHECK(cache_.has_value(), "CpuInference: prefill before start()");
  model_.forward_incremental(tokens, num_tokens, *cache_, logits_.data());
  return logits_;
}

const std::vector<float>& CpuInference::decode(int32_t token) {
  return prefill(&token, 1);
}

void CpuInference::keep_prefill_qkv(int64_t layer) {
  MF_CHECK(layer >= 0 && layer < model_.config().num_layers,
           "layer {} is outside the model's {} layers", layer, model_.config().num_layers);
}

PrefillQkv CpuInference::prefill_qkv(int64_t layer) const {
  MF_CHECK(cache_.has_value(), "CpuInference: no sequence started");
  return capture_prefill_qkv(model_, *cache_, layer);
}

}  // namespace moeforge
