// GpuTransformer over a sequence/expert-parallel group of n GPUs (set_expert_parallel_group, one
// rank per GPU, NCCL) against the same model on one GPU over the whole batch: each rank gets its
// slice of every sequence; the loss must be the group's and the gradients, summed over the ranks,
// the one-GPU gradients. Run alone (n = 1: the group is the model itself) and under mpirun (2 and
// 4 ranks in ctest; skipping as comm/nccl/nccl_test_harness.h says). Both sides run in bf16 with
// different splits of the same sums (attention over other sequence blocks, the expert outputs
// summed by a reduce-scatter), so the bounds are gpu_transformer_test.cpp's against the fp32
// reference: loss 1e-2, each tensor's relative L2 5e-2, routed experts 0.15 of the larger of
// their own gradient and their share of the layer's projection (a near-tie can route a token
// differently).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>
#include <vector>

#include "comm/nccl/nccl_test_harness.h"
#include "core/error.h"
#include "core/rng.h"
#include "cuda/gpu_test_models.h"
#include "cuda/gpu_transformer.h"

namespace moeforge::cuda {
namespace {

using moeforge::testing::nccl;

// The architecture's test model with head and expert counts that split over num_ranks.
ModelConfig config_for(Architecture arch, int64_t num_ranks) {
  ModelConfig c = testing::gpu_config(arch);
  c.num_kv_heads = std::max<int64_t>(c.num_kv_heads, num_ranks);
  c.num_heads = std::max<int64_t>(c.num_heads, 2 * c.num_kv_heads);
  if (c.num_experts > 0 && c.num_experts % num_ranks != 0) {
    c.num_experts = (c.num_experts / num_ranks + 1) * num_ranks;
  }
  return c;
}

// ".experts.3.up_proj" -> ".experts.*.up_proj"; "" for other tensors.
std::string projection_of(const std::string& name) {
  const size_t at = name.find(".experts.");
  if (at == std::string::npos) return "";
  const size_t begin = at + 9, end = name.find('.', begin);
  return name.substr(0, begin) + "*" + name.substr(end);
}

// What a rank of the group computed.
struct GroupRun {
  std::vector<float> grads;  // this rank's (its layout's order)
  double loss = 0.0;
  int64_t overlap_chunks = 0;              // the chunks its MoE layers ran in
  std::map<std::string, double> phase_ms;  // with timed: the phase timer's totals
};

// Returns this rank's run after checking it against one GPU (timed: with the group model's phase
// timer on).
GroupRun expect_group_matches_one_gpu(Architecture arch, GradMode mode,
                                      const ExpertExchange& exchange = {}, bool timed = false) {
  NcclCommunicator& comm = nccl();
  const int64_t num_ranks = comm.size(), rank = comm.rank();
  const ModelConfig config = config_for(arch, num_ranks);
  const int64_t batch = 2, seq = 24 * num_ranks, local_seq = seq / num_ranks;
  const std::vector<float> params = testing::make_params(ParameterLayout(config), 5);
  Rng rng(17);
  std::vector<int32_t> tokens(static_cast<size_t>(batch * seq)), targets(tokens.size());
  for (size_t i = 0; i < tokens.size(); ++i) {
    tokens[i] = static_cast<int32_t>(rng.below(config.vocab_size));
    targets[i] = i % 11 == 3 ? -1 : static_cast<int32_t>(rng.below(config.vocab_size));
  }

  GpuTransformer whole(config);
  whole.upload_params(params);
  whole.zero_grads();
  const LossBreakdown want = whole.forward_backward(tokens.data(), targets.data(), batch, seq, 0.5);
  const std::vector<float> want_grads = whole.download_grads();

  // This rank holds its experts only: the whole model's weights copied by name.
  GpuTransformer part(
      config, Recompute::kNone,
      ExpertShard{num_ranks > 1 && config.is_moe() ? rank : 0, config.is_moe() ? num_ranks : 1});
  const ParameterLayout& local = part.layout();
  std::vector<float> local_params(static_cast<size_t>(local.num_params()));
  for (const ParamSpec& spec : local.specs()) {
    const ParamSpec* from = whole.layout().find(spec.name);
    MF_CHECK(from != nullptr, "{} is not a tensor of the whole model", spec.name);
    std::copy(params.begin() + from->offset, params.begin() + from->offset + from->numel,
              local_params.begin() + spec.offset);
  }
  const cudaStream_t previous = comm.stream();
  comm.set_stream(part.stream());
  part.set_expert_parallel_group(comm, exchange);
  part.upload_params(local_params);
  if (mode == GradMode::kAssign) {
    part.upload_grads(std::vector<float>(static_cast<size_t>(part.num_params()), std::nanf("")));
  } else {
    part.zero_grads();
  }
  std::vector<int32_t> my_tokens, my_targets;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t first = b * seq + rank * local_seq;
    my_tokens.insert(my_tokens.end(), tokens.begin() + first, tokens.begin() + first + local_seq);
    my_targets.insert(my_targets.end(), targets.begin() + first,
                      targets.begin() + first + local_seq);
  }
  part.timer().set_enabled(timed);
  const LossBreakdown got =
      part.forward_backward(my_tokens.data(), my_targets.data(), batch, local_seq, 0.5, mode);
  comm.set_stream(previous);
  // The replicated weights' gradients summed over the group; each rank's experts have theirs.
  const std::vector<float> local_grads = part.download_grads();
  std::vector<float> summed = local_grads;
  for (const ParamRange& r : local.replicated_ranges()) {
    world_communicator().all_reduce_sum(summed.data() + r.offset, static_cast<size_t>(r.count));
  }

