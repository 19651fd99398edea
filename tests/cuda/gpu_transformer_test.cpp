// The whole decoder on the GPU against the CPU reference (model/transformer.h): the loss and every
// parameter's gradient of small models of each supported architecture, from the same
// bf16-representable weights. The GPU keeps activations in bf16 (about 2^-9 relative error per
// rounding, a few dozen roundings deep), so losses must agree to 1e-2 and each gradient tensor to
// a relative L2 error of 5e-2 (a broken op gives errors of order 1). Routed expert tensors
// (".experts.") get 0.15: the bf16 noise in the router's input can flip a near-tie in a token's
// expert choice, which moves that token's rows (1 of about 40 per expert here) from one expert's
// gradient to another's. Their error is relative to the larger of the expert's own gradient and
// its share (1 / num_experts) of the layer's projection over all experts: an expert the CPU gives
// no token has a zero reference, and one flipped token there must not count as an infinite error
// (measured on the H200: layer 1 of the odd-shared-expert Qwen2-MoE has two such experts).
// Qwen2-MoE's shared expert (".shared_expert.", ".shared_expert_gate.") keeps 5e-2: like the dense
// FFN it sees every token, so a flip only changes the flipped token's downstream values, as it does
// for the attention weights, and moves no rows between tensors; its sigmoid gate's gradient sums a
// per-token dot product of the output gradient with the shared expert's output, as the router's
// gradient does with the experts' outputs.
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "comm/communicator.h"
#include "core/error.h"
#include "core/rng.h"
#include "cuda/bf16.h"
#include "cuda/device_memory.h"
#include "cuda/gpu_adamw.h"
#include "cuda/gpu_transformer.h"
#include "gpu_test_models.h"
#include "gpu_test_util.h"
#include "model/transformer.h"
#include "ops/row_map.h"
#include "train/adamw.h"

