// What the CUDA backend (training and inference) runs of model_config.h, and how: checks shared by
// GpuTransformer and GpuInference.
#pragma once

#include "model/model_config.h"
#include "model/parameters.h"

namespace moeforge::cuda {

// Validates the config, then throws moeforge::Error (pointing at --device cpu) for what the CUDA
// backend does not run yet: capacity-based token dropping.
void check_cuda_model_support(const ModelConfig& config);

// Whether a layer's q/k/v projections run as one GEMM over the packed weight [q; k; v]: their
// weights (and biases) are adjacent in the layout, and no q/k norm sits between the projection
// and RoPE.
bool packed_qkv(const ModelConfig& config, const LayerOffsets& o);

}  // namespace moeforge::cuda
