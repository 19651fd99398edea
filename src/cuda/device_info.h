// The CUDA devices this process can use, for `moeforge devices` and for choosing kernels
// (sm_90a paths on Hopper, portable paths elsewhere).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace moeforge::cuda {

struct DeviceInfo {
  int index = 0;
  std::string name;
  int compute_major = 0;
  int compute_minor = 0;
  int num_sms = 0;
  uint64_t total_memory_bytes = 0;
  bool is_hopper() const { return compute_major == 9; }
};

struct DeviceQuery {
  std::vector<DeviceInfo> devices;
  std::string unavailable_reason;  // why there are none (no driver, no device), else empty
};

// Never throws for a machine without a GPU or driver: that is reported in unavailable_reason.
DeviceQuery query_devices();

// Throws a moeforge::Error saying why when this process has no usable CUDA device.
void require_cuda_device();

// Makes device local_rank % (number of devices) current for this process (ranks of one host
// spread over its GPUs) and returns its index; with local_rank < 0 (no launcher) keeps the
// current device. Throws like require_cuda_device when there is none.
int bind_device_to_local_rank(int local_rank);

}  // namespace moeforge::cuda
