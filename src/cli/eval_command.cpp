// `moeforge eval`: validation loss, perplexity and bits per byte of a model on a dataset.
// With --attention flex every window is scored as a prefill into a fresh KV cache
// (Transformer::forward_prefill, FlexPrefill block-sparse attention), one window at a time; the
// output adds a summary of the block selections over all windows.
// With --task FILE.jsonl (from `moeforge data synth`): accuracy of greedy generation on the
// synthetic long-context tasks, per task and prompt length, with the mean density of the sparse
// prefills under --attention flex, on the CPU reference or one GPU (--device).
#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <map>
#include <utility>

#include "cli/attention_options.h"
#include "cli/commands.h"
#include "cli/inference_device.h"
#include "comm/communicator.h"
#include "core/error.h"
#include "data/loader.h"
#include "data/synth_tasks.h"
#include "data/tokenizer.h"
#include "infer/task_eval.h"
#include "io/atomic_file.h"
#include "model/model_io.h"
#include "ops/cross_entropy.h"
#include "train/evaluate.h"

namespace moeforge::cli {
namespace {

// Block selection statistics summed over the windows of the sparse prefills.
struct FlexEvalTotals {
  double num_windows = 0.0;
  double num_heads = 0.0;  // (window, layer, head) triples
  double density_sum = 0.0;
  double num_query_aware = 0.0;
  double num_dense_fallback = 0.0;  // (window, layer) pairs
};

// The loss of each window of tokens/targets [batch, seq] from a prefill with the model's prefill
// attention (aux and z losses are not computed; evaluation reads ce_loss and num_counted).
LossBreakdown prefill_window_loss(Transformer<float>& model, const int32_t* tokens,
                                  const int32_t* targets, int64_t batch, int64_t seq,
                                  FlexEvalTotals& totals) {
  const int64_t vocab = model.config().vocab_size;
  std::vector<float> logits(static_cast<size_t>(seq * vocab)), losses(static_cast<size_t>(seq));
  double ce_sum = 0.0;
  LossBreakdown out;
  for (int64_t b = 0; b < batch; ++b) {
    KvCache<float> cache(model.config(), seq);
    model.forward_prefill(tokens + b * seq, seq, cache, logits.data());
    int64_t num_counted = 0;
    ce_sum += ops::cross_entropy_forward(losses.data(), logits.data(), targets + b * seq, seq,
                                         vocab, &num_counted);
    out.num_counted += num_counted;
    const PrefillStatsSummary summary = summarize_prefill_stats(model.prefill_stats());
    totals.num_windows += 1.0;
    totals.num_heads += static_cast<double>(summary.num_heads);
    totals.density_sum += summary.mean_density * static_cast<double>(summary.num_heads);
    totals.num_query_aware += static_cast<double>(summary.num_query_aware);
    totals.num_dense_fallback += static_cast<double>(summary.num_dense_fallback);
  }
  out.ce_loss = out.num_counted > 0 ? ce_sum / static_cast<double>(out.num_counted) : 0.0;
  out.loss = out.ce_loss;
  return out;
}

// One JSON line per example: its task, length, depth and answer, the greedy output and whether it
// scored (written atomically).
void write_predictions(const std::string& path, const std::vector<data::SynthExample>& examples,
                       const std::vector<std::string>& generated) {
  std::string text;
  for (size_t i = 0; i < examples.size(); ++i) {
    const data::SynthExample& e = examples[i];
    nlohmann::ordered_json line = {
        {"task", data::synth_task_name(e.task)},
        {"length", e.length},
        {"depth", e.depth},
        {"answer", e.answer},
        {"output", generated[i]},
        {"correct", data::synth_answer_correct(e.task, e.answer, generated[i])}};
    text += line.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) + "\n";
  }
  io::write_file_atomic(path, text);
}

}  // namespace

