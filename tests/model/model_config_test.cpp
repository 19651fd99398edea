// Tests of the HF config.json reader/writer: real published configs of every architecture, the
// dense-layer rules, type and validation errors naming their field, and the round trip.
#include "model/model_config.h"

#include <gtest/gtest.h>

#include <fstream>
#include <string>
#include <vector>

#include "core/error.h"

namespace moeforge {
namespace {

using nlohmann::json;

// As published on the Hugging Face Hub (mistralai/Mixtral-8x7B-v0.1).
const json kMixtral8x7b = json::parse(R"({
  "architectures": ["MixtralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1,
  "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
  "intermediate_size": 14336, "max_position_embeddings": 32768, "model_type": "mixtral",
  "num_attention_heads": 32, "num_experts_per_tok": 2, "num_hidden_layers": 32,
  "num_key_value_heads": 8, "num_local_experts": 8, "output_router_logits": false,
  "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.02,
  "sliding_window": null, "tie_word_embeddings": false, "torch_dtype": "bfloat16",
  "transformers_version": "4.36.0.dev0", "use_cache": true, "vocab_size": 32000})");

// Qwen/Qwen3-30B-A3B.
const json kQwen3_30bA3b = json::parse(R"({
  "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
  "bos_token_id": 151643, "decoder_sparse_step": 1, "eos_token_id": 151645, "head_dim": 128,
  "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 6144,
  "max_position_embeddings": 40960, "max_window_layers": 48, "mlp_only_layers": [],
  "model_type": "qwen3_moe", "moe_intermediate_size": 768, "norm_topk_prob": true,
  "num_attention_heads": 32, "num_experts": 128, "num_experts_per_tok": 8,
  "num_hidden_layers": 48, "num_key_value_heads": 4, "output_router_logits": false,
  "rms_norm_eps": 1e-06, "rope_scaling": null, "rope_theta": 1000000.0,
  "router_aux_loss_coef": 0.001, "sliding_window": null, "tie_word_embeddings": false,
  "torch_dtype": "bfloat16", "transformers_version": "4.51.0", "use_cache": true,
  "use_sliding_window": false, "vocab_size": 151936})");

// Qwen/Qwen2-7B.
const json kQwen2_7b = json::parse(R"({
  "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
  "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 3584, "initializer_range": 0.02,
  "intermediate_size": 18944, "max_position_embeddings": 131072, "max_window_layers": 28,
  "model_type": "qwen2", "num_attention_heads": 28, "num_hidden_layers": 28,
  "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
  "sliding_window": 131072, "tie_word_embeddings": false, "torch_dtype": "bfloat16",
  "transformers_version": "4.37.2", "use_cache": true, "use_sliding_window": false,
  "vocab_size": 152064})");

// Qwen/Qwen2-57B-A14B.
const json kQwen2_57bA14b = json::parse(R"({
  "architectures": ["Qwen2MoeForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
  "decoder_sparse_step": 1, "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 3584,
  "initializer_range": 0.02, "intermediate_size": 18944, "max_position_embeddings": 131072,
  "max_window_layers": 28, "model_type": "qwen2_moe", "moe_intermediate_size": 2560,
  "norm_topk_prob": false, "num_attention_heads": 28, "num_experts": 64,
  "num_experts_per_tok": 8, "num_hidden_layers": 28, "num_key_value_heads": 4,
  "output_router_logits": false, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
  "router_aux_loss_coef": 0.001, "shared_expert_intermediate_size": 20480,
  "sliding_window": 65536, "tie_word_embeddings": false, "torch_dtype": "bfloat16",
  "transformers_version": "4.40.1", "use_cache": true, "use_sliding_window": false,
  "vocab_size": 151936})");

// meta-llama/Meta-Llama-3-8B.
const json kLlama3_8b = json::parse(R"({
  "architectures": ["LlamaForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
  "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096,
  "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 8192,
  "mlp_bias": false, "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32,
  "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": null,
  "rope_theta": 500000.0, "tie_word_embeddings": false, "torch_dtype": "bfloat16",
  "transformers_version": "4.40.0.dev0", "use_cache": true, "vocab_size": 128256})");

// Qwen/Qwen3-0.6B (dense Qwen3).
const json kQwen3_06b = json::parse(R"({
  "architectures": ["Qwen3ForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
  "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
  "hidden_size": 1024, "initializer_range": 0.02, "intermediate_size": 3072,
  "max_position_embeddings": 40960, "max_window_layers": 28, "model_type": "qwen3",
  "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8,
  "rms_norm_eps": 1e-06, "rope_scaling": null, "rope_theta": 1000000, "sliding_window": null,
  "tie_word_embeddings": true, "torch_dtype": "bfloat16", "transformers_version": "4.51.0",
  "use_cache": true, "use_sliding_window": false, "vocab_size": 151936})");

std::string repo_path(const std::string& relative) {
  return std::string(MOEFORGE_SOURCE_DIR) + "/" + relative;
}

