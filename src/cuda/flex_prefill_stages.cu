// The shared stages of the GPU FlexPrefill pattern search (cuda/flex_prefill_stages.h), equal to
// the reference's doubles by construction:
//  - Products of doubles (abar's and step 8's logits, the query mean) use __dmul_rn / __dadd_rn so
//    that nvcc cannot contract them into fused multiply-adds.
//  - Long sums follow the reference's chunked order (kFlexPrefillSumChunk): chunk totals in
//    parallel, then their ascending sum; coverage prefixes as base(chunk) + in-chunk prefix. Block
//    means stay sequential, one thread each.
//  - The long sorts (N values, nb (nb + 1) / 2 block probabilities) are two stable CUB radix sorts
//    over all segments at once (cuda/flex_prefill_sort.h), the nb block scores a stable
//    cub::BlockRadixSort per segment; the sorted values are >= +0.0 or +inf, never -0.0 or NaN,
//    so the radix order is the reference's order.
//  - No sum here is -0.0 (each starts at +0.0; rounding to nearest gives -0.0 only for two -0.0
//    addends), so adding +0.0 changes none: padded terms of partial chunks and tiles are zeros,
//    and skipped JS terms are added as zeros.
//
// Kernels: block_probabilities' per head abar (Kbar staged through shared memory) and its softmax,
// decide_heads' JS decision; then finish_selection's, in order: per head and kind the budget, a
// block sort of the block scores (as many scores a thread as nb needs) and the column / diagonal
// fill of an [nb, nb] grid (a warp a column or diagonal); for query-aware heads the block means of
// Q, the block logits (tiled fp64), the row softmaxes (a warp a row, held in shared memory), the
// sort of the triangle and the gamma * nb walk (the fast search: the fixed-point radix select of
// cuda/coverage_select.h on the fp32 probabilities of cuda/flex_prefill_fp32.h, which its caller
// computed beside the passes, whose flags the CSR build reads beside the grid); finally the CSR in
// two kernels of a few blocks per head: the rows' counts (warp sums) with each block's total, then
// each head's base (the block totals before it), a block scan of its row counts and the column fill
// (warp ballots).
#include "cuda/flex_prefill_stages.h"

#include <cub/block/block_radix_sort.cuh>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "core/error.h"
#include "cuda/coverage_select.h"
#include "cuda/cuda_check.h"
#include "cuda/device_memory.h"
#include "cuda/flex_prefill_fp32.h"
#include "cuda/flex_prefill_sort.h"
#include "cuda/kernel_util.cuh"
#include "cuda/side_stream.h"

namespace moeforge::cuda::flex {
namespace {

constexpr int kThreads = 256;
constexpr unsigned kFullMask = 0xffffffffu;
// Tokens per budget block in step 2: hard-coded in the reference, independent of block_size.
constexpr int64_t kBudgetDivisor = 128;
constexpr int kChunk = static_cast<int>(ops::kFlexPrefillSumChunk);
// Chunk prefixes: warps per block (each warp takes 32 chunks); chunk totals per shared-memory tile
// of the base scan.
constexpr int kPrefixWarps = 4;
constexpr int kBaseTile = 1024;
// Steps 6-7: most scores per thread of the block radix sort (nb <= kThreads * kMaxSelectItems).
constexpr int kMaxSelectItems = 8;
// Step 8's row softmax keeps a row in shared memory: warps per block, and its bound in bytes.
constexpr int kSoftmaxWarps = 8;
constexpr int64_t kSoftmaxSharedBytes = 48 * 1024;
// Step 8 block logits: square tile and head_dim slice.
constexpr int kBlockTile = 64;
constexpr int kBlockDepth = 16;
// Step 4's logits: Kbar columns a thread block stages in shared memory at a time.
constexpr int kDotDepth = 32;
// The CSR: kCsrBlocksPerHead blocks of kCsrThreads threads per head (32 heads fill 128 of an
// H200's 132 SMs), a warp per row, which reads kCsrChunks chunks of kWarpSize key blocks of its
// row at once; each thread scans kCsrScanItems of the head's row counts.
constexpr int kCsrThreads = 1024;
constexpr int kCsrWarps = kCsrThreads / kWarpSize;
constexpr int kCsrBlocksPerHead = 4;
constexpr int kCsrChunks = 8;
constexpr int kCsrScanItems = static_cast<int>(kFlexPrefillMaxBlocks) / kCsrThreads;

static_assert(kChunk % 32 == 0, "chunk prefixes move 32 terms at a time");
static_assert(kFlexPrefillMaxBlocks <= 32 * kChunk, "a block-softmax row has at most 32 chunks");
static_assert(kFlexPrefillMaxBlocks <= kThreads * kMaxSelectItems,
              "one block sorts a head's scores");
static_assert(kFlexPrefillMaxBlocks * int64_t{sizeof(double)} <= kSoftmaxSharedBytes,
              "a block-softmax row fits the shared memory of one warp");
static_assert(kCsrScanItems * kCsrThreads == kFlexPrefillMaxBlocks,
              "one block scans a head's rows");
static_assert(kFlexPrefillMaxBlocks * (kFlexPrefillMaxBlocks + 1) / 2 <= INT32_MAX,
              "a head's CSR offsets fit int32_t");

__device__ __forceinline__ double to_double(bf16 x) {
  return static_cast<double>(__bfloat162float(x));
}

// means [num_heads, nb, D]: mean over each block's real rows of x[:, head, :], times factor
// (rows summed in ascending order, then multiplied by factor / length, as the reference). Heads
// whose flag in active is 0 are skipped (active == nullptr: every head).
__global__ void block_means_kernel(double* means, const bf16* x, int64_t seq_len, int64_t num_heads,
                                   int64_t head_dim, int64_t block_size, int64_t num_blocks,
                                   double factor, const int32_t* active) {
  const int64_t total = num_heads * num_blocks * head_dim;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t d = i % head_dim;
    const int64_t b = (i / head_dim) % num_blocks;
    const int64_t head = i / (head_dim * num_blocks);
    if (active != nullptr && active[head] == 0) continue;
    const int64_t end = min(seq_len, (b + 1) * block_size);
    double sum = 0.0;
#pragma unroll 8
    for (int64_t j = b * block_size; j < end; ++j) {
      sum = __dadd_rn(sum, to_double(x[(j * num_heads + head) * head_dim + d]));
    }
    const double length = static_cast<double>(end - b * block_size);
    means[i] = __dmul_rn(sum, factor / length);
  }
}

// q_mean [Hq, D]: sum over the last-block rows (ascending) of scale * q, divided by bs. Each
// thread loads kQueryRowsAhead rows before it adds them in order, so that the loads overlap (the
// kernel is latency-bound: one thread per (head, d), a few blocks of threads in all).
constexpr int kQueryRowsAhead = 32;
__global__ void last_query_mean_kernel(double* q_mean, const bf16* q, SearchShape s) {
  const int64_t row_stride = s.num_q_heads * s.head_dim;  // also the (head, d) count
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < row_stride;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const bf16* column = q + (s.seq_len - s.block_size) * row_stride + i;  // row r at r * stride
    double sum = 0.0;
    for (int64_t r0 = 0; r0 < s.block_size; r0 += kQueryRowsAhead) {
      bf16 rows[kQueryRowsAhead];
#pragma unroll
      for (int u = 0; u < kQueryRowsAhead; ++u) {
        if (r0 + u < s.block_size) rows[u] = column[(r0 + u) * row_stride];
      }
#pragma unroll
      for (int u = 0; u < kQueryRowsAhead; ++u) {
        if (r0 + u < s.block_size) sum = __dadd_rn(sum, __dmul_rn(s.scale, to_double(rows[u])));
      }
    }
    q_mean[i] = sum / static_cast<double>(s.block_size);
  }
}

