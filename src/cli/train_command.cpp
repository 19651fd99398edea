// `moeforge train`: run training from a JSON training config (data-parallel under mpirun).
#include <fmt/format.h>

#include "cli/commands.h"
#include "comm/communicator.h"
#include "core/error.h"
#include "train/trainer.h"

#if MOEFORGE_HAVE_CUDA
#include "cuda/gpu_step_engine.h"
#endif

namespace moeforge::cli {

void register_train_command(CLI::App& app) {
  struct Options {
    std::string config, resume, init_from;
    std::vector<std::string> overrides;
    std::string device = "cpu", recompute = "none";
    bool no_progress = false, cuda_graphs = false;
  };
  auto opts = std::make_shared<Options>();
  CLI::App* cmd = app.add_subcommand(
      "train",
      "Train a model. Under `mpirun -np N` the ranks are data-parallel (global batch = N x "
      "grad_accum_steps x micro_batch_size sequences); with parallel.expert_parallel n, groups of "
      "n ranks split each sequence and the experts (parallel.layout sp_ep, the default) or the "
      "attention heads and FFN columns (tp: Megatron-LM's tensor parallelism) and the N / n "
      "groups are data-parallel (global batch N / n x ...). With --device cuda each rank uses GPU "
      "local rank % GPUs of its host (tp on GPUs: not with --cuda-graphs, parallel.zero_stage 1, "
      "ep_comm_dtype bf16 or ep_overlap_chunks > 1).");
  cmd->add_option("--config", opts->config, "Training config (JSON; see configs/train/)")
      ->required()
      ->check(CLI::ExistingFile);
  cmd->add_option("--set", opts->overrides, "Override a config value: key.path=value (repeatable)");
  cmd->add_option("--resume", opts->resume,
                  "Continue from a checkpoint dir, or the newest checkpoint of a run dir");
  cmd->add_option("--init-from", opts->init_from,
                  "Start from these weights (a model or checkpoint dir); fresh optimizer state. "
                  "Same as --set model.init_from=DIR");
  cmd->add_option("--device", opts->device,
                  "Where the model runs: cpu (the fp32 reference) or cuda (bf16 compute, fp32 "
                  "master weights and optimizer state, one GPU per rank)")
      ->check(CLI::IsMember({"cpu", "cuda"}))
      ->capture_default_str();
  cmd->add_option("--recompute", opts->recompute,
                  "cuda: activation recompute, none or selective (normed inputs and SwiGLU "
                  "output are recomputed in the backward)")
      ->check(CLI::IsMember({"none", "selective"}))
      ->capture_default_str();
  cmd->add_flag("--cuda-graphs", opts->cuda_graphs,
                "cuda: replay each step as captured CUDA graphs, the forward and backward and "
                "(without ZeRO-1) the optimizer (one GPU per expert group, not with "
                "parallel.layout tp; data-parallel gradient sums then run after the backward)");
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
    run.device = opts->device;
    MF_CHECK(!opts->cuda_graphs || opts->device == "cuda", "--cuda-graphs needs --device cuda");
#if MOEFORGE_HAVE_CUDA
    const cuda::GpuModelOptions gpu_options{
        cuda::parse_recompute(opts->recompute),
        cuda::ExpertExchange{parse_grad_reduce_dtype(config.parallel.ep_comm_dtype),
                             config.parallel.ep_overlap_chunks},
        opts->cuda_graphs};
    const AdamWHyper hyper{config.optimizer.beta1, config.optimizer.beta2, config.optimizer.eps,
                           config.optimizer.weight_decay};
    run.engine_factory = [&config, &hyper, gpu_options](
                             const std::string& device, Transformer<float>& model,
                             AdamW& optimizer) -> std::unique_ptr<StepEngine> {
      MF_CHECK(device == "cuda", "unknown device '{}'", device);
      return cuda::make_gpu_step_engine(model, optimizer, hyper, config.optimizer.no_decay,
                                        gpu_options);
    };
    run.zero1_engine_factory = [&config, &hyper, gpu_options](
                                   const std::string& device, Transformer<float>& model,
                                   ZeroAdamW& optimizer) -> std::unique_ptr<StepEngine> {
      MF_CHECK(device == "cuda", "unknown device '{}'", device);
      return cuda::make_gpu_zero1_step_engine(model, optimizer, hyper, config.optimizer.no_decay,
                                              gpu_options);
    };
#else
    MF_CHECK(opts->device == "cpu",
             "--device {}: moeforge was built without CUDA (configure with -DMOEFORGE_CUDA=ON)",
             opts->device);
#endif
    const TrainSummary summary = train(config, run, world_communicator());
    if (world_communicator().rank() == 0) {
      fmt::print("trained {} steps: loss {:.4f}, val loss {:.4f}; checkpoint {}\n", summary.steps,
                 summary.final_loss, summary.final_val_loss, summary.last_checkpoint.string());
    }
  });
}

}  // namespace moeforge::cli
