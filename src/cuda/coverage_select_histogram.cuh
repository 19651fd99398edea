// A block's shared-memory histogram of one digit of the coverage select (cuda/coverage_select.h),
// shared by its paths: per bucket the number of entries and their fixed-point sum, added by warps.
// Shared-memory atomics add 32 bits natively (64-bit ones are compare-and-swap loops), so a
// fixed-point value (<= 2^53, for values <= 2) is added as kParts parts of kPartBits bits; a block
// adds at most kMaxBlockValues entries, so that each part's sum stays below 2^32.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/coverage_select_rule.cuh"
#include "cuda/kernel_util.cuh"

namespace moeforge::cuda::coverage {

constexpr int kParts = 3;
constexpr int kPartBits = 18;
constexpr unsigned kPartMask = (1u << kPartBits) - 1;
constexpr int64_t kMaxBlockValues = int64_t{1} << (32 - kPartBits);
// A warp whose lanes fall in at most this many buckets adds each bucket by warp-wide reductions
// and one atomic per part (values cluster in few buckets in the first passes); else each lane adds
// its own value.
constexpr int kMaxReducedBuckets = 4;
constexpr unsigned kNoBucket = kBuckets;

static_assert(kParts * kPartBits >= 54, "kParts parts hold a fixed-point value <= 2^53");

struct BlockHistogram {
  unsigned count[kBuckets];
  unsigned part[kParts][kBuckets];
};

// Adds each lane's entry (bucket kNoBucket: none) of fixed-point value `fixed` to hist. Called by
// every lane of the warp.
__device__ __forceinline__ void add_to_histogram(BlockHistogram& hist, unsigned bucket,
                                                 unsigned long long fixed) {
  constexpr unsigned kFullMask = 0xffffffffu;
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  if (__ballot_sync(kFullMask, bucket != kNoBucket) == 0) return;
  const unsigned peers = __match_any_sync(kFullMask, bucket);
  const unsigned leaders =
      __ballot_sync(kFullMask, bucket != kNoBucket && lane == __ffs(peers) - 1);
  if (__popc(leaders) <= kMaxReducedBuckets) {
    for (unsigned rest = leaders; rest != 0; rest &= rest - 1) {  // warp-uniform
      const int src = __ffs(rest) - 1;
      // Every lane takes part in the shuffle (no short circuit before it).
      const bool mine = bucket == __shfl_sync(kFullMask, bucket, src);
      const unsigned members = __ballot_sync(kFullMask, mine);
      unsigned sums[kParts];
#pragma unroll
      for (int p = 0; p < kParts; ++p) {
        const unsigned part = static_cast<unsigned>(fixed >> (p * kPartBits)) & kPartMask;
        sums[p] = __reduce_add_sync(kFullMask, mine ? part : 0u);
      }
      if (lane == src) {
        atomicAdd(&hist.count[bucket], static_cast<unsigned>(__popc(members)));
#pragma unroll
        for (int p = 0; p < kParts; ++p) atomicAdd(&hist.part[p][bucket], sums[p]);
      }
    }
  } else if (bucket != kNoBucket) {
    atomicAdd(&hist.count[bucket], 1u);
#pragma unroll
    for (int p = 0; p < kParts; ++p) {
      atomicAdd(&hist.part[p][bucket], static_cast<unsigned>(fixed >> (p * kPartBits)) & kPartMask);
    }
  }
}

// The fixed-point sum of a bucket of hist.
__device__ __forceinline__ unsigned long long bucket_sum(const BlockHistogram& hist,
                                                         unsigned bucket) {
  unsigned long long sum = 0;
#pragma unroll
  for (int p = 0; p < kParts; ++p) {
    sum += static_cast<unsigned long long>(hist.part[p][bucket]) << (p * kPartBits);
  }
  return sum;
}

// Zeroes bucket `bucket` of hist.
__device__ __forceinline__ void clear_bucket(BlockHistogram& hist, unsigned bucket) {
  hist.count[bucket] = 0;
#pragma unroll
  for (int p = 0; p < kParts; ++p) hist.part[p][bucket] = 0;
}

}  // namespace moeforge::cuda::coverage
