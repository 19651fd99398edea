// File helpers of the data module: reading files and JSON whose errors name the file and the
// field. (Atomic writes come from io/atomic_file.h.)
#pragma once

#include <nlohmann/json.hpp>

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>

namespace moeforge::data {

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
