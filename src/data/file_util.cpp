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
  } catch (const nlohmann::json::exception& e) {  // parse_error, or out_of_range for 1e999
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
