// Atomic file writes and JSON reading with errors that name the file and the field.
#include "data/file_util.h"

#include "core/error.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>

namespace moeforge::data {

namespace fs = std::filesystem;

AtomicFileWriter::AtomicFileWriter(const fs::path& path) : path_(path) {
  MF_CHECK(path.has_filename(), "cannot write '{}': the path names no file", path.string());
  tmp_path_ = path;
  tmp_path_ += fmt::format(".tmp-{}", static_cast<long>(::getpid()));
  fd_ = ::open(tmp_path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  MF_CHECK(fd_ >= 0, "cannot create '{}': {}", tmp_path_.string(), std::strerror(errno));
}

AtomicFileWriter::~AtomicFileWriter() {
  if (fd_ >= 0) {
    ::close(fd_);
    std::error_code ignored;
    fs::remove(tmp_path_, ignored);
  }
}

void AtomicFileWriter::write(const void* data, size_t num_bytes) {
  MF_CHECK(fd_ >= 0, "write to '{}' after commit", path_.string());
  const char* bytes = static_cast<const char*>(data);
  while (num_bytes > 0) {
    ssize_t written = ::write(fd_, bytes, num_bytes);
    if (written < 0 && errno == EINTR) continue;
    MF_CHECK(written > 0, "writing '{}' failed: {}", tmp_path_.string(), std::strerror(errno));
    bytes += written;
    num_bytes -= static_cast<size_t>(written);
  }
}

void AtomicFileWriter::commit() {
  MF_CHECK(fd_ >= 0, "'{}' committed twice", path_.string());
  MF_CHECK(::fsync(fd_) == 0, "fsync of '{}' failed: {}", tmp_path_.string(), std::strerror(errno));
  int close_rc = ::close(fd_);
  fd_ = -1;
  if (close_rc != 0 || ::rename(tmp_path_.c_str(), path_.c_str()) != 0) {
    std::string reason = std::strerror(errno);
    std::error_code ignored;
    fs::remove(tmp_path_, ignored);
    MF_FAIL("cannot move '{}' to '{}': {}", tmp_path_.string(), path_.string(), reason);
  }
  fsync_directory(path_.parent_path().empty() ? fs::path(".") : path_.parent_path());
}

void write_file_atomic(const fs::path& path, std::string_view bytes) {
  AtomicFileWriter writer(path);
  writer.write(bytes.data(), bytes.size());
  writer.commit();
}

void fsync_directory(const fs::path& dir) {
  int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  MF_CHECK(fd >= 0, "cannot open folder '{}': {}", dir.string(), std::strerror(errno));
  int rc = ::fsync(fd);
  int fsync_errno = errno;
  ::close(fd);
  MF_CHECK(rc == 0, "fsync of folder '{}' failed: {}", dir.string(), std::strerror(fsync_errno));
}

std::string read_file_bytes(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  MF_CHECK(in.good(), "cannot open '{}': {}", path.string(), std::strerror(errno));
  std::ostringstream bytes;
  bytes << in.rdbuf();
  MF_CHECK(!in.bad(), "reading '{}' failed", path.string());
  return std::move(bytes).str();
}

nlohmann::json read_json_file(const fs::path& path) {
  MF_CHECK(fs::exists(path), "'{}' not found", path.string());
  std::string text = read_file_bytes(path);
  try {
    return nlohmann::json::parse(text);
  } catch (const nlohmann::json::parse_error& e) {
    MF_FAIL("'{}' is not valid JSON: {}", path.string(), e.what());
  }
}

const nlohmann::json& json_field(const nlohmann::json& j, const std::string& name,
                                 const fs::path& file) {
  MF_CHECK(j.is_object(), "{}: expected a JSON object", file.string());
  auto it = j.find(name);
  MF_CHECK(it != j.end(), "{}: missing field '{}'", file.string(), name);
  return *it;
}

int64_t json_int_field(const nlohmann::json& j, const std::string& name, const fs::path& file) {
  const nlohmann::json& value = json_field(j, name, file);
  MF_CHECK(value.is_number_integer(), "{}: field '{}' must be an integer (got {})", file.string(),
           name, value.dump());
  return value.get<int64_t>();
}

std::string json_string_field(const nlohmann::json& j, const std::string& name,
                              const fs::path& file) {
  const nlohmann::json& value = json_field(j, name, file);
  MF_CHECK(value.is_string(), "{}: field '{}' must be a string (got {})", file.string(), name,
           value.dump());
  return value.get<std::string>();
}

int64_t json_format_version(const nlohmann::json& j, int64_t supported_version,
                            const fs::path& file) {
  int64_t version = json_int_field(j, "format_version", file);
  MF_CHECK(version <= supported_version,
           "{}: format_version {} is newer than the supported version {}; it was written by a "
           "newer moeforge, upgrade to read it",
           file.string(), version, supported_version);
  MF_CHECK(version >= 1, "{}: format_version {} is invalid (must be >= 1)", file.string(), version);
  return version;
}

}  // namespace moeforge::data
