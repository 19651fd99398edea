// The CUDA backend's model support check (see model_support.h).
#include "cuda/model_support.h"

#include "core/error.h"

namespace moeforge::cuda {

void check_cuda_model_support(const ModelConfig& config) {
  validate_model_config(config);
  MF_CHECK(config.shared_expert_intermediate_size == 0,
           "the CUDA backend does not run the shared expert of Qwen2-MoE yet; use --device cpu");
  MF_CHECK(!config.is_moe() || config.capacity_factor <= 0.0,
           "the CUDA backend runs dropless MoE layers only (capacity_factor {} given); use "
           "--device cpu",
           config.capacity_factor);
}

}  // namespace moeforge::cuda
