// `moeforge data prepare`: text files or folders -> tokenizer + token shards + validation split.
// `moeforge data synth`: RULER-style synthetic long-context tasks (data/synth_tasks.h) as a JSONL
// task file for `moeforge eval --task`, or as a token dataset for training.
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <optional>

#include "cli/commands.h"
#include "core/error.h"
#include "data/prepare.h"
#include "data/synth_tasks.h"

namespace moeforge::cli {
namespace {

void register_synth_command(CLI::App* data) {
  struct Options {
    std::vector<std::string> tasks;
    std::vector<int64_t> lengths;
    int64_t num = 10;
    uint64_t seed = 0;
    double depth = 0.0;
    std::string out, format = "jsonl";
    double val_fraction = 0.05;
    std::string loss = "all";
    std::string questions = "one";
    int64_t vt_variables = data::kNumVtVariables;
    bool overwrite = false;
  };
  auto opts = std::make_shared<Options>();
  CLI::App* synth = data->add_subcommand(
      "synth",
      "Generate RULER-style long-context tasks (needle in a haystack, variable tracking) as a "
      "JSONL task file for `moeforge eval --task`, or as a token dataset for training");
  synth
      ->add_option("--task", opts->tasks,
                   "niah_single, niah_multikey, niah_multivalue or vt (several: comma-separated)")
      ->required()
      ->delimiter(',');
  synth
      ->add_option("--lengths", opts->lengths,
                   "Prompt lengths in byte-tokenizer tokens (bytes), comma-separated, e.g. "
                   "1024,4096,16384")
      ->required()
      ->delimiter(',');
  synth->add_option("--num", opts->num, "Examples per task and length")->capture_default_str();
  synth->add_option("--seed", opts->seed, "Seed; the same seed gives the same examples")
      ->capture_default_str();
  CLI::Option* depth = synth->add_option(
      "--depth", opts->depth,
      "Needle depth in [0, 1] for every example (default: spread evenly from 0 to 1 over the "
      "--num examples)");
  synth
      ->add_option("--out", opts->out,
                   "Output: a .jsonl file (--format jsonl) or a dataset directory (--format train)")
      ->required();
  synth
      ->add_option(
          "--format", opts->format,
          "jsonl: {\"format_version\", \"task\", \"length\", \"depth\", \"prompt\", \"answer\"} "
          "per line; train: "
          "byte-token dataset of [BOS] prompt answer [EOS] documents, as `data prepare` "
          "writes")
      ->check(CLI::IsMember({"jsonl", "train"}))
      ->capture_default_str();
  CLI::Option* val_fraction =
      synth
          ->add_option("--val-fraction", opts->val_fraction,
                       "--format train: fraction of the examples held out as val")
          ->capture_default_str();
  CLI::Option* loss =
      synth
          ->add_option("--loss", opts->loss,
                       "--format train: which targets count in the loss: all (every token) or "
                       "answer (the answer and EOS only, through a loss mask beside the shards)")
          ->check(CLI::IsMember({"all", "answer"}))
          ->capture_default_str();
  CLI::Option* questions =
      synth
          ->add_option("--questions", opts->questions,
                       "--format train: one (each document asks what the task asks) or all (the "
                       "answer is followed by every other question its context answers: each "
                       "other key of niah_multikey, the other chain of vt, each with its answer)")
          ->check(CLI::IsMember({"one", "all"}))
          ->capture_default_str();
  synth
      ->add_option("--vt-variables", opts->vt_variables,
                   fmt::format("vt: variables in each chain, 1 to {} (fewer hops: an easier task, "
                               "for a curriculum)",
                               data::kMaxVtVariables))
      ->capture_default_str();
  synth->add_flag("--overwrite", opts->overwrite, "Replace an existing output file or directory");
  synth->callback([opts, depth, val_fraction, loss, questions] {
    std::vector<data::SynthTask> tasks;
    for (const std::string& name : opts->tasks) {
      tasks.push_back(data::parse_synth_task(name, "--task"));
    }
    MF_CHECK(opts->num >= 1, "--num must be >= 1 example per task and length, got {}", opts->num);
    MF_CHECK(opts->vt_variables >= 1 && opts->vt_variables <= data::kMaxVtVariables,
             "--vt-variables must be in [1, {}], got {}", data::kMaxVtVariables,
             opts->vt_variables);
    for (data::SynthTask task : tasks) {
      const int64_t min_length = data::synth_min_length(task, opts->vt_variables);
      for (int64_t length : opts->lengths) {
        MF_CHECK(length >= min_length,
                 "--lengths: {} is below the minimum of {} tokens that task {} needs (header, "
                 "question and needles)",
                 length, min_length, data::synth_task_name(task));
      }
    }
    std::optional<double> fixed_depth;
    if (depth->count() > 0) {
      MF_CHECK(opts->depth >= 0.0 && opts->depth <= 1.0, "--depth must be in [0, 1], got {}",
               opts->depth);
      fixed_depth = opts->depth;
    }
    MF_CHECK(opts->format == "train" || val_fraction->count() == 0,
             "--val-fraction applies to --format train only");
    MF_CHECK(opts->format == "train" || loss->count() == 0,
             "--loss applies to --format train only");
    MF_CHECK(opts->format == "train" || questions->count() == 0,
             "--questions applies to --format train only");
    const std::vector<data::SynthExample> examples = data::make_synth_examples(
        tasks, opts->lengths, opts->num, opts->seed, fixed_depth, opts->vt_variables);
    if (opts->format == "jsonl") {
      MF_CHECK(opts->overwrite || !std::filesystem::exists(opts->out),
               "--out '{}' exists; pass --overwrite to replace it", opts->out);
      data::write_synth_jsonl(opts->out, examples);
      fmt::print("{}: {} examples ({} x lengths {} x {})\n", opts->out, examples.size(),
                 fmt::join(opts->tasks, ","), fmt::join(opts->lengths, ","), opts->num);
      return;
    }
    data::PrepareOptions prepare;
    prepare.out_dir = opts->out;
    prepare.val_fraction = opts->val_fraction;
    prepare.overwrite = opts->overwrite;
    const data::PrepareSummary s = data::write_synth_train_dataset(
        examples, prepare, opts->loss == "answer", opts->questions == "all");
    fmt::print("{}: {} examples as documents, train {} tokens, val {} tokens (split: {})\n",
               s.out_dir.string(), s.num_documents, s.num_train_tokens, s.num_val_tokens,
               s.val_rule);
  });
}

}  // namespace

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
  register_synth_command(data);
}

}  // namespace moeforge::cli
