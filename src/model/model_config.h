// The model definition read from (and written to) a Hugging Face style config.json.
// One struct covers every supported architecture; the parser maps each architecture's own field
// names onto it and validates it, naming the field in every error.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

namespace moeforge {

enum class Architecture {
  kLlama,     // LlamaForCausalLM
  kQwen2,     // Qwen2ForCausalLM (q/k/v bias)
  kQwen3,     // Qwen3ForCausalLM (per-head q/k RMSNorm)
  kMixtral,   // MixtralForCausalLM (block_sparse_moe, experts w1/w2/w3)
  kQwen2Moe,  // Qwen2MoeForCausalLM (q/k/v bias, shared expert with sigmoid gate)
  kQwen3Moe,  // Qwen3MoeForCausalLM (q/k norm, mlp.experts, mlp_only_layers)
};

// "MixtralForCausalLM" etc.; throws on unknown names (listing the supported ones).
Architecture parse_architecture(const std::string& hf_name);
std::string architecture_name(Architecture arch);
// HF "model_type" ("llama", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe").
std::string architecture_model_type(Architecture arch);

struct ModelConfig {
  Architecture architecture = Architecture::kLlama;
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t num_layers = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;           // hidden_size / num_heads unless the config sets it
  int64_t intermediate_size = 0;  // dense SwiGLU layers
  int64_t max_position_embeddings = 0;
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  bool attention_bias = false;  // bias on q/k/v projections (Qwen2, Qwen2-MoE: true)
  bool qk_norm = false;         // per-head RMSNorm on q and k (Qwen3, Qwen3-MoE)
  bool tie_word_embeddings = false;

  // Mixture of experts (num_experts == 0: a dense model).
  int64_t num_experts = 0;
  int64_t num_experts_per_tok = 0;    // top-k
  int64_t moe_intermediate_size = 0;  // per-expert ffn size
  bool norm_topk_prob = true;
  int64_t shared_expert_intermediate_size = 0;  // 0: no shared expert (Qwen2-MoE only)
  std::vector<int64_t> dense_layers;            // layers with a dense SwiGLU instead of experts
  double router_aux_loss_coef = 0.0;            // HF field router_aux_loss_coef
  double router_z_loss_coef = 0.0;              // moeforge extension, field router_z_loss_coef
  double capacity_factor = 0.0;                 // moeforge extension; <= 0 means dropless
  // moeforge extension: the aux loss balances this many groups of consecutive experts instead of
  // each expert (ops/router.h; MegaScale-MoE balances per GPU: set it to the expert-parallel
  // size); 0: per expert.
  int64_t router_balance_groups = 0;

  int64_t bos_token_id = -1;
  int64_t eos_token_id = -1;
  std::string torch_dtype = "float32";  // dtype written to safetensors on export

  bool operator==(const ModelConfig&) const = default;
  bool is_moe() const { return num_experts > 0; }
  bool layer_is_moe(int64_t layer) const;  // false for dense models and dense_layers
  int64_t q_dim() const { return num_heads * head_dim; }
  int64_t kv_dim() const { return num_kv_heads * head_dim; }
};

// Upper bounds of validation, beyond every published model, so that no list grows without bound
// and no size computation overflows: the layer and expert counts (they set how many tensors the
// parameter layout names) and the parameter count (2^42, 4.4 trillion).
inline constexpr int64_t kMaxNumLayers = 1024;
inline constexpr int64_t kMaxNumExperts = 4096;
inline constexpr int64_t kMaxNumParams = int64_t{1} << 42;

// Parse and validate. Errors name the field ("config.json: num_key_value_heads (3) must divide
// num_attention_heads (8)").
ModelConfig model_config_from_json(const nlohmann::json& j);
ModelConfig load_model_config(const std::filesystem::path& config_json);
// The HF config.json of this model, with the architecture's own field names, so that
// transformers' AutoConfig reads it.
nlohmann::json model_config_to_json(const ModelConfig& config);
// Throws moeforge::Error naming the first invalid field.
void validate_model_config(const ModelConfig& config);

}  // namespace moeforge
