// Tests of SelfCommunicator (every collective on one rank) and of world_communicator() in a run
// that was not started by an MPI launcher.
#include <gtest/gtest.h>

#include <cstdint>
#include <vector>

#include "comm/communicator.h"
#include "core/error.h"

namespace moeforge {
namespace {

TEST(CommDTypeSize, MatchesTheCType) {
  EXPECT_EQ(comm_dtype_size(CommDType::kFloat32), sizeof(float));
  EXPECT_EQ(comm_dtype_size(CommDType::kFloat64), sizeof(double));
  EXPECT_EQ(comm_dtype_size(CommDType::kInt32), sizeof(int32_t));
  EXPECT_EQ(comm_dtype_size(CommDType::kInt64), sizeof(int64_t));
  EXPECT_EQ(comm_dtype_size(CommDType::kUInt8), sizeof(uint8_t));
  EXPECT_EQ(comm_dtype_size(CommDType::kBFloat16), sizeof(uint16_t));
}

TEST(SelfCommunicator, IsRankZeroOfOne) {
  SelfCommunicator comm;
  EXPECT_EQ(comm.rank(), 0);
  EXPECT_EQ(comm.size(), 1);
  EXPECT_EQ(comm.name(), "self");
}

TEST(SelfCommunicator, AllReduceSumKeepsTheData) {
  SelfCommunicator comm;
  std::vector<float> data = {1.5f, -2.0f, 3.25f};
  comm.all_reduce_sum(data.data(), data.size());
  EXPECT_EQ(data, (std::vector<float>{1.5f, -2.0f, 3.25f}));
}

TEST(SelfCommunicator, AllGatherCopiesSendToRecv) {
  SelfCommunicator comm;
  const std::vector<int64_t> send = {7, -8, 9};
  std::vector<int64_t> recv(3, 0);
  comm.all_gather(send.data(), recv.data(), send.size());
  EXPECT_EQ(recv, send);
}

TEST(SelfCommunicator, ReduceScatterSumCopiesSendToRecv) {
  SelfCommunicator comm;
  const std::vector<double> send = {0.5, 1.5};
  std::vector<double> recv(2, 0.0);
  comm.reduce_scatter_sum(send.data(), recv.data(), send.size());
  EXPECT_EQ(recv, send);
}

TEST(SelfCommunicator, AllToAllCopiesSendToRecv) {
  SelfCommunicator comm;
  const std::vector<int32_t> send = {4, 5, 6, 7};
  std::vector<int32_t> recv(4, 0);
  comm.all_to_all(send.data(), recv.data(), send.size());
  EXPECT_EQ(recv, send);
}

TEST(SelfCommunicator, AllToAllVHonoursCountsAndOffsets) {
  SelfCommunicator comm;
  const std::vector<uint8_t> send = {1, 2, 3, 4, 5};
  std::vector<uint8_t> recv(6, 0);
  const size_t send_count = 3;
  const size_t send_offset = 1;
  const size_t recv_count = 3;
  const size_t recv_offset = 2;
  comm.all_to_all_v(send.data(), &send_count, &send_offset, recv.data(), &recv_count, &recv_offset,
                    CommDType::kUInt8);
  EXPECT_EQ(recv, (std::vector<uint8_t>{0, 0, 2, 3, 4, 0}));
}

TEST(SelfCommunicator, AllToAllVRejectsMismatchedCounts) {
  SelfCommunicator comm;
  std::vector<float> send(4, 1.0f);
  std::vector<float> recv(4, 0.0f);
  const size_t send_count = 3;
  const size_t recv_count = 2;
  const size_t offset = 0;
  EXPECT_THROW(comm.all_to_all_v(send.data(), &send_count, &offset, recv.data(), &recv_count,
                                 &offset, CommDType::kFloat32),
               Error);
}

TEST(SelfCommunicator, BFloat16CollectivesCopyTwoByteElements) {
  SelfCommunicator comm;
  // 1.0, a NaN payload, a subnormal, -0: bits must arrive unchanged.
  const std::vector<uint16_t> send = {0x3F80, 0x7FC1, 0x0001, 0x8000};
  std::vector<uint16_t> data = send;
  comm.all_reduce_sum(data.data(), data.size(), CommDType::kBFloat16);
  EXPECT_EQ(data, send);
  std::vector<uint16_t> recv(send.size(), 0);
  comm.all_gather(send.data(), recv.data(), send.size(), CommDType::kBFloat16);
  EXPECT_EQ(recv, send);
  recv.assign(send.size(), 0);
  comm.reduce_scatter_sum(send.data(), recv.data(), send.size(), CommDType::kBFloat16);
  EXPECT_EQ(recv, send);
  recv.assign(send.size(), 0);
  comm.all_to_all(send.data(), recv.data(), send.size(), CommDType::kBFloat16);
  EXPECT_EQ(recv, send);
  recv.assign(send.size(), 0);
  const size_t count = 2;
  const size_t send_offset = 1;
  const size_t recv_offset = 2;
  comm.all_to_all_v(send.data(), &count, &send_offset, recv.data(), &count, &recv_offset,
                    CommDType::kBFloat16);
  EXPECT_EQ(recv, (std::vector<uint16_t>{0, 0, 0x7FC1, 0x0001}));
}

TEST(SelfCommunicator, BroadcastAndBarrierKeepTheData) {
  SelfCommunicator comm;
  std::vector<int32_t> data = {3, 1, 4};
  comm.broadcast(data.data(), data.size(), 0);
  comm.barrier();
  EXPECT_EQ(data, (std::vector<int32_t>{3, 1, 4}));
}

TEST(SelfCommunicator, ReduceSumKeepsTheDataAndRejectsAnotherRoot) {
  SelfCommunicator comm;
  std::vector<float> data = {2.5f, -1.0f};
  comm.reduce_sum(data.data(), data.size(), 0);
  EXPECT_EQ(data, (std::vector<float>{2.5f, -1.0f}));
  EXPECT_THROW(comm.reduce_sum(data.data(), data.size(), 1), Error);
}

TEST(SelfCommunicator, SplitGivesAWorkingSingleRankCommunicator) {
  SelfCommunicator comm;
  std::unique_ptr<Communicator> sub = comm.split(/*color=*/3, /*key=*/-1);
  ASSERT_NE(sub, nullptr);
  EXPECT_EQ(sub->rank(), 0);
  EXPECT_EQ(sub->size(), 1);
  const std::vector<float> send = {2.0f, 4.0f};
  std::vector<float> recv(2, 0.0f);
  sub->all_gather(send.data(), recv.data(), send.size());
  EXPECT_EQ(recv, send);
}

TEST(WorldCommunicator, IsOneSelfRankWithoutAnMpiLauncher) {
  Communicator& world = world_communicator();
  EXPECT_EQ(world.size(), 1);
  EXPECT_EQ(world.rank(), 0);
  EXPECT_EQ(world.name(), "self");
  EXPECT_EQ(&world_communicator(), &world);
}

}  // namespace
}  // namespace moeforge
