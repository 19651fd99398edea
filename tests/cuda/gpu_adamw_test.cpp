// GpuAdamW's update overlapped with the next forward (enable_overlap) against the update on the
// model's stream: four training steps of two copies of a model, the losses and the final weights
// and moments bit for bit. The serial copy runs first; the overlapped copy's steps then follow
// one another with no host work between an update and the next forward, and each overlapped
// update is held back behind 8 GiB of memsets (milliseconds) queued first on its stream, so a
// forward that did not wait for a range would read that range's old weights and give another
// loss. head_dim 20 runs our own attention kernels, whose backward is
// deterministic (cuDNN's may order its sums differently from run to run); everything else is too.
// The same holds for whole steps replayed as CUDA graphs (set_cuda_graphs of both).
#include "cuda/gpu_adamw.h"

#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <string>
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

// Whole training steps replayed as CUDA graphs (the model's forward and backward, the
// optimizer's norm and update) against eager ones, bit for bit: losses, gradient norms, weights
// and moments, over steps whose learning rate changes, that clip, whose max_norm changes (new
// optimizer graphs), and one with a NaN gradient, which both skip without a change.
TEST(GpuAdamWGraphs, TrainingStepsEqualEagerStepsBitForBit) {
  MF_REQUIRE_GPU();
  for (const Architecture arch : {Architecture::kLlama, Architecture::kMixtral}) {
    SCOPED_TRACE(architecture_name(arch));
    ModelConfig config = testing::gpu_config(arch);
    config.head_dim = 20;  // our deterministic attention kernels
    const std::vector<float> params = testing::make_params(ParameterLayout(config), 5);
    const AdamWHyper hyper{0.9, 0.95, 1e-8, 0.1};
    GpuTransformer eager_model(config), graphed_model(config);
    if (config.is_moe() && !graphed_model.grouped_expert_gemms()) continue;
    eager_model.upload_params(params);
    graphed_model.upload_params(params);
    GpuAdamW eager(eager_model, hyper, {"norm", "bias"});
    GpuAdamW graphed(graphed_model, hyper, {"norm", "bias"});
    graphed_model.set_cuda_graphs(true);
    graphed.set_cuda_graphs(true);
    const int64_t batch = 2, seq = 31;
    const double max_norms[] = {0.05, 0.05, 0.05, 0.05, 10.0, 10.0, 10.0};
    for (int step = 0; step < 7; ++step) {
      SCOPED_TRACE("step " + std::to_string(step));
      Rng rng(300 + static_cast<uint64_t>(step));
      std::vector<int32_t> tokens(static_cast<size_t>(batch * seq)), targets(tokens.size());
      for (size_t i = 0; i < tokens.size(); ++i) {
        tokens[i] = static_cast<int32_t>(rng.below(config.vocab_size));
        targets[i] = i % 5 == 2 ? -1 : static_cast<int32_t>(rng.below(config.vocab_size));
      }
      const double lr = 1e-3 * (step + 1);
      const double want =
          eager_model
              .forward_backward(tokens.data(), targets.data(), batch, seq, 1.0, GradMode::kAssign)
              .loss;
      const double got =
          graphed_model
              .forward_backward(tokens.data(), targets.data(), batch, seq, 1.0, GradMode::kAssign)
              .loss;
      EXPECT_EQ(std::bit_cast<uint64_t>(got), std::bit_cast<uint64_t>(want));
      const GpuAdamWResult e = eager.step(lr, max_norms[step]);
      const GpuAdamWResult g = graphed.step(lr, max_norms[step]);
      EXPECT_EQ(std::bit_cast<uint64_t>(g.grad_norm), std::bit_cast<uint64_t>(e.grad_norm));
      EXPECT_EQ(g.clip_factor, e.clip_factor);
      EXPECT_TRUE(g.applied);
      if (step == 0) {
        EXPECT_LT(g.clip_factor, 1.0) << "the first steps must clip";
      }
    }
    EXPECT_EQ(graphed.graph_captures(), 4)
        << "two at the second step, two more after max_norm changed";
    EXPECT_EQ(graphed_model.graph_captures(), 1);
    // A NaN gradient: the norm is NaN and both skip, leaving everything as it was.
    const std::vector<float> before = graphed_model.download_params();
    std::vector<float> grads = graphed_model.download_grads();
    grads[grads.size() / 2] = std::nanf("");
    eager_model.upload_grads(grads);
    graphed_model.upload_grads(grads);
    const GpuAdamWResult e = eager.step(1e-3, 10.0);
    const GpuAdamWResult g = graphed.step(1e-3, 10.0);
    EXPECT_FALSE(e.applied);
    EXPECT_FALSE(g.applied);
    EXPECT_TRUE(std::isnan(g.grad_norm));
    EXPECT_EQ(graphed.step_count(), 7);
    EXPECT_EQ(eager.step_count(), 7);
    expect_same_bits(graphed_model.download_params(), before, "params after the skipped step");
    expect_same_bits(graphed_model.download_params(), eager_model.download_params(), "params");
    expect_same_bits(graphed.download_exp_avg(), eager.download_exp_avg(), "exp_avg");
    expect_same_bits(graphed.download_exp_avg_sq(), eager.download_exp_avg_sq(), "exp_avg_sq");
  }
}

}  // namespace
}  // namespace moeforge::cuda
