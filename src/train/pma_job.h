// PMA during training (../shared/docs/pma.md): on rank 0, a background thread merges the last N
// checkpoints spaced V tokens apart into <run>/pma/step-XXXXXXXX, points <run>/pma/latest at it,
// evaluates the merged model on the validation split and logs its loss next to the current
// model's. Training does not wait for it; a new merge starts only when the previous one is done.
#pragma once

#include <nlohmann/json.hpp>

#include <atomic>
#include <filesystem>
#include <functional>
#include <thread>

#include "data/loader.h"
#include "data/tokenizer.h"
#include "data/windows.h"
#include "model/model_config.h"
#include "train/train_config.h"

namespace moeforge {

class PmaJob {
 public:
  using LogFn = std::function<void(const nlohmann::json&)>;

  PmaJob(const TrainConfig& config, const ModelConfig& model_config,
         const data::Windows& val_windows, const data::Tokenizer& tokenizer, LogFn log);
  ~PmaJob();
  PmaJob(const PmaJob&) = delete;
  PmaJob& operator=(const PmaJob&) = delete;

  // Starts merging the checkpoints selected at tokens_seen, unless a merge is still running or the
  // run has fewer than pma.count checkpoints spaced pma.interval_tokens apart. current_val_loss is
  // logged beside the merged model's. Returns whether a merge started.
  bool maybe_start(int64_t step, int64_t tokens_seen, double current_val_loss);
  // Waits for the running merge (if any) to finish and log.
  void wait();

 private:
  void run(int64_t step, std::vector<std::filesystem::path> inputs, double current_val_loss);

  const TrainConfig& config_;
  const ModelConfig& model_config_;
  const data::Windows& val_windows_;
  const data::Tokenizer& tokenizer_;
  LogFn log_;
  std::thread thread_;
  std::atomic<bool> running_{false};
};

}  // namespace moeforge
