// Tests of NcclCommunicator on device buffers with exact expected values, one GPU per rank: run
// alone (one rank) and under mpirun (2 and 4 ranks in ctest); skipping as nccl_test_harness.h says.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <chrono>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "comm/collective_test_values.h"
#include "comm/communicator.h"
#include "comm/nccl/nccl_communicator.h"
#include "comm/nccl/nccl_test_harness.h"
#include "core/error.h"
#include "cuda/cuda_check.h"

namespace moeforge {
namespace {

using testing::bf16_bits;
using testing::bf16_value;
using testing::nccl;
using testing::thrown_message;

NcclCommunicator& as_nccl(Communicator& comm) {
  return dynamic_cast<NcclCommunicator&>(comm);
}

// count elements of T on the current device, filled with 0xFF bytes so that an element a
// collective should have written and did not shows.
template <typename T>
class DeviceArray {
 public:
  explicit DeviceArray(size_t count) : count_(count) {
    if (count_ == 0) return;
    MF_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&ptr_), bytes()));
    MF_CUDA_CHECK(cudaMemset(ptr_, 0xFF, bytes()));
  }
  explicit DeviceArray(const std::vector<T>& host) : DeviceArray(host.size()) { upload(host); }
  ~DeviceArray() { cudaFree(ptr_); }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;

  T* data() { return ptr_; }
  size_t bytes() const { return count_ * sizeof(T); }

  // Synchronous copies on the legacy default stream.
  void upload(const std::vector<T>& host) {
    MF_CHECK(host.size() == count_, "upload of {} elements into {}", host.size(), count_);
    if (count_ > 0) MF_CUDA_CHECK(cudaMemcpy(ptr_, host.data(), bytes(), cudaMemcpyHostToDevice));
  }
  std::vector<T> download() const {
    std::vector<T> host(count_);
    if (count_ > 0) MF_CUDA_CHECK(cudaMemcpy(host.data(), ptr_, bytes(), cudaMemcpyDeviceToHost));
    return host;
  }

 private:
  T* ptr_ = nullptr;
  size_t count_ = 0;
};

// The tests keep bf16 values as their raw bits: uint16_t is kBFloat16 here.
template <typename T>
CommDType dtype_of() {
  if constexpr (std::is_same_v<T, uint16_t>) {
    return CommDType::kBFloat16;
  } else {
    return comm_dtype_of<T>();
  }
}

// value (an integer that T holds exactly) as a T; uint8 wraps modulo 256 like NCCL's uint8 sum.
template <typename T>
T encode(int64_t value) {
  if constexpr (std::is_same_v<T, uint16_t>) {
    return bf16_bits(static_cast<float>(value));
  } else if constexpr (std::is_same_v<T, uint8_t>) {
    return static_cast<uint8_t>(value & 0xFF);
  } else {
    return static_cast<T>(value);
  }
}

// Per-rank test values: integers whose sums over up to 4 ranks every T holds exactly, also as
// partial sums in any order (bf16: below 256; float: below 2^24), so any summation order of
// NCCL's algorithms gives the same bits. uint8 sums wrap around.
template <typename T>
int64_t summand(int rank_idx, size_t i) {
  const int64_t small = static_cast<int64_t>(i % 7);
  if constexpr (std::is_same_v<T, uint8_t>) return 60 * rank_idx + small;
  if constexpr (std::is_same_v<T, uint16_t>) return 3 * rank_idx - small;
  if constexpr (std::is_same_v<T, int64_t>) return (int64_t{1} << 40) * rank_idx - small;
  return 1000 * rank_idx - small;
}

template <typename T>
int64_t summand_total(int num_ranks, size_t i) {
  int64_t total = 0;
  for (int rank_idx = 0; rank_idx < num_ranks; ++rank_idx) total += summand<T>(rank_idx, i);
  return total;
}

