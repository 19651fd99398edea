// The fp32 FlexPrefill search's steps 1-3 (cuda/flex_prefill_fp32.h): its checks, and step 2's
// coverage counts of the fp32 vertical / slash values. One radix sort of 64-bit keys (segment,
// then the value's bits inverted: descending values) orders every segment at once; then a block
// per segment turns the sorted values into 2^-52 fixed point, where sums are exact in any order,
// takes the segment's total and counts the prefix sums <= gamma * total.
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <cub/device/device_radix_sort.cuh>

#include <algorithm>
#include <cstdint>

#include "core/error.h"
#include "cuda/cuda_check.h"
#include "cuda/device_memory.h"
#include "cuda/flex_prefill_fp32.h"
#include "cuda/kernel_util.cuh"

namespace moeforge::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kCountItems = 8;  // sorted values per thread per tile of the prefix scan
// The fixed-point unit of the coverage sums: every value is in [0, 1 + rho] and a segment sums to
// 1 + O(rho), so totals stay below 2^53 (exact in a double) and each value's rounding to the unit
// (2^-53) is far below the fp32 noise.
constexpr double kFixedOne = 4503599627370496.0;  // 2^52

// Bits needed to write every value in [0, count): 0 for count <= 1.
int bits_for(int64_t count) {
  int bits = 0;
  while ((int64_t{1} << bits) < count) ++bits;
  return bits;
}

// keys[i] = (segment << 32) | ~bits(values[i]): ascending keys are segments in order, each with its
// values descending (the values are >= +0.0, whose bits order as the values).
__global__ void coverage_keys_kernel(uint64_t* keys, const float* values, int64_t total,
                                     int64_t segment_size) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint64_t segment = static_cast<uint64_t>(i / segment_size);
    keys[i] = (segment << 32) | static_cast<uint64_t>(~__float_as_uint(values[i]));
  }
}

__device__ __forceinline__ unsigned long long fixed_point(uint64_t key) {
  const float value = __uint_as_float(~static_cast<uint32_t>(key));
  return __double2ull_rn(static_cast<double>(value) * kFixedOne);
}

// Block per segment of the sorted keys [num_segments, segment_size]: counts[segment] = the number
// of positions t whose fixed-point sum of the values 0..t is <= floor(gamma * total).
__global__ void __launch_bounds__(kThreads)
    fixed_coverage_count_kernel(unsigned long long* counts, const uint64_t* sorted,
                                int64_t segment_size, double gamma) {
  using BlockReduce = cub::BlockReduce<unsigned long long, kThreads>;
  using BlockScan = cub::BlockScan<unsigned long long, kThreads>;
  __shared__ union {
    typename BlockReduce::TempStorage reduce;
    typename BlockScan::TempStorage scan;
  } storage;
  __shared__ unsigned long long limit_shared;
  const uint64_t* keys = sorted + blockIdx.x * segment_size;
  const int tid = static_cast<int>(threadIdx.x);

  unsigned long long local = 0;
  for (int64_t p = tid; p < segment_size; p += kThreads) local += fixed_point(keys[p]);
  const unsigned long long total = BlockReduce(storage.reduce).Sum(local);
  if (tid == 0) {
    limit_shared = static_cast<unsigned long long>(gamma * static_cast<double>(total));
  }
  __syncthreads();
  const unsigned long long limit = limit_shared;

  constexpr int64_t kTile = int64_t{kThreads} * kCountItems;
  unsigned long long carry = 0;  // the sum of the tiles before this one
  unsigned long long count = 0;
  for (int64_t base = 0; base < segment_size; base += kTile) {
    unsigned long long items[kCountItems];
#pragma unroll
    for (int i = 0; i < kCountItems; ++i) {
      const int64_t p = base + tid * kCountItems + i;
      items[i] = p < segment_size ? fixed_point(keys[p]) : 0;
    }
    unsigned long long tile_total = 0;
    __syncthreads();  // the previous use of storage is done
    BlockScan(storage.scan).InclusiveSum(items, items, tile_total);
#pragma unroll
    for (int i = 0; i < kCountItems; ++i) {
      const int64_t p = base + tid * kCountItems + i;
      count += p < segment_size && carry + items[i] <= limit ? 1 : 0;
    }
    carry += tile_total;
  }
  __syncthreads();
  const unsigned long long segment_count = BlockReduce(storage.reduce).Sum(count);
  if (tid == 0) counts[blockIdx.x] = segment_count;
}

