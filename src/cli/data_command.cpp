// `moeforge data prepare`: text files or folders -> tokenizer + token shards + validation split.
#include <fmt/format.h>
#include <unistd.h>

#include <cstdio>

#include "cli/commands.h"
#include "data/prepare.h"

namespace moeforge::cli {

void register_data_command(CLI::App& app) {
  CLI::App* data = app.add_subcommand("data", "Dataset tools");
  data->require_subcommand(1);
  auto opts = std::make_shared<data::PrepareOptions>();
  auto inputs = std::make_shared<std::vector<std::string>>();
  auto out = std::make_shared<std::string>();
  CLI::App* prepare = data->add_subcommand(
      "prepare", "Tokenize text files/folders into versioned token shards with a validation split");
  prepare->add_option("inputs", *inputs, "Text files or folders (walked recursively, sorted)")
      ->required();
  prepare->add_option("--out", *out, "Output dataset directory")->required();
  prepare->add_option("--tokenizer", opts->tokenizer, "byte or sentencepiece")
      ->check(CLI::IsMember({"byte", "sentencepiece"}))
      ->capture_default_str();
  prepare->add_option("--vocab-size", opts->sp_vocab_size, "SentencePiece vocabulary size")
      ->capture_default_str();
  prepare->add_option("--val-fraction", opts->val_fraction, "Fraction of documents held out")
      ->capture_default_str();
  prepare->add_option("--include", opts->include_globs, "Only files matching these globs");
  prepare->add_option("--exclude", opts->exclude_globs,
                      "Skip files matching these globs (e.g. '*.dat')");
  prepare->add_option("--shard-tokens", opts->shard_tokens, "Tokens per shard file")
      ->capture_default_str();
  prepare->add_flag("--overwrite", opts->overwrite, "Replace an existing output directory");
  prepare->callback([opts, inputs, out] {
    opts->inputs.assign(inputs->begin(), inputs->end());
    opts->out_dir = *out;
    const bool tty = isatty(fileno(stderr));
    const data::PrepareSummary s =
        data::prepare_dataset(*opts, [tty](const data::PrepareProgress& p) {
          if (tty && p.stage == "encode" && p.num_documents > 0) {
            fmt::print(stderr, "\rencoding {}/{} documents, {} tokens", p.num_documents_done,
                       p.num_documents, p.num_tokens_done);
          } else if (p.stage == "train_tokenizer") {
            fmt::print(stderr, "training the SentencePiece tokenizer...\n");
          }
        });
    fmt::print(stderr, "\n");
    fmt::print(
        "{}: {} tokenizer (vocab {}), {} documents, train {} tokens, val {} tokens (split: {})\n",
        s.out_dir.string(), s.tokenizer_kind, s.vocab_size, s.num_documents, s.num_train_tokens,
        s.num_val_tokens, s.val_rule);
  });
}

}  // namespace moeforge::cli
