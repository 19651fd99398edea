// Fuzz target: io::ModelWeights::open on a folder with a fuzzed model.safetensors.index.json and
// two fuzzed shards (input: index, shard 1, shard 2, separated by fuzz::kFileSeparator; an empty
// index means a single model.safetensors), then reading every tensor it accepted as floats.
#include <cstddef>
#include <cstdint>
#include <vector>

#include "core/error.h"
#include "fuzz_input.h"
#include "io/model_weights.h"

namespace {

constexpr size_t kMaxConvertedElements = 1 << 16;

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace moeforge;
  const auto dir = fuzz::scratch_dir() / "weights";
  const auto parts = fuzz::split_files(data, size, 3);
  const bool sharded = !parts[0].empty();
  fuzz::write_bytes(dir / io::kWeightsIndexFile, parts[0], /*remove_if_empty=*/true);
  fuzz::write_bytes(dir / (sharded ? "model-00001-of-00002.safetensors" : io::kSingleWeightsFile),
                    parts[1]);
  fuzz::write_bytes(dir / "model-00002-of-00002.safetensors", parts[2]);
  try {
    const io::ModelWeights weights = io::ModelWeights::open(dir);
    std::vector<float> values;
    for (const std::string& name : weights.names()) {
      const io::TensorInfo& info = weights.info(name);
      if (info.name != name) __builtin_trap();
      const auto numel = static_cast<size_t>(info.numel());
      if (weights.data(name).size() != numel * io::dtype_size(info.dtype)) __builtin_trap();
      if (numel > kMaxConvertedElements) continue;
      values.resize(numel);
      // Floating tensors must convert; the others must be refused with an Error.
      bool converted = false;
      try {
        weights.read_as_float(name, values.data(), numel);
        converted = true;
      } catch (const Error&) {
      }
      if (converted != io::is_convertible_float(info.dtype)) __builtin_trap();
    }
  } catch (const Error& error) {
    fuzz::rejected(error);
  }
  return 0;
}
