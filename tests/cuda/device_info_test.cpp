// Device enumeration works with and without a GPU: either devices with sane properties, or a
// reason why there are none (the CPU-only CI machine takes the second branch).
#include "cuda/device_info.h"

#include <gtest/gtest.h>

#include <cstdlib>

namespace moeforge::cuda {
namespace {

TEST(DeviceInfo, ReportsDevicesOrWhyThereAreNone) {
  const DeviceQuery q = query_devices();
  if (q.devices.empty()) {
    EXPECT_FALSE(q.unavailable_reason.empty());
    // MOEFORGE_EXPECT_GPU=1 (set by the GPU check script) turns a missing GPU into a failure.
    const char* expect_gpu = std::getenv("MOEFORGE_EXPECT_GPU");
    EXPECT_FALSE(expect_gpu != nullptr && std::string(expect_gpu) == "1") << q.unavailable_reason;
    return;
  }
  EXPECT_TRUE(q.unavailable_reason.empty());
  for (const DeviceInfo& d : q.devices) {
    EXPECT_FALSE(d.name.empty());
    EXPECT_GE(d.compute_major, 7);
    EXPECT_GT(d.num_sms, 0);
    EXPECT_GT(d.total_memory_bytes, uint64_t{1} << 30);
  }
}

}  // namespace
}  // namespace moeforge::cuda