// A distinct element for a transfer test (raw bits for bf16: nothing is added).
template <typename T>
T tag(int src_idx, int dst_idx, size_t i) {
  return static_cast<T>(src_idx * 1000 + dst_idx * 37 + static_cast<int64_t>(i) * 3 + 1);
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
             << "first mismatch at " << i << ": " << +actual[i] << " != expected " << +expected[i];
    }
  }
  return ::testing::AssertionSuccess();
}

template <typename T>
void check_all_reduce_sum(NcclCommunicator& comm, size_t count) {
  SCOPED_TRACE(::testing::Message() << "dtype " << static_cast<int>(dtype_of<T>()) << ", count "
                                    << count << ", group size " << comm.size());
  std::vector<T> host(count);
  std::vector<T> expected(count);
  for (size_t i = 0; i < count; ++i) {
    host[i] = encode<T>(summand<T>(comm.rank(), i));
    expected[i] = encode<T>(summand_total<T>(comm.size(), i));
  }
  DeviceArray<T> data(host);
  comm.all_reduce_sum(data.data(), count, dtype_of<T>());
  comm.synchronize();
  EXPECT_TRUE(bitwise_equal(data.download(), expected));
}

template <typename T>
void check_all_gather(NcclCommunicator& comm, size_t count, bool in_place) {
  SCOPED_TRACE(::testing::Message() << "dtype " << static_cast<int>(dtype_of<T>()) << ", count "
                                    << count << (in_place ? ", in place" : ""));
  const int num_ranks = comm.size();
  std::vector<T> send(count);
  for (size_t i = 0; i < count; ++i) send[i] = tag<T>(comm.rank(), 0, i);
  std::vector<T> expected(count * num_ranks);
  for (int src_idx = 0; src_idx < num_ranks; ++src_idx) {
    for (size_t i = 0; i < count; ++i) expected[src_idx * count + i] = tag<T>(src_idx, 0, i);
  }
  DeviceArray<T> recv(count * num_ranks);
  if (in_place) {
    T* own_chunk = recv.data() + comm.rank() * count;
    MF_CUDA_CHECK(cudaMemcpy(own_chunk, send.data(), count * sizeof(T), cudaMemcpyHostToDevice));
    comm.all_gather(own_chunk, recv.data(), count, dtype_of<T>());
  } else {
    DeviceArray<T> send_device(send);
    comm.all_gather(send_device.data(), recv.data(), count, dtype_of<T>());
    comm.synchronize();
  }
  comm.synchronize();
  EXPECT_TRUE(bitwise_equal(recv.download(), expected));
}

template <typename T>
void check_reduce_scatter_sum(NcclCommunicator& comm, size_t count, bool in_place) {
  SCOPED_TRACE(::testing::Message() << "dtype " << static_cast<int>(dtype_of<T>()) << ", count "
                                    << count << (in_place ? ", in place" : ""));
  const int num_ranks = comm.size();
  std::vector<T> send(count * num_ranks);
  for (size_t i = 0; i < send.size(); ++i) send[i] = encode<T>(summand<T>(comm.rank(), i));
  std::vector<T> expected(count);
  for (size_t i = 0; i < count; ++i) {
    expected[i] = encode<T>(summand_total<T>(num_ranks, comm.rank() * count + i));
  }
  DeviceArray<T> send_device(send);
  if (in_place) {
    T* own_chunk = send_device.data() + comm.rank() * count;
    comm.reduce_scatter_sum(send_device.data(), own_chunk, count, dtype_of<T>());
    comm.synchronize();
    std::vector<T> recv(count);
    MF_CUDA_CHECK(cudaMemcpy(recv.data(), own_chunk, count * sizeof(T), cudaMemcpyDeviceToHost));
    EXPECT_TRUE(bitwise_equal(recv, expected));
  } else {
    DeviceArray<T> recv(count);
    comm.reduce_scatter_sum(send_device.data(), recv.data(), count, dtype_of<T>());
    comm.synchronize();
    EXPECT_TRUE(bitwise_equal(recv.download(), expected));
  }
}

