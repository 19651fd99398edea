// Synthetic long-context tasks in the style of RULER: needle in a haystack (one key, several keys,
// several values of one key) and variable tracking. Deterministic generators of prompt + answer
// text, the scoring rule, and the files of `moeforge data synth` (JSONL, or a token dataset).
//
// Lengths are byte-tokenizer tokens: every prompt is ASCII and exactly `length` bytes long (a
// model reads BOS + prompt and should continue with the answer). A prompt is
//   header + context + question
// where the context is filler sentences drawn from the RNG ("The river is quiet. A small fox
// waits by the lamp.", no digits, no '-', no "VAR"; the last one cut to fit) with the needles
// inserted between sentences:
// - niah_single: "The special magic number for <key> is <value>." once; the question asks for it.
// - niah_multikey: that needle for kNumMultikeyNeedles distinct keys; one key is asked.
// - niah_multivalue: kNumMultivalueNeedles needles of one key with distinct values; all are asked,
//   the answer lists them in the order of the text.
// - vt: kNumVtChains chains of vt_variables (default kNumVtVariables) assignments
//   "VAR ABCDE = 12345." then "VAR FGHIJ = ABCDE." ... in order through the context; the question
//   gives the value of one chain, the answer lists its variables in chain order.
// Keys are two words ("quiet-river"), values 7 digits (niah) or 5 digits (vt), variables 5
// capital letters; keys, values and variables are distinct within an example.
//
// Depth: one needle, the anchor (niah_single: the needle; multikey: the asked one; multivalue: the
// first placed value; vt: the first assignment of the asked chain), goes to the sentence boundary
// of the filler nearest to the requested depth; the others go to random boundaries (vt: after the
// anchor for the asked chain). The reported depth is the anchor's offset in the context divided by
// the context's length, in [0, 1).
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "data/prepare.h"

namespace moeforge::data {

enum class SynthTask { kNiahSingle, kNiahMultikey, kNiahMultivalue, kVariableTracking };

inline constexpr int64_t kNumMultikeyNeedles = 4;    // 1 asked key + 3 distractors
inline constexpr int64_t kNumMultivalueNeedles = 4;  // values of the asked key
inline constexpr int64_t kNumVtChains = 2;           // 1 asked chain + 1 distractor
inline constexpr int64_t kNumVtVariables = 4;        // variables per chain, by default
inline constexpr int64_t kMaxVtVariables = 16;       // the most a chain may have

// "niah_single", "niah_multikey", "niah_multivalue", "vt".
std::string synth_task_name(SynthTask task);
// Throws moeforge::Error "<where>: unknown synthetic task ..." listing the known names (where: the
// option or file field that gave the name).
SynthTask parse_synth_task(std::string_view name, std::string_view where);
std::vector<SynthTask> all_synth_tasks();

// A further question about an example's context and its answer (text as the prompt's own
// question: "\nWhat is ... Answer: ").
struct SynthQuestion {
  std::string question;
  std::string answer;
};

struct SynthExample {
  SynthTask task = SynthTask::kNiahSingle;
  int64_t length = 0;  // prompt bytes (byte-tokenizer tokens)
  double depth = 0.0;  // the anchor needle's offset in the context / context_bytes
  std::string prompt;
  std::string answer;
  // Set by the generator only (-1 for examples read from JSONL).
  int64_t needle_offset = -1;  // byte offset of the anchor needle in the prompt
  int64_t context_begin = -1;  // byte offset of the context in the prompt
  int64_t context_bytes = -1;
  // The other questions the context answers, for training documents of several questions
  // (write_synth_train_dataset): niah_multikey asks each other key (in the order the keys were
  // drawn), vt the other chain's value; none for niah_single and niah_multivalue. Set by the
  // generator only; not in the JSONL.
  std::vector<SynthQuestion> other_questions;
};

// vt_variables is the number of variables in each chain of vt (1 to kMaxVtVariables; fewer hops
// make an easier task, for a curriculum); the other tasks ignore it. With the default, examples
// are those of every earlier version.

// The shortest length `task` accepts: header, question and needles with the longest keys, no
// filler. Throws moeforge::Error when vt_variables is out of range.
int64_t synth_min_length(SynthTask task, int64_t vt_variables = kNumVtVariables);

// One example of exactly `length` prompt bytes with the anchor near `depth` (in [0, 1]); a pure
// function of its arguments. Throws moeforge::Error when length < synth_min_length(task,
// vt_variables).
SynthExample make_synth_example(SynthTask task, int64_t length, double depth, uint64_t seed,
                                int64_t vt_variables = kNumVtVariables);

// num examples per (task, length), tasks outer, lengths inner, in the given order. Example i of a
// (task, length) gets depth `depth` when given, else i / (num - 1) (0.5 when num is 1), and a
// seed mixed from (seed, task, length, i).
std::vector<SynthExample> make_synth_examples(std::span<const SynthTask> tasks,
                                              std::span<const int64_t> lengths, int64_t num,
                                              uint64_t seed, std::optional<double> depth,
                                              int64_t vt_variables = kNumVtVariables);

// The scoring rule on the text a model generated after the prompt: its first line (up to '\n'),
// without leading and trailing spaces, is compared with the answer.
// - niah_single, niah_multikey: equal to the answer.
// - niah_multivalue, vt: every item of the answer (", "-separated) is one of the items of the line
//   (split at commas and spaces); order and extra items do not matter.
bool synth_answer_correct(SynthTask task, std::string_view answer, std::string_view generated);

// JSONL, one example a line: {"format_version": 1, "task", "length", "depth", "prompt", "answer"}
// (written atomically).
void write_synth_jsonl(const std::filesystem::path& path, std::span<const SynthExample> examples);
// Errors name the file, the line and the field. A task file may be written by hand:
// format_version optional, length >= 1, depth in [0, 1], prompt and answer non-empty, the answer
// one line that the scoring rule can match (niah_multivalue and vt: at least one item).
std::vector<SynthExample> read_synth_jsonl(const std::filesystem::path& path);

// A token dataset for training (byte tokenizer, like `moeforge data prepare`): every example is
// one document [BOS] prompt answer [EOS], in order; val split and output rules of
// prepare_dataset (options.inputs and options.tokenizer are set here). The text files it prepares
// from live in a hidden folder beside out_dir (.<name>.synth-text) that is removed at the end, so
// dataset.json lists the documents by their file names (relative_path), without input paths.
// answer_only: the loss counts only the answers and EOS (prepare.h's completion_spans), so
// training learns to answer and not to predict the filler text. all_questions: each document is
// [BOS] prompt answer, then each of the example's other_questions with its answer, then [EOS], so
// one context teaches every key (as in multi-query associative recall) and not only the asked
// one; with answer_only every answer counts.
PrepareSummary write_synth_train_dataset(std::span<const SynthExample> examples,
                                         PrepareOptions options, bool answer_only = false,
                                         bool all_questions = false);

}  // namespace moeforge::data
