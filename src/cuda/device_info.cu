// Device enumeration through the CUDA runtime.
#include "cuda/cuda_check.h"
#include "cuda/device_info.h"

#include "core/error.h"

namespace moeforge::cuda {

DeviceQuery query_devices() {
  DeviceQuery query;
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess) {
    query.unavailable_reason =
        fmt::format("{} ({})", cudaGetErrorString(status), cudaGetErrorName(status));
    cudaGetLastError();  // clear the sticky error so later calls start clean
    return query;
  }
  for (int i = 0; i < count; ++i) {
    cudaDeviceProp prop{};
    MF_CUDA_CHECK(cudaGetDeviceProperties(&prop, i));
    query.devices.push_back(DeviceInfo{i, prop.name, prop.major, prop.minor,
                                       prop.multiProcessorCount,
                                       static_cast<uint64_t>(prop.totalGlobalMem)});
  }
  if (count == 0) query.unavailable_reason = "no CUDA device";
  return query;
}

void require_cuda_device() {
  const DeviceQuery q = query_devices();
  MF_CHECK(!q.devices.empty(), "no usable CUDA device: {} (use --device cpu)",
           q.unavailable_reason);
}

int bind_device_to_local_rank(int local_rank) {
  require_cuda_device();
  int device = 0;
  if (local_rank < 0) {
    MF_CUDA_CHECK(cudaGetDevice(&device));
    return device;
  }
  int count = 0;
  MF_CUDA_CHECK(cudaGetDeviceCount(&count));
  device = local_rank % count;
  MF_CUDA_CHECK(cudaSetDevice(device));
  return device;
}

}  // namespace moeforge::cuda
