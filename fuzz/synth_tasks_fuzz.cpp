// Fuzz target: data::read_synth_jsonl (the task files of `moeforge eval --task`) on arbitrary file
// contents, then the scoring rule on what it accepted. moeforge::Error is the expected outcome for
// bad input; anything else is a finding, and so is an accepted example whose own answer does not
// score as correct (an answer no output could match) or that does not survive a write and reread.
#include <cstddef>
#include <cstdint>
#include <string_view>
#include <vector>

#include "core/error.h"
#include "data/synth_tasks.h"
#include "fuzz_input.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace moeforge;
  const auto path = fuzz::scratch_dir() / "tasks.jsonl";
  fuzz::write_bytes(path, std::string_view(reinterpret_cast<const char*>(data), size));
  try {
    const std::vector<data::SynthExample> examples = data::read_synth_jsonl(path);
    for (const data::SynthExample& example : examples) {
      if (example.length < 1 || example.prompt.empty() || example.answer.empty()) __builtin_trap();
      if (!(example.depth >= 0.0 && example.depth <= 1.0)) __builtin_trap();
      if (!data::synth_answer_correct(example.task, example.answer, example.answer)) {
        __builtin_trap();
      }
    }
    const auto again = fuzz::scratch_dir() / "tasks-again.jsonl";
    data::write_synth_jsonl(again, examples);
    const std::vector<data::SynthExample> reread = data::read_synth_jsonl(again);
    if (reread.size() != examples.size()) __builtin_trap();
    for (size_t i = 0; i < examples.size(); ++i) {
      if (reread[i].task != examples[i].task || reread[i].length != examples[i].length ||
          reread[i].depth != examples[i].depth || reread[i].prompt != examples[i].prompt ||
          reread[i].answer != examples[i].answer) {
        __builtin_trap();
      }
    }
  } catch (const Error& error) {
    fuzz::rejected(error);
  }
  return 0;
}
