// Hugging Face model weight directories: a single model.safetensors, or shards
// model-0000i-of-0000N.safetensors listed in model.safetensors.index.json.
#pragma once

#include "io/safetensors.h"

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <map>
#include <span>
#include <string>
#include <vector>

namespace moeforge::io {

constexpr const char* kSingleWeightsFile = "model.safetensors";
constexpr const char* kWeightsIndexFile = "model.safetensors.index.json";
constexpr uint64_t kDefaultMaxShardBytes = 5'000'000'000;

class ModelWeights {
 public:
  // Reads the index's weight_map and opens each shard once, or opens model.safetensors when there
  // is no index. Fails on a missing shard, a tensor of the index absent from its shard, and a
  // tensor of a shard that the index does not list there.
  static ModelWeights open(const std::filesystem::path& dir);

  // Sorted.
  std::vector<std::string> names() const;
  bool contains(const std::string& name) const { return locations_.count(name) != 0; }
  // Throws naming the tensor and the directory if absent.
  const TensorInfo& info(const std::string& name) const;
  std::span<const std::byte> data(const std::string& name) const;
  // Converts from F32/BF16/F16/F64 into out[expected_numel]; throws if the tensor's element count
  // differs (naming the found shape) or its dtype is not floating.
  void read_as_float(const std::string& name, float* out, size_t expected_numel) const;
  void read_as_double(const std::string& name, double* out, size_t expected_numel) const;
  const std::filesystem::path& dir() const { return dir_; }

 private:
  struct Location {
    size_t shard_idx = 0;
    size_t tensor_idx = 0;  // in shards_[shard_idx].tensors()
  };
  const Location& locate(const std::string& name) const;
  // The tensor's bytes after checking its numel and that it is floating.
  std::span<const std::byte> floating_data(const std::string& name, size_t expected_numel) const;

  std::filesystem::path dir_;
  std::vector<SafetensorsFile> shards_;
  std::map<std::string, Location> locations_;
};

// Writes tensors into the existing directory dir: model.safetensors when everything fits in
// max_shard_bytes, else model-0000i-of-0000N.safetensors shards filled greedily in the given
// order (a tensor larger than the limit gets a shard of its own) plus model.safetensors.index.json
// = {"metadata": {"total_size": bytes}, "weight_map": {name: file}}. Every file carries metadata,
// with "format": "pt" added unless the caller set "format". Each file is written atomically.
void write_model_weights(const std::filesystem::path& dir, const std::vector<TensorView>& tensors,
                         const std::map<std::string, std::string>& metadata,
                         uint64_t max_shard_bytes = kDefaultMaxShardBytes);

}  // namespace moeforge::io
