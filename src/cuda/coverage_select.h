// The coverage selection of the fast FlexPrefill search (steps 2 and 8 with ops::FlexSearch::kFp32)
// as a radix select instead of a sort: per segment of non-negative values, the largest entries
// whose cumulative sum stays within gamma of the segment's total.
//
// The rule (exact, the same on any device; tests/cuda/coverage_select_test.cpp states it on the
// host): each value is rounded to fp32 (v) and to 2^-52 fixed point (f = round(v 2^52), an integer,
// so sums are exact in any order). The entries ordered by v descending, equal v by the lower
// position, have the prefix sums S_t = f_0 + ... + f_t; with T = the segment's total and
// limit = T if gamma >= 1, else floor(gamma T), the selection is the entries t with S_t <= limit
// (a prefix of that order, as every f >= 0), and the count is their number.
//
// How: v's fp32 bits without the sign order as v (v >= 0; -0.0 as +0.0), so the first excluded
// entry's bits K are found 8 bits at a time, most significant first. Each of four passes builds per
// segment a histogram of the next 8 bits over the entries that share K's bits found so far (count
// and fixed-point sum per bucket: 32-bit shared-memory atomics per block, reduced per warp first
// where its values share few buckets, then global atomics per segment); the block that finishes
// a segment's histogram last walks its buckets from the top and keeps the one where the running
// sum passes the limit. After the fourth pass K is known, with the sum and number of the entries
// above it (a segment whose kept bucket holds a single entry is final earlier: that entry is the
// first excluded, so the later passes skip the segment); of the entries equal to K the first
// (limit - S_above) / f(K) by position are selected. Nothing is sorted or copied: 4 reads of the
// values (L2-resident at the search's sizes) instead of the 8-16 passes of a 64-bit radix sort
// with its copies.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace moeforge::cuda {

// Which segments a select runs: segment i reads flags[i / segments_per_flag] and runs where that
// flag is nonzero, or with run_on_zero where it is 0 (flags == nullptr: every segment runs). The
// search passes its per-head query-aware flags: step 8 runs the query-aware heads' segments, step
// 2 the two segments (vertical, slash) of each other head.
struct SegmentFilter {
  const int32_t* flags = nullptr;
  int64_t segments_per_flag = 1;
  bool run_on_zero = false;

  __host__ __device__ bool runs(int64_t segment) const {
    return flags == nullptr || (flags[segment / segments_per_flag] != 0) != run_on_zero;
  }
};

// How coverage_select runs: many_blocks, blocks of 4096 values with a launch per pass (the
// description above), for any size on any device; clusters, a cluster of blocks per segment, the
// keys in their shared memory, all passes in one launch (cuda/coverage_select_cluster.h), where the
// device has clusters and a segment fits (cluster_select_size: at most 16 blocks of 16384 values on
// an H200), else many blocks. automatic: clusters where a segment takes at most 4 blocks (one wave
// for the search's 32 heads; at 32K the clusters of 4 took its step-8 select from about 47 to 41
// us, while at 64K, clusters of 16 in two waves, the search took 0.93 ms against many blocks' 0.85;
// docs/benchmarks.md, session 27), else many blocks.
enum class SelectPath { automatic, many_blocks, clusters };

// The path coverage_select takes for segments of segment_size values on the current device when
// asked for `path` (many_blocks or clusters, never automatic).
SelectPath resolve_select_path(int64_t segment_size, SelectPath path);

// Selects in segments [num_segments, segment_size] of values (T = float or double; each >= 0,
// -0.0 counting as +0.0, and at most 2, each segment's sum below 2^12 so that its fixed-point total
// fits 64 bits, as probabilities and the search's triangles of nb <= 2048 rows are; others give an
// unspecified result):
//  - counts (nullptr: not written) [num_segments]: each segment's count;
//  - selected (nullptr: not written) [num_segments * segment_size]: 1 for a selected entry, else 0.
// Segments that the filter does not run are skipped and their outputs left as they were. 1 <=
// num_segments <= 65535, 1 <= segment_size <= 2^31 - 1 and segments_per_flag >= 1
// (moeforge::Error otherwise). Asynchronous on stream. Its temporary buffers (about 16 KB per
// segment and 4 bytes per 4096 values) are the workspace,
// coverage_select_workspace_bytes(num_segments, segment_size) bytes 16-byte aligned that the select
// overwrites (the caller's, e.g. allocated before a fork to a side stream, since
// the caching allocator is not stream-ordered: cuda/side_stream.h), or with workspace null its own
// from the caching allocator; the clusters path needs none.
template <typename T>
void coverage_select(unsigned long long* counts, uint8_t* selected, const T* values,
                     int64_t num_segments, int64_t segment_size, double gamma, SegmentFilter filter,
                     cudaStream_t stream, void* workspace, SelectPath path = SelectPath::automatic);

// Bytes of coverage_select's workspace for num_segments segments of segment_size values.
size_t coverage_select_workspace_bytes(int64_t num_segments, int64_t segment_size);

}  // namespace moeforge::cuda
