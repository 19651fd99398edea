// The CUDA step engine of the trainer (train/step_engine.h): a GpuTransformer and GpuAdamW on
// the current device, synced with the host model and optimizer for checkpoints and PMA.
// Data parallelism over several GPUs needs the NCCL communicator (issue #7): with more than one
// rank, gradients are reduced through host memory.
#pragma once

#include <memory>

#include "cuda/gpu_transformer.h"
#include "train/step_engine.h"

namespace moeforge::cuda {

std::unique_ptr<StepEngine> make_gpu_step_engine(Transformer<float>& model, AdamW& optimizer,
                                                 const AdamWHyper& hyper,
                                                 const std::vector<std::string>& no_decay,
                                                 Recompute recompute);

}  // namespace moeforge::cuda
