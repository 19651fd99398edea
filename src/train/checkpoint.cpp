// Atomic save, load, index and retention of training checkpoints (see checkpoint.h).
#include "train/checkpoint.h"

#include <fmt/format.h>

#include <algorithm>
#include <charconv>
#include <cstring>
#include <fstream>
#include <optional>
#include <set>
#include <span>
#include <string_view>

#include "core/error.h"
#include "io/atomic_file.h"
#include "io/model_weights.h"
#include "model/model_io.h"

namespace moeforge {

namespace fs = std::filesystem;

namespace {

void write_json_atomic(const fs::path& path, const nlohmann::json& j) {
  io::write_file_atomic(path, j.dump(2) + "\n");
}

nlohmann::json read_json(const fs::path& path) {
  std::ifstream in(path);
  MF_CHECK(in.good(), "cannot open {}", path.string());
  try {
    return nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    MF_FAIL("{} is not valid JSON: {}", path.string(), e.what());
  }
}

nlohmann::json state_to_json(const TrainerState& s) {
  return {{"format_version", kCheckpointFormatVersion},
          {"step", s.step},
          {"tokens_seen", s.tokens_seen},
          {"lr", s.lr},
          {"loader", s.loader},
          {"init_seed", s.init_seed},
          {"data_seed", s.data_seed}};
}

TrainerState state_from_json(const nlohmann::json& j, const fs::path& path) {
  MF_CHECK(j.is_object() && j.contains("format_version") && j["format_version"].is_number_integer(),
           "{}: not a trainer state (no integer format_version)", path.string());
  const int64_t version = j["format_version"].get<int64_t>();
  MF_CHECK(version >= 1, "{}: missing or invalid format_version", path.string());
  MF_CHECK(version <= kCheckpointFormatVersion,
           "{}: checkpoint format_version {} is newer than this moeforge supports ({}); upgrade "
           "moeforge",
           path.string(), version, kCheckpointFormatVersion);
  try {
    TrainerState s;
    s.step = j.at("step").get<int64_t>();
    s.tokens_seen = j.at("tokens_seen").get<int64_t>();
    s.lr = j.at("lr").get<double>();
    s.loader = j.at("loader");
    s.init_seed = j.at("init_seed").get<uint64_t>();
    s.data_seed = j.at("data_seed").get<uint64_t>();
    return s;
  } catch (const nlohmann::json::exception& e) {
    MF_FAIL("{}: malformed trainer state: {}", path.string(), e.what());
  }
}

// The step of a checkpoint folder name exactly as checkpoint_dir_name writes it ("step-00000100"),
// or nullopt for any other name.
std::optional<int64_t> checkpoint_step_of(const std::string& name) {
  constexpr std::string_view kPrefix = "step-";
  if (!name.starts_with(kPrefix)) return std::nullopt;
  int64_t step = -1;
  const char* last = name.data() + name.size();
  const auto [end, ec] = std::from_chars(name.data() + kPrefix.size(), last, step);
  if (ec != std::errc() || end != last || step < 0) return std::nullopt;
  if (checkpoint_dir_name("", step).filename() != name) return std::nullopt;
  return step;
}

// True for the staging name of a checkpoint folder or of the index.
bool is_checkpoint_staging_name(const std::string& name) {
  if (!io::is_staging_name(name)) return false;
  for (const char* separator : {".tmp-", ".tmp."}) {
    const size_t pos = name.rfind(separator);
    if (pos == std::string::npos) continue;
    const std::string base = name.substr(0, pos);
    if (base == "index.json" || checkpoint_step_of(base)) return true;
  }
  return false;
}

}  // namespace

fs::path checkpoint_dir_name(const fs::path& run_dir, int64_t step) {
  return run_dir / "checkpoints" / fmt::format("step-{:08d}", step);
}

void copy_tokenizer_files(const fs::path& from, const fs::path& to) {
  for (const char* name : {"moeforge_tokenizer.json", "tokenizer.model"}) {
    if (fs::exists(from / name)) {
      fs::copy_file(from / name, to / name, fs::copy_options::overwrite_existing);
    }
  }
}

AdamWStateRange full_state_range(AdamW& optimizer) {
  return AdamWStateRange{0, static_cast<int64_t>(optimizer.exp_avg().size()),
                         optimizer.exp_avg().data(), optimizer.exp_avg_sq().data(),
                         optimizer.step_count()};
}

fs::path save_checkpoint(const fs::path& run_dir, const Transformer<float>& model, AdamW& optimizer,
                         const TrainerState& state, const nlohmann::json& train_config,
                         const fs::path& tokenizer_dir, int64_t keep_last,
                         const std::function<bool(const io::CheckpointEntry&)>& keep) {
  return save_checkpoint(run_dir, model, full_state_range(optimizer), state, train_config,
                         tokenizer_dir, keep_last, keep);
}

fs::path save_checkpoint(const fs::path& run_dir, const Transformer<float>& model,
                         const AdamWStateRange& optimizer, const TrainerState& state,
                         const nlohmann::json& train_config, const fs::path& tokenizer_dir,
                         int64_t keep_last,
                         const std::function<bool(const io::CheckpointEntry&)>& keep) {
  return save_checkpoint(run_dir, model.layout(), model.params().data(), optimizer, state,
                         train_config, tokenizer_dir, keep_last, keep);
}

fs::path save_checkpoint(const fs::path& run_dir, const ParameterLayout& layout,
                         const float* params, const AdamWStateRange& optimizer,
                         const TrainerState& state, const nlohmann::json& train_config,
                         const fs::path& tokenizer_dir, int64_t keep_last,
                         const std::function<bool(const io::CheckpointEntry&)>& keep) {
  MF_CHECK(!layout.experts_sharded(),
           "save_checkpoint needs every expert: gather the shards of the experts first");
  MF_CHECK(optimizer.begin == 0 && optimizer.end == layout.num_params(),
           "save_checkpoint needs the optimizer state of all {} parameters, got the range [{}, {})",
           layout.num_params(), optimizer.begin, optimizer.end);
  fs::create_directories(run_dir / "checkpoints");
  const fs::path final_dir = checkpoint_dir_name(run_dir, state.step);
  {
    io::StagedDirectory staged(final_dir);
    const fs::path dir = staged.staging_path();
    write_hf_model(dir, layout.config(), layout, params, io::DType::kF32);

    std::vector<io::TensorView> moments;
    for (const ParamSpec& spec : layout.specs()) {
      const auto bytes = [&](const float* v) {
        return std::as_bytes(std::span(v + spec.offset, static_cast<size_t>(spec.numel)));
      };
      moments.push_back(
          {"exp_avg." + spec.name, io::DType::kF32, spec.shape, bytes(optimizer.exp_avg)});
      moments.push_back(
          {"exp_avg_sq." + spec.name, io::DType::kF32, spec.shape, bytes(optimizer.exp_avg_sq)});
    }
    io::write_safetensors(
        dir / "optimizer.safetensors", moments,
        {{"format", "moeforge-adamw"}, {"step_count", std::to_string(optimizer.step_count)}});
    write_json_atomic(dir / "trainer_state.json", state_to_json(state));
    write_json_atomic(dir / "train_config.json", train_config);
    if (!tokenizer_dir.empty()) copy_tokenizer_files(tokenizer_dir, dir);
    staged.commit(/*replace=*/true);
  }

  std::vector<io::CheckpointEntry> entries = io::read_checkpoint_index(run_dir);
  std::erase_if(entries, [&](const io::CheckpointEntry& e) { return e.step == state.step; });
  entries.push_back(io::CheckpointEntry{state.step, state.tokens_seen, fs::absolute(final_dir)});
  std::sort(
      entries.begin(), entries.end(),
      [](const io::CheckpointEntry& a, const io::CheckpointEntry& b) { return a.step < b.step; });
  // Retention: the newest keep_last stay, and so does every checkpoint `keep` protects.
  std::vector<io::CheckpointEntry> kept, removed;
  for (size_t i = 0; i < entries.size(); ++i) {
    const bool recent = keep_last <= 0 || static_cast<int64_t>(entries.size() - i) <= keep_last;
    (recent || (keep && keep(entries[i])) ? kept : removed).push_back(entries[i]);
  }
  entries = std::move(kept);
  io::write_checkpoint_index(run_dir, entries);
  for (const io::CheckpointEntry& e : removed) fs::remove_all(e.path);
  return final_dir;
}

TrainerState load_checkpoint(const fs::path& dir, Transformer<float>& model, AdamW& optimizer) {
  AdamWStateRange range = full_state_range(optimizer);
  const TrainerState state = load_checkpoint(dir, model, range);
  optimizer.set_step_count(range.step_count);
  return state;
}

TrainerState load_checkpoint(const fs::path& dir, Transformer<float>& model,
                             AdamWStateRange& optimizer) {
  MF_CHECK(0 <= optimizer.begin && optimizer.begin <= optimizer.end &&
               optimizer.end <= model.layout().num_params(),
           "load_checkpoint: optimizer range [{}, {}) is not inside the {} parameters",
           optimizer.begin, optimizer.end, model.layout().num_params());
  MF_CHECK(fs::is_directory(dir), "checkpoint {} does not exist", dir.string());
  const ModelConfig saved = load_model_config(dir / "config.json");
  const ParameterLayout saved_layout(saved);
  MF_CHECK(saved_layout.num_params() == model.layout().num_model_params(),
           "{}: the checkpoint's model has {} parameters, the configured model {}; resume with the "
           "model config the run was started with",
           dir.string(), saved_layout.num_params(), model.layout().num_model_params());
  read_hf_weights(dir, model.layout(), model.params().data());

  const io::SafetensorsFile moments = io::SafetensorsFile::open(dir / "optimizer.safetensors");
  for (const ParamSpec& spec : model.layout().specs()) {
    // The part of this tensor inside the range.
    const int64_t begin = std::max(spec.offset, optimizer.begin);
    const int64_t end = std::min(spec.offset + spec.numel, optimizer.end);
    for (auto [prefix, target] : {std::pair{"exp_avg.", optimizer.exp_avg},
                                  std::pair{"exp_avg_sq.", optimizer.exp_avg_sq}}) {
      const std::string name = prefix + spec.name;
      const io::TensorInfo* info = moments.find(name);
      MF_CHECK(info != nullptr, "{}: optimizer state {} is missing", moments.path().string(), name);
      MF_CHECK(info->dtype == io::DType::kF32 && info->shape == spec.shape,
               "{}: optimizer state {} has the wrong dtype or shape", moments.path().string(),
               name);
      if (begin >= end) continue;
      const auto bytes = moments.data(*info);
      std::memcpy(target + (begin - optimizer.begin),
                  bytes.data() + (begin - spec.offset) * sizeof(float),
                  static_cast<size_t>(end - begin) * sizeof(float));
    }
  }
  const auto it = moments.metadata().find("step_count");
  MF_CHECK(it != moments.metadata().end(), "{}: metadata step_count is missing",
           moments.path().string());
  int64_t step_count = -1;
  const auto [end, ec] =
      std::from_chars(it->second.data(), it->second.data() + it->second.size(), step_count);
  MF_CHECK(ec == std::errc() && end == it->second.data() + it->second.size() && step_count >= 0,
           "{}: metadata step_count \"{}\" is not a non-negative integer", moments.path().string(),
           it->second);
  optimizer.step_count = step_count;
  return state_from_json(read_json(dir / "trainer_state.json"), dir / "trainer_state.json");
}

std::vector<fs::path> remove_checkpoint_leftovers(const fs::path& run_dir, const fs::path& keep) {
  const fs::path checkpoints_dir = run_dir / "checkpoints";
  if (!fs::is_directory(checkpoints_dir)) return {};
  std::set<std::string> listed;
  for (const io::CheckpointEntry& e : io::read_checkpoint_index(run_dir)) {
    listed.insert(e.path.filename().string());
  }
  const fs::path kept = keep.empty() ? fs::path() : fs::weakly_canonical(keep);
  std::vector<fs::path> removed;
  for (const fs::directory_entry& entry : fs::directory_iterator(checkpoints_dir)) {
    const std::string name = entry.path().filename().string();
    const bool unlisted_checkpoint =
        entry.is_directory() && checkpoint_step_of(name) && !listed.contains(name);
    if (!unlisted_checkpoint && !is_checkpoint_staging_name(name)) continue;
    if (!kept.empty() && fs::weakly_canonical(entry.path()) == kept) continue;
    removed.push_back(entry.path());
  }
  std::sort(removed.begin(), removed.end());
  for (const fs::path& path : removed) fs::remove_all(path);
  return removed;
}

fs::path resolve_checkpoint(const fs::path& dir_or_run) {
  if (fs::exists(dir_or_run / "trainer_state.json")) return dir_or_run;
  const std::vector<io::CheckpointEntry> entries = io::read_checkpoint_index(dir_or_run);
  MF_CHECK(!entries.empty(),
           "{} is neither a checkpoint (no trainer_state.json) nor a run with checkpoints (no "
           "checkpoints/index.json)",
           dir_or_run.string());
  return entries.back().path;
}

}  // namespace moeforge
