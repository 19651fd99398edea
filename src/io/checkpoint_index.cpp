// Reading and atomic replacement of <run>/checkpoints/index.json.
#include "io/checkpoint_index.h"

#include <nlohmann/json.hpp>

#include <fstream>

#include "core/error.h"
#include "io/atomic_file.h"

namespace moeforge::io {

namespace fs = std::filesystem;

std::vector<CheckpointEntry> read_checkpoint_index(const fs::path& run_dir) {
  const fs::path path = run_dir / "checkpoints" / "index.json";
  if (!fs::exists(path)) return {};
  std::ifstream in(path);
  MF_CHECK(in.good(), "cannot open {}", path.string());
  std::vector<CheckpointEntry> entries;
  // Integers only: get<int64_t>() of a float like 1e300 would be undefined behaviour.
  const auto integer = [&](const nlohmann::json& object, const char* key) {
    const nlohmann::json& value = object.at(key);
    MF_CHECK(value.is_number_integer(),
             "{}: malformed checkpoint index: {} must be an integer, got {}", path.string(), key,
             value.dump());
    return value.get<int64_t>();
  };
  try {
    const nlohmann::json j = nlohmann::json::parse(in);
    const int64_t version = integer(j, "format_version");
    MF_CHECK(version >= 1 && version <= kCheckpointIndexFormatVersion,
             "{}: index format_version {} is not supported (this moeforge reads up to {}); upgrade "
             "moeforge",
             path.string(), version, kCheckpointIndexFormatVersion);
    for (const auto& e : j.at("checkpoints")) {
      const fs::path name = e.at("path").get<std::string>();
      MF_CHECK(!name.empty() && name == name.filename() && name != "." && name != "..",
               "{}: malformed checkpoint index: path '{}' is not a folder name inside checkpoints/",
               path.string(), name.string());
      entries.push_back(CheckpointEntry{integer(e, "step"), integer(e, "tokens_seen"),
                                        fs::absolute(run_dir / "checkpoints" / name)});
    }
  } catch (const nlohmann::json::exception& e) {
    MF_FAIL("{}: malformed checkpoint index: {}", path.string(), e.what());
  }
  return entries;
}

void write_checkpoint_index(const fs::path& run_dir, const std::vector<CheckpointEntry>& entries) {
  nlohmann::json list = nlohmann::json::array();
  for (const CheckpointEntry& e : entries) {
    list.push_back(
        {{"step", e.step}, {"tokens_seen", e.tokens_seen}, {"path", e.path.filename().string()}});
  }
  const nlohmann::json j = {{"format_version", kCheckpointIndexFormatVersion},
                            {"checkpoints", list}};
  write_file_atomic(run_dir / "checkpoints" / "index.json", j.dump(2) + "\n");
}

}  // namespace moeforge::io
