// EventPool on the GPU: a stream ordered after another sees that stream's work, also when the
// pool's events are reused after rewind().
#include "cuda/event_pool.h"

#include <gtest/gtest.h>

#include <vector>

#include "cuda/cuda_check.h"
#include "cuda/device_memory.h"
#include "cuda/reductions.h"
#include "gpu_test_util.h"

namespace moeforge::cuda {
namespace {

TEST(EventPoolCuda, OrderedStreamSeesTheOtherStreamsWork) {
  MF_REQUIRE_GPU();
  cudaStream_t producer = nullptr, consumer = nullptr;
  MF_CUDA_CHECK(cudaStreamCreateWithFlags(&producer, cudaStreamNonBlocking));
  MF_CUDA_CHECK(cudaStreamCreateWithFlags(&consumer, cudaStreamNonBlocking));
  // 64 MiB: a few hundred passes keep the producer busy for milliseconds, long after the
  // consumer's copy would have run unordered.
  const int64_t count = int64_t{1} << 24;
  DeviceBuffer<float> x(static_cast<size_t>(count));
  PinnedHostBuffer<float> seen;
  seen.resize(static_cast<size_t>(count));
  EventPool pool;
  for (int round = 1; round <= 2; ++round) {
    pool.rewind();
    x.upload(std::vector<float>(static_cast<size_t>(count), 1.0f));
    for (int pass = 0; pass < 300; ++pass) scale_inplace(x.data(), 1.0f, count, producer);
    scale_inplace(x.data(), 3.0f, count, producer);
    pool.order(producer, consumer);
    MF_CUDA_CHECK(
        cudaMemcpyAsync(seen.data(), x.data(), x.bytes(), cudaMemcpyDeviceToHost, consumer));
    MF_CUDA_CHECK(cudaStreamSynchronize(consumer));
    for (const int64_t i : {int64_t{0}, count / 2, count - 1}) {
      EXPECT_EQ(seen.data()[i], 3.0f) << "round " << round << ", element " << i;
    }
    MF_CUDA_CHECK(cudaStreamSynchronize(producer));
  }
  MF_CUDA_CHECK(cudaStreamDestroy(producer));
  MF_CUDA_CHECK(cudaStreamDestroy(consumer));
}

}  // namespace
}  // namespace moeforge::cuda
