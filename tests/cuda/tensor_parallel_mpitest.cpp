// GpuTransformer over a tensor-parallel group of n GPUs (set_tensor_parallel_group: parallel.layout
// "tp", the Megatron-LM baseline; one rank per GPU, NCCL) against the same model on one GPU over
// the whole batch: each rank gets its slice of every sequence and holds the whole model; the loss
// must be the group's, the gradients summed over the ranks the one-GPU gradients (the bounds of
// group_test_util.h: both sides run in bf16, with the row-parallel outputs summed by a
// reduce-scatter here), and each rank's gradient of a split weight zero outside its slice. Dense
// and MoE models of every architecture (q/k/v biases, q/k norm, a shared expert with its gate, a
// dense layer among MoE layers), batches of several sequences (the reorders between the sequence
// and the collectives' rank order) and of one (token dropping by capacity, which keeps each
// expert's earliest tokens in the group's rank order, one GPU's order for one sequence only),
// both expert GEMM paths, gradient accumulation, selective recompute, the phase timer, and the
// refusals. Run alone (n = 1: the group is the model itself) and under mpirun (2 and 4 ranks in
// ctest; skipping as comm/nccl/nccl_test_harness.h says).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <string>
#include <vector>

#include "comm/nccl/nccl_test_harness.h"
#include "core/error.h"
#include "cuda/gpu_test_models.h"
#include "cuda/gpu_transformer.h"
#include "cuda/group_test_util.h"
#include "model/moe_ffn.h"