// Coverage prefixes (steps 2 and 8) over segments [num_chunks / chunks_per_segment, segment_size]
// of sorted values: prefix (same layout) = the ascending sum of each value's chunk from the chunk's
// start through the value; totals [num_chunks] = each chunk's sum. A warp takes 32 chunks and
// moves them through shared memory 32 terms at a time, so that the loads and stores are coalesced
// while each lane adds its own chunk in order.
__global__ void __launch_bounds__(kPrefixWarps* kWarpSize)
    chunk_prefix_kernel(double* prefix, double* totals, const double* values, int64_t segment_size,
                        int64_t chunks_per_segment, int64_t num_chunks) {
  __shared__ double tile[kPrefixWarps][kWarpSize][kWarpSize + 1];
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int64_t first = (static_cast<int64_t>(blockIdx.x) * kPrefixWarps + warp) * kWarpSize;
  if (first >= num_chunks) return;
  double(*terms)[kWarpSize + 1] = tile[warp];
  // This lane's chunk: the flat offsets of its first value and of the end of its values.
  const int64_t chunk = first + lane;
  const int64_t segment = chunk / chunks_per_segment;
  const int64_t start = (chunk % chunks_per_segment) * kChunk;
  const int64_t my_begin = segment * segment_size + start;
  const int64_t my_end = segment * segment_size + min(segment_size, start + kChunk);
  double running = 0.0;
  for (int step = 0; step < kChunk; step += kWarpSize) {
    for (int i = 0; i < kWarpSize; ++i) {
      const int64_t at = __shfl_sync(kFullMask, my_begin, i) + step + lane;
      const int64_t end = __shfl_sync(kFullMask, my_end, i);
      terms[i][lane] = first + i < num_chunks && at < end ? values[at] : 0.0;
    }
    __syncwarp();
    for (int x = 0; x < kWarpSize; ++x) {
      running = __dadd_rn(running, terms[lane][x]);
      terms[lane][x] = running;
    }
    __syncwarp();
    for (int i = 0; i < kWarpSize; ++i) {
      const int64_t at = __shfl_sync(kFullMask, my_begin, i) + step + lane;
      const int64_t end = __shfl_sync(kFullMask, my_end, i);
      if (first + i < num_chunks && at < end) prefix[at] = terms[i][lane];
    }
    __syncwarp();
  }
  if (chunk < num_chunks) totals[chunk] = running;
}

// Block per segment: bases [num_segments, chunks_per_segment] = the ascending sum of the chunk
// totals before each chunk. The totals pass through shared memory kBaseTile at a time, where one
// thread adds them in order.
__global__ void __launch_bounds__(kThreads)
    chunk_base_kernel(double* bases, const double* totals, int64_t chunks_per_segment) {
  __shared__ double tile[kBaseTile];
  const double* segment_totals = totals + blockIdx.x * chunks_per_segment;
  double* segment_bases = bases + blockIdx.x * chunks_per_segment;
  double base = 0.0;  // thread 0's running sum
  for (int64_t c0 = 0; c0 < chunks_per_segment; c0 += kBaseTile) {
    const int count = static_cast<int>(min(int64_t{kBaseTile}, chunks_per_segment - c0));
    for (int i = static_cast<int>(threadIdx.x); i < count; i += kThreads) {
      tile[i] = segment_totals[c0 + i];
    }
    __syncthreads();
    if (threadIdx.x == 0) {
#pragma unroll 8
      for (int i = 0; i < count; ++i) {
        const double total = tile[i];
        tile[i] = base;
        base = __dadd_rn(base, total);
      }
    }
    __syncthreads();
    for (int i = static_cast<int>(threadIdx.x); i < count; i += kThreads) {
      segment_bases[c0 + i] = tile[i];
    }
    __syncthreads();
  }
}

// The chunked cumulative sum at position p of segment `segment`.
__device__ __forceinline__ double cumulative_at(const double* prefix, const double* bases,
                                                int64_t segment, int64_t p, int64_t segment_size,
                                                int64_t chunks_per_segment) {
  return __dadd_rn(bases[segment * chunks_per_segment + p / kChunk],
                   prefix[segment * segment_size + p]);
}

// Step 2: counts [segments] (zeroed by the caller) += the number of positions of each segment whose
// cumulative sum is <= limit. Block (position range, segment).
__global__ void coverage_count_kernel(unsigned long long* counts, const double* prefix,
                                      const double* bases, int64_t segment_size,
                                      int64_t chunks_per_segment, double limit) {
  __shared__ unsigned int warp_counts[kThreads / kWarpSize];
  const int64_t segment = blockIdx.y;
  unsigned int count = 0;
  for (int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; p < segment_size;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const double cumulative =
        cumulative_at(prefix, bases, segment, p, segment_size, chunks_per_segment);
    count += cumulative <= limit ? 1u : 0u;
  }
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    count += __shfl_xor_sync(kFullMask, count, offset);
  }
  if (threadIdx.x % kWarpSize == 0) warp_counts[threadIdx.x / kWarpSize] = count;
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned int total = 0;
    for (int w = 0; w < kThreads / kWarpSize; ++w) total += warp_counts[w];
    if (total > 0) atomicAdd(counts + segment, static_cast<unsigned long long>(total));
  }
}

