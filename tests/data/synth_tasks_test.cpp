// Tests of the RULER-style synthetic task generators: determinism, exact lengths, needle
// placement, solvability (an independent parser recovers the answer from the prompt), the
// scoring rule, and the JSONL and token dataset files.
#include "data/synth_tasks.h"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cctype>
#include <map>
#include <regex>
#include <set>
#include <vector>

#include "core/error.h"
#include "data/byte_tokenizer.h"
#include "data/file_util.h"
#include "data/loader.h"
#include "data/test_util.h"

namespace moeforge::data {
namespace {

using testing::stream_windows;
using testing::TempDir;

// A needle found by the parser: its text and byte offset in the prompt.
struct FoundNeedle {
  std::string text;
  int64_t offset = 0;
  std::string key;    // niah key or vt variable
  std::string value;  // niah value, or vt value or source variable
};

std::vector<FoundNeedle> find_needles(const std::string& prompt, SynthTask task) {
  static const std::regex niah(R"(The special magic number for ([a-z]+-[a-z]+) is ([0-9]+)\.)");
  static const std::regex vt(R"(VAR ([A-Z]+) = ([A-Z0-9]+)\.)");
  const std::regex& pattern = task == SynthTask::kVariableTracking ? vt : niah;
  std::vector<FoundNeedle> found;
  for (auto it = std::sregex_iterator(prompt.begin(), prompt.end(), pattern);
       it != std::sregex_iterator(); ++it) {
    found.push_back({it->str(0), it->position(0), it->str(1), it->str(2)});
  }
  return found;
}

// What the question at the end of the prompt asks about: the key (niah) or the value (vt).
std::string asked(const std::string& prompt, SynthTask task) {
  static const std::regex niah(R"(special magic numbers? for ([a-z]+-[a-z]+)\? Answer: $)");
  static const std::regex vt(R"(assigned the value ([0-9]+)\? Answer: $)");
  std::smatch match;
  const bool ok =
      std::regex_search(prompt, match, task == SynthTask::kVariableTracking ? vt : niah);
  return ok ? match.str(1) : "";
}

// The answer an independent reader derives from the prompt alone.
std::string solve(const std::string& prompt, SynthTask task) {
  const std::vector<FoundNeedle> needles = find_needles(prompt, task);
  const std::string query = asked(prompt, task);
  std::vector<std::string> items;
  if (task == SynthTask::kVariableTracking) {
    // Variables resolve through their chain; collect those that reach the asked value, in order.
    std::map<std::string, std::string> source;
    for (const FoundNeedle& n : needles) source[n.key] = n.value;
    for (const FoundNeedle& n : needles) {
      std::string value = n.key;
      while (source.count(value)) value = source[value];
      if (value == query) items.push_back(n.key);
    }
  } else {
    for (const FoundNeedle& n : needles) {
      if (n.key == query) items.push_back(n.value);
    }
  }
  std::string joined;
  for (const std::string& item : items) joined += (joined.empty() ? "" : ", ") + item;
  return joined;
}

int64_t expected_num_needles(SynthTask task) {
  switch (task) {
    case SynthTask::kNiahSingle: return 1;
    case SynthTask::kNiahMultikey: return kNumMultikeyNeedles;
    case SynthTask::kNiahMultivalue: return kNumMultivalueNeedles;
    case SynthTask::kVariableTracking: return kNumVtChains * kNumVtVariables;
  }
  return -1;
}

TEST(SynthTasks, TaskNamesRoundTripAndUnknownNamesAreClearErrors) {
  for (SynthTask task : all_synth_tasks()) {
    EXPECT_EQ(parse_synth_task(synth_task_name(task), "--task"), task);
  }
  const std::string message = MF_ERROR_MESSAGE(parse_synth_task("niah", "--task"));
  EXPECT_NE(message.find("--task"), std::string::npos) << message;
  EXPECT_NE(message.find("niah_multivalue"), std::string::npos) << message;
}

TEST(SynthTasks, SameSeedSameExampleOtherSeedOtherExample) {
  for (SynthTask task : all_synth_tasks()) {
    const SynthExample a = make_synth_example(task, 2048, 0.3, 7);
    const SynthExample b = make_synth_example(task, 2048, 0.3, 7);
    const SynthExample c = make_synth_example(task, 2048, 0.3, 8);
    EXPECT_EQ(a.prompt, b.prompt);
    EXPECT_EQ(a.answer, b.answer);
    EXPECT_EQ(a.depth, b.depth);
    EXPECT_NE(a.prompt, c.prompt) << synth_task_name(task);
    EXPECT_NE(a.answer, c.answer) << synth_task_name(task);
  }
  const std::vector<SynthTask> tasks = {SynthTask::kNiahSingle};
  const std::vector<int64_t> lengths = {1024};
  const auto x = make_synth_examples(tasks, lengths, 3, 1, std::nullopt);
  const auto y = make_synth_examples(tasks, lengths, 3, 2, std::nullopt);
  for (size_t i = 0; i < x.size(); ++i) EXPECT_NE(x[i].prompt, y[i].prompt);
  EXPECT_NE(x[0].prompt, x[1].prompt);  // examples of one seed differ from each other
}

TEST(SynthTasks, PromptHasExactlyTheRequestedLength) {
  for (SynthTask task : all_synth_tasks()) {
    const int64_t min_length = synth_min_length(task);
    for (int64_t length : {min_length, min_length + 1, min_length + 37, int64_t{1000},
                           int64_t{4096}, int64_t{16384}}) {
      if (length < min_length) continue;
      for (uint64_t seed = 0; seed < 4; ++seed) {
        const SynthExample example = make_synth_example(task, length, 0.5, seed);
        EXPECT_EQ(static_cast<int64_t>(example.prompt.size()), length)
            << synth_task_name(task) << " seed " << seed;
        EXPECT_EQ(example.length, length);
        EXPECT_TRUE(std::all_of(example.prompt.begin(), example.prompt.end(),
                                [](char c) { return c > 0 && c < 127; }));
        ByteTokenizer tokenizer;
        EXPECT_EQ(static_cast<int64_t>(tokenizer.encode(example.prompt).size()), length);
      }
    }
  }
}

TEST(SynthTasks, LengthBelowTheMinimumIsAClearError) {
  for (SynthTask task : all_synth_tasks()) {
    const int64_t min_length = synth_min_length(task);
    EXPECT_GT(min_length, 100);
    for (uint64_t seed = 0; seed < 32; ++seed) make_synth_example(task, min_length, 0.0, seed);
    const std::string message = MF_ERROR_MESSAGE(make_synth_example(task, min_length - 1, 0.0, 0));
    EXPECT_NE(message.find("minimum"), std::string::npos) << message;
    EXPECT_NE(message.find(std::to_string(min_length)), std::string::npos) << message;
  }
  EXPECT_NE(MF_ERROR_MESSAGE(make_synth_example(SynthTask::kVariableTracking, 4096, 1.5, 0))
                .find("depth"),
            std::string::npos);
}

TEST(SynthTasks, AnchorNeedleOccursOnceAtTheReportedDepth) {
  for (SynthTask task : all_synth_tasks()) {
    double previous_depth = -1.0;
    for (double depth : {0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0}) {
      const SynthExample example = make_synth_example(task, 4096, depth, 11);
      const std::vector<FoundNeedle> needles = find_needles(example.prompt, task);
      ASSERT_EQ(static_cast<int64_t>(needles.size()), expected_num_needles(task));
      int64_t needle_bytes = 0;
      std::set<std::string> texts;
      for (const FoundNeedle& n : needles) {
        needle_bytes += static_cast<int64_t>(n.text.size()) + 1;
        texts.insert(n.text);
      }
      EXPECT_EQ(texts.size(), needles.size()) << "every needle text is unique";
      const auto anchor = std::find_if(needles.begin(), needles.end(), [&](const FoundNeedle& n) {
        return n.offset == example.needle_offset;
      });
      ASSERT_NE(anchor, needles.end()) << synth_task_name(task) << " depth " << depth;
      EXPECT_EQ(example.prompt.find(anchor->text), static_cast<size_t>(anchor->offset));
      EXPECT_EQ(example.prompt.rfind(anchor->text), static_cast<size_t>(anchor->offset));
      // The anchor is the needle the question is about.
      if (task == SynthTask::kVariableTracking) {
        EXPECT_EQ(anchor->value, asked(example.prompt, task));
      } else {
        EXPECT_EQ(anchor->key, asked(example.prompt, task));
        EXPECT_NE(example.answer.find(anchor->value), std::string::npos);
      }
      EXPECT_GE(example.needle_offset, example.context_begin);
      EXPECT_DOUBLE_EQ(example.depth,
                       static_cast<double>(example.needle_offset - example.context_begin) /
                           static_cast<double>(example.context_bytes));
      EXPECT_GE(example.depth, 0.0);
      EXPECT_LT(example.depth, 1.0);
      // Off by at most one filler sentence and the needles placed before the anchor.
      const double tolerance =
          static_cast<double>(64 + needle_bytes) / static_cast<double>(example.context_bytes);
      EXPECT_NEAR(example.depth, depth, tolerance) << synth_task_name(task);
      EXPECT_GT(example.depth, previous_depth) << synth_task_name(task) << " depth " << depth;
      previous_depth = example.depth;
    }
  }
}

TEST(SynthTasks, AnswerIsRecoverableFromThePromptAndFillerHoldsNoDigits) {
  for (SynthTask task : all_synth_tasks()) {
    for (uint64_t seed = 0; seed < 20; ++seed) {
      const int64_t length = seed % 2 == 0 ? 1024 : 3000;
      const SynthExample example =
          make_synth_example(task, length, static_cast<double>(seed) / 19.0, seed);
      EXPECT_EQ(solve(example.prompt, task), example.answer)
          << synth_task_name(task) << " seed " << seed;
      EXPECT_TRUE(synth_answer_correct(task, example.answer, example.answer));
      std::string rest = example.prompt;
      for (const FoundNeedle& n : find_needles(example.prompt, task)) {
        rest.replace(rest.find(n.text), n.text.size(), "");
      }
      const std::string query = asked(example.prompt, task);
      rest.replace(rest.rfind(query), query.size(), "");
      EXPECT_TRUE(std::none_of(rest.begin(), rest.end(), [](char c) { return std::isdigit(c); }))
          << synth_task_name(task) << " seed " << seed;
      EXPECT_EQ(rest.find("VAR"), std::string::npos);
    }
  }
}

TEST(SynthTasks, MultiNeedleTasksHaveTheirShape) {
  const SynthExample multikey = make_synth_example(SynthTask::kNiahMultikey, 2048, 0.5, 3);
  std::set<std::string> keys;
  for (const FoundNeedle& n : find_needles(multikey.prompt, SynthTask::kNiahMultikey)) {
    keys.insert(n.key);
  }
  EXPECT_EQ(static_cast<int64_t>(keys.size()), kNumMultikeyNeedles);
  const SynthExample multivalue = make_synth_example(SynthTask::kNiahMultivalue, 2048, 0.5, 3);
  keys.clear();
  std::set<std::string> values;
  for (const FoundNeedle& n : find_needles(multivalue.prompt, SynthTask::kNiahMultivalue)) {
    keys.insert(n.key);
    values.insert(n.value);
  }
  EXPECT_EQ(keys.size(), 1u);
  EXPECT_EQ(static_cast<int64_t>(values.size()), kNumMultivalueNeedles);
  const SynthExample vt = make_synth_example(SynthTask::kVariableTracking, 2048, 0.5, 3);
  EXPECT_EQ(std::count(vt.answer.begin(), vt.answer.end(), ','), kNumVtVariables - 1);
}

TEST(SynthTasks, VtVariablesSetsTheChainLength) {
  for (int64_t vt_variables : {int64_t{1}, int64_t{2}, int64_t{3}, int64_t{7}, kMaxVtVariables}) {
    const int64_t min_length = synth_min_length(SynthTask::kVariableTracking, vt_variables);
    for (int64_t length : {min_length, int64_t{3000}}) {
      for (uint64_t seed = 0; seed < 6; ++seed) {
        const SynthExample example = make_synth_example(SynthTask::kVariableTracking, length,
                                                        seed / 5.0, seed, vt_variables);
        EXPECT_EQ(static_cast<int64_t>(example.prompt.size()), length);
        const std::vector<FoundNeedle> needles =
            find_needles(example.prompt, SynthTask::kVariableTracking);
        EXPECT_EQ(static_cast<int64_t>(needles.size()), kNumVtChains * vt_variables);
        EXPECT_EQ(std::count(example.answer.begin(), example.answer.end(), ','), vt_variables - 1)
            << example.answer;
        EXPECT_EQ(solve(example.prompt, SynthTask::kVariableTracking), example.answer)
            << vt_variables << " variables, seed " << seed;
      }
    }
    const std::string message = MF_ERROR_MESSAGE(
        make_synth_example(SynthTask::kVariableTracking, min_length - 1, 0.0, 0, vt_variables));
    EXPECT_NE(message.find(std::to_string(min_length)), std::string::npos) << message;
  }
  // Each variable more is one needle more per chain.
  EXPECT_LT(synth_min_length(SynthTask::kVariableTracking, 1),
            synth_min_length(SynthTask::kVariableTracking, 2));
  // The default is kNumVtVariables, and the niah tasks ignore the count.
  const SynthExample by_default = make_synth_example(SynthTask::kVariableTracking, 2048, 0.5, 3);
  EXPECT_EQ(by_default.prompt,
            make_synth_example(SynthTask::kVariableTracking, 2048, 0.5, 3, kNumVtVariables).prompt);
  EXPECT_EQ(make_synth_example(SynthTask::kNiahMultikey, 2048, 0.5, 3).prompt,
            make_synth_example(SynthTask::kNiahMultikey, 2048, 0.5, 3, 1).prompt);
  for (int64_t bad : {int64_t{0}, int64_t{-1}, kMaxVtVariables + 1}) {
    const std::string message =
        MF_ERROR_MESSAGE(make_synth_example(SynthTask::kVariableTracking, 4096, 0.5, 0, bad));
    EXPECT_NE(message.find("variables per chain"), std::string::npos) << message;
  }
  const std::vector<SynthTask> tasks = {SynthTask::kVariableTracking};
  const std::vector<int64_t> lengths = {1024};
  for (const SynthExample& example : make_synth_examples(tasks, lengths, 3, 9, {}, 2)) {
    EXPECT_EQ(std::count(example.answer.begin(), example.answer.end(), ','), 1) << example.answer;
  }
}

TEST(SynthTasks, OtherQuestionsAreAnsweredByTheContext) {
  for (SynthTask task : all_synth_tasks()) {
    for (uint64_t seed = 0; seed < 10; ++seed) {
      const SynthExample example = make_synth_example(task, 1500, 0.3, seed);
      const size_t expected = task == SynthTask::kNiahMultikey       ? kNumMultikeyNeedles - 1
                              : task == SynthTask::kVariableTracking ? kNumVtChains - 1
                                                                     : 0;
      ASSERT_EQ(example.other_questions.size(), expected) << synth_task_name(task);
      // The prompt with its own question replaced by another: the independent reader's answer.
      const size_t own_question = example.prompt.rfind('\n');
      std::set<std::string> asked_items = {asked(example.prompt, task)};
      for (const SynthQuestion& other : example.other_questions) {
        const std::string prompt = example.prompt.substr(0, own_question) + other.question;
        EXPECT_EQ(solve(prompt, task), other.answer) << synth_task_name(task) << " seed " << seed;
        EXPECT_TRUE(asked_items.insert(asked(prompt, task)).second)
            << "each question asks something else: " << other.question;
      }
    }
  }
}

TEST(SynthTasks, AllQuestionsDatasetCountsEveryAnswer) {
  TempDir dir;
  const std::vector<SynthTask> tasks = {SynthTask::kNiahMultikey, SynthTask::kVariableTracking,
                                        SynthTask::kNiahSingle};
  const std::vector<int64_t> lengths = {700};
  const std::vector<SynthExample> examples = make_synth_examples(tasks, lengths, 2, 9, {});
  PrepareOptions options;
  options.out_dir = dir / "all";
  options.val_fraction = 0.0;
  write_synth_train_dataset(examples, options, true, true);
  const TokenDataset dataset = TokenDataset::open(dir / "all", "train");
  ASSERT_TRUE(dataset.has_loss_mask());
  std::vector<int32_t> tokens(dataset.num_tokens());
  dataset.read(0, dataset.num_tokens(), tokens.data());
  const int64_t seq_len = dataset.num_tokens() - 1;
  std::vector<int32_t> inputs(seq_len);
  std::vector<int32_t> targets(seq_len);
  stream_windows(dataset, seq_len).read(0, inputs.data(), targets.data());
  // Per document: its text (the tokens between BOS and EOS) and its counted targets.
  std::vector<std::vector<int32_t>> texts, counted;
  for (int64_t pos = 0; pos < seq_len; ++pos) {
    if (tokens[pos] == ByteTokenizer::kBosId) {
      texts.emplace_back();
      counted.emplace_back();
    } else if (tokens[pos] != ByteTokenizer::kEosId) {
      texts.back().push_back(tokens[pos]);
    }
    if (targets[pos] != -1) counted.back().push_back(targets[pos]);
  }
  ASSERT_EQ(texts.size(), examples.size());
  ByteTokenizer tokenizer;
  for (size_t doc_idx = 0; doc_idx < examples.size(); ++doc_idx) {
    const SynthExample& example = examples[doc_idx];
    std::string text = example.prompt + example.answer;
    std::string answers = example.answer;
    for (const SynthQuestion& other : example.other_questions) {
      text += other.question + other.answer;
      answers += other.answer;
    }
    EXPECT_EQ(tokenizer.decode(texts[doc_idx]), text) << doc_idx;
    std::vector<int32_t> expected = tokenizer.encode(answers);
    expected.push_back(ByteTokenizer::kEosId);
    EXPECT_EQ(counted[doc_idx], expected) << synth_task_name(example.task) << " " << doc_idx;
  }
  EXPECT_EQ(examples[0].other_questions.size(), static_cast<size_t>(kNumMultikeyNeedles - 1));
}

TEST(SynthTasks, ExampleSetsFollowTasksLengthsAndDepths) {
  const std::vector<SynthTask> tasks = {SynthTask::kNiahSingle, SynthTask::kVariableTracking};
  const std::vector<int64_t> lengths = {1024, 2048};
  const std::vector<SynthExample> examples = make_synth_examples(tasks, lengths, 5, 9, {});
  ASSERT_EQ(examples.size(), 20u);
  for (size_t i = 0; i < examples.size(); ++i) {
    EXPECT_EQ(examples[i].task, tasks[i / 10]);
    EXPECT_EQ(examples[i].length, lengths[(i / 5) % 2]);
    const double requested = static_cast<double>(i % 5) / 4.0;
    EXPECT_NEAR(examples[i].depth, requested, 0.25);
  }
  EXPECT_LT(examples[0].depth, 0.05);
  EXPECT_GT(examples[4].depth, 0.7);
  for (const SynthExample& e : make_synth_examples(tasks, lengths, 3, 9, 0.0)) {
    EXPECT_LT(e.depth, 0.05);
  }
  EXPECT_NE(MF_ERROR_MESSAGE(make_synth_examples(tasks, lengths, 0, 9, {})).find("num"),
            std::string::npos);
}

TEST(SynthTasks, ScoringRuleIsExactForOneValueAndAllOfThemForLists) {
  const SynthTask single = SynthTask::kNiahSingle;
  EXPECT_TRUE(synth_answer_correct(single, "1234567", "1234567"));
  EXPECT_TRUE(synth_answer_correct(single, "1234567", " 1234567 \nThe river is quiet."));
  EXPECT_FALSE(synth_answer_correct(single, "1234567", "123456"));
  EXPECT_FALSE(synth_answer_correct(single, "1234567", "12345678"));
  EXPECT_FALSE(synth_answer_correct(single, "1234567", "1234567."));
  EXPECT_FALSE(synth_answer_correct(single, "1234567", "The 1234567"));
  EXPECT_FALSE(synth_answer_correct(single, "1234567", ""));
  EXPECT_FALSE(synth_answer_correct(single, "1234567", "\n1234567"));
  const SynthTask multi = SynthTask::kNiahMultivalue;
  const std::string answer = "1111111, 2222222, 3333333";
  EXPECT_TRUE(synth_answer_correct(multi, answer, answer));
  EXPECT_TRUE(synth_answer_correct(multi, answer, "3333333 1111111,2222222"));
  EXPECT_FALSE(synth_answer_correct(multi, answer, "1111111, 2222222"));
  EXPECT_FALSE(synth_answer_correct(multi, answer, "1111111, 2222222, 333333"));
  EXPECT_FALSE(synth_answer_correct(multi, answer, "1111111, 2222222\n3333333"));
  EXPECT_FALSE(synth_answer_correct(multi, answer, ""));
  EXPECT_TRUE(synth_answer_correct(SynthTask::kVariableTracking, "ABCDE, FGHIJ", "FGHIJ, ABCDE"));
  EXPECT_FALSE(synth_answer_correct(SynthTask::kVariableTracking, "ABCDE, FGHIJ", "ABCDEFGHIJ"));
}

TEST(SynthTasks, JsonlRoundTripsAndBadLinesNameTheLineAndField) {
  TempDir dir;
  const std::vector<SynthTask> tasks = all_synth_tasks();
  const std::vector<int64_t> lengths = {1024};
  const std::vector<SynthExample> examples = make_synth_examples(tasks, lengths, 2, 4, {});
  write_synth_jsonl(dir / "tasks.jsonl", examples);
  const std::vector<SynthExample> read = read_synth_jsonl(dir / "tasks.jsonl");
  ASSERT_EQ(read.size(), examples.size());
  for (size_t i = 0; i < read.size(); ++i) {
    EXPECT_EQ(read[i].task, examples[i].task);
    EXPECT_EQ(read[i].length, examples[i].length);
    EXPECT_EQ(read[i].depth, examples[i].depth);
    EXPECT_EQ(read[i].prompt, examples[i].prompt);
    EXPECT_EQ(read[i].answer, examples[i].answer);
  }
  const std::string good =
      R"({"task": "vt", "length": 5, "depth": 0, "prompt": "p", "answer": "A"})";
  const auto error_of = [&dir, &good](const std::string& second_line) {
    testing::write_file(dir / "bad.jsonl", good + "\n" + second_line + "\n");
    return MF_ERROR_MESSAGE(read_synth_jsonl(dir / "bad.jsonl"));
  };
  EXPECT_EQ(error_of(""), "");
  const std::string task =
      error_of(R"({"task": "nope", "length": 5, "depth": 0, "prompt": "p", "answer": "A"})");
  EXPECT_NE(task.find("bad.jsonl:2: field 'task'"), std::string::npos) << task;
  const std::string depth =
      error_of(R"({"task": "vt", "length": 5, "depth": 2, "prompt": "p", "answer": "A"})");
  EXPECT_NE(depth.find("'depth'"), std::string::npos) << depth;
  const std::string answer = error_of(R"({"task": "vt", "length": 5, "depth": 0, "prompt": "p"})");
  EXPECT_NE(answer.find("'answer'"), std::string::npos) << answer;
  const std::string json = error_of("{not json");
  EXPECT_NE(json.find("bad.jsonl:2"), std::string::npos) << json;
  const std::string version = error_of(
      R"({"format_version": 9, "task": "vt", "length": 5, "depth": 0, "prompt": "p", "answer": "A"})");
  EXPECT_NE(version.find("format_version"), std::string::npos) << version;
  // Answers no output can match: a line break (the output's first line is scored), no item.
  const std::string two_lines = error_of(
      R"({"task": "niah_single", "length": 5, "depth": 0, "prompt": "p", "answer": "1\n2"})");
  EXPECT_NE(two_lines.find("bad.jsonl:2: field 'answer' holds a line break"), std::string::npos)
      << two_lines;
  const std::string no_item =
      error_of(R"({"task": "vt", "length": 5, "depth": 0, "prompt": "p", "answer": " , ,"})");
  EXPECT_NE(no_item.find("bad.jsonl:2: field 'answer' (\" , ,\") has no item"), std::string::npos)
      << no_item;
  EXPECT_EQ(
      error_of(R"({"task": "niah_single", "length": 5, "depth": 0, "prompt": "p", "answer": ","})"),
      "");  // niah answers are compared whole
}

TEST(SynthTasks, TrainDatasetHoldsEveryExampleAsOneDocument) {
  TempDir dir;
  const std::vector<SynthTask> tasks = {SynthTask::kNiahMultivalue};
  const std::vector<int64_t> lengths = {600, 900};
  const std::vector<SynthExample> examples = make_synth_examples(tasks, lengths, 2, 5, {});
  PrepareOptions options;
  options.out_dir = dir / "train-set";
  options.val_fraction = 0.0;
  const PrepareSummary summary = write_synth_train_dataset(examples, options);
  EXPECT_EQ(summary.num_documents, 4);
  EXPECT_FALSE(std::filesystem::exists(dir / ".train-set.synth-text"));
  // The document list names no deleted temporary file, only each example's file name.
  const nlohmann::json info =
      nlohmann::json::parse(read_file_bytes(dir / "train-set/dataset.json"));
  ASSERT_EQ(info.at("documents").size(), 4u);
  for (const auto& document : info.at("documents")) {
    EXPECT_FALSE(document.contains("path")) << document.dump();
    EXPECT_NE(document.at("relative_path").get<std::string>().find("niah"), std::string::npos);
  }
  const TokenDataset dataset = TokenDataset::open(dir / "train-set", "train");
  std::vector<int32_t> expected;
  ByteTokenizer tokenizer;
  for (const SynthExample& example : examples) {
    expected.push_back(ByteTokenizer::kBosId);
    for (int32_t t : tokenizer.encode(example.prompt + example.answer)) expected.push_back(t);
    expected.push_back(ByteTokenizer::kEosId);
  }
  ASSERT_EQ(dataset.num_tokens(), static_cast<int64_t>(expected.size()));
  std::vector<int32_t> tokens(expected.size());
  dataset.read(0, dataset.num_tokens(), tokens.data());
  EXPECT_EQ(tokens, expected);
}

TEST(SynthTasks, AnswerOnlyDatasetCountsExactlyTheAnswersAndEos) {
  TempDir dir;
  const std::vector<SynthTask> tasks = {SynthTask::kNiahSingle, SynthTask::kVariableTracking};
  const std::vector<int64_t> lengths = {700};
  const std::vector<SynthExample> examples = make_synth_examples(tasks, lengths, 4, 5, {});
  PrepareOptions options;
  options.out_dir = dir / "answers";
  options.val_fraction = 0.3;
  const PrepareSummary summary = write_synth_train_dataset(examples, options, true);
  // Whole documents in both splits (the hash rule), so each split starts at a document's BOS.
  ASSERT_EQ(summary.val_rule, "document_hash");
  ASSERT_GT(summary.num_train_documents, 0);
  ASSERT_GT(summary.num_val_documents, 0);

  const nlohmann::json info = nlohmann::json::parse(read_file_bytes(dir / "answers/dataset.json"));
  ByteTokenizer tokenizer;
  int64_t num_documents = 0;
  for (const std::string split : {"train", "val"}) {
    // The examples of the split's documents, in stream order (file names start with the index).
    std::vector<size_t> example_ids;
    for (const auto& document : info.at("documents")) {
      if (document.at("split") != split) continue;
      example_ids.push_back(std::stoul(document.at("relative_path").get<std::string>()));
    }
    const TokenDataset dataset = TokenDataset::open(dir / "answers", split);
    EXPECT_TRUE(dataset.has_loss_mask()) << split;
    const int64_t seq_len = dataset.num_tokens() - 1;
    ASSERT_EQ(stream_windows(dataset, seq_len).num_windows(), 1) << split;
    std::vector<int32_t> inputs(seq_len);
    std::vector<int32_t> targets(seq_len);
    stream_windows(dataset, seq_len).read(0, inputs.data(), targets.data());
    // The counted targets (not -1) of each document: target i is token i + 1, and a document
    // starts at its BOS.
    ASSERT_EQ(inputs[0], ByteTokenizer::kBosId) << split;
    std::vector<std::vector<int32_t>> counted;
    for (int64_t pos = 0; pos < seq_len; ++pos) {
      if (inputs[pos] == ByteTokenizer::kBosId) counted.emplace_back();
      if (targets[pos] != -1) counted.back().push_back(targets[pos]);
    }
    ASSERT_EQ(counted.size(), example_ids.size()) << split;
    for (size_t doc_idx = 0; doc_idx < counted.size(); ++doc_idx) {
      const SynthExample& example = examples[example_ids[doc_idx]];
      std::vector<int32_t> expected = tokenizer.encode(example.answer);
      expected.push_back(ByteTokenizer::kEosId);
      EXPECT_EQ(counted[doc_idx], expected) << split << " example " << example_ids[doc_idx];
      EXPECT_EQ(tokenizer.decode(std::span(counted[doc_idx]).first(counted[doc_idx].size() - 1)),
                example.answer);
    }
    num_documents += static_cast<int64_t>(counted.size());
  }
  EXPECT_EQ(num_documents, static_cast<int64_t>(examples.size()));

  options.out_dir = dir / "everything";
  write_synth_train_dataset(examples, options, false);
  EXPECT_FALSE(TokenDataset::open(dir / "everything", "train").has_loss_mask());
  EXPECT_FALSE(TokenDataset::open(dir / "everything", "val").has_loss_mask());
}

}  // namespace
}  // namespace moeforge::data
