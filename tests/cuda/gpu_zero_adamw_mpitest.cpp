// GpuZeroAdamW (ZeRO-1 on GPUs, one rank per GPU, NCCL) against its two references, three steps
// with different gradients per rank and step: the summed gradient shard and the norm against the
// host ZeroAdamW (train/zero_optimizer.h) on the same gradients, and the update against the
// unsharded GpuAdamW given the whole summed gradient that the shards hold. bf16 compression must
// give the host's shard bits exactly (same roundings, same rank-ordered fp32 sum), and so must
// fp32 with up to two ranks (a + b is b + a); with more, NCCL picks the order of the additions,
// so the shard matches to fp32 rounding of the sum of magnitudes. The update is element-wise, so
// the weights and the shard's moments equal GpuAdamW's bit for bit, given the same clipping
// factor (checked: the norms differ only by the grouping of a double sum): after each step the
// bf16 copy everywhere and the fp32 weights where the model reads them, a forward's loss (which
// would differ if it read a stale weight), and after gather_weights() every fp32 weight. The fp32
// sums also come from BucketedGradReducer's owner sums (use_owner_reduced_gradients), with the
// same checks.
// Run alone and under mpirun (2 and 4 ranks in ctest), skipping as
// comm/nccl/nccl_test_harness.h says.
#include "cuda/gpu_zero_adamw.h"

#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "comm/nccl/nccl_test_harness.h"
#include "core/rng.h"
#include "cuda/bucketed_grad_reducer.h"
#include "cuda/device_communicator.h"
#include "cuda/gpu_adamw.h"
#include "cuda/gpu_test_models.h"
#include "cuda/gpu_transformer.h"
#include "train/grad_reduce.h"
#include "train/zero_optimizer.h"

