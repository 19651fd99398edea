// EventPool: timing-free CUDA events for ordering streams (cuda/event_pool.h).
#include "cuda/event_pool.h"

#include "cuda/cuda_check.h"

namespace moeforge::cuda {

EventPool::~EventPool() {
  for (cudaEvent_t event : events_) cudaEventDestroy(event);
}

cudaEvent_t EventPool::record(cudaStream_t stream) {
  if (used_ == events_.size()) {
    cudaEvent_t event = nullptr;
    MF_CUDA_CHECK(cudaEventCreateWithFlags(&event, cudaEventDisableTiming));
    events_.push_back(event);
  }
  cudaEvent_t event = events_[used_++];
  MF_CUDA_CHECK(cudaEventRecord(event, stream));
  return event;
}

void EventPool::wait(cudaStream_t stream, cudaEvent_t event) {
  MF_CUDA_CHECK(cudaStreamWaitEvent(stream, event, 0));
}

}  // namespace moeforge::cuda