// counts [num_segments] = the fp32 search's step-2 counts of values [num_segments, segment_size].
void fp32_coverage_counts(unsigned long long* counts, const float* values, int64_t num_segments,
                          int64_t segment_size, double gamma, cudaStream_t stream) {
  const int64_t total = num_segments * segment_size;
  const int end_bit = 32 + bits_for(num_segments);
  DeviceBuffer<uint64_t> keys(static_cast<size_t>(total));
  DeviceBuffer<uint64_t> sorted(static_cast<size_t>(total));
  coverage_keys_kernel<<<grid_for(total, kThreads), kThreads, 0, stream>>>(keys.data(), values,
                                                                           total, segment_size);
  MF_CUDA_CHECK_LAUNCH();
  size_t temp_bytes = 0;
  MF_CUDA_CHECK(cub::DeviceRadixSort::SortKeys(nullptr, temp_bytes, keys.data(), sorted.data(),
                                               total, 0, end_bit, stream));
  DeviceBuffer<uint8_t> temp(std::max<size_t>(1, temp_bytes));
  MF_CUDA_CHECK(cub::DeviceRadixSort::SortKeys(temp.data(), temp_bytes, keys.data(), sorted.data(),
                                               total, 0, end_bit, stream));
  fixed_coverage_count_kernel<<<static_cast<unsigned>(num_segments), kThreads, 0, stream>>>(
      counts, sorted.data(), segment_size, gamma);
  MF_CUDA_CHECK_LAUNCH();
}

}  // namespace

void check_fp32_search(const flex::SearchShape& s, const bf16* q, const bf16* k) {
  constexpr const char* kWho = "flex_prefill_select (CUDA, fast search)";
  MF_CHECK(s.head_dim % 8 == 0,
           "{}: head_dim must be a multiple of 8, got {} (the exact search, --flex-search exact, "
           "takes any head_dim)",
           kWho, s.head_dim);
  MF_CHECK(aligned_to(16, q, k), "{}: q and k must be 16-byte aligned", kWho);
  int device = 0, major = 0;
  MF_CUDA_CHECK(cudaGetDevice(&device));
  MF_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  MF_CHECK(major >= 8,
           "{}: needs bf16 tensor cores (compute capability 8.0 or later), device {} has {}.x",
           kWho, device, major);
  int smem_limit = 0;
  MF_CUDA_CHECK(
      cudaDeviceGetAttribute(&smem_limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  const size_t smem = fp32_scores_smem_bytes(s);
  MF_CHECK(smem <= static_cast<size_t>(smem_limit),
           "{}: head_dim {} at block size {} needs {} bytes of shared memory per block, device {} "
           "allows {} (the exact search, --flex-search exact, has no such limit)",
           kWho, s.head_dim, s.block_size, smem, device, smem_limit);
}

void fp32_last_block_scores(double* pooled, unsigned long long* coverage_counts, const bf16* q,
                            const bf16* k, const flex::SearchShape& s, double gamma,
                            cudaStream_t stream) {
  DeviceBuffer<float> vs(static_cast<size_t>(s.num_q_heads * 2 * s.seq_len));  // [Hq, 2, N]
  fp32_vertical_slash(vs.data(), pooled, q, k, s, stream);
  fp32_coverage_counts(coverage_counts, vs.data(), s.num_q_heads * 2, s.seq_len, gamma, stream);
}

}  // namespace moeforge::cuda
