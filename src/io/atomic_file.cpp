// Temporary-name-then-rename writing of files and directories, with the fsyncs that make it
// durable, and the recognition of leftover temporaries.
#include "io/atomic_file.h"

#include "core/error.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <string_view>
#include <system_error>

namespace moeforge::io {

namespace fs = std::filesystem;

namespace {

// Throws moeforge::Error "<action> '<path>': <strerror(errno)>". Reads errno first.
[[noreturn]] void fail_errno(const char* action, const fs::path& path) {
  const int saved_errno = errno;
  MF_FAIL("cannot {} '{}': {}", action, path.string(), std::strerror(saved_errno));
}

fs::path parent_or_current(const fs::path& path) {
  const fs::path parent = path.parent_path();
  return parent.empty() ? fs::path(".") : parent;
}

void fsync_path(const fs::path& path, int flags) {
  const int fd = ::open(path.c_str(), flags | O_CLOEXEC);
  if (fd < 0) fail_errno("open for fsync", path);
  if (::fsync(fd) != 0) {
    const int saved_errno = errno;
    ::close(fd);
    errno = saved_errno;
    fail_errno("fsync", path);
  }
  ::close(fd);
}

// `<final>.tmp-<pid>-<counter>`, unique within the process.
fs::path make_staging_name(const fs::path& final_path) {
  static std::atomic<uint64_t> counter{0};
  const uint64_t staging_idx = counter.fetch_add(1);
  return final_path.parent_path() /
         fmt::format("{}.tmp-{}-{}", final_path.filename().string(), ::getpid(), staging_idx);
}

bool all_digits(std::string_view s) {
  return !s.empty() && std::all_of(s.begin(), s.end(), [](char c) {
    return std::isdigit(static_cast<unsigned char>(c));
  });
}

}  // namespace

void fsync_directory(const fs::path& dir) {
  fsync_path(dir, O_RDONLY | O_DIRECTORY);
}

AtomicFileWriter::AtomicFileWriter(fs::path path) : path_(std::move(path)) {
  MF_CHECK(!path_.filename().empty(), "cannot write a file at '{}': the path has no file name",
           path_.string());
  tmp_path_ = path_;
  tmp_path_ += fmt::format(".tmp.{}", ::getpid());
  fd_ = ::open(tmp_path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd_ < 0) fail_errno("create temporary file", tmp_path_);
}

AtomicFileWriter::~AtomicFileWriter() {
  if (fd_ >= 0) ::close(fd_);
  if (!committed_) ::unlink(tmp_path_.c_str());
}

void AtomicFileWriter::write(std::span<const std::byte> data) {
  MF_CHECK(!committed_ && fd_ >= 0, "write to '{}' after commit", path_.string());
  const std::byte* cursor = data.data();
  size_t num_left = data.size();
  while (num_left > 0) {
    const ssize_t num_written = ::write(fd_, cursor, num_left);
    if (num_written < 0) {
      if (errno == EINTR) continue;
      fail_errno("write", tmp_path_);
    }
    cursor += num_written;
    num_left -= static_cast<size_t>(num_written);
  }
}

void AtomicFileWriter::commit() {
  MF_CHECK(!committed_ && fd_ >= 0, "'{}' committed twice", path_.string());
  if (::fsync(fd_) != 0) fail_errno("fsync", tmp_path_);
  const int fd = fd_;
  fd_ = -1;
  if (::close(fd) != 0) fail_errno("close", tmp_path_);
  if (::rename(tmp_path_.c_str(), path_.c_str()) != 0) {
    fail_errno("rename temporary file onto", path_);
  }
  committed_ = true;
  fsync_directory(parent_or_current(path_));
}

void write_file_atomic(const fs::path& path, std::span<const std::byte> data) {
  AtomicFileWriter writer(path);
  writer.write(data);
  writer.commit();
}

void write_file_atomic(const fs::path& path, std::string_view text) {
  write_file_atomic(path, std::as_bytes(std::span(text.data(), text.size())));
}

StagedDirectory::StagedDirectory(fs::path final_path) : final_path_(std::move(final_path)) {
  MF_CHECK(!final_path_.filename().empty(),
           "cannot stage a directory for '{}': the path has no final component (trailing '/'?)",
           final_path_.string());
  const fs::path parent = parent_or_current(final_path_);
  std::error_code ec;
  fs::create_directories(parent, ec);
  MF_CHECK(!ec, "cannot create directory '{}': {}", parent.string(), ec.message());
  staging_path_ = make_staging_name(final_path_);
  fs::remove_all(staging_path_, ec);  // a leftover of a crashed process that had the same pid
  if (::mkdir(staging_path_.c_str(), 0755) != 0) {
    fail_errno("create staging directory", staging_path_);
  }
}

StagedDirectory::~StagedDirectory() {
  if (!committed_) {
    std::error_code ec;
    fs::remove_all(staging_path_, ec);
  }
}

void StagedDirectory::commit(bool replace) {
  MF_CHECK(!committed_, "staging directory for '{}' committed twice", final_path_.string());
  std::error_code ec;
  for (fs::recursive_directory_iterator it(staging_path_, ec), end; !ec && it != end;
       it.increment(ec)) {
    if (it->is_directory(ec)) {
      fsync_directory(it->path());
    } else if (it->is_regular_file(ec)) {
      fsync_path(it->path(), O_RDONLY);
    }
  }
  MF_CHECK(!ec, "cannot list staging directory '{}': {}", staging_path_.string(), ec.message());
  fsync_directory(staging_path_);

  const fs::path parent = parent_or_current(final_path_);
  const bool final_exists = fs::symlink_status(final_path_, ec).type() != fs::file_type::not_found;
  if (!final_exists) {
    if (::rename(staging_path_.c_str(), final_path_.c_str()) != 0) {
      fail_errno("rename staging directory onto", final_path_);
    }
    committed_ = true;
    fsync_directory(parent);
    return;
  }
  MF_CHECK(replace,
           "cannot commit '{}': it already exists (commit with replace=true to replace it)",
           final_path_.string());

  // After the swap the old version lives under the staging name, which listers skip.
  fs::path old_path = staging_path_;
  if (::renameat2(AT_FDCWD, staging_path_.c_str(), AT_FDCWD, final_path_.c_str(),
                  RENAME_EXCHANGE) != 0) {
    if (errno != EINVAL && errno != ENOSYS) {
      fail_errno("exchange staging directory with", final_path_);
    }
    old_path = make_staging_name(final_path_);
    if (::rename(final_path_.c_str(), old_path.c_str()) != 0) {
      fail_errno("move the previous version aside from", final_path_);
    }
    if (::rename(staging_path_.c_str(), final_path_.c_str()) != 0) {
      const int saved_errno = errno;
      ::rename(old_path.c_str(), final_path_.c_str());
      errno = saved_errno;
      fail_errno("rename staging directory onto", final_path_);
    }
  }
  committed_ = true;
  fsync_directory(parent);
  fs::remove_all(old_path, ec);
  MF_CHECK(!ec, "committed '{}' but could not remove its previous version at '{}': {}",
           final_path_.string(), old_path.string(), ec.message());
  fsync_directory(parent);
}

bool is_staging_name(const std::string& filename) {
  const std::string_view name = filename;
  const size_t file_pos = name.rfind(".tmp.");
  if (file_pos != std::string_view::npos && file_pos > 0 && all_digits(name.substr(file_pos + 5))) {
    return true;
  }
  const size_t dir_pos = name.rfind(".tmp-");
  if (dir_pos == std::string_view::npos || dir_pos == 0) return false;
  const std::string_view suffix = name.substr(dir_pos + 5);
  const size_t dash_pos = suffix.find('-');
  return dash_pos != std::string_view::npos && all_digits(suffix.substr(0, dash_pos)) &&
         all_digits(suffix.substr(dash_pos + 1));
}

}  // namespace moeforge::io
