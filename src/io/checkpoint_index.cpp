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
  try {
    const nlohmann::json j = nlohmann::json::parse(in);
    const int version = j.at("format_version").get<int>();
    MF_CHECK(version >= 1 && version <= kCheckpointIndexFormatVersion,
             "{}: index format_version {} is not supported (this moeforge reads up to {}); upgrade "
             "moeforge",
             path.string(), version, kCheckpointIndexFormatVersion);
    for (const auto& e : j.at("checkpoints")) {
      entries.push_back(
          CheckpointEntry{e.at("step").get<int64_t>(), e.at("tokens_seen").get<int64_t>(),
                          fs::absolute(run_dir / "checkpoints" / e.at("path").get<std::string>())});
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
