// GpuTransformer over a sequence/expert-parallel group of n GPUs (set_expert_parallel_group, one
// rank per GPU, NCCL) against the same model on one GPU over the whole batch: each rank gets its
// slice of every sequence; the loss must be the group's and the gradients, summed over the ranks,
// the one-GPU gradients. Run alone (n = 1: the group is the model itself) and under mpirun (2 and
// 4 ranks in ctest; skipping as comm/nccl/nccl_test_harness.h says). Both sides run in bf16 with
// different splits of the same sums (attention over other sequence blocks, the expert outputs
// summed by a reduce-scatter): the bounds of group_test_util.h. The MoE layers take the
// all-gather dispatch unless a test asks for the all-to-all (parallel.ep_dispatch), which is also
// compared with the all-gather of the same group, and whose device part alone is compared bit for
// bit with the all-gather path's rows.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "comm/nccl/nccl_test_harness.h"
#include "core/error.h"
#include "core/rng.h"
#include "cuda/bf16.h"
#include "cuda/device_memory.h"
#include "cuda/gpu_test_models.h"
#include "cuda/gpu_transformer.h"
#include "cuda/group_test_util.h"
#include "cuda/moe_dispatch_a2a.h"
#include "model/moe_dispatch_a2a.h"
#include "model/moe_ffn.h"
#include "ops/row_map.h"