// The message of the moeforge::Error that fn throws ("" when it does not throw).
template <typename Fn>
std::string error_of(Fn&& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

void expect_same_config(const ModelConfig& a, const ModelConfig& b) {
  EXPECT_EQ(a.architecture, b.architecture);
  EXPECT_EQ(a.vocab_size, b.vocab_size);
  EXPECT_EQ(a.hidden_size, b.hidden_size);
  EXPECT_EQ(a.num_layers, b.num_layers);
  EXPECT_EQ(a.num_heads, b.num_heads);
  EXPECT_EQ(a.num_kv_heads, b.num_kv_heads);
  EXPECT_EQ(a.head_dim, b.head_dim);
  EXPECT_EQ(a.intermediate_size, b.intermediate_size);
  EXPECT_EQ(a.max_position_embeddings, b.max_position_embeddings);
  EXPECT_EQ(a.rms_norm_eps, b.rms_norm_eps);
  EXPECT_EQ(a.rope_theta, b.rope_theta);
  EXPECT_EQ(a.attention_bias, b.attention_bias);
  EXPECT_EQ(a.qk_norm, b.qk_norm);
  EXPECT_EQ(a.tie_word_embeddings, b.tie_word_embeddings);
  EXPECT_EQ(a.num_experts, b.num_experts);
  EXPECT_EQ(a.num_experts_per_tok, b.num_experts_per_tok);
  EXPECT_EQ(a.moe_intermediate_size, b.moe_intermediate_size);
  EXPECT_EQ(a.norm_topk_prob, b.norm_topk_prob);
  EXPECT_EQ(a.shared_expert_intermediate_size, b.shared_expert_intermediate_size);
  EXPECT_EQ(a.dense_layers, b.dense_layers);
  EXPECT_EQ(a.router_aux_loss_coef, b.router_aux_loss_coef);
  EXPECT_EQ(a.router_z_loss_coef, b.router_z_loss_coef);
  EXPECT_EQ(a.capacity_factor, b.capacity_factor);
  EXPECT_EQ(a.router_balance_groups, b.router_balance_groups);
  EXPECT_EQ(a.bos_token_id, b.bos_token_id);
  EXPECT_EQ(a.eos_token_id, b.eos_token_id);
  EXPECT_EQ(a.torch_dtype, b.torch_dtype);
}

TEST(ModelConfigTest, ParsesMixtral8x7b) {
  const ModelConfig c = model_config_from_json(kMixtral8x7b);
  EXPECT_EQ(c.architecture, Architecture::kMixtral);
  EXPECT_EQ(c.vocab_size, 32000);
  EXPECT_EQ(c.hidden_size, 4096);
  EXPECT_EQ(c.num_layers, 32);
  EXPECT_EQ(c.num_heads, 32);
  EXPECT_EQ(c.num_kv_heads, 8);
  EXPECT_EQ(c.head_dim, 128);
  EXPECT_EQ(c.intermediate_size, 14336);
  EXPECT_EQ(c.moe_intermediate_size, 14336);
  EXPECT_EQ(c.max_position_embeddings, 32768);
  EXPECT_DOUBLE_EQ(c.rms_norm_eps, 1e-5);
  EXPECT_DOUBLE_EQ(c.rope_theta, 1e6);
  EXPECT_FALSE(c.attention_bias);
  EXPECT_FALSE(c.qk_norm);
  EXPECT_EQ(c.num_experts, 8);
  EXPECT_EQ(c.num_experts_per_tok, 2);
  EXPECT_TRUE(c.norm_topk_prob);
  EXPECT_EQ(c.shared_expert_intermediate_size, 0);
  EXPECT_TRUE(c.dense_layers.empty());
  EXPECT_DOUBLE_EQ(c.router_aux_loss_coef, 0.02);
  EXPECT_EQ(c.router_z_loss_coef, 0.0);
  EXPECT_EQ(c.capacity_factor, 0.0);
  EXPECT_EQ(c.bos_token_id, 1);
  EXPECT_EQ(c.eos_token_id, 2);
  EXPECT_EQ(c.torch_dtype, "bfloat16");
  EXPECT_TRUE(c.layer_is_moe(0));
  EXPECT_TRUE(c.layer_is_moe(31));
}

TEST(ModelConfigTest, ParsesQwen3MoeWithExplicitHeadDim) {
  const ModelConfig c = model_config_from_json(kQwen3_30bA3b);
  EXPECT_EQ(c.architecture, Architecture::kQwen3Moe);
  EXPECT_EQ(c.head_dim, 128);  // hidden / heads would be 64
  EXPECT_EQ(c.q_dim(), 4096);
  EXPECT_EQ(c.kv_dim(), 512);
  EXPECT_TRUE(c.qk_norm);
  EXPECT_FALSE(c.attention_bias);
  EXPECT_EQ(c.intermediate_size, 6144);
  EXPECT_EQ(c.moe_intermediate_size, 768);
  EXPECT_EQ(c.num_experts, 128);
  EXPECT_EQ(c.num_experts_per_tok, 8);
  EXPECT_TRUE(c.norm_topk_prob);
  EXPECT_TRUE(c.dense_layers.empty());
  EXPECT_DOUBLE_EQ(c.router_aux_loss_coef, 0.001);
  EXPECT_EQ(c.bos_token_id, 151643);
  EXPECT_EQ(c.eos_token_id, 151645);
}

TEST(ModelConfigTest, ParsesQwen2DenseWithImpliedQkvBias) {
  const ModelConfig c = model_config_from_json(kQwen2_7b);
  EXPECT_EQ(c.architecture, Architecture::kQwen2);
  EXPECT_TRUE(c.attention_bias);
  EXPECT_FALSE(c.qk_norm);
  EXPECT_FALSE(c.is_moe());
  EXPECT_FALSE(c.layer_is_moe(0));
  EXPECT_EQ(c.head_dim, 128);
  EXPECT_EQ(c.num_kv_heads, 4);
  EXPECT_EQ(c.num_experts_per_tok, 0);
  EXPECT_EQ(c.router_aux_loss_coef, 0.0);
}

TEST(ModelConfigTest, ParsesQwen2MoeWithSharedExpert) {
  const ModelConfig c = model_config_from_json(kQwen2_57bA14b);
  EXPECT_EQ(c.architecture, Architecture::kQwen2Moe);
  EXPECT_TRUE(c.attention_bias);
  EXPECT_EQ(c.num_experts, 64);
  EXPECT_EQ(c.num_experts_per_tok, 8);
  EXPECT_EQ(c.moe_intermediate_size, 2560);
  EXPECT_EQ(c.shared_expert_intermediate_size, 20480);
  EXPECT_EQ(c.intermediate_size, 18944);
  EXPECT_FALSE(c.norm_topk_prob);
  EXPECT_TRUE(c.dense_layers.empty());
}

TEST(ModelConfigTest, ParsesLlama3WithNullRopeScaling) {
  const ModelConfig c = model_config_from_json(kLlama3_8b);
  EXPECT_EQ(c.architecture, Architecture::kLlama);
  EXPECT_DOUBLE_EQ(c.rope_theta, 500000.0);
  EXPECT_EQ(c.head_dim, 128);
  EXPECT_EQ(c.vocab_size, 128256);
  EXPECT_FALSE(c.attention_bias);
  EXPECT_FALSE(c.is_moe());
  EXPECT_EQ(c.bos_token_id, 128000);
}

TEST(ModelConfigTest, ParsesQwen3DenseWithTiedEmbeddings) {
  const ModelConfig c = model_config_from_json(kQwen3_06b);
  EXPECT_EQ(c.architecture, Architecture::kQwen3);
  EXPECT_TRUE(c.qk_norm);
  EXPECT_TRUE(c.tie_word_embeddings);
  EXPECT_EQ(c.head_dim, 128);
  EXPECT_DOUBLE_EQ(c.rope_theta, 1e6);
}

TEST(ModelConfigTest, ArchitectureFallsBackToModelType) {
  json j = kQwen3_30bA3b;
  j.erase("architectures");
  EXPECT_EQ(model_config_from_json(j).architecture, Architecture::kQwen3Moe);
  j["model_type"] = "mistral";
  EXPECT_NE(
      error_of([&] { model_config_from_json(j); }).find("model_type \"mistral\" is not supported"),
      std::string::npos);
  j.erase("model_type");
  EXPECT_NE(error_of([&] { model_config_from_json(j); }).find("architectures"), std::string::npos);
}

TEST(ModelConfigTest, RejectsMismatchedOrUnknownArchitecture) {
  json j = kMixtral8x7b;
  j["model_type"] = "qwen2_moe";
  EXPECT_NE(error_of([&] { model_config_from_json(j); }).find("does not match architectures[0]"),
            std::string::npos);
  j = kMixtral8x7b;
  j["architectures"] = {"MistralForCausalLM"};
  const std::string message = error_of([&] { model_config_from_json(j); });
  EXPECT_NE(message.find("\"MistralForCausalLM\" is not supported"), std::string::npos) << message;
  EXPECT_NE(message.find("Qwen3MoeForCausalLM"), std::string::npos) << message;
  EXPECT_THROW(parse_architecture("GPT2LMHeadModel"), Error);
  for (Architecture arch :
       {Architecture::kLlama, Architecture::kQwen2, Architecture::kQwen3, Architecture::kMixtral,
        Architecture::kQwen2Moe, Architecture::kQwen3Moe}) {
    EXPECT_EQ(parse_architecture(architecture_name(arch)), arch);
  }
  EXPECT_EQ(architecture_model_type(Architecture::kQwen2Moe), "qwen2_moe");
}

TEST(ModelConfigTest, DefaultsOfOptionalFields) {
  json j = kMixtral8x7b;
  for (const char* key : {"num_key_value_heads", "rms_norm_eps", "rope_theta", "torch_dtype",
                          "bos_token_id", "router_aux_loss_coef", "num_experts_per_tok"}) {
    j.erase(key);
  }
  const ModelConfig c = model_config_from_json(j);
  EXPECT_EQ(c.num_kv_heads, 32);  // num_attention_heads
  EXPECT_DOUBLE_EQ(c.rms_norm_eps, 1e-5);
  EXPECT_DOUBLE_EQ(c.rope_theta, 1e6);
  EXPECT_EQ(c.torch_dtype, "float32");
  EXPECT_EQ(c.bos_token_id, -1);
  EXPECT_DOUBLE_EQ(c.router_aux_loss_coef, 0.001);
  EXPECT_EQ(c.num_experts_per_tok, 2);

  json q = kQwen2_57bA14b;
  for (const char* key : {"norm_topk_prob", "decoder_sparse_step", "rope_theta", "rms_norm_eps"}) {
    q.erase(key);
  }
  const ModelConfig qc = model_config_from_json(q);
  EXPECT_FALSE(qc.norm_topk_prob);
  EXPECT_TRUE(qc.dense_layers.empty());
  EXPECT_DOUBLE_EQ(qc.rope_theta, 1e4);
  EXPECT_DOUBLE_EQ(qc.rms_norm_eps, 1e-6);
}

TEST(ModelConfigTest, RequiredFieldsAreNamedWhenMissing) {
  for (const char* key : {"vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                          "intermediate_size", "max_position_embeddings", "moe_intermediate_size",
                          "num_experts", "shared_expert_intermediate_size"}) {
    json j = kQwen2_57bA14b;
    j.erase(key);
    EXPECT_NE(error_of([&] {
                model_config_from_json(j);
              }).find(fmt::format("config.json: missing required field {}", key)),
              std::string::npos)
        << key;
  }
  json j = kMixtral8x7b;
  j.erase("num_local_experts");
  EXPECT_NE(error_of([&] { model_config_from_json(j); }).find("num_local_experts"),
            std::string::npos);
}

// transformers 5 writes Qwen3-MoE's expert count under its alias num_local_experts, and gives
// Qwen2-MoE a qkv_bias switch.
TEST(ModelConfigTest, Transformers5ExpertAliasAndQkvBias) {
  json j = kQwen3_30bA3b;
  j.erase("num_experts");
  j["num_local_experts"] = 64;
  EXPECT_EQ(model_config_from_json(j).num_experts, 64);
  json mixtral = kMixtral8x7b;
  mixtral.erase("num_local_experts");
  mixtral["num_experts"] = 4;
  EXPECT_EQ(model_config_from_json(mixtral).num_experts, 4);
  json qwen2 = kQwen2_7b;
  qwen2["num_local_experts"] = 4;  // not an alias for a dense model: ignored
  EXPECT_FALSE(model_config_from_json(qwen2).is_moe());

  json qwen2_moe = kQwen2_57bA14b;
  EXPECT_TRUE(model_config_from_json(qwen2_moe).attention_bias);
  qwen2_moe["qkv_bias"] = false;
  const ModelConfig c = model_config_from_json(qwen2_moe);
  EXPECT_FALSE(c.attention_bias);
  EXPECT_EQ(model_config_to_json(c)["qkv_bias"], false);
  EXPECT_FALSE(model_config_from_json(model_config_to_json(c)).attention_bias);
}

TEST(ModelConfigTest, TokenIdsMayBeListsOrNull) {
  json j = kLlama3_8b;
  j["eos_token_id"] = {128001, 128009};
  j["bos_token_id"] = nullptr;
  const ModelConfig c = model_config_from_json(j);
  EXPECT_EQ(c.eos_token_id, 128001);
  EXPECT_EQ(c.bos_token_id, -1);
  j["eos_token_id"] = json::array();
  EXPECT_EQ(model_config_from_json(j).eos_token_id, -1);
}

TEST(ModelConfigTest, Transformers5RopeParametersAndDtype) {
  json j = kQwen3_30bA3b;
  j.erase("rope_theta");
  j.erase("rope_scaling");
  j.erase("torch_dtype");
  j["rope_parameters"] = {{"rope_theta", 5e6}, {"rope_type", "default"}};
  j["dtype"] = "float16";
  const ModelConfig c = model_config_from_json(j);
  EXPECT_DOUBLE_EQ(c.rope_theta, 5e6);
  EXPECT_EQ(c.torch_dtype, "float16");

  j["rope_theta"] = 1e6;
  EXPECT_NE(error_of([&] {
              model_config_from_json(j);
            }).find("rope_theta (1000000) and rope_parameters.rope_theta (5000000) disagree"),
            std::string::npos);
  j["rope_theta"] = 5e6;
  j["torch_dtype"] = "bfloat16";
  EXPECT_NE(error_of([&] { model_config_from_json(j); }).find("torch_dtype"), std::string::npos);
}

TEST(ModelConfigTest, RejectsRopeScaling) {
  json j = kLlama3_8b;
  j["rope_scaling"] = {{"factor", 8.0},
                       {"low_freq_factor", 1.0},
                       {"high_freq_factor", 4.0},
                       {"original_max_position_embeddings", 8192},
                       {"rope_type", "llama3"}};
  std::string message = error_of([&] { model_config_from_json(j); });
  EXPECT_NE(message.find("rope_scaling.rope_type \"llama3\" is not supported"), std::string::npos)
      << message;
  j = kQwen3_30bA3b;
  j["rope_scaling"] = {{"type", "yarn"}, {"factor", 4.0}};
  message = error_of([&] { model_config_from_json(j); });
  EXPECT_NE(message.find("rope_scaling.rope_type \"yarn\" is not supported"), std::string::npos)
      << message;
  j = kQwen3_30bA3b;
  j["rope_parameters"] = {{"rope_theta", 1e6}, {"rope_type", "linear"}, {"factor", 2.0}};
  message = error_of([&] { model_config_from_json(j); });
  EXPECT_NE(message.find("rope_parameters.rope_type \"linear\" is not supported"),
            std::string::npos)
      << message;
}

TEST(ModelConfigTest, TypeErrorsNameTheField) {
  json j = kQwen2_57bA14b;
  j["hidden_size"] = "abc";
  EXPECT_NE(error_of([&] {
              model_config_from_json(j);
            }).find("config.json: hidden_size must be an integer, got \"abc\""),
            std::string::npos);
  struct Case {
    const char* field;
    json value;
    const char* expected;
  };
  const std::vector<Case> cases = {
      {"num_hidden_layers", 2.5, "num_hidden_layers must be an integer, got 2.5"},
      {"head_dim", "128", "head_dim must be an integer, got \"128\""},
      {"rms_norm_eps", "1e-6", "rms_norm_eps must be a number, got \"1e-6\""},
      {"tie_word_embeddings", "yes", "tie_word_embeddings must be a boolean"},
      {"norm_topk_prob", 1, "norm_topk_prob must be a boolean"},
      {"mlp_only_layers", json({1, "a"}), "mlp_only_layers must be a list of integers"},
      {"mlp_only_layers", 3, "mlp_only_layers must be a list of integers"},
      {"eos_token_id", "</s>", "eos_token_id must be a list of integers"},
      {"architectures", "Qwen2MoeForCausalLM", "architectures must be a non-empty list of strings"},
      {"model_type", 7, "model_type must be a string"},
      {"rope_scaling", "none", "rope_scaling must be an object or null"},
      {"torch_dtype", 16, "torch_dtype must be a string"},
      {"capacity_factor", "1.25", "capacity_factor must be a number"},
  };
  for (const Case& c : cases) {
    json mutated = kQwen2_57bA14b;
    mutated[c.field] = c.value;
    const std::string message = error_of([&] { model_config_from_json(mutated); });
    EXPECT_NE(message.find(c.expected), std::string::npos) << c.field << ": " << message;
  }
}

TEST(ModelConfigTest, DenseLayersFollowTheQwenMoeRule) {
  json j = kQwen2_57bA14b;
  j["num_hidden_layers"] = 6;
  j["decoder_sparse_step"] = 2;  // layers 1, 3, 5 sparse
  EXPECT_EQ(model_config_from_json(j).dense_layers, (std::vector<int64_t>{0, 2, 4}));
  j["mlp_only_layers"] = {5, 1};
  EXPECT_EQ(model_config_from_json(j).dense_layers, (std::vector<int64_t>{0, 1, 2, 4, 5}));
  j["decoder_sparse_step"] = 3;  // layers 2, 5 sparse, 5 listed as mlp-only
  ModelConfig c = model_config_from_json(j);
  EXPECT_EQ(c.dense_layers, (std::vector<int64_t>{0, 1, 3, 4, 5}));
  EXPECT_TRUE(c.layer_is_moe(2));
  EXPECT_FALSE(c.layer_is_moe(5));
  j["decoder_sparse_step"] = 1;
  EXPECT_EQ(model_config_from_json(j).dense_layers, (std::vector<int64_t>{1, 5}));
  j["decoder_sparse_step"] = 0;
  EXPECT_EQ(model_config_from_json(j).dense_layers, (std::vector<int64_t>{1, 5}));

  json mixtral = kMixtral8x7b;
  mixtral["moeforge_dense_layers"] = {0, 31};
  c = model_config_from_json(mixtral);
  EXPECT_EQ(c.dense_layers, (std::vector<int64_t>{0, 31}));
  EXPECT_FALSE(c.layer_is_moe(0));
  EXPECT_TRUE(c.layer_is_moe(1));
  EXPECT_FALSE(c.layer_is_moe(31));
}

// Each case mutates one field of a valid config.json and expects an error that names it.
TEST(ModelConfigTest, EveryInvalidFieldIsNamed) {
  struct Case {
    const json* base;
    const char* field;
    json value;
    const char* expected;
  };
  const std::vector<Case> cases = {
      {&kQwen2_57bA14b, "vocab_size", 0, "vocab_size must be > 0, got 0"},
      {&kQwen2_57bA14b, "hidden_size", -8, "hidden_size"},
      {&kQwen3_30bA3b, "hidden_size", 0, "hidden_size must be > 0"},
      {&kQwen2_57bA14b, "num_hidden_layers", 0, "num_hidden_layers must be > 0"},
      {&kQwen3_30bA3b, "num_attention_heads", 0, "num_attention_heads must be > 0"},
      {&kQwen2_57bA14b, "num_attention_heads", 5,
       "hidden_size (3584) is not divisible by num_attention_heads (5)"},
      {&kQwen2_57bA14b, "num_key_value_heads", 0, "num_key_value_heads must be > 0"},
      {&kQwen2_57bA14b, "num_key_value_heads", 3,
       "num_key_value_heads (3) must divide num_attention_heads (28)"},
      {&kQwen3_30bA3b, "head_dim", 0, "head_dim must be > 0"},
      {&kQwen3_30bA3b, "head_dim", 127, "head_dim must be even"},
      {&kQwen2_57bA14b, "intermediate_size", 0, "intermediate_size must be > 0"},
      {&kQwen2_57bA14b, "max_position_embeddings", -1, "max_position_embeddings must be > 0"},
      {&kQwen2_57bA14b, "rms_norm_eps", 0.0, "rms_norm_eps must be > 0"},
      {&kQwen2_57bA14b, "rope_theta", -1.0, "rope_theta must be > 0"},
      {&kQwen2_57bA14b, "num_experts", 0, "num_experts must be > 0"},
      {&kMixtral8x7b, "num_local_experts", 0, "num_local_experts must be > 0"},
      {&kQwen2_57bA14b, "num_experts_per_tok", 65,
       "num_experts_per_tok must be in [1, num_experts=64]"},
      {&kMixtral8x7b, "num_experts_per_tok", 0,
       "num_experts_per_tok must be in [1, num_local_experts=8]"},
      {&kQwen2_57bA14b, "moe_intermediate_size", 0, "moe_intermediate_size must be > 0"},
      {&kQwen2_57bA14b, "shared_expert_intermediate_size", -1,
       "shared_expert_intermediate_size must be >= 0"},
      {&kQwen2_57bA14b, "decoder_sparse_step", -1, "decoder_sparse_step must be >= 0"},
      {&kQwen2_57bA14b, "mlp_only_layers", json({28}), "mlp_only_layers entry 28 is out of range"},
      {&kQwen3_30bA3b, "mlp_only_layers", json({-1}), "mlp_only_layers entry -1 is out of range"},
      {&kMixtral8x7b, "moeforge_dense_layers", json({32}),
       "moeforge_dense_layers entry 32 is out of range"},
      {&kQwen2_57bA14b, "router_aux_loss_coef", -0.5, "router_aux_loss_coef must be >= 0"},
      {&kLlama3_8b, "router_z_loss_coef", -1e-3, "router_z_loss_coef must be >= 0"},
      {&kMixtral8x7b, "capacity_factor", -1.0, "capacity_factor must be >= 0"},
      {&kMixtral8x7b, "router_balance_groups", 3,
       "router_balance_groups must be 0 (per expert) or a divisor of the 8 experts, got 3"},
      {&kMixtral8x7b, "router_balance_groups", -2, "router_balance_groups must be 0"},
      {&kLlama3_8b, "router_balance_groups", 2, "router_balance_groups must be 0"},
      {&kMixtral8x7b, "bos_token_id", 32000, "bos_token_id must be in [0, vocab_size=32000)"},
      {&kMixtral8x7b, "eos_token_id", -2, "eos_token_id must be in [0, vocab_size=32000)"},
      {&kMixtral8x7b, "torch_dtype", "int8", "torch_dtype must be one of"},
      {&kMixtral8x7b, "hidden_act", "gelu", "hidden_act \"gelu\" is not supported"},
      {&kMixtral8x7b, "sliding_window", 4096, "sliding_window (4096) is not supported"},
      {&kQwen2_7b, "use_sliding_window", true, "use_sliding_window=true is not supported"},
      {&kLlama3_8b, "mlp_bias", true, "mlp_bias=true is not supported"},
      {&kLlama3_8b, "attention_bias", true, "attention_bias=true is not supported"},
      {&kQwen3_30bA3b, "attention_bias", true, "attention_bias=true is not supported"},
      {&kMixtral8x7b, "router_jitter_noise", 0.01, "router_jitter_noise (0.01) is not supported"},
      {&kQwen2_7b, "layer_types", json::array({"full_attention", "sliding_attention"}),
       "layer_types entry \"sliding_attention\" is not supported"},
      {&kQwen3_30bA3b, "num_local_experts", 64,
       "num_experts (128) and num_local_experts (64) disagree"},
  };
  for (const Case& c : cases) {
    json mutated = *c.base;
    mutated[c.field] = c.value;
    const std::string message = error_of([&] { model_config_from_json(mutated); });
    EXPECT_NE(message.find(c.expected), std::string::npos)
        << c.field << "=" << c.value.dump() << ": got \"" << message << "\"";
    EXPECT_EQ(message.rfind("config.json: ", 0), 0u) << message;
  }
}

// Invariants that config.json cannot violate but a ModelConfig built in code can.
TEST(ModelConfigTest, ValidateRejectsInconsistentStructs) {
  const ModelConfig qwen3_moe = model_config_from_json(kQwen3_30bA3b);
  const ModelConfig qwen2_moe = model_config_from_json(kQwen2_57bA14b);
  const ModelConfig mixtral = model_config_from_json(kMixtral8x7b);
  const ModelConfig llama = model_config_from_json(kLlama3_8b);
  validate_model_config(qwen3_moe);
  struct Case {
    ModelConfig config;
    const char* expected;
  };
  std::vector<Case> cases;
  cases.push_back({qwen3_moe, "qk_norm"});
  cases.back().config.qk_norm = false;
  cases.push_back({llama, "qk_norm"});
  cases.back().config.qk_norm = true;
  cases.push_back({model_config_from_json(kQwen2_7b), "attention_bias must be true"});
  cases.back().config.attention_bias = false;
  cases.push_back({mixtral, "attention_bias must be false"});
  cases.back().config.attention_bias = true;
  cases.push_back({mixtral, "moe_intermediate_size (1024) must equal intermediate_size (14336)"});
  cases.back().config.moe_intermediate_size = 1024;
  cases.push_back({mixtral, "norm_topk_prob must be true"});
  cases.back().config.norm_topk_prob = false;
  cases.push_back({qwen3_moe, "shared_expert_intermediate_size must be 0"});
  cases.back().config.shared_expert_intermediate_size = 64;
  cases.push_back({qwen3_moe, "mlp_only_layers must be strictly increasing"});
  cases.back().config.dense_layers = {3, 1};
  cases.push_back({llama, "dense architecture"});
  cases.back().config.num_experts = 8;
  cases.push_back({llama, "dense architecture"});
  cases.back().config.router_aux_loss_coef = 0.01;
  cases.push_back({qwen2_moe, "num_key_value_heads must be > 0"});
  cases.back().config.num_kv_heads = 0;
  for (const Case& c : cases) {
    const std::string message = error_of([&] { validate_model_config(c.config); });
    EXPECT_NE(message.find(c.expected), std::string::npos) << c.expected << ": got " << message;
    EXPECT_THROW(model_config_to_json(c.config), Error);
  }
}

TEST(ModelConfigTest, RoundTripsEveryArchitecture) {
  std::vector<json> sources = {kMixtral8x7b,   kQwen3_30bA3b, kQwen2_7b,
                               kQwen2_57bA14b, kLlama3_8b,    kQwen3_06b};
  json extended = kMixtral8x7b;
  extended["moeforge_dense_layers"] = {0, 5};
  extended["router_z_loss_coef"] = 1e-3;
  extended["capacity_factor"] = 1.25;
  extended["router_balance_groups"] = 4;
  extended["tie_word_embeddings"] = true;
  sources.push_back(extended);
  json sparse_step = kQwen2_57bA14b;
  sparse_step["decoder_sparse_step"] = 2;
  sparse_step["mlp_only_layers"] = {1};
  sources.push_back(sparse_step);
  json odd_head_dim = kQwen2_7b;
  odd_head_dim["head_dim"] = 64;
  sources.push_back(odd_head_dim);
  for (const json& source : sources) {
    const ModelConfig c = model_config_from_json(source);
    const json written = model_config_to_json(c);
    SCOPED_TRACE(written.dump());
    expect_same_config(model_config_from_json(written), c);
  }
}

TEST(ModelConfigTest, WritesTheArchitecturesOwnFieldNames) {
  json j = model_config_to_json(model_config_from_json(kMixtral8x7b));
  EXPECT_EQ(j["architectures"], json({"MixtralForCausalLM"}));
  EXPECT_EQ(j["model_type"], "mixtral");
  EXPECT_EQ(j["num_local_experts"], 8);
  EXPECT_EQ(j["intermediate_size"], 14336);
  EXPECT_FALSE(j.contains("num_experts"));
  EXPECT_FALSE(j.contains("moe_intermediate_size"));
  EXPECT_FALSE(j.contains("moeforge_dense_layers"));
  EXPECT_FALSE(j.contains("router_z_loss_coef"));
  EXPECT_FALSE(j.contains("capacity_factor"));
  EXPECT_FALSE(j.contains("router_balance_groups"));
  EXPECT_EQ(j["head_dim"], 128);
  EXPECT_EQ(j["torch_dtype"], "bfloat16");
  EXPECT_EQ(j["dtype"], "bfloat16");
  EXPECT_EQ(j["rope_theta"], 1e6);
  EXPECT_EQ(j["rope_parameters"], json({{"rope_theta", 1e6}, {"rope_type", "default"}}));
  EXPECT_TRUE(j["sliding_window"].is_null());

  json qwen2_moe = kQwen2_57bA14b;
  qwen2_moe["num_hidden_layers"] = 4;
  qwen2_moe["decoder_sparse_step"] = 2;
  j = model_config_to_json(model_config_from_json(qwen2_moe));
  EXPECT_EQ(j["decoder_sparse_step"], 1);
  EXPECT_EQ(j["mlp_only_layers"], json({0, 2}));
  EXPECT_EQ(j["shared_expert_intermediate_size"], 20480);
  EXPECT_EQ(j["norm_topk_prob"], false);
  EXPECT_FALSE(j.contains("head_dim"));  // Qwen2MoeConfig does not declare it
  EXPECT_FALSE(j.contains("attention_bias"));
  EXPECT_EQ(j["qkv_bias"], true);

  j = model_config_to_json(model_config_from_json(kQwen3_30bA3b));
  EXPECT_EQ(j["head_dim"], 128);
  EXPECT_EQ(j["attention_bias"], false);
  EXPECT_EQ(j["moe_intermediate_size"], 768);
  EXPECT_FALSE(j.contains("shared_expert_intermediate_size"));

  ModelConfig llama = model_config_from_json(kLlama3_8b);
  llama.capacity_factor = 2.0;
  llama.bos_token_id = -1;
  j = model_config_to_json(llama);
  EXPECT_EQ(j["capacity_factor"], 2.0);
  EXPECT_TRUE(j["bos_token_id"].is_null());
  EXPECT_FALSE(j.contains("num_experts"));
  EXPECT_FALSE(j.contains("router_aux_loss_coef"));
}

TEST(ModelConfigTest, ExampleConfigsLoadAndRoundTrip) {
  const ModelConfig tiny_moe = load_model_config(repo_path("configs/models/tiny-moe.json"));
  EXPECT_EQ(tiny_moe.architecture, Architecture::kMixtral);
  EXPECT_EQ(tiny_moe.vocab_size, 258);
  EXPECT_EQ(tiny_moe.hidden_size, 64);
  EXPECT_EQ(tiny_moe.num_layers, 2);
  EXPECT_EQ(tiny_moe.num_heads, 4);
  EXPECT_EQ(tiny_moe.num_kv_heads, 2);
  EXPECT_EQ(tiny_moe.num_experts, 8);
  EXPECT_EQ(tiny_moe.num_experts_per_tok, 2);
  EXPECT_EQ(tiny_moe.moe_intermediate_size, 128);
  EXPECT_EQ(tiny_moe.max_position_embeddings, 256);
  EXPECT_DOUBLE_EQ(tiny_moe.rope_theta, 10000.0);
  EXPECT_DOUBLE_EQ(tiny_moe.router_aux_loss_coef, 0.01);

  const ModelConfig qwen3_moe = load_model_config(repo_path("configs/models/tiny-qwen3-moe.json"));
  EXPECT_TRUE(qwen3_moe.qk_norm);
  EXPECT_EQ(qwen3_moe.dense_layers, (std::vector<int64_t>{0}));
  EXPECT_FALSE(qwen3_moe.layer_is_moe(0));
  EXPECT_TRUE(qwen3_moe.layer_is_moe(1));

  const ModelConfig qwen2_moe = load_model_config(repo_path("configs/models/tiny-qwen2-moe.json"));
  EXPECT_GT(qwen2_moe.shared_expert_intermediate_size, 0);
  EXPECT_TRUE(qwen2_moe.attention_bias);

  const ModelConfig llama = load_model_config(repo_path("configs/models/tiny-llama.json"));
  EXPECT_FALSE(llama.is_moe());

  for (const ModelConfig& c : {tiny_moe, qwen3_moe, qwen2_moe, llama}) {
    expect_same_config(model_config_from_json(model_config_to_json(c)), c);
  }
}

TEST(ModelConfigTest, BenchConfigIs1p8bTotal0p4bActive) {
  const ModelConfig c = load_model_config(repo_path("configs/bench/moe-1.8b-a0.4b.json"));
  EXPECT_EQ(c.architecture, Architecture::kMixtral);
  EXPECT_EQ(c.hidden_size, 2048);
  EXPECT_EQ(c.num_layers, 8);
  EXPECT_EQ(c.num_heads, 16);
  EXPECT_EQ(c.num_kv_heads, 4);
  EXPECT_EQ(c.head_dim, 128);
  EXPECT_EQ(c.num_experts, 16);
  EXPECT_EQ(c.num_experts_per_tok, 2);
  EXPECT_EQ(c.moe_intermediate_size, 2048);
  EXPECT_EQ(c.vocab_size, 32768);
  EXPECT_EQ(c.max_position_embeddings, 4096);
  const int64_t h = c.hidden_size;
  const int64_t attention = h * c.q_dim() * 2 + h * c.kv_dim() * 2;
  const int64_t expert = 3 * h * c.moe_intermediate_size;
  const int64_t embeddings = 2 * c.vocab_size * h;
  const int64_t total = c.num_layers * (attention + c.num_experts * expert) + embeddings;
  const int64_t active = c.num_layers * (attention + c.num_experts_per_tok * expert) + embeddings;
  EXPECT_NEAR(static_cast<double>(total) / 1e9, 1.8, 0.05);
  EXPECT_NEAR(static_cast<double>(active) / 1e9, 0.4, 0.05);
}

// Qwen/Qwen3-235B-A22B: the largest supported-architecture model the tests check against the
// size limits.
const json kQwen3_235bA22b = json::parse(R"({
  "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": false, "bos_token_id": 151643,
  "decoder_sparse_step": 1, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
  "hidden_size": 4096, "intermediate_size": 12288, "max_position_embeddings": 40960,
  "mlp_only_layers": [], "model_type": "qwen3_moe", "moe_intermediate_size": 1536,
  "norm_topk_prob": true, "num_attention_heads": 64, "num_experts": 128, "num_experts_per_tok": 8,
  "num_hidden_layers": 94, "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_scaling": null,
  "rope_theta": 1000000.0, "tie_word_embeddings": false, "torch_dtype": "bfloat16",
  "use_sliding_window": false, "vocab_size": 151936})");

