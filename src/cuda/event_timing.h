// Timing of GPU work for the benchmarks: the median over repeats of the time between CUDA events
// recorded around fn on the legacy default stream (after one untimed warm-up call).
#pragma once

#include <cstdint>
#include <functional>

namespace moeforge::cuda {

double median_event_ms(int64_t repeats, const std::function<void()>& fn);

}  // namespace moeforge::cuda
