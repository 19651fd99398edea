// The segmented descending sorts of the FlexPrefill pattern search (cuda/flex_prefill_sort.h): two
// stable CUB radix sorts over all segments at once instead of one thread block per segment.
#include <cub/device/device_radix_sort.cuh>

#include <algorithm>
#include <cstdint>

#include "core/error.h"
#include "cuda/cuda_check.h"
#include "cuda/flex_prefill_sort.h"
#include "cuda/kernel_util.cuh"

namespace moeforge::cuda {
namespace {

constexpr int kThreads = 256;

// Bits needed to write every value in [0, count): 0 for count <= 1.
int bits_for(int64_t count) {
  int bits = 0;
  while ((int64_t{1} << bits) < count) ++bits;
  return bits;
}

// keys[i] = (segment << position_bits) | position for i = segment * segment_size + position.
__global__ void position_keys_kernel(uint32_t* keys, int64_t total, int64_t segment_size,
                                     int position_bits) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint64_t segment = static_cast<uint64_t>(i / segment_size);
    const uint64_t position = static_cast<uint64_t>(i % segment_size);
    keys[i] = static_cast<uint32_t>((segment << position_bits) | position);
  }
}

}  // namespace

void sort_segments_descending(SortedSegments& out, const double* values, int64_t num_segments,
                              int64_t segment_size, cudaStream_t stream) {
  const int64_t total = num_segments * segment_size;
  const int position_bits = bits_for(segment_size);
  const int segment_bits = bits_for(num_segments);
  MF_CHECK(position_bits + segment_bits <= 32,
           "flex_prefill_select (CUDA): {} segments of {} values need {} key bits, more than 32",
           num_segments, segment_size, position_bits + segment_bits);
  out.position_bits = position_bits;
  out.values.resize(static_cast<size_t>(total));
  out.keys.resize(static_cast<size_t>(total));
  if (total == 0) return;

  DeviceBuffer<uint32_t> input_keys(static_cast<size_t>(total));
  position_keys_kernel<<<grid_for(total, kThreads), kThreads, 0, stream>>>(
      input_keys.data(), total, segment_size, position_bits);
  MF_CUDA_CHECK_LAUNCH();

  // With one segment the first sort is the result; otherwise it goes to scratch and the second,
  // stable on the segment bits only, groups the segments.
  const bool one_segment = segment_bits == 0;
  DeviceBuffer<double> by_value(one_segment ? 0 : static_cast<size_t>(total));
  DeviceBuffer<uint32_t> by_value_keys(one_segment ? 0 : static_cast<size_t>(total));
  double* first_values = one_segment ? out.values.data() : by_value.data();
  uint32_t* first_keys = one_segment ? out.keys.data() : by_value_keys.data();

  size_t value_sort_bytes = 0, segment_sort_bytes = 0;
  MF_CUDA_CHECK(cub::DeviceRadixSort::SortPairsDescending(
      nullptr, value_sort_bytes, values, first_values, input_keys.data(), first_keys, total, 0,
      static_cast<int>(sizeof(double) * 8), stream));
  if (!one_segment) {
    MF_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(
        nullptr, segment_sort_bytes, first_keys, out.keys.data(), first_values, out.values.data(),
        total, position_bits, position_bits + segment_bits, stream));
  }
  DeviceBuffer<uint8_t> temp(std::max<size_t>(1, std::max(value_sort_bytes, segment_sort_bytes)));
  size_t temp_bytes = temp.size();
  MF_CUDA_CHECK(cub::DeviceRadixSort::SortPairsDescending(
      temp.data(), temp_bytes, values, first_values, input_keys.data(), first_keys, total, 0,
      static_cast<int>(sizeof(double) * 8), stream));
  if (!one_segment) {
    temp_bytes = temp.size();
    MF_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(
        temp.data(), temp_bytes, first_keys, out.keys.data(), first_values, out.values.data(),
        total, position_bits, position_bits + segment_bits, stream));
  }
}

}  // namespace moeforge::cuda
