// PhaseTimer: a pool of CUDA events reused every step.
#include "cuda/phase_timer.h"

#include "cuda/cuda_check.h"

namespace moeforge::cuda {

PhaseTimer::~PhaseTimer() {
  for (cudaEvent_t e : pool_) cudaEventDestroy(e);
}

cudaEvent_t PhaseTimer::next_event() {
  if (used_ == pool_.size()) {
    cudaEvent_t e = nullptr;
    MF_CUDA_CHECK(cudaEventCreate(&e));
    pool_.push_back(e);
  }
  return pool_[used_++];
}

void PhaseTimer::mark(const std::string& name, cudaStream_t stream) {
  if (!enabled_) return;
  cudaEvent_t e = next_event();
  MF_CUDA_CHECK(cudaEventRecord(e, stream));
  marks_.emplace_back(name, e);
}

void PhaseTimer::flush(cudaStream_t stream) {
  if (!enabled_ || marks_.empty()) return;
  cudaEvent_t end = next_event();
  MF_CUDA_CHECK(cudaEventRecord(end, stream));
  MF_CUDA_CHECK(cudaEventSynchronize(end));
  for (size_t i = 0; i < marks_.size(); ++i) {
    const cudaEvent_t stop = i + 1 < marks_.size() ? marks_[i + 1].second : end;
    float ms = 0.0f;
    MF_CUDA_CHECK(cudaEventElapsedTime(&ms, marks_[i].second, stop));
    totals_ms_[marks_[i].first] += ms;
  }
  marks_.clear();
  used_ = 0;
}

}  // namespace moeforge::cuda
