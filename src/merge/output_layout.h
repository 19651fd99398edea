// The layout of a merge's output planned before any tensor is computed: every tensor's dtype,
// shape, shard file and byte offset, and each shard's header, so that worker threads can write
// tensors in any order at their final offsets.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "io/dtype.h"
#include "merge/inputs.h"

namespace moeforge::merge {

struct PlannedTensor {
  std::string name;
  std::vector<int64_t> shape;
  io::DType in_dtype = io::DType::kF32;
  io::DType out_dtype = io::DType::kF32;
  int64_t numel = 0;
  bool averaged = true;  // floating; otherwise copied from the newest input
  size_t shard_idx = 0;
  uint64_t file_offset = 0;  // of the tensor's first byte in its shard file
  uint64_t num_bytes = 0;    // in out_dtype
};

struct PlannedShard {
  std::string file_name;
  std::string prefix;  // u64 header length + the header JSON padded with spaces to 8 bytes
  uint64_t file_size = 0;
};

struct OutputLayout {
  std::vector<PlannedTensor> tensors;  // in file order
  std::vector<PlannedShard> shards;
  uint64_t total_tensor_bytes = 0;
  // model.safetensors.index.json when there is more than one shard, else empty.
  std::string index_json;
};

// Tensors in the newest input's file order; floating tensors become output_dtype when given;
// shards filled greedily up to max_shard_bytes of tensor data (a larger tensor gets a shard of its
// own), named model.safetensors or model-0000i-of-0000N.safetensors like io::write_model_weights.
OutputLayout plan_output(const std::vector<InputModel>& inputs,
                         std::optional<io::DType> output_dtype, uint64_t max_shard_bytes);

}  // namespace moeforge::merge