// Sizes past the limits (the fuzzer's findings) are rejected naming the field before anything is
// sized by them; real models stay well inside.
TEST(ModelConfigTest, RejectsSizesPastTheLimits) {
  EXPECT_EQ(model_config_from_json(kQwen3_235bA22b).num_experts, 128);

  struct Case {
    json base;
    json patch;
    const char* expected;
  };
  const std::vector<Case> cases = {
      // The Qwen-MoE dense-layer rule would list 5 * 10^14 layers.
      {kQwen2_57bA14b,
       {{"num_hidden_layers", 1000000000000000}, {"decoder_sparse_step", 2}},
       "num_hidden_layers must be <= 1024, got 1000000000000000"},
      {kLlama3_8b, {{"num_hidden_layers", 1025}}, "num_hidden_layers must be <= 1024, got 1025"},
      {kQwen3_30bA3b, {{"num_experts", 4097}}, "num_experts must be <= 4096, got 4097"},
      {kMixtral8x7b, {{"num_local_experts", 4097}}, "num_local_experts must be <= 4096, got 4097"},
      // Each size fits int64_t, their products do not.
      {kLlama3_8b,
       {{"vocab_size", int64_t{1} << 62},
        {"hidden_size", int64_t{1} << 40},
        {"num_attention_heads", int64_t{1} << 39},
        {"num_key_value_heads", int64_t{1} << 39}},
       "the model has more than 2^63 parameters, more than the 4398046511104 (2^42) supported; "
       "see vocab_size (4611686018427387904), hidden_size (1099511627776)"},
      {kQwen3_30bA3b,
       {{"moe_intermediate_size", int64_t{1} << 20}},
       "the model has 39583959693312 parameters"},
      {kQwen3_235bA22b,
       {{"num_attention_heads", int64_t{1} << 40}},
       "num_attention_heads (1099511627776) x head_dim (128)"},
  };
  for (const Case& c : cases) {
    json j = c.base;
    j.merge_patch(c.patch);
    const std::string message = error_of([&] { model_config_from_json(j); });
    EXPECT_NE(message.find(c.expected), std::string::npos)
        << c.patch.dump() << ": got \"" << message << "\"";
  }

  // A ModelConfig built in code is held to the same limits.
  ModelConfig wide = model_config_from_json(kLlama3_8b);
  wide.intermediate_size = int64_t{1} << 62;
  EXPECT_NE(error_of([&] {
              validate_model_config(wide);
            }).find("the model has more than 2^63 parameters"),
            std::string::npos);
}

TEST(ModelConfigTest, LoadReportsFileProblemsWithThePath) {
  const std::string dir = ::testing::TempDir();
  EXPECT_NE(error_of([&] {
              load_model_config(dir + "/no-such-config.json");
            }).find("cannot open model config"),
            std::string::npos);
  const std::string broken = dir + "/broken-config.json";
  std::ofstream(broken) << "{\"hidden_size\": 64,";
  EXPECT_NE(error_of([&] { load_model_config(broken); }).find(broken + ": invalid JSON"),
            std::string::npos);
  const std::string bad = dir + "/bad-config.json";
  json j = kLlama3_8b;
  j["vocab_size"] = "many";
  std::ofstream(bad) << j.dump();
  EXPECT_NE(error_of([&] {
              load_model_config(bad);
            }).find(bad + ": vocab_size must be an integer, got \"many\""),
            std::string::npos);
}

}  // namespace
}  // namespace moeforge