template <typename T>
void check_all_to_all(NcclCommunicator& comm, size_t count) {
  SCOPED_TRACE(::testing::Message()
               << "dtype " << static_cast<int>(dtype_of<T>()) << ", count " << count);
  const int num_ranks = comm.size();
  std::vector<T> send(count * num_ranks);
  std::vector<T> expected(count * num_ranks);
  for (int peer_idx = 0; peer_idx < num_ranks; ++peer_idx) {
    for (size_t i = 0; i < count; ++i) {
      send[peer_idx * count + i] = tag<T>(comm.rank(), peer_idx, i);
      expected[peer_idx * count + i] = tag<T>(peer_idx, comm.rank(), i);
    }
  }
  DeviceArray<T> send_device(send);
  DeviceArray<T> recv(count * num_ranks);
  comm.all_to_all(send_device.data(), recv.data(), count, dtype_of<T>());
  comm.synchronize();
  EXPECT_TRUE(bitwise_equal(recv.download(), expected));
}

template <typename T>
void check_all_to_all_v(NcclCommunicator& comm) {
  SCOPED_TRACE(::testing::Message() << "dtype " << static_cast<int>(dtype_of<T>()));
  const int num_ranks = comm.size();
  const int rank_idx = comm.rank();
  const testing::UnevenExchange exchange = testing::uneven_exchange(num_ranks, rank_idx);
  const auto& [send_counts, recv_counts, send_offsets, recv_offsets, send_extent, recv_extent] =
      exchange;

  T untouched;
  std::memset(&untouched, 0xFF, sizeof(T));  // what DeviceArray starts with
  std::vector<T> send(send_extent, untouched);
  for (int dst_idx = 0; dst_idx < num_ranks; ++dst_idx) {
    for (size_t i = 0; i < send_counts[dst_idx]; ++i) {
      send[send_offsets[dst_idx] + i] = tag<T>(rank_idx, dst_idx, i);
    }
  }
  std::vector<T> expected(recv_extent, untouched);
  for (int src_idx = 0; src_idx < num_ranks; ++src_idx) {
    for (size_t i = 0; i < recv_counts[src_idx]; ++i) {
      expected[recv_offsets[src_idx] + i] = tag<T>(src_idx, rank_idx, i);
    }
  }
  DeviceArray<T> send_device(send);
  DeviceArray<T> recv(recv_extent);
  comm.all_to_all_v(send_device.data(), send_counts.data(), send_offsets.data(), recv.data(),
                    recv_counts.data(), recv_offsets.data(), dtype_of<T>());
  comm.synchronize();
  EXPECT_TRUE(bitwise_equal(recv.download(), expected));
}

template <typename T>
void check_broadcast_from_every_root(NcclCommunicator& comm, size_t count) {
  for (int root = 0; root < comm.size(); ++root) {
    SCOPED_TRACE(::testing::Message() << "dtype " << static_cast<int>(dtype_of<T>()) << ", count "
                                      << count << ", root " << root);
    std::vector<T> expected(count);
    for (size_t i = 0; i < count; ++i) expected[i] = tag<T>(root, 0, i);
    DeviceArray<T> data(count);  // 0xFF bytes on the other ranks
    if (comm.rank() == root) data.upload(expected);
    comm.broadcast(data.data(), count, dtype_of<T>(), root);
    comm.synchronize();
    EXPECT_TRUE(bitwise_equal(data.download(), expected));
  }
}

