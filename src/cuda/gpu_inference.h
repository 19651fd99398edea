// Inference of one sequence on one GPU (an InferenceEngine): bf16 weights, a bf16 KV cache per
// layer ([capacity, kv_dim] for k and v; k after q/k norm and RoPE, as KvCache holds it), and
// scratch for the largest chunk of tokens seen, shared by all layers (no per-layer activations, so
// a long prefill costs its KV cache plus one layer's working set). The arithmetic of
// GpuTransformer's forward: bf16 activations, an fp32 residual stream, fp32 accumulation, fp32
// norm weights, biases and embedding table; the logits of the last position in fp32.
//
// Attention: a prefill into an empty cache runs cuDNN's fused attention (head_dim a multiple of 8
// up to 128) or else the block-sparse kernel over the dense causal layout; with FlexPrefill on
// (set_prefill_attention) it runs cuda::flex_prefill_select and the block-sparse kernel on its
// selection instead, and records per-layer statistics. Decode steps and prefills that continue a
// non-empty cache run decode_attention_forward (dense). The MoE FFN runs in chunks of
// kFfnChunkTokens tokens, which bounds its buffers (top_k rows per token).
//
// Supported: what GpuTransformer supports (Qwen2-MoE's shared expert and capacity-based token
// dropping included: a capacity applies to all the tokens of a call, across the FFN's chunks),
// head_dim a multiple of 8 up to 256.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <memory>
#include <unordered_map>
#include <vector>

#include "cuda/attention.h"
#include "cuda/bf16.h"
#include "cuda/blas.h"
#include "cuda/device_info.h"
#include "cuda/device_memory.h"
#include "cuda/grouped_gemm.h"
#include "infer/inference_engine.h"
#include "model/model_config.h"
#include "model/parameters.h"
#include "model/prefill_attention.h"

namespace moeforge::cuda {

constexpr int64_t kFfnChunkTokens = 4096;

class GpuInference : public InferenceEngine {
 public:
  // params: the model's flat fp32 weights in ParameterLayout(config) order. Throws
  // moeforge::Error without a CUDA device or for an unsupported config.
  GpuInference(const ModelConfig& config, const std::vector<float>& params);
  ~GpuInference() override;
  GpuInference(const GpuInference&) = delete;
  GpuInference& operator=(const GpuInference&) = delete;

  const ModelConfig& config() const override { return config_; }
  // Empties the cache; grows it to capacity positions (it never shrinks).
  void start(int64_t capacity) override;
  const std::vector<float>& prefill(const int32_t* tokens, int64_t num_tokens) override;
  const std::vector<float>& decode(int32_t token) override;
  const std::vector<PrefillLayerStats>& prefill_stats() const override { return prefill_stats_; }

  // Throws moeforge::Error naming the field if the flex parameters are invalid.
  void set_prefill_attention(const PrefillAttention& attention);
  int64_t length() const { return length_; }
  int64_t capacity() const { return capacity_; }
  bool grouped_expert_gemms() const { return grouped_experts_; }
  // Layer l's cached keys or values of positions [0, length()) (bf16 values as fp32).
  std::vector<float> download_cache(int64_t l, bool keys) const;
  // One layer's queries are copied to the host during each prefill into an empty cache.
  void keep_prefill_qkv(int64_t layer) override;
  // q, k and v as bf16 values in fp32.
  PrefillQkv prefill_qkv(int64_t layer) const override;

 private:
  struct Scratch;
  struct FlexStats;

  // Runs num_tokens tokens at positions length_ .. through every layer; leaves the logits of the
  // last one in logits_.
  void run(const int32_t* tokens, int64_t num_tokens);
  void upload_weights(const std::vector<float>& params);
  void reserve(int64_t num_tokens);
  // q into scratch, k and v into the cache at positions length_ .. length_ + n.
  void qkv_forward(int64_t l, int64_t n);
  void attention_forward(int64_t l, int64_t n, bool sparse);
  // capacity: rows per expert over the whole call (-1: dropless), carried across the chunks.
  void moe_forward(int64_t l, float* x, const bf16* ln, int64_t n, int64_t capacity);
  // x [n, h] += sigmoid(ln . w_gate) * the shared expert's output (Qwen2-MoE), after the routed
  // experts.
  void shared_expert_forward(int64_t l, float* x, const bf16* ln, int64_t n);
  void dense_ffn_forward(int64_t l, float* x, const bf16* ln, int64_t n);
  void expert_forward(bf16* y, const bf16* x, const bf16* w, int64_t in, int64_t out);
  // fp32 copy of a norm weight, bias or the embedding table (by layout offset); null for -1.
  const float* w(int64_t offset) const;
  const bf16* wb(int64_t offset) const {
    return offset < 0 ? nullptr : params_bf16_.data() + offset;
  }
  bf16* cache_k(int64_t l) { return cache_k_[static_cast<size_t>(l)].data(); }
  bf16* cache_v(int64_t l) { return cache_v_[static_cast<size_t>(l)].data(); }

  ModelConfig config_;
  ParameterLayout layout_;
  cudaStream_t stream_ = nullptr;
  // Checked before the cuBLAS and cuDNN handles below are created, for a clear error.
  bool has_device_ = (require_cuda_device(), true);
  Blas blas_;
  Attention attention_;
  GroupedGemm grouped_;
  bool grouped_experts_ = false;
  bool cudnn_prefill_ = false;  // cuDNN runs this head_dim
  PrefillAttention prefill_attention_;

  DeviceBuffer<bf16> params_bf16_;  // [num_params], every tensor
  DeviceBuffer<float> params_f32_;  // norms, biases and the embedding table, packed
  std::unordered_map<int64_t, int64_t> f32_offset_;  // layout offset -> params_f32_ offset
  DeviceBuffer<float> rope_cos_, rope_sin_;

  int64_t capacity_ = 0, length_ = 0;
  int64_t kept_layer_ = -1;                            // keep_prefill_qkv's layer
  int64_t kept_positions_ = 0;                         // positions of kept_queries_ (0: none kept)
  std::vector<bf16> kept_queries_;                     // [kept_positions_, q_dim] of kept_layer_
  std::vector<DeviceBuffer<bf16>> cache_k_, cache_v_;  // per layer [capacity, kv_dim]
  std::unique_ptr<Scratch> scratch_;
  std::unique_ptr<FlexStats> flex_stats_;
  std::vector<PrefillLayerStats> prefill_stats_;
  std::vector<float> logits_;  // [vocab]
};

}  // namespace moeforge::cuda
