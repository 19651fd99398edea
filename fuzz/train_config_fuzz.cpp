// Fuzz target: the training-config loader (moeforge::load_train_config) on a fuzzed JSON file plus
// up to four fuzzed `--set key=value` overrides (input: the file, then each override, separated by
// fuzz::kFileSeparator), and the round trip through train_config_to_json of what it accepted.
// moeforge::Error is the expected outcome for bad input; anything else is a finding.
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "core/error.h"
#include "fuzz_input.h"
#include "train/train_config.h"

namespace {

constexpr size_t kMaxOverrides = 4;

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace moeforge;
  const auto parts = fuzz::split_files(data, size, 1 + kMaxOverrides);
  const auto path = fuzz::scratch_dir() / "train.json";
  fuzz::write_bytes(path, parts[0]);
  std::vector<std::string> overrides;
  for (size_t part_idx = 1; part_idx < parts.size(); ++part_idx) {
    if (!parts[part_idx].empty()) overrides.emplace_back(parts[part_idx]);
  }
  try {
    const TrainConfig config = load_train_config(path, overrides);
    if (train_config_from_json(train_config_to_json(config), "") != config) __builtin_trap();
  } catch (const Error& error) {
    fuzz::rejected(error);
  }
  return 0;
}
