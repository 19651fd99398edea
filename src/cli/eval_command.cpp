// `moeforge eval`: validation loss, perplexity and bits per byte of a model on a dataset.
#include <fmt/format.h>

#include "cli/commands.h"
#include "comm/communicator.h"
#include "data/loader.h"
#include "data/tokenizer.h"
#include "model/model_io.h"
#include "train/evaluate.h"

namespace moeforge::cli {

void register_eval_command(CLI::App& app) {
  struct Options {
    std::string model, data, split = "val";
    int64_t seq_len = 256, batch_size = 8, max_batches = 0;
  };
  auto opts = std::make_shared<Options>();
  CLI::App* cmd =
      app.add_subcommand("eval", "Evaluate a model on a prepared dataset (prints one JSON line)");
  cmd->add_option("--model", opts->model, "Model, checkpoint or run directory")
      ->required()
      ->check(CLI::ExistingDirectory);
  cmd->add_option("--data", opts->data, "Dataset directory from `moeforge data prepare`")
      ->required()
      ->check(CLI::ExistingDirectory);
  cmd->add_option("--split", opts->split, "train or val")
      ->check(CLI::IsMember({"train", "val"}))
      ->capture_default_str();
  cmd->add_option("--seq-len", opts->seq_len, "Tokens per window")->capture_default_str();
  cmd->add_option("--batch-size", opts->batch_size, "Windows per forward")->capture_default_str();
  cmd->add_option("--max-batches", opts->max_batches, "Stop after this many batches (0 = all)")
      ->capture_default_str();
  cmd->callback([opts] {
    const std::filesystem::path dir = resolve_model_dir(opts->model);
    SelfCommunicator self;
    const std::unique_ptr<Transformer<float>> loaded = load_transformer(dir, self);
    Transformer<float>& model = *loaded;
    const data::TokenDataset dataset = data::TokenDataset::open(opts->data, opts->split);
    const auto tokenizer = data::load_tokenizer(opts->data);
    const EvalResult r = evaluate(model, dataset, *tokenizer, opts->seq_len, opts->batch_size,
                                  opts->max_batches, world_communicator());
    const double unigram =
        unigram_baseline_loss(data::TokenDataset::open(opts->data, "train"), dataset);
    if (world_communicator().rank() == 0) {
      fmt::print("{}\n", nlohmann::json({{"model", opts->model},
                                         {"data", opts->data},
                                         {"split", opts->split},
                                         {"loss", r.loss},
                                         {"perplexity", r.perplexity},
                                         {"bits_per_byte", r.bits_per_byte},
                                         {"unigram_loss", unigram},
                                         {"tokens", r.num_tokens},
                                         {"bytes", r.num_bytes}})
                             .dump());
    }
  });
}

}  // namespace moeforge::cli
