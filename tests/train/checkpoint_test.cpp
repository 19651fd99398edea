// Cleanup of what interrupted checkpoint saves leave behind: staging folders and files of our
// naming and checkpoint folders the index does not list go, anything else stays; training removes
// them when it starts and resumes from the index as before.
#include "train/checkpoint.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <set>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "core/error.h"
#include "io/checkpoint_index.h"
#include "train/train_fixture.h"
#include "train/trainer.h"

namespace moeforge {
namespace {

// Options of a quiet run on the CPU, resuming from resume when it is not empty.
TrainRunOptions quiet_options(const std::filesystem::path& resume) {
  TrainRunOptions options;
  if (!resume.empty()) options.resume = resume;
  options.progress = false;
  return options;
}

namespace fs = std::filesystem;
using testing::TrainFixture;

// The names in a folder.
std::set<std::string> names_in(const fs::path& dir) {
  std::set<std::string> names;
  for (const fs::directory_entry& entry : fs::directory_iterator(dir)) {
    names.insert(entry.path().filename().string());
  }
  return names;
}

// A folder holding one file, standing in for a checkpoint.
void make_checkpoint_like(const fs::path& dir) {
  fs::create_directories(dir);
  std::ofstream(dir / "trainer_state.json") << "{}";
}

class CheckpointLeftoversTest : public ::testing::Test {
 protected:
  void SetUp() override {
    run_ = fs::path(::testing::TempDir()) /
           ("checkpoint-leftovers-" +
            std::string(::testing::UnitTest::GetInstance()->current_test_info()->name()));
    fs::remove_all(run_);
    checkpoints_ = run_ / "checkpoints";
    fs::create_directories(checkpoints_);
  }
  void TearDown() override { fs::remove_all(run_); }

  void write_index(const std::vector<int64_t>& steps) const {
    std::vector<io::CheckpointEntry> entries;
    for (const int64_t step : steps) {
      entries.push_back({step, step * 64, fs::absolute(checkpoint_dir_name(run_, step))});
    }
    io::write_checkpoint_index(run_, entries);
  }

