// Crash-safe writing: a file or a whole directory is written under a temporary name next to its
// final path, fsynced, then renamed into place, so readers see either the old or the new version.
#pragma once

#include <cstddef>
#include <filesystem>
#include <span>
#include <string>
#include <string_view>

namespace moeforge::io {

// fsync of a directory, so that renames and creations inside it are durable.
void fsync_directory(const std::filesystem::path& dir);

// Streams a file to `<path>.tmp.<pid>` in the same folder; commit() fsyncs it, renames it to path
// and fsyncs the folder. Destroying it before commit() removes the temporary file. Errors (ENOSPC,
// EACCES, ...) throw moeforge::Error naming the path and the system's message.
class AtomicFileWriter {
 public:
  explicit AtomicFileWriter(std::filesystem::path path);
  ~AtomicFileWriter();
  AtomicFileWriter(const AtomicFileWriter&) = delete;
  AtomicFileWriter& operator=(const AtomicFileWriter&) = delete;

  void write(std::span<const std::byte> data);
  void commit();
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
  std::filesystem::path tmp_path_;
  int fd_ = -1;
  bool committed_ = false;
};

// The whole file at once through AtomicFileWriter.
void write_file_atomic(const std::filesystem::path& path, std::span<const std::byte> data);
// The same for text (e.g. JSON).
void write_file_atomic(const std::filesystem::path& path, std::string_view text);

// A directory built under `<final>.tmp-<pid>-<counter>` next to the final path (the parent is
// created if needed). The caller writes files inside staging_path(); commit() fsyncs every file
// and folder in it and renames it to the final path. With replace=true an existing final path is
// swapped atomically with the new directory (renameat2 RENAME_EXCHANGE; on file systems without
// it, the old one is renamed aside first) and then removed, so the final name always holds a
// complete old or new directory. The destructor removes an uncommitted staging directory.
class StagedDirectory {
 public:
  explicit StagedDirectory(std::filesystem::path final_path);
  ~StagedDirectory();
  StagedDirectory(const StagedDirectory&) = delete;
  StagedDirectory& operator=(const StagedDirectory&) = delete;

  const std::filesystem::path& staging_path() const { return staging_path_; }
  const std::filesystem::path& final_path() const { return final_path_; }
  bool committed() const { return committed_; }
  // Throws if the final path exists and replace is false, or if already committed.
  void commit(bool replace = false);

 private:
  std::filesystem::path final_path_;
  std::filesystem::path staging_path_;
  bool committed_ = false;
};

// True for names made by AtomicFileWriter (`x.tmp.<pid>`) and StagedDirectory
// (`x.tmp-<pid>-<counter>`), so that directory listers can skip leftovers of crashed writers.
bool is_staging_name(const std::string& filename);

}  // namespace moeforge::io
