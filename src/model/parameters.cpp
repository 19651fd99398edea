// Builds the HF-named flat parameter layout of every supported architecture.
#include "model/parameters.h"

#include <fmt/format.h>

#include "core/error.h"

namespace moeforge {

namespace {

struct ExpertNames {
  std::string block;  // "block_sparse_moe" (Mixtral) or "mlp"
  std::string gate, up, down;
};

ExpertNames expert_names(Architecture arch) {
  if (arch == Architecture::kMixtral) return {"block_sparse_moe", "w1", "w3", "w2"};
  return {"mlp", "gate_proj", "up_proj", "down_proj"};
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

}  // namespace

bool is_norm_param(const std::string& name) {
  return ends_with(name, "norm.weight") || ends_with(name, "layernorm.weight");
}

int64_t ParameterLayout::add(const std::string& name, std::vector<int64_t> shape) {
  MF_CHECK(!index_.contains(name), "duplicate parameter name {}", name);
  int64_t numel = 1;
  for (int64_t d : shape) numel *= d;
  const int64_t offset = num_params_;
  index_[name] = specs_.size();
  specs_.push_back(ParamSpec{name, std::move(shape), offset, numel});
  num_params_ += numel;
  return offset;
}

int64_t ParameterLayout::add_experts(const std::string& prefix, const std::string& suffix,
                                     int64_t num_experts, int64_t rows, int64_t cols) {
  int64_t first = -1;
  for (int64_t e = 0; e < num_experts; ++e) {
    const int64_t offset =
        add(fmt::format("{}.experts.{}.{}.weight", prefix, e, suffix), {rows, cols});
    if (e == 0) first = offset;
  }
  return first;
}

ParameterLayout::ParameterLayout(const ModelConfig& c) {
  const int64_t h = c.hidden_size;
  embed_tokens_ = add("model.embed_tokens.weight", {c.vocab_size, h});
  const ExpertNames names = expert_names(c.architecture);
  int64_t inactive = 0;
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const std::string p = fmt::format("model.layers.{}", l);
    LayerOffsets o;
    o.input_norm = add(p + ".input_layernorm.weight", {h});
    o.q_proj = add(p + ".self_attn.q_proj.weight", {c.q_dim(), h});
    o.k_proj = add(p + ".self_attn.k_proj.weight", {c.kv_dim(), h});
    o.v_proj = add(p + ".self_attn.v_proj.weight", {c.kv_dim(), h});
    if (c.attention_bias) {
      o.q_bias = add(p + ".self_attn.q_proj.bias", {c.q_dim()});
      o.k_bias = add(p + ".self_attn.k_proj.bias", {c.kv_dim()});
      o.v_bias = add(p + ".self_attn.v_proj.bias", {c.kv_dim()});
    }
    o.o_proj = add(p + ".self_attn.o_proj.weight", {h, c.q_dim()});
    if (c.qk_norm) {
      o.q_norm = add(p + ".self_attn.q_norm.weight", {c.head_dim});
      o.k_norm = add(p + ".self_attn.k_norm.weight", {c.head_dim});
    }
    o.post_attention_norm = add(p + ".post_attention_layernorm.weight", {h});
    if (c.layer_is_moe(l)) {
      const std::string m = p + "." + names.block;
      const int64_t ffn = c.moe_intermediate_size;
      o.router = add(m + ".gate.weight", {c.num_experts, h});
      o.experts_gate = add_experts(m, names.gate, c.num_experts, ffn, h);
      o.experts_up = add_experts(m, names.up, c.num_experts, ffn, h);
      o.experts_down = add_experts(m, names.down, c.num_experts, h, ffn);
      inactive += (c.num_experts - c.num_experts_per_tok) * 3 * ffn * h;
      if (c.shared_expert_intermediate_size > 0) {
        const int64_t s = c.shared_expert_intermediate_size;
        o.shared_gate = add(m + ".shared_expert.gate_proj.weight", {s, h});
        o.shared_up = add(m + ".shared_expert.up_proj.weight", {s, h});
        o.shared_down = add(m + ".shared_expert.down_proj.weight", {h, s});
        o.shared_expert_gate = add(m + ".shared_expert_gate.weight", {1, h});
      }
    } else {
      o.mlp_gate = add(p + ".mlp.gate_proj.weight", {c.intermediate_size, h});
      o.mlp_up = add(p + ".mlp.up_proj.weight", {c.intermediate_size, h});
      o.mlp_down = add(p + ".mlp.down_proj.weight", {h, c.intermediate_size});
    }
    layers_.push_back(o);
  }
  final_norm_ = add("model.norm.weight", {h});
  lm_head_ = c.tie_word_embeddings ? embed_tokens_ : add("lm_head.weight", {c.vocab_size, h});
  num_active_params_ = num_params_ - inactive;
}

const ParamSpec* ParameterLayout::find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &specs_[it->second];
}

}  // namespace moeforge
