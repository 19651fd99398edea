// Helpers of the merge tests: small model directories (config.json, weights, companion files,
// trainer state) with seeded values, and checks that a failed merge left nothing behind.
#pragma once

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "core/rng.h"
#include "io/atomic_file.h"
#include "io/io_test_util.h"
#include "io/model_weights.h"

namespace moeforge::merge::testing {

struct TensorSpec {
  std::string name;
  io::DType dtype;
  std::vector<int64_t> shape;
};

struct OwnedTensor {
  std::string name;
  io::DType dtype;
  std::vector<int64_t> shape;
  std::vector<std::byte> data;
};

// Floating tensors hold seeded normal values (std 0.5, some exact zeros and negative zeros);
// integer tensors a pattern that does not depend on the seed.
inline std::vector<OwnedTensor> make_tensors(const std::vector<TensorSpec>& specs, uint64_t seed) {
  Rng rng(seed);
  std::vector<OwnedTensor> tensors;
  for (const TensorSpec& spec : specs) {
    int64_t numel = 1;
    for (const int64_t dim : spec.shape) numel *= dim;
    OwnedTensor t{spec.name, spec.dtype, spec.shape,
                  std::vector<std::byte>(static_cast<size_t>(numel) * io::dtype_size(spec.dtype))};
    if (io::is_convertible_float(spec.dtype)) {
      std::vector<float> values(static_cast<size_t>(numel));
      for (size_t i = 0; i < values.size(); ++i) {
        values[i] = i % 97 == 5 ? 0.0f : i % 97 == 7 ? -0.0f : 0.5f * rng.normal();
      }
      io::convert_from_float(spec.dtype, values.data(), t.data.data(), values.size());
    } else {
      for (size_t i = 0; i < t.data.size(); ++i) t.data[i] = static_cast<std::byte>(i * 13 + 1);
    }
    tensors.push_back(std::move(t));
  }
  return tensors;
}

inline nlohmann::json tiny_config() {
  return {{"architectures", {"MixtralForCausalLM"}},
          {"model_type", "mixtral"},
          {"hidden_size", 8},
          {"num_hidden_layers", 1},
          {"torch_dtype", "float32"},
          {"transformers_version", "4.44.0"}};
}

// Writes config.json, the weights (sharded above max_shard_bytes), a tokenizer file and, when
// step >= 0, a trainer_state.json with step and tokens_seen = 1000 * step.
inline void write_model(const std::filesystem::path& dir, const std::vector<OwnedTensor>& tensors,
                        const nlohmann::json& config = tiny_config(), int64_t step = -1,
                        uint64_t max_shard_bytes = io::kDefaultMaxShardBytes) {
  std::filesystem::create_directories(dir);
  io::write_file_atomic(dir / "config.json", config.dump(2) + "\n");
  io::write_file_atomic(dir / "tokenizer.json",
                        std::string("{\"tokenizer\": \"") + dir.filename().string() + "\"}\n");
  if (step >= 0) {
    const nlohmann::json state = {
        {"format_version", 1}, {"step", step}, {"tokens_seen", 1000 * step}};
    io::write_file_atomic(dir / "trainer_state.json", state.dump());
  }
  std::vector<io::TensorView> views;
  for (const OwnedTensor& t : tensors) views.push_back({t.name, t.dtype, t.shape, t.data});
  io::write_model_weights(dir, views, {}, max_shard_bytes);
}

// The names in a folder that look like leftovers of crashed or failed writers.
inline std::vector<std::string> staging_leftovers(const std::filesystem::path& dir) {
  std::vector<std::string> leftovers;
  for (const std::string& name : io::testing::list_dir(dir)) {
    if (io::is_staging_name(name)) leftovers.push_back(name);
  }
  return leftovers;
}

// Every tensor's bytes of a model directory, by name.
inline std::vector<std::pair<std::string, std::vector<std::byte>>> read_all(
    const std::filesystem::path& dir) {
  const io::ModelWeights weights = io::ModelWeights::open(dir);
  std::vector<std::pair<std::string, std::vector<std::byte>>> all;
  for (const std::string& name : weights.names()) {
    const std::span<const std::byte> data = weights.data(name);
    all.emplace_back(name, std::vector<std::byte>(data.begin(), data.end()));
  }
  return all;
}

}  // namespace moeforge::merge::testing