template <typename T>
void check_reduce_sum_on_every_root(NcclCommunicator& comm, size_t count) {
  for (int root = 0; root < comm.size(); ++root) {
    SCOPED_TRACE(::testing::Message() << "dtype " << static_cast<int>(dtype_of<T>()) << ", count "
                                      << count << ", root " << root);
    std::vector<T> mine(count), total(count);
    for (size_t i = 0; i < count; ++i) {
      mine[i] = encode<T>(summand<T>(comm.rank(), i));
      total[i] = encode<T>(summand_total<T>(comm.size(), i));
    }
    DeviceArray<T> data(mine);
    comm.reduce_sum(data.data(), count, dtype_of<T>(), root);
    comm.synchronize();
    // The other ranks keep their own values.
    EXPECT_TRUE(bitwise_equal(data.download(), comm.rank() == root ? total : mine));
  }
}

// The four collectives with data, on every dtype; what the world and each split group run.
void check_every_collective(NcclCommunicator& comm) {
  for (size_t count : {size_t{1}, size_t{1003}}) {
    check_all_reduce_sum<float>(comm, count);
    check_all_reduce_sum<double>(comm, count);
    check_all_reduce_sum<int32_t>(comm, count);
    check_all_reduce_sum<int64_t>(comm, count);
    check_all_reduce_sum<uint8_t>(comm, count);
    check_all_reduce_sum<uint16_t>(comm, count);
  }
  check_all_gather<int32_t>(comm, 3, /*in_place=*/false);
  check_all_gather<uint16_t>(comm, 5, /*in_place=*/true);
  check_reduce_scatter_sum<float>(comm, 5, /*in_place=*/false);
  check_reduce_scatter_sum<uint16_t>(comm, 4, /*in_place=*/true);
  check_all_to_all<int64_t>(comm, 2);
  check_all_to_all_v<int32_t>(comm);
  check_broadcast_from_every_root<double>(comm, 10);
  check_reduce_sum_on_every_root<float>(comm, 7);
}

TEST(NcclCommunicator, CoversTheWorldOnThisRanksDevice) {
  MF_REQUIRE_NCCL_GPUS();
  EXPECT_EQ(nccl().rank(), world_communicator().rank());
  EXPECT_EQ(nccl().size(), world_communicator().size());
  EXPECT_EQ(nccl().name(), "nccl");
  EXPECT_NE(nccl().nccl_comm(), nullptr);
  EXPECT_NE(nccl().stream(), nullptr);
  int device = -1;
  MF_CUDA_CHECK(cudaGetDevice(&device));
  EXPECT_EQ(nccl().device(), device);
  EXPECT_EQ(nccl().timeout(), NcclCommunicator::kDefaultTimeout);
}

TEST(NcclCommunicator, AllReduceSumOfEveryDType) {
  MF_REQUIRE_NCCL_GPUS();
  // 2^20 + 3 elements take NCCL's pipelined path over several chunks and channels.
  for (size_t count : {size_t{1}, size_t{1003}, (size_t{1} << 20) + 3}) {
    check_all_reduce_sum<float>(nccl(), count);
    check_all_reduce_sum<double>(nccl(), count);
    check_all_reduce_sum<int32_t>(nccl(), count);
    check_all_reduce_sum<int64_t>(nccl(), count);
    check_all_reduce_sum<uint8_t>(nccl(), count);
    check_all_reduce_sum<uint16_t>(nccl(), count);
  }
}

TEST(NcclCommunicator, AllGatherConcatenatesInRankOrder) {
  MF_REQUIRE_NCCL_GPUS();
  for (bool in_place : {false, true}) {
    check_all_gather<int32_t>(nccl(), 3, in_place);
    check_all_gather<float>(nccl(), 1000, in_place);
    check_all_gather<uint16_t>(nccl(), 7, in_place);
    check_all_gather<uint8_t>(nccl(), 1, in_place);
  }
}

TEST(NcclCommunicator, ReduceScatterSumGivesEachRankItsChunk) {
  MF_REQUIRE_NCCL_GPUS();
  for (bool in_place : {false, true}) {
    check_reduce_scatter_sum<float>(nccl(), 5, in_place);
    check_reduce_scatter_sum<int64_t>(nccl(), 4, in_place);
    check_reduce_scatter_sum<uint16_t>(nccl(), 1000, in_place);
  }
}

