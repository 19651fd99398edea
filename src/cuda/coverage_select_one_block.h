// The one-block-per-segment path of coverage_select (cuda/coverage_select.h), for segments whose
// fp32 keys fit one block's shared memory; coverage_select chooses it (SelectPath).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/coverage_select.h"

namespace moeforge::cuda {

// The most values a segment may hold for the one-block path on the current device (0: none).
template <typename T>
int64_t one_block_select_max_values();

// coverage_select's outputs with one block of threads per segment (no workspace): segment_size
// must be in [1, one_block_select_max_values<T>()] (moeforge::Error otherwise).
template <typename T>
void one_block_select(unsigned long long* counts, uint8_t* selected, const T* values,
                      int64_t num_segments, int64_t segment_size, double gamma,
                      SegmentFilter filter, cudaStream_t stream);

}  // namespace moeforge::cuda
