// The caching device allocator (reuse of freed blocks, in-use / peak / reserved accounting, the
// out-of-memory error) and DeviceBuffer (round trips, zero-size buffers, moves, fill_zero).
#include "cuda/device_memory.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <vector>

#include "core/error.h"
#include "gpu_test_util.h"

namespace moeforge::cuda {
namespace {

using testing::expect_equal;

TEST(DeviceAllocator, ReusesAFreedBlockOfTheSameSize) {
  MF_REQUIRE_GPU();
  DeviceAllocator& allocator = DeviceAllocator::instance();
  allocator.release_cache();
  void* first = allocator.allocate(1000);
  ASSERT_NE(first, nullptr);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(first) % 256, 0u);
  allocator.deallocate(first);
  void* second = allocator.allocate(1000);
  EXPECT_EQ(second, first) << "a freed block of the same size must be handed out again";
  allocator.deallocate(second);
  allocator.release_cache();
}

TEST(DeviceAllocator, AccountsForBytesInUsePeakAndReserved) {
  MF_REQUIRE_GPU();
  DeviceAllocator& allocator = DeviceAllocator::instance();
  allocator.release_cache();
  const size_t base_in_use = allocator.bytes_in_use();
  EXPECT_EQ(allocator.bytes_reserved(), base_in_use) << "after release_cache nothing is cached";
  allocator.reset_peak();
  EXPECT_EQ(allocator.peak_bytes_in_use(), base_in_use);

  constexpr size_t kBytes = (size_t{3} << 20) + 12345;
  void* block = allocator.allocate(kBytes);
  const size_t block_bytes = allocator.bytes_in_use() - base_in_use;
  EXPECT_GE(block_bytes, kBytes);
  EXPECT_EQ(allocator.peak_bytes_in_use(), base_in_use + block_bytes);
  EXPECT_GE(allocator.bytes_reserved(), allocator.bytes_in_use());

  allocator.deallocate(block);
  EXPECT_EQ(allocator.bytes_in_use(), base_in_use);
  EXPECT_EQ(allocator.peak_bytes_in_use(), base_in_use + block_bytes) << "peak survives the free";
  EXPECT_EQ(allocator.bytes_reserved(), base_in_use + block_bytes) << "the freed block is cached";

  allocator.reset_peak();
  EXPECT_EQ(allocator.peak_bytes_in_use(), base_in_use);
  allocator.release_cache();
  EXPECT_EQ(allocator.bytes_reserved(), base_in_use);
  EXPECT_EQ(allocator.bytes_in_use(), base_in_use);
}

TEST(DeviceAllocator, ThrowsAnErrorWhenTheDeviceIsOutOfMemory) {
  MF_REQUIRE_GPU();
  DeviceAllocator& allocator = DeviceAllocator::instance();
  const size_t base_in_use = allocator.bytes_in_use();
  EXPECT_THROW(allocator.allocate(size_t{1} << 50), Error);
  EXPECT_EQ(allocator.bytes_in_use(), base_in_use);
  // The failed cudaMalloc must not linger as the runtime's last error, or the next kernel's launch
  // check would report it.
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
  // The allocator still works.
  DeviceBuffer<float> buffer(10);
  EXPECT_NE(buffer.data(), nullptr);
}

TEST(DeviceBuffer, RoundTripsFloatBf16AndIntegers) {
  MF_REQUIRE_GPU();
  const std::vector<float> floats = testing::random_normal(1001, 1);
  DeviceBuffer<float> float_buffer;
  float_buffer.upload(floats);
  EXPECT_EQ(float_buffer.size(), floats.size());
  EXPECT_EQ(float_buffer.bytes(), floats.size() * sizeof(float));
  expect_equal("float round trip", float_buffer.download(), floats);

  const std::vector<bf16> halves = to_bf16(testing::random_normal(333, 2));
  DeviceBuffer<bf16> bf16_buffer(7);
  bf16_buffer.upload(halves);  // resizes to the host vector
  EXPECT_EQ(bf16_buffer.size(), halves.size());
  expect_equal("bf16 round trip", bf16_buffer.download(), halves);

  const std::vector<int32_t> ints = testing::random_ints(77, 3, 1 << 30);
  expect_equal("int32 round trip", testing::to_device(ints).download(), ints);
}

TEST(DeviceBuffer, FillZeroClearsEveryElement) {
  MF_REQUIRE_GPU();
  DeviceBuffer<float> buffer = testing::to_device(testing::random_normal(4097, 4));
  buffer.fill_zero(nullptr);
  testing::synchronize();
  const std::vector<float> zeros(4097, 0.0f);
  expect_equal("fill_zero", buffer.download(), zeros);
}

TEST(DeviceBuffer, ZeroSizeBuffersHoldNothing) {
  MF_REQUIRE_GPU();
  DeviceBuffer<float> empty;
  EXPECT_EQ(empty.data(), nullptr);
  EXPECT_EQ(empty.size(), 0u);
  DeviceBuffer<float> sized_zero(0);
  EXPECT_EQ(sized_zero.data(), nullptr);
  sized_zero.upload({});
  EXPECT_EQ(sized_zero.size(), 0u);
  EXPECT_TRUE(sized_zero.download().empty());
  sized_zero.fill_zero(nullptr);
  testing::synchronize();
  // Resizing to 0 returns the memory.
  const size_t base_in_use = DeviceAllocator::instance().bytes_in_use();
  DeviceBuffer<float> buffer(100);
  EXPECT_GT(DeviceAllocator::instance().bytes_in_use(), base_in_use);
  buffer.resize(0);
  EXPECT_EQ(buffer.data(), nullptr);
  EXPECT_EQ(DeviceAllocator::instance().bytes_in_use(), base_in_use);
}

TEST(DeviceBuffer, MovesTransferOwnershipAndResizeKeepsTheSameCount) {
  MF_REQUIRE_GPU();
  const size_t base_in_use = DeviceAllocator::instance().bytes_in_use();
  {
    DeviceBuffer<float> a(256);
    float* ptr = a.data();
    a.resize(256);
    EXPECT_EQ(a.data(), ptr) << "resize to the same count must not reallocate";
    DeviceBuffer<float> b(std::move(a));
    EXPECT_EQ(b.data(), ptr);
    EXPECT_EQ(b.size(), 256u);
    EXPECT_EQ(a.data(), nullptr);
    DeviceBuffer<float> c;
    c = std::move(b);
    EXPECT_EQ(c.data(), ptr);
    EXPECT_EQ(c.size(), 256u);
  }
  EXPECT_EQ(DeviceAllocator::instance().bytes_in_use(), base_in_use)
      << "every buffer gave its memory back";
}

}  // namespace
}  // namespace moeforge::cuda
