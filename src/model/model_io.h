// Hugging Face model directories: config.json plus model.safetensors (or shards with an index),
// tensors under exactly the HF names and layouts, so transformers loads our checkpoints and we load
// theirs.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>

#include "io/dtype.h"
#include "io/model_weights.h"
#include "model/model_config.h"
#include "model/parameters.h"
#include "model/transformer.h"

namespace moeforge {

// Writes config.json and the weights into dir (which must exist; callers stage it). dtype is the
// on-disk dtype (F32, BF16 or F16; conversion rounds to nearest even).
template <typename T>
void write_hf_model(const std::filesystem::path& dir, const ModelConfig& config,
                    const ParameterLayout& layout, const T* params, io::DType dtype,
                    uint64_t max_shard_bytes = io::kDefaultMaxShardBytes);

// Reads every tensor of the layout from the model directory into params (any float dtype on
// disk). Fails naming the tensor if one is missing or has another shape, and if the directory holds
// tensors this architecture does not have (a sign of a config/weights mismatch). A layout of a
// shard of the experts reads its own experts and skips the others'.
template <typename T>
void read_hf_weights(const std::filesystem::path& dir, const ParameterLayout& layout, T* params);

// A model loaded from a model or checkpoint directory: config.json + weights (float). ep must
// outlive the model.
std::unique_ptr<Transformer<float>> load_transformer(const std::filesystem::path& dir,
                                                     Communicator& ep);

}  // namespace moeforge
