// The seam between the generation loop (generate.h, task_eval.h) and the engines that run a
// model on one sequence with a KV cache: the CPU reference (cpu_inference.h) and the GPU engine
// (cuda/gpu_inference.h). An engine holds one sequence at a time.
#pragma once

#include <cstdint>
#include <vector>

#include "infer/qkv_dump.h"
#include "model/model_config.h"
#include "model/prefill_attention.h"

namespace moeforge {

class InferenceEngine {
 public:
  virtual ~InferenceEngine() = default;

  virtual const ModelConfig& config() const = 0;
  // Starts a new sequence: an empty KV cache with room for capacity positions (1 ..
  // max_position_embeddings). Throws moeforge::Error naming the capacity otherwise.
  virtual void start(int64_t capacity) = 0;
  // Runs num_tokens tokens at the next positions of the sequence, appends their keys and values to
  // the cache and returns the logits [vocab] of the last of them (valid until the next call). A
  // prefill into an empty cache attends as the engine's PrefillAttention says.
  virtual const std::vector<float>& prefill(const int32_t* tokens, int64_t num_tokens) = 0;
  // One token at the next position, attending densely to the cache: its logits [vocab].
  virtual const std::vector<float>& decode(int32_t token) = 0;
  // Per layer statistics of the last sparse prefill (prefill_attention.h); empty until one ran.
  virtual const std::vector<PrefillLayerStats>& prefill_stats() const = 0;
  // Keep layer `layer`'s queries of the following prefills (an engine may keep only one layer's),
  // for prefill_qkv. Throws moeforge::Error for a layer outside the model.
  virtual void keep_prefill_qkv(int64_t layer) = 0;
  // Layer `layer`'s q, k and v of the prefill that filled the empty cache, right after it (before
  // any decode step); keep_prefill_qkv(layer) must have preceded that prefill.
  virtual PrefillQkv prefill_qkv(int64_t layer) const = 0;
};

}  // namespace moeforge
