// The sorts of the FlexPrefill pattern search on the GPU: many equal-length segments of doubles,
// each sorted descending with the reference's tie rule (equal values by the lower position).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/device_memory.h"

namespace moeforge::cuda {

// Segment s of the sorted output: values [s * segment_size, (s + 1) * segment_size) descending, and
// at the same places the keys (s << position_bits) | (position in the segment's input).
struct SortedSegments {
  int position_bits = 0;        // bits of the position in a key
  DeviceBuffer<double> values;  // [num_segments * segment_size]
  DeviceBuffer<uint32_t> keys;  // [num_segments * segment_size]
};

// Sorts values [num_segments, segment_size] segment by segment: the larger value first, equal
// values by the lower position. The values must be >= +0.0 or +inf (no -0.0, no NaN), as all the
// search sorts. Two stable radix sorts (cub::DeviceRadixSort) over all segments at once: by value
// descending, then by segment; stability keeps the ascending positions of equal values. Throws
// moeforge::Error if a key needs more than 32 bits. Asynchronous on stream.
void sort_segments_descending(SortedSegments& out, const double* values, int64_t num_segments,
                              int64_t segment_size, cudaStream_t stream);

}  // namespace moeforge::cuda
