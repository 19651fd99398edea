// The list of subcommands, in the order --help shows them.
#include "cli/commands.h"

#include "train/checkpoint.h"

namespace moeforge::cli {

std::filesystem::path resolve_model_dir(const std::string& path) {
  if (std::filesystem::exists(std::filesystem::path(path) / "config.json")) return path;
  return resolve_checkpoint(path);
}

void register_commands(CLI::App& app) {
  register_train_command(app);
  register_eval_command(app);
  register_generate_command(app);
  register_merge_command(app);
  register_forward_command(app);
  register_init_command(app);
  register_inspect_command(app);
  register_data_command(app);
  register_devices_command(app);
  register_bench_command(app);
}

}  // namespace moeforge::cli
