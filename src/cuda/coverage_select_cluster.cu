// The clusters path of the coverage select (cuda/coverage_select_cluster.h): a cluster of blocks
// per segment, block `rank` holding the keys of positions [rank * slice, (rank + 1) * slice) in
// shared memory. Each pass, every block adds its slice to its own histogram (the one of the pass's
// parity), the cluster synchronises, and every block sums the cluster's histograms through
// distributed shared memory and makes the same pick; the other parity's histograms, which the
// previous pass's picks read before that barrier, are then cleared for the next pass, so one
// barrier a pass suffices. The marks follow from the final cut; a tie's equal entries are taken in
// position order, each block after the count of the lower ranks' equal entries.
#include "cuda/coverage_select_cluster.h"

#include <cooperative_groups.h>

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include <algorithm>
#include <cstdint>
#include <map>

#include "core/error.h"
#include "cuda/coverage_select_histogram.cuh"
#include "cuda/coverage_select_rule.cuh"
#include "cuda/cuda_check.h"
#include "cuda/kernel_util.cuh"

namespace moeforge::cuda {
namespace {

using namespace coverage;  // the rule and histograms shared by both paths

constexpr int kThreads = 512;
constexpr int kMaxClusterSize = 16;  // Hopper's largest (non-portable) cluster
constexpr int64_t kMaxSlice = kMaxBlockValues;

static_assert(kBuckets <= kThreads, "the pick gives each bucket a thread");

// What a block shares with its cluster.
struct Exchange {
  BlockHistogram hist[2];    // by the parity of the pass
  unsigned long long total;  // the fixed-point sum of the block's slice
  unsigned long long equal;  // the slice's entries equal to a tie's cut
};

// Cluster per segment (grid: cluster size x segments); dynamic shared memory holds the slice's
// keys.
template <typename T>
__global__ void __launch_bounds__(kThreads, 2)
    cluster_select_kernel(unsigned long long* counts, uint8_t* selected, const T* values,
                          int64_t segment_size, int64_t slice, double gamma, SegmentFilter filter) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  extern __shared__ uint32_t keys[];
  __shared__ Exchange ex;
  __shared__ Cut cut_s;
  __shared__ unsigned long long before_s;
  __shared__ union {
    typename cub::BlockReduce<unsigned long long, kThreads>::TempStorage reduce;
    typename cub::BlockScan<unsigned long long, kThreads>::TempStorage scan;
    typename cub::BlockScan<unsigned, kThreads>::TempStorage ties;
  } storage;
  const cg::cluster_group cluster = cg::this_cluster();
  const unsigned rank = cluster.block_rank();
  const unsigned blocks = cluster.num_blocks();
  const int64_t segment = blockIdx.x / blocks;
  if (!filter.runs(segment)) return;  // the whole cluster
  const int tid = static_cast<int>(threadIdx.x);
  const int64_t begin = min(segment_size, rank * slice);
  const int len = static_cast<int>(min(segment_size, begin + slice) - begin);
  const T* x = values + segment * segment_size + begin;

  unsigned long long own_sum = 0;
  for (int i = tid; i < len; i += kThreads) {
    const uint32_t key = key_of(x[i]);
    keys[i] = key;
    own_sum += fixed_of(key);
  }
  const unsigned long long block_total =
      cub::BlockReduce<unsigned long long, kThreads>(storage.reduce).Sum(own_sum);
  if (tid == 0) {
    ex.total = block_total;
    cut_s = Cut{0, 0, 0, 0, 0, 0, 0, 0};
  }
  if (tid < kBuckets) clear_bucket(ex.hist[0], static_cast<unsigned>(tid));
  __syncthreads();

  for (int pass = 0; pass < kPasses; ++pass) {
    const Cut cut = cut_s;  // the same in every block of the cluster
    if (cut.done != 0) break;
    const int shift = digit_shift(pass);
    for (int base = 0; base < len; base += kThreads) {  // the same trip count in every thread
      const int i = base + tid;
      unsigned bucket = kNoBucket;
      unsigned long long fixed = 0;
      if (i < len) {
        const uint32_t key = keys[i];
        if (in_cut_prefix(key, cut.key, pass)) {
          bucket = (key >> shift) & (kBuckets - 1);
          fixed = fixed_of(key);
        }
      }
      add_to_histogram(ex.hist[pass & 1], bucket, fixed);
    }
    cluster.sync();  // every block's histogram of this pass (and its total) is complete
    if (tid < kBuckets) clear_bucket(ex.hist[(pass + 1) & 1], static_cast<unsigned>(tid));

    Cut next = cut;
    if (pass == 0) {
      unsigned long long total = 0;
      for (unsigned r = 0; r < blocks; ++r) total += cluster.map_shared_rank(&ex, r)->total;
      next.limit = limit_of(total, gamma);
      if (total <= next.limit) {  // every entry fits (the only pass where no bucket can pass it)
        next.all = 1;
        next.done = 1;
      }
    }
    // The pick: thread t < kBuckets holds bucket kBuckets - 1 - t, so that the scans run from the
    // top; the bucket where the running sum passes the limit keeps the cut.
    const unsigned bucket = kBuckets - 1 - static_cast<unsigned>(tid);
    unsigned long long count = 0, sum = 0;
    if (tid < kBuckets) {
      for (unsigned r = 0; r < blocks; ++r) {
        const BlockHistogram& hist = cluster.map_shared_rank(&ex, r)->hist[pass & 1];
        count += hist.count[bucket];
        sum += bucket_sum(hist, bucket);
      }
    }
    unsigned long long sum_before = 0, count_before = 0;
    cub::BlockScan<unsigned long long, kThreads>(storage.scan).ExclusiveSum(sum, sum_before);
    __syncthreads();
    cub::BlockScan<unsigned long long, kThreads>(storage.scan).ExclusiveSum(count, count_before);
    const unsigned long long room = next.limit - next.sum_above;
    if (next.all != 0) {
      if (tid == 0) cut_s = next;
    } else if (tid < kBuckets && sum_before <= room && room < sum_before + sum) {
      take_bucket(next, bucket, pass, count, sum_before, count_before);
      cut_s = next;
    }
    __syncthreads();
  }
  cluster.sync();  // no block leaves while another reads its histograms

