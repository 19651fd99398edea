// Fuzz target: io::SafetensorsFile::open on arbitrary file contents, then every accessor on what
// it accepted. moeforge::Error is the expected outcome for bad input; anything else is a finding.
#include <cstddef>
#include <cstdint>
#include <string_view>
#include <vector>

#include "core/error.h"
#include "fuzz_input.h"
#include "io/safetensors.h"

namespace {

// Elements converted per tensor at most (the conversion itself is not what is fuzzed).
constexpr size_t kMaxConvertedElements = 1 << 16;

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace moeforge;
  const auto path = fuzz::scratch_dir() / "input.safetensors";
  fuzz::write_bytes(path, std::string_view(reinterpret_cast<const char*>(data), size));
  try {
    const io::SafetensorsFile file = io::SafetensorsFile::open(path);
    std::vector<float> values;
    for (const io::TensorInfo& info : file.tensors()) {
      if (file.find(info.name) != &info) __builtin_trap();
      const auto bytes = file.data(info);
      const auto numel = static_cast<uint64_t>(info.numel());
      if (bytes.size() != numel * io::dtype_size(info.dtype)) __builtin_trap();
      if (io::is_convertible_float(info.dtype) && numel <= kMaxConvertedElements) {
        values.resize(numel);
        io::convert_to_float(info.dtype, bytes.data(), values.data(), numel);
      }
    }
  } catch (const Error& error) {
    fuzz::rejected(error);
  }
  return 0;
}
