// Tests of atomic file writing and staged directories: no partial results are left visible, and
// failures name the path.
#include "io/atomic_file.h"

#include "io/io_test_util.h"

#include <gtest/gtest.h>

namespace moeforge::io {
namespace {

using testing::expect_error;
using testing::list_dir;
using testing::read_bytes;
using testing::ScratchDir;
using testing::write_bytes;

std::span<const std::byte> bytes_of(const std::string& text) {
  return std::as_bytes(std::span(text));
}

TEST(WriteFileAtomic, WritesAndReplacesWithoutLeftovers) {
  ScratchDir dir;
  const std::filesystem::path path = dir / "state.json";
  write_file_atomic(path, bytes_of("first"));
  EXPECT_EQ(read_bytes(path), "first");
  write_file_atomic(path, bytes_of("second, longer"));
  EXPECT_EQ(read_bytes(path), "second, longer");
  write_file_atomic(dir / "empty", std::span<const std::byte>());
  EXPECT_EQ(read_bytes(dir / "empty"), "");
  EXPECT_EQ(list_dir(dir.path()), (std::vector<std::string>{"empty", "state.json"}));
}

TEST(WriteFileAtomic, UnwritableLocationThrowsNamingThePath) {
  ScratchDir dir;
  write_bytes(dir / "plain_file", "x");
  const std::filesystem::path path = dir / "plain_file" / "out.bin";
  expect_error([&] { write_file_atomic(path, bytes_of("data")); },
               {path.string(), "Not a directory"});
  EXPECT_EQ(read_bytes(dir / "plain_file"), "x");
}

TEST(AtomicFileWriter, UncommittedWriteLeavesOldContent) {
  ScratchDir dir;
  const std::filesystem::path path = dir / "weights.bin";
  write_file_atomic(path, bytes_of("old"));
  {
    AtomicFileWriter writer(path);
    writer.write(bytes_of("new but abandoned"));
    EXPECT_EQ(list_dir(dir.path()).size(), 2u) << "temporary file next to the target";
  }
  EXPECT_EQ(read_bytes(path), "old");
  EXPECT_EQ(list_dir(dir.path()), std::vector<std::string>{"weights.bin"});
  AtomicFileWriter writer(path);
  writer.write(bytes_of("part one, "));
  writer.write(bytes_of("part two"));
  writer.commit();
  EXPECT_EQ(read_bytes(path), "part one, part two");
  expect_error([&] { writer.commit(); }, {"weights.bin", "twice"});
}

TEST(StagedDirectory, UncommittedStagingIsRemoved) {
  ScratchDir dir;
  const std::filesystem::path final_path = dir / "checkpoints" / "step-100";
  {
    StagedDirectory staged(final_path);
    EXPECT_TRUE(std::filesystem::is_directory(staged.staging_path()));
    EXPECT_EQ(staged.staging_path().parent_path(), final_path.parent_path());
    EXPECT_TRUE(is_staging_name(staged.staging_path().filename().string()));
    write_bytes(staged.staging_path() / "a.bin", "abc");
    std::filesystem::create_directories(staged.staging_path() / "sub");
    write_bytes(staged.staging_path() / "sub" / "b.bin", "def");
  }
  EXPECT_TRUE(list_dir(dir / "checkpoints").empty());
  EXPECT_FALSE(std::filesystem::exists(final_path));
}

TEST(StagedDirectory, CommitCreatesTheFinalDirectory) {
  ScratchDir dir;
  const std::filesystem::path final_path = dir / "step-1";
  StagedDirectory staged(final_path);
  write_bytes(staged.staging_path() / "a.bin", "abc");
  std::filesystem::create_directories(staged.staging_path() / "sub");
  write_bytes(staged.staging_path() / "sub" / "b.bin", "def");
  staged.commit();
  EXPECT_TRUE(staged.committed());
  EXPECT_EQ(read_bytes(final_path / "a.bin"), "abc");
  EXPECT_EQ(read_bytes(final_path / "sub" / "b.bin"), "def");
  EXPECT_EQ(list_dir(dir.path()), std::vector<std::string>{"step-1"});
}

TEST(StagedDirectory, CommitWithoutReplaceRefusesAnExistingDirectory) {
  ScratchDir dir;
  const std::filesystem::path final_path = dir / "out";
  std::filesystem::create_directories(final_path);
  write_bytes(final_path / "old.txt", "old");
  {
    StagedDirectory staged(final_path);
    write_bytes(staged.staging_path() / "new.txt", "new");
    expect_error([&] { staged.commit(); }, {final_path.string(), "already exists", "replace"});
  }
  EXPECT_EQ(list_dir(final_path), std::vector<std::string>{"old.txt"});
  EXPECT_EQ(list_dir(dir.path()), std::vector<std::string>{"out"});
}

TEST(StagedDirectory, CommitReplaceSwapsInTheNewDirectory) {
  ScratchDir dir;
  const std::filesystem::path final_path = dir / "out";
  std::filesystem::create_directories(final_path / "nested");
  write_bytes(final_path / "old.txt", "old");
  write_bytes(final_path / "nested" / "old2.txt", "old2");
  StagedDirectory staged(final_path);
  write_bytes(staged.staging_path() / "new.txt", "new");
  staged.commit(/*replace=*/true);
  EXPECT_EQ(list_dir(final_path), std::vector<std::string>{"new.txt"});
  EXPECT_EQ(read_bytes(final_path / "new.txt"), "new");
  EXPECT_EQ(list_dir(dir.path()), std::vector<std::string>{"out"}) << "old version removed";
}

TEST(StagedDirectory, EachStagingNameIsUnique) {
  ScratchDir dir;
  StagedDirectory first(dir / "x");
  StagedDirectory second(dir / "x");
  EXPECT_NE(first.staging_path(), second.staging_path());
  first.commit();
  expect_error([&] { second.commit(); }, {"already exists"});
}

TEST(StagingName, RecognisesLeftoversOnly) {
  EXPECT_TRUE(is_staging_name("step-00100.tmp-1234-0"));
  EXPECT_TRUE(is_staging_name("model.safetensors.tmp.98765"));
  EXPECT_TRUE(is_staging_name("a.tmp-1-22"));
  EXPECT_FALSE(is_staging_name("step-00100"));
  EXPECT_FALSE(is_staging_name("model.safetensors"));
  EXPECT_FALSE(is_staging_name("notes.tmp"));
  EXPECT_FALSE(is_staging_name("x.tmp-12"));
  EXPECT_FALSE(is_staging_name("x.tmp-a-1"));
  EXPECT_FALSE(is_staging_name("x.tmp-1-"));
  EXPECT_FALSE(is_staging_name("x.tmp.12a"));
  EXPECT_FALSE(is_staging_name(".tmp-1-2"));
}

TEST(FsyncDirectory, MissingDirectoryThrowsNamingIt) {
  ScratchDir dir;
  expect_error([&] { fsync_directory(dir / "absent"); }, {"absent", "No such file"});
}

}  // namespace
}  // namespace moeforge::io
