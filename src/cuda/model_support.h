// How the CUDA backend (training and inference) lays out a model of model_config.h.
#pragma once

#include "model/model_config.h"
#include "model/parameters.h"

namespace moeforge::cuda {

// Whether a layer's q/k/v projections run as one GEMM over the packed weight [q; k; v]: their
// weights (and biases) are adjacent in the layout, and no q/k norm sits between the projection
// and RoPE.
bool packed_qkv(const ModelConfig& config, const LayerOffsets& o);

}  // namespace moeforge::cuda