TEST(NcclCommunicator, AllToAllTransposesChunks) {
  MF_REQUIRE_NCCL_GPUS();
  check_all_to_all<int64_t>(nccl(), 2);
  check_all_to_all<double>(nccl(), 1);
  check_all_to_all<uint16_t>(nccl(), 1000);
}

TEST(NcclCommunicator, AllToAllVWithUnevenAndZeroCounts) {
  MF_REQUIRE_NCCL_GPUS();
  check_all_to_all_v<int32_t>(nccl());
  check_all_to_all_v<uint16_t>(nccl());
  check_all_to_all_v<double>(nccl());
}

TEST(NcclCommunicator, CollectivesThatMoveNothingTakeNullBuffers) {
  MF_REQUIRE_NCCL_GPUS();
  const std::vector<size_t> zeros(nccl().size(), 0);
  nccl().all_reduce_sum(nullptr, 0, CommDType::kFloat32);
  nccl().all_gather(nullptr, nullptr, 0, CommDType::kBFloat16);
  nccl().reduce_scatter_sum(nullptr, nullptr, 0, CommDType::kInt64);
  nccl().all_to_all(nullptr, nullptr, 0, CommDType::kUInt8);
  nccl().all_to_all_v(nullptr, zeros.data(), zeros.data(), nullptr, zeros.data(), zeros.data(),
                      CommDType::kFloat64);
  nccl().broadcast(nullptr, 0, CommDType::kInt32, nccl().size() - 1);
  nccl().synchronize();
}

TEST(NcclCommunicator, BroadcastFromEveryRoot) {
  MF_REQUIRE_NCCL_GPUS();
  check_broadcast_from_every_root<double>(nccl(), 10);
  check_broadcast_from_every_root<uint16_t>(nccl(), 3);
  check_broadcast_from_every_root<int32_t>(nccl(), 100000);
}

TEST(NcclCommunicator, ReduceSumOnEveryRoot) {
  MF_REQUIRE_NCCL_GPUS();
  check_reduce_sum_on_every_root<float>(nccl(), 5);
  check_reduce_sum_on_every_root<int64_t>(nccl(), 4);
  check_reduce_sum_on_every_root<uint16_t>(nccl(), 1000);
  check_reduce_sum_on_every_root<float>(nccl(), (size_t{1} << 20) + 3);
}

TEST(NcclCommunicator, BarrierWaitsForTheSlowestRank) {
  MF_REQUIRE_NCCL_GPUS();
  using Clock = std::chrono::steady_clock;
  const auto delay = std::chrono::milliseconds(200);
  nccl().barrier();
  const Clock::time_point start = Clock::now();
  if (nccl().rank() == 0) std::this_thread::sleep_for(delay);
  nccl().barrier();
  EXPECT_GE(Clock::now() - start, delay * 3 / 4);
}

TEST(NcclCommunicator, CollectivesRunOnTheCallersStream) {
  MF_REQUIRE_NCCL_GPUS();
  cudaStream_t own_stream = nccl().stream();
  cudaStream_t stream = nullptr;
  MF_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  nccl().set_stream(stream);
  EXPECT_EQ(nccl().stream(), stream);

  // Copy in, reduce and copy out, all on the caller's stream, which does not synchronise with the
  // legacy default stream: only stream order makes the result right.
  const size_t count = 4096;
  std::vector<int32_t> host(count);
  for (size_t i = 0; i < count; ++i) host[i] = nccl().rank() + static_cast<int32_t>(i);
  DeviceArray<int32_t> data(count);
  MF_CUDA_CHECK(cudaStreamSynchronize(nullptr));  // the 0xFF fill is done
  MF_CUDA_CHECK(
      cudaMemcpyAsync(data.data(), host.data(), data.bytes(), cudaMemcpyHostToDevice, stream));
  nccl().all_reduce_sum(data.data(), count);
  std::vector<int32_t> result(count, -1);
  MF_CUDA_CHECK(
      cudaMemcpyAsync(result.data(), data.data(), data.bytes(), cudaMemcpyDeviceToHost, stream));
  MF_CUDA_CHECK(cudaStreamSynchronize(stream));
  const int num_ranks = nccl().size();
  for (size_t i = 0; i < count; ++i) {
    ASSERT_EQ(result[i], num_ranks * (num_ranks - 1) / 2 + num_ranks * static_cast<int32_t>(i))
        << i;
  }

  nccl().set_stream(own_stream);
  MF_CUDA_CHECK(cudaStreamDestroy(stream));
  check_all_reduce_sum<float>(nccl(), 10);
}

