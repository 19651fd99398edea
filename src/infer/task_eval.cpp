// Accuracy of greedy generation on the synthetic long-context tasks of data/synth_tasks.h (see
// task_eval.h).
#include "infer/task_eval.h"

#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <map>
#include <span>
#include <utility>

#include "core/error.h"
#include "infer/generate.h"
#include "model/prefill_attention.h"

namespace moeforge {
namespace {

// Greedy decoding runs for the answer's tokens plus this many, so that a model that answers with
// a few extra tokens is still read (the scoring rule reads the first line only).
constexpr int64_t kExtraDecodeTokens = 4;

// Counts of one (task, length) group of a task file; the fields are summed over ranks in order.
struct TaskGroup {
  double num_examples = 0.0;
  double num_correct = 0.0;
  double num_heads = 0.0;  // flex: (example, layer, head) triples
  double density_sum = 0.0;
  double num_query_aware = 0.0;
  double num_dense_fallback = 0.0;  // (example, layer) pairs

  void add(const TaskGroup& other) {
    num_examples += other.num_examples;
    num_correct += other.num_correct;
    num_heads += other.num_heads;
    density_sum += other.density_sum;
    num_query_aware += other.num_query_aware;
    num_dense_fallback += other.num_dense_fallback;
  }
};
constexpr size_t kTaskGroupFields = 6;

// The prompt's tokens (BOS + prompt) and the decode budget of one example.
std::pair<int64_t, int64_t> example_token_counts(const data::Tokenizer& tokenizer,
                                                 const data::SynthExample& example) {
  return {1 + static_cast<int64_t>(tokenizer.encode(example.prompt).size()),
          static_cast<int64_t>(tokenizer.encode(example.answer).size()) + kExtraDecodeTokens};
}

}  // namespace

nlohmann::ordered_json evaluate_synth_tasks(InferenceEngine& engine,
                                            const data::Tokenizer& tokenizer,
                                            const std::vector<data::SynthExample>& examples,
                                            const std::string& task_file, bool flex,
                                            Communicator& world,
                                            std::vector<std::string>* generated_texts) {
  const int64_t max_positions = engine.config().max_position_embeddings;
  std::map<std::pair<data::SynthTask, int64_t>, TaskGroup> groups;
  for (size_t example_idx = 0; example_idx < examples.size(); ++example_idx) {
    const data::SynthExample& example = examples[example_idx];
    groups.try_emplace({example.task, example.length});
    const auto [num_prompt, num_decode] = example_token_counts(tokenizer, example);
    MF_CHECK(max_positions <= 0 || num_prompt + num_decode <= max_positions,
             "{}: example {} ({}, length {}) needs {} positions ({} prompt tokens with BOS, {} "
             "decode tokens) but the model's max_position_embeddings is {}; use shorter tasks "
             "or a model trained for longer contexts",
             task_file, example_idx + 1, data::synth_task_name(example.task), example.length,
             num_prompt + num_decode, num_prompt, num_decode, max_positions);
  }
  if (generated_texts != nullptr) generated_texts->assign(examples.size(), std::string());
  const bool tty = isatty(fileno(stderr)) == 1;
  const auto num_examples = static_cast<int64_t>(examples.size());
  const int64_t report_every = std::max<int64_t>(1, num_examples / 10);
  int64_t num_done = 0, num_correct = 0;
  for (int64_t example_idx = world.rank(); example_idx < num_examples;
       example_idx += world.size()) {
    const data::SynthExample& example = examples[example_idx];
    GenerateOptions options;
    options.max_new_tokens = example_token_counts(tokenizer, example).second;
    options.sampler.temperature = 0.0;
    const GenerateResult result = generate(engine, tokenizer, example.prompt, options, nullptr);
    // A model vocabulary larger than the tokenizer's may produce ids without text: they end it.
    auto text_end = std::find_if(result.new_tokens.begin(), result.new_tokens.end(),
                                 [&tokenizer](int32_t id) { return id >= tokenizer.vocab_size(); });
    const std::string generated = tokenizer.decode(
        std::span<const int32_t>(result.new_tokens.data(), text_end - result.new_tokens.begin()));
    const bool correct = data::synth_answer_correct(example.task, example.answer, generated);
    if (generated_texts != nullptr)
      (*generated_texts)[static_cast<size_t>(example_idx)] = generated;
    TaskGroup& group = groups[{example.task, example.length}];
    group.num_examples += 1.0;
    group.num_correct += correct ? 1.0 : 0.0;
    if (flex) {
      const PrefillStatsSummary summary = summarize_prefill_stats(engine.prefill_stats());
      group.num_heads += static_cast<double>(summary.num_heads);
      group.density_sum += summary.mean_density * static_cast<double>(summary.num_heads);
      group.num_query_aware += static_cast<double>(summary.num_query_aware);
      group.num_dense_fallback += static_cast<double>(summary.num_dense_fallback);
    }
    ++num_done;
    num_correct += correct ? 1 : 0;
    if (world.rank() == 0 && (tty || num_done % report_every == 0)) {
      fmt::print(stderr, "{}example {}/{} ({}, length {}): {} correct so far{}", tty ? "\r" : "",
                 example_idx + 1, num_examples, data::synth_task_name(example.task), example.length,
                 num_correct, tty ? "" : "\n");
    }
  }
  if (world.rank() == 0 && tty) fmt::print(stderr, "\n");

  std::vector<double> sums;
  for (const auto& [key, group] : groups) {
    sums.insert(sums.end(), {group.num_examples, group.num_correct, group.num_heads,
                             group.density_sum, group.num_query_aware, group.num_dense_fallback});
  }
  world.all_reduce_sum(sums.data(), sums.size());
  size_t group_idx = 0;
  for (auto& [key, group] : groups) {
    const double* g = sums.data() + kTaskGroupFields * group_idx++;
    group = TaskGroup{g[0], g[1], g[2], g[3], g[4], g[5]};
  }

  auto accuracy = [](double correct, double count) { return count > 0 ? correct / count : 0.0; };
  auto mean_density = [](const TaskGroup& g) {
    return g.num_heads > 0 ? g.density_sum / g.num_heads : 0.0;
  };
  std::map<data::SynthTask, TaskGroup> task_totals;
  TaskGroup total;
  for (const auto& [key, group] : groups) {
    task_totals[key.first].add(group);
    total.add(group);
  }
  nlohmann::ordered_json tasks = nlohmann::ordered_json::object();
  for (const auto& [task, task_total] : task_totals) {
    nlohmann::ordered_json lengths = nlohmann::ordered_json::object();
    for (const auto& [key, group] : groups) {
      if (key.first != task) continue;
      nlohmann::ordered_json& length = lengths[std::to_string(key.second)];
      length = {{"examples", static_cast<int64_t>(group.num_examples)},
                {"correct", static_cast<int64_t>(group.num_correct)},
                {"accuracy", accuracy(group.num_correct, group.num_examples)}};
      if (flex) length["mean_density"] = mean_density(group);
    }
    tasks[data::synth_task_name(task)] = {
        {"examples", static_cast<int64_t>(task_total.num_examples)},
        {"correct", static_cast<int64_t>(task_total.num_correct)},
        {"accuracy", accuracy(task_total.num_correct, task_total.num_examples)},
        {"lengths", lengths}};
  }
  nlohmann::ordered_json out = {{"examples", static_cast<int64_t>(total.num_examples)},
                                {"correct", static_cast<int64_t>(total.num_correct)},
                                {"accuracy", accuracy(total.num_correct, total.num_examples)},
                                {"tasks", tasks}};
  if (flex) {
    out["attention_stats"] = {
        {"prefills", static_cast<int64_t>(total.num_examples)},
        {"mean_density", mean_density(total)},
        {"query_aware_heads", static_cast<int64_t>(total.num_query_aware)},
        {"heads", static_cast<int64_t>(total.num_heads)},
        {"dense_fallback_layers", static_cast<int64_t>(total.num_dense_fallback)}};
  }
  return out;
}

}  // namespace moeforge
