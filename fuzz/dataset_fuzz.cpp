// Fuzz target: the prepared-dataset folder that `moeforge train` and `eval` read: dataset.json,
// one token shard train-00000.bin and moeforge_tokenizer.json (input: the three files separated by
// fuzz::kFileSeparator; an empty part means the file is missing). Runs data::TokenDataset::open
// (with dataset.json's document list), reads every window of each layout (stream, packed, single)
// through a BatchSampler, and data::load_tokenizer. moeforge::Error is the expected outcome for
// bad input; anything else is a finding.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "core/error.h"
#include "data/loader.h"
#include "data/tokenizer.h"
#include "data/windows.h"
#include "fuzz_input.h"

namespace {

constexpr int64_t kSeqLen = 4;
constexpr int64_t kMaxWindows = 1 << 12;

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace moeforge;
  const auto dir = fuzz::scratch_dir() / "dataset";
  const auto parts = fuzz::split_files(data, size, 3);
  fuzz::write_bytes(dir / "dataset.json", parts[0], /*remove_if_empty=*/true);
  fuzz::write_bytes(dir / "train-00000.bin", parts[1], /*remove_if_empty=*/true);
  fuzz::write_bytes(dir / data::kTokenizerJsonName, parts[2], /*remove_if_empty=*/true);
  for (const data::WindowLayout layout :
       {data::WindowLayout::kStream, data::WindowLayout::kPacked, data::WindowLayout::kSingle}) {
    try {
      const data::TokenDataset dataset = data::TokenDataset::open(dir, "train");
      const data::Windows windows(dataset, kSeqLen, layout);
      data::BatchSampler sampler(windows, /*seed=*/1);
      std::vector<int32_t> inputs(kSeqLen), targets(kSeqLen);
      for (int64_t window_idx = 0; window_idx < std::min(sampler.num_windows(), kMaxWindows);
           ++window_idx) {
        sampler.next_batch(1, inputs.data(), targets.data());
      }
    } catch (const Error& error) {
      fuzz::rejected(error);
    }
  }
  try {
    const auto tokenizer = data::load_tokenizer(dir);
    const std::vector<int32_t> ids = tokenizer->encode("moeforge");
    tokenizer->decode(ids);
  } catch (const Error& error) {
    fuzz::rejected(error);
  }
  return 0;
}