TEST(NcclCommunicator, SplitIntoEvenAndOddRanks) {
  MF_REQUIRE_NCCL_GPUS();
  const int num_ranks = nccl().size();
  const int rank_idx = nccl().rank();
  const int color = rank_idx % 2;
  // key = -rank orders each group by descending world rank.
  std::unique_ptr<Communicator> group = nccl().split(color, /*key=*/-rank_idx);
  // World ranks of the group, in group rank order.
  const std::vector<int32_t> members = testing::descending_members(num_ranks, color);
  ASSERT_EQ(group->size(), static_cast<int>(members.size()));
  EXPECT_EQ(members[group->rank()], rank_idx);
  EXPECT_EQ(group->name(), "nccl");
  NcclCommunicator& group_nccl = as_nccl(*group);
  EXPECT_EQ(group_nccl.device(), nccl().device());
  EXPECT_NE(group_nccl.stream(), nccl().stream());

  DeviceArray<int32_t> own(std::vector<int32_t>{rank_idx});
  DeviceArray<int32_t> gathered(members.size());
  group->all_gather(own.data(), gathered.data(), 1, CommDType::kInt32);
  group_nccl.synchronize();
  EXPECT_EQ(gathered.download(), members);
  check_every_collective(group_nccl);

  // Equal keys keep the parent's order; the nested split owns its own NCCL communicator.
  std::unique_ptr<Communicator> same_group = group->split(/*color=*/0, /*key=*/0);
  EXPECT_EQ(same_group->size(), group->size());
  EXPECT_EQ(same_group->rank(), group->rank());
  check_all_to_all<int32_t>(as_nccl(*same_group), 3);
  group->barrier();
}

TEST(NcclCommunicator, SplitIntoAMeshOfExpertAndDataParallelGroups) {
  MF_REQUIRE_NCCL_GPUS();
  // Groups of `group_size` consecutive ranks (expert parallel) and data-parallel groups of the
  // ranks with the same position in their group, as the trainer builds its mesh.
  const int num_ranks = nccl().size();
  const int rank_idx = nccl().rank();
  const int group_size = num_ranks % 2 == 0 ? 2 : 1;
  std::unique_ptr<Communicator> ep_group = nccl().split(rank_idx / group_size, rank_idx);
  std::unique_ptr<Communicator> dp_group = nccl().split(rank_idx % group_size, rank_idx);
  ASSERT_EQ(ep_group->size(), group_size);
  ASSERT_EQ(dp_group->size(), num_ranks / group_size);
  EXPECT_EQ(ep_group->rank(), rank_idx % group_size);
  EXPECT_EQ(dp_group->rank(), rank_idx / group_size);

  // Both groups' collectives in flight at once, each on its own stream.
  DeviceArray<int64_t> ep_sum(std::vector<int64_t>{rank_idx});
  DeviceArray<int64_t> dp_sum(std::vector<int64_t>{rank_idx});
  ep_group->all_reduce_sum(ep_sum.data(), 1);
  dp_group->all_reduce_sum(dp_sum.data(), 1);
  as_nccl(*ep_group).synchronize();
  as_nccl(*dp_group).synchronize();
  const int64_t ep_first = rank_idx / group_size * group_size;
  int64_t expected_ep = 0;
  for (int member = ep_first; member < ep_first + group_size; ++member) expected_ep += member;
  int64_t expected_dp = 0;
  for (int member = rank_idx % group_size; member < num_ranks; member += group_size) {
    expected_dp += member;
  }
  EXPECT_EQ(ep_sum.download(), std::vector<int64_t>{expected_ep});
  EXPECT_EQ(dp_sum.download(), std::vector<int64_t>{expected_dp});
  check_every_collective(as_nccl(*ep_group));
  check_every_collective(as_nccl(*dp_group));
}

