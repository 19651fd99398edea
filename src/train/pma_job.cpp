// The background PMA merge and evaluation of a training run (see pma_job.h).
#include "train/pma_job.h"

#include <fmt/format.h>

#include <chrono>

#include "comm/communicator.h"
#include "core/error.h"
#include "io/checkpoint_index.h"
#include "merge/merge.h"
#include "merge/select.h"
#include "model/model_io.h"
#include "model/transformer.h"
#include "train/evaluate.h"

namespace moeforge {

namespace fs = std::filesystem;

PmaJob::PmaJob(const TrainConfig& config, const ModelConfig& model_config,
               const data::Windows& val_windows, const data::Tokenizer& tokenizer, LogFn log)
    : config_(config),
      model_config_(model_config),
      val_windows_(val_windows),
      tokenizer_(tokenizer),
      log_(std::move(log)) {}

PmaJob::~PmaJob() {
  wait();
}

void PmaJob::wait() {
  if (thread_.joinable()) thread_.join();
}

bool PmaJob::maybe_start(int64_t step, int64_t tokens_seen, double current_val_loss) {
  if (running_.load()) return false;
  wait();
  merge::CheckpointSelection selection;
  selection.count = config_.pma.count;
  selection.interval_tokens = config_.pma.interval_tokens;
  selection.until_tokens = tokens_seen;
  const std::optional<std::vector<io::CheckpointEntry>> selected =
      merge::find_checkpoints(io::read_checkpoint_index(config_.checkpoint.dir), selection);
  if (!selected) return false;  // not enough checkpoints spaced interval_tokens apart yet
  std::vector<fs::path> inputs;
  for (const io::CheckpointEntry& e : *selected) inputs.push_back(e.path);
  running_.store(true);
  thread_ = std::thread(&PmaJob::run, this, step, std::move(inputs), current_val_loss);
  return true;
}

void PmaJob::run(int64_t step, std::vector<fs::path> inputs, double current_val_loss) {
  const auto start = std::chrono::steady_clock::now();
  nlohmann::json record = {{"step", step}, {"val_loss", current_val_loss}};
  try {
    const fs::path pma_dir = config_.checkpoint.dir / "pma";
    const fs::path out = pma_dir / fmt::format("step-{:08d}", step);
    fs::create_directories(pma_dir);
    fs::remove_all(out);
    merge::MergeOptions options;
    options.method = merge::parse_method(config_.pma.method);
    options.alpha = config_.pma.alpha;
    options.inputs = inputs;
    options.output = out;
    options.weights = merge::merge_weights(options.method, static_cast<int64_t>(inputs.size()),
                                           config_.pma.alpha, {});
    options.num_threads = 1;  // leave the cores to training
    merge::merge_checkpoints(options);

    // Point pma/latest at the new merge atomically, then drop the previous merges.
    const fs::path link_tmp = pma_dir / "latest.tmp";
    fs::remove(link_tmp);
    fs::create_directory_symlink(out.filename(), link_tmp);
    fs::rename(link_tmp, pma_dir / "latest");
    for (const fs::directory_entry& entry : fs::directory_iterator(pma_dir)) {
      const std::string name = entry.path().filename().string();
      if (name.starts_with("step-") && entry.path() != out) fs::remove_all(entry.path());
    }

    SelfCommunicator self;
    const std::unique_ptr<Transformer<float>> merged = load_transformer(out, self);
    const EvalResult ev = evaluate(*merged, val_windows_, tokenizer_, config_.data.micro_batch_size,
                                   config_.eval.max_batches, self);
    record["pma_val_loss"] = ev.loss;
    record["pma_method"] = config_.pma.method;
    record["pma_count"] = inputs.size();
    record["pma_first"] = inputs.front().filename().string();
    record["pma_last"] = inputs.back().filename().string();
  } catch (const std::exception& e) {
    record["pma_error"] = e.what();
  }
  record["pma_seconds"] =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  log_(record);
  running_.store(false);
}

}  // namespace moeforge
