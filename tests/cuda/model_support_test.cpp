// What the CUDA backend accepts (cuda/model_support.h), checked on the host without a GPU: every
// architecture of the GPU tests, Qwen2-MoE's shared expert included, and a clear error for token
// dropping by capacity.
#include "cuda/model_support.h"

#include <gtest/gtest.h>

#include <string>

#include "core/error.h"
#include "gpu_test_models.h"

namespace moeforge::cuda {
namespace {

TEST(CudaModelSupport, AcceptsEveryTestArchitectureWithTheSharedExpert) {
  for (const Architecture arch :
       {Architecture::kLlama, Architecture::kQwen2, Architecture::kQwen3, Architecture::kMixtral,
        Architecture::kQwen2Moe, Architecture::kQwen3Moe}) {
    EXPECT_NO_THROW(check_cuda_model_support(testing::gpu_config(arch))) << architecture_name(arch);
  }
  const ModelConfig odd = testing::gpu_config_odd_shared_expert();
  ASSERT_GT(odd.shared_expert_intermediate_size, 0);
  EXPECT_NO_THROW(check_cuda_model_support(odd));
}

TEST(CudaModelSupport, TokenDroppingIsAClearError) {
  ModelConfig config = testing::gpu_config(Architecture::kQwen2Moe);
  config.capacity_factor = 1.25;
  try {
    check_cuda_model_support(config);
    FAIL() << "a capacity factor was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("dropless"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("--device cpu"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace moeforge::cuda