TEST(NcclCommunicator, SplitIntoSingletons) {
  MF_REQUIRE_NCCL_GPUS();
  std::unique_ptr<Communicator> alone = nccl().split(/*color=*/nccl().rank(), /*key=*/0);
  EXPECT_EQ(alone->size(), 1);
  EXPECT_EQ(alone->rank(), 0);
  check_every_collective(as_nccl(*alone));
}

TEST(NcclCommunicator, SplitRejectsANegativeColor) {
  MF_REQUIRE_NCCL_GPUS();
  const std::string message = thrown_message([] { nccl().split(/*color=*/-1, /*key=*/0); });
  EXPECT_NE(message.find("NcclCommunicator::split"), std::string::npos) << message;
  EXPECT_NE(message.find("color must be >= 0"), std::string::npos) << message;
}

TEST(NcclCommunicator, EveryCollectiveOnOneRankOverASelfParent) {
  MF_REQUIRE_NCCL_GPUS();
  // n = 1 on one GPU: each rank bootstraps its own single-rank NCCL communicator.
  SelfCommunicator self;
  NcclCommunicator single(self);
  EXPECT_EQ(single.rank(), 0);
  EXPECT_EQ(single.size(), 1);
  check_every_collective(single);
  single.barrier();
  std::unique_ptr<Communicator> sub = single.split(/*color=*/5, /*key=*/-1);
  EXPECT_EQ(sub->size(), 1);
  check_all_to_all_v<uint16_t>(as_nccl(*sub));
}

TEST(NcclCommunicator, MakeNcclCommunicatorOverTheWorld) {
  MF_REQUIRE_NCCL_GPUS();
  std::unique_ptr<Communicator> comm = make_nccl_communicator(world_communicator());
  EXPECT_EQ(comm->name(), "nccl");
  EXPECT_EQ(comm->rank(), world_communicator().rank());
  EXPECT_EQ(comm->size(), world_communicator().size());
  check_all_reduce_sum<int32_t>(as_nccl(*comm), 17);
}

TEST(NcclCommunicator, RejectsHostBuffersWithoutCommunicating) {
  MF_REQUIRE_NCCL_GPUS();
  std::vector<float> host(4, 1.0f);
  const std::string message = thrown_message([&] { nccl().all_reduce_sum(host.data(), 4); });
  EXPECT_NE(message.find("NcclCommunicator::all_reduce_sum (rank " + std::to_string(nccl().rank()) +
                         " of " + std::to_string(nccl().size())),
            std::string::npos)
      << message;
  EXPECT_NE(message.find("data buffer"), std::string::npos) << message;
  EXPECT_NE(message.find("is not device memory"), std::string::npos) << message;
  DeviceArray<float> device(4 * nccl().size());
  EXPECT_THROW(nccl().all_gather(host.data(), device.data(), 4), Error);
  EXPECT_THROW(nccl().all_gather(device.data(), host.data(), 1), Error);
}

TEST(NcclCommunicator, RejectsOverlappingBuffersWithoutCommunicating) {
  MF_REQUIRE_NCCL_GPUS();
  const int num_ranks = nccl().size();
  DeviceArray<int32_t> buffer(2 * num_ranks + 2);
  EXPECT_THROW(nccl().all_to_all(buffer.data(), buffer.data(), 1), Error);
  // Overlapping recv, but not NCCL's in-place form (send == recv + rank * count).
  const int32_t* shifted = buffer.data() + 2 * nccl().rank() + 1;
  const std::string message = thrown_message([&] { nccl().all_gather(shifted, buffer.data(), 2); });
  EXPECT_NE(message.find("send and recv overlap"), std::string::npos) << message;
}

