// Fuzz target: data::TokenShard::open on arbitrary file contents, then reading every token of what
// it accepted. moeforge::Error is the expected outcome for bad input; anything else is a finding.
#include <cstddef>
#include <cstdint>
#include <string_view>
#include <vector>

#include "core/error.h"
#include "data/token_shard.h"
#include "fuzz_input.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace moeforge;
  const auto path = fuzz::scratch_dir() / "input.bin";
  fuzz::write_bytes(path, std::string_view(reinterpret_cast<const char*>(data), size));
  try {
    const data::TokenShard shard = data::TokenShard::open(path);
    const uint64_t expected_bytes =
        data::kTokenShardHeaderBytes +
        static_cast<uint64_t>(shard.num_tokens()) * static_cast<uint64_t>(shard.token_bytes());
    if (expected_bytes != size) __builtin_trap();
    std::vector<int32_t> tokens(static_cast<size_t>(shard.num_tokens()));
    shard.read(0, shard.num_tokens(), tokens.data());
    for (const int32_t token : tokens) {
      if (token < 0 || token >= shard.vocab_size()) __builtin_trap();
    }
  } catch (const Error& error) {
    fuzz::rejected(error);
  }
  return 0;
}