namespace moeforge::cuda {
namespace {

using moeforge::testing::nccl;
using testing::GroupCase;
using testing::OneGpuRun;

// Up to the next multiple of unit.
int64_t round_up(int64_t x, int64_t unit) {
  return (x + unit - 1) / unit * unit;
}

// The architecture's test model with head counts and intermediate sizes that split over
// num_ranks; each rank's columns of an expert a multiple of 8 (the grouped GEMMs' 16-byte rows),
// so that the grouped path runs where the device has it.
ModelConfig config_for(Architecture arch, int64_t num_ranks) {
  ModelConfig c = testing::gpu_config(arch);
  c.num_kv_heads = std::max<int64_t>(c.num_kv_heads, num_ranks);
  c.num_heads = std::max<int64_t>(c.num_heads, 2 * c.num_kv_heads);
  c.intermediate_size = round_up(c.intermediate_size, num_ranks);
  if (c.num_experts > 0) {
    c.moe_intermediate_size = round_up(c.moe_intermediate_size, 8 * num_ranks);
    c.shared_expert_intermediate_size = round_up(c.shared_expert_intermediate_size, num_ranks);
  }
  // Mixtral has one size for experts and dense layers.
  if (arch == Architecture::kMixtral) c.intermediate_size = c.moe_intermediate_size;
  return c;
}

// The architecture's test model over the ranks, 2 sequences of 24 positions per rank.
GroupCase tp_case(Architecture arch) {
  const int64_t num_ranks = nccl().size();
  return testing::group_case(config_for(arch, num_ranks), 2, 24 * num_ranks);
}

// What a rank of the group computed.
struct TpRun {
  std::vector<float> grads;   // this rank's (the whole model's layout)
  std::vector<float> summed;  // grads summed over the group
  LossBreakdown loss;
  std::vector<MoeFfnStats> stats;
  std::vector<std::vector<float>> router_logits;  // per MoE layer, this rank's tokens
  std::map<std::string, double> phase_ms;         // with timed: the phase timer's totals
  bool grouped_expert_gemms = false;
};

struct TpOptions {
  GradMode mode = GradMode::kAccumulate;
  int64_t micro_batches = 1;  // the case again with kAccumulate after the first
  bool timed = false;         // the phase timer on
  Recompute recompute = Recompute::kNone;
};

// This rank's part of the case on the tensor-parallel group of all ranks. kAssign fills the
// gradients with NaN first: every element must be written (zeros outside this rank's slices).
TpRun run_tp(const GroupCase& c, const TpOptions& options = {}) {
  NcclCommunicator& comm = nccl();
  const int64_t num_ranks = comm.size(), rank = comm.rank();
  GpuTransformer part(c.config, options.recompute);
  const cudaStream_t previous = comm.stream();
  comm.set_stream(part.stream());
  part.set_tensor_parallel_group(comm);
  part.upload_params(c.params);
  if (options.mode == GradMode::kAssign) {
    part.upload_grads(std::vector<float>(static_cast<size_t>(part.num_params()), std::nanf("")));
  } else {
    part.zero_grads();
  }
  const std::vector<int32_t> tokens = testing::rank_positions(c, c.tokens, rank, num_ranks);
  const std::vector<int32_t> targets = testing::rank_positions(c, c.targets, rank, num_ranks);
  part.timer().set_enabled(options.timed);
  TpRun run;
  for (int64_t m = 0; m < options.micro_batches; ++m) {
    run.loss = part.forward_backward(tokens.data(), targets.data(), c.batch, c.seq / num_ranks, 0.5,
                                     m == 0 ? options.mode : GradMode::kAccumulate);
  }
  comm.set_stream(previous);
  run.grads = part.download_grads();
  run.summed = run.grads;
  world_communicator().all_reduce_sum(run.summed.data(), run.summed.size());
  run.stats = part.moe_stats();
  for (int64_t l = 0; l < c.config.num_layers; ++l) {
    if (c.config.layer_is_moe(l)) run.router_logits.push_back(part.router_logits(l));
  }
  run.phase_ms = part.timer().totals_ms();
  run.grouped_expert_gemms = part.grouped_expert_gemms();
  return run;
}

// Gradients of a split weight outside this rank's slice that are not exactly zero: the weight is
// `blocks` matrices [out, in] one after another, split by rows (each block's rows
// [r out / n, (r + 1) out / n)) or by columns (those of in).
int64_t nonzero_outside_slice(const float* grads, int64_t blocks, int64_t out, int64_t in,
                              bool by_rows, int64_t rank, int64_t num_ranks) {
  const int64_t split = by_rows ? out : in, width = split / num_ranks;
  int64_t nonzero = 0;
  for (int64_t b = 0; b < blocks; ++b) {
    for (int64_t i = 0; i < out; ++i) {
      for (int64_t j = 0; j < in; ++j) {
        const int64_t at = by_rows ? i : j;
        const bool mine = at >= rank * width && at < (rank + 1) * width;
        if (!mine && grads[(b * out + i) * in + j] != 0.0f) ++nonzero;
      }
    }
  }
  return nonzero;
}

// Every split weight's gradient is zero outside this rank's slice (the group's sum then counts
// each slice once).
void expect_zero_outside_slices(const ModelConfig& c, const std::vector<float>& grads) {
  const int64_t rank = nccl().rank(), n = nccl().size();
  if (n == 1) return;
  const ParameterLayout layout(c);
  const int64_t h = c.hidden_size, qd = c.q_dim(), kvd = c.kv_dim();
  const int64_t f = c.moe_intermediate_size, ffn = c.intermediate_size;
  const int64_t shared = c.shared_expert_intermediate_size, experts = c.num_experts;
  const auto count = [&](int64_t offset, int64_t blocks, int64_t out, int64_t in, bool by_rows) {
    return offset < 0
               ? 0
               : nonzero_outside_slice(grads.data() + offset, blocks, out, in, by_rows, rank, n);
  };
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const LayerOffsets& o = layout.layer(l);
    EXPECT_EQ(count(o.q_proj, 1, qd, h, true) + count(o.k_proj, 1, kvd, h, true) +
                  count(o.v_proj, 1, kvd, h, true) + count(o.o_proj, 1, h, qd, false),
              0)
        << "attention of layer " << l;
    EXPECT_EQ(count(o.q_bias, 1, qd, 1, true) + count(o.k_bias, 1, kvd, 1, true) +
                  count(o.v_bias, 1, kvd, 1, true),
              0)
        << "attention biases of layer " << l;
    EXPECT_EQ(count(o.mlp_gate, 1, ffn, h, true) + count(o.mlp_up, 1, ffn, h, true) +
                  count(o.mlp_down, 1, h, ffn, false),
              0)
        << "dense MLP of layer " << l;
    EXPECT_EQ(count(o.experts_gate, experts, f, h, true) +
                  count(o.experts_up, experts, f, h, true) +
                  count(o.experts_down, experts, h, f, false),
              0)
        << "experts of layer " << l;
    EXPECT_EQ(count(o.shared_gate, 1, shared, h, true) + count(o.shared_up, 1, shared, h, true) +
                  count(o.shared_down, 1, h, shared, false),
              0)
        << "shared expert of layer " << l;
  }
}

// The group's loss, summed gradients and this rank's router logits against one GPU's (times
// micro_batches: the same batch accumulated).
void expect_matches_one_gpu(const GroupCase& c, const OneGpuRun& one, const TpRun& got,
                            int64_t micro_batches = 1) {
  const int64_t num_ranks = nccl().size(), rank = nccl().rank();
  const std::string where = fmt::format("{} ranks, rank {}", num_ranks, rank);
  OneGpuRun want = one;
  for (float& g : want.grads) g *= static_cast<float>(micro_batches);
  testing::expect_loss_matches_one_gpu(c, want, got.loss, got.stats);
  for (const MoeFfnStats& stats : got.stats) EXPECT_EQ(stats.dispatch, EpDispatch::kAllGather);
  testing::expect_grads_match_one_gpu(c, want, ParameterLayout(c.config), got.summed, where);
  // The router runs on the group's tokens; router_logits gives this rank's rows.
  const int64_t num_experts = c.config.num_experts;
  ASSERT_EQ(got.router_logits.size(), one.router_logits.size());
  for (size_t m = 0; m < got.router_logits.size(); ++m) {
    std::vector<float> mine;
    const int64_t local_seq = c.seq / num_ranks;
    for (int64_t b = 0; b < c.batch; ++b) {
      const auto first =
          one.router_logits[m].begin() + (b * c.seq + rank * local_seq) * num_experts;
      mine.insert(mine.end(), first, first + local_seq * num_experts);
    }
    ASSERT_EQ(got.router_logits[m].size(), mine.size()) << "MoE layer " << m;
    EXPECT_LE(testing::relative_l2(got.router_logits[m].data(), mine.data(),
                                   static_cast<int64_t>(mine.size())),
              2e-2)
        << "router logits of MoE layer " << m << " (" << where << ")";
  }
}

class TensorParallelGpu : public ::testing::TestWithParam<Architecture> {};

TEST_P(TensorParallelGpu, GroupEqualsOneGpuOverTheWholeBatch) {
  MF_REQUIRE_NCCL_GPUS();
  const GroupCase c = tp_case(GetParam());
  const TpRun got = run_tp(c);
  expect_matches_one_gpu(c, testing::run_one_gpu(c), got);
  expect_zero_outside_slices(c.config, got.grads);
}

// kAssign writes every gradient (NaN before): this rank's slices, and zeros elsewhere, which a
// backward that only wrote its slices would leave NaN.
TEST_P(TensorParallelGpu, AssignedGradientsAreZeroOutsideTheSlices) {
  MF_REQUIRE_NCCL_GPUS();
  const GroupCase c = tp_case(GetParam());
  const TpRun got = run_tp(c, {GradMode::kAssign});
  expect_matches_one_gpu(c, testing::run_one_gpu(c), got);
  expect_zero_outside_slices(c.config, got.grads);
}

// Micro-batches accumulate into the slices (the packed slices' gradients added, not assigned,
// after the first): the same batch twice gives twice one GPU's gradient.
TEST_P(TensorParallelGpu, MicroBatchesAccumulate) {
  MF_REQUIRE_NCCL_GPUS();
  const GroupCase c = tp_case(GetParam());
  TpOptions options;
  options.mode = GradMode::kAssign;
  options.micro_batches = 2;
  expect_matches_one_gpu(c, testing::run_one_gpu(c), run_tp(c, options), 2);
}

// Selective recompute rebuilds the local norms and the SwiGLU outputs of the group's tokens on
// this rank's columns: the same loss, and the same gradients up to cuDNN's attention backward
// (gpu_transformer_test.cpp's bound).
TEST_P(TensorParallelGpu, SelectiveRecomputeGivesTheSameLossAndGradients) {
  MF_REQUIRE_NCCL_GPUS();
  const GroupCase c = tp_case(GetParam());
  const TpRun none = run_tp(c);
  TpOptions options;
  options.recompute = Recompute::kSelective;
  const TpRun selective = run_tp(c, options);
  EXPECT_EQ(selective.loss.loss, none.loss.loss);
  const testing::TensorDifference worst =
      testing::max_tensor_difference(ParameterLayout(c.config), selective.grads, none.grads);
  EXPECT_LE(worst.relative, 1e-3) << worst.name;
}

// Both expert GEMM paths: the grouped GEMMs (where the device has them) and one cuBLASLt call per
// expert (MOEFORGE_GROUPED_GEMM=0, row ranges from the host), whose weight gradients add to their
// packed slices (zeroed first).
TEST_P(TensorParallelGpu, PerExpertGemmsEqualOneGpu) {
  MF_REQUIRE_NCCL_GPUS();
  if (!testing::gpu_config(GetParam()).is_moe()) GTEST_SKIP() << "no experts";
  const GroupCase c = tp_case(GetParam());
  const OneGpuRun one = testing::run_one_gpu(c);
  setenv("MOEFORGE_GROUPED_GEMM", "0", 1);
  const TpRun per_expert = run_tp(c, {GradMode::kAssign});
  unsetenv("MOEFORGE_GROUPED_GEMM");
  EXPECT_FALSE(per_expert.grouped_expert_gemms);
  expect_matches_one_gpu(c, one, per_expert);
  expect_zero_outside_slices(c.config, per_expert.grads);
}

// Token dropping: the group routes all its tokens and applies the capacity in their rank order,
// which for one sequence is one GPU's order: the same drops, within the usual bounds.
TEST(TensorParallelGpuMoe, CapacityDropsAsOneGpu) {
  MF_REQUIRE_NCCL_GPUS();
  const int64_t num_ranks = nccl().size();
  ModelConfig config = config_for(Architecture::kMixtral, num_ranks);
  config.capacity_factor = 0.75;
  const GroupCase c = testing::group_case(config, 1, 32 * num_ranks);
  const OneGpuRun one = testing::run_one_gpu(c);
  const TpRun got = run_tp(c, {GradMode::kAssign});
  expect_matches_one_gpu(c, one, got);
  int64_t num_dropped = 0;
  for (const MoeFfnStats& stats : got.stats) num_dropped += stats.num_dropped;
  EXPECT_GT(num_dropped, 0) << "the case must drop assignments";
}

// With the phase timer on, each exchange is split into the wait for the slowest rank
// (<phase>_wait) and the transfer (<phase>_exchange) in every layer kind (Qwen3-MoE: a dense
// layer, then an MoE layer), and the model still computes the one-GPU gradients; off, nothing is
// timed.
TEST(TensorParallelGpuMoe, PhaseTimerSplitsWaitsFromExchanges) {
  MF_REQUIRE_NCCL_GPUS();
  if (nccl().size() == 1) GTEST_SKIP() << "one rank exchanges nothing";
  const GroupCase c = tp_case(Architecture::kQwen3Moe);
  const OneGpuRun one = testing::run_one_gpu(c);
  TpOptions options;
  options.timed = true;
  const TpRun timed = run_tp(c, options);
  expect_matches_one_gpu(c, one, timed);
  for (const char* phase : {"attention", "attention_backward", "dense_ffn", "dense_ffn_backward",
                            "moe", "moe_backward"}) {
    for (const char* suffix : {"_wait", "_exchange"}) {
      EXPECT_EQ(timed.phase_ms.count(std::string(phase) + suffix), 1u) << phase << suffix;
    }
  }
  EXPECT_TRUE(run_tp(c).phase_ms.empty());
}

// What tensor parallelism does not run is refused with the reason: CUDA graphs (either order), a
// model holding a shard of the experts, both layouts at once, a late call.
TEST(TensorParallelGpuConfig, RejectsWhatItDoesNotRun) {
  MF_REQUIRE_NCCL_GPUS();
  const int64_t num_ranks = nccl().size(), rank = nccl().rank();
  if (num_ranks == 1) GTEST_SKIP() << "one rank is no group: nothing changes";
  const ModelConfig moe = config_for(Architecture::kMixtral, num_ranks);
  const auto expect_error = [](const auto& fn, const std::string& expected) {
    try {
      fn();
      ADD_FAILURE() << "expected an error containing: " << expected;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(expected), std::string::npos) << e.what();
    }
  };
  {
    GpuTransformer model(moe);
    model.set_tensor_parallel_group(nccl());
    expect_error([&] { model.set_cuda_graphs(true); }, "parallel.layout \"tp\"");
    expect_error([&] { model.set_expert_parallel_group(nccl()); }, "not both");
  }
  const ModelConfig dense = config_for(Architecture::kLlama, num_ranks);
  {
    GpuTransformer model(dense);
    model.set_cuda_graphs(true);
    expect_error([&] { model.set_tensor_parallel_group(nccl()); }, "CUDA graphs");
  }
  {
    GpuTransformer model(moe, Recompute::kNone, ExpertShard{rank, num_ranks});
    expect_error([&] { model.set_tensor_parallel_group(nccl()); }, "must hold all experts");
  }
  {
    GpuTransformer model(dense);
    model.set_expert_parallel_group(nccl());
    expect_error([&] { model.set_tensor_parallel_group(nccl()); }, "not both");
  }
  {
    // A forward on this GPU alone first.
    GpuTransformer late(dense);
    const std::vector<int32_t> tokens(8, 1);
    late.forward_backward(tokens.data(), tokens.data(), 1, 8, 0.0);
    expect_error([&] { late.set_tensor_parallel_group(nccl()); }, "before the first forward");
  }
}

