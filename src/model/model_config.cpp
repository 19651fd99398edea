// Reads, validates and writes the Hugging Face config.json of every supported architecture, mapping
// each architecture's own field names onto ModelConfig.
#include "model/model_config.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <limits>
#include <optional>

#include "core/error.h"
#include "model/parameters.h"

namespace moeforge {

namespace {

using nlohmann::json;

struct ArchInfo {
  Architecture arch;
  const char* hf_name;
  const char* model_type;
};

constexpr ArchInfo kArchitectures[] = {
    {Architecture::kLlama, "LlamaForCausalLM", "llama"},
    {Architecture::kQwen2, "Qwen2ForCausalLM", "qwen2"},
    {Architecture::kQwen3, "Qwen3ForCausalLM", "qwen3"},
    {Architecture::kMixtral, "MixtralForCausalLM", "mixtral"},
    {Architecture::kQwen2Moe, "Qwen2MoeForCausalLM", "qwen2_moe"},
    {Architecture::kQwen3Moe, "Qwen3MoeForCausalLM", "qwen3_moe"},
};

constexpr const char* kDtypes[] = {"float32", "bfloat16", "float16"};

const ArchInfo& arch_info(Architecture arch) {
  for (const ArchInfo& info : kArchitectures) {
    if (info.arch == arch) return info;
  }
  MF_FAIL("unknown Architecture value {}", static_cast<int>(arch));
}

const ArchInfo* find_arch_by_name(const std::string& hf_name) {
  for (const ArchInfo& info : kArchitectures) {
    if (hf_name == info.hf_name) return &info;
  }
  return nullptr;
}

const ArchInfo* find_arch_by_model_type(const std::string& model_type) {
  for (const ArchInfo& info : kArchitectures) {
    if (model_type == info.model_type) return &info;
  }
  return nullptr;
}

std::string supported_names(bool model_types) {
  std::string names;
  for (const ArchInfo& info : kArchitectures) {
    if (!names.empty()) names += ", ";
    names += model_types ? info.model_type : info.hf_name;
  }
  return names;
}

bool is_moe_arch(Architecture arch) {
  return arch == Architecture::kMixtral || arch == Architecture::kQwen2Moe ||
         arch == Architecture::kQwen3Moe;
}

bool is_qwen_moe(Architecture arch) {
  return arch == Architecture::kQwen2Moe || arch == Architecture::kQwen3Moe;
}

bool arch_has_qk_norm(Architecture arch) {
  return arch == Architecture::kQwen3 || arch == Architecture::kQwen3Moe;
}

// Qwen2 always puts a bias on q/k/v (and none on o_proj); Qwen2-MoE does unless its "qkv_bias"
// (transformers 5) is false.
bool arch_has_qkv_bias(Architecture arch) {
  return arch == Architecture::kQwen2 || arch == Architecture::kQwen2Moe;
}

// Architectures whose HF config class reads "attention_bias" (it then also biases o_proj).
bool arch_reads_attention_bias(Architecture arch) {
  return arch == Architecture::kLlama || arch == Architecture::kQwen3 ||
         arch == Architecture::kQwen3Moe;
}

// Architectures whose HF config class declares head_dim (Qwen2 and Qwen2-MoE only pick it up
// as an extra attribute, so it is written for them only when it differs from hidden / heads).
bool arch_declares_head_dim(Architecture arch) {
  return arch != Architecture::kQwen2 && arch != Architecture::kQwen2Moe;
}

// The HF name of the expert-count field, and the alias that the config class maps onto it
// (attribute_map in transformers 5, which writes Qwen3-MoE's count as num_local_experts).
const char* num_experts_field(Architecture arch) {
  return arch == Architecture::kMixtral ? "num_local_experts" : "num_experts";
}
const char* num_experts_alias(Architecture arch) {
  switch (arch) {
    case Architecture::kMixtral: return "num_experts";
    case Architecture::kQwen3Moe: return "num_local_experts";
    default: return nullptr;
  }
}
const char* dense_layers_field(Architecture arch) {
  return is_qwen_moe(arch) ? "mlp_only_layers" : "moeforge_dense_layers";
}

// Defaults of the HF config classes for the optional fields.
double default_rms_norm_eps(Architecture arch) {
  return arch == Architecture::kMixtral ? 1e-5 : 1e-6;
}
double default_rope_theta(Architecture arch) {
  return arch == Architecture::kMixtral ? 1e6 : 1e4;
}
int64_t default_num_experts_per_tok(Architecture arch) {
  switch (arch) {
    case Architecture::kMixtral: return 2;
    case Architecture::kQwen2Moe: return 4;
    default: return 8;
  }
}
constexpr double kDefaultRouterAuxLossCoef = 0.001;

// Typed access to the fields of one config.json; every error names the source and the field.
class FieldReader {
 public:
  FieldReader(const json& j, const std::string& source) : j_(j), source_(source) {
    MF_CHECK(j.is_object(), "{}: expected a JSON object, got {}", source, j.dump());
  }