// Step 4's logits of head h: abar[b] = q . Kbar[b] for each of the nb key blocks, each the sum over
// d ascending of dmul(q[d], Kbar[b, d]) as ops::dot_double (no fused multiply-adds). The block's
// threads take kThreads key blocks at a time, one each; their Kbar rows pass through `tile`
// (kThreads rows of kDotDepth + 1 doubles) kDotDepth columns at a time, loaded along the rows
// (coalesced; a thread's own row would be a strided load per lane) with the next slice's loads in
// flight while the current one is summed, and read without bank conflicts (the padding double). q
// (head_dim doubles) is in shared memory too.
__device__ void abar_logits(double* abar, double* tile, const double* q, const double* k_rows,
                            int64_t nb, int64_t head_dim) {
  const int tid = static_cast<int>(threadIdx.x);
  constexpr int kStride = kDotDepth + 1;
  constexpr int kLoads = kDotDepth;  // kThreads * kDotDepth values, kThreads threads
  const auto load_slice = [&](double(&slice)[kLoads], int64_t b0, int64_t d0) {
#pragma unroll
    for (int i = 0; i < kLoads; ++i) {
      const int e = tid + i * kThreads;
      const int64_t b = b0 + e / kDotDepth;
      const int64_t d = d0 + e % kDotDepth;
      slice[i] = b < nb && d < head_dim ? k_rows[b * head_dim + d] : 0.0;
    }
  };
  for (int64_t b0 = 0; b0 < nb; b0 += kThreads) {
    double next[kLoads];
    load_slice(next, b0, 0);
    double sum = 0.0;
    for (int64_t d0 = 0; d0 < head_dim; d0 += kDotDepth) {
      __syncthreads();  // the previous slice has been read
#pragma unroll
      for (int i = 0; i < kLoads; ++i) {
        const int e = tid + i * kThreads;
        tile[(e / kDotDepth) * kStride + e % kDotDepth] = next[i];
      }
      __syncthreads();
      if (d0 + kDotDepth < head_dim) load_slice(next, b0, d0 + kDotDepth);
      const int depth = static_cast<int>(min(int64_t{kDotDepth}, head_dim - d0));
      for (int c = 0; c < depth; ++c) {
        sum = __dadd_rn(sum, __dmul_rn(q[d0 + c], tile[tid * kStride + c]));
      }
    }
    if (b0 + tid < nb) abar[b0 + tid] = sum;
  }
}

// Dynamic shared memory of block_probabilities_kernel, in doubles (its layout there).
constexpr int64_t block_probabilities_shared_doubles(int64_t nb, int64_t head_dim) {
  return nb + int64_t{kThreads} * (kDotDepth + 1) + (nb + kChunk - 1) / kChunk +
         kThreads / kWarpSize + head_dim;
}
// 99 KB: the most shared memory a block may opt into on sm_86 and sm_89, the smallest among the
// devices the kernels are built for (sm_80 and later).
static_assert(block_probabilities_shared_doubles(kFlexPrefillMaxBlocks, kFlexPrefillMaxHeadDim) *
                      int64_t{sizeof(double)} <=
                  99 * 1024,
              "step 4's probabilities fit every device's shared memory at the largest shapes");

// Block per head: step 4's block probabilities p [Hq, nb] = the softmax over the key blocks of
// abar = q_mean . Kbar (chunked denominator), each p = exp(abar - max) / sum. Dynamic shared memory
// (block_probabilities_shared_doubles): abar [nb], abar_logits' tile, chunk totals
// [ceil(nb / kChunk)], reduction scratch [kThreads / 32], q_mean [D].
__global__ void __launch_bounds__(kThreads)
    block_probabilities_kernel(double* probabilities, const double* q_mean, const double* k_means,
                               SearchShape s) {
  extern __shared__ double shared[];
  const int64_t h = blockIdx.x;
  const int64_t nb = s.num_blocks;
  const int64_t num_chunks = (nb + kChunk - 1) / kChunk;
  double* abar = shared;
  double* tile = abar + nb;
  double* chunk_totals = tile + int64_t{kThreads} * (kDotDepth + 1);
  double* scratch = chunk_totals + num_chunks;
  double* q = scratch + kThreads / kWarpSize;
  const int tid = static_cast<int>(threadIdx.x);

  for (int64_t d = tid; d < s.head_dim; d += kThreads) q[d] = q_mean[h * s.head_dim + d];
  abar_logits(abar, tile, q, k_means + (h / s.group_size) * nb * s.head_dim, nb, s.head_dim);
  __syncthreads();
  double local_max = -INFINITY;
  for (int64_t b = tid; b < nb; b += kThreads) local_max = fmax(local_max, abar[b]);
  local_max = warp_max(local_max);
  if (tid % kWarpSize == 0) scratch[tid / kWarpSize] = local_max;
  __syncthreads();
  double max_logit = -INFINITY;
  for (int w = 0; w < kThreads / kWarpSize; ++w) max_logit = fmax(max_logit, scratch[w]);
  for (int64_t b = tid; b < nb; b += kThreads) abar[b] = exp(__dsub_rn(abar[b], max_logit));
  __syncthreads();
  for (int64_t c = tid; c < num_chunks; c += kThreads) {
    double total = 0.0;
    for (int64_t b = c * kChunk; b < min(nb, (c + 1) * kChunk); ++b) {
      total = __dadd_rn(total, abar[b]);
    }
    chunk_totals[c] = total;
  }
  __syncthreads();
  double sum = 0.0;
  for (int64_t c = 0; c < num_chunks; ++c) sum = __dadd_rn(sum, chunk_totals[c]);
  for (int64_t b = tid; b < nb; b += kThreads) probabilities[h * nb + b] = abar[b] / sum;
}

