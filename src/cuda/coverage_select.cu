// The radix select of the fast search's coverage (cuda/coverage_select.h): four histogram passes
// over the fp32 bits of the values, each ending in a pick by the segment's last block of threads,
// then (for the selected flags) a marking pass that also counts each chunk's entries equal to the
// cut and, where the cut falls inside a run of equal values, a pass that marks the first of them
// by position, each chunk after the earlier chunks' count.
#include "cuda/coverage_select.h"

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include <cstdint>
#include <limits>

#include "core/error.h"
#include "cuda/coverage_select_cluster.h"
#include "cuda/coverage_select_histogram.cuh"
#include "cuda/coverage_select_rule.cuh"
#include "cuda/cuda_check.h"
#include "cuda/device_memory.h"
#include "cuda/kernel_util.cuh"

namespace moeforge::cuda {
namespace {

using namespace coverage;  // the rule shared by both paths

constexpr int kThreads = 256;
// The most blocks of a segment's cluster where the path is automatic (cuda/coverage_select.h says
// why).
constexpr int kAutomaticClusterBlocks = 4;
constexpr int64_t kChunk = 4096;  // values per block of threads of a histogram pass
constexpr int kLoadsPerThread = static_cast<int>(kChunk) / kThreads;

static_assert(kChunk <= kMaxBlockValues, "a block's histogram parts sum below 2^32");
static_assert(kThreads == kBuckets, "the pick gives each thread one bucket");

// Pass `pass` of the select: block (chunk of kChunk values, segment). Histograms of the bits
// [shift, shift + kDigitBits) of the entries that share the cut's bits found so far (all entries in
// pass 0): counts and fixed-point sums (in kParts parts) per bucket, per block in shared memory,
// then per segment in hist_count / hist_sum [kPasses, segments, kBuckets] (zeroed, global atomics).
// The segment's last block to arrive (arrivals [kPasses, segments], zeroed) walks the buckets from
// the top and keeps the one where the running sum passes the limit; after the last pass it also
// writes counts.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    select_pass_kernel(Cut* cuts, unsigned long long* hist_count, unsigned long long* hist_sum,
                       unsigned long long* arrivals, unsigned long long* counts, const T* values,
                       int64_t segment_size, double gamma, SegmentFilter filter, int pass) {
  __shared__ BlockHistogram hist_s;
  __shared__ bool last_s;
  using BlockScan = cub::BlockScan<unsigned long long, kThreads>;
  __shared__ typename BlockScan::TempStorage scan_storage;
  const int64_t segment = blockIdx.y;
  if (!filter.runs(segment)) return;
  // Read before any block of this pass can write it (the last block writes after every block,
  // this one included, has arrived).
  Cut cut = pass == 0 ? Cut{0, 0, 0, 0, 0, 0, 0, 0} : cuts[segment];
  if (cut.done != 0) return;
  const int shift = digit_shift(pass);
  const int tid = static_cast<int>(threadIdx.x);
  clear_bucket(hist_s, tid);
  __syncthreads();

  const T* x = values + segment * segment_size;
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * kChunk;
  const int64_t end = min(segment_size, begin + kChunk);
  // The thread's values are all loaded first: one load in flight at a time would make the pass
  // wait out kLoadsPerThread memory latencies.
  T loaded[kLoadsPerThread];
#pragma unroll
  for (int u = 0; u < kLoadsPerThread; ++u) {
    const int64_t i = begin + int64_t{u} * kThreads + tid;
    loaded[u] = i < end ? x[i] : T{};
  }
#pragma unroll
  for (int u = 0; u < kLoadsPerThread; ++u) {
    const int64_t i = begin + int64_t{u} * kThreads + tid;
    unsigned bucket = kNoBucket;  // past the end, or outside the cut's bucket
    unsigned long long fixed = 0;
    if (i < end) {
      const uint32_t key = key_of(loaded[u]);
      if (in_cut_prefix(key, cut.key, pass)) {
        bucket = (key >> shift) & (kBuckets - 1);
        fixed = fixed_of(key);
      }
    }
    add_to_histogram(hist_s, bucket, fixed);
  }
  __syncthreads();
  const unsigned block_count = hist_s.count[tid];
  const unsigned long long block_sum = bucket_sum(hist_s, tid);
  const int64_t slot = static_cast<int64_t>(pass) * gridDim.y + segment;
  unsigned long long* segment_count = hist_count + slot * kBuckets;
  unsigned long long* segment_sum = hist_sum + slot * kBuckets;
  if (block_count != 0) {
    atomicAdd(&segment_count[tid], static_cast<unsigned long long>(block_count));
    atomicAdd(&segment_sum[tid], block_sum);
  }
  __threadfence();
  __syncthreads();
  if (tid == 0) last_s = atomicAdd(&arrivals[slot], 1ull) == gridDim.x - 1;
  __syncthreads();
  if (!last_s) return;
  __threadfence();

  // The pick: thread t holds bucket kBuckets - 1 - t, so that the scans run from the top.
  const unsigned bucket = kBuckets - 1 - tid;
  const unsigned long long count = __ldcg(&segment_count[bucket]);
  const unsigned long long sum = __ldcg(&segment_sum[bucket]);
  unsigned long long sum_before = 0, total = 0, count_before = 0;
  BlockScan(scan_storage).ExclusiveSum(sum, sum_before, total);
  __syncthreads();
  BlockScan(scan_storage).ExclusiveSum(count, count_before);
  if (pass == 0) {
    cut.limit = limit_of(total, gamma);
    if (total <= cut.limit) {  // every entry fits (the only pass where no bucket can pass it)
      if (tid == 0) {
        cut.all = 1;
        cut.done = 1;
        cuts[segment] = cut;
        if (counts != nullptr) counts[segment] = static_cast<unsigned long long>(segment_size);
      }
      return;
    }
  }
  const unsigned long long room = cut.limit - cut.sum_above;
  if (!(sum_before <= room && room < sum_before + sum)) return;
  coverage::take_bucket(cut, bucket, pass, count, sum_before, count_before);
  if (cut.done != 0 && counts != nullptr) counts[segment] = cut.count_above + cut.take_equal;
  cuts[segment] = cut;
}

// selected [segments, segment_size] = 1 for the entries above the cut and, when all of them are
// taken, those equal to it; else 0. Block (chunk of kChunk values, segment). Where the cut is a
// tie, also counts the chunk's entries equal to it into chunk_equal [segments, chunks].
template <typename T>
__global__ void __launch_bounds__(kThreads)
    select_mark_kernel(uint8_t* selected, unsigned* chunk_equal, const Cut* cuts, const T* values,
                       int64_t segment_size, SegmentFilter filter) {
  using BlockReduce = cub::BlockReduce<unsigned, kThreads>;
  __shared__ typename BlockReduce::TempStorage reduce_storage;
  const int64_t segment = blockIdx.y;
  if (!filter.runs(segment)) return;
  const Cut cut = cuts[segment];
  const T* x = values + segment * segment_size;
  uint8_t* out = selected + segment * segment_size;
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * kChunk;
  const int64_t end = min(segment_size, begin + kChunk);
  unsigned equal = 0;
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    const uint32_t key = key_of(x[i]);
    equal += key == cut.key ? 1u : 0u;
    out[i] = marked(cut, key) ? 1 : 0;
  }
  if (!is_tie(cut)) return;  // uniform across the block
  const unsigned chunk_total = BlockReduce(reduce_storage).Sum(equal);
  if (threadIdx.x == 0) {
    chunk_equal[segment * static_cast<int64_t>(gridDim.x) + blockIdx.x] = chunk_total;
  }
}

