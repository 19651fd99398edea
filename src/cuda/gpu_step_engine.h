// The CUDA step engine of the trainer (train/step_engine.h): a GpuTransformer and GpuAdamW on
// the current device, synced with the host model and optimizer for checkpoints and PMA.
// With several data-parallel ranks the gradients are summed on the devices through NCCL
// (cuda/grad_reduce_device.h), or through host memory in a build without NCCL or when ranks share
// a GPU. With ZeRO-1 they are reduce-scattered to the owners of the optimizer's shards. The host
// model's group (parallel.expert_parallel > 1) runs on the GPUs as it does on the CPU: sequence/
// expert-parallel, or tensor-parallel under parallel.layout "tp" (every GPU holds the whole model
// and uses its slices; CUDA graphs are refused here, ZeRO-1 by the trainer).
#pragma once

#include <memory>

#include "cuda/gpu_transformer.h"
#include "train/step_engine.h"

namespace moeforge::cuda {

// How the engines run their GpuTransformer.
struct GpuModelOptions {
  Recompute recompute = Recompute::kNone;
  // How the expert-parallel MoE exchanges run (parallel.ep_comm_dtype and
  // parallel.ep_overlap_chunks; GpuTransformer::set_expert_parallel_group). Its dispatch is
  // replaced by the host model's plan (parallel.ep_dispatch).
  ExpertExchange ep_exchange;
  // Forward and backward replayed as CUDA graphs (GpuTransformer::set_cuda_graphs; one GPU per
  // expert group only, never under parallel.layout "tp"), and without ZeRO-1 the optimizer too
  // (GpuAdamW::set_cuda_graphs).
  // Data-parallel sums then run after the backward instead of beside it.
  bool cuda_graphs = false;
};

std::unique_ptr<StepEngine> make_gpu_step_engine(Transformer<float>& model, AdamW& optimizer,
                                                 const AdamWHyper& hyper,
                                                 const std::vector<std::string>& no_decay,
                                                 const GpuModelOptions& options);

// ZeRO-1 on GPUs (cuda/gpu_zero_adamw.h) over the data-parallel group of the host optimizer, whose
// shard vectors the engine syncs; needs NCCL with one GPU per rank. With expert_parallel > 1 the
// expert group's partial gradients are summed on the GPUs (sum_expert_group_grads) first.
std::unique_ptr<StepEngine> make_gpu_zero1_step_engine(Transformer<float>& model,
                                                       ZeroAdamW& optimizer,
                                                       const AdamWHyper& hyper,
                                                       const std::vector<std::string>& no_decay,
                                                       const GpuModelOptions& options);

}  // namespace moeforge::cuda