// Block per head: steps 4 (the JS decision) and 5. pooled [Hq, 2, nb] holds vertical_blk /
// slash_blk and gets the always-kept blocks set to +inf; probabilities [Hq, nb] as
// block_probabilities_kernel leaves them. Dynamic shared memory: the JS terms [2 nb].
__global__ void __launch_bounds__(kThreads)
    head_decision_kernel(double* pooled, int32_t* query_aware, double* js_distance,
                         const double* probabilities, SearchShape s, double tau) {
  extern __shared__ double terms[];
  const int64_t h = blockIdx.x;
  const int64_t nb = s.num_blocks;
  const double* v_blk = pooled + (h * 2) * nb;
  // The JS terms of each block (p's, then vertical_blk's; 0 where the reference skips a term,
  // which leaves the sum unchanged), added in order by thread 0.
  for (int64_t b = threadIdx.x; b < nb; b += kThreads) {
    const double p = probabilities[h * nb + b];
    const double q_b = v_blk[b];
    const double m = 0.5 * __dadd_rn(p, q_b);
    terms[2 * b] = p > 0.0 ? __dmul_rn(__dmul_rn(0.5, p), log(p / m)) : 0.0;
    terms[2 * b + 1] = q_b > 0.0 ? __dmul_rn(__dmul_rn(0.5, q_b), log(q_b / m)) : 0.0;
  }
  __syncthreads();
  if (threadIdx.x != 0) return;
  double js = 0.0;
  for (int64_t i = 0; i < 2 * nb; ++i) js = __dadd_rn(js, terms[i]);
  const double distance = sqrt(fmax(js, 0.0));
  query_aware[h] = distance < tau ? 1 : 0;
  js_distance[h] = distance;
  // Step 5: the first key block and the main diagonal are always kept.
  pooled[(h * 2) * nb] = INFINITY;
  pooled[(h * 2 + 1) * nb + nb - 1] = INFINITY;
}

// Step 2's budget of a kind (vertical or slash) of a head that is not query-aware, in blocks: with
// c = 1 + the coverage count, c / 128 + 1 clamped to [min_blocks, max_blocks].
__device__ int64_t budget_blocks(unsigned long long count, const SearchShape& s) {
  const int64_t c = static_cast<int64_t>(count) + 1;
  return min(max(c / kBudgetDivisor + 1, s.min_blocks), s.max_blocks);
}

// Steps 2 (the budgets) and 6-7, block (kind, head): the kind's budget (min_blocks for query-aware
// heads, else budget_blocks) goes to num_vertical / num_slash; kind 0 sorts vertical_blk and fills
// the top num_vertical key block columns, kind 1 sorts slash_blk and fills the top num_slash
// diagonals of grid [Hq, nb, nb] (zeroed; both kinds only write ones). A stable block radix sort of
// kItems scores a thread (nb <= kThreads * kItems), descending: equal scores keep their ascending
// indices; the padding (-1.0) sorts after every score (>= 0 or +inf). The chosen indices go
// through shared memory, so that each warp fills whole columns or diagonals with its lanes along
// the rows.
template <int kItems>
__global__ void __launch_bounds__(kThreads)
    select_blocks_kernel(uint8_t* grid, const double* pooled, int64_t* num_vertical,
                         int64_t* num_slash, const unsigned long long* coverage_counts,
                         const int32_t* query_aware, SearchShape s) {
  using BlockSort = cub::BlockRadixSort<double, kThreads, kItems, int32_t>;
  __shared__ typename BlockSort::TempStorage sort_storage;
  __shared__ int32_t chosen[kThreads * kItems];
  const int tid = static_cast<int>(threadIdx.x);
  const int kind = static_cast<int>(blockIdx.x);
  const int64_t h = blockIdx.y;
  const int64_t nb = s.num_blocks;
  const double* scores = pooled + (h * 2 + kind) * nb;
  double keys[kItems];
  int32_t index[kItems];
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    index[i] = tid * kItems + i;
    keys[i] = index[i] < nb ? scores[index[i]] : -1.0;
  }
  BlockSort(sort_storage).SortDescending(keys, index);
  // Query-aware heads' coverage counts are not computed (fp32_coverage_counts) and not read.
  const int64_t count =
      query_aware[h] != 0 ? s.min_blocks : budget_blocks(coverage_counts[h * 2 + kind], s);
  if (tid == 0) (kind == 0 ? num_vertical : num_slash)[h] = count;
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    if (tid * kItems + i < count) chosen[tid * kItems + i] = index[i];
  }
  __syncthreads();
  uint8_t* g = grid + h * nb * nb;
  const int lane = tid % kWarpSize;
  for (int64_t rank = tid / kWarpSize; rank < count; rank += kThreads / kWarpSize) {
    const int64_t x = chosen[rank];
    if (kind == 0) {
      for (int64_t r = x + lane; r < nb; r += kWarpSize) g[r * nb + x] = 1;
    } else {
      const int64_t offset = nb - 1 - x;
      for (int64_t r = offset + lane; r < nb; r += kWarpSize) g[r * nb + r - offset] = 1;
    }
  }
}

// Step 8, query-aware heads: tri [Hq, nb (nb + 1) / 2] gets Qbar[r] . Kbar[c] for c <= r at the
// triangle position r (r + 1) / 2 + c (row-major, so positions order as the reference's flat
// indices r * nb + c). Block (column tile, row tile, head) of kBlockTile x kBlockTile entries, 256
// threads with 4 x 4 entries each (rows ty + 16 i, columns tx + 16 j); fp64 products without fused
// multiply-adds, d ascending.
__global__ void __launch_bounds__(kThreads)
    block_logits_kernel(double* tri, const double* q_means, const double* k_means,
                        const int32_t* query_aware, SearchShape s) {
  __shared__ double q_tile[kBlockDepth][kBlockTile + 1];
  __shared__ double k_tile[kBlockDepth][kBlockTile + 1];
  const int64_t h = blockIdx.z;
  const int64_t nb = s.num_blocks;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * kBlockTile;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * kBlockTile;
  if (query_aware[h] == 0 || c0 > r0 + kBlockTile - 1) return;
  const int tid = static_cast<int>(threadIdx.x);
  const int tx = tid % 16;
  const int ty = tid / 16;
  const double* q_head = q_means + h * nb * s.head_dim;
  const double* k_head = k_means + (h / s.group_size) * nb * s.head_dim;
  double acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.0;
  }
  for (int64_t d0 = 0; d0 < s.head_dim; d0 += kBlockDepth) {
    for (int e = tid; e < kBlockTile * kBlockDepth; e += kThreads) {
      const int dd = e % kBlockDepth;
      const int x = e / kBlockDepth;
      const int64_t d = d0 + dd;
      const bool in_dim = d < s.head_dim;
      q_tile[dd][x] = in_dim && r0 + x < nb ? q_head[(r0 + x) * s.head_dim + d] : 0.0;
      k_tile[dd][x] = in_dim && c0 + x < nb ? k_head[(c0 + x) * s.head_dim + d] : 0.0;
    }
    __syncthreads();
#pragma unroll
    for (int dd = 0; dd < kBlockDepth; ++dd) {
      double a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        a[i] = q_tile[dd][ty + 16 * i];
        b[i] = k_tile[dd][tx + 16 * i];
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = __dadd_rn(acc[i][j], __dmul_rn(a[i], b[j]));
      }
    }
    __syncthreads();
  }
  double* head_tri = tri + h * (nb * (nb + 1) / 2);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t r = r0 + ty + 16 * i;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t c = c0 + tx + 16 * j;
      if (r < nb && c <= r) head_tri[r * (r + 1) / 2 + c] = acc[i][j];
    }
  }
}

