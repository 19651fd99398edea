// Small models of every architecture the CUDA backend runs, with bf16-representable weights, for
// the whole-model tests (gpu_transformer_test.cpp, gpu_inference_test.cpp and the group tests).
#pragma once

#include <cuda_bf16.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "core/rng.h"
#include "model/model_config.h"
#include "model/parameters.h"

namespace moeforge::cuda::testing {

// Every architecture, for the whole-model tests' INSTANTIATE_TEST_SUITE_P, and their test names
// ("LlamaForCausalLM" etc.).
inline auto every_architecture() {
  return ::testing::Values(Architecture::kLlama, Architecture::kQwen2, Architecture::kQwen3,
                           Architecture::kMixtral, Architecture::kQwen2Moe,
                           Architecture::kQwen3Moe);
}

inline std::string architecture_test_name(const ::testing::TestParamInfo<Architecture>& info) {
  return architecture_name(info.param);
}

inline ModelConfig gpu_config(Architecture arch) {
  ModelConfig c;
  c.architecture = arch;
  c.vocab_size = 301;
  c.hidden_size = 96;
  c.num_layers = 2;
  c.num_heads = 4;
  c.num_kv_heads = 2;
  c.head_dim = 64;
  c.intermediate_size = 80;
  c.max_position_embeddings = 128;
  c.rms_norm_eps = 1e-5;
  c.rope_theta = 10000.0;
  switch (arch) {
    case Architecture::kLlama: c.tie_word_embeddings = true; break;
    case Architecture::kQwen2: c.attention_bias = true; break;
    case Architecture::kQwen3: c.qk_norm = true; break;
    case Architecture::kMixtral:
      c.num_experts = 8;
      c.num_experts_per_tok = 2;
      c.moe_intermediate_size = 48;
      c.intermediate_size = 48;  // Mixtral has one size for both
      c.router_aux_loss_coef = 0.1;
      c.router_z_loss_coef = 0.01;
      break;
    case Architecture::kQwen3Moe:
      c.qk_norm = true;
      c.num_experts = 6;
      c.num_experts_per_tok = 3;
      c.moe_intermediate_size = 40;
      c.norm_topk_prob = false;
      c.dense_layers = {0};
      c.router_aux_loss_coef = 0.05;
      c.router_z_loss_coef = 0.02;
      break;
    case Architecture::kQwen2Moe:
      // Every layer MoE, each with a sigmoid-gated shared expert of a multiple-of-8 size.
      c.attention_bias = true;
      c.num_experts = 6;
      c.num_experts_per_tok = 2;
      c.moe_intermediate_size = 32;
      c.shared_expert_intermediate_size = 56;
      c.norm_topk_prob = false;
      c.router_aux_loss_coef = 0.02;
      c.router_z_loss_coef = 0.01;
      break;
    default: break;
  }
  return c;
}

// Qwen2-MoE with a shared expert of an odd size: its GEMMs' rows of 27 bf16 values are not 16-byte
// aligned (cuBLASLt's unaligned algorithms).
inline ModelConfig gpu_config_odd_shared_expert() {
  ModelConfig c = gpu_config(Architecture::kQwen2Moe);
  c.shared_expert_intermediate_size = 27;
  return c;
}

// bf16-representable weights: N(0, 0.05) matrices, router x20, the shared expert's sigmoid gate
// x4 (logits of standard deviation about 2 on the unit-RMS normed inputs of hidden 96, so that its
// scores spread over (0.1, 0.9) rather than saturating), norms around 1, small biases.
inline std::vector<float> make_params(const ParameterLayout& layout, uint64_t seed) {
  Rng rng(seed);
  std::vector<float> p(static_cast<size_t>(layout.num_params()));
  for (const ParamSpec& spec : layout.specs()) {
    const bool is_norm = is_norm_param(spec.name);
    const bool is_shared_expert_gate = spec.name.find("shared_expert_gate") != std::string::npos;
    const bool is_router = !is_shared_expert_gate &&
                           spec.name.find("gate.weight") != std::string::npos &&
                           spec.name.find("experts") == std::string::npos &&
                           spec.name.find("gate_proj") == std::string::npos;
    const double scale = is_router ? 1.0 : is_shared_expert_gate ? 0.2 : 0.05;
    for (int64_t i = 0; i < spec.numel; ++i) {
      const double v = is_norm ? 1.0 + 0.1 * rng.normal() : scale * rng.normal();
      p[static_cast<size_t>(spec.offset + i)] = __bfloat162float(__float2bfloat16_rn(float(v)));
    }
  }
  return p;
}

// sqrt(sum (a - b)^2 / sum b^2) over n values.
inline double relative_l2(const float* a, const float* b, int64_t n) {
  double diff = 0.0, ref = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    diff += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
    ref += double(b[i]) * b[i];
  }
  return std::sqrt(diff / std::max(ref, 1e-30));
}

}  // namespace moeforge::cuda::testing
