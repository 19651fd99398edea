// CUDA events that order work across streams: record() marks what a stream has enqueued so far,
// wait() makes another stream wait for that mark. The events are reused after rewind(): a wait
// captures the event's record when it is enqueued, so recording it again later is safe.
#pragma once

#include <cuda_runtime.h>

#include <vector>

namespace moeforge::cuda {

class EventPool {
 public:
  EventPool() = default;
  ~EventPool();
  EventPool(const EventPool&) = delete;
  EventPool& operator=(const EventPool&) = delete;

  // An event of the pool (a new one until rewind()) recorded on stream.
  cudaEvent_t record(cudaStream_t stream);
  // Later work on stream waits for event's record.
  static void wait(cudaStream_t stream, cudaEvent_t event);
  // Later work on `waiter` waits for what `producer` has enqueued so far.
  void order(cudaStream_t producer, cudaStream_t waiter) { wait(waiter, record(producer)); }
  // The next record() reuses the pool's first event.
  void rewind() { used_ = 0; }

 private:
  std::vector<cudaEvent_t> events_;
  size_t used_ = 0;
};

}  // namespace moeforge::cuda
