// `moeforge train`: run training from a JSON training config (data-parallel under mpirun).
#include <fmt/format.h>

#include "cli/commands.h"
#include "comm/communicator.h"
#include "train/trainer.h"

namespace moeforge::cli {

void register_train_command(CLI::App& app) {
  struct Options {
    std::string config, resume, init_from;
    std::vector<std::string> overrides;
    bool no_progress = false;
  };
  auto opts = std::make_shared<Options>();
  CLI::App* cmd = app.add_subcommand(
      "train",
      "Train a model. Under `mpirun -np N` the ranks are data-parallel (global batch = N x "
      "grad_accum_steps x micro_batch_size sequences).");
  cmd->add_option("--config", opts->config, "Training config (JSON; see configs/train/)")
      ->required()
      ->check(CLI::ExistingFile);
  cmd->add_option("--set", opts->overrides, "Override a config value: key.path=value (repeatable)");
  cmd->add_option("--resume", opts->resume,
                  "Continue from a checkpoint dir, or the newest checkpoint of a run dir");
  cmd->add_option("--init-from", opts->init_from,
                  "Start from these weights (a model or checkpoint dir); fresh optimizer state. "
                  "Same as --set model.init_from=DIR");
  cmd->add_flag("--no-progress", opts->no_progress, "No progress line on stderr");
  cmd->callback([opts] {
    std::vector<std::string> overrides = opts->overrides;
    if (!opts->init_from.empty()) {
      overrides.push_back("model.init_from=" + std::filesystem::absolute(opts->init_from).string());
      overrides.push_back("model.model_config=");
    }
    const TrainConfig config = load_train_config(opts->config, overrides);
    TrainRunOptions run;
    if (!opts->resume.empty()) run.resume = opts->resume;
    run.progress = !opts->no_progress;
    const TrainSummary summary = train(config, run, world_communicator());
    if (world_communicator().rank() == 0) {
      fmt::print("trained {} steps: loss {:.4f}, val loss {:.4f}; checkpoint {}\n", summary.steps,
                 summary.final_loss, summary.final_val_loss, summary.last_checkpoint.string());
    }
  });
}

}  // namespace moeforge::cli
