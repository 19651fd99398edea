// The exact steps 1-2 of the GPU FlexPrefill pattern search (FlexSearch::kExact), equal to the
// reference's doubles by construction, and the entry point that runs either search and the shared
// later stages (cuda/flex_prefill_stages.h):
//  - Step 1's logits are a small fp64 GEMM per head (the bs last queries against all keys) with
//    shared-memory tiles and an 8 x 8 register tile per thread. bf16 products are exact in double,
//    so the GPU uses fused multiply-adds there (ops/flex_prefill.h, "exactness facts") with each
//    dot product's terms in ascending d. The logits are stored ([heads, keys, bs] doubles, in
//    passes of heads that keep the buffer under kLogitBytesPerPass) and read twice: for the chunked
//    softmax sums and for the vertical / slash sums.
//  - The softmax denominators follow the reference's chunked order (kFlexPrefillSumChunk): chunk
//    totals in parallel, then their ascending sum. Row sums over 128 rows and pooled blocks stay
//    sequential, one thread each.
//  - A max is exact in any order: the per-row maxima of step 1 are atomicMax on an order-preserving
//    integer image of the double.
//  - Masked logits are stored as -inf and their exponentials (+0.0) are added like the others,
//    which changes no sum (none is -0.0), as are the zeros of padded tiles.
//
// Kernels, in order: per pass of heads the logits GEMM (+ row maxima), the per-chunk softmax sums,
// the row totals, and the vertical / slash sums with their block pooling; then step 2's coverage
// counts (flex::chunked_coverage_counts). The fast search instead runs its passes
// (cuda/flex_prefill_fp32.h) with what does not depend on them beside them on a side stream
// (cuda/side_stream.h): the key means, the last query mean, step 4's block probabilities, and step
// 8's query block means, logits and softmax for every head (the head decision, which picks the
// heads step 8 keeps, needs the passes), the means in blocks of threads that fit an SM beside the
// passes' (cuda/flex_prefill_fp32_blocks.cu). Its step 2 runs later, after the head decision
// (flex::finish_selection, beside step 8's select).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "core/error.h"
#include "cuda/cuda_check.h"
#include "cuda/flex_prefill.h"
#include "cuda/flex_prefill_fp32.h"
#include "cuda/flex_prefill_stages.h"
#include "cuda/kernel_util.cuh"
#include "cuda/side_stream.h"

