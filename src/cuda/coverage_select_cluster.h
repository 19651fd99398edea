// The clusters path of coverage_select (cuda/coverage_select.h), for Hopper and later GPUs: a
// thread block cluster per segment, each block of it holding a slice of the segment's fp32 keys in
// shared memory, so that one launch runs every pass, pick, mark and tie without global atomics;
// the blocks add each other's histograms through distributed shared memory.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/coverage_select.h"

namespace moeforge::cuda {

// The blocks of the cluster that the clusters path gives a segment of segment_size values on the
// current device: the fewest (a power of two, at most 16) whose slices hold at most 16384 values
// (at 32K, clusters of 4 for the 32 heads' step-8 triangles: one wave on an H200, where clusters of
// 8 slices of at most 8192 took two; docs/benchmarks.md, session 27); 0 where the path cannot run
// the segment (longer segments, or a device without clusters of that size).
int cluster_select_size(int64_t segment_size);

// coverage_select's outputs by the clusters path (no workspace): cluster_select_size(segment_size)
// must be nonzero (moeforge::Error otherwise).
template <typename T>
void cluster_select(unsigned long long* counts, uint8_t* selected, const T* values,
                    int64_t num_segments, int64_t segment_size, double gamma, SegmentFilter filter,
                    cudaStream_t stream);

}  // namespace moeforge::cuda
