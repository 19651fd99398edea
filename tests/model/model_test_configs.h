// Tiny model configs of every architecture, shared by the model tests.
#pragma once

#include <string>
#include <vector>

#include "model/model_config.h"

namespace moeforge::testing {

inline ModelConfig tiny_config(Architecture arch) {
  ModelConfig c;
  c.architecture = arch;
  c.vocab_size = 13;
  c.hidden_size = 8;
  c.num_layers = 2;
  c.num_heads = 4;
  c.num_kv_heads = 2;
  c.head_dim = 4;
  c.intermediate_size = 10;
  c.max_position_embeddings = 64;
  c.rms_norm_eps = 1e-6;
  c.rope_theta = 10000.0;
  switch (arch) {
    case Architecture::kLlama: c.tie_word_embeddings = true; break;
    case Architecture::kQwen2: c.attention_bias = true; break;
    case Architecture::kQwen3:
      c.qk_norm = true;
      c.head_dim = 6;  // head_dim != hidden / heads, as Qwen3 allows
      break;
    case Architecture::kMixtral:
      c.num_experts = 4;
      c.num_experts_per_tok = 2;
      c.moe_intermediate_size = 6;
      c.intermediate_size = 6;
      c.router_aux_loss_coef = 0.1;
      c.router_z_loss_coef = 0.01;
      break;
    case Architecture::kQwen2Moe:
      c.attention_bias = true;
      c.num_experts = 5;
      c.num_experts_per_tok = 2;
      c.moe_intermediate_size = 6;
      c.shared_expert_intermediate_size = 7;
      c.norm_topk_prob = false;
      c.router_aux_loss_coef = 0.1;
      break;
    case Architecture::kQwen3Moe:
      c.qk_norm = true;
      c.num_experts = 6;
      c.num_experts_per_tok = 3;
      c.moe_intermediate_size = 5;
      c.dense_layers = {0};
      c.router_aux_loss_coef = 0.05;
      c.router_z_loss_coef = 0.02;
      break;
  }
  return c;
}

inline std::vector<Architecture> all_architectures() {
  return {Architecture::kLlama,   Architecture::kQwen2,    Architecture::kQwen3,
          Architecture::kMixtral, Architecture::kQwen2Moe, Architecture::kQwen3Moe};
}

}  // namespace moeforge::testing
