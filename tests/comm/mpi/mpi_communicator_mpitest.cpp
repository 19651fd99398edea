// Tests of MpiCommunicator with known per-rank values; must run under mpirun (2 and 4 ranks in
// ctest). A fatal failure on any rank aborts the job; other failures make that rank exit non-zero.
#include <gtest/gtest.h>
#include <mpi.h>

#include <bit>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "comm/collective_test_values.h"
#include "comm/communicator.h"
#include "comm/mpi/mpi_communicator.h"
#include "comm/rank_failure_listener.h"
#include "core/error.h"

namespace moeforge {
namespace {

using testing::bf16_bits;
using testing::bf16_value;
using testing::thrown_message;

MpiCommunicator& world() {
  return dynamic_cast<MpiCommunicator&>(world_communicator());
}

// A communicator over a duplicate of MPI_COMM_WORLD, to test a small max_count_per_call.
std::unique_ptr<MpiCommunicator> duplicate_world(size_t max_count_per_call) {
  MPI_Comm comm = MPI_COMM_NULL;
  MF_MPI_CHECK(MPI_Comm_dup(MPI_COMM_WORLD, &comm));
  return std::make_unique<MpiCommunicator>(comm, MpiCommOwnership::kOwned, max_count_per_call);
}

uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// Signed values spread over 2^-20..2^21, so the rounded sum depends on the order of additions.
template <typename T>
T mixed_magnitude_value(int rank_idx, size_t i) {
  const uint64_t hash = splitmix64(static_cast<uint64_t>(rank_idx) * 1000003ull + i);
  const double mantissa = 1.0 + static_cast<double>(hash >> 11) * 0x1.0p-53;
  const int exponent = static_cast<int>((hash >> 3) % 41) - 20;
  const T magnitude = static_cast<T>(std::ldexp(mantissa, exponent));
  return (hash & 1) ? -magnitude : magnitude;
}

// ((x_0 + x_1) + x_2) + ... in T, the order MpiCommunicator promises.
template <typename T>
T rank_order_sum(int num_ranks, size_t i) {
  T sum = mixed_magnitude_value<T>(0, i);
  for (int rank_idx = 1; rank_idx < num_ranks; ++rank_idx) {
    sum += mixed_magnitude_value<T>(rank_idx, i);
  }
  return sum;
}

template <typename T>
::testing::AssertionResult bitwise_equal(const std::vector<T>& actual,
                                         const std::vector<T>& expected) {
  if (actual.size() != expected.size()) {
    return ::testing::AssertionFailure()
           << "size " << actual.size() << " != expected " << expected.size();
  }
  for (size_t i = 0; i < actual.size(); ++i) {
    if (std::memcmp(&actual[i], &expected[i], sizeof(T)) != 0) {
      return ::testing::AssertionFailure()
             << "first mismatch at " << i << ": " << actual[i] << " != expected " << expected[i]
             << " (rank " << world().rank() << ")";
    }
  }
  return ::testing::AssertionSuccess();
}

// Every rank's copy of `values` has the same bytes as every other rank's.
template <typename T>
::testing::AssertionResult identical_on_all_ranks(Communicator& comm,
                                                  const std::vector<T>& values) {
  const size_t num_bytes = values.size() * sizeof(T);
  std::vector<uint8_t> gathered(num_bytes * comm.size());
  comm.all_gather(reinterpret_cast<const uint8_t*>(values.data()), gathered.data(), num_bytes);
  for (int rank_idx = 0; rank_idx < comm.size(); ++rank_idx) {
    if (num_bytes != 0 &&
        std::memcmp(gathered.data() + rank_idx * num_bytes, values.data(), num_bytes) != 0) {
      return ::testing::AssertionFailure()
             << "rank " << rank_idx << " holds different bytes than rank " << comm.rank();
    }
  }
  return ::testing::AssertionSuccess();
}

template <typename T>
void check_float_all_reduce(MpiCommunicator& comm, size_t count) {
  SCOPED_TRACE(::testing::Message() << "count " << count << ", max_count_per_call "
                                    << (&comm == &world() ? "default" : "small"));
  std::vector<T> data(count);
  std::vector<T> expected(count);
  for (size_t i = 0; i < count; ++i) {
    data[i] = mixed_magnitude_value<T>(comm.rank(), i);
    expected[i] = rank_order_sum<T>(comm.size(), i);
  }
  comm.all_reduce_sum(data.data(), count);
  EXPECT_TRUE(bitwise_equal(data, expected));
  EXPECT_TRUE(identical_on_all_ranks(comm, data));
}

TEST(MpiCommunicator, WorldCoversAllMpiRanks) {
  int mpi_rank = -1;
  int mpi_size = -1;
  MPI_Comm_rank(MPI_COMM_WORLD, &mpi_rank);
  MPI_Comm_size(MPI_COMM_WORLD, &mpi_size);
  EXPECT_EQ(world().rank(), mpi_rank);
  EXPECT_EQ(world().size(), mpi_size);
  EXPECT_EQ(world().name(), "mpi");
  EXPECT_EQ(world().mpi_comm(), MPI_COMM_WORLD);
  EXPECT_EQ(&world_communicator(), &world());
}

TEST(MpiCommunicator, TestValuesDependOnTheSummationOrder) {
  // Guards the float tests below: with >= 3 ranks another order of additions rounds differently.
  const int num_ranks = world().size();
  if (num_ranks < 3) GTEST_SKIP() << "two summands add the same in either order";
  int num_order_sensitive = 0;
  for (size_t i = 0; i < 1000; ++i) {
    float reversed = mixed_magnitude_value<float>(num_ranks - 1, i);
    for (int rank_idx = num_ranks - 2; rank_idx >= 0; --rank_idx) {
      reversed += mixed_magnitude_value<float>(rank_idx, i);
    }
    if (reversed != rank_order_sum<float>(num_ranks, i)) ++num_order_sensitive;
  }
  EXPECT_GT(num_order_sensitive, 50);
}

TEST(MpiCommunicator, AllReduceSumFloatIsTheRankOrderSumOnEveryRank) {
  for (size_t count : {size_t{0}, size_t{1}, size_t{3}, size_t{1003}}) {
    check_float_all_reduce<float>(world(), count);
    check_float_all_reduce<double>(world(), count);
  }
}

TEST(MpiCommunicator, AllReduceSumFloatSplitIntoSmallCallsIsTheRankOrderSum) {
  std::unique_ptr<MpiCommunicator> comm = duplicate_world(/*max_count_per_call=*/7);
  for (size_t count : {size_t{5}, size_t{7}, size_t{100}}) {
    check_float_all_reduce<float>(*comm, count);
    check_float_all_reduce<double>(*comm, count);
  }
}

TEST(MpiCommunicator, AllReduceSumIntegers) {
  const int num_ranks = world().size();
  const int rank_idx = world().rank();
  const int64_t rank_sum = static_cast<int64_t>(num_ranks) * (num_ranks - 1) / 2;

  std::vector<int32_t> data32(5);
  std::vector<int64_t> data64(5);
  std::vector<uint8_t> data8(5);
  for (size_t i = 0; i < 5; ++i) {
    data32[i] = rank_idx * 100 + static_cast<int32_t>(i);
    data64[i] = (int64_t{1} << 40) * rank_idx - static_cast<int64_t>(i);
    data8[i] = static_cast<uint8_t>(rank_idx * 120 + i);
  }
  world().all_reduce_sum(data32.data(), data32.size());
  world().all_reduce_sum(data64.data(), data64.size());
  world().all_reduce_sum(data8.data(), data8.size());
  for (size_t i = 0; i < 5; ++i) {
    EXPECT_EQ(data32[i], 100 * rank_sum + num_ranks * static_cast<int64_t>(i)) << i;
    EXPECT_EQ(data64[i], (int64_t{1} << 40) * rank_sum - num_ranks * static_cast<int64_t>(i)) << i;
    EXPECT_EQ(data8[i], static_cast<uint8_t>(120 * rank_sum + num_ranks * i)) << i;
  }
}

TEST(MpiCommunicator, AllReduceSumIntegersSplitIntoSmallCalls) {
  std::unique_ptr<MpiCommunicator> comm = duplicate_world(/*max_count_per_call=*/3);
  std::vector<int64_t> data(10);
  for (size_t i = 0; i < data.size(); ++i) data[i] = comm->rank() * 1000 + static_cast<int64_t>(i);
  comm->all_reduce_sum(data.data(), data.size());
  const int64_t num_ranks = comm->size();
  for (size_t i = 0; i < data.size(); ++i) {
    EXPECT_EQ(data[i], 1000 * num_ranks * (num_ranks - 1) / 2 + num_ranks * static_cast<int64_t>(i))
        << i;
  }
}

TEST(MpiCommunicator, AllReduceSumBFloat16SumsInFp32AndRoundsOnce) {
  const int num_ranks = world().size();
  const int rank_idx = world().rank();
  const uint16_t kBf16Max = 0x7F7F;  // 3.39e38: two of them overflow fp32
  std::vector<uint16_t> data = {
      bf16_bits(static_cast<float>(rank_idx + 1)),
      bf16_bits(rank_idx == 0 ? 1.0f : 0x1.0p-8f),  // each 2^-8 alone would round away
      bf16_bits(-0.5f * static_cast<float>(rank_idx + 1)),
      rank_idx == 0 ? uint16_t{0x7FC0} : bf16_bits(1.0f),  // NaN
      kBf16Max,
  };
  world().all_reduce_sum(data.data(), data.size(), CommDType::kBFloat16);

  const double rank_count_sum = num_ranks * (num_ranks + 1) / 2.0;
  EXPECT_EQ(bf16_value(data[0]), rank_count_sum);
  // 1 + (n-1) 2^-8 rounded once to bf16's 2^-7 spacing in [1, 2), ties to even: n = 2 gives 1,
  // n = 4 gives 1 + 2^-6; adding 2^-8 to 1 and rounding at each step would always give 1.
  const double exact = 1.0 + (num_ranks - 1) * 0x1.0p-8;
  EXPECT_EQ(bf16_value(data[1]), std::nearbyint(exact * 128.0) / 128.0) << "n = " << num_ranks;
  EXPECT_EQ(bf16_value(data[2]), -0.5 * rank_count_sum);
  EXPECT_TRUE(std::isnan(bf16_value(data[3])));
  EXPECT_EQ(data[4], num_ranks == 1 ? kBf16Max : uint16_t{0x7F80});  // +infinity
}

TEST(MpiCommunicator, ReduceScatterSumBFloat16) {
  const int num_ranks = world().size();
  const size_t count = 3;
  std::vector<uint16_t> send(count * num_ranks);
  for (int dst_idx = 0; dst_idx < num_ranks; ++dst_idx) {
    for (size_t i = 0; i < count; ++i) {
      send[dst_idx * count + i] = bf16_bits(static_cast<float>(world().rank() + dst_idx + i));
    }
  }
  std::vector<uint16_t> recv(count, 0xFFFF);
  world().reduce_scatter_sum(send.data(), recv.data(), count, CommDType::kBFloat16);
  const int rank_sum = num_ranks * (num_ranks - 1) / 2;
  for (size_t i = 0; i < count; ++i) {
    EXPECT_EQ(bf16_value(recv[i]), rank_sum + num_ranks * (world().rank() + static_cast<int>(i)))
        << i;
  }
}

TEST(MpiCommunicator, BFloat16MovesTwoByteElementsBitForBit) {
  const int num_ranks = world().size();
  const int rank_idx = world().rank();
  // NaN payloads, subnormals and negative zero or subnormals must arrive unchanged.
  const auto pattern = [](int src_idx, int slot) {
    const uint16_t specials[] = {0x7FC1, 0x0001, 0x8000};
    return static_cast<uint16_t>(specials[slot % 3] + 0x10 * src_idx);
  };
  std::vector<uint16_t> send = {pattern(rank_idx, 0), pattern(rank_idx, 1)};
  std::vector<uint16_t> gathered(2 * num_ranks, 0);
  world().all_gather(send.data(), gathered.data(), 2, CommDType::kBFloat16);
  for (int src_idx = 0; src_idx < num_ranks; ++src_idx) {
    EXPECT_EQ(gathered[2 * src_idx], pattern(src_idx, 0));
    EXPECT_EQ(gathered[2 * src_idx + 1], pattern(src_idx, 1));
  }

  std::vector<uint16_t> to_peers(num_ranks);
  std::vector<uint16_t> from_peers(num_ranks, 0);
  for (int dst_idx = 0; dst_idx < num_ranks; ++dst_idx)
    to_peers[dst_idx] = pattern(rank_idx, dst_idx);
  world().all_to_all(to_peers.data(), from_peers.data(), 1, CommDType::kBFloat16);
  for (int src_idx = 0; src_idx < num_ranks; ++src_idx) {
    EXPECT_EQ(from_peers[src_idx], pattern(src_idx, rank_idx));
  }

  const int root = num_ranks - 1;
  std::vector<uint16_t> data(3, 0);
  if (rank_idx == root) data = {pattern(root, 0), pattern(root, 1), pattern(root, 2)};
  world().broadcast(data.data(), data.size(), CommDType::kBFloat16, root);
  EXPECT_EQ(data, (std::vector<uint16_t>{pattern(root, 0), pattern(root, 1), pattern(root, 2)}));
}

TEST(MpiCommunicator, AllGatherConcatenatesInRankOrder) {
  const int num_ranks = world().size();
  const size_t count = 3;
  std::vector<int32_t> send_int(count);
  std::vector<float> send_float(count);
  for (size_t i = 0; i < count; ++i) {
    send_int[i] = world().rank() * 10 + static_cast<int32_t>(i);
    send_float[i] = 0.5f * send_int[i];
  }
  std::vector<int32_t> recv_int(count * num_ranks, -1);
  std::vector<float> recv_float(count * num_ranks, -1.0f);
  world().all_gather(send_int.data(), recv_int.data(), count);
  world().all_gather(send_float.data(), recv_float.data(), count);
  for (int src_idx = 0; src_idx < num_ranks; ++src_idx) {
    for (size_t i = 0; i < count; ++i) {
      EXPECT_EQ(recv_int[src_idx * count + i], src_idx * 10 + static_cast<int32_t>(i));
      EXPECT_EQ(recv_float[src_idx * count + i], 0.5f * (src_idx * 10 + static_cast<int32_t>(i)));
    }
  }
  std::vector<int32_t> empty;
  world().all_gather(empty.data(), empty.data(), 0);
}

TEST(MpiCommunicator, ReduceScatterSumFloatIsTheRankOrderSum) {
  const int num_ranks = world().size();
  const size_t count = 5;
  std::vector<float> send(count * num_ranks);
  for (size_t i = 0; i < send.size(); ++i) {
    send[i] = mixed_magnitude_value<float>(world().rank(), i);
  }
  std::vector<float> recv(count, -1.0f);
  world().reduce_scatter_sum(send.data(), recv.data(), count);
  std::vector<float> expected(count);
  for (size_t i = 0; i < count; ++i) {
    expected[i] = rank_order_sum<float>(num_ranks, world().rank() * count + i);
  }
  EXPECT_TRUE(bitwise_equal(recv, expected));
}

TEST(MpiCommunicator, ReduceScatterSumIntegers) {
  const int num_ranks = world().size();
  const size_t count = 4;
  std::vector<int64_t> send(count * num_ranks);
  for (int dst_idx = 0; dst_idx < num_ranks; ++dst_idx) {
    for (size_t i = 0; i < count; ++i) {
      send[dst_idx * count + i] = world().rank() * 1000 + dst_idx * 10 + static_cast<int64_t>(i);
    }
  }
  std::vector<int64_t> recv(count, -1);
  world().reduce_scatter_sum(send.data(), recv.data(), count);
  const int64_t rank_sum = static_cast<int64_t>(num_ranks) * (num_ranks - 1) / 2;
  for (size_t i = 0; i < count; ++i) {
    EXPECT_EQ(recv[i],
              1000 * rank_sum + num_ranks * (world().rank() * 10 + static_cast<int64_t>(i)));
  }
}

TEST(MpiCommunicator, AllToAllTransposesChunks) {
  const int num_ranks = world().size();
  const int rank_idx = world().rank();
  const size_t count = 2;
  std::vector<int64_t> send_int(count * num_ranks);
  std::vector<double> send_double(count * num_ranks);
  for (int dst_idx = 0; dst_idx < num_ranks; ++dst_idx) {
    for (size_t i = 0; i < count; ++i) {
      send_int[dst_idx * count + i] = rank_idx * 1000 + dst_idx * 10 + static_cast<int64_t>(i);
      send_double[dst_idx * count + i] = 0.25 * send_int[dst_idx * count + i];
    }
  }
  std::vector<int64_t> recv_int(count * num_ranks, -1);
  std::vector<double> recv_double(count * num_ranks, -1.0);
  world().all_to_all(send_int.data(), recv_int.data(), count);
  world().all_to_all(send_double.data(), recv_double.data(), count);
  for (int src_idx = 0; src_idx < num_ranks; ++src_idx) {
    for (size_t i = 0; i < count; ++i) {
      const int64_t expected = src_idx * 1000 + rank_idx * 10 + static_cast<int64_t>(i);
      EXPECT_EQ(recv_int[src_idx * count + i], expected);
      EXPECT_EQ(recv_double[src_idx * count + i], 0.25 * expected);
    }
  }
}

TEST(MpiCommunicator, AllToAllVWithUnevenAndZeroCounts) {
  const int num_ranks = world().size();
  const int rank_idx = world().rank();
  const testing::UnevenExchange exchange = testing::uneven_exchange(num_ranks, rank_idx);
  const auto& [send_counts, recv_counts, send_offsets, recv_offsets, send_extent, recv_extent] =
      exchange;

  const int32_t kUntouched = -7;
  std::vector<int32_t> send(send_extent, kUntouched);
  for (int dst_idx = 0; dst_idx < num_ranks; ++dst_idx) {
    for (size_t i = 0; i < send_counts[dst_idx]; ++i) {
      send[send_offsets[dst_idx] + i] = rank_idx * 10000 + dst_idx * 100 + static_cast<int32_t>(i);
    }
  }
  std::vector<int32_t> recv(recv_extent, kUntouched);
  std::vector<int32_t> expected(recv_extent, kUntouched);
  for (int src_idx = 0; src_idx < num_ranks; ++src_idx) {
    for (size_t i = 0; i < recv_counts[src_idx]; ++i) {
      expected[recv_offsets[src_idx] + i] =
          src_idx * 10000 + rank_idx * 100 + static_cast<int32_t>(i);
    }
  }
  world().all_to_all_v(send.data(), send_counts.data(), send_offsets.data(), recv.data(),
                       recv_counts.data(), recv_offsets.data(), CommDType::kInt32);
  EXPECT_EQ(recv, expected);
}

TEST(MpiCommunicator, AllToAllVWithOnlyZeroCounts) {
  const std::vector<size_t> zeros(world().size(), 0);
  world().all_to_all_v(nullptr, zeros.data(), zeros.data(), nullptr, zeros.data(), zeros.data(),
                       CommDType::kFloat32);
}

TEST(MpiCommunicator, BroadcastFromEveryRoot) {
  std::unique_ptr<MpiCommunicator> small_calls = duplicate_world(/*max_count_per_call=*/3);
  for (MpiCommunicator* comm : {&world(), small_calls.get()}) {
    for (int root = 0; root < comm->size(); ++root) {
      std::vector<double> data(10, -1.0);
      if (comm->rank() == root) {
        for (size_t i = 0; i < data.size(); ++i) data[i] = root * 7.5 + static_cast<double>(i);
      }
      comm->broadcast(data.data(), data.size(), root);
      for (size_t i = 0; i < data.size(); ++i) {
        EXPECT_EQ(data[i], root * 7.5 + static_cast<double>(i)) << "root " << root << ", i " << i;
      }
    }
  }
}

TEST(MpiCommunicator, BroadcastRejectsARootOutsideTheCommunicator) {
  int32_t value = 0;
  EXPECT_THROW(world().broadcast(&value, 1, world().size()), Error);
  EXPECT_THROW(world().broadcast(&value, 1, -1), Error);
}

TEST(MpiCommunicator, ReduceSumFloatIsTheRankOrderSumOnTheRootOnly) {
  for (int root = 0; root < world().size(); ++root) {
    SCOPED_TRACE(::testing::Message() << "root " << root);
    for (size_t count : {size_t{0}, size_t{1}, size_t{1003}}) {
      std::vector<float> data(count), mine(count), expected(count);
      std::vector<double> data64(count), expected64(count);
      for (size_t i = 0; i < count; ++i) {
        data[i] = mine[i] = mixed_magnitude_value<float>(world().rank(), i);
        data64[i] = mixed_magnitude_value<double>(world().rank(), i);
        expected[i] = rank_order_sum<float>(world().size(), i);
        expected64[i] = rank_order_sum<double>(world().size(), i);
      }
      world().reduce_sum(data.data(), count, root);
      world().reduce_sum(data64.data(), count, root);
      if (world().rank() == root) {
        EXPECT_TRUE(bitwise_equal(data, expected));
        EXPECT_TRUE(bitwise_equal(data64, expected64));
      } else {
        EXPECT_TRUE(bitwise_equal(data, mine)) << "a rank other than the root keeps its data";
      }
    }
  }
}

TEST(MpiCommunicator, ReduceSumIntegers) {
  const int64_t num_ranks = world().size();
  const int root = world().size() - 1;
  std::vector<int64_t> data(4);
  for (size_t i = 0; i < data.size(); ++i)
    data[i] = world().rank() * 1000 + static_cast<int64_t>(i);
  const std::vector<int64_t> mine = data;
  world().reduce_sum(data.data(), data.size(), root);
  for (size_t i = 0; i < data.size(); ++i) {
    const int64_t want = world().rank() == root ? 1000 * num_ranks * (num_ranks - 1) / 2 +
                                                      num_ranks * static_cast<int64_t>(i)
                                                : mine[i];
    EXPECT_EQ(data[i], want) << i;
  }
}

TEST(MpiCommunicator, ReduceSumRejectsARootOutsideTheCommunicator) {
  float value = 0.0f;
  EXPECT_THROW(world().reduce_sum(&value, 1, world().size()), Error);
  EXPECT_THROW(world().reduce_sum(&value, 1, -1), Error);
}

TEST(MpiCommunicator, BarrierWaitsForTheSlowestRank) {
  using Clock = std::chrono::steady_clock;
  const auto delay = std::chrono::milliseconds(200);
  world().barrier();
  const Clock::time_point start = Clock::now();
  if (world().rank() == 0) std::this_thread::sleep_for(delay);
  world().barrier();
  EXPECT_GE(Clock::now() - start, delay * 3 / 4);
}

TEST(MpiCommunicator, SplitIntoEvenAndOddRanks) {
  const int num_ranks = world().size();
  const int rank_idx = world().rank();
  const int color = rank_idx % 2;
  // key = -rank orders each group by descending world rank.
  std::unique_ptr<Communicator> group = world().split(color, /*key=*/-rank_idx);
  // World ranks of the group, in group rank order.
  const std::vector<int32_t> members = testing::descending_members(num_ranks, color);
  ASSERT_EQ(group->size(), static_cast<int>(members.size()));
  EXPECT_EQ(members[group->rank()], rank_idx);
  EXPECT_EQ(group->name(), "mpi");

  std::vector<int32_t> gathered(members.size(), -1);
  const int32_t own = rank_idx;
  group->all_gather(&own, gathered.data(), 1);
  EXPECT_EQ(gathered, members);

  std::vector<float> data = {mixed_magnitude_value<float>(rank_idx, 0), 1.0f};
  group->all_reduce_sum(data.data(), data.size());
  float expected = mixed_magnitude_value<float>(members[0], 0);
  for (size_t i = 1; i < members.size(); ++i) {
    expected += mixed_magnitude_value<float>(members[i], 0);
  }
  EXPECT_TRUE(
      bitwise_equal(data, std::vector<float>{expected, static_cast<float>(members.size())}));

  // Equal keys keep the parent's order; the nested split owns its own MPI_Comm.
  std::unique_ptr<Communicator> same_group = group->split(/*color=*/0, /*key=*/0);
  EXPECT_EQ(same_group->size(), group->size());
  EXPECT_EQ(same_group->rank(), group->rank());
  std::vector<int32_t> sent(same_group->size());
  std::vector<int32_t> received(same_group->size(), -1);
  for (int dst_idx = 0; dst_idx < same_group->size(); ++dst_idx) {
    sent[dst_idx] = own * 100 + dst_idx;
  }
  same_group->all_to_all(sent.data(), received.data(), 1);
  for (int src_idx = 0; src_idx < same_group->size(); ++src_idx) {
    EXPECT_EQ(received[src_idx], members[src_idx] * 100 + same_group->rank());
  }
}

TEST(MpiCommunicator, SplitIntoSingletons) {
  std::unique_ptr<Communicator> alone = world().split(/*color=*/world().rank(), /*key=*/0);
  EXPECT_EQ(alone->size(), 1);
  EXPECT_EQ(alone->rank(), 0);
  double value = 2.5;
  alone->all_reduce_sum(&value, 1);
  EXPECT_EQ(value, 2.5);
}

TEST(MpiCommunicator, SplitRejectsANegativeColor) {
  EXPECT_THROW(world().split(/*color=*/-1, /*key=*/0), Error);
}

TEST(MpiCommunicator, CountsBeyondIntThrowBeforeCommunicating) {
  const int num_ranks = world().size();
  const size_t too_large = static_cast<size_t>(INT_MAX) + 1;
  float buffer[1] = {0.0f};
  float other[1] = {0.0f};

  std::vector<size_t> counts(num_ranks, 0);
  std::vector<size_t> offsets(num_ranks, 0);
  counts[num_ranks - 1] = too_large;
  const std::string send_count_message = thrown_message([&] {
    world().all_to_all_v(buffer, counts.data(), offsets.data(), other, offsets.data(),
                         offsets.data(), CommDType::kFloat32);
  });
  EXPECT_NE(send_count_message.find("all_to_all_v: send_counts[" + std::to_string(num_ranks - 1) +
                                    "] = 2147483648"),
            std::string::npos)
      << send_count_message;

  const std::vector<size_t> zeros(num_ranks, 0);
  offsets[0] = too_large;
  const std::string recv_offset_message = thrown_message([&] {
    world().all_to_all_v(buffer, zeros.data(), zeros.data(), other, zeros.data(), offsets.data(),
                         CommDType::kFloat32);
  });
  EXPECT_NE(recv_offset_message.find("recv_offsets[0] = 2147483648"), std::string::npos)
      << recv_offset_message;

  EXPECT_THROW(world().all_gather(buffer, other, too_large, CommDType::kFloat32), Error);
  EXPECT_THROW(world().all_to_all(buffer, other, too_large, CommDType::kFloat32), Error);
  EXPECT_THROW(world().reduce_scatter_sum(buffer, other, too_large, CommDType::kFloat32), Error);
}

TEST(MpiCommunicator, OverlappingBuffersThrow) {
  std::vector<int32_t> buffer(world().size());
  // The send element is the last element of the receive range.
  EXPECT_THROW(world().all_gather(buffer.data() + world().size() - 1, buffer.data(), 1), Error);
  EXPECT_THROW(world().all_to_all(buffer.data(), buffer.data(), 1), Error);
}

TEST(MpiCommunicator, ConstructorRejectsInvalidArguments) {
  EXPECT_THROW(MpiCommunicator(MPI_COMM_NULL, MpiCommOwnership::kBorrowed), Error);
  EXPECT_THROW(MpiCommunicator(MPI_COMM_WORLD, MpiCommOwnership::kBorrowed, 0), Error);
}

TEST(MfMpiCheck, ErrorNamesTheCallAndCarriesMpisMessage) {
  // MPI_COMM_WORLD returns errors (set by the world MpiCommunicator); the root check is local.
  int32_t value = 0;
  const std::string message = thrown_message(
      [&] { MF_MPI_CHECK(MPI_Bcast(&value, 1, MPI_INT32_T, world().size(), MPI_COMM_WORLD)); });
  EXPECT_NE(message.find("MPI_Bcast(&value, 1, MPI_INT32_T"), std::string::npos) << message;
  EXPECT_NE(message.find("invalid root"), std::string::npos) << message;
  EXPECT_NE(message.find("mpi_communicator_mpitest.cpp"), std::string::npos) << message;
}

}  // namespace
}  // namespace moeforge

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  moeforge::Communicator& world = moeforge::world_communicator();
  if (dynamic_cast<moeforge::MpiCommunicator*>(&world) == nullptr) {
    std::fprintf(stderr, "this test needs an MPI launcher: mpirun -np 2 --oversubscribe %s\n",
                 argv[0]);
    return 1;
  }
  moeforge::install_rank_failure_listener(world.rank());
  return RUN_ALL_TESTS();
}
