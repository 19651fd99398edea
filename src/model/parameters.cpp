// Builds the HF-named flat parameter layout of every supported architecture.
#include "model/parameters.h"

#include <fmt/format.h>

#include <algorithm>
#include <initializer_list>
#include <optional>

#include "core/error.h"
#include "core/rng.h"

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

// Overflow-checked int64_t sums and products: nullopt when a term is nullopt or the result does
// not fit.
using MaybeCount = std::optional<int64_t>;

MaybeCount checked_sum(std::initializer_list<MaybeCount> terms) {
  int64_t sum = 0;
  for (const MaybeCount& term : terms) {
    if (!term || __builtin_add_overflow(sum, *term, &sum)) return std::nullopt;
  }
  return sum;
}

MaybeCount checked_product(std::initializer_list<MaybeCount> factors) {
  int64_t product = 1;
  for (const MaybeCount& factor : factors) {
    if (!factor || __builtin_mul_overflow(product, *factor, &product)) return std::nullopt;
  }
  return product;
}

}  // namespace

std::optional<int64_t> count_params(const ModelConfig& c) {
  const int64_t h = c.hidden_size;
  const MaybeCount q_dim = checked_product({c.num_heads, c.head_dim});
  const MaybeCount kv_dim = checked_product({c.num_kv_heads, c.head_dim});
  // Per layer: the two norms, q/k/v/o, the q/k/v biases and the q/k norms.
  const MaybeCount attention = checked_sum({
      checked_product({2, h}),
      checked_product({2, q_dim, h}),
      checked_product({2, kv_dim, h}),
      c.attention_bias ? checked_sum({q_dim, checked_product({2, kv_dim})}) : 0,
      c.qk_norm ? checked_product({2, c.head_dim}) : 0,
  });
  const MaybeCount dense_ffn = checked_product({3, c.intermediate_size, h});
  const int64_t shared = c.shared_expert_intermediate_size;
  const MaybeCount moe_ffn = checked_sum({
      checked_product({c.num_experts, h}),
      checked_product({3, c.num_experts, c.moe_intermediate_size, h}),
      shared > 0 ? checked_sum({checked_product({3, shared, h}), h}) : 0,
  });
  // Layers that are MoE: as layer_is_moe, without a pass over all layers.
  std::vector<int64_t> dense = c.dense_layers;
  std::sort(dense.begin(), dense.end());
  dense.erase(std::unique(dense.begin(), dense.end()), dense.end());
  const int64_t num_dense_listed = std::count_if(dense.begin(), dense.end(), [&](int64_t layer) {
    return layer >= 0 && layer < c.num_layers;
  });
  const int64_t num_moe_layers = c.is_moe() ? c.num_layers - num_dense_listed : 0;
  const MaybeCount embedding = checked_product({c.vocab_size, h});
  return checked_sum({
      embedding,
      checked_product({c.num_layers, attention}),
      checked_product({c.num_layers - num_moe_layers, dense_ffn}),
      checked_product({num_moe_layers, moe_ffn}),
      h,
      c.tie_word_embeddings ? 0 : embedding,
  });
}

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
  const int64_t local = num_experts / expert_shard_.size;
  int64_t first = -1;
  for (int64_t e = expert_shard_.rank * local; e < (expert_shard_.rank + 1) * local; ++e) {
    const int64_t offset =
        add(fmt::format("{}.experts.{}.{}.weight", prefix, e, suffix), {rows, cols});
    if (first < 0) first = offset;
  }
  return first;
}

ParameterLayout::ParameterLayout(const ModelConfig& c, ExpertShard experts)
    : config_(c), expert_shard_(experts) {
  // The bounds of validate_model_config that keep the tensor count and the sizes below finite.
  const std::optional<int64_t> total = count_params(c);
  MF_CHECK(c.num_layers <= kMaxNumLayers && c.num_experts <= kMaxNumExperts && total &&
               *total <= kMaxNumParams,
           "the parameter layout supports at most {} layers, {} experts and {} parameters, got "
           "{}, {} and {}",
           kMaxNumLayers, kMaxNumExperts, kMaxNumParams, c.num_layers, c.num_experts,
           total ? fmt::format("{}", *total) : "more than 2^63");
  MF_CHECK(experts.size >= 1 && experts.rank >= 0 && experts.rank < experts.size &&
               (!c.is_moe() || c.num_experts % experts.size == 0),
           "expert shard {} of {} is not one of equal shards of the {} experts", experts.rank,
           experts.size, c.num_experts);
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
      if (experts.size > 1)
        expert_ranges_.push_back({o.experts_gate, num_params_ - o.experts_gate});
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
  num_model_params_ = *total;
  num_active_params_ = num_model_params_ - inactive;
}

std::vector<ParamRange> ParameterLayout::replicated_ranges() const {
  std::vector<ParamRange> out;
  int64_t next = 0;
  for (const ParamRange& r : expert_ranges_) {
    if (r.offset > next) out.push_back({next, r.offset - next});
    next = r.offset + r.count;
  }
  if (num_params_ > next) out.push_back({next, num_params_ - next});
  return out;
}

const ParamSpec* ParameterLayout::find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &specs_[it->second];
}

template <typename T>
void init_random_params(const ParameterLayout& layout, uint64_t seed, double std, T* params) {
  // A shard draws the whole model's sequence and keeps the values of its own tensors.
  std::optional<ParameterLayout> whole;
  if (layout.experts_sharded()) whole.emplace(layout.config());
  Rng rng(seed);
  for (const ParamSpec& spec : (whole ? *whole : layout).specs()) {
    const ParamSpec* own = whole ? layout.find(spec.name) : &spec;
    const bool is_norm = is_norm_param(spec.name);
    const bool is_bias = spec.shape.size() == 1 && !is_norm;
    if (own == nullptr) {
      if (!is_norm && !is_bias) rng.skip_normals(static_cast<uint64_t>(spec.numel));
      continue;
    }
    T* w = params + own->offset;
    for (int64_t i = 0; i < spec.numel; ++i) {
      if (is_norm) {
        w[i] = T(1);
      } else if (is_bias) {
        w[i] = T(0);
      } else {
        w[i] = static_cast<T>(rng.normal() * std);
      }
    }
  }
}

template void init_random_params<float>(const ParameterLayout&, uint64_t, double, float*);
template void init_random_params<double>(const ParameterLayout&, uint64_t, double, double*);

}  // namespace moeforge
