// The side stream of cuda/side_stream.h on the GPU: fork orders it behind the caller's stream,
// join orders the caller's stream behind it, it is one stream per host thread and device, and it
// has the device's highest priority. A host callback that sleeps holds one stream back, so work
// that the ordering did not cover would run first and see the old value.
#include "cuda/side_stream.h"

#include <gtest/gtest.h>

#include <chrono>
#include <cstdint>
#include <thread>

#include "cuda/cuda_check.h"
#include "cuda/device_memory.h"
#include "gpu_test_util.h"

namespace moeforge::cuda {
namespace {

constexpr uint8_t kWritten = 7;

// Holds the stream back for 100 ms (a host function blocks the work enqueued after it).
void hold_back(cudaStream_t stream) {
  MF_CUDA_CHECK(cudaLaunchHostFunc(
      stream, [](void*) { std::this_thread::sleep_for(std::chrono::milliseconds(100)); }, nullptr));
}

// The byte at flag, read on `stream` after what is enqueued there.
uint8_t read_on(const DeviceBuffer<uint8_t>& flag, cudaStream_t stream) {
  PinnedHostBuffer<uint8_t> seen;
  seen.resize(1);
  MF_CUDA_CHECK(cudaMemcpyAsync(seen.data(), flag.data(), 1, cudaMemcpyDeviceToHost, stream));
  MF_CUDA_CHECK(cudaStreamSynchronize(stream));
  return seen.data()[0];
}

class SideStreamCuda : public ::testing::Test {
 protected:
  void SetUp() override {
    MF_REQUIRE_GPU();
    MF_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    flag_.resize(1);
    MF_CUDA_CHECK(cudaMemset(flag_.data(), 0, 1));
  }
  void TearDown() override {
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
  }
  cudaStream_t stream_ = nullptr;
  DeviceBuffer<uint8_t> flag_;
};

TEST_F(SideStreamCuda, ForkOrdersTheSideStreamBehindTheCaller) {
  hold_back(stream_);
  MF_CUDA_CHECK(cudaMemsetAsync(flag_.data(), kWritten, 1, stream_));
  const cudaStream_t side = fork_side_stream(stream_);
  EXPECT_EQ(read_on(flag_, side), kWritten);
}

TEST_F(SideStreamCuda, JoinOrdersTheCallerBehindTheSideStream) {
  const cudaStream_t side = fork_side_stream(stream_);
  hold_back(side);
  MF_CUDA_CHECK(cudaMemsetAsync(flag_.data(), kWritten, 1, side));
  join_side_stream(stream_);
  EXPECT_EQ(read_on(flag_, stream_), kWritten);
}

TEST_F(SideStreamCuda, OneStreamPerThreadAndDevice) {
  const cudaStream_t first = fork_side_stream(stream_);
  EXPECT_EQ(fork_side_stream(stream_), first);
  EXPECT_NE(first, stream_);
  cudaStream_t other_thread = nullptr;
  std::thread([&] { other_thread = fork_side_stream(stream_); }).join();
  EXPECT_NE(other_thread, first);
}

TEST_F(SideStreamCuda, HasTheHighestPriority) {
  int least = 0, greatest = 0;
  MF_CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&least, &greatest));
  int priority = least;
  MF_CUDA_CHECK(cudaStreamGetPriority(fork_side_stream(stream_), &priority));
  EXPECT_EQ(priority, greatest);
}

}  // namespace
}  // namespace moeforge::cuda