  // The field's value, or null when it is absent or JSON null.
  const json* find(const char* key) const {
    auto it = j_.find(key);
    if (it == j_.end() || it->is_null()) return nullptr;
    return &*it;
  }

  int64_t required_int(const char* key) const {
    const json* v = find(key);
    MF_CHECK(v != nullptr, "{}: missing required field {}", source_, key);
    return as_int(key, *v);
  }
  int64_t int_or(const char* key, int64_t fallback) const {
    const json* v = find(key);
    return v ? as_int(key, *v) : fallback;
  }
  double number_or(const char* key, double fallback) const {
    const json* v = find(key);
    return v ? as_number(key, *v) : fallback;
  }
  bool bool_or(const char* key, bool fallback) const {
    const json* v = find(key);
    if (v == nullptr) return fallback;
    if (!v->is_boolean()) type_error(key, "a boolean (true or false)", *v);
    return v->get<bool>();
  }
  const json* string_field(const char* key) const {
    const json* v = find(key);
    if (v != nullptr && !v->is_string()) type_error(key, "a string", *v);
    return v;
  }
  std::vector<int64_t> int_list(const char* key) const {
    const json* v = find(key);
    if (v == nullptr) return {};
    if (!v->is_array()) type_error(key, "a list of integers", *v);
    std::vector<int64_t> values;
    for (const json& item : *v) {
      if (!is_int64(item)) type_error(key, "a list of integers", *v);
      values.push_back(item.get<int64_t>());
    }
    return values;
  }
  // bos_token_id / eos_token_id: an integer, a list of integers (the first is used) or null.
  int64_t token_id(const char* key) const {
    const json* v = find(key);
    if (v == nullptr) return -1;
    if (is_int64(*v)) return v->get<int64_t>();
    const std::vector<int64_t> ids = int_list(key);
    return ids.empty() ? -1 : ids.front();
  }
  double as_number(const std::string& key, const json& v) const {
    if (!v.is_number()) type_error(key, "a number", v);
    return v.get<double>();
  }
  [[noreturn]] void type_error(const std::string& key, const char* expected, const json& v) const {
    MF_FAIL("{}: {} must be {}, got {}", source_, key, expected, v.dump());
  }
  const std::string& source() const { return source_; }

 private:
  static bool is_int64(const json& v) {
    if (v.is_number_unsigned()) {
      return v.get<uint64_t>() <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max());
    }
    return v.is_number_integer();
  }
  int64_t as_int(const char* key, const json& v) const {
    if (!is_int64(v)) type_error(key, "an integer", v);
    return v.get<int64_t>();
  }

