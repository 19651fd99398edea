// Training checkpoints. A run directory holds
//   checkpoints/step-00000100/  config.json, model.safetensors (fp32, HF names; shards + index past
//                               5 GB), optimizer.safetensors (exp_avg.<name>, exp_avg_sq.<name>),
//                               trainer_state.json, train_config.json, tokenizer files
//   checkpoints/index.json      every kept checkpoint with its step and tokens seen (merging uses
//   it)
// Each checkpoint is written into a staging directory, fsynced and renamed, so a crash mid-save
// never damages the last good checkpoint; the index is replaced atomically afterwards.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <filesystem>
#include <functional>
#include <vector>

#include "io/checkpoint_index.h"
#include "model/transformer.h"
#include "train/adamw.h"

namespace moeforge {

inline constexpr int kCheckpointFormatVersion = 1;

struct TrainerState {
  int64_t step = 0;         // optimizer steps completed
  int64_t tokens_seen = 0;  // global tokens consumed by training
  double lr = 0.0;          // learning rate of the last step
  nlohmann::json loader;    // data loader state (epoch, position)
  uint64_t init_seed = 0;
  uint64_t data_seed = 0;
};

// AdamW's state as a checkpoint writes and reads it: the moments of the flat parameter range
// [begin, end) of the model's layout (all of it without ZeRO; one data-parallel rank's shard with
// ZeRO-1, train/zero_optimizer.h) and the step count. The file always holds whole tensors in layout
// order, so it does not depend on how the state was sharded.
struct AdamWStateRange {
  int64_t begin = 0;
  int64_t end = 0;
  float* exp_avg = nullptr;     // [end - begin]
  float* exp_avg_sq = nullptr;  // [end - begin]
  int64_t step_count = 0;
};

// The whole state of optimizer as a range.
AdamWStateRange full_state_range(AdamW& optimizer);

std::filesystem::path checkpoint_dir_name(const std::filesystem::path& run_dir, int64_t step);

// Saves a checkpoint, updates the index and removes the oldest beyond keep_last (0 keeps all),
// except those for which `keep` returns true (PMA keeps the checkpoints it will merge).
// tokenizer_dir: folder whose tokenizer files are copied along (may be empty).
std::filesystem::path save_checkpoint(
    const std::filesystem::path& run_dir, const Transformer<float>& model, AdamW& optimizer,
    const TrainerState& state, const nlohmann::json& train_config,
    const std::filesystem::path& tokenizer_dir, int64_t keep_last,
    const std::function<bool(const io::CheckpointEntry&)>& keep = {});
// The same from an optimizer state that must span the whole layout (ZeRO-1 gathers it to rank 0
// first).
std::filesystem::path save_checkpoint(
    const std::filesystem::path& run_dir, const Transformer<float>& model,
    const AdamWStateRange& optimizer, const TrainerState& state, const nlohmann::json& train_config,
    const std::filesystem::path& tokenizer_dir, int64_t keep_last,
    const std::function<bool(const io::CheckpointEntry&)>& keep = {});
// The same from the whole model's buffers: params and the optimizer state in the order of layout,
// which must hold every expert (a model with sharded experts gathers them first,
// train/expert_shards.h).
std::filesystem::path save_checkpoint(
    const std::filesystem::path& run_dir, const ParameterLayout& layout, const float* params,
    const AdamWStateRange& optimizer, const TrainerState& state, const nlohmann::json& train_config,
    const std::filesystem::path& tokenizer_dir, int64_t keep_last,
    const std::function<bool(const io::CheckpointEntry&)>& keep = {});

// Restores parameters, optimizer moments and trainer state; the model's architecture must match
// the checkpoint's config.json (checked field by field through the parameter layout). A model
// with sharded experts reads its own tensors (and their moments) only.
TrainerState load_checkpoint(const std::filesystem::path& checkpoint_dir, Transformer<float>& model,
                             AdamW& optimizer);
// The same, reading only the moments of optimizer's range (a ZeRO-1 rank's shard) and setting its
// step_count.
TrainerState load_checkpoint(const std::filesystem::path& checkpoint_dir, Transformer<float>& model,
                             AdamWStateRange& optimizer);

// Removes what interrupted saves left in <run_dir>/checkpoints, all of it named as this file writes
// it: staging folders and files of checkpoints and of the index (`step-00000100.tmp-<pid>-<k>`,
// `index.json.tmp.<pid>`), and checkpoint folders that the index does not list (a crash between a
// checkpoint's rename and the index update, or between the index update and retention's removals).
// `keep` (e.g. the checkpoint given to --resume; may be empty) is never removed. Call it before
// training starts, on one rank. Returns the removed paths, sorted.
std::vector<std::filesystem::path> remove_checkpoint_leftovers(const std::filesystem::path& run_dir,
                                                               const std::filesystem::path& keep);

// A checkpoint directory given itself or its run directory (then the newest checkpoint).
std::filesystem::path resolve_checkpoint(const std::filesystem::path& dir_or_run);

// Tokenizer files that travel with datasets and checkpoints.
void copy_tokenizer_files(const std::filesystem::path& from, const std::filesystem::path& to);

}  // namespace moeforge