TEST(TensorParallelGpuConfig, RejectsCountsThatDoNotSplit) {
  MF_REQUIRE_NCCL_GPUS();
  const int64_t num_ranks = nccl().size();
  if (num_ranks == 1) GTEST_SKIP() << "every count splits over one rank";
  ModelConfig heads = testing::gpu_config(Architecture::kLlama);
  heads.num_kv_heads = 1;
  heads.num_heads = 3;
  ModelConfig dense = config_for(Architecture::kLlama, num_ranks);
  dense.intermediate_size = 2 * num_ranks + 1;
  ModelConfig experts = config_for(Architecture::kMixtral, num_ranks);
  experts.moe_intermediate_size = 8 * num_ranks + 1;
  experts.intermediate_size = experts.moe_intermediate_size;
  for (const ModelConfig& config : {heads, dense, experts}) {
    GpuTransformer model(config);
    EXPECT_THROW(model.set_tensor_parallel_group(nccl()), Error);
  }
}

INSTANTIATE_TEST_SUITE_P(Architectures, TensorParallelGpu, testing::every_architecture(),
                         testing::architecture_test_name);

}  // namespace
}  // namespace moeforge::cuda

int main(int argc, char** argv) {
  return moeforge::testing::run_nccl_tests(argc, argv, "tensor_parallel_tests");
}