  fs::path run_;
  fs::path checkpoints_;
};

TEST_F(CheckpointLeftoversTest, RemovesOnlyOurStagingAndUnlistedCheckpoints) {
  for (const char* name : {"step-00000002", "step-00000004"})
    make_checkpoint_like(checkpoints_ / name);
  write_index({2, 4});
  const std::vector<std::string> leftovers = {
      "index.json.tmp.4242",       // the index's temporary file
      "step-00000001",             // removed from the index, then the crash hit retention
      "step-00000005",             // renamed into place, then the crash hit before the index update
      "step-00000006.tmp-4242-0",  // a crash mid-save
      "step-00000004.tmp-4242-1",  // the previous version of step 4 while it was replaced
      "step-123456789.tmp-17-3",   // past 8 digits
  };
  for (const std::string& name : leftovers) {
    if (name.starts_with("index")) {
      std::ofstream(checkpoints_ / name) << "{}";
    } else {
      make_checkpoint_like(checkpoints_ / name);
    }
  }
  // Not ours by name, or not a checkpoint folder: they stay.
  const std::vector<std::string> foreign = {
      "notes.txt",          "step-3",        "step-0000007",   "step--0000001",
      "step-00000008.tmp",  "other.tmp-1-2", "index.json.bak", "index.json.tmp.x",
      "step-00000009.tmp-1"};
  for (const std::string& name : foreign) make_checkpoint_like(checkpoints_ / name);
  std::ofstream(checkpoints_ / "step-00000010") << "a file, not a checkpoint folder";

  std::vector<fs::path> expected;
  for (const std::string& name : leftovers) expected.push_back(checkpoints_ / name);
  std::sort(expected.begin(), expected.end());
  EXPECT_EQ(remove_checkpoint_leftovers(run_, {}), expected);

  std::set<std::string> remaining(foreign.begin(), foreign.end());
  remaining.insert({"index.json", "step-00000002", "step-00000004", "step-00000010"});
  EXPECT_EQ(names_in(checkpoints_), remaining);
  EXPECT_EQ(io::read_checkpoint_index(run_).size(), 2u);
  EXPECT_TRUE(remove_checkpoint_leftovers(run_, {}).empty());
}

TEST_F(CheckpointLeftoversTest, WithoutAnIndexEveryCheckpointFolderIsUnlisted) {
  // A crash between the first checkpoint's rename and the first index write.
  make_checkpoint_like(checkpoints_ / "step-00000001");
  EXPECT_EQ(remove_checkpoint_leftovers(run_, {}),
            std::vector<fs::path>{checkpoints_ / "step-00000001"});
  EXPECT_TRUE(names_in(checkpoints_).empty());
  fs::remove_all(run_);
  EXPECT_TRUE(remove_checkpoint_leftovers(run_, {}).empty());  // no run folder yet
}

TEST_F(CheckpointLeftoversTest, SparesTheCheckpointToResumeFrom) {
  write_index({2});
  make_checkpoint_like(checkpoints_ / "step-00000002");
  make_checkpoint_like(checkpoints_ / "step-00000003");
  make_checkpoint_like(checkpoints_ / "step-00000005");
  // Spelled with a trailing separator and a detour: the same folder.
  const fs::path keep = run_ / "checkpoints" / ".." / "checkpoints" / "step-00000003" / "";
  EXPECT_EQ(remove_checkpoint_leftovers(run_, keep),
            std::vector<fs::path>{checkpoints_ / "step-00000005"});
  EXPECT_TRUE(fs::exists(checkpoints_ / "step-00000003"));
}

TEST_F(CheckpointLeftoversTest, AnUnreadableIndexRemovesNothing) {
  make_checkpoint_like(checkpoints_ / "step-00000001");
  make_checkpoint_like(checkpoints_ / "step-00000002.tmp-1-0");
  std::ofstream(checkpoints_ / "index.json") << "not json";
  EXPECT_THROW(remove_checkpoint_leftovers(run_, {}), Error);
  EXPECT_EQ(names_in(checkpoints_),
            (std::set<std::string>{"index.json", "step-00000001", "step-00000002.tmp-1-0"}));
}

// The state a kill -9 leaves (tests/reliability/crash_resume_test.py makes it for real): training
// removes it when it starts and resumes from the newest indexed checkpoint.
TEST_F(TrainFixture, TrainingRemovesLeftoversOfInterruptedSavesWhenItStarts) {
  SelfCommunicator self;
  train(config(3), quiet_options({}), self);
  const fs::path checkpoints = root_ / "run" / "checkpoints";
  // step 6 renamed into place but not indexed; a half-written step 9.
  fs::copy(checkpoints / "step-00000003", checkpoints / "step-00000006");
  fs::copy(checkpoints / "step-00000003", checkpoints / "step-00000009.tmp-99999-0");

  ::testing::internal::CaptureStderr();
  train(config(6), quiet_options(root_ / "run"), self);
  const std::string log = ::testing::internal::GetCapturedStderr();
  EXPECT_NE(log.find("removed " + (checkpoints / "step-00000006").string() +
                     ", left by an interrupted checkpoint save"),
            std::string::npos)
      << log;
  EXPECT_NE(log.find("step-00000009.tmp-99999-0, left by"), std::string::npos) << log;
  EXPECT_NE(log.find("resumed from " + (checkpoints / "step-00000003").string() + " at step 3"),
            std::string::npos)
      << log;
  EXPECT_EQ(names_in(checkpoints),
            (std::set<std::string>{"index.json", "step-00000003", "step-00000006"}));
  const auto entries = io::read_checkpoint_index(root_ / "run");
  ASSERT_EQ(entries.size(), 2u);
  EXPECT_EQ(entries[1].step, 6);
}

}  // namespace
}  // namespace moeforge