namespace moeforge::cuda {
namespace {

using moeforge::testing::nccl;

// Rank r's gradient at a step: magnitudes from 1e-5 to 1e1, so that bf16 rounding and the order
// of additions both show, and clipping at max_norm 1 is active.
std::vector<float> rank_gradient(int64_t count, int rank, int step) {
  Rng rng(77 + static_cast<uint64_t>(rank) * 1000 + static_cast<uint64_t>(step));
  std::vector<float> g(static_cast<size_t>(count));
  for (float& x : g) x = static_cast<float>(rng.normal() * std::pow(10.0, rng.below(7) - 5.0));
  return g;
}

std::vector<uint16_t> download_bf16(GpuTransformer& model) {
  model.synchronize();
  std::vector<uint16_t> bits(static_cast<size_t>(model.num_params()));
  copy_to_host(bits.data(), model.params_bf16(), bits.size() * sizeof(uint16_t));
  return bits;
}

void expect_same_bits(const std::vector<float>& got, const float* want, const char* what,
                      int step) {
  for (size_t i = 0; i < got.size(); ++i) {
    ASSERT_EQ(std::bit_cast<uint32_t>(got[i]), std::bit_cast<uint32_t>(want[i]))
        << what << " element " << i << ", step " << step;
  }
}

// A forward-only loss of model on fixed tokens.
double forward_loss(GpuTransformer& model, const ModelConfig& config) {
  Rng rng(9);
  const int64_t batch = 2, seq = 23;
  std::vector<int32_t> tokens(static_cast<size_t>(batch * seq)), targets(tokens.size());
  for (size_t i = 0; i < tokens.size(); ++i) {
    tokens[i] = static_cast<int32_t>(rng.below(config.vocab_size));
    targets[i] = static_cast<int32_t>(rng.below(config.vocab_size));
  }
  return model.forward_backward(tokens.data(), targets.data(), batch, seq, 0.0).loss;
}

// The model's gradient summed onto the shard owners in buckets of 3000 elements, reported range by
// range as a backward does, on the reducer's stream through a communicator of its own.
void sum_onto_owners(GpuTransformer& model, GpuZeroAdamW& zero) {
  BucketedGradReducer reducer;
  std::string why_not;
  const auto comm = make_device_communicator(world_communicator(), reducer.stream(), &why_not);
  ASSERT_NE(comm, nullptr) << why_not;
  reducer.begin(model.grads(), model.grad_ready_ranges(), 3000, *comm, GradReduceDtype::kFloat32,
                zero.shard_len());
  for (size_t i = 0; i < model.grad_ready_ranges().size(); ++i) reducer.ready(i, model.stream());
  reducer.finish(model.stream());
  zero.use_owner_reduced_gradients();
  model.synchronize();
}

void expect_matches_references(Architecture arch, GradReduceDtype dtype, double max_norm,
                               bool owner_buckets = false) {
  SCOPED_TRACE(architecture_name(arch));
  Communicator& world = world_communicator();
  const int ranks = world.size(), rank = world.rank();
  ModelConfig config = testing::gpu_config(arch);
  config.head_dim = 20;  // our own attention kernels: a deterministic forward
  const ParameterLayout layout(config);
  const int64_t n = layout.num_params();
  const std::vector<float> params = testing::make_params(layout, 5);
  const AdamWHyper hyper{0.9, 0.95, 1e-8, 0.1};
  const std::vector<std::string> no_decay = {"norm", "bias"};

  GpuTransformer sharded(config), whole(config);
  std::string why_not;
  const auto dp = make_device_communicator(world, sharded.stream(), &why_not);
  ASSERT_NE(dp, nullptr) << why_not;
  GpuZeroAdamW zero(sharded, hyper, no_decay, *dp);
  GpuAdamW reference(whole, hyper, no_decay);
  sharded.upload_params(params);
  whole.upload_params(params);
  std::vector<float> host_params = params;
  ZeroAdamW host(layout, hyper, no_decay, world);
  const ZeroShard shard = zero.shard();
  ASSERT_EQ(shard.begin, host.shard().begin);
  ASSERT_EQ(shard.end, host.shard().end);

  for (int step = 0; step < 3; ++step) {
    SCOPED_TRACE(::testing::Message() << "step " << step);
    const std::vector<float> grads = rank_gradient(n, rank, step);
    sharded.upload_grads(grads);
    if (owner_buckets) {
      sum_onto_owners(sharded, zero);
    } else {
      zero.reduce_gradients(dtype);
    }
    host.reduce_gradients(grads.data(), dtype);
    const std::vector<float> got_shard = zero.download_grad_shard();
    ASSERT_EQ(static_cast<int64_t>(got_shard.size()), shard.size());
    // The squared L2 norm of the elements' bounds below: what they may move the norm by.
    double norm_bound_sq = 0.0;
    if (dtype == GradReduceDtype::kBfloat16 || ranks <= 2) {
      expect_same_bits(got_shard, host.grad_shard().data(), "gradient shard", step);
    } else {
      std::vector<double> magnitude(static_cast<size_t>(shard.size()), 0.0);
      for (int r = 0; r < ranks; ++r) {
        const std::vector<float> g = rank_gradient(n, r, step);
        for (int64_t i = 0; i < shard.size(); ++i) {
          magnitude[static_cast<size_t>(i)] += std::abs(g[static_cast<size_t>(shard.begin + i)]);
        }
      }
      for (size_t i = 0; i < got_shard.size(); ++i) {
        const double bound = 2.0 * ranks * std::numeric_limits<float>::epsilon() * magnitude[i];
        ASSERT_LE(std::abs(got_shard[i] - host.grad_shard()[i]), bound)
            << "gradient shard element " << i;
        norm_bound_sq += bound * bound;
      }
    }
    world.all_reduce_sum(&norm_bound_sq, 1);
    const double host_norm = host.grad_norm();

    // The reference gets the whole summed gradient the shards hold.
    std::vector<float> own(static_cast<size_t>(zero_shard_len(n, ranks)), 0.0f);
    std::copy(got_shard.begin(), got_shard.end(), own.begin());
    std::vector<float> summed(own.size() * static_cast<size_t>(ranks));
    world.all_gather(own.data(), summed.data(), own.size());
    summed.resize(static_cast<size_t>(n));
    whole.upload_grads(summed);

    const GpuAdamWResult got = zero.step(1e-2, max_norm);
    const GpuAdamWResult want = reference.step(1e-2, max_norm);
    ASSERT_TRUE(got.applied);
    // Against the host's norm: equal shards give the same norm up to the double sum's grouping;
    // shards apart by the bounds above move it by at most their norm (triangle inequality).
    EXPECT_NEAR(got.grad_norm, host_norm, 1e-12 * host_norm + std::sqrt(norm_bound_sq));
    EXPECT_NEAR(got.grad_norm, want.grad_norm, 1e-12 * want.grad_norm);
    ASSERT_EQ(static_cast<float>(got.clip_factor), static_cast<float>(want.clip_factor));
    if (max_norm > 0.0) {
      EXPECT_LT(got.clip_factor, 1.0) << "clipping must be active";
    }
    const std::vector<float> want_params = whole.download_params();
    const std::vector<float> got_params = sharded.download_params();
    for (const GradRange& range : sharded.fp32_weight_ranges()) {
      for (int64_t i = range.offset; i < range.offset + range.count; ++i) {
        ASSERT_EQ(std::bit_cast<uint32_t>(got_params[static_cast<size_t>(i)]),
                  std::bit_cast<uint32_t>(want_params[static_cast<size_t>(i)]))
            << "fp32-read weight " << i << ", step " << step;
      }
    }
    const std::vector<uint16_t> got_bf16 = download_bf16(sharded);
    const std::vector<uint16_t> want_bf16 = download_bf16(whole);
    for (size_t i = 0; i < got_bf16.size(); ++i) {
      ASSERT_EQ(got_bf16[i], want_bf16[i]) << "bf16 weight " << i << ", step " << step;
    }
    const std::vector<float> want_m = reference.download_exp_avg();
    const std::vector<float> want_v = reference.download_exp_avg_sq();
    expect_same_bits(zero.download_exp_avg(), want_m.data() + shard.begin, "exp_avg", step);
    expect_same_bits(zero.download_exp_avg_sq(), want_v.data() + shard.begin, "exp_avg_sq", step);
    const double got_loss = forward_loss(sharded, config);
    EXPECT_EQ(std::bit_cast<uint64_t>(got_loss),
              std::bit_cast<uint64_t>(forward_loss(whole, config)));
  }
  EXPECT_EQ(zero.step_count(), 3);
  zero.gather_weights();
  const std::vector<float> want_params = whole.download_params();
  expect_same_bits(sharded.download_params(), want_params.data(), "gathered weights", 3);
}

TEST(GpuZeroAdamW, Fp32MatchesHostShardsAndTheUnshardedUpdate) {
  MF_REQUIRE_NCCL_GPUS();
  for (const Architecture arch :
       {Architecture::kLlama, Architecture::kQwen2Moe, Architecture::kQwen3Moe}) {
    expect_matches_references(arch, GradReduceDtype::kFloat32, 1.0);
  }
}

TEST(GpuZeroAdamW, Fp32OwnerSumsInBucketsMatchHostShardsAndTheUnshardedUpdate) {
  MF_REQUIRE_NCCL_GPUS();
  for (const Architecture arch : {Architecture::kLlama, Architecture::kQwen2Moe}) {
    expect_matches_references(arch, GradReduceDtype::kFloat32, 1.0, /*owner_buckets=*/true);
  }
}

TEST(GpuZeroAdamW, Bf16MatchesHostShardsAndTheUnshardedUpdate) {
  MF_REQUIRE_NCCL_GPUS();
  expect_matches_references(Architecture::kQwen2Moe, GradReduceDtype::kBfloat16, 1.0);
}

TEST(GpuZeroAdamW, WithoutClippingMatchesTheUnshardedUpdate) {
  MF_REQUIRE_NCCL_GPUS();
  expect_matches_references(Architecture::kMixtral, GradReduceDtype::kFloat32, 0.0);
}

TEST(GpuZeroAdamW, NamesTheFirstNonFiniteGradientOfAnyShard) {
  MF_REQUIRE_NCCL_GPUS();
  Communicator& world = world_communicator();
  const ModelConfig config = testing::gpu_config(Architecture::kQwen2Moe);
  const ParameterLayout layout(config);
  GpuTransformer model(config);
  std::string why_not;
  const auto dp = make_device_communicator(world, model.stream(), &why_not);
  ASSERT_NE(dp, nullptr) << why_not;
  GpuZeroAdamW zero(model, AdamWHyper{}, {"norm", "bias"}, *dp);
  std::vector<float> grads(static_cast<size_t>(layout.num_params()), 1e-3f);
  model.upload_grads(grads);
  zero.reduce_gradients(GradReduceDtype::kFloat32);
  EXPECT_EQ(zero.first_nonfinite_spec(), -1);
  // A NaN in the first spec (owned by rank 0) and an infinity in a middle one: the later spec in
  // layout order comes first in backward order, whichever rank owns it.
  const auto middle = static_cast<int64_t>(layout.specs().size() / 2);
  if (world.rank() == world.size() - 1) {
    grads[0] = std::numeric_limits<float>::quiet_NaN();
    grads[static_cast<size_t>(layout.specs()[static_cast<size_t>(middle)].offset)] =
        std::numeric_limits<float>::infinity();
  }
  model.upload_grads(grads);
  zero.reduce_gradients(GradReduceDtype::kFloat32);
  EXPECT_EQ(zero.first_nonfinite_spec(), middle);
  const GpuAdamWResult skipped = zero.step(1e-2, 1.0);
  EXPECT_FALSE(skipped.applied);
  EXPECT_EQ(zero.step_count(), 0);
}

}  // namespace
}  // namespace moeforge::cuda

int main(int argc, char** argv) {
  return moeforge::testing::run_nccl_tests(argc, argv, "gpu_zero_adamw_tests");
}
