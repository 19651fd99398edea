// DeviceGradReducer over NCCL against the host gradient sums (train/grad_reduce.h) on the same
// data, one GPU per rank: run alone and under mpirun (2 and 4 ranks in ctest); skipping as
// comm/nccl/nccl_test_harness.h says. bf16 compression must give the host's bits exactly (same
// roundings, same rank-ordered fp32 sum); fp32 goes through NCCL's all-reduce, whose order of
// additions NCCL picks, so it matches to fp32 rounding of the sum (exactly with two ranks).
#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <vector>

#include "comm/nccl/nccl_test_harness.h"
#include "core/rng.h"
#include "cuda/device_memory.h"
#include "cuda/grad_reduce_device.h"
#include "train/grad_reduce.h"

namespace moeforge::cuda {
namespace {

using testing::nccl;

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

}  // namespace
}  // namespace moeforge::cuda

int main(int argc, char** argv) {
  return moeforge::testing::run_nccl_tests(argc, argv, "grad_reduce_device_tests");
}
