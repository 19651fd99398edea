// StreamGraph: a capture runs nothing, each launch replays the captured kernels on the buffers'
// current contents, memory freed during the capture stays the graph's until it is destroyed, and
// a failed capture throws and leaves the stream usable; ReplayedWork's eager / capture / replay.
#include "cuda/stream_graph.h"

#include <gtest/gtest.h>

#include <stdexcept>
#include <vector>

#include "core/error.h"
#include "cuda/cuda_check.h"
#include "cuda/device_memory.h"
#include "cuda/random_fill.h"
#include "cuda/reductions.h"
#include "gpu_test_util.h"

namespace moeforge::cuda {
namespace {

using testing::expect_equal;
using testing::to_device;

// A non-blocking stream of its own (the legacy stream cannot capture).
class StreamGraphTest : public ::testing::Test {
 protected:
  void SetUp() override {
    MF_REQUIRE_GPU();
    MF_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  }
  void TearDown() override {
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
  }
  std::vector<float> download(const DeviceBuffer<float>& buffer) {
    MF_CUDA_CHECK(cudaStreamSynchronize(stream_));
    return buffer.download();
  }
  cudaStream_t stream_ = nullptr;
};

TEST_F(StreamGraphTest, ReplaysTheCapturedKernelsOnCurrentContents) {
  DeviceBuffer<float> x = to_device(std::vector<float>{1, 2, 3, 4});
  DeviceBuffer<float> y = to_device(std::vector<float>{10, 20, 30, 40});
  StreamGraph graph(stream_, [&] {
    add_inplace(y.data(), x.data(), 4, stream_);  // y += x
    scale_inplace(x.data(), 2.0f, 4, stream_);    // x *= 2
  });
  EXPECT_GE(graph.num_nodes(), 2u);
  expect_equal("y after the capture alone", download(y), std::vector<float>{10, 20, 30, 40});
  graph.launch(stream_);
  expect_equal("y after one replay", download(y), std::vector<float>{11, 22, 33, 44});
  graph.launch(stream_);
  expect_equal("y after two", download(y), std::vector<float>{13, 26, 39, 52});
  x.upload(std::vector<float>{100, 0, 0, 0});
  graph.launch(stream_);
  expect_equal("y after new x", download(y), std::vector<float>{113, 26, 39, 52});
  expect_equal("x", download(x), std::vector<float>{200, 0, 0, 0});
}

TEST_F(StreamGraphTest, KeepsMemoryFreedDuringTheCaptureUntilDestroyed) {
  DeviceAllocator& allocator = DeviceAllocator::instance();
  constexpr size_t kCount = 300000;  // a size class nothing else here uses
  DeviceBuffer<float> out(kCount);
  const size_t base = allocator.bytes_in_use();
  void* temporary_block = nullptr;
  auto graph = std::make_unique<StreamGraph>(stream_, [&] {
    DeviceBuffer<float> temporary(kCount);
    temporary_block = temporary.data();
    fill_constant_f32(temporary.data(), kCount, 3.0f, stream_);
    out.fill_zero(stream_);
    add_inplace(out.data(), temporary.data(), kCount, stream_);
  });
  const size_t held = allocator.bytes_in_use() - base;
  EXPECT_GE(held, kCount * sizeof(float)) << "the temporary is still in use (by the graph)";
  {
    // Another buffer of the same size, written after the replay is enqueued, gets other memory.
    DeviceBuffer<float> other(kCount);
    EXPECT_NE(static_cast<void*>(other.data()), temporary_block);
    graph->launch(stream_);
    fill_constant_f32(other.data(), kCount, -1.0f, stream_);
  }
  const std::vector<float> result = download(out);
  EXPECT_EQ(result.front(), 3.0f);
  EXPECT_EQ(result.back(), 3.0f);
  graph.reset();
  EXPECT_EQ(allocator.bytes_in_use(), base) << "destroying the graph returns the block";
}

// ReplayedWork: eager the first time (the host function runs), captured the second (it runs
// again, only to capture), replayed after that (it no longer runs); the work happens every time.
TEST_F(StreamGraphTest, ReplayedWorkRunsEagerlyThenCapturesThenReplays) {
  DeviceBuffer<float> y = to_device(std::vector<float>{0, 0});
  const DeviceBuffer<float> one = to_device(std::vector<float>{1, 1});
  ReplayedWork work;
  int host_calls = 0;
  const auto enqueue = [&] {
    ++host_calls;
    add_inplace(y.data(), one.data(), 2, stream_);
  };
  EXPECT_FALSE(work.run(stream_, enqueue));
  EXPECT_TRUE(work.run(stream_, enqueue));
  EXPECT_FALSE(work.run(stream_, enqueue));
  EXPECT_FALSE(work.run(stream_, enqueue));
  EXPECT_EQ(host_calls, 2);
  expect_equal("y after four runs", download(y), std::vector<float>{4, 4});
}

TEST_F(StreamGraphTest, AFailedCaptureThrowsAndLeavesTheStreamUsable) {
  DeviceBuffer<float> y = to_device(std::vector<float>{1, 2});
  EXPECT_THROW(StreamGraph(stream_,
                           [&] {
                             scale_inplace(y.data(), 2.0f, 2, stream_);
                             throw std::runtime_error("enqueue failed");
                           }),
               std::runtime_error);
  // Synchronising a capturing stream invalidates the capture.
  EXPECT_THROW(StreamGraph(stream_,
                           [&] {
                             scale_inplace(y.data(), 2.0f, 2, stream_);
                             (void)cudaStreamSynchronize(stream_);
                           }),
               Error);
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusActive;
  ASSERT_EQ(cudaStreamIsCapturing(stream_, &status), cudaSuccess);
  EXPECT_EQ(status, cudaStreamCaptureStatusNone);
  scale_inplace(y.data(), 3.0f, 2, stream_);
  expect_equal("y: only the work after the failed captures ran", download(y),
               std::vector<float>{3, 6});
}

}  // namespace
}  // namespace moeforge::cuda
