// GpuAdamW's update overlapped with the next forward (enable_overlap) against the update on the
// model's stream: four training steps of two copies of a model, the losses and the final weights
// and moments bit for bit. The serial copy runs first; the overlapped copy's steps then follow
// one another with no host work between an update and the next forward, and each overlapped
// update is held back behind 8 GiB of memsets (milliseconds) queued first on its stream, so a
// forward that did not wait for a range would read that range's old weights and give another
// loss. head_dim 20 runs our own attention kernels, whose backward is
// deterministic (cuDNN's may order its sums differently from run to run); everything else is too.
#include "cuda/gpu_adamw.h"

#include <gtest/gtest.h>

#include <bit>
#include <cstdint>
#include <vector>

#include "cuda/device_memory.h"
#include "cuda/gpu_transformer.h"
#include "gpu_test_models.h"
#include "gpu_test_util.h"

namespace moeforge::cuda {
namespace {

void expect_same_bits(const std::vector<float>& got, const std::vector<float>& want,
                      const char* what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  for (size_t i = 0; i < got.size(); ++i) {
    ASSERT_EQ(std::bit_cast<uint32_t>(got[i]), std::bit_cast<uint32_t>(want[i]))
        << what << " element " << i;
  }
}

TEST(GpuAdamWOverlap, TrainingEqualsTheUpdateOnTheModelStream) {
  MF_REQUIRE_GPU();
  for (const Architecture arch :
       {Architecture::kLlama, Architecture::kMixtral, Architecture::kQwen2Moe}) {
    SCOPED_TRACE(architecture_name(arch));
    ModelConfig config = testing::gpu_config(arch);
    config.head_dim = 20;
    const std::vector<float> params = testing::make_params(ParameterLayout(config), 3);
    const AdamWHyper hyper{0.9, 0.95, 1e-8, 0.1};
    GpuTransformer serial_model(config), overlap_model(config);
    serial_model.upload_params(params);
    overlap_model.upload_params(params);
    GpuAdamW serial(serial_model, hyper, {"norm", "bias"});
    GpuAdamW overlap(overlap_model, hyper, {"norm", "bias"});
    overlap.enable_overlap();
    DeviceBuffer<float> busy(size_t{1} << 26);
    const int64_t batch = 2, seq = 29;
    constexpr int kSteps = 4;
    std::vector<std::vector<int32_t>> tokens(kSteps), targets(kSteps);
    std::vector<double> want(kSteps);
    for (int step = 0; step < kSteps; ++step) {
      Rng rng(100 + static_cast<uint64_t>(step));
      tokens[step].resize(static_cast<size_t>(batch * seq));
      targets[step].resize(tokens[step].size());
      for (size_t i = 0; i < tokens[step].size(); ++i) {
        tokens[step][i] = static_cast<int32_t>(rng.below(config.vocab_size));
        targets[step][i] = static_cast<int32_t>(rng.below(config.vocab_size));
      }
      want[step] = serial_model
                       .forward_backward(tokens[step].data(), targets[step].data(), batch, seq, 1.0,
                                         GradMode::kAssign)
                       .loss;
      serial.step(1e-2, 1.0);
    }
    for (int step = 0; step < kSteps; ++step) {
      const double got = overlap_model
                             .forward_backward(tokens[step].data(), targets[step].data(), batch,
                                               seq, 1.0, GradMode::kAssign)
                             .loss;
      for (int k = 0; k < 32; ++k) busy.fill_zero(overlap.update_stream());
      overlap.step(1e-2, 1.0);
      EXPECT_EQ(std::bit_cast<uint64_t>(got), std::bit_cast<uint64_t>(want[step]))
          << "step " << step;
    }
    overlap.synchronize();
    expect_same_bits(overlap_model.download_params(), serial_model.download_params(), "params");
    expect_same_bits(overlap.download_exp_avg(), serial.download_exp_avg(), "exp_avg");
    expect_same_bits(overlap.download_exp_avg_sq(), serial.download_exp_avg_sq(), "exp_avg_sq");
  }
}

}  // namespace
}  // namespace moeforge::cuda
