// `moeforge init`: write a randomly initialised HF checkpoint of any supported architecture.
#include <fmt/format.h>

#include "cli/commands.h"
#include "comm/communicator.h"
#include "io/atomic_file.h"
#include "model/model_io.h"
#include "model/transformer.h"

namespace moeforge::cli {

void register_init_command(CLI::App& app) {
  struct Options {
    std::string config, out, dtype = "F32";
    uint64_t seed = 1234;
    double init_std = 0.02;
    bool force = false;
  };
  auto opts = std::make_shared<Options>();
  CLI::App* cmd = app.add_subcommand(
      "init", "Write a randomly initialised checkpoint (config.json + model.safetensors)");
  cmd->add_option("--config", opts->config, "HF config.json of the model")
      ->required()
      ->check(CLI::ExistingFile);
  cmd->add_option("--out", opts->out, "Output directory (must not exist unless --force)")
      ->required();
  cmd->add_option("--seed", opts->seed, "Initialisation seed")->capture_default_str();
  cmd->add_option("--init-std", opts->init_std, "Std of the normal init of matrices")
      ->capture_default_str();
  cmd->add_option("--dtype", opts->dtype, "On-disk dtype: F32, BF16 or F16")->capture_default_str();
  cmd->add_flag("--force", opts->force, "Replace an existing output directory");
  cmd->callback([opts] {
    const ModelConfig config = load_model_config(opts->config);
    SelfCommunicator self;
    Transformer<float> model(config, self);
    model.init_random(opts->seed, opts->init_std);
    io::StagedDirectory staged(opts->out);
    write_hf_model(staged.staging_path(), config, model.layout(), model.params().data(),
                   io::parse_dtype(opts->dtype));
    staged.commit(opts->force);
    fmt::print("wrote {} ({} parameters, {} active) to {}\n",
               architecture_name(config.architecture), model.layout().num_params(),
               model.layout().num_active_params(), opts->out);
  });
}

}  // namespace moeforge::cli
