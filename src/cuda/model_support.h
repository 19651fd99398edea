// What the CUDA backend (training and inference) runs of model_config.h: a check shared by
// GpuTransformer and GpuInference.
#pragma once

#include "model/model_config.h"

namespace moeforge::cuda {

// Validates the config, then throws moeforge::Error (pointing at --device cpu) for what the CUDA
// backend does not run yet: the shared expert of Qwen2-MoE and capacity-based token dropping.
void check_cuda_model_support(const ModelConfig& config);

}  // namespace moeforge::cuda
