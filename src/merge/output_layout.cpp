// Planning of a merge's output files (see output_layout.h).
#include "merge/output_layout.h"

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <cstring>

#include "core/error.h"

namespace moeforge::merge {

namespace {

std::string header_prefix(const std::vector<PlannedTensor>& tensors,
                          const std::vector<size_t>& tensor_idxs) {
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  header["__metadata__"] = {{"format", "pt"}};
  uint64_t offset = 0;
  for (const size_t tensor_idx : tensor_idxs) {
    const PlannedTensor& tensor = tensors[tensor_idx];
    header[tensor.name] = {{"dtype", io::dtype_name(tensor.out_dtype)},
                           {"shape", tensor.shape},
                           {"data_offsets", {offset, offset + tensor.num_bytes}}};
    offset += tensor.num_bytes;
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  const uint64_t header_size = text.size();
  std::string prefix(8, '\0');
  std::memcpy(prefix.data(), &header_size, 8);  // little-endian host (static_assert in io)
  return prefix + text;
}

}  // namespace

OutputLayout plan_output(const std::vector<InputModel>& inputs,
                         std::optional<io::DType> output_dtype, uint64_t max_shard_bytes) {
  MF_CHECK(!inputs.empty(), "nothing to merge: no inputs");
  MF_CHECK(max_shard_bytes > 0, "max_shard_bytes must be positive");
  MF_CHECK(!output_dtype || io::is_convertible_float(*output_dtype),
           "output dtype {} is not supported: choose F32, BF16, F16 or F64",
           io::dtype_name(*output_dtype));
  const InputModel& newest = inputs.back();
  OutputLayout layout;
  std::vector<std::vector<size_t>> shard_tensors;
  uint64_t shard_bytes = 0;
  for (const std::string& name : file_order(newest)) {
    const io::TensorInfo& info = newest.weights.info(name);
    PlannedTensor tensor;
    tensor.name = name;
    tensor.shape = info.shape;
    tensor.in_dtype = info.dtype;
    tensor.averaged = io::is_convertible_float(info.dtype);
    tensor.out_dtype = tensor.averaged && output_dtype ? *output_dtype : info.dtype;
    tensor.numel = info.numel();
    tensor.num_bytes = static_cast<uint64_t>(tensor.numel) * io::dtype_size(tensor.out_dtype);
    if (shard_tensors.empty() ||
        (!shard_tensors.back().empty() && shard_bytes + tensor.num_bytes > max_shard_bytes)) {
      shard_tensors.emplace_back();
      shard_bytes = 0;
    }
    tensor.shard_idx = shard_tensors.size() - 1;
    shard_tensors.back().push_back(layout.tensors.size());
    shard_bytes += tensor.num_bytes;
    layout.total_tensor_bytes += tensor.num_bytes;
    layout.tensors.push_back(std::move(tensor));
  }
  if (shard_tensors.empty()) shard_tensors.emplace_back();

  const size_t num_shards = shard_tensors.size();
  nlohmann::json weight_map = nlohmann::json::object();
  for (size_t shard_idx = 0; shard_idx < num_shards; ++shard_idx) {
    PlannedShard shard;
    shard.file_name = num_shards == 1 ? std::string(io::kSingleWeightsFile)
                                      : fmt::format("model-{:05d}-of-{:05d}.safetensors",
                                                    shard_idx + 1, num_shards);
    shard.prefix = header_prefix(layout.tensors, shard_tensors[shard_idx]);
    uint64_t offset = shard.prefix.size();
    for (const size_t tensor_idx : shard_tensors[shard_idx]) {
      PlannedTensor& tensor = layout.tensors[tensor_idx];
      tensor.file_offset = offset;
      offset += tensor.num_bytes;
      weight_map[tensor.name] = shard.file_name;
    }
    shard.file_size = offset;
    layout.shards.push_back(std::move(shard));
  }
  if (num_shards > 1) {
    const nlohmann::json index = {{"metadata", {{"total_size", layout.total_tensor_bytes}}},
                                  {"weight_map", weight_map}};
    layout.index_json = index.dump(2) + "\n";
  }
  return layout;
}

}  // namespace moeforge::merge