namespace moeforge::cuda {
namespace {

using moeforge::testing::nccl;
using testing::group_case;
using testing::GroupCase;
using testing::max_tensor_difference;
using testing::OneGpuRun;
using testing::run_one_gpu;
using testing::TensorDifference;

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

// The architecture's test model over the ranks, 2 sequences of 24 positions per rank.
GroupCase group_case(Architecture arch) {
  const int64_t num_ranks = nccl().size();
  return group_case(config_for(arch, num_ranks), 2, 24 * num_ranks);
}

// What a rank of the group computed.
struct GroupRun {
  std::vector<float> grads;   // this rank's (its layout's order)
  std::vector<float> summed;  // grads with the replicated weights' summed over the group
  LossBreakdown loss;
  std::vector<MoeFfnStats> stats;          // per MoE layer (the group's loads)
  int64_t overlap_chunks = 0;              // the chunks its MoE layers ran in
  std::map<std::string, double> phase_ms;  // with timed: the phase timer's totals
};

// This rank's part of the case on the group of all ranks (timed: with the phase timer on).
GroupRun run_group(const GroupCase& c, GradMode mode, const ExpertExchange& exchange,
                   bool timed = false, Recompute recompute = Recompute::kNone) {
  NcclCommunicator& comm = nccl();
  const int64_t num_ranks = comm.size(), rank = comm.rank();
  const ModelConfig& config = c.config;
  const int64_t local_seq = c.seq / num_ranks;
  // This rank holds its experts only: the whole model's weights copied by name.
  const ParameterLayout whole(config);
  GpuTransformer part(
      config, recompute,
      ExpertShard{num_ranks > 1 && config.is_moe() ? rank : 0, config.is_moe() ? num_ranks : 1});
  const ParameterLayout& local = part.layout();
  std::vector<float> local_params(static_cast<size_t>(local.num_params()));
  for (const ParamSpec& spec : local.specs()) {
    const ParamSpec* from = whole.find(spec.name);
    MF_CHECK(from != nullptr, "{} is not a tensor of the whole model", spec.name);
    std::copy(c.params.begin() + from->offset, c.params.begin() + from->offset + from->numel,
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
  const std::vector<int32_t> my_tokens = testing::rank_positions(c, c.tokens, rank, num_ranks);
  const std::vector<int32_t> my_targets = testing::rank_positions(c, c.targets, rank, num_ranks);
  part.timer().set_enabled(timed);
  GroupRun run;
  run.loss =
      part.forward_backward(my_tokens.data(), my_targets.data(), c.batch, local_seq, 0.5, mode);
  comm.set_stream(previous);
  // The replicated weights' gradients summed over the group; each rank's experts have theirs.
  run.grads = part.download_grads();
  run.summed = run.grads;
  for (const ParamRange& r : local.replicated_ranges()) {
    world_communicator().all_reduce_sum(run.summed.data() + r.offset, static_cast<size_t>(r.count));
  }
  run.stats = part.moe_stats();
  run.overlap_chunks = part.expert_overlap_chunks();
  run.phase_ms = part.timer().totals_ms();
  return run;
}

// The group's loss and summed gradients against one GPU's over the whole batch.
void expect_matches_one_gpu(const GroupCase& c, const OneGpuRun& want, const GroupRun& got) {
  const ModelConfig& config = c.config;
  const int64_t num_ranks = nccl().size(), rank = nccl().rank();
  const ParameterLayout local(config, ExpertShard{num_ranks > 1 && config.is_moe() ? rank : 0,
                                                  config.is_moe() ? num_ranks : 1});
  testing::expect_loss_matches_one_gpu(c, want, got.loss, got.stats);
  if (config.is_moe() && num_ranks > 1) {
    EXPECT_LT(local.num_params(), ParameterLayout(config).num_params());
  }
  testing::expect_grads_match_one_gpu(c, want, local, got.summed,
                                      fmt::format("{} ranks, rank {}", num_ranks, rank));
}

// Returns this rank's run after checking it against one GPU (timed: with the group model's phase
// timer on).
GroupRun expect_group_matches_one_gpu(Architecture arch, GradMode mode,
                                      const ExpertExchange& exchange = {}, bool timed = false) {
  const GroupCase c = group_case(arch);
  const OneGpuRun want = run_one_gpu(c);
  const GroupRun got = run_group(c, mode, exchange, timed);
  expect_matches_one_gpu(c, want, got);
  return got;
}

// The bits of a bf16 value.
uint16_t bits(bf16 x) {
  uint16_t b = 0;
  std::memcpy(&b, &x, sizeof(b));
  return b;
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
    EXPECT_NEAR(chunked.loss.loss, whole.loss.loss,
                1e-5 * std::max(1.0, std::abs(whole.loss.loss)));
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

// The all-to-all dispatch (parallel.ep_dispatch "alltoall") against the all-gather dispatch of
// the same group. Both route the same tokens, keep the same assignments under a capacity and give
// the experts the same rows in the same order (the statistics compare exactly; the rows themselves
// in ExpertParallelA2aDispatch below), but they round the combine differently where a token's
// slots fall on two ranks: the all-gather adds each rank's gate-weighted rows in an fp32 sum of
// its own and the reduce-scatter adds those, the all-to-all sums all slots in one chain of fused
// multiply-adds, as one GPU does. That moves the residual stream by fp32 ulps, which now and then
// flip the bf16 rounding of a later normed input: one flipped element moves a tensor's gradient
// by about 2^-8 / sqrt(its elements) relative (4e-5 at hidden 96), while a row lost or sent to
// the wrong expert moves its expert's gradient by percents. Bound 1e-3 per tensor, and 1e-4 on
// the losses.
void expect_a2a_matches_all_gather(const ParameterLayout& layout, const GroupRun& a2a,
                                   const GroupRun& all_gather) {
  const bool exchanges = nccl().size() > 1;
  EXPECT_EQ(a2a.stats.size(), all_gather.stats.size());
  for (size_t m = 0; m < std::min(a2a.stats.size(), all_gather.stats.size()); ++m) {
    EXPECT_EQ(a2a.stats[m].dispatch, exchanges ? EpDispatch::kAllToAll : EpDispatch::kAllGather)
        << "MoE layer " << m;
    EXPECT_EQ(all_gather.stats[m].dispatch, EpDispatch::kAllGather) << "MoE layer " << m;
    EXPECT_EQ(a2a.stats[m].expert_load, all_gather.stats[m].expert_load) << "MoE layer " << m;
    EXPECT_EQ(a2a.stats[m].num_dropped, all_gather.stats[m].num_dropped) << "MoE layer " << m;
  }
  EXPECT_EQ(a2a.loss.num_counted, all_gather.loss.num_counted);
  for (const auto& [name, got, want] :
       {std::tuple{"ce", a2a.loss.ce_loss, all_gather.loss.ce_loss},
        std::tuple{"aux", a2a.loss.aux_loss, all_gather.loss.aux_loss},
        std::tuple{"z", a2a.loss.z_loss, all_gather.loss.z_loss}}) {
    EXPECT_NEAR(got, want, 1e-4 * std::max(1.0, std::abs(want))) << name << " loss";
  }
  const TensorDifference worst = max_tensor_difference(layout, a2a.grads, all_gather.grads);
  EXPECT_LE(worst.relative, 1e-3) << worst.name;
  std::printf("rank %d: all-to-all against all-gather, largest difference %.2e (%s)\n",
              nccl().rank(), worst.relative, worst.name.c_str());
}

ExpertExchange dispatch_exchange(EpDispatchPlan dispatch) {
  ExpertExchange exchange;
  exchange.dispatch = std::move(dispatch);
  return exchange;
}

// The all-to-all dispatch equals one GPU over the whole batch (the same bounds as the all-gather
// dispatch) and the all-gather dispatch of the same group, dropless and with a capacity that drops
// assignments (then batch 1: capacity keeps each expert's earliest tokens of the group in rank
// order, which is one GPU's order for one sequence only), on the grouped GEMMs and the per-expert
// GEMMs (which take the local experts' row ranges from the host's plan), assigning the gradients
// (NaN before: an expert that receives no rows must get zeros).
TEST_P(ExpertParallelGpu, AllToAllDispatchEqualsOneGpuAndTheAllGather) {
  MF_REQUIRE_NCCL_GPUS();
  if (!testing::gpu_config(GetParam()).is_moe()) GTEST_SKIP() << "no MoE layers";
  const int64_t num_ranks = nccl().size();
  for (const double capacity_factor : {0.0, 0.75}) {
    ModelConfig config = config_for(GetParam(), num_ranks);
    config.capacity_factor = capacity_factor;
    const GroupCase c = capacity_factor > 0.0 ? group_case(config, 1, 32 * num_ranks)
                                              : group_case(config, 2, 24 * num_ranks);
    const OneGpuRun one = run_one_gpu(c);
    if (capacity_factor > 0.0) {
      int64_t num_dropped = 0;
      for (const MoeFfnStats& stats : one.stats) num_dropped += stats.num_dropped;
      EXPECT_GT(num_dropped, 0) << "the case must drop assignments";
    }
    const ParameterLayout layout(config, ExpertShard{nccl().rank(), num_ranks});
    for (const bool grouped : {true, false}) {
      SCOPED_TRACE(fmt::format("capacity_factor {}, {} GEMMs", capacity_factor,
                               grouped ? "grouped" : "per-expert"));
      if (!grouped) setenv("MOEFORGE_GROUPED_GEMM", "0", 1);
      const GroupRun all_gather =
          run_group(c, GradMode::kAssign, dispatch_exchange(EpDispatch::kAllGather));
      const GroupRun a2a =
          run_group(c, GradMode::kAssign, dispatch_exchange(EpDispatch::kAllToAll));
      unsetenv("MOEFORGE_GROUPED_GEMM");
      expect_matches_one_gpu(c, one, all_gather);
      expect_matches_one_gpu(c, one, a2a);
      expect_a2a_matches_all_gather(layout, a2a, all_gather);
    }
  }
}

// A per-layer list mixes the dispatches (the layers exchange through the same buffers and
// streams), and "auto" takes the all-to-all iff top_k < ranks (top-1 here); each equals one GPU
// and the all-gather dispatch everywhere. Mixtral: two MoE layers.
TEST(ExpertParallelGpuA2a, PerLayerListsAndAutoEqualOneGpu) {
  MF_REQUIRE_NCCL_GPUS();
  const int64_t num_ranks = nccl().size();
  for (const int64_t top_k : {2, 1}) {
    ModelConfig config = config_for(Architecture::kMixtral, num_ranks);
    config.num_experts_per_tok = top_k;
    const GroupCase c = group_case(config, 2, 24 * num_ranks);
    const OneGpuRun one = run_one_gpu(c);
    const ParameterLayout layout(config, ExpertShard{nccl().rank(), num_ranks});
    const GroupRun all_gather =
        run_group(c, GradMode::kAccumulate, dispatch_exchange(EpDispatch::kAllGather));
    expect_matches_one_gpu(c, one, all_gather);
    const bool exchanges = num_ranks > 1;
    const bool auto_a2a = exchanges && top_k < num_ranks;
    const std::vector<std::pair<EpDispatchPlan, std::vector<bool>>> plans = {
        {EpDispatchPlan({EpDispatch::kAllToAll, EpDispatch::kAllGather}), {exchanges, false}},
        {EpDispatchPlan({EpDispatch::kAllGather, EpDispatch::kAllToAll}), {false, exchanges}},
        {EpDispatchPlan(EpDispatch::kAuto), {auto_a2a, auto_a2a}}};
    for (const auto& [plan, a2a_layers] : plans) {
      SCOPED_TRACE(fmt::format("top-{}, layer 0 {}, layer 1 {}", top_k,
                               ep_dispatch_name(plan.layer(0)), ep_dispatch_name(plan.layer(1))));
      const GroupRun mixed = run_group(c, GradMode::kAccumulate, dispatch_exchange(plan));
      expect_matches_one_gpu(c, one, mixed);
      EXPECT_EQ(mixed.stats.size(), 2u);
      for (size_t m = 0; m < std::min<size_t>(mixed.stats.size(), 2); ++m) {
        EXPECT_EQ(mixed.stats[m].dispatch,
                  a2a_layers[m] ? EpDispatch::kAllToAll : EpDispatch::kAllGather)
            << "MoE layer " << m;
        EXPECT_EQ(mixed.stats[m].expert_load, all_gather.stats[m].expert_load) << "MoE layer " << m;
      }
      const TensorDifference worst = max_tensor_difference(layout, mixed.grads, all_gather.grads);
      EXPECT_LE(worst.relative, 1e-3) << worst.name;
    }
  }
}

// The phase timer splits the all-to-all dispatch's exchanges (the counts and sums, the rows to
// the experts and back) into waits and transfers as it does the all-gather's.
TEST(ExpertParallelGpuA2a, PhaseTimerSplitsWaitsFromExchanges) {
  MF_REQUIRE_NCCL_GPUS();
  if (nccl().size() == 1) GTEST_SKIP() << "one rank exchanges nothing";
  const GroupCase c = group_case(Architecture::kMixtral);
  const GroupRun timed =
      run_group(c, GradMode::kAccumulate, dispatch_exchange(EpDispatch::kAllToAll), true);
  for (const char* phase :
       {"moe_wait", "moe_exchange", "moe_backward_wait", "moe_backward_exchange"}) {
    EXPECT_EQ(timed.phase_ms.count(phase), 1u) << phase;
  }
  expect_matches_one_gpu(c, run_one_gpu(c), timed);
}

// Selective recompute rebuilds an all-to-all layer's normed input and SwiGLU output (over the
// rows received, whose count the plan's device offsets give) in the backward: the same loss, and
// the same gradients up to cuDNN's attention backward (gpu_transformer_test.cpp's bound), on a
// model with a dense layer (Qwen3-MoE) and one with a shared expert (Qwen2-MoE).
TEST(ExpertParallelGpuA2a, SelectiveRecomputeGivesTheSameLossAndGradients) {
  MF_REQUIRE_NCCL_GPUS();
  for (const Architecture arch : {Architecture::kQwen3Moe, Architecture::kQwen2Moe}) {
    SCOPED_TRACE(architecture_name(arch));
    const GroupCase c = group_case(arch);
    const ExpertExchange exchange = dispatch_exchange(EpDispatch::kAllToAll);
    const GroupRun none = run_group(c, GradMode::kAccumulate, exchange);
    const GroupRun selective =
        run_group(c, GradMode::kAccumulate, exchange, false, Recompute::kSelective);
    EXPECT_EQ(selective.loss.loss, none.loss.loss);
    const ParameterLayout layout(c.config, ExpertShard{nccl().rank(), nccl().size()});
    const TensorDifference worst = max_tensor_difference(layout, selective.grads, none.grads);
    EXPECT_LE(worst.relative, 1e-3) << worst.name;
  }
}

// The device part of the all-to-all dispatch on its own (cuda/moe_dispatch_a2a.h over NCCL): from
// every rank's routing (skewed, 4 experts per rank, top-2) and bf16 rows that name their token,
// the rows this rank's experts receive, in expert order, are bit for bit the all-gather path's
// rows of its experts (ops::build_row_map over the group's tokens), and each rank gets back, for
// each of its assignments, exactly the row it sent where the all-gather path keeps the
// assignment; dropless and with a capacity.
TEST(ExpertParallelA2aDispatch, ExpertsSeeTheAllGatherRowsAndTheRowsComeBack) {
  MF_REQUIRE_NCCL_GPUS();
  NcclCommunicator& comm = nccl();
  const int64_t num_ranks = comm.size(), rank = comm.rank();
  const int64_t n = 40, k = 2, hidden = 24, num_local = 4, num_experts = num_local * num_ranks;
  const int64_t group_tokens = n * num_ranks;
  // The group's routing, rank by rank: two distinct experts per token, the first among the lower
  // half of the experts (so that they overflow a capacity).
  Rng rng(41);
  std::vector<int32_t> group_idx;  // [group_tokens, k]
  std::vector<int64_t> loads(static_cast<size_t>(num_ranks * num_experts), 0);
  for (int64_t t = 0; t < group_tokens; ++t) {
    const auto first = static_cast<int32_t>(rng.below(static_cast<uint64_t>(num_experts / 2)));
    const auto second = static_cast<int32_t>(
        (first + 1 + static_cast<int64_t>(rng.below(static_cast<uint64_t>(num_experts - 1)))) %
        num_experts);
    for (const int32_t e : {first, second}) {
      group_idx.push_back(e);
      ++loads[static_cast<size_t>(t / n * num_experts + e)];
    }
  }
  // Row of group token t: t + j / 64 in column j (integers and 64ths below 256: exact in bf16).
  std::vector<float> group_x(static_cast<size_t>(group_tokens * hidden));
  for (int64_t t = 0; t < group_tokens; ++t) {
    for (int64_t j = 0; j < hidden; ++j) {
      group_x[static_cast<size_t>(t * hidden + j)] =
          static_cast<float>(t % 200) + static_cast<float>(j) / 64.0f;
    }
  }
  const std::vector<bf16> group_rows = to_bf16(group_x);
  const cudaStream_t stream = comm.stream();
  DeviceBuffer<bf16> x;
  x.upload(std::vector<bf16>(group_rows.begin() + rank * n * hidden,
                             group_rows.begin() + (rank + 1) * n * hidden));
  const int64_t max_rows = group_tokens * k;
  const int64_t map_ints = a2a_map_ints(n * k, max_rows, num_local, num_experts);
  DeviceBuffer<int32_t> maps_buffer(static_cast<size_t>(map_ints));
  PinnedHostBuffer<int32_t> staging;
  staging.resize(static_cast<size_t>(map_ints));
  DeviceBuffer<bf16> send(static_cast<size_t>(n * k * hidden)), returned(send.size());
  DeviceBuffer<bf16> recv(static_cast<size_t>(max_rows * hidden)), rows(recv.size());
  const int32_t* my_idx = group_idx.data() + rank * n * k;
  for (const int64_t capacity :
       {int64_t{-1}, ops::expert_capacity(1.0, group_tokens, k, num_experts)}) {
    SCOPED_TRACE(fmt::format("capacity {}", capacity));
    const A2aDispatchPlan plan = plan_a2a_dispatch_from_loads(my_idx, n, k, num_experts, capacity,
                                                              loads.data(), rank, num_ranks);
    const int64_t num_send = plan.send_map.num_rows(), num_received = plan.recv_map.num_rows();
    const A2aDeviceMaps maps =
        upload_a2a_maps(maps_buffer.data(), staging.data(), map_ints, plan, stream);
    a2a_send_order(send.data(), x.data(), maps, plan, hidden, stream);
    a2a_exchange_to_owners(send.data(), recv.data(), plan, hidden, CommDType::kBFloat16, comm);
    a2a_expert_order(rows.data(), recv.data(), maps, plan, hidden, stream);
    // The way back with the rows themselves as the experts' outputs.
    a2a_receive_order(recv.data(), rows.data(), maps, plan, hidden, stream);
    a2a_exchange_to_senders(recv.data(), returned.data(), plan, hidden, CommDType::kBFloat16, comm);
    comm.synchronize();

    // The all-gather path: this rank's experts' rows of the group's tokens, and which of this
    // rank's assignments any expert keeps.
    const ops::RowMap local = ops::build_row_map(
        group_idx.data(), group_tokens, k, rank * num_local, (rank + 1) * num_local, capacity);
    const ops::RowMap all =
        ops::build_row_map(group_idx.data(), group_tokens, k, 0, num_experts, capacity);
    EXPECT_EQ(plan.recv_map.expert_offsets, local.expert_offsets);
    EXPECT_EQ(num_received, local.num_rows());
    std::vector<bf16> got(static_cast<size_t>(num_received * hidden));
    copy_to_host(got.data(), rows.data(), got.size() * sizeof(bf16));
    int64_t mismatched_rows = 0;
    for (int64_t r = 0; r < std::min(num_received, local.num_rows()); ++r) {
      const int64_t token = local.row_token[static_cast<size_t>(r)];
      for (int64_t j = 0; j < hidden; ++j) {
        if (bits(got[r * hidden + j]) != bits(group_rows[token * hidden + j])) {
          ++mismatched_rows;
          break;
        }
      }
    }
    EXPECT_EQ(mismatched_rows, 0) << "of " << num_received << " expert rows";
    std::vector<bf16> back(static_cast<size_t>(num_send * hidden));
    copy_to_host(back.data(), returned.data(), back.size() * sizeof(bf16));
    int64_t mismatched_assignments = 0;
    for (int64_t a = 0; a < n * k; ++a) {
      const int32_t row = plan.send_map.assignment_row[static_cast<size_t>(a)];
      const bool kept = all.assignment_row[static_cast<size_t>(rank * n * k + a)] >= 0;
      bool same = (row >= 0) == kept;
      for (int64_t j = 0; same && row >= 0 && j < hidden; ++j) {
        same = bits(back[row * hidden + j]) == bits(group_rows[(rank * n + a / k) * hidden + j]);
      }
      mismatched_assignments += same ? 0 : 1;
    }
    EXPECT_EQ(mismatched_assignments, 0) << "of " << n * k << " assignments";
    if (capacity >= 0) {
      EXPECT_GT(all.num_dropped, 0) << "the case must drop assignments";
    }
  }
}

// Overlap chunks split the all-gather dispatch's exchanges: a layer of the all-to-all dispatch
// refuses them, naming the setting; a dispatch list must have one entry per decoder layer.
TEST(ExpertParallelGpuConfig, RejectsOverlapChunksWithTheAllToAllDispatch) {
  MF_REQUIRE_NCCL_GPUS();
  const ModelConfig config = config_for(Architecture::kMixtral, nccl().size());
  const ExpertShard shard{nccl().rank(), nccl().size()};
  GpuTransformer listed(config, Recompute::kNone, shard);
  EXPECT_THROW(
      listed.set_expert_parallel_group(
          nccl(), dispatch_exchange(EpDispatchPlan(
                      {EpDispatch::kAllGather, EpDispatch::kAllGather, EpDispatch::kAllToAll}))),
      Error);
  if (nccl().size() == 1) GTEST_SKIP() << "one rank runs no dispatch";
  GpuTransformer chunked(config, Recompute::kNone, shard);
  ExpertExchange exchange =
      dispatch_exchange(EpDispatchPlan({EpDispatch::kAllGather, EpDispatch::kAllToAll}));
  exchange.overlap_chunks = 2;
  try {
    chunked.set_expert_parallel_group(nccl(), exchange);
    ADD_FAILURE() << "overlap chunks with an all-to-all layer passed";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("parallel.ep_overlap_chunks 2"), std::string::npos)
        << e.what();
    EXPECT_NE(std::string(e.what()).find("layer 1 takes the all-to-all dispatch"),
              std::string::npos)
        << e.what();
  }
  GpuTransformer gathered(config, Recompute::kNone, shard);
  exchange.dispatch = EpDispatch::kAllGather;
  EXPECT_NO_THROW(gathered.set_expert_parallel_group(nccl(), exchange));
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

INSTANTIATE_TEST_SUITE_P(Architectures, ExpertParallelGpu,
                         ::testing::Values(Architecture::kLlama, Architecture::kMixtral,
                                           Architecture::kQwen2Moe, Architecture::kQwen3Moe),
                         testing::architecture_test_name);

}  // namespace
}  // namespace moeforge::cuda

int main(int argc, char** argv) {
  return moeforge::testing::run_nccl_tests(argc, argv, "expert_parallel_tests");
}