  EXPECT_EQ(got.num_counted, want.num_counted);
  EXPECT_NEAR(got.ce_loss, want.ce_loss, 1e-2);
  EXPECT_NEAR(got.aux_loss, want.aux_loss, 1e-2 * std::max(1.0, want.aux_loss));
  EXPECT_NEAR(got.z_loss, want.z_loss, 2e-2 * std::max(1.0, want.z_loss));
  EXPECT_EQ(part.moe_stats().size(), whole.moe_stats().size());
  for (size_t m = 0; m < part.moe_stats().size(); ++m) {
    int64_t routed = 0;
    for (const int64_t load : part.moe_stats()[m].expert_load) routed += load;
    EXPECT_EQ(routed, batch * seq * config.num_experts_per_tok) << "MoE layer " << m;
  }

  std::map<std::string, double> projection_sq;
  for (const ParamSpec& spec : whole.layout().specs()) {
    const std::string projection = projection_of(spec.name);
    if (projection.empty()) continue;
    for (int64_t i = 0; i < spec.numel; ++i) {
      projection_sq[projection] +=
          double(want_grads[spec.offset + i]) * want_grads[spec.offset + i];
    }
  }
  if (config.is_moe() && num_ranks > 1) {
    EXPECT_LT(local.num_params(), whole.layout().num_params());
  }
  for (const ParamSpec& spec : local.specs()) {
    const ParamSpec& at = *whole.layout().find(spec.name);
    double diff_sq = 0.0, ref_sq = 0.0;
    for (int64_t i = 0; i < spec.numel; ++i) {
      const double ref = want_grads[at.offset + i], mine = summed[spec.offset + i];
      diff_sq += (mine - ref) * (mine - ref);
      ref_sq += ref * ref;
    }
    const std::string projection = projection_of(spec.name);
    const double scale =
        projection.empty()
            ? ref_sq
            : std::max(ref_sq, projection_sq[projection] / static_cast<double>(config.num_experts));
    const double bound = projection.empty() ? 5e-2 : 0.15;
    EXPECT_LE(std::sqrt(diff_sq / std::max(scale, 1e-30)), bound)
        << spec.name << " (" << num_ranks << " ranks, rank " << rank << ")";
  }
  return {local_grads, got.loss, part.expert_overlap_chunks(), part.timer().totals_ms()};
}

// The tensor of `layout` whose gradients differ most (relative L2) between two vectors.
struct TensorDifference {
  std::string name;
  double relative = 0.0;
};
TensorDifference max_tensor_difference(const ParameterLayout& layout, const std::vector<float>& got,
                                       const std::vector<float>& want) {
  TensorDifference worst;
  for (const ParamSpec& spec : layout.specs()) {
    double diff_sq = 0.0, ref_sq = 0.0;
    for (int64_t i = spec.offset; i < spec.offset + spec.numel; ++i) {
      diff_sq += (double(got[i]) - want[i]) * (double(got[i]) - want[i]);
      ref_sq += double(want[i]) * want[i];
    }
    const double relative = std::sqrt(diff_sq / std::max(ref_sq, 1e-30));
    if (relative >= worst.relative) worst = {spec.name, relative};
  }
  return worst;
}

class ExpertParallelGpu : public ::testing::TestWithParam<Architecture> {};

TEST_P(ExpertParallelGpu, GroupEqualsOneGpuOverTheWholeBatch) {
  MF_REQUIRE_NCCL_GPUS();
  EXPECT_EQ(expect_group_matches_one_gpu(GetParam(), GradMode::kAccumulate).overlap_chunks, 1);
}

// parallel.ep_overlap_chunks: the chunks route and compute every token as one exchange does, on
// each GEMM path (grouped, per-expert cuBLASLt calls, whose host row ranges each chunk copies)
// against the same path unchunked. Only rounding differs: the experts' fp32 weight gradients add
// up per chunk, and the fp32 router logits may come from another GEMM kernel for another row
// count. Measured 1.2e-7 of a tensor on both paths (session 14; session 13's 0.8% on the
// per-expert path came from comparing it with the grouped path unchunked). Bound 1e-5: a few fp32
// ulps with room, while a misplaced chunk or a chunk's weight gradients lost are tens of percent.
// 3 chunks: 48 tokens per rank.
TEST_P(ExpertParallelGpu, OverlapChunksMatchTheUnchunkedExchange) {
  MF_REQUIRE_NCCL_GPUS();
  if (nccl().size() == 1 || !testing::gpu_config(GetParam()).is_moe()) {
    GTEST_SKIP() << "no expert exchanges";
  }
  const ParameterLayout layout(config_for(GetParam(), nccl().size()),
                               ExpertShard{nccl().rank(), nccl().size()});
  for (const bool grouped : {true, false}) {
    SCOPED_TRACE(grouped ? "grouped GEMMs" : "per-expert GEMMs");
    if (!grouped) setenv("MOEFORGE_GROUPED_GEMM", "0", 1);
    const GroupRun whole =
        expect_group_matches_one_gpu(GetParam(), GradMode::kAssign, {GradReduceDtype::kFloat32, 1});
    const GroupRun chunked =
        expect_group_matches_one_gpu(GetParam(), GradMode::kAssign, {GradReduceDtype::kFloat32, 3});
    unsetenv("MOEFORGE_GROUPED_GEMM");
    EXPECT_EQ(whole.overlap_chunks, 1);
    EXPECT_EQ(chunked.overlap_chunks, 3);
    EXPECT_NEAR(chunked.loss, whole.loss, 1e-5 * std::max(1.0, std::abs(whole.loss)));
    const TensorDifference worst = max_tensor_difference(layout, chunked.grads, whole.grads);
    EXPECT_LE(worst.relative, 1e-5) << worst.name;
    std::printf("rank %d, %s: chunks 3 against 1, largest difference %.2e (%s)\n", nccl().rank(),
                grouped ? "grouped" : "per-expert", worst.relative, worst.name.c_str());
  }
}

// With the phase timer on, each exposed exchange is split into the wait for the slowest rank
// (<phase>_wait, a one-element all-reduce) and the transfer (<phase>_exchange), and the model
// still computes the one-GPU gradients; with it off nothing is timed (and no extra collective
// runs: a rank that ran one alone would hang the group).
TEST_P(ExpertParallelGpu, PhaseTimerSplitsWaitsFromExchanges) {
  MF_REQUIRE_NCCL_GPUS();
  if (nccl().size() == 1) GTEST_SKIP() << "one rank exchanges nothing";
  const GroupRun timed = expect_group_matches_one_gpu(GetParam(), GradMode::kAccumulate,
                                                      {GradReduceDtype::kFloat32, 2}, true);
  std::vector<std::string> phases = {"attention_wait", "attention_exchange",
                                     "attention_backward_wait", "attention_backward_exchange"};
  if (testing::gpu_config(GetParam()).is_moe()) {
    for (const char* p : {"moe_wait", "moe_exchange", "moe_backward_wait", "moe_backward_exchange"})
      phases.emplace_back(p);
  }
  for (const std::string& phase : phases) {
    EXPECT_EQ(timed.phase_ms.count(phase), 1u) << phase;
  }
  const GroupRun untimed = expect_group_matches_one_gpu(GetParam(), GradMode::kAccumulate,
                                                        {GradReduceDtype::kFloat32, 2});
  EXPECT_TRUE(untimed.phase_ms.empty());
}

// kAssign writes every gradient this rank holds (NaN before): the sums are still the one-GPU
// gradient.
TEST_P(ExpertParallelGpu, AssignedGradientsZeroTheOtherRanksExperts) {
  MF_REQUIRE_NCCL_GPUS();
  expect_group_matches_one_gpu(GetParam(), GradMode::kAssign);
}

// parallel.ep_comm_dtype bf16: the MoE exchanges compressed to bf16 still give the one-GPU
// gradients within the same bounds, and they did run (the gradients differ from the fp32
// exchanges' somewhere); in 2 overlapped chunks, whose bf16 all-gathers widen chunk by chunk.
TEST_P(ExpertParallelGpu, Bf16ExchangesTrackOneGpu) {
  MF_REQUIRE_NCCL_GPUS();
  if (nccl().size() == 1) GTEST_SKIP() << "one rank exchanges nothing";
  const std::vector<float> fp32 = expect_group_matches_one_gpu(GetParam(), GradMode::kAccumulate,
                                                               {GradReduceDtype::kFloat32, 2})
                                      .grads;
  const std::vector<float> compressed =
      expect_group_matches_one_gpu(GetParam(), GradMode::kAccumulate,
                                   {GradReduceDtype::kBfloat16, 2})
          .grads;
  if (!testing::gpu_config(GetParam()).is_moe()) return;
  EXPECT_NE(fp32, compressed);
}

TEST(ExpertParallelGpuConfig, RejectsCountsThatDoNotSplit) {
  MF_REQUIRE_NCCL_GPUS();
  if (nccl().size() == 1) GTEST_SKIP() << "every count splits over one rank";
  ModelConfig config = testing::gpu_config(Architecture::kMixtral);
  config.num_kv_heads = 1;
  config.num_heads = 3;
  GpuTransformer model(config);
  EXPECT_THROW(model.set_expert_parallel_group(nccl()), Error);
}

// Token dropping ranks the whole group's tokens per expert: chunks would change which are kept.
TEST(ExpertParallelGpuConfig, RejectsOverlapChunksUnderACapacityFactor) {
  MF_REQUIRE_NCCL_GPUS();
  ModelConfig config = config_for(Architecture::kMixtral, nccl().size());
  config.capacity_factor = 1.25;
  const ExpertShard shard{nccl().rank(), nccl().size()};
  GpuTransformer chunked(config, Recompute::kNone, shard);
  EXPECT_THROW(chunked.set_expert_parallel_group(nccl(), {GradReduceDtype::kFloat32, 2}), Error);
  GpuTransformer unchunked(config, Recompute::kNone, shard);
  EXPECT_NO_THROW(unchunked.set_expert_parallel_group(nccl(), {}));
  GpuTransformer none(config_for(Architecture::kMixtral, nccl().size()), Recompute::kNone, shard);
  EXPECT_THROW(none.set_expert_parallel_group(nccl(), {GradReduceDtype::kFloat32, 0}), Error);
}

std::string arch_name(const ::testing::TestParamInfo<Architecture>& info) {
  return architecture_name(info.param);
}

INSTANTIATE_TEST_SUITE_P(Architectures, ExpertParallelGpu,
                         ::testing::Values(Architecture::kLlama, Architecture::kMixtral,
                                           Architecture::kQwen2Moe, Architecture::kQwen3Moe),
                         arch_name);

}  // namespace
}  // namespace moeforge::cuda

int main(int argc, char** argv) {
  return moeforge::testing::run_nccl_tests(argc, argv, "expert_parallel_tests");
}
