// Selection of evenly spaced checkpoints from a run's checkpoint index (see select.h).
#include "merge/select.h"

#include <fmt/format.h>

#include "core/error.h"

namespace moeforge::merge {

namespace {

void check_selection(const CheckpointSelection& selection) {
  MF_CHECK(selection.count >= 1, "the number of checkpoints to merge must be >= 1, got {}",
           selection.count);
  MF_CHECK(selection.count == 1 || selection.interval_tokens > 0,
           "the interval between merged checkpoints must be > 0 tokens, got {}",
           selection.interval_tokens);
}

// The newest entry (highest step) with exactly `tokens` tokens seen.
const io::CheckpointEntry* find_at(const std::vector<io::CheckpointEntry>& entries,
                                   int64_t tokens) {
  const io::CheckpointEntry* found = nullptr;
  for (const io::CheckpointEntry& entry : entries) {
    if (entry.tokens_seen == tokens && (found == nullptr || entry.step > found->step)) {
      found = &entry;
    }
  }
  return found;
}

struct Resolved {
  std::vector<io::CheckpointEntry> checkpoints;  // oldest first, complete when nothing is missing
  std::optional<int64_t> last_tokens;            // empty: no entry <= until
  std::optional<int64_t> missing_tokens;         // the first token count without a checkpoint
};

Resolved resolve(const std::vector<io::CheckpointEntry>& entries,
                 const CheckpointSelection& selection) {
  check_selection(selection);
  Resolved resolved;
  const io::CheckpointEntry* last = nullptr;
  for (const io::CheckpointEntry& entry : entries) {
    if (selection.until_tokens && entry.tokens_seen > *selection.until_tokens) continue;
    if (last == nullptr || entry.tokens_seen > last->tokens_seen ||
        (entry.tokens_seen == last->tokens_seen && entry.step > last->step)) {
      last = &entry;
    }
  }
  if (last == nullptr) return resolved;
  resolved.last_tokens = last->tokens_seen;
  resolved.checkpoints.resize(static_cast<size_t>(selection.count));
  for (int64_t k = 0; k < selection.count; ++k) {
    const int64_t tokens = last->tokens_seen - k * selection.interval_tokens;
    const io::CheckpointEntry* entry = find_at(entries, tokens);
    if (entry == nullptr) {
      resolved.missing_tokens = tokens;
      return resolved;
    }
    resolved.checkpoints[static_cast<size_t>(selection.count - 1 - k)] = *entry;
  }
  return resolved;
}

std::string list_entries(const std::vector<io::CheckpointEntry>& entries) {
  std::string list;
  for (const io::CheckpointEntry& entry : entries) {
    list += fmt::format("\n  step {} tokens_seen {} ({})", entry.step, entry.tokens_seen,
                        entry.path.filename().string());
  }
  return list;
}

}  // namespace

std::optional<std::vector<io::CheckpointEntry>> find_checkpoints(
    const std::vector<io::CheckpointEntry>& entries, const CheckpointSelection& selection) {
  Resolved resolved = resolve(entries, selection);
  if (!resolved.last_tokens || resolved.missing_tokens) return std::nullopt;
  return std::move(resolved.checkpoints);
}

std::vector<io::CheckpointEntry> select_checkpoints(const std::filesystem::path& run_dir,
                                                    const CheckpointSelection& selection) {
  const std::vector<io::CheckpointEntry> entries = io::read_checkpoint_index(run_dir);
  MF_CHECK(!entries.empty(), "run '{}' has no checkpoints (no entries in {})", run_dir.string(),
           (run_dir / "checkpoints" / "index.json").string());
  Resolved resolved = resolve(entries, selection);
  const std::string wanted = fmt::format("{} checkpoint(s) spaced {} tokens apart", selection.count,
                                         selection.interval_tokens);
  MF_CHECK(resolved.last_tokens.has_value(),
           "run '{}' has no checkpoint with tokens_seen <= {} (wanted {}); its checkpoints:{}",
           run_dir.string(), selection.until_tokens.value_or(0), wanted, list_entries(entries));
  MF_CHECK(!resolved.missing_tokens.has_value(),
           "run '{}' has no checkpoint at tokens_seen = {}, needed for {} ending at tokens_seen "
           "= {}; its checkpoints:{}",
           run_dir.string(), resolved.missing_tokens.value_or(0), wanted, *resolved.last_tokens,
           list_entries(entries));
  return std::move(resolved.checkpoints);
}

}  // namespace moeforge::merge
