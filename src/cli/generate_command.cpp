// `moeforge generate`: sample text from a model directory with a KV cache, on the CPU reference or
// one GPU (--device).
#include <fmt/format.h>

#include <charconv>
#include <cstdio>
#include <string>
#include <vector>

#include "cli/attention_options.h"
#include "cli/commands.h"
#include "cli/inference_device.h"
#include "comm/communicator.h"
#include "core/error.h"
#include "data/tokenizer.h"
#include "infer/generate.h"
#include "infer/qkv_dump.h"
#include "io/atomic_file.h"
#include "model/model_io.h"

namespace moeforge::cli {

void register_generate_command(CLI::App& app) {
  struct Options {
    std::string model, prompt, attention_stats, device = "cpu";
    std::vector<std::string> dump_qkv;  // LAYER FILE
    GenerateOptions gen;
    AttentionOptions attention;
    bool stats = false;
  };
  auto opts = std::make_shared<Options>();
  CLI::App* cmd = app.add_subcommand(
      "generate", "Generate text from a model (prefill, then decode with a KV cache)");
  cmd->add_option("--model", opts->model,
                  "Model, checkpoint or run directory (with tokenizer files)")
      ->required()
      ->check(CLI::ExistingDirectory);
  cmd->add_option("--prompt", opts->prompt, "Prompt text")->required();
  cmd->add_option("--max-new-tokens", opts->gen.max_new_tokens, "Tokens to generate")
      ->capture_default_str();
  cmd->add_option("--temperature", opts->gen.sampler.temperature,
                  "Sampling temperature (0 = greedy)")
      ->capture_default_str();
  cmd->add_option("--top-p", opts->gen.sampler.top_p, "Nucleus sampling mass")
      ->capture_default_str();
  cmd->add_option("--seed", opts->gen.seed, "Sampling seed")->capture_default_str();
  add_inference_device_option(cmd, opts->device);
  cmd->add_flag("--stats", opts->stats, "Print timing statistics as JSON to stderr at the end");
  add_attention_options(cmd, opts->attention);
  cmd->add_option("--attention-stats", opts->attention_stats,
                  "With --attention flex: write the prefill's per-layer and per-head block "
                  "selection statistics to this JSON file");
  cmd->add_option("--dump-qkv", opts->dump_qkv,
                  "LAYER FILE: after the prompt's prefill, write layer LAYER's q, k, v (F32, "
                  "after q/k norm and RoPE, token-major; from --device cuda the bf16 values) to "
                  "FILE.safetensors, for `bench prefill --qkv`")
      ->expected(2)
      ->type_name("LAYER FILE");
  cmd->callback([opts] {
    const PrefillAttention attention = parse_attention_options(opts->attention, opts->device);
    int64_t dump_layer = -1;
    if (!opts->dump_qkv.empty()) {
      const std::string& layer = opts->dump_qkv[0];
      const auto [end, error] =
          std::from_chars(layer.data(), layer.data() + layer.size(), dump_layer);
      MF_CHECK(error == std::errc() && end == layer.data() + layer.size() && dump_layer >= 0,
               "--dump-qkv: LAYER must be a layer index, got '{}'", layer);
    }
    MF_CHECK(opts->attention_stats.empty() || attention.flex,
             "--attention-stats needs --attention flex (dense attention selects no blocks)");
    const std::filesystem::path dir = resolve_model_dir(opts->model);
    const auto tokenizer = data::load_tokenizer(dir);
    SelfCommunicator self;
    std::unique_ptr<Transformer<float>> model = load_transformer(dir, self);
    if (dump_layer >= 0) {
      MF_CHECK(dump_layer < model->config().num_layers,
               "--dump-qkv: layer {} is outside the model's {} layers", dump_layer,
               model->config().num_layers);
    }
    const std::unique_ptr<InferenceEngine> engine =
        make_inference_engine(opts->device, model, attention);
    GenerateOptions gen = opts->gen;
    if (dump_layer >= 0) {
      engine->keep_prefill_qkv(dump_layer);
      gen.after_prefill = [&] {
        write_prefill_qkv(opts->dump_qkv[1], engine->prefill_qkv(dump_layer));
      };
    }
    fmt::print("{}", opts->prompt);
    std::fflush(stdout);
    const GenerateResult result =
        generate(*engine, *tokenizer, opts->prompt, gen, [](const std::string& piece) {
          fmt::print("{}", piece);
          std::fflush(stdout);
        });
    fmt::print("\n");
    if (opts->stats) {
      const double decode_tps =
          result.decode_seconds > 0 ? result.new_tokens.size() / result.decode_seconds : 0.0;
      fmt::print(stderr,
                 "{{\"device\": \"{}\", \"prompt_tokens\": {}, \"new_tokens\": {}, "
                 "\"prefill_s\": {:.4f}, \"decode_s\": {:.4f}, \"decode_tokens_per_s\": {:.1f}}}\n",
                 opts->device, result.prompt_tokens.size(), result.new_tokens.size(),
                 result.prefill_seconds, result.decode_seconds, decode_tps);
    }
    if (!opts->attention_stats.empty()) {
      // A one-token prompt runs no sparse prefill: then "layers" is empty.
      nlohmann::json json = prefill_stats_json(engine->prefill_stats());
      json["format_version"] = 1;
      json["attention"] = opts->attention.attention;
      json["params"] = flex_prefill_params_json(attention.params);
      json["prompt_tokens"] = result.prompt_tokens.size();
      json["sparse_prefill"] = !engine->prefill_stats().empty();
      io::write_file_atomic(opts->attention_stats, json.dump(2) + "\n");
    }
  });
}

}  // namespace moeforge::cli
