// The coverage select (cuda/coverage_select.h) with one block of threads per segment, for segments
// whose fp32 keys fit the block's shared memory (the search's step-8 triangles up to 313 blocks a
// side, so N = 40K at block size 128): one launch loads the keys once, finds the cut's digits in up
// to four histogram passes over shared memory with a barrier between passes instead of a launch
// and a last-block pick, then writes the counts, the flags and the ties. Each thread adds its
// entries of one bucket in a run before it touches shared memory; runs that end in the same
// iteration are summed across the warp first, so that values clustered in one bucket (the usual
// case: the triangles of random inputs hold nearly equal probabilities) cost few atomics.
#include "cuda/coverage_select_one_block.h"

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include <algorithm>
#include <cstdint>

#include "core/error.h"
#include "cuda/coverage_select_rule.cuh"
#include "cuda/cuda_check.h"
#include "cuda/kernel_util.cuh"

namespace moeforge::cuda {
namespace {

using namespace coverage;  // the rule shared by both paths

// 512 threads fit 64 registers a thread without spills (1024, capped at 64, spilled 264 bytes).
constexpr int kThreads = 512;
constexpr unsigned kFullMask = 0xffffffffu;
// At most kMaxValues / kThreads = 96 entries a thread, each of at most 2^53 in fixed point, so a
// run's sum stays below 2^60 and splits into kParts parts of kPartBits bits, each of whose warp
// sums fits 32 bits (__reduce_add_sync adds 32-bit values).
constexpr int64_t kMaxValues = 49152;
constexpr int kParts = 3;
constexpr int kPartBits = 20;
constexpr unsigned kPartMask = (1u << kPartBits) - 1;
// Runs of at most this many buckets in a warp are summed per bucket across the warp; with more,
// each lane adds its own run.
constexpr int kMaxReducedBuckets = 4;

static_assert(kMaxValues / kThreads < (1 << (kParts * kPartBits - 53)),
              "a run's fixed-point sum fits kParts parts");
static_assert(kPartBits + 5 <= 32, "a warp's sum of a part fits 32 bits");
static_assert(kBuckets <= kThreads, "the pick gives each bucket a thread");

// Adds each lane's run (bucket < 0: none) to the block's histograms: lanes of a bucket are summed
// across the warp and one of them adds the sums, or, with more than kMaxReducedBuckets buckets,
// each lane adds its own. Called by the whole warp.
__device__ void add_runs(int bucket, unsigned count, unsigned long long sum, unsigned* hist_count,
                         unsigned long long* hist_sum) {
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  if (__ballot_sync(kFullMask, bucket >= 0) == 0) return;
  const unsigned peers = __match_any_sync(kFullMask, bucket);
  const unsigned leaders = __ballot_sync(kFullMask, bucket >= 0 && lane == __ffs(peers) - 1);
  if (__popc(leaders) > kMaxReducedBuckets) {
    if (bucket >= 0) {
      atomicAdd(&hist_count[bucket], count);
      atomicAdd(&hist_sum[bucket], sum);
    }
    return;
  }
  for (unsigned rest = leaders; rest != 0; rest &= rest - 1) {  // warp-uniform
    const int src = __ffs(rest) - 1;
    // Every lane takes part in the shuffle (no short circuit before it); src's bucket is >= 0.
    const int src_bucket = __shfl_sync(kFullMask, bucket, src);
    const bool mine = bucket == src_bucket;
    const unsigned total_count = __reduce_add_sync(kFullMask, mine ? count : 0u);
    unsigned long long total_sum = 0;
#pragma unroll
    for (int p = 0; p < kParts; ++p) {
      const unsigned part = static_cast<unsigned>(sum >> (p * kPartBits)) & kPartMask;
      total_sum += static_cast<unsigned long long>(__reduce_add_sync(kFullMask, mine ? part : 0u))
                   << (p * kPartBits);
    }
    if (lane == src) {
      atomicAdd(&hist_count[bucket], total_count);
      atomicAdd(&hist_sum[bucket], total_sum);
    }
  }
}

// Block per segment; dynamic shared memory holds the segment's keys.
template <typename T>
__global__ void __launch_bounds__(kThreads, 1)
    one_block_select_kernel(unsigned long long* counts, uint8_t* selected, const T* values,
                            int segment_size, double gamma, SegmentFilter filter) {
  extern __shared__ uint32_t keys[];
  __shared__ unsigned hist_count[kBuckets];
  __shared__ unsigned long long hist_sum[kBuckets];
  __shared__ Cut cut_s;
  __shared__ union {
    typename cub::BlockReduce<unsigned long long, kThreads>::TempStorage reduce;
    typename cub::BlockScan<unsigned long long, kThreads>::TempStorage scan;
    typename cub::BlockScan<unsigned, kThreads>::TempStorage ties;
  } storage;
  const int64_t segment = blockIdx.x;
  if (!filter.runs(segment)) return;
  const int tid = static_cast<int>(threadIdx.x);
  const int n = segment_size;
  const T* x = values + segment * static_cast<int64_t>(n);

  unsigned long long own_sum = 0;
  for (int i = tid; i < n; i += kThreads) {
    const uint32_t key = key_of(x[i]);
    keys[i] = key;
    own_sum += fixed_of(key);
  }
  const unsigned long long total =
      cub::BlockReduce<unsigned long long, kThreads>(storage.reduce).Sum(own_sum);
  if (tid == 0) {
    const unsigned long long limit = limit_of(total, gamma);
    cut_s = Cut{0, total <= limit ? 1u : 0u, 0, limit, 0, 0, 0, 0};
  }
  __syncthreads();

  for (int pass = 0; pass < kPasses && cut_s.all == 0 && cut_s.done == 0; ++pass) {
    const uint32_t cut_key = cut_s.key;
    const unsigned long long room = cut_s.limit - cut_s.sum_above;  // read before the pick writes
    const int shift = digit_shift(pass);
    if (tid < kBuckets) {
      hist_count[tid] = 0;
      hist_sum[tid] = 0;
    }
    __syncthreads();
    int run_bucket = -1;  // the thread's current run: its bucket, count and sum
    unsigned run_count = 0;
    unsigned long long run_sum = 0;
    for (int base = 0; base < n; base += kThreads) {  // the same trip count in every thread
      const int i = base + tid;
      int bucket = -1;
      unsigned long long fixed = 0;
      if (i < n) {
        const uint32_t key = keys[i];
        if (in_cut_prefix(key, cut_key, pass)) {
          bucket = static_cast<int>((key >> shift) & (kBuckets - 1));
          fixed = fixed_of(key);
        }
      }
      const bool ends = bucket >= 0 && run_bucket >= 0 && bucket != run_bucket;
      if (__any_sync(kFullMask, ends)) {
        add_runs(ends ? run_bucket : -1, run_count, run_sum, hist_count, hist_sum);
      }
      if (ends) {
        run_count = 0;
        run_sum = 0;
      }
      if (bucket >= 0) {
        run_bucket = bucket;
        ++run_count;
        run_sum += fixed;
      }
    }
    add_runs(run_bucket, run_count, run_sum, hist_count, hist_sum);
    __syncthreads();

    // The pick: thread t < kBuckets holds bucket kBuckets - 1 - t, so that the scans run from the
    // top; the bucket where the running sum passes the limit keeps the cut.
    const int bucket = kBuckets - 1 - tid;
    const unsigned long long count = tid < kBuckets ? hist_count[bucket] : 0;
    const unsigned long long sum = tid < kBuckets ? hist_sum[bucket] : 0;
    unsigned long long sum_before = 0, count_before = 0;
    cub::BlockScan<unsigned long long, kThreads>(storage.scan).ExclusiveSum(sum, sum_before);
    __syncthreads();
    cub::BlockScan<unsigned long long, kThreads>(storage.scan).ExclusiveSum(count, count_before);
    if (tid < kBuckets && sum_before <= room && room < sum_before + sum) {
      Cut next = cut_s;
      coverage::take_bucket(next, static_cast<uint32_t>(bucket), pass, count, sum_before,
                            count_before);
      cut_s = next;
    }
    __syncthreads();
  }

  const Cut cut = cut_s;
  if (tid == 0 && counts != nullptr) {
    counts[segment] =
        cut.all != 0 ? static_cast<unsigned long long>(n) : cut.count_above + cut.take_equal;
  }
  if (selected == nullptr) return;
  uint8_t* out = selected + segment * static_cast<int64_t>(n);
  for (int i = tid; i < n; i += kThreads) out[i] = marked(cut, keys[i]) ? 1 : 0;
  if (!is_tie(cut)) return;
  // The cut is inside a run of equal entries: the first take_equal of them by position.
  unsigned long long taken = 0;
  for (int base = 0; base < n && taken < cut.take_equal; base += kThreads) {
    const int i = base + tid;
    const unsigned equal = i < n && keys[i] == cut.key ? 1u : 0u;
    unsigned rank = 0, tile_equal = 0;
    cub::BlockScan<unsigned, kThreads>(storage.ties).ExclusiveSum(equal, rank, tile_equal);
    if (equal != 0 && taken + rank < cut.take_equal) out[i] = 1;
    taken += tile_equal;
    __syncthreads();  // storage.ties is reused
  }
}

// Shared memory besides the keys, from the kernel's attributes.
template <typename T>
size_t static_shared_bytes() {
  cudaFuncAttributes attributes{};
  MF_CUDA_CHECK(cudaFuncGetAttributes(&attributes, one_block_select_kernel<T>));
  return attributes.sharedSizeBytes;
}

}  // namespace

template <typename T>
int64_t one_block_select_max_values() {
  int device = 0, optin = 0;
  MF_CUDA_CHECK(cudaGetDevice(&device));
  MF_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  const size_t fixed = static_shared_bytes<T>();
  if (static_cast<size_t>(optin) <= fixed) return 0;
  return std::min<int64_t>(
      kMaxValues, static_cast<int64_t>((static_cast<size_t>(optin) - fixed) / sizeof(uint32_t)));
}

template <typename T>
void one_block_select(unsigned long long* counts, uint8_t* selected, const T* values,
                      int64_t num_segments, int64_t segment_size, double gamma,
                      SegmentFilter filter, cudaStream_t stream) {
  MF_CHECK(segment_size >= 1 && segment_size <= one_block_select_max_values<T>(),
           "coverage_select: the one-block path takes segments of at most {} values on this "
           "device, got {}",
           one_block_select_max_values<T>(), segment_size);
  const size_t key_bytes = static_cast<size_t>(segment_size) * sizeof(uint32_t);
  MF_CUDA_CHECK(cudaFuncSetAttribute(one_block_select_kernel<T>,
                                     cudaFuncAttributeMaxDynamicSharedMemorySize,
                                     static_cast<int>(key_bytes)));
  one_block_select_kernel<T><<<static_cast<unsigned>(num_segments), kThreads, key_bytes, stream>>>(
      counts, selected, values, static_cast<int>(segment_size), gamma, filter);
  MF_CUDA_CHECK_LAUNCH();
}

template int64_t one_block_select_max_values<float>();
template int64_t one_block_select_max_values<double>();
template void one_block_select<float>(unsigned long long*, uint8_t*, const float*, int64_t, int64_t,
                                      double, SegmentFilter, cudaStream_t);
template void one_block_select<double>(unsigned long long*, uint8_t*, const double*, int64_t,
                                       int64_t, double, SegmentFilter, cudaStream_t);

}  // namespace moeforge::cuda