  const json& j_;
  std::string source_;
};

Architecture read_architecture(const FieldReader& r) {
  const json* model_type = r.string_field("model_type");
  const ArchInfo* info = nullptr;
  if (const json* archs = r.find("architectures")) {
    if (!archs->is_array() || archs->empty() || !(*archs)[0].is_string()) {
      r.type_error("architectures", "a non-empty list of strings", *archs);
    }
    const std::string name = (*archs)[0].get<std::string>();
    info = find_arch_by_name(name);
    MF_CHECK(info != nullptr, "{}: architectures[0] \"{}\" is not supported; supported: {}",
             r.source(), name, supported_names(false));
    MF_CHECK(model_type == nullptr || model_type->get<std::string>() == info->model_type,
             "{}: model_type \"{}\" does not match architectures[0] \"{}\" (expected \"{}\")",
             r.source(), model_type ? model_type->get<std::string>() : "", name, info->model_type);
  } else {
    MF_CHECK(model_type != nullptr, "{}: missing \"architectures\" (or \"model_type\")",
             r.source());
    info = find_arch_by_model_type(model_type->get<std::string>());
    MF_CHECK(info != nullptr, "{}: model_type \"{}\" is not supported; supported: {}", r.source(),
             model_type->get<std::string>(), supported_names(true));
  }
  return info->arch;
}

// rope_theta may sit at the top level (transformers 4) and/or in rope_parameters (transformers
// 5); only the default RoPE type is implemented, so any scaling is rejected.
double read_rope_theta(const FieldReader& r, Architecture arch) {
  const json* top = r.find("rope_theta");
  double theta = top ? r.as_number("rope_theta", *top) : default_rope_theta(arch);
  for (const char* key : {"rope_parameters", "rope_scaling"}) {
    const json* params = r.find(key);
    if (params == nullptr) continue;
    if (!params->is_object()) r.type_error(key, "an object or null", *params);
    std::string rope_type = "default";
    for (const char* type_key : {"rope_type", "type"}) {
      auto it = params->find(type_key);
      if (it == params->end()) continue;
      if (!it->is_string()) r.type_error(fmt::format("{}.{}", key, type_key), "a string", *it);
      rope_type = it->get<std::string>();
    }
    MF_CHECK(rope_type == "default",
             "{}: {}.rope_type \"{}\" is not supported: moeforge implements only default RoPE "
             "(no scaling); got {}",
             r.source(), key, rope_type, params->dump());
    auto it = params->find("rope_theta");
    if (it == params->end()) continue;
    const double nested = r.as_number(fmt::format("{}.rope_theta", key), *it);
    MF_CHECK(top == nullptr || nested == theta,
             "{}: rope_theta ({}) and {}.rope_theta ({}) disagree", r.source(), theta, key, nested);
    theta = nested;
  }
  return theta;
}

// Features of the HF models that moeforge does not implement; each is rejected, naming the field.
void reject_unsupported(const FieldReader& r, Architecture arch, int64_t max_position_embeddings) {
  if (const json* act = r.string_field("hidden_act")) {
    MF_CHECK(act->get<std::string>() == "silu",
             "{}: hidden_act \"{}\" is not supported (only \"silu\")", r.source(),
             act->get<std::string>());
  }
  if (arch == Architecture::kLlama) {
    MF_CHECK(!r.bool_or("mlp_bias", false), "{}: mlp_bias=true is not supported", r.source());
  }
  if (arch_reads_attention_bias(arch)) {
    MF_CHECK(!r.bool_or("attention_bias", false),
             "{}: attention_bias=true is not supported for {} (it also biases o_proj, which "
             "moeforge does not implement)",
             r.source(), arch_info(arch).hf_name);
  }
  if (arch == Architecture::kMixtral) {
    const int64_t window = r.int_or("sliding_window", max_position_embeddings);
    MF_CHECK(window >= max_position_embeddings,
             "{}: sliding_window ({}) is not supported (set it to null)", r.source(), window);
    const double jitter = r.number_or("router_jitter_noise", 0.0);
    MF_CHECK(jitter == 0, "{}: router_jitter_noise ({}) is not supported (set it to 0)", r.source(),
             jitter);
  } else if (arch != Architecture::kLlama) {
    MF_CHECK(!r.bool_or("use_sliding_window", false),
             "{}: use_sliding_window=true is not supported", r.source());
  }
  if (const json* layer_types = r.find("layer_types")) {
    if (!layer_types->is_array()) r.type_error("layer_types", "a list of strings", *layer_types);
    for (const json& type : *layer_types) {
      MF_CHECK(type == "full_attention",
               "{}: layer_types entry {} is not supported (only \"full_attention\")", r.source(),
               type.dump());
    }
  }
}

// Checked before the layer count sizes anything (the dense-layer list, the parameter layout).
void check_max_num_layers(int64_t num_layers, const std::string& source) {
  MF_CHECK(num_layers <= kMaxNumLayers, "{}: num_hidden_layers must be <= {}, got {}", source,
           kMaxNumLayers, num_layers);
}

void read_moe_fields(const FieldReader& r, ModelConfig& c) {
  const Architecture arch = c.architecture;
  const char* field = num_experts_field(arch);
  const char* alias = num_experts_alias(arch);
  if (alias != nullptr && r.find(alias) != nullptr) {
    const int64_t aliased = r.required_int(alias);
    MF_CHECK(r.int_or(field, aliased) == aliased, "{}: {} ({}) and {} ({}) disagree", r.source(),
             field, r.int_or(field, aliased), alias, aliased);
    c.num_experts = aliased;
  } else {
    c.num_experts = r.required_int(field);
  }
  c.num_experts_per_tok = r.int_or("num_experts_per_tok", default_num_experts_per_tok(arch));
  c.router_aux_loss_coef = r.number_or("router_aux_loss_coef", kDefaultRouterAuxLossCoef);
  std::vector<int64_t> dense = r.int_list("moeforge_dense_layers");
  if (arch == Architecture::kMixtral) {
    c.moe_intermediate_size = c.intermediate_size;
    c.norm_topk_prob = true;
  } else {
    c.moe_intermediate_size = r.required_int("moe_intermediate_size");
    c.norm_topk_prob = r.bool_or("norm_topk_prob", false);
    if (arch == Architecture::kQwen2Moe) {
      c.shared_expert_intermediate_size = r.required_int("shared_expert_intermediate_size");
    }
    const std::vector<int64_t> mlp_only = r.int_list("mlp_only_layers");
    dense.insert(dense.end(), mlp_only.begin(), mlp_only.end());
    const int64_t sparse_step = r.int_or("decoder_sparse_step", 1);
    MF_CHECK(sparse_step >= 0, "{}: decoder_sparse_step must be >= 0, got {}", r.source(),
             sparse_step);
    check_max_num_layers(c.num_layers, r.source());
    for (int64_t layer = 0; sparse_step > 0 && layer < c.num_layers; ++layer) {
      if ((layer + 1) % sparse_step != 0) dense.push_back(layer);
    }
  }
  std::sort(dense.begin(), dense.end());
  dense.erase(std::unique(dense.begin(), dense.end()), dense.end());
  c.dense_layers = std::move(dense);
}

std::string read_dtype(const FieldReader& r) {
  const json* torch_dtype = r.string_field("torch_dtype");
  const json* dtype = r.string_field("dtype");
  MF_CHECK(torch_dtype == nullptr || dtype == nullptr || *torch_dtype == *dtype,
           "{}: torch_dtype ({}) and dtype ({}) disagree", r.source(),
           torch_dtype ? torch_dtype->dump() : "", dtype ? dtype->dump() : "");
  if (dtype != nullptr) return dtype->get<std::string>();
  return torch_dtype ? torch_dtype->get<std::string>() : "float32";
}

void validate(const ModelConfig& c, const std::string& source) {
  const std::string& s = source;
  const Architecture arch = c.architecture;
  const char* arch_name = arch_info(arch).hf_name;
  auto check_positive = [&](int64_t value, const char* field) {
    MF_CHECK(value > 0, "{}: {} must be > 0, got {}", s, field, value);
  };
  check_positive(c.vocab_size, "vocab_size");
  check_positive(c.hidden_size, "hidden_size");
  check_positive(c.num_layers, "num_hidden_layers");
  check_max_num_layers(c.num_layers, s);
  check_positive(c.num_heads, "num_attention_heads");
  check_positive(c.num_kv_heads, "num_key_value_heads");
  MF_CHECK(c.num_heads % c.num_kv_heads == 0,
           "{}: num_key_value_heads ({}) must divide num_attention_heads ({})", s, c.num_kv_heads,
           c.num_heads);
  check_positive(c.head_dim, "head_dim");
  MF_CHECK(c.head_dim % 2 == 0, "{}: head_dim must be even (RoPE rotates pairs), got {}", s,
           c.head_dim);
  check_positive(c.intermediate_size, "intermediate_size");
  check_positive(c.max_position_embeddings, "max_position_embeddings");
  MF_CHECK(std::isfinite(c.rms_norm_eps) && c.rms_norm_eps > 0,
           "{}: rms_norm_eps must be > 0, got {}", s, c.rms_norm_eps);
  MF_CHECK(std::isfinite(c.rope_theta) && c.rope_theta > 0, "{}: rope_theta must be > 0, got {}", s,
           c.rope_theta);
  MF_CHECK(c.attention_bias == arch_has_qkv_bias(arch) || arch == Architecture::kQwen2Moe,
           "{}: attention_bias must be {} for {} (q/k/v bias is fixed by the architecture)", s,
           arch_has_qkv_bias(arch), arch_name);
  MF_CHECK(c.qk_norm == arch_has_qk_norm(arch),
           "{}: qk_norm (q_norm/k_norm) must be {} for {} (fixed by the architecture)", s,
           arch_has_qk_norm(arch), arch_name);

  const char* experts_field = num_experts_field(arch);
  const char* dense_field = dense_layers_field(arch);
  if (is_moe_arch(arch)) {
    MF_CHECK(c.num_experts > 0, "{}: {} must be > 0 for {}, got {}", s, experts_field, arch_name,
             c.num_experts);
    MF_CHECK(c.num_experts <= kMaxNumExperts, "{}: {} must be <= {}, got {}", s, experts_field,
             kMaxNumExperts, c.num_experts);
    MF_CHECK(c.num_experts_per_tok >= 1 && c.num_experts_per_tok <= c.num_experts,
             "{}: num_experts_per_tok must be in [1, {}={}], got {}", s, experts_field,
             c.num_experts, c.num_experts_per_tok);
    check_positive(c.moe_intermediate_size, "moe_intermediate_size");
    MF_CHECK(std::isfinite(c.router_aux_loss_coef) && c.router_aux_loss_coef >= 0,
             "{}: router_aux_loss_coef must be >= 0, got {}", s, c.router_aux_loss_coef);
    for (size_t i = 0; i < c.dense_layers.size(); ++i) {
      const int64_t layer = c.dense_layers[i];
      MF_CHECK(layer >= 0 && layer < c.num_layers,
               "{}: {} entry {} is out of range [0, num_hidden_layers={})", s, dense_field, layer,
               c.num_layers);
      MF_CHECK(i == 0 || c.dense_layers[i - 1] < layer,
               "{}: {} must be strictly increasing, got {} after {}", s, dense_field, layer,
               c.dense_layers[i - 1]);
    }
  } else {
    MF_CHECK(c.num_experts == 0 && c.num_experts_per_tok == 0 && c.moe_intermediate_size == 0 &&
                 c.dense_layers.empty() && c.router_aux_loss_coef == 0,
             "{}: {} is a dense architecture; num_experts, num_experts_per_tok, "
             "moe_intermediate_size, mlp_only_layers and router_aux_loss_coef must be unset (got "
             "num_experts={}, num_experts_per_tok={}, moe_intermediate_size={}, {} dense layers, "
             "router_aux_loss_coef={})",
             s, arch_name, c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size,
             c.dense_layers.size(), c.router_aux_loss_coef);
  }
  if (arch == Architecture::kMixtral) {
    MF_CHECK(c.moe_intermediate_size == c.intermediate_size,
             "{}: MixtralForCausalLM has one intermediate_size for experts and dense layers; "
             "moe_intermediate_size ({}) must equal intermediate_size ({})",
             s, c.moe_intermediate_size, c.intermediate_size);
    MF_CHECK(c.norm_topk_prob, "{}: norm_topk_prob must be true for MixtralForCausalLM", s);
  }
  if (arch == Architecture::kQwen2Moe) {
    MF_CHECK(c.shared_expert_intermediate_size >= 0,
             "{}: shared_expert_intermediate_size must be >= 0, got {}", s,
             c.shared_expert_intermediate_size);
  } else {
    MF_CHECK(c.shared_expert_intermediate_size == 0,
             "{}: shared_expert_intermediate_size must be 0 for {} (only Qwen2MoeForCausalLM has "
             "a shared expert), got {}",
             s, arch_name, c.shared_expert_intermediate_size);
  }
  MF_CHECK(std::isfinite(c.router_z_loss_coef) && c.router_z_loss_coef >= 0,
           "{}: router_z_loss_coef must be >= 0, got {}", s, c.router_z_loss_coef);
  MF_CHECK(std::isfinite(c.capacity_factor) && c.capacity_factor >= 0,
           "{}: capacity_factor must be >= 0 (0: dropless), got {}", s, c.capacity_factor);
  MF_CHECK(c.router_balance_groups == 0 || (c.router_balance_groups > 0 && c.num_experts > 0 &&
                                            c.num_experts % c.router_balance_groups == 0),
           "{}: router_balance_groups must be 0 (per expert) or a divisor of the {} experts, got "
           "{}",
           s, c.num_experts, c.router_balance_groups);
  MF_CHECK(c.bos_token_id >= -1 && c.bos_token_id < c.vocab_size,
           "{}: bos_token_id must be in [0, vocab_size={}) or null, got {}", s, c.vocab_size,
           c.bos_token_id);
  MF_CHECK(c.eos_token_id >= -1 && c.eos_token_id < c.vocab_size,
           "{}: eos_token_id must be in [0, vocab_size={}) or null, got {}", s, c.vocab_size,
           c.eos_token_id);
  MF_CHECK(std::find(std::begin(kDtypes), std::end(kDtypes), c.torch_dtype) != std::end(kDtypes),
           "{}: torch_dtype must be one of float32, bfloat16, float16, got \"{}\"", s,
           c.torch_dtype);
  // Last: the count is exact only for a config whose fields passed the checks above.
  const std::optional<int64_t> num_params = count_params(c);
  MF_CHECK(num_params && *num_params <= kMaxNumParams,
           "{}: the model has {} parameters, more than the {} (2^42) supported; see vocab_size "
           "({}), hidden_size ({}), num_attention_heads ({}) x head_dim ({}), intermediate_size "
           "({}), {} ({}) x moe_intermediate_size ({}), shared_expert_intermediate_size ({}) and "
           "num_hidden_layers ({})",
           s, num_params ? fmt::format("{}", *num_params) : "more than 2^63", kMaxNumParams,
           c.vocab_size, c.hidden_size, c.num_heads, c.head_dim, c.intermediate_size, experts_field,
           c.num_experts, c.moe_intermediate_size, c.shared_expert_intermediate_size, c.num_layers);
}

ModelConfig parse_model_config(const json& j, const std::string& source) {
  const FieldReader r(j, source);
  ModelConfig c;
  c.architecture = read_architecture(r);
  const Architecture arch = c.architecture;
  c.vocab_size = r.required_int("vocab_size");
  c.hidden_size = r.required_int("hidden_size");
  c.num_layers = r.required_int("num_hidden_layers");
  c.num_heads = r.required_int("num_attention_heads");
  c.num_kv_heads = r.int_or("num_key_value_heads", c.num_heads);
  if (r.find("head_dim") != nullptr) {
    c.head_dim = r.required_int("head_dim");
  } else {
    MF_CHECK(c.num_heads > 0 && c.hidden_size % c.num_heads == 0,
             "{}: hidden_size ({}) is not divisible by num_attention_heads ({}); set head_dim",
             source, c.hidden_size, c.num_heads);
    c.head_dim = c.hidden_size / c.num_heads;
  }
  c.intermediate_size = r.required_int("intermediate_size");
  c.max_position_embeddings = r.required_int("max_position_embeddings");
  c.rms_norm_eps = r.number_or("rms_norm_eps", default_rms_norm_eps(arch));
  c.rope_theta = read_rope_theta(r, arch);
  reject_unsupported(r, arch, c.max_position_embeddings);
  c.attention_bias =
      arch_has_qkv_bias(arch) && (arch != Architecture::kQwen2Moe || r.bool_or("qkv_bias", true));
  c.qk_norm = arch_has_qk_norm(arch);
  c.tie_word_embeddings = r.bool_or("tie_word_embeddings", false);
  if (is_moe_arch(arch)) read_moe_fields(r, c);
  c.router_z_loss_coef = r.number_or("router_z_loss_coef", 0.0);
  c.capacity_factor = r.number_or("capacity_factor", 0.0);
  c.router_balance_groups = r.int_or("router_balance_groups", 0);
  c.bos_token_id = r.token_id("bos_token_id");
  c.eos_token_id = r.token_id("eos_token_id");
  c.torch_dtype = read_dtype(r);
  validate(c, source);
  return c;
}

json token_id_json(int64_t id) {
  return id < 0 ? json(nullptr) : json(id);
}

}  // namespace

