// File helpers of the data module: atomic writes (tmp file in the same folder, fsync, rename)
// and JSON reading whose errors name the file and the field.
#pragma once

#include <nlohmann/json.hpp>

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>

namespace moeforge::data {

// Writes `path` atomically: bytes go to a temporary file beside it, which is fsynced and renamed
// over `path` by commit(); the folder is fsynced too. Destroyed without commit(), the temporary
// file is removed and `path` is untouched.
class AtomicFileWriter {
 public:
  explicit AtomicFileWriter(const std::filesystem::path& path);
  ~AtomicFileWriter();
  AtomicFileWriter(const AtomicFileWriter&) = delete;
  AtomicFileWriter& operator=(const AtomicFileWriter&) = delete;

  void write(const void* data, size_t num_bytes);
  void commit();

 private:
  std::filesystem::path path_;
  std::filesystem::path tmp_path_;
  int fd_ = -1;
};

void write_file_atomic(const std::filesystem::path& path, std::string_view bytes);
// fsync of a folder, so that renames and new entries in it are durable.
void fsync_directory(const std::filesystem::path& dir);
std::string read_file_bytes(const std::filesystem::path& path);
nlohmann::json read_json_file(const std::filesystem::path& path);

// Field access for files read with read_json_file: errors say "<file>: field 'name' ...".
const nlohmann::json& json_field(const nlohmann::json& j, const std::string& name,
                                 const std::filesystem::path& file);
int64_t json_int_field(const nlohmann::json& j, const std::string& name,
                       const std::filesystem::path& file);
std::string json_string_field(const nlohmann::json& j, const std::string& name,
                              const std::filesystem::path& file);
// Reads "format_version" and fails with a hint when it is newer than `supported_version`.
int64_t json_format_version(const nlohmann::json& j, int64_t supported_version,
                            const std::filesystem::path& file);

}  // namespace moeforge::data
