// The index of a training run's checkpoints, <run>/checkpoints/index.json: every kept checkpoint
// with its step and the tokens seen when it was saved, oldest first. The trainer writes it;
// merging (PMA) reads it to pick checkpoints spaced a number of tokens apart.
#pragma once

#include <cstdint>
#include <filesystem>
#include <vector>

namespace moeforge::io {

inline constexpr int kCheckpointIndexFormatVersion = 1;

struct CheckpointEntry {
  int64_t step = 0;
  int64_t tokens_seen = 0;
  std::filesystem::path path;  // absolute
};

// The checkpoints of a run, oldest first (empty if it has no index yet).
std::vector<CheckpointEntry> read_checkpoint_index(const std::filesystem::path& run_dir);

// Replaces the index atomically; entries must be sorted by step and live in <run>/checkpoints.
void write_checkpoint_index(const std::filesystem::path& run_dir,
                            const std::vector<CheckpointEntry>& entries);

}  // namespace moeforge::io