// Step 8: a warp per (head, row r) of tri: the causal row softmax in place (max, exp, the chunked
// denominator with one lane per chunk). The warp holds the row's exponentials in its nb doubles of
// dynamic shared memory, so that each lane's serial chunk sum reads shared memory, not global.
// Rows of heads that are not query-aware become zeros, so that the sort that follows reads defined
// values.
__global__ void block_softmax_kernel(double* tri, const int32_t* query_aware, int64_t num_heads,
                                     int64_t nb) {
  extern __shared__ double softmax_rows[];  // [warps of the block, nb]
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int warps_per_block = static_cast<int>(blockDim.x) / kWarpSize;
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  double* exps = softmax_rows + warp * nb;
  const int64_t num_rows = num_heads * nb;
  const int64_t warps_per_grid = static_cast<int64_t>(gridDim.x) * warps_per_block;
  for (int64_t w = static_cast<int64_t>(blockIdx.x) * warps_per_block + warp; w < num_rows;
       w += warps_per_grid) {
    const int64_t h = w / nb;
    const int64_t r = w % nb;
    const int64_t len = r + 1;
    double* row = tri + h * (nb * (nb + 1) / 2) + r * (r + 1) / 2;
    if (query_aware[h] == 0) {
      for (int64_t c = lane; c < len; c += kWarpSize) row[c] = 0.0;
      continue;
    }
    double max_logit = -INFINITY;
    for (int64_t c = lane; c < len; c += kWarpSize) {
      const double logit = row[c];
      exps[c] = logit;
      max_logit = fmax(max_logit, logit);
    }
    max_logit = warp_max(max_logit);
    for (int64_t c = lane; c < len; c += kWarpSize) exps[c] = exp(__dsub_rn(exps[c], max_logit));
    __syncwarp();
    const int64_t num_chunks = (len + kChunk - 1) / kChunk;
    double total = 0.0;
    if (lane < num_chunks) {
#pragma unroll 16
      for (int64_t c = lane * int64_t{kChunk}; c < min(len, (lane + 1) * int64_t{kChunk}); ++c) {
        total = __dadd_rn(total, exps[c]);
      }
    }
    double sum = 0.0;
    for (int c = 0; c < num_chunks; ++c) sum = __dadd_rn(sum, __shfl_sync(kFullMask, total, c));
    for (int64_t c = lane; c < len; c += kWarpSize) row[c] = exps[c] / sum;
    __syncwarp();  // the next row's loads overwrite exps
  }
}

// Step 8 walk: block (position range, head); the sorted triangle entries of query-aware heads whose
// cumulative sum is <= limit (gamma * nb; a prefix of the sorted order) join the grid.
__global__ void coverage_mark_kernel(uint8_t* grid, const uint32_t* order, int position_bits,
                                     const double* prefix, const double* bases,
                                     const int32_t* query_aware, int64_t num_entries,
                                     int64_t chunks_per_segment, int64_t nb, double limit) {
  const int64_t h = blockIdx.y;
  if (query_aware[h] == 0) return;
  const uint32_t position_mask = (1u << position_bits) - 1u;
  for (int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; p < num_entries;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (cumulative_at(prefix, bases, h, p, num_entries, chunks_per_segment) > limit) continue;
    const int64_t position = order[h * num_entries + p] & position_mask;
    const int64_t r = triangle_row(position);
    const int64_t c = position - r * (r + 1) / 2;
    grid[(h * nb + r) * nb + c] = 1;
  }
}

// What a CSR is built from: the grid [Hq, nb, nb] of steps 6-8 (null: every causal block, the
// dense fallback) and, in the fast search, step 8's flags of the query-aware heads at the triangle
// positions r (r + 1) / 2 + c [Hq, nb (nb + 1) / 2] (null: none).
struct CsrSource {
  const uint8_t* grid;
  const uint8_t* tri_selected;
  const int32_t* query_aware;
};

// The selected key blocks c <= r of the rows r of head h of a CsrSource.
struct HeadFlags {
  const uint8_t* grid;  // [nb, nb] of head h; null: every block
  const uint8_t* tri;   // [nb (nb + 1) / 2] of head h; null: none
  int nb;

  __device__ HeadFlags(const CsrSource& src, int h, int nb) : nb(nb) {
    grid = src.grid == nullptr ? nullptr : src.grid + int64_t{h} * nb * nb;
    tri = src.tri_selected != nullptr && src.query_aware[h] != 0
              ? src.tri_selected + int64_t{h} * (nb * (nb + 1) / 2)
              : nullptr;
  }
  // selected[j]: whether block c = c0 + j * kWarpSize + lane of row r is (false for c > r). Every
  // flag is read unconditionally (at column min(c, r)) before any is tested, so that the reads
  // overlap.
  __device__ void read(bool (&selected)[kCsrChunks], int r, int c0, int lane) const {
#pragma unroll
    for (int j = 0; j < kCsrChunks; ++j) {
      const int c = c0 + j * kWarpSize + lane;
      const int at = min(c, r);
      const int flag = (grid == nullptr ? 1 : grid[r * nb + at]) |
                       (tri == nullptr ? 0 : tri[r * (r + 1) / 2 + at]);
      selected[j] = (c <= r) & (flag != 0);
    }
  }
};

// Blocks (h, part) of [Hq * kCsrBlocksPerHead]: counts [Hq, nb] of the rows r of head h that
// the block's warps take (r = part * kCsrWarps + warp + i * kCsrBlocksPerHead * kCsrWarps), each
// the selected blocks of the row (a warp sum), and block_totals[blockIdx.x] = their sum.
__global__ void __launch_bounds__(kCsrThreads, 1)
    csr_count_kernel(int32_t* counts, int32_t* block_totals, CsrSource src, int nb) {
  using BlockReduce = cub::BlockReduce<int32_t, kCsrThreads>;
  __shared__ typename BlockReduce::TempStorage reduce_storage;
  const int h = static_cast<int>(blockIdx.x) / kCsrBlocksPerHead;
  const int part = static_cast<int>(blockIdx.x) % kCsrBlocksPerHead;
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const HeadFlags flags(src, h, nb);
  int32_t warp_total = 0;
  for (int r = part * kCsrWarps + warp; r < nb; r += kCsrBlocksPerHead * kCsrWarps) {
    int32_t count = 0;  // this lane's
    for (int c0 = 0; c0 <= r; c0 += kCsrChunks * kWarpSize) {
      bool selected[kCsrChunks];
      flags.read(selected, r, c0, lane);
#pragma unroll
      for (int j = 0; j < kCsrChunks; ++j) count += selected[j];
    }
    count = __reduce_add_sync(kFullMask, count);
    if (lane == 0) counts[int64_t{h} * nb + r] = count;
    warp_total += count;
  }
  const int32_t total = BlockReduce(reduce_storage).Sum(lane == 0 ? warp_total : 0);
  if (threadIdx.x == 0) block_totals[blockIdx.x] = total;
}