namespace moeforge::cuda {
namespace {

using flex::SearchShape;

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kChunk = static_cast<int>(ops::kFlexPrefillSumChunk);
constexpr int kMaxBlockSize = 128;
// Logits GEMM: each block computes 64 rows x 128 keys with 4 warps of 32 rows x 64 keys (two
// blocks fit an SM, so that one's loads, barriers and stores overlap the other's arithmetic),
// head_dim goes through shared memory 8 at a time, and the shared tiles' rows are padded (in
// doubles, even so that double2 loads stay aligned; it spreads the transposing stores over banks).
constexpr int kLogitRows = 64;
constexpr int kLogitKeys = 128;
constexpr int kLogitThreads = 128;
constexpr int kLogitDepth = 8;
constexpr int kTilePad = 2;
// Vertical / slash sums: keys per block and rows per shared-memory stage.
constexpr int kScoreKeys = 256;
constexpr int kScoreRows = 8;
// The logits buffer of step 1 holds at most this many bytes (more heads take several passes).
constexpr int64_t kLogitBytesPerPass = int64_t{4} << 30;

static_assert(kScoreKeys == kChunk && kChunk % kLogitKeys == 0,
              "the padded key range must be whole tiles of every step-1 kernel");
static_assert(kScoreKeys % kMaxBlockSize == 0 && kMaxBlockSize % kScoreRows == 0,
              "vertical / slash tiles hold whole blocks and whole row stages");

// An unsigned integer with the order of the doubles (NaN aside), for atomicMax.
__device__ __forceinline__ unsigned long long order_key(double x) {
  const unsigned long long bits = static_cast<unsigned long long>(__double_as_longlong(x));
  return (bits >> 63) != 0 ? ~bits : bits | (1ull << 63);
}

__device__ __forceinline__ double from_order_key(unsigned long long key) {
  const unsigned long long bits = (key >> 63) != 0 ? key & ~(1ull << 63) : ~key;
  return __longlong_as_double(static_cast<long long>(bits));
}

// Step 1 logits: block (key tile of kLogitKeys, tile of kLogitRows last-block rows, head of the
// pass), kLogitThreads threads. logits [pass heads, padded_len, bs]: scale * q_r . k_j for the
// visible keys (j <= N - bs + r), -inf elsewhere (the causal corner and the padding up to
// padded_len). row_max [Hq, bs]: order_key of each row's largest logit, by atomicMax (zeroed by the
// caller).
//
// Lane (tr = lane / 8, tk = lane % 8) of warp w owns the block's rows row_base + 8 i + e and keys
// key_base + 16 i + e (i < 4, e < 2), so that its shared-memory reads are double2 loads that lanes
// share or read contiguously. head_dim goes through shared memory kLogitDepth at a time (the next
// slice waits in registers, 4 + 8 values a thread). Each dot product accumulates d in ascending
// order with fma (exact products).
__global__ void __launch_bounds__(kLogitThreads, 2)
    last_block_logits_kernel(double* logits, unsigned long long* row_max, const bf16* q,
                             const bf16* k, SearchShape s, int64_t head_begin, int64_t padded_len) {
  constexpr int kQLoads = kLogitRows * kLogitDepth / kLogitThreads;
  constexpr int kKLoads = kLogitKeys * kLogitDepth / kLogitThreads;
  static_assert((kLogitRows / 32) * (kLogitKeys / 64) * kWarpSize == kLogitThreads,
                "one 32 x 64 tile a warp");
  __shared__ __align__(16) double q_tile[kLogitDepth][kLogitRows + kTilePad];
  __shared__ __align__(16) double k_tile[kLogitDepth][kLogitKeys + kTilePad];

  const int tid = static_cast<int>(threadIdx.x);
  const int64_t key0 = static_cast<int64_t>(blockIdx.x) * kLogitKeys;
  const int64_t row0 = static_cast<int64_t>(blockIdx.y) * kLogitRows;
  const int64_t local_head = blockIdx.z;
  const int64_t h = head_begin + local_head;
  const int64_t kv_head = h / s.group_size;
  const int64_t bs = s.block_size;
  const int64_t first_position = s.seq_len - bs;
  const int warp = tid / kWarpSize;
  const int lane = tid % kWarpSize;
  const int row_base = (warp / 2) * 32 + (lane / 8) * 2;
  const int key_base = (warp % 2) * 64 + (lane % 8) * 2;

  // The bf16 values of one head_dim slice, in registers until the tiles are free. Thread tid
  // loads column dd = tid % kLogitDepth of rows (or keys) tid / kLogitDepth + it * kStride.
  constexpr int kStride = kLogitThreads / kLogitDepth;
  const int load_dd = tid % kLogitDepth;
  const int load_row = tid / kLogitDepth;
  const bf16* q_load =
      q + ((first_position + row0 + load_row) * s.num_q_heads + h) * s.head_dim + load_dd;
  const int64_t q_load_stride = kStride * s.num_q_heads * s.head_dim;
  const bf16* k_load = k + ((key0 + load_row) * s.num_kv_heads + kv_head) * s.head_dim + load_dd;
  const int64_t k_load_stride = kStride * s.num_kv_heads * s.head_dim;
  const int64_t keys_left = s.seq_len - key0 - load_row;  // key index bound of this thread's loads
  float q_regs[kQLoads];
  float k_regs[kKLoads];
  const auto load_slice = [&](int64_t d0) {
    const bool in_dim = d0 + load_dd < s.head_dim;
#pragma unroll
    for (int it = 0; it < kQLoads; ++it) {
      q_regs[it] = in_dim ? __bfloat162float(q_load[it * q_load_stride + d0]) : 0.0f;
    }
#pragma unroll
    for (int it = 0; it < kKLoads; ++it) {
      k_regs[it] = in_dim && it * kStride < keys_left
                       ? __bfloat162float(k_load[it * k_load_stride + d0])
                       : 0.0f;
    }
  };

  double acc[8][8];
#pragma unroll
  for (int x = 0; x < 8; ++x) {
#pragma unroll
    for (int y = 0; y < 8; ++y) acc[x][y] = 0.0;
  }
  load_slice(0);
  for (int64_t d0 = 0; d0 < s.head_dim; d0 += kLogitDepth) {
    __syncthreads();  // the previous slice's reads of the tiles are done
#pragma unroll
    for (int it = 0; it < kQLoads; ++it) {
      q_tile[load_dd][load_row + it * kStride] = static_cast<double>(q_regs[it]);
    }
#pragma unroll
    for (int it = 0; it < kKLoads; ++it) {
      k_tile[load_dd][load_row + it * kStride] = static_cast<double>(k_regs[it]);
    }
    __syncthreads();
    if (d0 + kLogitDepth < s.head_dim) load_slice(d0 + kLogitDepth);
#pragma unroll
    for (int dd = 0; dd < kLogitDepth; ++dd) {
      double a[8], b[8];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const double2 qa = *reinterpret_cast<const double2*>(&q_tile[dd][row_base + 8 * i]);
        const double2 kb = *reinterpret_cast<const double2*>(&k_tile[dd][key_base + 16 * i]);
        a[2 * i] = qa.x;
        a[2 * i + 1] = qa.y;
        b[2 * i] = kb.x;
        b[2 * i + 1] = kb.y;
      }
#pragma unroll
      for (int x = 0; x < 8; ++x) {
#pragma unroll
        for (int y = 0; y < 8; ++y) acc[x][y] = fma(a[x], b[y], acc[x][y]);
      }
    }
  }