TEST(NcclCommunicator, RejectsInvalidArguments) {
  MF_REQUIRE_NCCL_GPUS();
  DeviceArray<int32_t> data(1);
  EXPECT_THROW(nccl().broadcast(data.data(), 1, nccl().size()), Error);
  EXPECT_THROW(nccl().broadcast(data.data(), 1, -1), Error);
  EXPECT_THROW(nccl().reduce_sum(data.data(), 1, nccl().size()), Error);
  EXPECT_THROW(nccl().reduce_sum(data.data(), 1, -1), Error);
  EXPECT_THROW(nccl().set_timeout(std::chrono::milliseconds(0)), Error);
  SelfCommunicator self;
  NcclCommunicator single(self);
  // The parent must take host buffers.
  EXPECT_THROW(std::make_unique<NcclCommunicator>(static_cast<Communicator&>(single)), Error);
}

TEST(MfNcclCheck, ErrorNamesTheCallAndCarriesNcclsMessage) {
  const std::string message = thrown_message([] {
    check_nccl(ncclInvalidArgument, "ncclAllReduce(x)", __FILE__, __LINE__,
               "NcclCommunicator::all_reduce_sum (rank 1 of 4, device 1)");
  });
  EXPECT_NE(message.find("NcclCommunicator::all_reduce_sum (rank 1 of 4, device 1): "
                         "ncclAllReduce(x) failed with NCCL error 4: "),
            std::string::npos)
      << message;
  EXPECT_NE(message.find(ncclGetErrorString(ncclInvalidArgument)), std::string::npos) << message;
  EXPECT_NE(message.find("nccl_communicator_mpitest.cpp"), std::string::npos) << message;
  EXPECT_NO_THROW(MF_NCCL_CHECK(ncclSuccess));
}

// Last: it leaves an aborted communicator behind (its own split group, not the world's).
TEST(NcclCommunicatorFailure, BarrierTimesOutWhenAPeerNeverArrivesAndAborts) {
  MF_REQUIRE_NCCL_GPUS();
  if (nccl().size() < 2) GTEST_SKIP() << "needs a peer that does not arrive";
  std::unique_ptr<Communicator> group = nccl().split(/*color=*/0, /*key=*/nccl().rank());
  NcclCommunicator& comm = as_nccl(*group);
  // One barrier together first: it sets up NCCL's connections, which need every rank.
  comm.barrier();
  comm.set_timeout(std::chrono::milliseconds(500));
  if (comm.rank() == 0) {
    const std::string message = thrown_message([&] { comm.barrier(); });
    EXPECT_NE(message.find("NcclCommunicator::barrier"), std::string::npos) << message;
    EXPECT_NE(message.find("did not finish within the timeout of 500 ms"), std::string::npos)
        << message;
    EXPECT_NE(message.find("the communicator was aborted"), std::string::npos) << message;
    EXPECT_EQ(comm.nccl_comm(), nullptr);
  }
  world_communicator().barrier();  // the peers wait on the host until rank 0 has given up
  comm.abort();                    // the peers end theirs; rank 0's is aborted already
  EXPECT_EQ(comm.nccl_comm(), nullptr);
  DeviceArray<int32_t> data(1);
  const std::string later = thrown_message([&] { comm.all_reduce_sum(data.data(), 1); });
  EXPECT_NE(later.find("was aborted after an earlier failure"), std::string::npos) << later;
}

}  // namespace
}  // namespace moeforge

int main(int argc, char** argv) {
  return moeforge::testing::run_nccl_tests(argc, argv, "comm_nccl_tests");
}