void register_eval_command(CLI::App& app) {
  struct Options {
    std::string model, data, task, split = "val", windows = "stream", device = "cpu", predictions;
    int64_t seq_len = 256, batch_size = 8, max_batches = 0;
    AttentionOptions attention;
  };
  auto opts = std::make_shared<Options>();
  CLI::App* cmd = app.add_subcommand(
      "eval",
      "Evaluate a model on a prepared dataset (--data: loss) or on synthetic long-context tasks "
      "(--task: accuracy); prints one JSON line");
  cmd->add_option("--model", opts->model, "Model, checkpoint or run directory")
      ->required()
      ->check(CLI::ExistingDirectory);
  CLI::Option* data =
      cmd->add_option("--data", opts->data, "Dataset directory from `moeforge data prepare`")
          ->check(CLI::ExistingDirectory);
  CLI::Option* task =
      cmd->add_option(
             "--task", opts->task,
             "Task file (.jsonl) from `moeforge data synth`: accuracy of greedy answers per "
             "task and prompt length (exact match; niah_multivalue and vt: every value "
             "listed), with the model directory's tokenizer")
          ->check(CLI::ExistingFile)
          ->excludes(data);
  CLI::Option* split = cmd->add_option("--split", opts->split, "train or val")
                           ->check(CLI::IsMember({"train", "val"}))
                           ->capture_default_str();
  CLI::Option* seq_len =
      cmd->add_option("--seq-len", opts->seq_len, "Tokens per window")->capture_default_str();
  CLI::Option* batch_size = cmd->add_option("--batch-size", opts->batch_size, "Windows per forward")
                                ->capture_default_str();
  CLI::Option* max_batches =
      cmd->add_option(
             "--max-batches", opts->max_batches,
             "Score this many batches of windows, spread evenly over the split (0 = every window)")
          ->capture_default_str();
  CLI::Option* windows =
      cmd->add_option("--windows", opts->windows,
                      "How the split is cut into windows, as the training config's data.windows: "
                      "stream (fixed strides), packed (whole documents from a document start, "
                      "padded) or single (one document per window, padded)")
          ->check(CLI::IsMember({"stream", "packed", "single"}))
          ->capture_default_str();
  for (CLI::Option* dataset_only : {split, seq_len, batch_size, max_batches, windows}) {
    task->excludes(dataset_only);
  }
  cmd->add_option("--predictions", opts->predictions,
                  "With --task: also write every example's answer and greedy output as JSONL "
                  "(task, length, depth, answer, output, correct; one process only)")
      ->needs(task);
  add_attention_options(cmd, opts->attention);
  add_inference_device_option(cmd, opts->device);
  cmd->callback([opts] {
    MF_CHECK(!opts->data.empty() || !opts->task.empty(),
             "eval needs --data DIR (loss on a dataset from `moeforge data prepare`) or --task "
             "FILE.jsonl (accuracy on tasks from `moeforge data synth`)");
    const PrefillAttention attention = parse_attention_options(opts->attention, opts->device);
    MF_CHECK(opts->device == "cpu" || !opts->task.empty() || !attention.flex,
             "eval --data --device {} runs dense attention; the FlexPrefill window loss "
             "(--attention flex) runs on --device cpu",
             opts->device);
    const std::filesystem::path dir = resolve_model_dir(opts->model);
    SelfCommunicator self;
    std::unique_ptr<Transformer<float>> loaded = load_transformer(dir, self);
    if (!opts->task.empty()) {
      const auto tokenizer = data::load_tokenizer(dir);
      Communicator& world = world_communicator();
      const std::unique_ptr<InferenceEngine> engine =
          make_inference_engine(opts->device, loaded, attention);
      nlohmann::ordered_json out = {{"model", opts->model},
                                    {"task_file", opts->task},
                                    {"attention", opts->attention.attention},
                                    {"device", opts->device}};
      MF_CHECK(opts->predictions.empty() || world.size() == 1,
               "--predictions runs in one process (each rank decodes only its share of the "
               "examples); drop it or mpirun");
      const std::vector<data::SynthExample> examples = data::read_synth_jsonl(opts->task);
      std::vector<std::string> generated;
      out.update(evaluate_synth_tasks(*engine, *tokenizer, examples, opts->task, attention.flex,
                                      world, opts->predictions.empty() ? nullptr : &generated));
      if (attention.flex) out["attention_params"] = flex_prefill_params_json(attention.params);
      if (!opts->predictions.empty()) write_predictions(opts->predictions, examples, generated);
      if (world.rank() == 0) fmt::print("{}\n", out.dump());
      return;
    }
    Transformer<float>& model = *loaded;
    model.set_prefill_attention(attention);
    const data::TokenDataset dataset = data::TokenDataset::open(opts->data, opts->split);
    const data::Windows windows(dataset, opts->seq_len,
                                data::parse_window_layout(opts->windows, "--windows"));
    const auto tokenizer = data::load_tokenizer(opts->data);
    Communicator& world = world_communicator();
    FlexEvalTotals totals;
    EvalResult r;
    if (attention.flex) {
      const ForwardFn forward = [&](const int32_t* tokens, const int32_t* targets, int64_t batch,
                                    int64_t seq) {
        return prefill_window_loss(model, tokens, targets, batch, seq, totals);
      };
      r = evaluate(forward, windows, *tokenizer, opts->batch_size, opts->max_batches, world);
      double sums[5] = {totals.num_windows, totals.num_heads, totals.density_sum,
                        totals.num_query_aware, totals.num_dense_fallback};
      world.all_reduce_sum(sums, 5);
      totals = FlexEvalTotals{sums[0], sums[1], sums[2], sums[3], sums[4]};
    } else if (opts->device == "cuda") {
      r = evaluate(make_gpu_loss_forward(model), windows, *tokenizer, opts->batch_size,
                   opts->max_batches, world);
    } else {
      r = evaluate(model, windows, *tokenizer, opts->batch_size, opts->max_batches, world);
    }
    const double unigram =
        unigram_baseline_loss(data::TokenDataset::open(opts->data, "train"), dataset);
    if (world.rank() == 0) {
      nlohmann::json out({{"model", opts->model},
                          {"data", opts->data},
                          {"split", opts->split},
                          {"windows", opts->windows},
                          {"loss", r.loss},
                          {"perplexity", r.perplexity},
                          {"bits_per_byte", r.bits_per_byte},
                          {"unigram_loss", unigram},
                          {"tokens", r.num_tokens},
                          {"bytes", r.num_bytes},
                          {"attention", opts->attention.attention},
                          {"device", opts->device}});
      if (attention.flex) {
        out["attention_params"] = flex_prefill_params_json(attention.params);
        out["attention_stats"] = {
            {"windows", static_cast<int64_t>(totals.num_windows)},
            {"mean_density", totals.num_heads > 0 ? totals.density_sum / totals.num_heads : 0.0},
            {"query_aware_heads", static_cast<int64_t>(totals.num_query_aware)},
            {"heads", static_cast<int64_t>(totals.num_heads)},
            {"dense_fallback_layers", static_cast<int64_t>(totals.num_dense_fallback)}};
      }
      fmt::print("{}\n", out.dump());
    }
  });
}

}  // namespace moeforge::cli