// Block (chunk, segment) for the segments whose cut is a tie: the chunk's entries equal to the cut
// are taken in position order after those of the earlier chunks (chunk_equal, from the mark), while
// fewer than take_equal are taken, kThreads positions at a time.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    select_ties_kernel(uint8_t* selected, const unsigned* chunk_equal, const Cut* cuts,
                       const T* values, int64_t segment_size, SegmentFilter filter) {
  using BlockScan = cub::BlockScan<unsigned, kThreads>;
  using BlockReduce = cub::BlockReduce<unsigned long long, kThreads>;
  __shared__ union {
    typename BlockScan::TempStorage scan;
    typename BlockReduce::TempStorage reduce;
  } storage;
  __shared__ unsigned long long before_s;
  const int64_t segment = blockIdx.y;
  if (!filter.runs(segment)) return;
  const Cut cut = cuts[segment];
  if (!is_tie(cut)) return;
  const unsigned* counts = chunk_equal + segment * static_cast<int64_t>(gridDim.x);
  unsigned long long before = 0;  // equal entries in the earlier chunks
  for (unsigned c = threadIdx.x; c < blockIdx.x; c += kThreads) before += counts[c];
  before = BlockReduce(storage.reduce).Sum(before);
  if (threadIdx.x == 0) before_s = before;
  __syncthreads();
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * kChunk;
  const T* x = values + segment * segment_size + begin;
  mark_ties<kThreads>(
      selected + segment * segment_size + begin, min(segment_size, begin + kChunk) - begin,
      before_s, cut, [x](int64_t i) { return key_of(x[i]); }, storage.scan);
}

