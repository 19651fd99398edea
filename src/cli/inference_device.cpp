// --device for the inference commands and the engine it selects (see inference_device.h).
#include "cli/inference_device.h"

#include "core/error.h"
#include "infer/cpu_inference.h"

#if MOEFORGE_HAVE_CUDA
#include "comm/local_rank.h"
#include "cuda/device_info.h"
#include "cuda/gpu_inference.h"
#include "cuda/gpu_transformer.h"
#endif

namespace moeforge::cli {

void add_inference_device_option(CLI::App* cmd, std::string& device) {
  cmd->add_option("--device", device, "cpu (fp32 reference) or cuda (bf16 on one GPU)")
      ->check(CLI::IsMember({"cpu", "cuda"}))
      ->capture_default_str();
}

std::unique_ptr<InferenceEngine> make_inference_engine(const std::string& device,
                                                       std::unique_ptr<Transformer<float>>& model,
                                                       const PrefillAttention& attention) {
  if (device == "cpu") {
    model->set_prefill_attention(attention);
    return std::make_unique<CpuInference>(*model);
  }
  MF_CHECK(device == "cuda", "--device must be cpu or cuda, got '{}'", device);
#if MOEFORGE_HAVE_CUDA
  // Under mpirun (eval --task) each rank takes GPU local rank % GPUs of its host.
  cuda::bind_device_to_local_rank(local_rank_from_environment());
  auto engine = std::make_unique<cuda::GpuInference>(model->config(), model->params());
  engine->set_prefill_attention(attention);
  model.reset();
  return engine;
#else
  MF_FAIL("--device cuda: moeforge was built without CUDA (configure with -DMOEFORGE_CUDA=ON)");
#endif
}

ForwardFn make_gpu_loss_forward([[maybe_unused]] const Transformer<float>& model) {
#if MOEFORGE_HAVE_CUDA
  cuda::bind_device_to_local_rank(local_rank_from_environment());
  auto gpu = std::make_shared<cuda::GpuTransformer>(model.config());
  gpu->upload_params(model.params());
  return [gpu](const int32_t* tokens, const int32_t* targets, int64_t batch, int64_t seq) {
    return gpu->forward_backward(tokens, targets, batch, seq, 0.0);
  };
#else
  MF_FAIL("--device cuda: moeforge was built without CUDA (configure with -DMOEFORGE_CUDA=ON)");
#endif
}

}  // namespace moeforge::cli