// Blocks (h, part) as csr_count_kernel's: base = the selected blocks of the heads before h (the
// block totals before the head's, a block reduction) and the head-local offsets of its rows (a
// block scan of the head's counts); then a warp per row of the block writes the row's selected
// blocks in ascending order (ballots give each lane its slot) from col_idx[base + offset] on and
// row_offsets[h * nb + r] = base + offset. The head's first block also writes num_selected [Hq],
// the head's total, and the last head's row_offsets[Hq * nb], the total of all.
__global__ void __launch_bounds__(kCsrThreads, 1)
    csr_fill_kernel(int64_t* row_offsets, int32_t* col_idx, int64_t* num_selected,
                    const int32_t* counts, const int32_t* block_totals, CsrSource src, int nb) {
  using BlockReduce = cub::BlockReduce<int64_t, kCsrThreads>;
  using BlockScan = cub::BlockScan<int32_t, kCsrThreads, cub::BLOCK_SCAN_WARP_SCANS>;
  __shared__ typename BlockReduce::TempStorage reduce_storage;
  __shared__ typename BlockScan::TempStorage scan_storage;
  __shared__ int32_t local_offsets[kFlexPrefillMaxBlocks];
  __shared__ int64_t base_shared;
  const int num_heads = static_cast<int>(gridDim.x) / kCsrBlocksPerHead;
  const int h = static_cast<int>(blockIdx.x) / kCsrBlocksPerHead;
  const int part = static_cast<int>(blockIdx.x) % kCsrBlocksPerHead;
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const HeadFlags flags(src, h, nb);
  int64_t before = 0;
  for (int i = static_cast<int>(threadIdx.x); i < h * kCsrBlocksPerHead; i += kCsrThreads) {
    before += block_totals[i];
  }
  int32_t items[kCsrScanItems];  // rows threadIdx.x * kCsrScanItems + j, zero past nb
#pragma unroll
  for (int j = 0; j < kCsrScanItems; ++j) {
    const int r = static_cast<int>(threadIdx.x) * kCsrScanItems + j;
    items[j] = r < nb ? counts[int64_t{h} * nb + r] : 0;
  }
  before = BlockReduce(reduce_storage).Sum(before);
  if (threadIdx.x == 0) base_shared = before;
  int32_t total;
  BlockScan(scan_storage).ExclusiveSum(items, items, total);
#pragma unroll
  for (int j = 0; j < kCsrScanItems; ++j) {
    const int r = static_cast<int>(threadIdx.x) * kCsrScanItems + j;
    if (r < nb) local_offsets[r] = items[j];
  }
  __syncthreads();
  const int64_t base = base_shared;
  if (part == 0 && threadIdx.x == 0) {
    num_selected[h] = total;
    if (h == num_heads - 1) row_offsets[int64_t{num_heads} * nb] = base + total;
  }

  const unsigned lanes_below = (1u << lane) - 1u;
  for (int r = part * kCsrWarps + warp; r < nb; r += kCsrBlocksPerHead * kCsrWarps) {
    const int64_t begin = base + local_offsets[r];
    int64_t out = begin;
    for (int c0 = 0; c0 <= r; c0 += kCsrChunks * kWarpSize) {
      bool selected[kCsrChunks];
      flags.read(selected, r, c0, lane);
#pragma unroll
      for (int j = 0; j < kCsrChunks; ++j) {
        if (c0 + j * kWarpSize > r) break;  // warp-uniform: the chunks past the diagonal
        const unsigned mask = __ballot_sync(kFullMask, selected[j]);
        if (selected[j]) col_idx[out + __popc(mask & lanes_below)] = c0 + j * kWarpSize + lane;
        out += __popc(mask);
      }
    }
    if (lane == 0) row_offsets[int64_t{h} * nb + r] = begin;
  }
}

// Statistics of the dense fallback: no pattern, every causal block.
__global__ void dense_stats_kernel(int32_t* query_aware, double* js_distance, int64_t* num_vertical,
                                   int64_t* num_slash, int64_t num_heads) {
  const int64_t h = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (h >= num_heads) return;
  query_aware[h] = 0;
  js_distance[h] = NAN;
  num_vertical[h] = 0;
  num_slash[h] = 0;
}

// Step 8's row softmax of tri: as many warps a block (up to kSoftmaxWarps) as keep their rows in
// kSoftmaxSharedBytes.
void block_softmax(double* tri, const int32_t* query_aware, int64_t num_heads, int64_t nb,
                   cudaStream_t stream) {
  const int64_t row_bytes = nb * static_cast<int64_t>(sizeof(double));
  const int warps =
      static_cast<int>(std::clamp<int64_t>(kSoftmaxSharedBytes / row_bytes, 1, kSoftmaxWarps));
  block_softmax_kernel<<<grid_for(num_heads * nb, warps), warps * kWarpSize,
                         static_cast<size_t>(warps * row_bytes), stream>>>(tri, query_aware,
                                                                           num_heads, nb);
  MF_CUDA_CHECK_LAUNCH();
}

// Steps 2 (the budgets) and 6-7 into grid (zeroed) with the sort's items a thread sized to nb.
void select_blocks(uint8_t* grid, const double* pooled, const unsigned long long* coverage_counts,
                   FlexPrefillDeviceSelection& out, const SearchShape& s, cudaStream_t stream) {
  const int64_t nb = s.num_blocks;
  const dim3 blocks(2, static_cast<unsigned>(s.num_q_heads));
  const auto launch = [&](auto kernel) {
    kernel<<<blocks, kThreads, 0, stream>>>(grid, pooled, out.num_vertical_blocks.data(),
                                            out.num_slash_blocks.data(), coverage_counts,
                                            out.query_aware.data(), s);
    MF_CUDA_CHECK_LAUNCH();
  };
  if (nb <= kThreads) {
    launch(select_blocks_kernel<1>);
  } else if (nb <= 2 * kThreads) {
    launch(select_blocks_kernel<2>);
  } else if (nb <= 4 * kThreads) {
    launch(select_blocks_kernel<4>);
  } else {
    launch(select_blocks_kernel<kMaxSelectItems>);
  }
}

