// The training loop over the ranks of a communicator: groups of parallel.expert_parallel
// consecutive ranks share each sequence and split the experts (MegaScale-MoE's SP + EP layout,
// model/transformer.h) or, with parallel.layout "tp", the attention heads and FFN columns
// (Megatron-LM's tensor parallelism, model/tensor_parallel.h), and those groups are data-parallel
// (every rank holds all parameters; gradients are summed over all ranks), gradient accumulation
// over micro-batches, AdamW with clipping and an LR schedule, periodic evaluation, atomic
// checkpoints with retention, JSONL metrics and a progress line.
//
// Global batch of one step = (num_ranks / expert_parallel) * grad_accum_steps micro-batches; the
// loss of a step is the mean of their losses, so n data-parallel ranks give the same step as one
// rank with n times the accumulation, and an expert- or tensor-parallel group the same as one rank.
#pragma once

#include <filesystem>
#include <optional>

#include "comm/communicator.h"
#include "train/step_engine.h"
#include "train/train_config.h"

namespace moeforge {

struct TrainRunOptions {
  std::optional<std::filesystem::path> resume;  // checkpoint dir or run dir (newest checkpoint)
  bool progress = true;                         // progress line on stderr (rank 0)
  std::string device = "cpu";                   // where the model's math runs
  // Builds the engine for devices other than "cpu" (the CLI passes the CUDA one when built
  // with it); unset means only "cpu" is available.
  StepEngineFactory engine_factory;
  // The same with ZeRO-1 (parallel.zero_stage 1).
  Zero1StepEngineFactory zero1_engine_factory;
};

struct TrainSummary {
  int64_t steps = 0;
  double final_loss = 0.0;
  double final_val_loss = 0.0;
  std::filesystem::path last_checkpoint;
};

TrainSummary train(const TrainConfig& config, const TrainRunOptions& options, Communicator& world);

}  // namespace moeforge