  // Scale, mask, row maxima (over the 8 lanes that share rows) and the stores.
#pragma unroll
  for (int x = 0; x < 8; ++x) {
    const int64_t row = row0 + row_base + 8 * (x / 2) + x % 2;
    double best = -INFINITY;
#pragma unroll
    for (int y = 0; y < 8; ++y) {
      const int64_t key = key0 + key_base + 16 * (y / 2) + y % 2;
      // key <= N - bs + row implies key < N.
      const bool visible = key <= first_position + row;
      acc[x][y] = visible ? __dmul_rn(s.scale, acc[x][y]) : -INFINITY;
      best = fmax(best, acc[x][y]);
    }
    for (int offset = 1; offset < 8; offset *= 2) {
      best = fmax(best, __shfl_xor_sync(kFullMask, best, offset));
    }
    if (lane % 8 == 0 && best > -INFINITY) {
      atomicMax(row_max + h * bs + row, order_key(best));
    }
  }
  double* out = logits + (local_head * padded_len + key0) * bs + row0;
#pragma unroll
  for (int y = 0; y < 8; ++y) {
    const int64_t key = key_base + 16 * (y / 2) + y % 2;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      *reinterpret_cast<double2*>(out + key * bs + row_base + 8 * i) =
          make_double2(acc[2 * i][y], acc[2 * i + 1][y]);
    }
  }
}

// Step 1 softmax sums, chunk by chunk: block (chunk, head of the pass), bs threads (one per row).
// chunk_sums [Hq, padded_len / kChunk, bs]: the ascending sum of exp(logit - row max) over the
// chunk's keys (masked keys add exp(-inf) = +0.0, which changes nothing).
__global__ void row_chunk_sums_kernel(double* chunk_sums, const double* logits,
                                      const unsigned long long* row_max, int64_t head_begin,
                                      int64_t padded_len, int64_t block_size) {
  const int64_t local_head = blockIdx.y;
  const int64_t h = head_begin + local_head;
  const int64_t chunk = blockIdx.x;
  const int64_t r = threadIdx.x;
  const double max_logit = from_order_key(row_max[h * block_size + r]);
  const double* column = logits + (local_head * padded_len + chunk * kChunk) * block_size + r;
  double sum = 0.0;
#pragma unroll 8
  for (int t = 0; t < kChunk; ++t) {
    sum = __dadd_rn(sum, exp(__dsub_rn(column[t * block_size], max_logit)));
  }
  chunk_sums[(h * (padded_len / kChunk) + chunk) * block_size + r] = sum;
}

// Rows [row_begin, row_end) of [Hq * bs]: row_sum = the ascending sum of the row's chunk sums
// (the chunked softmax denominator) and row_max_value = the decoded row maximum. Launched with one
// warp per block, to spread the rows over the SMs.
__global__ void row_totals_kernel(double* row_max_value, double* row_sum,
                                  const unsigned long long* row_max, const double* chunk_sums,
                                  int64_t row_begin, int64_t row_end, int64_t num_chunks,
                                  int64_t block_size) {
  for (int64_t i = row_begin + blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       i < row_end; i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t h = i / block_size;
    const int64_t r = i % block_size;
    double sum = 0.0;
#pragma unroll 16
    for (int64_t c = 0; c < num_chunks; ++c) {
      sum = __dadd_rn(sum, chunk_sums[(h * num_chunks + c) * block_size + r]);
    }
    row_sum[i] = sum;
    row_max_value[i] = from_order_key(row_max[i]);
  }
}

