// Opening and writing Hugging Face weight directories (single file or sharded with an index).
#include "io/model_weights.h"

#include "core/error.h"
#include "io/atomic_file.h"

#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <iterator>
#include <system_error>
#include <unordered_set>

namespace moeforge::io {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

json read_json_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  MF_CHECK(in.is_open(), "cannot open '{}': {}", path.string(), std::strerror(errno));
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  MF_CHECK(!in.bad(), "cannot read '{}': {}", path.string(), std::strerror(errno));
  try {
    return json::parse(text);
  } catch (const json::exception& e) {
    MF_FAIL("{}: not valid JSON: {}", path.string(), e.what());
  }
}

// weight_map of an index file, checked to be {tensor name: plain file name in the same folder}.
std::map<std::string, std::string> read_weight_map(const fs::path& index_path) {
  const json index = read_json_file(index_path);
  const std::string file = index_path.string();
  MF_CHECK(index.is_object() && index.contains("weight_map") && index["weight_map"].is_object(),
           "{}: expected an object with a \"weight_map\" object of tensor name -> shard file",
           file);
  std::map<std::string, std::string> weight_map;
  for (const auto& [name, shard] : index["weight_map"].items()) {
    MF_CHECK(shard.is_string(), "{}: weight_map entry '{}' must be a file name string, found {}",
             file, name, shard.dump());
    const std::string shard_file = shard.get<std::string>();
    MF_CHECK(!shard_file.empty() && shard_file != "." && shard_file != ".." &&
                 shard_file.find('/') == std::string::npos,
             "{}: weight_map entry '{}' names shard '{}', which is not a plain file name in the "
             "same folder",
             file, name, shard_file);
    weight_map.emplace(name, shard_file);
  }
  return weight_map;
}

std::string shape_string(const std::vector<int64_t>& shape) {
  return fmt::format("[{}]", fmt::join(shape, ", "));
}

}  // namespace

ModelWeights ModelWeights::open(const fs::path& dir) {
  MF_CHECK(fs::is_directory(dir), "model weights directory '{}' does not exist or is not a folder",
           dir.string());
  ModelWeights weights;
  weights.dir_ = dir;
  const fs::path index_path = dir / kWeightsIndexFile;
  const fs::path single_path = dir / kSingleWeightsFile;

  if (!fs::exists(index_path)) {
    MF_CHECK(fs::exists(single_path), "'{}' holds no model weights: looked for {} and {}",
             dir.string(), kWeightsIndexFile, kSingleWeightsFile);
    weights.shards_.push_back(SafetensorsFile::open(single_path));
    const std::vector<TensorInfo>& tensors = weights.shards_[0].tensors();
    for (size_t tensor_idx = 0; tensor_idx < tensors.size(); ++tensor_idx) {
      weights.locations_[tensors[tensor_idx].name] = {0, tensor_idx};
    }
    return weights;
  }

  const std::map<std::string, std::string> weight_map = read_weight_map(index_path);
  std::map<std::string, size_t> shard_idx_by_file;
  for (const auto& [name, shard_file] : weight_map) {
    if (shard_idx_by_file.count(shard_file) != 0) continue;
    const fs::path shard_path = dir / shard_file;
    // The name comes from the index file: the error_code form, so that a name the file system
    // rejects (too long, say) is reported like a missing file instead of throwing.
    std::error_code ec;
    const bool present = fs::exists(shard_path, ec);
    MF_CHECK(present && !ec, "{}: shard file '{}' (holding tensor '{}') is missing{}",
             index_path.string(), shard_path.string(), name, ec ? " (" + ec.message() + ")" : "");
    shard_idx_by_file.emplace(shard_file, weights.shards_.size());
    weights.shards_.push_back(SafetensorsFile::open(shard_path));
  }
  for (const auto& [name, shard_file] : weight_map) {
    const size_t shard_idx = shard_idx_by_file.at(shard_file);
    const SafetensorsFile& shard = weights.shards_[shard_idx];
    const TensorInfo* info = shard.find(name);
    MF_CHECK(info != nullptr, "{}: tensor '{}' is listed in shard '{}' but that file lacks it",
             index_path.string(), name, shard_file);
    weights.locations_[name] = {shard_idx, static_cast<size_t>(info - shard.tensors().data())};
  }
  for (const auto& [shard_file, shard_idx] : shard_idx_by_file) {
    for (const TensorInfo& info : weights.shards_[shard_idx].tensors()) {
      const auto it = weight_map.find(info.name);
      MF_CHECK(
          it != weight_map.end() && it->second == shard_file,
          "{}: tensor '{}' is not listed in {} for this shard{}",
          weights.shards_[shard_idx].path().string(), info.name, kWeightsIndexFile,
          it == weight_map.end() ? "" : fmt::format(" (the index puts it in '{}')", it->second));
    }
  }
  return weights;
}

