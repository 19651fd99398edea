// `moeforge generate`: sample text from a model directory with a KV cache.
#include <fmt/format.h>

#include <cstdio>

#include "cli/commands.h"
#include "comm/communicator.h"
#include "data/tokenizer.h"
#include "infer/generate.h"
#include "model/model_io.h"

namespace moeforge::cli {

void register_generate_command(CLI::App& app) {
  struct Options {
    std::string model, prompt;
    GenerateOptions gen;
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
  cmd->add_flag("--stats", opts->stats, "Print timing statistics as JSON to stderr at the end");
  cmd->callback([opts] {
    const std::filesystem::path dir = resolve_model_dir(opts->model);
    const auto tokenizer = data::load_tokenizer(dir);
    SelfCommunicator self;
    const std::unique_ptr<Transformer<float>> loaded = load_transformer(dir, self);
    Transformer<float>& model = *loaded;
    fmt::print("{}", opts->prompt);
    std::fflush(stdout);
    const GenerateResult result =
        generate(model, *tokenizer, opts->prompt, opts->gen, [](const std::string& piece) {
          fmt::print("{}", piece);
          std::fflush(stdout);
        });
    fmt::print("\n");
    if (opts->stats) {
      const double decode_tps =
          result.decode_seconds > 0 ? result.new_tokens.size() / result.decode_seconds : 0.0;
      fmt::print(stderr,
                 "{{\"prompt_tokens\": {}, \"new_tokens\": {}, \"prefill_s\": {:.4f}, "
                 "\"decode_s\": {:.4f}, "
                 "\"decode_tokens_per_s\": {:.1f}}}\n",
                 result.prompt_tokens.size(), result.new_tokens.size(), result.prefill_seconds,
                 result.decode_seconds, decode_tps);
    }
  });
}

}  // namespace moeforge::cli