// out's CSR and each head's total from src: kCsrBlocksPerHead blocks per head count its rows, then
// as many add the totals before the head, scan its counts and fill its columns.
void build_csr(FlexPrefillDeviceSelection& out, const CsrSource& src, cudaStream_t stream) {
  const auto nb = static_cast<int>(out.num_blocks);
  const auto blocks = static_cast<unsigned>(out.num_heads * kCsrBlocksPerHead);
  DeviceBuffer<int32_t> counts(static_cast<size_t>(out.num_heads * nb));  // [Hq, nb]
  DeviceBuffer<int32_t> block_totals(blocks);
  csr_count_kernel<<<blocks, kCsrThreads, 0, stream>>>(counts.data(), block_totals.data(), src, nb);
  MF_CUDA_CHECK_LAUNCH();
  csr_fill_kernel<<<blocks, kCsrThreads, 0, stream>>>(out.row_offsets.data(), out.col_idx.data(),
                                                      out.num_selected_blocks.data(), counts.data(),
                                                      block_totals.data(), src, nb);
  MF_CUDA_CHECK_LAUNCH();
}

// Chunk prefixes and bases (prefix, bases) of sorted segments [num_segments, segment_size].
struct CoveragePrefix {
  int64_t chunks_per_segment = 0;
  DeviceBuffer<double> prefix;  // [num_segments * segment_size]
  DeviceBuffer<double> bases;   // [num_segments * chunks_per_segment]
};

void coverage_prefix(CoveragePrefix& out, const double* sorted, int64_t num_segments,
                     int64_t segment_size, cudaStream_t stream) {
  out.chunks_per_segment = ceil_div(segment_size, kChunk);
  const int64_t num_chunks = num_segments * out.chunks_per_segment;
  out.prefix.resize(static_cast<size_t>(num_segments * segment_size));
  out.bases.resize(static_cast<size_t>(num_chunks));
  DeviceBuffer<double> totals(static_cast<size_t>(num_chunks));
  const int64_t chunks_per_block = int64_t{kPrefixWarps} * kWarpSize;
  chunk_prefix_kernel<<<static_cast<unsigned>(ceil_div(num_chunks, chunks_per_block)),
                        kPrefixWarps * kWarpSize, 0, stream>>>(
      out.prefix.data(), totals.data(), sorted, segment_size, out.chunks_per_segment, num_chunks);
  MF_CUDA_CHECK_LAUNCH();
  chunk_base_kernel<<<static_cast<unsigned>(num_segments), kThreads, 0, stream>>>(
      out.bases.data(), totals.data(), out.chunks_per_segment);
  MF_CUDA_CHECK_LAUNCH();
}

// Blocks per segment for a grid-stride loop over segment_size positions.
unsigned blocks_per_segment(int64_t segment_size) {
  return static_cast<unsigned>(std::min<int64_t>(ceil_div(segment_size, kThreads), 256));
}

}  // namespace

SearchShape search_shape(const ops::SparseAttentionDims& dims, const ops::FlexPrefillParams& params,
                         const char* who) {
  ops::check_sparse_attention_dims(dims, who);
  ops::check_flex_prefill_params(params);
  MF_CHECK(dims.seq_len >= 1, "{}: seq_len must be >= 1, got {}", who, dims.seq_len);
  MF_CHECK(dims.head_dim <= kFlexPrefillMaxHeadDim, "{}: head_dim must be in [1, {}], got {}", who,
           kFlexPrefillMaxHeadDim, dims.head_dim);
  MF_CHECK(dims.num_q_heads <= kFlexPrefillMaxHeads, "{}: num_q_heads must be <= {}, got {}", who,
           kFlexPrefillMaxHeads, dims.num_q_heads);
  const int64_t n = dims.seq_len;
  const int64_t bs = params.block_size;
  const int64_t nb = ceil_div(n, bs);
  MF_CHECK(nb <= kFlexPrefillMaxBlocks,
           "{}: seq_len {} makes {} blocks of {}, more than the {} supported", who, n, nb, bs,
           kFlexPrefillMaxBlocks);
  return SearchShape{n,
                     dims.num_q_heads,
                     dims.num_kv_heads,
                     dims.head_dim,
                     bs,
                     nb,
                     dims.num_q_heads / dims.num_kv_heads,
                     ceil_div(params.min_budget, bs),
                     params.max_budget > 0 ? std::min(ceil_div(params.max_budget, bs), nb) : nb,
                     1.0 / std::sqrt(static_cast<double>(dims.head_dim))};
}

bool begin_selection(FlexPrefillDeviceSelection& out, const SearchShape& s, cudaStream_t stream) {
  const int64_t num_heads = s.num_q_heads;
  const int64_t nb = s.num_blocks;
  out.num_heads = num_heads;
  out.num_blocks = nb;
  out.block_size = s.block_size;
  out.dense_fallback = s.seq_len <= std::max(2 * s.block_size, s.min_blocks * s.block_size);
  out.row_offsets.resize(static_cast<size_t>(num_heads * nb + 1));
  out.col_idx.resize(static_cast<size_t>(num_heads * nb * (nb + 1) / 2));
  out.query_aware.resize(static_cast<size_t>(num_heads));
  out.js_distance.resize(static_cast<size_t>(num_heads));
  out.num_vertical_blocks.resize(static_cast<size_t>(num_heads));
  out.num_slash_blocks.resize(static_cast<size_t>(num_heads));
  out.num_selected_blocks.resize(static_cast<size_t>(num_heads));
  if (out.dense_fallback) {
    dense_stats_kernel<<<grid_for(num_heads, kThreads), kThreads, 0, stream>>>(
        out.query_aware.data(), out.js_distance.data(), out.num_vertical_blocks.data(),
        out.num_slash_blocks.data(), num_heads);
    MF_CUDA_CHECK_LAUNCH();
    build_csr(out, CsrSource{nullptr, nullptr, nullptr}, stream);
  }
  return out.dense_fallback;
}

void block_means(double* means, const bf16* x, int64_t num_heads, double factor,
                 const int32_t* active, const SearchShape& s, cudaStream_t stream) {
  const int64_t total = num_heads * s.num_blocks * s.head_dim;
  block_means_kernel<<<grid_for(total, kThreads), kThreads, 0, stream>>>(
      means, x, s.seq_len, num_heads, s.head_dim, s.block_size, s.num_blocks, factor, active);
  MF_CUDA_CHECK_LAUNCH();
}