std::vector<std::string> ModelWeights::names() const {
  std::vector<std::string> names;
  names.reserve(locations_.size());
  for (const auto& [name, location] : locations_) names.push_back(name);
  return names;
}

const ModelWeights::Location& ModelWeights::locate(const std::string& name) const {
  const auto it = locations_.find(name);
  MF_CHECK(it != locations_.end(),
           "tensor '{}' not found in the model weights at '{}' ({} tensors)", name, dir_.string(),
           locations_.size());
  return it->second;
}

const TensorInfo& ModelWeights::info(const std::string& name) const {
  const Location& location = locate(name);
  return shards_[location.shard_idx].tensors()[location.tensor_idx];
}

std::span<const std::byte> ModelWeights::data(const std::string& name) const {
  const Location& location = locate(name);
  const SafetensorsFile& shard = shards_[location.shard_idx];
  return shard.data(shard.tensors()[location.tensor_idx]);
}

std::span<const std::byte> ModelWeights::floating_data(const std::string& name,
                                                       size_t expected_numel) const {
  const TensorInfo& tensor = info(name);
  MF_CHECK(static_cast<uint64_t>(tensor.numel()) == expected_numel,
           "tensor '{}' in '{}' has shape {} ({} elements) but {} elements were expected", name,
           dir_.string(), shape_string(tensor.shape), tensor.numel(), expected_numel);
  MF_CHECK(is_convertible_float(tensor.dtype),
           "tensor '{}' in '{}' has dtype {}; only F32, BF16, F16 and F64 can be read as floating "
           "point",
           name, dir_.string(), dtype_name(tensor.dtype));
  return data(name);
}

void ModelWeights::read_as_float(const std::string& name, float* out, size_t expected_numel) const {
  const std::span<const std::byte> bytes = floating_data(name, expected_numel);
  convert_to_float(info(name).dtype, bytes.data(), out, expected_numel);
}

void ModelWeights::read_as_double(const std::string& name, double* out,
                                  size_t expected_numel) const {
  const std::span<const std::byte> bytes = floating_data(name, expected_numel);
  convert_to_double(info(name).dtype, bytes.data(), out, expected_numel);
}

void write_model_weights(const fs::path& dir, const std::vector<TensorView>& tensors,
                         const std::map<std::string, std::string>& metadata,
                         uint64_t max_shard_bytes) {
  MF_CHECK(fs::is_directory(dir), "cannot write model weights: '{}' is not an existing folder",
           dir.string());
  MF_CHECK(max_shard_bytes > 0, "max_shard_bytes must be positive");
  std::map<std::string, std::string> file_metadata = metadata;
  file_metadata.try_emplace("format", "pt");

  std::unordered_set<std::string> names;
  std::vector<std::vector<TensorView>> shards;
  uint64_t shard_bytes = 0;
  uint64_t total_bytes = 0;
  for (const TensorView& tensor : tensors) {
    MF_CHECK(names.insert(tensor.name).second,
             "cannot write model weights to '{}': duplicate "
             "tensor name '{}'",
             dir.string(), tensor.name);
    const uint64_t num_bytes = tensor.data.size();
    if (shards.empty() || (!shards.back().empty() && shard_bytes + num_bytes > max_shard_bytes)) {
      shards.emplace_back();
      shard_bytes = 0;
    }
    shards.back().push_back(tensor);
    shard_bytes += num_bytes;
    total_bytes += num_bytes;
  }

  if (shards.size() <= 1) {
    write_safetensors(dir / kSingleWeightsFile, tensors, file_metadata);
    return;
  }
  json weight_map = json::object();
  for (size_t shard_idx = 0; shard_idx < shards.size(); ++shard_idx) {
    const std::string shard_file =
        fmt::format("model-{:05d}-of-{:05d}.safetensors", shard_idx + 1, shards.size());
    write_safetensors(dir / shard_file, shards[shard_idx], file_metadata);
    for (const TensorView& tensor : shards[shard_idx]) weight_map[tensor.name] = shard_file;
  }
  const json index = {{"metadata", {{"total_size", total_bytes}}}, {"weight_map", weight_map}};
  const std::string text = index.dump(2) + "\n";
  write_file_atomic(dir / kWeightsIndexFile, std::as_bytes(std::span(text)));
}

}  // namespace moeforge::io
