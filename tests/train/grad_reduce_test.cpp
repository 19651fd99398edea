// The bf16-compressed gradient all-reduce over in-process ranks: element by element the rank-order
// fp32 sum of the bf16-rounded values, identical on every rank. (The fp32 path is the
// communicator's own all-reduce, tested with the MPI communicator and by the CLI data-parallel
// tests.)
#include "train/grad_reduce.h"

#include <gtest/gtest.h>

#include <cmath>
#include <mutex>
#include <vector>

#include "core/rng.h"
#include "io/dtype.h"
#include "model/thread_communicator.h"

namespace moeforge {
namespace {

std::vector<float> rank_values(int rank, size_t count) {
  Rng rng(100 + static_cast<uint64_t>(rank));
  std::vector<float> v(count);
  for (float& x : v) x = static_cast<float>(rng.normal() * (1.0 + rank));
  return v;
}

void expect_bf16_sum(int num_ranks, size_t count) {
  std::vector<float> want(count, 0.0f);
  for (int r = 0; r < num_ranks; ++r) {
    const std::vector<float> v = rank_values(r, count);
    for (size_t i = 0; i < count; ++i) want[i] += io::bf16_to_float(io::float_to_bf16(v[i]));
  }
  std::mutex mutex;
  testing::run_ranks(num_ranks, [&](Communicator& comm) {
    std::vector<float> v = rank_values(comm.rank(), count);
    all_reduce_gradients(v.data(), v.size(), comm, GradReduceDtype::kBfloat16);
    std::lock_guard<std::mutex> lock(mutex);
    for (size_t i = 0; i < count; ++i) {
      ASSERT_EQ(v[i], want[i]) << "rank " << comm.rank() << " element " << i << " of " << count;
    }
  });
}

TEST(GradReduce, Bf16IsTheRankOrderFp32SumOfBf16Values) {
  expect_bf16_sum(2, 1000);
  expect_bf16_sum(3, 1001);  // not a multiple of the rank count
  expect_bf16_sum(4, 3);     // fewer elements than ranks
}

TEST(GradReduce, Bf16StaysWithinItsRoundingOfTheFp32Sum) {
  const size_t count = 513;
  std::vector<float> want(count, 0.0f);
  for (int r = 0; r < 2; ++r) {
    const std::vector<float> v = rank_values(r, count);
    for (size_t i = 0; i < count; ++i) want[i] += v[i];
  }
  std::mutex mutex;
  testing::run_ranks(2, [&](Communicator& comm) {
    std::vector<float> bf16 = rank_values(comm.rank(), count);
    all_reduce_gradients(bf16.data(), count, comm, GradReduceDtype::kBfloat16);
    std::lock_guard<std::mutex> lock(mutex);
    size_t differ = 0;
    for (size_t i = 0; i < count; ++i) {
      // bf16 keeps 8 bits: each summand is off by at most 2^-9 of itself (|values| < ~8 here).
      EXPECT_LE(std::fabs(bf16[i] - want[i]), 0x1.0p-8 * 8.0f) << "element " << i;
      differ += bf16[i] != want[i];
    }
    EXPECT_GT(differ, count / 2);
  });
}

TEST(GradReduce, OneRankLeavesTheGradientUnchanged) {
  testing::run_ranks(1, [&](Communicator& comm) {
    std::vector<float> v = rank_values(0, 17);
    const std::vector<float> before = v;
    all_reduce_gradients(v.data(), v.size(), comm, GradReduceDtype::kBfloat16);
    EXPECT_EQ(v, before);
  });
}

TEST(GradReduce, ParsesTheConfigNames) {
  EXPECT_EQ(parse_grad_reduce_dtype("fp32"), GradReduceDtype::kFloat32);
  EXPECT_EQ(parse_grad_reduce_dtype("bf16"), GradReduceDtype::kBfloat16);
  EXPECT_THROW(parse_grad_reduce_dtype("fp8"), Error);
}

}  // namespace
}  // namespace moeforge