Architecture parse_architecture(const std::string& hf_name) {
  const ArchInfo* info = find_arch_by_name(hf_name);
  MF_CHECK(info != nullptr, "unsupported architecture \"{}\"; supported: {}", hf_name,
           supported_names(false));
  return info->arch;
}

std::string architecture_name(Architecture arch) {
  return arch_info(arch).hf_name;
}

std::string architecture_model_type(Architecture arch) {
  return arch_info(arch).model_type;
}

bool ModelConfig::layer_is_moe(int64_t layer) const {
  return is_moe() &&
         std::find(dense_layers.begin(), dense_layers.end(), layer) == dense_layers.end();
}

ModelConfig model_config_from_json(const nlohmann::json& j) {
  return parse_model_config(j, "config.json");
}

ModelConfig load_model_config(const std::filesystem::path& config_json) {
  std::ifstream in(config_json);
  MF_CHECK(in.good(), "cannot open model config {}", config_json.string());
  json j;
  try {
    j = json::parse(in);
  } catch (const json::exception& e) {
    MF_FAIL("{}: invalid JSON: {}", config_json.string(), e.what());
  }
  return parse_model_config(j, config_json.string());
}

void validate_model_config(const ModelConfig& config) {
  validate(config, "config.json");
}

nlohmann::json model_config_to_json(const ModelConfig& c) {
  validate_model_config(c);
  const Architecture arch = c.architecture;
  json j;
  j["architectures"] = json::array({architecture_name(arch)});
  j["model_type"] = architecture_model_type(arch);
  j["vocab_size"] = c.vocab_size;
  j["hidden_size"] = c.hidden_size;
  j["num_hidden_layers"] = c.num_layers;
  j["num_attention_heads"] = c.num_heads;
  j["num_key_value_heads"] = c.num_kv_heads;
  if (arch_declares_head_dim(arch) || c.head_dim * c.num_heads != c.hidden_size) {
    j["head_dim"] = c.head_dim;
  }
  j["intermediate_size"] = c.intermediate_size;
  j["max_position_embeddings"] = c.max_position_embeddings;
  j["hidden_act"] = "silu";
  j["rms_norm_eps"] = c.rms_norm_eps;
  j["rope_theta"] = c.rope_theta;
  j["rope_parameters"] = {{"rope_theta", c.rope_theta}, {"rope_type", "default"}};
  j["tie_word_embeddings"] = c.tie_word_embeddings;
  if (arch_reads_attention_bias(arch)) j["attention_bias"] = false;
  if (arch == Architecture::kLlama) j["mlp_bias"] = false;
  if (arch == Architecture::kMixtral) {
    j["sliding_window"] = nullptr;
  } else if (arch != Architecture::kLlama) {
    j["use_sliding_window"] = false;
  }
  if (is_moe_arch(arch)) {
    j[num_experts_field(arch)] = c.num_experts;
    j["num_experts_per_tok"] = c.num_experts_per_tok;
    j["router_aux_loss_coef"] = c.router_aux_loss_coef;
    if (is_qwen_moe(arch)) {
      j["moe_intermediate_size"] = c.moe_intermediate_size;
      j["norm_topk_prob"] = c.norm_topk_prob;
      j["decoder_sparse_step"] = 1;
      j["mlp_only_layers"] = c.dense_layers;
      if (arch == Architecture::kQwen2Moe) {
        j["shared_expert_intermediate_size"] = c.shared_expert_intermediate_size;
        j["qkv_bias"] = c.attention_bias;
      }
    } else if (!c.dense_layers.empty()) {
      j["moeforge_dense_layers"] = c.dense_layers;
    }
  }
  if (c.router_z_loss_coef != 0) j["router_z_loss_coef"] = c.router_z_loss_coef;
  if (c.capacity_factor != 0) j["capacity_factor"] = c.capacity_factor;
  if (c.router_balance_groups != 0) j["router_balance_groups"] = c.router_balance_groups;
  j["bos_token_id"] = token_id_json(c.bos_token_id);
  j["eos_token_id"] = token_id_json(c.eos_token_id);
  j["torch_dtype"] = c.torch_dtype;
  j["dtype"] = c.torch_dtype;
  return j;
}

}  // namespace moeforge