// Steps 1 (end) and 3: block (key tile of kScoreKeys, head of the pass), kScoreKeys threads.
// Thread t owns key j = j0 + t: vertical[j] = sum_r A[r, j] and slash[j] = sum_r A[r, j + r - (bs
// - 1)], each over r ascending, then / bs; vs [Hq, 2, N]. A = exp(logit - max) / sum is computed
// kScoreRows rows at a time into shared memory for keys [j0 - (bs - 1) + r0, j0 + kScoreKeys)
// (the keys the tile's diagonals reach from rows r0...). Then pooled [Hq, 2, nb] gets the sums of
// the tile's blocks (ascending positions, the last block over its real length).
__global__ void __launch_bounds__(kScoreKeys)
    vertical_slash_kernel(double* vs, double* pooled, const double* logits,
                          const double* row_max_value, const double* row_sum, SearchShape s,
                          int64_t head_begin, int64_t padded_len) {
  __shared__ double probs[kScoreRows][kScoreKeys + kMaxBlockSize - 1];
  __shared__ double max_s[kMaxBlockSize];
  __shared__ double sum_s[kMaxBlockSize];
  const int t = static_cast<int>(threadIdx.x);
  const int64_t local_head = blockIdx.y;
  const int64_t h = head_begin + local_head;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * kScoreKeys;
  const int bs = static_cast<int>(s.block_size);
  const int64_t n = s.seq_len;
  for (int r = t; r < bs; r += kScoreKeys) {
    max_s[r] = row_max_value[h * bs + r];
    sum_s[r] = row_sum[h * bs + r];
  }
  __syncthreads();
  const int64_t base_key = j0 - (bs - 1);  // key of column 0 of probs
  const double* head_logits = logits + local_head * padded_len * bs;
  double vertical = 0.0, slash = 0.0;
  for (int r0 = 0; r0 < bs; r0 += kScoreRows) {
    const int num_entries = kScoreRows * (kScoreKeys + bs - 1 - r0);
#pragma unroll 4
    for (int e = t; e < num_entries; e += kScoreKeys) {
      const int rr = e % kScoreRows;
      const int col = r0 + e / kScoreRows;
      const int64_t key = base_key + col;
      const int row = r0 + rr;
      probs[rr][col] =
          key >= 0 ? exp(__dsub_rn(head_logits[key * bs + row], max_s[row])) / sum_s[row] : 0.0;
    }
    __syncthreads();
#pragma unroll
    for (int rr = 0; rr < kScoreRows; ++rr) {
      vertical = __dadd_rn(vertical, probs[rr][t + bs - 1]);
      slash = __dadd_rn(slash, probs[rr][t + r0 + rr]);
    }
    __syncthreads();
  }
  const double vertical_mean = vertical / static_cast<double>(bs);
  const double slash_mean = slash / static_cast<double>(bs);
  const int64_t j = j0 + t;
  if (j < n) {
    vs[(h * 2) * n + j] = vertical_mean;
    vs[(h * 2 + 1) * n + j] = slash_mean;
  }
  probs[0][t] = vertical_mean;
  probs[1][t] = slash_mean;
  __syncthreads();
  const int blocks_per_tile = kScoreKeys / bs;
  if (t < 2 * blocks_per_tile) {
    const int kind = t / blocks_per_tile;
    const int local_block = t % blocks_per_tile;
    const int64_t b = j0 / bs + local_block;
    if (b < s.num_blocks) {
      const int64_t end = min(n, (b + 1) * bs) - j0;
      double sum = 0.0;
      for (int64_t x = static_cast<int64_t>(local_block) * bs; x < end; ++x) {
        sum = __dadd_rn(sum, probs[kind][x]);
      }
      pooled[(h * 2 + kind) * s.num_blocks + b] = sum;
    }
  }
}

