// The parameter layout of a model: every tensor under its exact Hugging Face name, with its shape
// and its offset in one flat buffer (so the optimizer, gradient reduction and checkpointing see a
// single array). The experts of a layer are contiguous per projection ([num_experts, out, in]),
// so the grouped GEMM reads expert e at base + e * out * in while each expert keeps its own HF
// name.
//
// Under expert parallelism a rank holds only its experts: the layout of ExpertShard{r, n} keeps
// the tensors of experts [r E / n, (r + 1) E / n) of every MoE layer (under their global HF names)
// and every other tensor, in the same order, so the flat buffer is the whole model's with the
// other ranks' experts left out. Each MoE layer's local experts (gate, up, down) are one
// contiguous range of it (expert_ranges()); everything else is replicated over the group.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "model/model_config.h"
#include "model/param_range.h"

namespace moeforge {

struct ParamSpec {
  std::string name;            // HF tensor name
  std::vector<int64_t> shape;  // HF shape (nn.Linear layout [out, in])
  int64_t offset = 0;          // element offset in the flat buffer
  int64_t numel = 0;
};

// Offsets (elements) of one decoder layer's tensors; -1 when the tensor does not exist.
// Expert tensors give the start of the [local experts, out, in] block.
// Which experts of every MoE layer a layout holds: shard `rank` of `size` equal contiguous ranges
// (size must divide num_experts); the default, one shard, holds them all.
struct ExpertShard {
  int64_t rank = 0;
  int64_t size = 1;
};

struct LayerOffsets {
  int64_t input_norm = -1, post_attention_norm = -1;
  int64_t q_proj = -1, k_proj = -1, v_proj = -1, o_proj = -1;
  int64_t q_bias = -1, k_bias = -1, v_bias = -1;
  int64_t q_norm = -1, k_norm = -1;
  int64_t mlp_gate = -1, mlp_up = -1, mlp_down = -1;  // dense SwiGLU
  int64_t router = -1;
  int64_t experts_gate = -1, experts_up = -1, experts_down = -1;
  int64_t shared_gate = -1, shared_up = -1, shared_down = -1, shared_expert_gate = -1;
};

class ParameterLayout {
 public:
  // Throws moeforge::Error beyond kMaxNumLayers, kMaxNumExperts or kMaxNumParams, or when the
  // shard is not one of size shards that divide the experts.
  explicit ParameterLayout(const ModelConfig& config, ExpertShard experts = {});

  const ModelConfig& config() const { return config_; }
  const ExpertShard& expert_shard() const { return expert_shard_; }
  // Whether the layout leaves some experts out (a shard of several, of an MoE model).
  bool experts_sharded() const { return expert_shard_.size > 1 && config_.is_moe(); }
  // Experts per MoE layer held here.
  int64_t num_local_experts() const { return config_.num_experts / expert_shard_.size; }
  // The elements of the flat buffer (this shard's).
  const std::vector<ParamSpec>& specs() const { return specs_; }
  int64_t num_params() const { return num_params_; }
  // The whole model's parameters, every expert counted (num_params() unless sharded).
  int64_t num_model_params() const { return num_model_params_; }
  // Parameters of the whole model used per token: all but the unselected experts (top_k of
  // num_experts per layer).
  int64_t num_active_params() const { return num_active_params_; }
  // With the experts sharded, each MoE layer's local experts as one range (layer order); empty
  // otherwise.
  const std::vector<ParamRange>& expert_ranges() const { return expert_ranges_; }
  // The complement of expert_ranges() in the flat buffer, in offset order (empty ranges left out).
  std::vector<ParamRange> replicated_ranges() const;
  const ParamSpec* find(const std::string& name) const;

  int64_t embed_tokens() const { return embed_tokens_; }
  int64_t final_norm() const { return final_norm_; }
  int64_t lm_head() const { return lm_head_; }  // == embed_tokens() when tied
  const LayerOffsets& layer(int64_t idx) const { return layers_[static_cast<size_t>(idx)]; }

 private:
  int64_t add(const std::string& name, std::vector<int64_t> shape);
  int64_t add_experts(const std::string& prefix, const std::string& suffix, int64_t num_experts,
                      int64_t rows, int64_t cols);

  ModelConfig config_;
  ExpertShard expert_shard_;
  std::vector<ParamSpec> specs_;
  std::unordered_map<std::string, size_t> index_;
  std::vector<LayerOffsets> layers_;
  std::vector<ParamRange> expert_ranges_;
  int64_t num_params_ = 0;
  int64_t num_model_params_ = 0;
  int64_t num_active_params_ = 0;
  int64_t embed_tokens_ = -1, final_norm_ = -1, lm_head_ = -1;
};

// The number of parameters of the config, ParameterLayout(config).num_params(), computed with
// overflow checks and without building the layout; nullopt when it does not fit int64_t.
std::optional<int64_t> count_params(const ModelConfig& config);

// The initial weights of a model: Normal(0, std) for matrices and embeddings, 1 for norms, 0 for
// biases, drawn in the whole model's layout order from Rng(seed), into params
// [layout.num_params()]: a shard gets the same values as the whole model under the same names.
template <typename T>
void init_random_params(const ParameterLayout& layout, uint64_t seed, double std, T* params);

// True for the parameters that RMSNorm owns (their HF names end in "norm.weight" or
// "layernorm.weight").
bool is_norm_param(const std::string& name);

}  // namespace moeforge