void last_query_mean(double* q_mean, const bf16* q, const SearchShape& s, cudaStream_t stream) {
  last_query_mean_kernel<<<grid_for(s.num_q_heads * s.head_dim, kThreads), kThreads, 0, stream>>>(
      q_mean, q, s);
  MF_CUDA_CHECK_LAUNCH();
}

void chunked_coverage_counts(unsigned long long* counts, const double* values, int64_t num_segments,
                             int64_t segment_size, double limit, cudaStream_t stream) {
  MF_CUDA_CHECK(
      cudaMemsetAsync(counts, 0, static_cast<size_t>(num_segments) * sizeof(*counts), stream));
  SortedSegments sorted;
  sort_segments_descending(sorted, values, num_segments, segment_size, stream);
  CoveragePrefix cover;
  coverage_prefix(cover, sorted.values.data(), num_segments, segment_size, stream);
  coverage_count_kernel<<<dim3(blocks_per_segment(segment_size),
                               static_cast<unsigned>(num_segments)),
                          kThreads, 0, stream>>>(counts, cover.prefix.data(), cover.bases.data(),
                                                 segment_size, cover.chunks_per_segment, limit);
  MF_CUDA_CHECK_LAUNCH();
}

void block_probabilities(double* probabilities, const double* k_means, const double* q_mean,
                         const SearchShape& s, cudaStream_t stream) {
  const size_t shared =
      static_cast<size_t>(block_probabilities_shared_doubles(s.num_blocks, s.head_dim)) *
      sizeof(double);
  MF_CUDA_CHECK(cudaFuncSetAttribute(block_probabilities_kernel,
                                     cudaFuncAttributeMaxDynamicSharedMemorySize,
                                     static_cast<int>(shared)));
  block_probabilities_kernel<<<static_cast<unsigned>(s.num_q_heads), kThreads, shared, stream>>>(
      probabilities, q_mean, k_means, s);
  MF_CUDA_CHECK_LAUNCH();
}

void decide_heads(FlexPrefillDeviceSelection& out, double* pooled, const double* probabilities,
                  const SearchShape& s, double tau, cudaStream_t stream) {
  const size_t shared = static_cast<size_t>(2 * s.num_blocks) * sizeof(double);
  head_decision_kernel<<<static_cast<unsigned>(s.num_q_heads), kThreads, shared, stream>>>(
      pooled, out.query_aware.data(), out.js_distance.data(), probabilities, s, tau);
  MF_CUDA_CHECK_LAUNCH();
}

void finish_selection(FlexPrefillDeviceSelection& out, const double* pooled,
                      unsigned long long* coverage_counts, const float* fp32_vs, const bf16* q,
                      const double* k_means, const float* fp32_tri, const SearchShape& s,
                      const ops::FlexPrefillParams& params, cudaStream_t stream,
                      SelectPath select_path) {
  const int64_t num_heads = s.num_q_heads;
  const int64_t nb = s.num_blocks;
  const bool fast = params.search == ops::FlexSearch::kFp32;
  MF_CHECK(!fast || (fp32_vs != nullptr && (params.tau <= 0.0 || fp32_tri != nullptr)),
           "finish_selection: the fast search needs its fp32 values");

  // Steps 2 (the fast search's counts, and the budgets) and 6-7: on the side stream for the fast
  // search, whose buffers are all allocated before the fork (cuda/side_stream.h).
  DeviceBuffer<uint8_t> grid(static_cast<size_t>(num_heads * nb * nb));  // [Hq, nb, nb]
  DeviceBuffer<uint8_t> step2_workspace;
  if (fast) step2_workspace.resize(coverage_select_workspace_bytes(num_heads * 2, s.seq_len));
  const cudaStream_t top_k_stream = fast ? fork_side_stream(stream) : stream;
  if (fast) {
    fp32_coverage_counts(coverage_counts, fp32_vs, s, params.gamma, out.query_aware.data(),
                         top_k_stream, step2_workspace.data(), select_path);
  }
  grid.fill_zero(top_k_stream);
  select_blocks(grid.data(), pooled, coverage_counts, out, s, top_k_stream);

  // Step 8 (the kernels skip heads that are not query-aware). The fast search's flags join the
  // grid's in build_csr.
  DeviceBuffer<uint8_t> tri_selected;
  const int64_t num_tri = nb * (nb + 1) / 2;
  if (params.tau > 0.0 && fast) {
    tri_selected.resize(static_cast<size_t>(num_heads * num_tri));
    coverage_select(static_cast<unsigned long long*>(nullptr), tri_selected.data(), fp32_tri,
                    num_heads, num_tri, params.gamma, SegmentFilter{out.query_aware.data()}, stream,
                    nullptr, select_path);
  } else if (params.tau > 0.0) {
    DeviceBuffer<double> tri(static_cast<size_t>(num_heads * num_tri));
    DeviceBuffer<double> q_means(static_cast<size_t>(num_heads * nb * s.head_dim));
    block_means(q_means.data(), q, num_heads, s.scale, out.query_aware.data(), s, stream);
    const unsigned tiles = static_cast<unsigned>(ceil_div(nb, kBlockTile));
    block_logits_kernel<<<dim3(tiles, tiles, static_cast<unsigned>(num_heads)), kThreads, 0,
                          stream>>>(tri.data(), q_means.data(), k_means, out.query_aware.data(), s);
    MF_CUDA_CHECK_LAUNCH();
    block_softmax(tri.data(), out.query_aware.data(), num_heads, nb, stream);
    SortedSegments sorted_tri;
    sort_segments_descending(sorted_tri, tri.data(), num_heads, num_tri, stream);
    CoveragePrefix cover;
    coverage_prefix(cover, sorted_tri.values.data(), num_heads, num_tri, stream);
    coverage_mark_kernel<<<dim3(blocks_per_segment(num_tri), static_cast<unsigned>(num_heads)),
                           kThreads, 0, stream>>>(
        grid.data(), sorted_tri.keys.data(), sorted_tri.position_bits, cover.prefix.data(),
        cover.bases.data(), out.query_aware.data(), num_tri, cover.chunks_per_segment, nb,
        params.gamma * static_cast<double>(nb));
    MF_CUDA_CHECK_LAUNCH();
  }

  if (fast) join_side_stream(stream);
  build_csr(out, CsrSource{grid.data(), tri_selected.data(), out.query_aware.data()}, stream);
}

}  // namespace moeforge::cuda::flex