// Steps 0-1 for heads [head_begin, head_end): logits, row maxima and sums, vertical / slash values
// (vs) and their block sums (pooled).
void last_block_scores(double* vs, double* pooled, double* logits, unsigned long long* row_max,
                       double* chunk_sums, double* row_max_value, double* row_sum, const bf16* q,
                       const bf16* k, const SearchShape& s, int64_t padded_len, int64_t head_begin,
                       int64_t head_end, cudaStream_t stream) {
  const int64_t num_heads = head_end - head_begin;
  const int64_t bs = s.block_size;
  const int64_t num_chunks = padded_len / kChunk;
  last_block_logits_kernel<<<dim3(static_cast<unsigned>(padded_len / kLogitKeys),
                                  static_cast<unsigned>(bs / kLogitRows),
                                  static_cast<unsigned>(num_heads)),
                             kLogitThreads, 0, stream>>>(logits, row_max, q, k, s, head_begin,
                                                         padded_len);
  MF_CUDA_CHECK_LAUNCH();
  row_chunk_sums_kernel<<<dim3(static_cast<unsigned>(num_chunks), static_cast<unsigned>(num_heads)),
                          static_cast<unsigned>(bs), 0, stream>>>(chunk_sums, logits, row_max,
                                                                  head_begin, padded_len, bs);
  MF_CUDA_CHECK_LAUNCH();
  row_totals_kernel<<<grid_for(num_heads * bs, kWarpSize), kWarpSize, 0, stream>>>(
      row_max_value, row_sum, row_max, chunk_sums, head_begin * bs, head_end * bs, num_chunks, bs);
  MF_CUDA_CHECK_LAUNCH();
  vertical_slash_kernel<<<dim3(static_cast<unsigned>(padded_len / kScoreKeys),
                               static_cast<unsigned>(num_heads)),
                          kScoreKeys, 0, stream>>>(vs, pooled, logits, row_max_value, row_sum, s,
                                                   head_begin, padded_len);
  MF_CUDA_CHECK_LAUNCH();
}

}  // namespace

void flex_prefill_select(FlexPrefillDeviceSelection& out, const bf16* q, const bf16* k,
                         const ops::SparseAttentionDims& dims, const ops::FlexPrefillParams& params,
                         cudaStream_t stream, SelectPath select_path) {
  const bool fp32 = params.search == ops::FlexSearch::kFp32;
  const SearchShape s = flex::search_shape(
      dims, params,
      fp32 ? "flex_prefill_select (CUDA, fast search)" : "flex_prefill_select (CUDA)");
  if (fp32) check_fp32_search(s, q, k);
  if (flex::begin_selection(out, s, stream)) return;  // step 0: short inputs are dense
  const int64_t n = s.seq_len;
  const int64_t nb = s.num_blocks;
  const int64_t num_heads = s.num_q_heads;
  const int64_t d = s.head_dim;
  DeviceBuffer<double> k_means(static_cast<size_t>(s.num_kv_heads * nb * d));
  DeviceBuffer<double> q_mean(static_cast<size_t>(num_heads * d));
  DeviceBuffer<double> pooled(static_cast<size_t>(num_heads * 2 * nb));  // [Hq, 2, nb]
  DeviceBuffer<unsigned long long> coverage_counts(static_cast<size_t>(num_heads * 2));
  DeviceBuffer<double> probabilities(static_cast<size_t>(num_heads * nb));  // step 4's [Hq, nb]
  DeviceBuffer<float> q_block_means;  // [Hq, nb, D], the fast search's step 8
  DeviceBuffer<float> tri;            // [Hq, nb (nb + 1) / 2], its probabilities

  // The fast search runs what does not need its tensor-core passes on the side stream beside them;
  // every buffer the side stream uses is allocated before the fork (cuda/side_stream.h). The passes
  // are launched first, so that their blocks of threads reach the SMs before the side stream's
  // (which fit beside them; the other order made pass 1 wait: docs/design.md).
  const bool fast_step8 = fp32 && params.tau > 0.0;
  DeviceBuffer<float> fp32_vs;  // [Hq, 2, N], the fast search's vertical and slash values
  if (fp32) {
    fp32_vs.resize(static_cast<size_t>(num_heads * 2 * n));
    if (fast_step8) {
      q_block_means.resize(static_cast<size_t>(num_heads * nb * d));
      tri.resize(static_cast<size_t>(num_heads * (nb * (nb + 1) / 2)));
    }
    const cudaStream_t side = fork_side_stream(stream);
    fp32_vertical_slash(fp32_vs.data(), pooled.data(), q, k, s, stream);
    const unsigned max_blocks = side_stream_max_blocks();
    fp32_key_block_means(k_means.data(), k, s, side, max_blocks);
    flex::last_query_mean(q_mean.data(), q, s, side);
    flex::block_probabilities(probabilities.data(), k_means.data(), q_mean.data(), s, side);
    if (fast_step8) {
      fp32_q_block_means(q_block_means.data(), q, nullptr, s, side, max_blocks);
      fp32_block_logits(tri.data(), q_block_means.data(), k_means.data(), nullptr, s, side,
                        max_blocks);
      fp32_block_softmax(tri.data(), nullptr, s, side);
    }
    // Step 2 waits for step 4 (in finish_selection): only heads that are not query-aware need their
    // coverage counts.
    join_side_stream(stream);
    flex::decide_heads(out, pooled.data(), probabilities.data(), s, params.tau, stream);
  } else {
    flex::block_means(k_means.data(), k, s.num_kv_heads, 1.0, nullptr, s, stream);
    flex::last_query_mean(q_mean.data(), q, s, stream);
    flex::block_probabilities(probabilities.data(), k_means.data(), q_mean.data(), s, stream);
    // Step 1 (and step 3's pooling), in passes of heads that bound the logits buffer.
    const int64_t bs = s.block_size;
    const int64_t padded_len = ceil_div(n, kChunk) * kChunk;
    const int64_t head_logit_bytes = padded_len * bs * static_cast<int64_t>(sizeof(double));
    const int64_t heads_per_pass =
        std::clamp<int64_t>(kLogitBytesPerPass / head_logit_bytes, 1, num_heads);
    DeviceBuffer<double> logits(static_cast<size_t>(heads_per_pass * padded_len * bs));
    DeviceBuffer<unsigned long long> row_max(static_cast<size_t>(num_heads * bs));
    row_max.fill_zero(stream);
    DeviceBuffer<double> chunk_sums(static_cast<size_t>(num_heads * (padded_len / kChunk) * bs));
    DeviceBuffer<double> row_max_value(static_cast<size_t>(num_heads * bs));
    DeviceBuffer<double> row_sum(static_cast<size_t>(num_heads * bs));
    DeviceBuffer<double> vs(static_cast<size_t>(num_heads * 2 * n));  // [Hq, 2, N]
    for (int64_t head_begin = 0; head_begin < num_heads; head_begin += heads_per_pass) {
      last_block_scores(vs.data(), pooled.data(), logits.data(), row_max.data(), chunk_sums.data(),
                        row_max_value.data(), row_sum.data(), q, k, s, padded_len, head_begin,
                        std::min(num_heads, head_begin + heads_per_pass), stream);
    }
    logits.reset();
    // Step 2: coverage counts of the sorted vertical and slash values.
    flex::chunked_coverage_counts(coverage_counts.data(), vs.data(), num_heads * 2, n, params.gamma,
                                  stream);
    flex::decide_heads(out, pooled.data(), probabilities.data(), s, params.tau, stream);
  }
  flex::finish_selection(out, pooled.data(), coverage_counts.data(), fp32_vs.data(), q,
                         k_means.data(), tri.data(), s, params, stream, select_path);
}

