// Per-phase GPU time of a training step: CUDA events recorded on the model's stream at phase
// boundaries; the time between consecutive events is charged to the phase that was open.
#pragma once

#include <cuda_runtime.h>

#include <map>
#include <string>
#include <vector>

namespace moeforge::cuda {

class PhaseTimer {
 public:
  ~PhaseTimer();
  void set_enabled(bool enabled) { enabled_ = enabled; }
  bool enabled() const { return enabled_; }
  // Closes the open phase (if any) and opens `name`.
  void mark(const std::string& name, cudaStream_t stream);
  // Charges what fn enqueues on stream to the open phase's name + suffix (e.g. "moe" ->
  // "moe_exchange" for its collectives, which include waiting for the other ranks), then reopens
  // the open phase. Just fn() when disabled or no phase is open.
  template <typename Fn>
  void split(const char* suffix, cudaStream_t stream, Fn&& fn) {
    if (!enabled_ || marks_.empty()) {
      fn();
      return;
    }
    const std::string open = marks_.back().first;
    mark(open + suffix, stream);
    fn();
    mark(open, stream);
  }
  // Closes the open phase, waits for the events and adds their durations to the totals.
  void flush(cudaStream_t stream);
  const std::map<std::string, double>& totals_ms() const { return totals_ms_; }
  void reset() { totals_ms_.clear(); }

 private:
  cudaEvent_t next_event();

  bool enabled_ = false;
  std::vector<cudaEvent_t> pool_;
  size_t used_ = 0;
  std::vector<std::pair<std::string, cudaEvent_t>> marks_;
  std::map<std::string, double> totals_ms_;
};

}  // namespace moeforge::cuda
