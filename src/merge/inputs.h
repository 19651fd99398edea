// Opening and validating the inputs of a merge before any work: paths (no input twice, output
// neither existing nor an input nor inside one), configs and tensor tables equal across inputs.
#pragma once

#include <nlohmann/json.hpp>

#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "io/model_weights.h"

namespace moeforge::merge {

struct InputModel {
  std::filesystem::path dir;        // as given
  std::filesystem::path canonical;  // absolute, symlinks resolved
  io::ModelWeights weights;
  std::optional<nlohmann::json> config;  // config.json, when the directory has one
};

// The output path without a trailing separator, checked against the (canonical) inputs: throws if
// it equals or lies inside an input, if it exists, or if an input is missing or given twice.
// Returns the output path to write.
std::filesystem::path check_paths(const std::vector<std::filesystem::path>& inputs,
                                  const std::filesystem::path& output);

// Opens every input (fully validated safetensors, shards and index) and reads its config.json.
std::vector<InputModel> open_inputs(const std::vector<std::filesystem::path>& inputs);

// config.json without the fields that may differ between checkpoints of one model: "torch_dtype",
// "dtype" and "transformers_version", at any depth.
nlohmann::json comparable_config(const nlohmann::json& config);

// Throws naming the first mismatch against the first input: config.json (presence, then the first
// differing field), tensor names (a tensor missing from or extra in an input), then per tensor its
// dtype and shape, a dtype that cannot be merged (F8), and non-floating tensors whose bytes differ
// (those are copied, not averaged).
void check_inputs_match(const std::vector<InputModel>& inputs);

// The tensors in the order of their files in `model` (index shard order, then data offset).
std::vector<std::string> file_order(const InputModel& model);

}  // namespace moeforge::merge
