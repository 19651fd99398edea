// `moeforge forward`: one forward pass over given token ids, writing the logits (and the loss) to a
// safetensors file, with --router-logits also every MoE layer's router logits. Used to compare
// moeforge with other implementations token by token (scripts/hf_oracle.py).
#include <fmt/format.h>

#include <fstream>
#include <span>

#include "cli/commands.h"
#include "comm/communicator.h"
#include "core/error.h"
#include "io/safetensors.h"
#include "model/model_io.h"
#include "model/transformer.h"

#if MOEFORGE_HAVE_CUDA
#include "cuda/gpu_transformer.h"
#endif

namespace moeforge::cli {

namespace {

// tokens: a JSON array of arrays of ids (one per sequence, equal lengths).
std::vector<int32_t> read_tokens(const std::string& path, int64_t* batch, int64_t* seq) {
  std::ifstream in(path);
  MF_CHECK(in.good(), "cannot open --tokens file {}", path);
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    MF_FAIL("--tokens file {} is not valid JSON: {}", path, e.what());
  }
  MF_CHECK(j.is_array() && !j.empty() && j[0].is_array() && !j[0].empty(),
           "--tokens file {} must hold a non-empty array of non-empty arrays of token ids", path);
  *batch = static_cast<int64_t>(j.size());
  *seq = static_cast<int64_t>(j[0].size());
  std::vector<int32_t> tokens;
  for (const auto& row : j) {
    MF_CHECK(row.is_array() && static_cast<int64_t>(row.size()) == *seq,
             "--tokens file {}: every sequence must have {} tokens", path, *seq);
    for (const auto& t : row) {
      MF_CHECK(t.is_number_integer(), "--tokens file {}: token ids must be integers", path);
      tokens.push_back(t.get<int32_t>());
    }
  }
  return tokens;
}

}  // namespace

void register_forward_command(CLI::App& app) {
  struct Options {
    std::string model, tokens, out, device = "cpu";
    bool router_logits = false;
  };
  auto opts = std::make_shared<Options>();
  CLI::App* cmd = app.add_subcommand(
      "forward",
      "Run one forward pass and write the logits [batch, seq, vocab] (F32) to safetensors");
  cmd->add_option("--model", opts->model, "Model, checkpoint or run directory")
      ->required()
      ->check(CLI::ExistingPath);
  cmd->add_option("--tokens", opts->tokens, "JSON file: [[id, ...], ...], one array per sequence")
      ->required()
      ->check(CLI::ExistingFile);
  cmd->add_option("--out", opts->out, "Output .safetensors file (tensor \"logits\")")->required();
  cmd->add_option("--device", opts->device, "cpu (fp32 reference) or cuda (bf16 compute)")
      ->check(CLI::IsMember({"cpu", "cuda"}))
      ->capture_default_str();
  cmd->add_flag("--router-logits", opts->router_logits,
                "Also write each MoE layer l's router logits [batch * seq, num_experts] (F32) as "
                "tensor \"router_logits.l\" (which experts each token went to, for comparisons of "
                "the routing)");
  cmd->callback([opts] {
    const std::filesystem::path dir = resolve_model_dir(opts->model);
    SelfCommunicator self;
    const std::unique_ptr<Transformer<float>> loaded = load_transformer(dir, self);
    Transformer<float>& model = *loaded;
    const ModelConfig& config = model.config();
    int64_t batch = 0, seq = 0;
    const std::vector<int32_t> tokens = read_tokens(opts->tokens, &batch, &seq);
    // Targets: the next token of each sequence (the last position is ignored).
    std::vector<int32_t> targets(tokens.size(), -1);
    for (int64_t b = 0; b < batch; ++b) {
      for (int64_t t = 0; t + 1 < seq; ++t) targets[b * seq + t] = tokens[b * seq + t + 1];
    }
    LossBreakdown loss;
    std::vector<float> logits;
    // Per MoE layer (layer index, router logits), with --router-logits.
    std::vector<std::pair<int64_t, std::vector<float>>> routers;
    const auto keep_routers = [&](const auto& engine) {
      if (!opts->router_logits) return;
      for (int64_t l = 0; l < config.num_layers; ++l) {
        if (config.layer_is_moe(l)) routers.emplace_back(l, engine.router_logits(l));
      }
    };
    if (opts->device == "cuda") {
#if MOEFORGE_HAVE_CUDA
      cuda::GpuTransformer gpu(config);
      gpu.upload_params(model.params());
      logits = gpu.forward_logits(tokens.data(), targets.data(), batch, seq, &loss);
      keep_routers(gpu);
#else
      MF_FAIL("--device cuda: moeforge was built without CUDA (configure with -DMOEFORGE_CUDA=ON)");
#endif
    } else {
      loss = model.forward(tokens.data(), targets.data(), batch, seq);
      logits = model.logits();
      keep_routers(model);
    }
    std::vector<io::TensorView> tensors{
        io::TensorView{"logits",
                       io::DType::kF32,
                       {batch, seq, config.vocab_size},
                       std::as_bytes(std::span(logits.data(), logits.size()))}};
    for (const auto& [l, values] : routers) {
      tensors.push_back(io::TensorView{fmt::format("router_logits.{}", l),
                                       io::DType::kF32,
                                       {batch * seq, config.num_experts},
                                       std::as_bytes(std::span(values.data(), values.size()))});
    }
    io::write_safetensors(opts->out, tensors,
                          {{"ce_loss", fmt::format("{:.9g}", loss.ce_loss)},
                           {"loss", fmt::format("{:.9g}", loss.loss)}});
    fmt::print("{}\n", nlohmann::json({{"out", opts->out},
                                       {"batch", batch},
                                       {"seq", seq},
                                       {"ce_loss", loss.ce_loss},
                                       {"loss", loss.loss}})
                           .dump());
  });
}

}  // namespace moeforge::cli
