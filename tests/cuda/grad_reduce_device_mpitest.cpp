// DeviceGradReducer over NCCL against the host gradient sums (train/grad_reduce.h) on the same
// data (random values, rounding corner cases, a small model's own gradients), and
// BucketedGradReducer (the same sums in buckets, overlapped with a simulated backward)
// against DeviceGradReducer, one GPU per rank: run alone and under mpirun (2 and 4 ranks in ctest);
// skipping as comm/nccl/nccl_test_harness.h says. bf16 compression must give the host's bits
// exactly (same roundings, same rank-ordered fp32 sum); fp32 goes through NCCL's all-reduce, whose
// order of additions NCCL picks, so it matches to fp32 rounding of the sum (exactly with two
// ranks).
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "comm/nccl/nccl_test_harness.h"
#include "core/error.h"
#include "core/rng.h"
#include "cuda/bucketed_grad_reducer.h"
#include "cuda/device_memory.h"
#include "cuda/gpu_test_models.h"
#include "cuda/gpu_transformer.h"
#include "cuda/grad_reduce_device.h"
#include "train/grad_reduce.h"

namespace moeforge::cuda {
namespace {

using moeforge::testing::nccl;

// This rank's gradient: magnitudes from 1e-6 to 1e3 (so bf16 rounding and the order of additions
// both show), a different draw per rank and count.
std::vector<float> rank_gradient(size_t count, int rank) {
  Rng rng(1234 + static_cast<uint64_t>(rank), count);
  std::vector<float> g(count);
  for (float& x : g) x = static_cast<float>(rng.normal() * std::pow(10.0, rng.below(10) - 6.0));
  return g;
}

std::vector<float> reduce_on_device(const std::vector<float>& host, GradReduceDtype dtype) {
  NcclCommunicator& comm = nccl();
  DeviceBuffer<float> data;
  data.upload(host);
  DeviceGradReducer reducer;
  reducer.all_reduce(data.data(), host.size(), comm, dtype, comm.stream());
  comm.synchronize();
  return data.download();
}

const size_t kCounts[] = {1, 3, 1000, 4099, 65537};

TEST(DeviceGradReducer, Bf16CompressionGivesTheHostBitsExactly) {
  MF_REQUIRE_NCCL_GPUS();
  for (const size_t count : kCounts) {
    std::vector<float> expected = rank_gradient(count, nccl().rank());
    const std::vector<float> got = reduce_on_device(expected, GradReduceDtype::kBfloat16);
    all_reduce_gradients(expected.data(), count, world_communicator(), GradReduceDtype::kBfloat16);
    ASSERT_EQ(got.size(), count);
    for (size_t i = 0; i < count; ++i) {
      ASSERT_EQ(std::bit_cast<uint32_t>(got[i]), std::bit_cast<uint32_t>(expected[i]))
          << "count " << count << ", element " << i << ": " << got[i] << " vs " << expected[i];
    }
  }
}

TEST(DeviceGradReducer, Fp32SumMatchesTheHostToRounding) {
  MF_REQUIRE_NCCL_GPUS();
  const int num_ranks = nccl().size();
  for (const size_t count : kCounts) {
    const std::vector<float> mine = rank_gradient(count, nccl().rank());
    const std::vector<float> got = reduce_on_device(mine, GradReduceDtype::kFloat32);
    std::vector<float> expected = mine, magnitude(count);
    all_reduce_gradients(expected.data(), count, world_communicator(), GradReduceDtype::kFloat32);
    for (size_t i = 0; i < count; ++i) magnitude[i] = std::fabs(mine[i]);
    world_communicator().all_reduce_sum(magnitude.data(), count);
    for (size_t i = 0; i < count; ++i) {
      // Two orders of n - 1 fp32 additions differ by at most 2 (n - 1) eps sum |x_r| (to first
      // order); with n <= 2 the one addition is commutative and the bits agree.
      const double bound = 2.0 * (num_ranks - 1) * 0x1.0p-24 * magnitude[i] * 1.001;
      if (num_ranks <= 2) {
        ASSERT_EQ(std::bit_cast<uint32_t>(got[i]), std::bit_cast<uint32_t>(expected[i]))
            << "count " << count << ", element " << i;
      } else {
        ASSERT_LE(std::fabs(static_cast<double>(got[i]) - expected[i]), bound)
            << "count " << count << ", element " << i;
      }
    }
  }
}

// Values where a rounding could part from the host's: subnormals (of fp32 and of bf16), ties
// between two bf16 values (even and odd), the largest finite values, signed zeros; each rank
// sends them in another order, so every pair meets.
TEST(DeviceGradReducer, Bf16OfSubnormalsTiesAndExtremesGivesTheHostBits) {
  MF_REQUIRE_NCCL_GPUS();
  const std::vector<float> special = {
      0x1.0p-149f, -0x1.0p-149f, 0x1.8p-140f,   0x1.0p-127f, 0x1.fep-127f, 0x1.0p-126f, 0x1.008p0f,
      0x1.018p0f,  -0x1.008p0f,  0x1.008002p0f, 0x1.fep127f, -0x1.fep127f, 0x1.ffp127f, 0.0f,
      -0.0f,       3.0e-39f,     -1.0e-40f,     0x1.0p-133f, 0x1.0p-134f,  0x1.8p-134f};
  const size_t count = special.size() * 61;
  std::vector<float> mine(count);
  const auto shift = static_cast<size_t>(nccl().rank()) * 7;
  for (size_t i = 0; i < count; ++i) mine[i] = special[(i + shift) % special.size()];
  std::vector<float> expected = mine;
  const std::vector<float> got = reduce_on_device(mine, GradReduceDtype::kBfloat16);
  all_reduce_gradients(expected.data(), count, world_communicator(), GradReduceDtype::kBfloat16);
  for (size_t i = 0; i < count; ++i) {
    ASSERT_EQ(std::bit_cast<uint32_t>(got[i]), std::bit_cast<uint32_t>(expected[i]))
        << "element " << i << ": " << got[i] << " vs " << expected[i];
  }
}

// The gradients of a real backward (a small dense and a small MoE model, each rank on its own
// tokens, assigned as the trainer's CUDA engine does) summed in bf16 on the GPUs give the host
// sum's bits, as random values do above: the values a model produces, in the whole flat buffer.
TEST(DeviceGradReducer, Bf16SumOfModelGradientsGivesTheHostBits) {
  MF_REQUIRE_NCCL_GPUS();
  for (const Architecture arch : {Architecture::kLlama, Architecture::kMixtral}) {
    SCOPED_TRACE(architecture_name(arch));
    const ModelConfig config = testing::gpu_config(arch);
    GpuTransformer model(config);
    model.upload_params(testing::make_params(model.layout(), 3));
    Rng rng(50 + static_cast<uint64_t>(nccl().rank()));
    const int64_t batch = 2, seq = 31;
    std::vector<int32_t> tokens(static_cast<size_t>(batch * seq)), targets(tokens.size());
    for (size_t i = 0; i < tokens.size(); ++i) {
      tokens[i] = static_cast<int32_t>(rng.below(config.vocab_size));
      targets[i] = static_cast<int32_t>(rng.below(config.vocab_size));
    }
    model.forward_backward(tokens.data(), targets.data(), batch, seq,
                           1.0 / static_cast<double>(nccl().size()), GradMode::kAssign);
    std::vector<float> expected = model.download_grads();
    NcclCommunicator& comm = nccl();
    const cudaStream_t previous = comm.stream();
    comm.set_stream(model.stream());
    DeviceGradReducer reducer;
    reducer.all_reduce(model.grads(), expected.size(), comm, GradReduceDtype::kBfloat16,
                       model.stream());
    comm.set_stream(previous);
    const std::vector<float> got = model.download_grads();
    all_reduce_gradients(expected.data(), expected.size(), world_communicator(),
                         GradReduceDtype::kBfloat16);
    for (size_t i = 0; i < got.size(); ++i) {
      ASSERT_EQ(std::bit_cast<uint32_t>(got[i]), std::bit_cast<uint32_t>(expected[i]))
          << "element " << i << ": " << got[i] << " vs " << expected[i];
    }
  }
}

TEST(DeviceGradReducer, SumRankChunksAddsInRankOrderFromZero) {
  MF_REQUIRE_NCCL_GPUS();
  // 1 + 2^-24 + 2^-24 in this order is 1 (each addition rounds back to 1); from zero in another
  // order it would be 1 + 2^-23. And -0.0 alone sums to +0.0, as on the host.
  const std::vector<float> in = {1.0f, -0.0f, 0x1.0p-24f, -0.0f, 0x1.0p-24f, -0.0f};
  DeviceBuffer<bf16> device_in;
  device_in.upload(to_bf16(in));
  DeviceBuffer<float> out(2);
  sum_rank_chunks(out.data(), device_in.data(), /*num_ranks=*/3, /*chunk=*/2, nccl().stream());
  nccl().synchronize();
  const std::vector<float> got = out.download();
  EXPECT_EQ(got[0], 1.0f);
  EXPECT_EQ(std::bit_cast<uint32_t>(got[1]), 0u);
}

// BucketedGradReducer: a simulated backward writes the ranges of a buffer one by one on its own
// stream, each after a slow kernel, reporting each as ready; the buffer starts as a sentinel, so a
// sum that ran before its range was written (a missing wait) shows as a wrong value. The result
// must be what DeviceGradReducer (so the host) gives over the whole buffer.
std::vector<GradRange> descending_ranges(size_t count, size_t pieces, uint64_t seed) {
  Rng rng(seed);
  std::vector<int64_t> cuts = {0, static_cast<int64_t>(count)};
  while (cuts.size() < pieces + 1) {
    const auto cut = static_cast<int64_t>(1 + rng.below(count - 1));
    if (std::find(cuts.begin(), cuts.end(), cut) == cuts.end()) cuts.push_back(cut);
  }
  std::sort(cuts.rbegin(), cuts.rend());
  std::vector<GradRange> ranges;
  for (size_t i = 0; i + 1 < cuts.size(); ++i)
    ranges.push_back({cuts[i + 1], cuts[i] - cuts[i + 1]});
  return ranges;
}

// Runs the simulated backward (reporting the first `reported` ranges) and finish().
std::vector<float> reduce_in_buckets(const std::vector<float>& host,
                                     const std::vector<GradRange>& ranges, size_t reported,
                                     size_t bucket_elems, GradReduceDtype dtype,
                                     int64_t owner_chunk = 0) {
  NcclCommunicator& comm = nccl();
  BucketedGradReducer reducer;
  cudaStream_t previous = comm.stream();
  comm.set_stream(reducer.stream());
  cudaStream_t compute = nullptr;
  EXPECT_EQ(cudaStreamCreateWithFlags(&compute, cudaStreamNonBlocking), cudaSuccess);
  DeviceBuffer<float> source, grads, busy(size_t{1} << 26);
  source.upload(host);
  grads.upload(std::vector<float>(host.size(), 3.0e38f));
  reducer.begin(grads.data(), ranges, bucket_elems, comm, dtype, owner_chunk);
  for (size_t i = 0; i < ranges.size(); ++i) {
    const GradRange& r = ranges[i];
    // 256 MiB of memset first, so the range's write lands well after a sum that did not wait.
    for (int k = 0; k < 4; ++k) busy.fill_zero(compute);
    EXPECT_EQ(cudaMemcpyAsync(grads.data() + r.offset, source.data() + r.offset,
                              static_cast<size_t>(r.count) * sizeof(float),
                              cudaMemcpyDeviceToDevice, compute),
              cudaSuccess);
    if (i < reported) reducer.ready(i, compute);
  }
  reducer.finish(compute);
  EXPECT_EQ(cudaStreamSynchronize(compute), cudaSuccess);
  EXPECT_EQ(cudaStreamDestroy(compute), cudaSuccess);
  comm.set_stream(previous);
  return grads.download();
}

TEST(BucketedGradReducer, OverlappedBucketsGiveTheWholeBufferSum) {
  MF_REQUIRE_NCCL_GPUS();
  const size_t count = 70001;
  const std::vector<GradRange> ranges = descending_ranges(count, 13, 99);
  const std::vector<float> mine = rank_gradient(count, nccl().rank());
  std::vector<float> magnitude(count);
  for (size_t i = 0; i < count; ++i) magnitude[i] = std::fabs(mine[i]);
  world_communicator().all_reduce_sum(magnitude.data(), count);
  const int num_ranks = nccl().size();
  for (const GradReduceDtype dtype : {GradReduceDtype::kBfloat16, GradReduceDtype::kFloat32}) {
    const std::vector<float> whole = reduce_on_device(mine, dtype);
    // Buckets: one at finish(), ranges merged to >= 9000 and to >= 40000 elements (pieces of
    // that size), every range its own bucket in pieces of 1000; all ranges reported, or the last
    // four left to finish().
    for (const size_t bucket : {size_t{0}, size_t{9000}, size_t{40000}, size_t{1000}}) {
      for (const size_t reported : {ranges.size(), ranges.size() - 4}) {
        const std::vector<float> got = reduce_in_buckets(mine, ranges, reported, bucket, dtype);
        ASSERT_EQ(got.size(), count);
        for (size_t i = 0; i < count; ++i) {
          // bf16: the rank-ordered sum of the same roundings; fp32: NCCL's all-reduce per
          // piece, the same bits at two ranks and within twice the bound of
          // Fp32SumMatchesTheHostToRounding beyond (both sums may round differently).
          if (dtype == GradReduceDtype::kBfloat16 || num_ranks <= 2) {
            ASSERT_EQ(std::bit_cast<uint32_t>(got[i]), std::bit_cast<uint32_t>(whole[i]))
                << "bucket " << bucket << ", reported " << reported << ", element " << i;
          } else {
            const double bound = 4.0 * (num_ranks - 1) * 0x1.0p-24 * magnitude[i] * 1.001;
            ASSERT_LE(std::fabs(static_cast<double>(got[i]) - whole[i]), bound)
                << "bucket " << bucket << ", reported " << reported << ", element " << i;
          }
        }
      }
    }
  }
}

// ZeRO-1's owner sums: each rank's chunk of the buffer holds the whole-buffer fp32 sum (NCCL's
// reduce per piece: the same bits at two ranks, the bound above beyond), the rest of it the rank's
// own gradient untouched.
TEST(BucketedGradReducer, OwnerSumsGiveEachOwnerTheSumOfItsChunk) {
  MF_REQUIRE_NCCL_GPUS();
  const size_t count = 70001;
  const int num_ranks = nccl().size(), rank = nccl().rank();
  const std::vector<GradRange> ranges = descending_ranges(count, 13, 7);
  const std::vector<float> mine = rank_gradient(count, rank);
  std::vector<float> magnitude(count);
  for (size_t i = 0; i < count; ++i) magnitude[i] = std::fabs(mine[i]);
  world_communicator().all_reduce_sum(magnitude.data(), count);
  const std::vector<float> whole = reduce_on_device(mine, GradReduceDtype::kFloat32);
  const auto chunk = static_cast<int64_t>((count + num_ranks - 1) / num_ranks);
  const auto own_begin = static_cast<size_t>(std::min<int64_t>(rank * chunk, count));
  const auto own_end = static_cast<size_t>(std::min<int64_t>((rank + 1) * chunk, count));
  for (const size_t bucket : {size_t{0}, size_t{9000}, size_t{1000}}) {
    for (const size_t reported : {ranges.size(), ranges.size() - 4}) {
      const std::vector<float> got =
          reduce_in_buckets(mine, ranges, reported, bucket, GradReduceDtype::kFloat32, chunk);
      ASSERT_EQ(got.size(), count);
      for (size_t i = 0; i < count; ++i) {
        const bool own = i >= own_begin && i < own_end;
        if (!own || num_ranks <= 2) {
          ASSERT_EQ(std::bit_cast<uint32_t>(got[i]),
                    std::bit_cast<uint32_t>(own ? whole[i] : mine[i]))
              << "bucket " << bucket << ", reported " << reported << ", element " << i
              << (own ? " (owned)" : " (another rank's)");
        } else {
          const double bound = 4.0 * (num_ranks - 1) * 0x1.0p-24 * magnitude[i] * 1.001;
          ASSERT_LE(std::fabs(static_cast<double>(got[i]) - whole[i]), bound)
              << "bucket " << bucket << ", reported " << reported << ", element " << i;
        }
      }
    }
  }
  BucketedGradReducer reducer;
  DeviceBuffer<float> grads(10);
  EXPECT_THROW(reducer.begin(grads.data(), {{0, 10}}, 0, nccl(), GradReduceDtype::kBfloat16, 5),
               Error);
  EXPECT_FALSE(reducer.active());
}

TEST(BucketedGradReducer, RejectsRangesThatDoNotTileOrComeOutOfOrder) {
  MF_REQUIRE_NCCL_GPUS();
  BucketedGradReducer reducer;
  DeviceBuffer<float> grads(10);
  const auto rejects = [&](std::vector<GradRange> ranges, const char* what) {
    try {
      reducer.begin(grads.data(), std::move(ranges), 0, nccl(), GradReduceDtype::kFloat32);
      ADD_FAILURE() << "accepted ranges that " << what;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("gradient ranges"), std::string::npos) << e.what();
    }
    EXPECT_FALSE(reducer.active());
  };
  rejects({{5, 5}, {2, 2}, {0, 2}}, "leave a gap");
  rejects({{0, 5}, {5, 5}}, "ascend");
  rejects({{5, 5}, {1, 4}}, "stop above 0");
  rejects({}, "are empty");

  reducer.begin(grads.data(), {{5, 5}, {0, 5}}, 1, nccl(), GradReduceDtype::kFloat32);
  EXPECT_THROW(reducer.ready(1, nullptr), Error);
  EXPECT_THROW(reducer.begin(grads.data(), {{0, 10}}, 0, nccl(), GradReduceDtype::kFloat32), Error);
  cudaStream_t previous = nccl().stream();
  nccl().set_stream(reducer.stream());
  reducer.ready(0, nccl().stream());
  reducer.ready(1, nccl().stream());
  reducer.finish(nullptr);
  nccl().set_stream(previous);
  EXPECT_FALSE(reducer.active());
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
}

}  // namespace
}  // namespace moeforge::cuda

int main(int argc, char** argv) {
  return moeforge::testing::run_nccl_tests(argc, argv, "grad_reduce_device_tests");
}