// The workspace: hist_count, hist_sum [kPasses, segments, kBuckets] and arrivals [kPasses,
// segments] (zeroed by each select, in one call), then cuts [segments], then the ties' chunk_equal
// [segments, chunks].
size_t scratch_bytes(int64_t num_segments) {
  return static_cast<size_t>(kPasses * num_segments * (2 * kBuckets + 1)) *
         sizeof(unsigned long long);
}

size_t cuts_bytes(int64_t num_segments) {
  return static_cast<size_t>(num_segments) * sizeof(Cut);
}

}  // namespace

size_t coverage_select_workspace_bytes(int64_t num_segments, int64_t segment_size) {
  static_assert(alignof(Cut) <= 16 && sizeof(unsigned long long) % alignof(Cut) == 0 &&
                sizeof(Cut) % alignof(unsigned) == 0);
  return scratch_bytes(num_segments) + cuts_bytes(num_segments) +
         static_cast<size_t>(num_segments * ceil_div(segment_size, kChunk)) * sizeof(unsigned);
}

SelectPath resolve_select_path(int64_t segment_size, SelectPath path) {
  if (path == SelectPath::many_blocks) return path;
  const int blocks = cluster_select_size(segment_size);
  const bool fits =
      blocks > 0 && (path == SelectPath::clusters || blocks <= kAutomaticClusterBlocks);
  return fits ? SelectPath::clusters : SelectPath::many_blocks;
}

template <typename T>
void coverage_select(unsigned long long* counts, uint8_t* selected, const T* values,
                     int64_t num_segments, int64_t segment_size, double gamma, SegmentFilter filter,
                     cudaStream_t stream, void* workspace, SelectPath path) {
  MF_CHECK(num_segments >= 1 && num_segments <= 65535,
           "coverage_select: num_segments must be in [1, 65535], got {}", num_segments);
  MF_CHECK(segment_size >= 1 && segment_size <= std::numeric_limits<int32_t>::max(),
           "coverage_select: segment_size must be in [1, 2^31 - 1], got {}", segment_size);
  MF_CHECK(filter.segments_per_flag >= 1, "coverage_select: segments_per_flag must be >= 1, got {}",
           filter.segments_per_flag);
  MF_CHECK(aligned_to(16, workspace), "coverage_select: the workspace must be 16-byte aligned");
  if (resolve_select_path(segment_size, path) == SelectPath::clusters) {
    cluster_select(counts, selected, values, num_segments, segment_size, gamma, filter, stream);
    return;
  }
  DeviceBuffer<uint8_t> own_workspace;
  if (workspace == nullptr) {
    own_workspace.resize(coverage_select_workspace_bytes(num_segments, segment_size));
    workspace = own_workspace.data();
  }
  const int64_t chunks = ceil_div(segment_size, kChunk);
  const int64_t slots = kPasses * num_segments;
  auto* hist_count = static_cast<unsigned long long*>(workspace);
  unsigned long long* hist_sum = hist_count + slots * kBuckets;
  unsigned long long* arrivals = hist_sum + slots * kBuckets;
  MF_CUDA_CHECK(cudaMemsetAsync(workspace, 0, scratch_bytes(num_segments), stream));
  Cut* cuts =
      reinterpret_cast<Cut*>(static_cast<uint8_t*>(workspace) + scratch_bytes(num_segments));
  auto* chunk_equal = reinterpret_cast<unsigned*>(
      static_cast<uint8_t*>(workspace) + scratch_bytes(num_segments) + cuts_bytes(num_segments));
  const dim3 pass_grid(static_cast<unsigned>(chunks), static_cast<unsigned>(num_segments));
  for (int pass = 0; pass < kPasses; ++pass) {
    select_pass_kernel<T><<<pass_grid, kThreads, 0, stream>>>(
        cuts, hist_count, hist_sum, arrivals, counts, values, segment_size, gamma, filter, pass);
    MF_CUDA_CHECK_LAUNCH();
  }
  if (selected == nullptr) return;
  select_mark_kernel<T><<<pass_grid, kThreads, 0, stream>>>(selected, chunk_equal, cuts, values,
                                                            segment_size, filter);
  MF_CUDA_CHECK_LAUNCH();
  select_ties_kernel<T><<<pass_grid, kThreads, 0, stream>>>(selected, chunk_equal, cuts, values,
                                                            segment_size, filter);
  MF_CUDA_CHECK_LAUNCH();
}

template void coverage_select<float>(unsigned long long*, uint8_t*, const float*, int64_t, int64_t,
                                     double, SegmentFilter, cudaStream_t, void*, SelectPath);
template void coverage_select<double>(unsigned long long*, uint8_t*, const double*, int64_t,
                                      int64_t, double, SegmentFilter, cudaStream_t, void*,
                                      SelectPath);

}  // namespace moeforge::cuda
