// `moeforge inspect`: print a model directory's config, tensor table and parameter counts.
#include <fmt/format.h>

#include <map>

#include "cli/commands.h"
#include "io/model_weights.h"
#include "model/model_config.h"
#include "model/parameters.h"

namespace moeforge::cli {

namespace {

std::string shape_string(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

void inspect(const std::string& dir, bool json) {
  const ModelConfig config = load_model_config(std::filesystem::path(dir) / "config.json");
  const ParameterLayout layout(config);
  const io::ModelWeights weights = io::ModelWeights::open(dir);
  std::map<std::string, int64_t> bytes_by_dtype;
  int64_t numel = 0;
  for (const std::string& name : weights.names()) {
    const io::TensorInfo& info = weights.info(name);
    bytes_by_dtype[io::dtype_name(info.dtype)] += static_cast<int64_t>(info.end - info.begin);
    numel += info.numel();
  }
  if (json) {
    nlohmann::json tensors = nlohmann::json::array();
    for (const std::string& name : weights.names()) {
      const io::TensorInfo& info = weights.info(name);
      tensors.push_back(
          {{"name", name}, {"dtype", io::dtype_name(info.dtype)}, {"shape", info.shape}});
    }
    nlohmann::json out = {{"config", model_config_to_json(config)},
                          {"num_params", layout.num_params()},
                          {"num_active_params", layout.num_active_params()},
                          {"num_params_in_files", numel},
                          {"tensors", tensors}};
    fmt::print("{}\n", out.dump(2));
    return;
  }
  fmt::print("{}: {} ({})\n", dir, architecture_name(config.architecture),
             architecture_model_type(config.architecture));
  fmt::print("  layers {}  hidden {}  heads {}/{} (head dim {})  vocab {}\n", config.num_layers,
             config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim,
             config.vocab_size);
  if (config.is_moe()) {
    fmt::print("  experts {} top-{}  expert ffn {}  shared ffn {}  dense layers {}\n",
               config.num_experts, config.num_experts_per_tok, config.moe_intermediate_size,
               config.shared_expert_intermediate_size, config.dense_layers.size());
  }
  fmt::print("  parameters {} ({:.3f} B), active per token {} ({:.3f} B); in files {}\n",
             layout.num_params(), layout.num_params() / 1e9, layout.num_active_params(),
             layout.num_active_params() / 1e9, numel);
  for (const auto& [dtype, bytes] : bytes_by_dtype) {
    fmt::print("  {}: {:.1f} MB\n", dtype, bytes / 1e6);
  }
  fmt::print("\n  {:<64} {:<6} {}\n", "tensor", "dtype", "shape");
  for (const std::string& name : weights.names()) {
    const io::TensorInfo& info = weights.info(name);
    fmt::print("  {:<64} {:<6} {}\n", name, io::dtype_name(info.dtype), shape_string(info.shape));
  }
}

}  // namespace

void register_inspect_command(CLI::App& app) {
  auto dir = std::make_shared<std::string>();
  auto json = std::make_shared<bool>(false);
  CLI::App* cmd =
      app.add_subcommand("inspect", "Show a model directory: config, tensors, parameter counts");
  cmd->add_option("dir", *dir, "Model or checkpoint directory")
      ->required()
      ->check(CLI::ExistingDirectory);
  cmd->add_flag("--json", *json, "Print machine-readable JSON");
  cmd->callback([dir, json] { inspect(*dir, *json); });
}

}  // namespace moeforge::cli
