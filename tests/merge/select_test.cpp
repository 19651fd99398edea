// Tests of picking evenly spaced checkpoints from a run's index: spacing, --until, the newest of
// equal token counts, and clear errors for missing checkpoints and bad arguments.
#include "merge/select.h"

#include <gtest/gtest.h>

#include "io/io_test_util.h"

namespace moeforge::merge {
namespace {

using io::testing::expect_error;
using io::testing::ScratchDir;

// A run whose checkpoints sit at steps 10, 20, ..., 100 with 100 tokens per step.
std::vector<io::CheckpointEntry> write_run(const std::filesystem::path& run_dir) {
  std::vector<io::CheckpointEntry> entries;
  for (int64_t step = 10; step <= 100; step += 10) {
    entries.push_back(
        {step, 100 * step, run_dir / "checkpoints" / fmt::format("step-{:08d}", step)});
  }
  std::filesystem::create_directories(run_dir / "checkpoints");
  io::write_checkpoint_index(run_dir, entries);
  return entries;
}

std::vector<int64_t> tokens_of(const std::vector<io::CheckpointEntry>& entries) {
  std::vector<int64_t> tokens;
  for (const io::CheckpointEntry& entry : entries) tokens.push_back(entry.tokens_seen);
  return tokens;
}

TEST(SelectCheckpoints, LastNSpacedOldestFirst) {
  ScratchDir scratch;
  write_run(scratch.path());
  const auto selected = select_checkpoints(scratch.path(), {3, 2000, std::nullopt});
  EXPECT_EQ(tokens_of(selected), (std::vector<int64_t>{6000, 8000, 10000}));
  EXPECT_EQ(selected.back().step, 100);
  EXPECT_EQ(selected.front().path.filename(), "step-00000060");
  EXPECT_EQ(tokens_of(select_checkpoints(scratch.path(), {10, 1000, std::nullopt})),
            (std::vector<int64_t>{1000, 2000, 3000, 4000, 5000, 6000, 7000, 8000, 9000, 10000}));
  EXPECT_EQ(tokens_of(select_checkpoints(scratch.path(), {1, 0, std::nullopt})),
            (std::vector<int64_t>{10000}));
}

TEST(SelectCheckpoints, UntilPicksTheNewestAtOrBelow) {
  ScratchDir scratch;
  write_run(scratch.path());
  EXPECT_EQ(tokens_of(select_checkpoints(scratch.path(), {3, 2000, 7500})),
            (std::vector<int64_t>{3000, 5000, 7000}));
  EXPECT_EQ(tokens_of(select_checkpoints(scratch.path(), {2, 1000, 7000})),
            (std::vector<int64_t>{6000, 7000}));
  expect_error(
      [&] {
        select_checkpoints(scratch.path(), {2, 1000, 500});
      },
      {"no checkpoint with tokens_seen <= 500", "tokens_seen 1000"});
}

TEST(SelectCheckpoints, MissingCheckpointNamesTheTokenCountAndListsTheRun) {
  ScratchDir scratch;
  write_run(scratch.path());
  expect_error(
      [&] {
        select_checkpoints(scratch.path(), {3, 1500, std::nullopt});
      },
      {"no checkpoint at tokens_seen = 8500", "3 checkpoint(s) spaced 1500 tokens apart",
       "ending at tokens_seen = 10000", "step 10 tokens_seen 1000 (step-00000010)",
       "step 100 tokens_seen 10000"});
  // More than the run holds: the token count goes below the first checkpoint.
  expect_error(
      [&] {
        select_checkpoints(scratch.path(), {11, 1000, std::nullopt});
      },
      {"no checkpoint at tokens_seen = 0"});
}

TEST(SelectCheckpoints, FindReturnsNothingWhenIncomplete) {
  ScratchDir scratch;
  const std::vector<io::CheckpointEntry> entries = write_run(scratch.path());
  EXPECT_FALSE(find_checkpoints(entries, {3, 1500, std::nullopt}).has_value());
  EXPECT_FALSE(find_checkpoints({}, {1, 0, std::nullopt}).has_value());
  EXPECT_FALSE(find_checkpoints(entries, {4, 3000, 9999}).has_value());  // needs tokens 0
  const auto found = find_checkpoints(entries, {3, 3000, 9999});
  ASSERT_TRUE(found.has_value());
  EXPECT_EQ(tokens_of(*found), (std::vector<int64_t>{3000, 6000, 9000}));
}

TEST(SelectCheckpoints, NewestOfEqualTokenCounts) {
  std::vector<io::CheckpointEntry> entries = {{10, 1000, "a"}, {11, 1000, "b"}, {20, 2000, "c"}};
  const auto found = find_checkpoints(entries, {2, 1000, std::nullopt});
  ASSERT_TRUE(found.has_value());
  EXPECT_EQ((*found)[0].path, "b");
  EXPECT_EQ((*found)[1].path, "c");
}

TEST(SelectCheckpoints, RejectsBadArguments) {
  ScratchDir scratch;
  expect_error(
      [&] {
        select_checkpoints(scratch.path(), {3, 1000, std::nullopt});
      },
      {"has no checkpoints"});
  write_run(scratch.path());
  expect_error(
      [&] {
        select_checkpoints(scratch.path(), {0, 1000, std::nullopt});
      },
      {"must be >= 1, got 0"});
  expect_error(
      [&] {
        select_checkpoints(scratch.path(), {2, 0, std::nullopt});
      },
      {"interval", "> 0 tokens, got 0"});
}

}  // namespace
}  // namespace moeforge::merge