namespace moeforge::cuda {
namespace {

class GpuTransformerTest : public ::testing::TestWithParam<Architecture> {};

// Random tokens and targets for a [batch, seq] micro-batch.
std::pair<std::vector<int32_t>, std::vector<int32_t>> random_batch(const ModelConfig& config,
                                                                   int64_t count, uint64_t seed) {
  Rng rng(seed);
  std::vector<int32_t> tokens(static_cast<size_t>(count)), targets(tokens.size());
  for (size_t i = 0; i < tokens.size(); ++i) {
    tokens[i] = static_cast<int32_t>(rng.below(config.vocab_size));
    targets[i] = static_cast<int32_t>(rng.below(config.vocab_size));
  }
  return {tokens, targets};
}

// A routed expert tensor's projection over all experts of its layer: its name with the expert
// index taken out ("...experts.4.gate_proj..." -> "...experts.*.gate_proj..."), or "" for other
// tensors.
std::string routed_projection_of(const std::string& name) {
  const std::string marker = ".experts.";
  const size_t at = name.find(marker);
  if (at == std::string::npos) return "";
  const size_t index_begin = at + marker.size();
  const size_t index_end = name.find('.', index_begin);
  return name.substr(0, index_begin) + "*" + name.substr(index_end);
}

// The squared L2 norm of the reference gradient of each routed projection (all experts).
std::map<std::string, double> routed_projection_squares(Transformer<float>& cpu) {
  std::map<std::string, double> squares;
  for (const ParamSpec& spec : cpu.layout().specs()) {
    const std::string projection = routed_projection_of(spec.name);
    if (projection.empty()) continue;
    double& sq = squares[projection];
    for (int64_t i = 0; i < spec.numel; ++i) {
      sq += static_cast<double>(cpu.grads()[spec.offset + i]) * cpu.grads()[spec.offset + i];
    }
  }
  return squares;
}

// Loss and every gradient of one forward/backward of config on the GPU against the CPU reference.
void expect_matches_cpu_reference(const ModelConfig& config, bool grouped) {
  const int64_t batch = 2, seq = 77;
  const int64_t n = batch * seq;
  SelfCommunicator self;
  Transformer<float> cpu(config, self);
  cpu.params() = testing::make_params(cpu.layout(), 7);
  GpuTransformer gpu(config);
  if (config.is_moe()) {
    ASSERT_EQ(gpu.grouped_expert_gemms(), grouped);
  }
  gpu.upload_params(cpu.params());

  Rng rng(11);
  std::vector<int32_t> tokens(static_cast<size_t>(n)), targets(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    tokens[static_cast<size_t>(i)] = static_cast<int32_t>(rng.below(config.vocab_size));
    targets[static_cast<size_t>(i)] =
        i % 13 == 5 ? -1 : static_cast<int32_t>(rng.below(config.vocab_size));
  }
  const double dloss = 0.5;
  cpu.zero_grads();
  const LossBreakdown want = cpu.forward(tokens.data(), targets.data(), batch, seq);
  cpu.backward(dloss);
  gpu.zero_grads();
  const LossBreakdown got = gpu.forward_backward(tokens.data(), targets.data(), batch, seq, dloss);

  EXPECT_EQ(got.num_counted, want.num_counted);
  EXPECT_NEAR(got.ce_loss, want.ce_loss, 1e-2);
  EXPECT_NEAR(got.aux_loss, want.aux_loss, 1e-2 * std::max(1.0, want.aux_loss));
  EXPECT_NEAR(got.z_loss, want.z_loss, 2e-2 * std::max(1.0, want.z_loss));
  EXPECT_NEAR(got.loss, want.loss, 1e-2 * std::max(1.0, want.loss));

  // Per MoE layer: every assignment is counted once, the dropped ones are what the capacity
  // leaves of the GPU's own routing, and where the routing equals the CPU's (no bf16 near-tie
  // flipped) so do the drops.
  ASSERT_EQ(gpu.moe_stats().size(), cpu.moe_stats().size());
  for (size_t m = 0; m < gpu.moe_stats().size(); ++m) {
    const int64_t capacity = ops::expert_capacity(config.capacity_factor, n,
                                                  config.num_experts_per_tok, config.num_experts);
    const MoeFfnStats &mine = gpu.moe_stats()[m], &ref = cpu.moe_stats()[m];
    int64_t routed = 0, dropped = 0;
    for (const int64_t load : mine.expert_load) {
      routed += load;
      dropped += capacity < 0 ? 0 : std::max<int64_t>(0, load - capacity);
    }
    EXPECT_EQ(routed, n * config.num_experts_per_tok) << "MoE layer " << m;
    EXPECT_EQ(mine.num_dropped, dropped) << "MoE layer " << m;
    if (mine.expert_load == ref.expert_load) {
      EXPECT_EQ(mine.num_dropped, ref.num_dropped) << "MoE layer " << m;
    }
  }

  const std::vector<float> grads = gpu.download_grads();
  const std::map<std::string, double> projection_sq = routed_projection_squares(cpu);
  for (const ParamSpec& spec : cpu.layout().specs()) {
    const float* ref = cpu.grads().data() + spec.offset;
    const float* mine = grads.data() + spec.offset;
    double diff_sq = 0.0, ref_sq = 0.0;
    for (int64_t i = 0; i < spec.numel; ++i) {
      ASSERT_TRUE(std::isfinite(mine[i])) << spec.name << "[" << i << "] is not finite";
      diff_sq += (static_cast<double>(mine[i]) - ref[i]) * (static_cast<double>(mine[i]) - ref[i]);
      ref_sq += static_cast<double>(ref[i]) * ref[i];
    }
    const auto projection = projection_sq.find(routed_projection_of(spec.name));
    if (projection == projection_sq.end()) {
      EXPECT_LT(testing::relative_l2(mine, ref, spec.numel), 5e-2) << spec.name;
      continue;
    }
    const double share =
        projection->second / static_cast<double>(config.num_experts * config.num_experts);
    EXPECT_LT(std::sqrt(diff_sq / std::max({ref_sq, share, 1e-30})), 0.15) << spec.name;
  }
}

TEST_P(GpuTransformerTest, LossAndGradientsMatchCpuReference) {
  MF_REQUIRE_GPU();
  const ModelConfig config = testing::gpu_config(GetParam());
  // The test configs' feature sizes are multiples of 8: grouped on Hopper.
  expect_matches_cpu_reference(
      config, GroupedGemm().available(
                  {config.num_experts, config.hidden_size, config.moe_intermediate_size}));
}

// Capacity-based token dropping (factor 0.5: about half the assignments dropped) through both
// expert GEMM paths: the kept rows' experts, the dropped assignments' gates and the residual of
// tokens that lose every slot.
TEST(GpuTransformerCapacity, DroppingMatchesCpuReference) {
  MF_REQUIRE_GPU();
  for (const Architecture arch : {Architecture::kMixtral, Architecture::kQwen2Moe}) {
    SCOPED_TRACE(architecture_name(arch));
    ModelConfig config = testing::gpu_config(arch);
    config.capacity_factor = 0.5;
    expect_matches_cpu_reference(
        config, GroupedGemm().available(
                    {config.num_experts, config.hidden_size, config.moe_intermediate_size}));
    setenv("MOEFORGE_GROUPED_GEMM", "0", 1);
    expect_matches_cpu_reference(config, false);
    unsetenv("MOEFORGE_GROUPED_GEMM");
  }
}

// The aux loss over balance groups of experts (router_balance_groups) and its gradient, as the CPU
// computes them; a weighty aux coefficient so that its gradient shows.
TEST(GpuTransformerBalanceGroups, MatchesCpuReference) {
  MF_REQUIRE_GPU();
  ModelConfig config = testing::gpu_config(Architecture::kMixtral);
  ASSERT_EQ(config.num_experts % 2, 0);
  config.router_balance_groups = 2;
  config.router_aux_loss_coef = 0.5;
  expect_matches_cpu_reference(
      config, GroupedGemm().available(
                  {config.num_experts, config.hidden_size, config.moe_intermediate_size}));
}

// A shared expert of an odd size (rows not 16-byte aligned for cuBLASLt); the routed experts as the
// architecture's test.
TEST(GpuTransformerSharedExpert, OddSizeMatchesCpuReference) {
  MF_REQUIRE_GPU();
  const ModelConfig config = testing::gpu_config_odd_shared_expert();
  expect_matches_cpu_reference(
      config, GroupedGemm().available(
                  {config.num_experts, config.hidden_size, config.moe_intermediate_size}));
}

// head_dim 20, not a multiple of 8: cuDNN's attention rejects it, so its forward and backward run
// our kernels (attention_fallback.h); the rest of the engine takes it (even for RoPE; q_dim 80 and
// kv_dim 40 keep the GEMMs' rows aligned). Without the fallback the first forward throws.
TEST_P(GpuTransformerTest, HeadDimCudnnRejectsMatchesCpuReference) {
  MF_REQUIRE_GPU();
  ModelConfig config = testing::gpu_config(GetParam());
  config.head_dim = 20;
  expect_matches_cpu_reference(
      config, GroupedGemm().available(
                  {config.num_experts, config.hidden_size, config.moe_intermediate_size}));
}

// The experts' per-expert cuBLASLt path (other GPUs, feature sizes not multiples of 8), which an
// H200 only takes when the grouped GEMM is turned off.
TEST_P(GpuTransformerTest, PerExpertGemmPathMatchesCpuReference) {
  MF_REQUIRE_GPU();
  const ModelConfig config = testing::gpu_config(GetParam());
  if (!config.is_moe()) GTEST_SKIP() << "dense model";
  setenv("MOEFORGE_GROUPED_GEMM", "0", 1);
  expect_matches_cpu_reference(config, false);
  unsetenv("MOEFORGE_GROUPED_GEMM");
}

TEST_P(GpuTransformerTest, GradientsAccumulateAcrossMicroBatches) {
  MF_REQUIRE_GPU();
  const ModelConfig config = testing::gpu_config(GetParam());
  const int64_t seq = 40;
  GpuTransformer gpu(config);
  const std::vector<float> params = testing::make_params(gpu.layout(), 3);
  gpu.upload_params(params);
  const auto [tokens, targets] = random_batch(config, seq, 5);
  gpu.zero_grads();
  gpu.forward_backward(tokens.data(), targets.data(), 1, seq, 1.0);
  const std::vector<float> once = gpu.download_grads();
  gpu.forward_backward(tokens.data(), targets.data(), 1, seq, 1.0);
  std::vector<float> twice = gpu.download_grads();
  // cuDNN's attention backward may sum in a different order on each run, so not bit for bit;
  // assigning instead of accumulating would give a relative error of 0.5.
  for (float& x : twice) x *= 0.5f;
  EXPECT_LT(testing::relative_l2(twice.data(), once.data(), static_cast<int64_t>(once.size())),
            1e-3);
}

TEST_P(GpuTransformerTest, AdamWStepMatchesCpuOptimizer) {
  MF_REQUIRE_GPU();
  const ModelConfig config = testing::gpu_config(GetParam());
  const int64_t seq = 40;
  GpuTransformer gpu(config);
  const std::vector<float> params = testing::make_params(gpu.layout(), 9);
  gpu.upload_params(params);
  const auto [tokens, targets] = random_batch(config, seq, 8);
  gpu.zero_grads();
  gpu.forward_backward(tokens.data(), targets.data(), 1, seq, 1.0);
  std::vector<float> grads = gpu.download_grads();

  const AdamWHyper hyper;
  const std::vector<std::string> no_decay = {"norm", "bias"};
  GpuAdamW gpu_opt(gpu, hyper, no_decay);
  const GpuAdamWResult result = gpu_opt.step(1e-3, 0.5);
  ASSERT_TRUE(result.applied);

  AdamW cpu_opt(gpu.layout(), hyper, no_decay);
  const double norm = global_grad_norm(grads.data(), static_cast<int64_t>(grads.size()));
  EXPECT_NEAR(result.grad_norm, norm, 1e-9 * norm);
  clip_grad_norm(grads.data(), static_cast<int64_t>(grads.size()), norm, 0.5);
  std::vector<float> want = params;
  cpu_opt.step(want.data(), grads.data(), 1e-3);
  const std::vector<float> got = gpu.download_params();
  for (size_t i = 0; i < want.size(); ++i) {
    ASSERT_NEAR(got[i], want[i], 4e-7f * std::max(1.0f, std::fabs(want[i]))) << "element " << i;
  }
}

// Several optimizer steps on both devices from the same weights and batches: each step's loss must
// stay within the one-step tolerance. The learning rate (1e-3 against weights of std 0.05) keeps
// Adam's sign-like first steps from turning bf16 noise into different weights: at 1e-2 a routing
// near-tie that flips on one device moves a whole expert by 20% of its scale, and the MoE models'
// losses drift by 2-6% within five steps (measured on the H200).
TEST_P(GpuTransformerTest, SeveralTrainingStepsTrackCpuReference) {
  MF_REQUIRE_GPU();
  const ModelConfig config = testing::gpu_config(GetParam());
  const int64_t batch = 2, seq = 45, steps = 5;
  const double lr = 1e-3;
  SelfCommunicator self;
  Transformer<float> cpu(config, self);
  cpu.params() = testing::make_params(cpu.layout(), 13);
  GpuTransformer gpu(config);
  gpu.upload_params(cpu.params());
  const AdamWHyper hyper;
  const std::vector<std::string> no_decay = {"norm", "bias"};
  AdamW cpu_opt(cpu.layout(), hyper, no_decay);
  GpuAdamW gpu_opt(gpu, hyper, no_decay);
  Rng rng(17);
  std::vector<int32_t> tokens(static_cast<size_t>(batch * seq)), targets(tokens.size());
  for (int64_t step = 0; step < steps; ++step) {
    SCOPED_TRACE("step " + std::to_string(step));
    for (size_t i = 0; i < tokens.size(); ++i) {
      tokens[i] = static_cast<int32_t>(rng.below(config.vocab_size));
      targets[i] = static_cast<int32_t>(rng.below(config.vocab_size));
    }
    cpu.zero_grads();
    const double want = cpu.forward(tokens.data(), targets.data(), batch, seq).loss;
    cpu.backward(1.0);
    const double got =
        gpu.forward_backward(tokens.data(), targets.data(), batch, seq, 1.0, GradMode::kAssign)
            .loss;
    EXPECT_NEAR(got, want, 1e-2 * std::max(1.0, want));
    std::vector<float>& grads = cpu.grads();
    const double norm = global_grad_norm(grads.data(), static_cast<int64_t>(grads.size()));
    clip_grad_norm(grads.data(), static_cast<int64_t>(grads.size()), norm, 1.0);
    cpu_opt.step(cpu.params().data(), grads.data(), lr);
    ASSERT_TRUE(gpu_opt.step(lr, 1.0).applied);
  }
}

// Every parameter tensor of got within relative L2 error max_error of want.
void expect_same_gradients(const ParameterLayout& layout, const std::vector<float>& got,
                           const std::vector<float>& want, double max_error) {
  for (const ParamSpec& spec : layout.specs()) {
    const float* mine = got.data() + spec.offset;
    for (int64_t i = 0; i < spec.numel; ++i) {
      ASSERT_TRUE(std::isfinite(mine[i])) << spec.name << "[" << i << "] is not finite";
    }
    EXPECT_LT(testing::relative_l2(mine, want.data() + spec.offset, spec.numel), max_error)
        << spec.name;
  }
}

// kAssign never reads the gradient buffer: over NaNs it gives what zeroing and accumulating give.
// Per tensor up to cuDNN's run-to-run attention backward (a broken or skipped range leaves NaN or
// errors of order 1).
TEST_P(GpuTransformerTest, AssignedGradientsEqualZeroedAndAccumulatedOnes) {
  MF_REQUIRE_GPU();
  const ModelConfig config = testing::gpu_config(GetParam());
  const int64_t batch = 2, seq = 37;
  GpuTransformer gpu(config);
  gpu.upload_params(testing::make_params(gpu.layout(), 23));
  const auto [tokens, targets] = random_batch(config, batch * seq, 29);
  gpu.upload_grads(std::vector<float>(static_cast<size_t>(gpu.num_params()), std::nanf("")));
  const double assigned =
      gpu.forward_backward(tokens.data(), targets.data(), batch, seq, 1.0, GradMode::kAssign).loss;
  const std::vector<float> got = gpu.download_grads();
  gpu.zero_grads();
  const double accumulated =
      gpu.forward_backward(tokens.data(), targets.data(), batch, seq, 1.0, GradMode::kAccumulate)
          .loss;
  EXPECT_EQ(assigned, accumulated);
  expect_same_gradients(gpu.layout(), got, gpu.download_grads(), 1e-3);
}

// A model that has run other batches (of another shape, so its buffers were resized) gives the
// same loss and gradients as a fresh one: nothing of an earlier call leaks into the next.
TEST_P(GpuTransformerTest, ForwardBackwardDoesNotDependOnEarlierCalls) {
  MF_REQUIRE_GPU();
  const ModelConfig config = testing::gpu_config(GetParam());
  const std::vector<float> params = testing::make_params(ParameterLayout(config), 31);
  const auto [tokens, targets] = random_batch(config, 2 * 41, 37);
  GpuTransformer used(config);
  used.upload_params(params);
  for (const auto& [batch, seq, seed] : {std::tuple<int64_t, int64_t, uint64_t>{2, 41, 41},
                                         std::tuple<int64_t, int64_t, uint64_t>{1, 29, 43}}) {
    const auto [other_tokens, other_targets] = random_batch(config, batch * seq, seed);
    used.forward_backward(other_tokens.data(), other_targets.data(), batch, seq, 1.0,
                          GradMode::kAccumulate);
  }
  const double used_loss =
      used.forward_backward(tokens.data(), targets.data(), 2, 41, 1.0, GradMode::kAssign).loss;
  GpuTransformer fresh(config);
  fresh.upload_params(params);
  fresh.zero_grads();
  const double fresh_loss = fresh.forward_backward(tokens.data(), targets.data(), 2, 41, 1.0).loss;
  EXPECT_EQ(used_loss, fresh_loss);
  expect_same_gradients(used.layout(), used.download_grads(), fresh.download_grads(), 1e-3);
}

TEST_P(GpuTransformerTest, SelectiveRecomputeGivesTheSameLossAndGradients) {
  MF_REQUIRE_GPU();
  const ModelConfig config = testing::gpu_config(GetParam());
  const int64_t batch = 2, seq = 33;
  const auto [tokens, targets] = random_batch(config, batch * seq, 21);
  std::vector<float> grads[2];
  double losses[2] = {0.0, 0.0};
  for (int mode = 0; mode < 2; ++mode) {
    GpuTransformer gpu(config, mode == 0 ? Recompute::kNone : Recompute::kSelective);
    gpu.upload_params(testing::make_params(gpu.layout(), 4));
    gpu.zero_grads();
    losses[mode] = gpu.forward_backward(tokens.data(), targets.data(), batch, seq, 1.0).loss;
    grads[mode] = gpu.download_grads();
  }
  // Recomputation repeats the same kernels on the same inputs: equal up to cuDNN's attention
  // backward, whose sums may be ordered differently from run to run.
  EXPECT_EQ(losses[0], losses[1]);
  EXPECT_LT(
      testing::relative_l2(grads[1].data(), grads[0].data(), static_cast<int64_t>(grads[0].size())),
      1e-3);
}

// The backward reports each range of grad_ready_ranges() once, in order, as soon as the last
// kernel writing it is enqueued: a copy of the range enqueued at the report equals the range's
// final value bit for bit (a report made before one of its writes copies an older value). On a
// second, accumulating micro-batch (every write changes the values), with and without selective
// recompute (kernels between the layers' backward); a forward-only call reports nothing.
TEST_P(GpuTransformerTest, GradReadyHookReportsEachRangeWhenFinal) {
  MF_REQUIRE_GPU();
  const ModelConfig config = testing::gpu_config(GetParam());
  const int64_t batch = 2, seq = 37;
  const auto [tokens, targets] = random_batch(config, batch * seq, 29);
  const auto [tokens2, targets2] = random_batch(config, batch * seq, 31);
  for (const Recompute recompute : {Recompute::kNone, Recompute::kSelective}) {
    GpuTransformer gpu(config, recompute);
    gpu.upload_params(testing::make_params(gpu.layout(), 23));
    const std::vector<GradRange>& ranges = gpu.grad_ready_ranges();
    int64_t below = gpu.num_params();
    for (const GradRange& r : ranges) {
      ASSERT_GT(r.count, 0);
      ASSERT_EQ(r.offset + r.count, below) << "the ranges must tile the buffer, descending";
      below = r.offset;
    }
    ASSERT_EQ(below, 0);
    ASSERT_EQ(ranges.size(), 2 + 2 * static_cast<size_t>(config.num_layers));

    gpu.forward_backward(tokens.data(), targets.data(), batch, seq, 1.0, GradMode::kAssign);
    const auto count = static_cast<size_t>(gpu.num_params());
    DeviceBuffer<float> snapshot;
    snapshot.upload(std::vector<float>(count, std::nanf("")));
    std::vector<size_t> reported;
    gpu.set_grad_ready_hook([&](size_t index) {
      reported.push_back(index);
      const GradRange& r = ranges.at(index);
      EXPECT_EQ(cudaMemcpyAsync(snapshot.data() + r.offset, gpu.grads() + r.offset,
                                static_cast<size_t>(r.count) * sizeof(float),
                                cudaMemcpyDeviceToDevice, gpu.stream()),
                cudaSuccess);
    });
    gpu.forward_backward(tokens2.data(), targets2.data(), batch, seq, 1.0, GradMode::kAccumulate);
    gpu.set_grad_ready_hook(nullptr);
    std::vector<size_t> in_order(ranges.size());
    for (size_t i = 0; i < in_order.size(); ++i) in_order[i] = i;
    EXPECT_EQ(reported, in_order);
    const std::vector<float> final_grads = gpu.download_grads(), copied = snapshot.download();
    for (const ParamSpec& spec : gpu.layout().specs()) {
      for (int64_t i = spec.offset; i < spec.offset + spec.numel; ++i) {
        const auto at = static_cast<size_t>(i);
        ASSERT_EQ(std::bit_cast<uint32_t>(copied[at]), std::bit_cast<uint32_t>(final_grads[at]))
            << spec.name << " element " << i - spec.offset << " (recompute "
            << (recompute == Recompute::kNone ? "none" : "selective")
            << "): reported before its last write";
      }
    }

    gpu.set_grad_ready_hook(
        [](size_t index) { ADD_FAILURE() << "forward only reported " << index; });
    gpu.forward_backward(tokens.data(), targets.data(), batch, seq, 0.0);
    gpu.set_grad_ready_hook(nullptr);
  }
}

// A batch whose distinct tokens and counted targets differ from step to step: tokens drawn from
// the first `span` ids of the vocabulary, every `skip`-th target ignored.
std::pair<std::vector<int32_t>, std::vector<int32_t>> varied_batch(int64_t count, int64_t span,
                                                                   int64_t skip, uint64_t seed) {
  Rng rng(seed);
  std::vector<int32_t> tokens(static_cast<size_t>(count)), targets(tokens.size());
  for (size_t i = 0; i < tokens.size(); ++i) {
    tokens[i] = static_cast<int32_t>(rng.below(static_cast<uint64_t>(span)));
    targets[i] = i % static_cast<size_t>(skip) == 1 ? -1 : static_cast<int32_t>(rng.below(span));
  }
  return {tokens, targets};
}

// CUDA graphs (set_cuda_graphs) replay what the eager step computes: over steps whose tokens,
// distinct tokens, ignored targets (the cross-entropy's scale) and weights all change, a graphed
// model gives the eager model's losses and expert loads exactly and its gradients up to cuDNN's
// run-to-run attention backward; the first step of each GradMode runs eagerly, the second
// captures, later ones replay.
TEST_P(GpuTransformerTest, CudaGraphStepsEqualEagerSteps) {
  MF_REQUIRE_GPU();
  const ModelConfig config = testing::gpu_config(GetParam());
  const int64_t batch = 2, seq = 45;
  GpuTransformer eager(config), graphed(config);
  if (config.is_moe() && !graphed.grouped_expert_gemms()) {
    EXPECT_THROW(graphed.set_cuda_graphs(true), Error);
    GTEST_SKIP() << "no grouped expert GEMMs on this GPU: graphs are refused";
  }
  graphed.set_cuda_graphs(true);
  const struct {
    int64_t span, skip;
    GradMode mode;
    int64_t captures_after;
  } steps[] = {{301, 7, GradMode::kAssign, 0},    {40, 3, GradMode::kAssign, 1},
               {150, 11, GradMode::kAssign, 1},   {301, 2, GradMode::kAccumulate, 1},
               {90, 5, GradMode::kAccumulate, 2}, {200, 4, GradMode::kAssign, 2},
               {17, 6, GradMode::kAccumulate, 2}};
  uint64_t seed = 50;
  for (const auto& step : steps) {
    SCOPED_TRACE("step seed " + std::to_string(seed));
    const std::vector<float> params = testing::make_params(eager.layout(), seed);
    eager.upload_params(params);
    graphed.upload_params(params);
    const auto [tokens, targets] = varied_batch(batch * seq, step.span, step.skip, seed + 1);
    seed += 2;
    const LossBreakdown want =
        eager.forward_backward(tokens.data(), targets.data(), batch, seq, 0.75, step.mode);
    const LossBreakdown got =
        graphed.forward_backward(tokens.data(), targets.data(), batch, seq, 0.75, step.mode);
    EXPECT_EQ(got.num_counted, want.num_counted);
    EXPECT_EQ(got.loss, want.loss);
    EXPECT_EQ(got.ce_loss, want.ce_loss);
    EXPECT_EQ(got.aux_loss, want.aux_loss);
    ASSERT_EQ(graphed.moe_stats().size(), eager.moe_stats().size());
    for (size_t m = 0; m < eager.moe_stats().size(); ++m) {
      EXPECT_EQ(graphed.moe_stats()[m].expert_load, eager.moe_stats()[m].expert_load);
      EXPECT_EQ(graphed.moe_stats()[m].num_dropped, eager.moe_stats()[m].num_dropped);
    }
    expect_same_gradients(eager.layout(), graphed.download_grads(), eager.download_grads(), 1e-3);
    EXPECT_EQ(graphed.graph_captures(), step.captures_after);
  }
  // A forward-only call runs eagerly and leaves the graphs as they are.
  const auto [tokens, targets] = varied_batch(batch * seq, 301, 5, 99);
  EXPECT_EQ(graphed.forward_backward(tokens.data(), targets.data(), batch, seq, 0.0).loss,
            eager.forward_backward(tokens.data(), targets.data(), batch, seq, 0.0).loss);
  EXPECT_EQ(graphed.graph_captures(), 2);
}

// Selective recompute's kernels (the normed inputs and SwiGLU rebuilt in the backward) replay
// in the graph like the rest: three steps, the third a replay, equal to eager ones.
TEST_P(GpuTransformerTest, CudaGraphStepsWithSelectiveRecompute) {
  MF_REQUIRE_GPU();
  const ModelConfig config = testing::gpu_config(GetParam());
  const int64_t batch = 2, seq = 38;
  GpuTransformer eager(config, Recompute::kSelective), graphed(config, Recompute::kSelective);
  if (config.is_moe() && !graphed.grouped_expert_gemms()) GTEST_SKIP() << "no grouped GEMMs";
  graphed.set_cuda_graphs(true);
  for (uint64_t seed = 70; seed < 76; seed += 2) {
    const std::vector<float> params = testing::make_params(eager.layout(), seed);
    eager.upload_params(params);
    graphed.upload_params(params);
    const auto [tokens, targets] = varied_batch(batch * seq, 120 + 60 * (seed % 3), 4, seed + 1);
    const double want =
        eager.forward_backward(tokens.data(), targets.data(), batch, seq, 1.0, GradMode::kAssign)
            .loss;
    const double got =
        graphed.forward_backward(tokens.data(), targets.data(), batch, seq, 1.0, GradMode::kAssign)
            .loss;
    EXPECT_EQ(got, want) << "seed " << seed;
    expect_same_gradients(eager.layout(), graphed.download_grads(), eager.download_grads(), 1e-3);
  }
  EXPECT_EQ(graphed.graph_captures(), 1);
}

// A graph would run a hook only while it is captured: steps with one are refused, and a new
// shape drops the graphs (its buffers move), so the next step of a seen key runs eagerly again.
TEST_P(GpuTransformerTest, CudaGraphsRefuseHooksAndFollowNewShapes) {
  MF_REQUIRE_GPU();
  const ModelConfig config = testing::gpu_config(GetParam());
  GpuTransformer gpu(config);
  if (config.is_moe() && !gpu.grouped_expert_gemms()) GTEST_SKIP() << "no grouped expert GEMMs";
  gpu.upload_params(testing::make_params(gpu.layout(), 3));
  gpu.set_cuda_graphs(true);
  const auto [tokens, targets] = random_batch(config, 2 * 30, 5);
  gpu.set_grad_ready_hook([](size_t) {});
  EXPECT_THROW(gpu.forward_backward(tokens.data(), targets.data(), 2, 30, 1.0), Error);
  gpu.set_grad_ready_hook(nullptr);
  for (int i = 0; i < 3; ++i) gpu.forward_backward(tokens.data(), targets.data(), 2, 30, 1.0);
  EXPECT_EQ(gpu.graph_captures(), 1);
  const double graphed = gpu.forward_backward(tokens.data(), targets.data(), 2, 30, 1.0).loss;
  gpu.forward_backward(tokens.data(), targets.data(), 1, 60, 1.0);
  EXPECT_EQ(gpu.forward_backward(tokens.data(), targets.data(), 2, 30, 1.0).loss, graphed);
  EXPECT_EQ(gpu.graph_captures(), 1) << "the first step after a new shape runs eagerly";
  gpu.forward_backward(tokens.data(), targets.data(), 2, 30, 1.0);
  EXPECT_EQ(gpu.graph_captures(), 2);
}

INSTANTIATE_TEST_SUITE_P(Architectures, GpuTransformerTest, testing::every_architecture(),
                         testing::architecture_test_name);

}  // namespace
}  // namespace moeforge::cuda
