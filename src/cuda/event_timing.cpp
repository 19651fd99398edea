// Median event timing (see event_timing.h).
#include "cuda/event_timing.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <vector>

#include "core/error.h"
#include "cuda/cuda_check.h"

namespace moeforge::cuda {

double median_event_ms(int64_t repeats, const std::function<void()>& fn) {
  MF_CHECK(repeats > 0, "timing needs at least one repeat, got {}", repeats);
  cudaEvent_t start = nullptr, stop = nullptr;
  MF_CUDA_CHECK(cudaEventCreate(&start));
  MF_CUDA_CHECK(cudaEventCreate(&stop));
  std::vector<double> times;
  try {
    fn();
    for (int64_t i = 0; i < repeats; ++i) {
      MF_CUDA_CHECK(cudaEventRecord(start, nullptr));
      fn();
      MF_CUDA_CHECK(cudaEventRecord(stop, nullptr));
      MF_CUDA_CHECK(cudaEventSynchronize(stop));
      float ms = 0.0f;
      MF_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
      times.push_back(ms);
    }
  } catch (...) {
    cudaEventDestroy(start);
    cudaEventDestroy(stop);
    throw;
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

}  // namespace moeforge::cuda
