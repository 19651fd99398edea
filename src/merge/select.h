// Choosing the checkpoints of a training run to merge (PMA): the newest one up to a token count and
// the ones before it spaced a fixed number of tokens apart, from <run>/checkpoints/index.json.
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "io/checkpoint_index.h"

namespace moeforge::merge {

struct CheckpointSelection {
  int64_t count = 10;                   // N checkpoints
  int64_t interval_tokens = 0;          // V: tokens between consecutive ones (> 0 when N > 1)
  std::optional<int64_t> until_tokens;  // the last is the newest with tokens_seen <= this (default:
                                        // the newest checkpoint)
};

// The last checkpoint L is the newest entry with tokens_seen <= until (or the newest entry); the
// others are the entries with tokens_seen = L.tokens_seen - k * V for k = 1..N-1 (the newest such
// entry if several share a token count). Returns them oldest first, or nullopt when one of them is
// absent (the trainer polls with this). Throws on a count < 1 or an interval <= 0 with count > 1.
std::optional<std::vector<io::CheckpointEntry>> find_checkpoints(
    const std::vector<io::CheckpointEntry>& entries, const CheckpointSelection& selection);

// find_checkpoints on the run's index; throws when a checkpoint is absent, naming the token count
// it needs and listing the checkpoints the run has.
std::vector<io::CheckpointEntry> select_checkpoints(const std::filesystem::path& run_dir,
                                                    const CheckpointSelection& selection);

}  // namespace moeforge::merge