ops::FlexPrefillSelection download_selection(const FlexPrefillDeviceSelection& selection) {
  MF_CUDA_CHECK(cudaDeviceSynchronize());
  ops::FlexPrefillSelection result;
  result.dense_fallback = selection.dense_fallback;
  ops::BlockSparseLayout& layout = result.layout;
  layout.num_heads = selection.num_heads;
  layout.num_blocks = selection.num_blocks;
  layout.block_size = selection.block_size;
  layout.row_offsets = selection.row_offsets.download();
  const int64_t num_selected = layout.row_offsets.empty() ? 0 : layout.row_offsets.back();
  layout.col_idx.resize(static_cast<size_t>(num_selected));
  if (num_selected > 0) {
    copy_to_host(layout.col_idx.data(), selection.col_idx.data(),
                 static_cast<size_t>(num_selected) * sizeof(int32_t));
  }
  const std::vector<int32_t> query_aware = selection.query_aware.download();
  const std::vector<double> js_distance = selection.js_distance.download();
  const std::vector<int64_t> num_vertical = selection.num_vertical_blocks.download();
  const std::vector<int64_t> num_slash = selection.num_slash_blocks.download();
  const std::vector<int64_t> num_selected_blocks = selection.num_selected_blocks.download();
  const double num_causal =
      static_cast<double>(selection.num_blocks * (selection.num_blocks + 1) / 2);
  result.head_stats.resize(static_cast<size_t>(selection.num_heads));
  for (int64_t h = 0; h < selection.num_heads; ++h) {
    ops::FlexPrefillHeadStats& stats = result.head_stats[h];
    stats.query_aware = query_aware[h] != 0;
    stats.js_distance = js_distance[h];
    stats.num_vertical_blocks = num_vertical[h];
    stats.num_slash_blocks = num_slash[h];
    stats.num_selected_blocks = num_selected_blocks[h];
    stats.density = static_cast<double>(num_selected_blocks[h]) / num_causal;
  }
  return result;
}

}  // namespace moeforge::cuda