  const Cut cut = cut_s;
  if (rank == 0 && tid == 0 && counts != nullptr) {
    counts[segment] = cut.all != 0 ? static_cast<unsigned long long>(segment_size)
                                   : cut.count_above + cut.take_equal;
  }
  if (selected == nullptr) return;
  uint8_t* out = selected + segment * segment_size + begin;
  unsigned equal = 0;
  for (int i = tid; i < len; i += kThreads) {
    const uint32_t key = keys[i];
    equal += key == cut.key ? 1u : 0u;
    out[i] = marked(cut, key) ? 1 : 0;
  }
  if (!is_tie(cut)) return;  // the same in every block of the cluster
  const unsigned long long block_equal =
      cub::BlockReduce<unsigned long long, kThreads>(storage.reduce).Sum(equal);
  if (tid == 0) ex.equal = block_equal;
  cluster.sync();  // every block's count of equal entries is written
  if (tid == 0) {
    unsigned long long before = 0;
    for (unsigned r = 0; r < rank; ++r) before += cluster.map_shared_rank(&ex, r)->equal;
    before_s = before;
  }
  cluster.sync();  // before_s is written, and no block leaves while another reads its count
  mark_ties<kThreads>(
      out, len, before_s, cut, [](int64_t i) { return keys[i]; }, storage.ties);
#endif
}

cudaLaunchConfig_t launch_config(int cluster_size, int64_t num_segments, int64_t slice,
                                 cudaStream_t stream, cudaLaunchAttribute& attribute) {
  attribute = cudaLaunchAttribute{};
  attribute.id = cudaLaunchAttributeClusterDimension;
  attribute.val.clusterDim.x = static_cast<unsigned>(cluster_size);
  attribute.val.clusterDim.y = 1;
  attribute.val.clusterDim.z = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(static_cast<unsigned>(cluster_size * num_segments));
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = static_cast<size_t>(slice) * sizeof(uint32_t);
  config.stream = stream;
  config.attrs = &attribute;
  config.numAttrs = 1;
  return config;
}

// Sets the kernel's attributes for slices up to kMaxSlice and clusters up to kMaxClusterSize;
// returns whether a cluster of `cluster_size` such blocks fits the device.
template <typename T>
bool cluster_fits(int cluster_size) {
  const auto kernel = cluster_select_kernel<T>;
  MF_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                     static_cast<int>(kMaxSlice * sizeof(uint32_t))));
  MF_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
  cudaLaunchAttribute attribute{};
  const cudaLaunchConfig_t config = launch_config(cluster_size, 1, kMaxSlice, nullptr, attribute);
  int active = 0;
  if (cudaOccupancyMaxActiveClusters(&active, kernel, &config) != cudaSuccess) {
    (void)cudaGetLastError();  // a cluster size the device does not run
    return false;
  }
  return active >= 1;
}

// The largest cluster (a power of two) that both kernels run on the current device at the largest
// slice, 0 where there is none (devices before Hopper); found once per device and thread.
int largest_cluster() {
  thread_local std::map<int, int> largest;
  int device = 0;
  MF_CUDA_CHECK(cudaGetDevice(&device));
  const auto [it, inserted] = largest.try_emplace(device, 0);
  if (inserted) {
    int major = 0;
    MF_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    for (int size = kMaxClusterSize; major >= 9 && size >= 1 && it->second == 0; size /= 2) {
      if (cluster_fits<float>(size) && cluster_fits<double>(size)) it->second = size;
    }
  }
  return it->second;
}

}  // namespace

int cluster_select_size(int64_t segment_size) {
  const int largest = largest_cluster();
  if (largest == 0 || segment_size < 1) return 0;
  int size = 1;
  while (size < largest && ceil_div(segment_size, int64_t{size}) > kMaxSlice) size *= 2;
  return ceil_div(segment_size, int64_t{size}) <= kMaxSlice ? size : 0;
}

template <typename T>
void cluster_select(unsigned long long* counts, uint8_t* selected, const T* values,
                    int64_t num_segments, int64_t segment_size, double gamma, SegmentFilter filter,
                    cudaStream_t stream) {
  const int size = cluster_select_size(segment_size);
  MF_CHECK(size > 0,
           "coverage_select: the clusters path cannot run segments of {} values on this device "
           "(it needs clusters, compute capability 9.0 or later, and at most {} values a block)",
           segment_size, kMaxSlice);
  const int64_t slice = ceil_div(segment_size, int64_t{size});
  cudaLaunchAttribute attribute{};
  const cudaLaunchConfig_t config = launch_config(size, num_segments, slice, stream, attribute);
  MF_CUDA_CHECK(cudaLaunchKernelEx(&config, cluster_select_kernel<T>, counts, selected, values,
                                   segment_size, slice, gamma, filter));
}

template void cluster_select<float>(unsigned long long*, uint8_t*, const float*, int64_t, int64_t,
                                    double, SegmentFilter, cudaStream_t);
template void cluster_select<double>(unsigned long long*, uint8_t*, const double*, int64_t, int64_t,
                                     double, SegmentFilter, cudaStream_t);

}  // namespace moeforge::cuda
