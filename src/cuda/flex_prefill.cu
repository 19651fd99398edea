// FlexPrefill pattern search kernels (steps of ops/flex_prefill.h). Exactness first: all values in
// double with __dmul_rn / __dadd_rn (never contracted to an FMA, as the host reference is built
// without one), every sum that decides a comparison runs in the reference's order, sequentially.
//
// Kernels, in order: block means of K and Q; per last-block row, the softmax max (exact in any
// order) and sum (sequential over keys); per key position, the vertical and slash sums over rows
// in ascending order (logits recomputed); the scaled mean of the last-block queries; a bitonic
// sort of the vertical and slash values per head; per head the budgets, block pooling, abar and
// the JS decision; a bitonic sort of the block scores; the column / diagonal fill of the block
// grid; for query-aware heads the block-level softmax, its sort and the gamma * nb walk; finally
// per-row counts, one scan and the column fill of the CSR.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "core/error.h"
#include "cuda/cuda_check.h"
#include "cuda/flex_prefill.h"
#include "cuda/kernel_util.cuh"

namespace moeforge::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kSortThreads = 1024;
constexpr int kScanThreads = 1024;
// Tokens per budget block in step 2: hard-coded in the reference, independent of block_size.
constexpr int64_t kBudgetDivisor = 128;

__device__ __forceinline__ double to_double(bf16 x) {
  return static_cast<double>(__bfloat162float(x));
}

// sum_d a[d] * b[d] in ascending d, as ops::dot_double.
__device__ double dot_bf16(const bf16* a, const bf16* b, int64_t len) {
  double sum = 0.0;
  for (int64_t d = 0; d < len; ++d)
    sum = __dadd_rn(sum, __dmul_rn(to_double(a[d]), to_double(b[d])));
  return sum;
}

__device__ double dot_double(const double* a, const double* b, int64_t len) {
  double sum = 0.0;
  for (int64_t d = 0; d < len; ++d) sum = __dadd_rn(sum, __dmul_rn(a[d], b[d]));
  return sum;
}

struct Shape {
  int64_t seq_len, num_q_heads, num_kv_heads, head_dim, block_size, num_blocks, group_size;
  double scale;  // 1 / sqrt(head_dim), computed on the host as the reference does
};

// Logit of last-block row r of query head h against key j: scale * q . k, as the reference.
__device__ double last_block_logit(const bf16* q, const bf16* k, const Shape& s, int64_t h,
                                   int64_t r, int64_t j) {
  const int64_t position = s.seq_len - s.block_size + r;
  const bf16* q_vec = q + (position * s.num_q_heads + h) * s.head_dim;
  const bf16* k_vec = k + (j * s.num_kv_heads + h / s.group_size) * s.head_dim;
  return __dmul_rn(s.scale, dot_bf16(q_vec, k_vec, s.head_dim));
}

// means [num_heads, nb, D]: mean over each block's real rows of x[:, head, :], times factor
// (rows summed in ascending order, then multiplied by factor / length, as the reference).
__global__ void block_means_kernel(double* means, const bf16* x, int64_t seq_len, int64_t num_heads,
                                   int64_t head_dim, int64_t block_size, int64_t num_blocks,
                                   double factor) {
  const int64_t total = num_heads * num_blocks * head_dim;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t d = i % head_dim;
    const int64_t b = (i / head_dim) % num_blocks;
    const int64_t head = i / (head_dim * num_blocks);
    const int64_t end = min(seq_len, (b + 1) * block_size);
    double sum = 0.0;
    for (int64_t j = b * block_size; j < end; ++j) {
      sum = __dadd_rn(sum, to_double(x[(j * num_heads + head) * head_dim + d]));
    }
    const double length = static_cast<double>(end - b * block_size);
    means[i] = __dmul_rn(sum, factor / length);
  }
}

// Block (r, h): row_max and row_sum of the softmax of last-block row r of head h over keys
// 0..N-bs+r. The max is exact in any order; the sum of exp(logit - max) runs over the keys in
// ascending order (chunks computed in parallel, added by thread 0), as the reference.
__global__ void last_row_stats_kernel(double* row_max, double* row_sum, const bf16* q,
                                      const bf16* k, Shape s) {
  __shared__ double values[kThreads];
  const int64_t r = blockIdx.x;
  const int64_t h = blockIdx.y;
  const int64_t num_keys = s.seq_len - s.block_size + r + 1;
  double local_max = -INFINITY;
  for (int64_t j = threadIdx.x; j < num_keys; j += kThreads) {
    local_max = fmax(local_max, last_block_logit(q, k, s, h, r, j));
  }
  values[threadIdx.x] = local_max;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) {
      values[threadIdx.x] = fmax(values[threadIdx.x], values[threadIdx.x + stride]);
    }
    __syncthreads();
  }
  const double max_logit = values[0];
  __syncthreads();
  double sum = 0.0;  // meaningful in thread 0
  for (int64_t start = 0; start < num_keys; start += kThreads) {
    const int64_t j = start + threadIdx.x;
    values[threadIdx.x] =
        j < num_keys ? exp(__dsub_rn(last_block_logit(q, k, s, h, r, j), max_logit)) : 0.0;
    __syncthreads();
    if (threadIdx.x == 0) {
      const int64_t count = min(static_cast<int64_t>(kThreads), num_keys - start);
      for (int64_t t = 0; t < count; ++t) sum = __dadd_rn(sum, values[t]);
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    row_max[h * s.block_size + r] = max_logit;
    row_sum[h * s.block_size + r] = sum;
  }
}

// vs [Hq, 2, N]: vertical[j] (slot 0) and slash[j] (slot 1) of step 1, each summed over the rows
// r in ascending order, then divided by bs, as the reference.
__global__ void vertical_slash_kernel(double* vs, const double* row_max, const double* row_sum,
                                      const bf16* q, const bf16* k, Shape s) {
  const int64_t total = s.num_q_heads * s.seq_len;
  const int64_t bs = s.block_size;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t j = i % s.seq_len;
    const int64_t h = i / s.seq_len;
    const double* m = row_max + h * bs;
    const double* z = row_sum + h * bs;
    double vertical = 0.0;
    for (int64_t r = max(int64_t{0}, j - (s.seq_len - bs)); r < bs; ++r) {
      vertical =
          __dadd_rn(vertical, exp(__dsub_rn(last_block_logit(q, k, s, h, r, j), m[r])) / z[r]);
    }
    double slash = 0.0;  // diagonal index j: key j + r - (bs - 1) of row r
    for (int64_t r = max(int64_t{0}, bs - 1 - j); r < bs; ++r) {
      const int64_t key = j + r - (bs - 1);
      slash = __dadd_rn(slash, exp(__dsub_rn(last_block_logit(q, k, s, h, r, key), m[r])) / z[r]);
    }
    vs[(h * 2) * s.seq_len + j] = vertical / static_cast<double>(bs);
    vs[(h * 2 + 1) * s.seq_len + j] = slash / static_cast<double>(bs);
  }
}

// q_mean [Hq, D]: sum over the last-block rows (ascending) of scale * q, divided by bs.
__global__ void last_query_mean_kernel(double* q_mean, const bf16* q, Shape s) {
  const int64_t total = s.num_q_heads * s.head_dim;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t d = i % s.head_dim;
    const int64_t h = i / s.head_dim;
    double sum = 0.0;
    for (int64_t r = 0; r < s.block_size; ++r) {
      const int64_t position = s.seq_len - s.block_size + r;
      sum = __dadd_rn(
          sum, __dmul_rn(s.scale, to_double(q[(position * s.num_q_heads + h) * s.head_dim + d])));
    }
    q_mean[i] = sum / static_cast<double>(s.block_size);
  }
}

// a comes before b: the larger value first, equal values by the lower index (the reference's
// rule for every sort and top-k).
__device__ __forceinline__ bool before(double value_a, int32_t idx_a, double value_b,
                                       int32_t idx_b) {
  return value_a != value_b ? value_a > value_b : idx_a < idx_b;
}

// One block per segment: keys [num_segments, padded] and idx [num_segments, padded] become the
// segment's count entries of src (at src + segment * src_stride, indices 0..count-1) in the
// order of `before`, followed by padding (-inf, INT32_MAX). padded is a power of two >= count.
// Segments whose active flag (active[segment / active_div]) is 0 are skipped when active is set.
// A bitonic sort in global memory: __syncthreads between passes makes the writes visible.
__global__ void segmented_sort_kernel(double* keys, int32_t* idx, const double* src,
                                      int64_t src_stride, int64_t count, int64_t padded,
                                      const int32_t* active, int64_t active_div) {
  const int64_t segment = blockIdx.x;
  if (active != nullptr && active[segment / active_div] == 0) return;
  double* key = keys + segment * padded;
  int32_t* id = idx + segment * padded;
  for (int64_t i = threadIdx.x; i < padded; i += blockDim.x) {
    key[i] = i < count ? src[segment * src_stride + i] : -INFINITY;
    id[i] = i < count ? static_cast<int32_t>(i) : INT32_MAX;
  }
  __syncthreads();
  for (int64_t size = 2; size <= padded; size *= 2) {
    for (int64_t stride = size / 2; stride > 0; stride /= 2) {
      for (int64_t i = threadIdx.x; i < padded; i += blockDim.x) {
        const int64_t partner = i ^ stride;
        if (partner <= i) continue;
        // Runs with (i & size) == 0 end in the `before` order, the others in the reverse one.
        const bool forward = (i & size) == 0;
        const bool partner_first = before(key[partner], id[partner], key[i], id[i]);
        if (partner_first == forward) {
          const double k_tmp = key[i];
          key[i] = key[partner];
          key[partner] = k_tmp;
          const int32_t i_tmp = id[i];
          id[i] = id[partner];
          id[partner] = i_tmp;
        }
      }
      __syncthreads();
    }
  }
}

// 1 + the number of prefix sums of the sorted values that stay <= gamma (step 2), sequential.
__device__ int64_t coverage_count(const double* sorted, int64_t count, double gamma) {
  int64_t result = 1;
  double cumulative = 0.0;
  for (int64_t t = 0; t < count; ++t) {
    cumulative = __dadd_rn(cumulative, sorted[t]);
    if (cumulative > gamma) break;
    ++result;
  }
  return result;
}

struct Budget {
  double gamma, tau;
  int64_t min_blocks, max_blocks;
};

// Block per head: steps 2-5. sorted_vs [Hq, 2, padded_n] (sorted vertical / slash values);
// blk [Hq, 2, nb] gets vertical_blk / slash_blk with the always-kept blocks set to +inf;
// abar [Hq, nb] is scratch.
__global__ void head_decision_kernel(double* blk, double* abar, int32_t* query_aware,
                                     double* js_distance, int64_t* num_vertical, int64_t* num_slash,
                                     const double* vs, const double* sorted_vs, int64_t padded_n,
                                     const double* q_mean, const double* k_means, Shape s,
                                     Budget budget) {
  const int64_t h = blockIdx.x;
  const int64_t nb = s.num_blocks;
  const int64_t n = s.seq_len;
  double* v_blk = blk + (h * 2) * nb;
  double* s_blk = blk + (h * 2 + 1) * nb;
  double* a = abar + h * nb;
  const double* k_mean = k_means + (h / s.group_size) * nb * s.head_dim;
  // Step 3: block sums (ascending positions); step 4: the logits of abar.
  for (int64_t b = threadIdx.x; b < nb; b += blockDim.x) {
    const int64_t end = min(n, (b + 1) * s.block_size);
    double v_sum = 0.0, s_sum = 0.0;
    for (int64_t j = b * s.block_size; j < end; ++j) {
      v_sum = __dadd_rn(v_sum, vs[(h * 2) * n + j]);
      s_sum = __dadd_rn(s_sum, vs[(h * 2 + 1) * n + j]);
    }
    v_blk[b] = v_sum;
    s_blk[b] = s_sum;
    a[b] = dot_double(q_mean + h * s.head_dim, k_mean + b * s.head_dim, s.head_dim);
  }
  __syncthreads();
  if (threadIdx.x != 0) return;
  // Step 2: budgets.
  const auto clamp_blocks = [&](int64_t count) {
    return min(max(count / kBudgetDivisor + 1, budget.min_blocks), budget.max_blocks);
  };
  int64_t n_vertical =
      clamp_blocks(coverage_count(sorted_vs + (h * 2) * padded_n, n, budget.gamma));
  int64_t n_slash =
      clamp_blocks(coverage_count(sorted_vs + (h * 2 + 1) * padded_n, n, budget.gamma));
  // Step 4: abar = softmax(a), then the JS distance to vertical_blk (sequential sums).
  double max_logit = -INFINITY;
  for (int64_t c = 0; c < nb; ++c) max_logit = fmax(max_logit, a[c]);
  double sum = 0.0;
  for (int64_t c = 0; c < nb; ++c) {
    a[c] = exp(__dsub_rn(a[c], max_logit));
    sum = __dadd_rn(sum, a[c]);
  }
  double js = 0.0;
  for (int64_t c = 0; c < nb; ++c) {
    const double p = a[c] / sum;
    const double q_c = v_blk[c];
    const double m = 0.5 * __dadd_rn(p, q_c);
    if (p > 0.0) js = __dadd_rn(js, __dmul_rn(__dmul_rn(0.5, p), log(p / m)));
    if (q_c > 0.0) js = __dadd_rn(js, __dmul_rn(__dmul_rn(0.5, q_c), log(q_c / m)));
  }
  const double distance = sqrt(fmax(js, 0.0));
  const bool is_query_aware = distance < budget.tau;
  if (is_query_aware) {
    n_vertical = budget.min_blocks;
    n_slash = budget.min_blocks;
  }
  // Step 5: the first key block and the main diagonal are always kept.
  v_blk[0] = INFINITY;
  s_blk[nb - 1] = INFINITY;
  query_aware[h] = is_query_aware ? 1 : 0;
  js_distance[h] = distance;
  num_vertical[h] = n_vertical;
  num_slash[h] = n_slash;
}

// Block per head: steps 6-7 on grid [Hq, nb, nb] (zeroed): the top columns and diagonals of the
// sorted block scores order [Hq, 2, padded_nb], expanded over the causal rows.
__global__ void fill_pattern_kernel(uint8_t* grid, const int32_t* order, int64_t padded_nb,
                                    const int64_t* num_vertical, const int64_t* num_slash,
                                    int64_t nb) {
  const int64_t h = blockIdx.x;
  uint8_t* g = grid + h * nb * nb;
  for (int64_t i = threadIdx.x; i < num_vertical[h] * nb; i += blockDim.x) {
    const int64_t col = order[(h * 2) * padded_nb + i / nb];
    const int64_t r = i % nb;
    if (r >= col) g[r * nb + col] = 1;
  }
  for (int64_t i = threadIdx.x; i < num_slash[h] * nb; i += blockDim.x) {
    const int64_t offset = nb - 1 - order[(h * 2 + 1) * padded_nb + i / nb];
    const int64_t r = i % nb;
    if (r >= offset) g[r * nb + r - offset] = 1;
  }
}

// Step 8, query-aware heads: tri [Hq, nb (nb + 1) / 2] gets the block-causal softmax of
// Qbar[r] . Kbar[c] for c <= r, at the triangle position r (r + 1) / 2 + c (row-major, so the
// order of positions is the order of the reference's flat indices r * nb + c). One thread per row.
__global__ void block_softmax_kernel(double* tri, const double* q_means, const double* k_means,
                                     const int32_t* query_aware, Shape s) {
  const int64_t nb = s.num_blocks;
  const int64_t total = s.num_q_heads * nb;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i % nb;
    const int64_t h = i / nb;
    if (query_aware[h] == 0) continue;
    const double* q_row = q_means + (h * nb + r) * s.head_dim;
    const double* k_mean = k_means + (h / s.group_size) * nb * s.head_dim;
    double* row = tri + h * (nb * (nb + 1) / 2) + r * (r + 1) / 2;
    double max_logit = -INFINITY;
    for (int64_t c = 0; c <= r; ++c) {
      row[c] = dot_double(q_row, k_mean + c * s.head_dim, s.head_dim);
      max_logit = fmax(max_logit, row[c]);
    }
    double sum = 0.0;
    for (int64_t c = 0; c <= r; ++c) {
      row[c] = exp(__dsub_rn(row[c], max_logit));
      sum = __dadd_rn(sum, row[c]);
    }
    for (int64_t c = 0; c <= r; ++c) row[c] /= sum;
  }
}

// Step 8, one thread per query-aware head: walk the sorted triangle entries, adding each to the
// grid while the sequential cumulative sum stays <= threshold (gamma * nb), as the reference.
__global__ void coverage_walk_kernel(uint8_t* grid, const double* sorted, const int32_t* order,
                                     int64_t padded_tri, const int32_t* query_aware,
                                     int64_t num_heads, int64_t nb, double threshold) {
  const int64_t h = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (h >= num_heads || query_aware[h] == 0) return;
  const int64_t num_entries = nb * (nb + 1) / 2;
  double cumulative = 0.0;
  for (int64_t t = 0; t < num_entries; ++t) {
    cumulative = __dadd_rn(cumulative, sorted[h * padded_tri + t]);
    if (cumulative > threshold) break;
    const int64_t position = order[h * padded_tri + t];
    // Row r of triangle position p: the largest r with r (r + 1) / 2 <= p.
    int64_t r = static_cast<int64_t>((sqrt(8.0 * static_cast<double>(position) + 1.0) - 1.0) / 2.0);
    while (r * (r + 1) / 2 > position) --r;
    while ((r + 1) * (r + 2) / 2 <= position) ++r;
    const int64_t c = position - r * (r + 1) / 2;
    grid[(h * nb + r) * nb + c] = 1;
  }
}

// row_counts [Hq * nb]: selected blocks of each row (all r + 1 causal ones when dense).
__global__ void row_count_kernel(int64_t* row_counts, const uint8_t* grid, int64_t num_rows,
                                 int64_t nb, bool dense) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < num_rows;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i % nb;
    int64_t count = 0;
    if (dense) {
      count = r + 1;
    } else {
      for (int64_t c = 0; c <= r; ++c) count += grid[i * nb + c];
    }
    row_counts[i] = count;
  }
}

// One block: row_offsets = exclusive scan of row_counts (num_rows + 1 entries), and each head's
// number of selected blocks.
__global__ void row_scan_kernel(int64_t* row_offsets, int64_t* num_selected,
                                const int64_t* row_counts, int64_t num_rows, int64_t nb) {
  __shared__ int64_t chunk_start[kScanThreads];
  const int64_t chunk = (num_rows + kScanThreads - 1) / kScanThreads;
  const int64_t begin = min(num_rows, threadIdx.x * chunk);
  const int64_t end = min(num_rows, begin + chunk);
  int64_t total = 0;
  for (int64_t i = begin; i < end; ++i) total += row_counts[i];
  chunk_start[threadIdx.x] = total;
  __syncthreads();
  if (threadIdx.x == 0) {
    int64_t running = 0;
    for (int t = 0; t < kScanThreads; ++t) {
      const int64_t count = chunk_start[t];
      chunk_start[t] = running;
      running += count;
    }
    row_offsets[num_rows] = running;
  }
  __syncthreads();
  int64_t running = chunk_start[threadIdx.x];
  for (int64_t i = begin; i < end; ++i) {
    row_offsets[i] = running;
    running += row_counts[i];
  }
  __syncthreads();
  const int64_t num_heads = num_rows / nb;
  for (int64_t h = threadIdx.x; h < num_heads; h += kScanThreads) {
    num_selected[h] = row_offsets[(h + 1) * nb] - row_offsets[h * nb];
  }
}

// col_idx of row i: its selected key blocks in ascending order.
__global__ void row_fill_kernel(int32_t* col_idx, const int64_t* row_offsets, const uint8_t* grid,
                                int64_t num_rows, int64_t nb, bool dense) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < num_rows;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i % nb;
    int64_t out = row_offsets[i];
    for (int64_t c = 0; c <= r; ++c) {
      if (dense || grid[i * nb + c] != 0) col_idx[out++] = static_cast<int32_t>(c);
    }
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

int64_t next_power_of_two(int64_t x) {
  int64_t p = 1;
  while (p < x) p *= 2;
  return p;
}

// Per-row counts, scan and column fill of out's CSR from grid (ignored when dense).
void build_csr(FlexPrefillDeviceSelection& out, const uint8_t* grid, bool dense,
               cudaStream_t stream) {
  const int64_t num_rows = out.num_heads * out.num_blocks;
  DeviceBuffer<int64_t> row_counts(static_cast<size_t>(num_rows));
  row_count_kernel<<<grid_for(num_rows, kThreads), kThreads, 0, stream>>>(
      row_counts.data(), grid, num_rows, out.num_blocks, dense);
  MF_CUDA_CHECK_LAUNCH();
  row_scan_kernel<<<1, kScanThreads, 0, stream>>>(out.row_offsets.data(),
                                                  out.num_selected_blocks.data(), row_counts.data(),
                                                  num_rows, out.num_blocks);
  MF_CUDA_CHECK_LAUNCH();
  row_fill_kernel<<<grid_for(num_rows, kThreads), kThreads, 0, stream>>>(
      out.col_idx.data(), out.row_offsets.data(), grid, num_rows, out.num_blocks, dense);
  MF_CUDA_CHECK_LAUNCH();
}

}  // namespace

void flex_prefill_select(FlexPrefillDeviceSelection& out, const bf16* q, const bf16* k,
                         const ops::SparseAttentionDims& dims, const ops::FlexPrefillParams& params,
                         cudaStream_t stream) {
  ops::check_sparse_attention_dims(dims, "flex_prefill_select (CUDA)");
  ops::check_flex_prefill_params(params);
  MF_CHECK(dims.seq_len >= 1, "flex_prefill_select (CUDA): seq_len must be >= 1, got {}",
           dims.seq_len);
  MF_CHECK(dims.head_dim <= kFlexPrefillMaxHeadDim,
           "flex_prefill_select (CUDA): head_dim must be in [1, {}], got {}",
           kFlexPrefillMaxHeadDim, dims.head_dim);
  const int64_t n = dims.seq_len;
  const int64_t bs = params.block_size;
  const int64_t nb = ceil_div(n, bs);
  MF_CHECK(nb <= kFlexPrefillMaxBlocks,
           "flex_prefill_select (CUDA): seq_len {} makes {} blocks of {}, more than the {} "
           "supported",
           n, nb, bs, kFlexPrefillMaxBlocks);
  const int64_t num_heads = dims.num_q_heads;
  const int64_t min_blocks = ceil_div(params.min_budget, bs);
  const int64_t max_blocks =
      params.max_budget > 0 ? std::min(ceil_div(params.max_budget, bs), nb) : nb;

  out.num_heads = num_heads;
  out.num_blocks = nb;
  out.block_size = bs;
  out.dense_fallback = n <= std::max(2 * bs, min_blocks * bs);
  out.row_offsets.resize(static_cast<size_t>(num_heads * nb + 1));
  out.col_idx.resize(static_cast<size_t>(num_heads * nb * (nb + 1) / 2));
  out.query_aware.resize(static_cast<size_t>(num_heads));
  out.js_distance.resize(static_cast<size_t>(num_heads));
  out.num_vertical_blocks.resize(static_cast<size_t>(num_heads));
  out.num_slash_blocks.resize(static_cast<size_t>(num_heads));
  out.num_selected_blocks.resize(static_cast<size_t>(num_heads));

  // Step 0: short inputs are dense.
  if (out.dense_fallback) {
    dense_stats_kernel<<<grid_for(num_heads, kThreads), kThreads, 0, stream>>>(
        out.query_aware.data(), out.js_distance.data(), out.num_vertical_blocks.data(),
        out.num_slash_blocks.data(), num_heads);
    MF_CUDA_CHECK_LAUNCH();
    build_csr(out, nullptr, true, stream);
    return;
  }

  const Shape s{n,
                num_heads,
                dims.num_kv_heads,
                dims.head_dim,
                bs,
                nb,
                num_heads / dims.num_kv_heads,
                1.0 / std::sqrt(static_cast<double>(dims.head_dim))};
  const int64_t d = dims.head_dim;
  DeviceBuffer<double> k_means(static_cast<size_t>(dims.num_kv_heads * nb * d));
  DeviceBuffer<double> q_means(static_cast<size_t>(num_heads * nb * d));
  block_means_kernel<<<grid_for(dims.num_kv_heads * nb * d, kThreads), kThreads, 0, stream>>>(
      k_means.data(), k, n, dims.num_kv_heads, d, bs, nb, 1.0);
  MF_CUDA_CHECK_LAUNCH();
  block_means_kernel<<<grid_for(num_heads * nb * d, kThreads), kThreads, 0, stream>>>(
      q_means.data(), q, n, num_heads, d, bs, nb, s.scale);
  MF_CUDA_CHECK_LAUNCH();

  // Step 1.
  DeviceBuffer<double> row_max(static_cast<size_t>(num_heads * bs));
  DeviceBuffer<double> row_sum(static_cast<size_t>(num_heads * bs));
  last_row_stats_kernel<<<dim3(static_cast<unsigned>(bs), static_cast<unsigned>(num_heads)),
                          kThreads, 0, stream>>>(row_max.data(), row_sum.data(), q, k, s);
  MF_CUDA_CHECK_LAUNCH();
  DeviceBuffer<double> vs(static_cast<size_t>(num_heads * 2 * n));  // [Hq, 2, N]
  vertical_slash_kernel<<<grid_for(num_heads * n, kThreads), kThreads, 0, stream>>>(
      vs.data(), row_max.data(), row_sum.data(), q, k, s);
  MF_CUDA_CHECK_LAUNCH();
  DeviceBuffer<double> q_mean(static_cast<size_t>(num_heads * d));
  last_query_mean_kernel<<<grid_for(num_heads * d, kThreads), kThreads, 0, stream>>>(q_mean.data(),
                                                                                     q, s);
  MF_CUDA_CHECK_LAUNCH();

  // Steps 2-5.
  const int64_t padded_n = next_power_of_two(n);
  DeviceBuffer<double> sorted_vs(static_cast<size_t>(num_heads * 2 * padded_n));
  DeviceBuffer<int32_t> order_vs(static_cast<size_t>(num_heads * 2 * padded_n));
  segmented_sort_kernel<<<static_cast<unsigned>(num_heads * 2), kSortThreads, 0, stream>>>(
      sorted_vs.data(), order_vs.data(), vs.data(), n, n, padded_n, nullptr, 1);
  MF_CUDA_CHECK_LAUNCH();
  DeviceBuffer<double> blk(static_cast<size_t>(num_heads * 2 * nb));  // [Hq, 2, nb]
  DeviceBuffer<double> abar(static_cast<size_t>(num_heads * nb));
  const Budget budget{params.gamma, params.tau, min_blocks, max_blocks};
  head_decision_kernel<<<static_cast<unsigned>(num_heads), kThreads, 0, stream>>>(
      blk.data(), abar.data(), out.query_aware.data(), out.js_distance.data(),
      out.num_vertical_blocks.data(), out.num_slash_blocks.data(), vs.data(), sorted_vs.data(),
      padded_n, q_mean.data(), k_means.data(), s, budget);
  MF_CUDA_CHECK_LAUNCH();

  // Steps 6-7.
  const int64_t padded_nb = next_power_of_two(nb);
  DeviceBuffer<double> sorted_blk(static_cast<size_t>(num_heads * 2 * padded_nb));
  DeviceBuffer<int32_t> order_blk(static_cast<size_t>(num_heads * 2 * padded_nb));
  segmented_sort_kernel<<<static_cast<unsigned>(num_heads * 2), kSortThreads, 0, stream>>>(
      sorted_blk.data(), order_blk.data(), blk.data(), nb, nb, padded_nb, nullptr, 1);
  MF_CUDA_CHECK_LAUNCH();
  DeviceBuffer<uint8_t> grid(static_cast<size_t>(num_heads * nb * nb));  // [Hq, nb, nb]
  grid.fill_zero(stream);
  fill_pattern_kernel<<<static_cast<unsigned>(num_heads), kThreads, 0, stream>>>(
      grid.data(), order_blk.data(), padded_nb, out.num_vertical_blocks.data(),
      out.num_slash_blocks.data(), nb);
  MF_CUDA_CHECK_LAUNCH();

  // Step 8 (the kernels skip heads that are not query-aware).
  if (params.tau > 0.0) {
    const int64_t num_tri = nb * (nb + 1) / 2;
    const int64_t padded_tri = next_power_of_two(num_tri);
    DeviceBuffer<double> tri(static_cast<size_t>(num_heads * num_tri));
    block_softmax_kernel<<<grid_for(num_heads * nb, kThreads), kThreads, 0, stream>>>(
        tri.data(), q_means.data(), k_means.data(), out.query_aware.data(), s);
    MF_CUDA_CHECK_LAUNCH();
    DeviceBuffer<double> sorted_tri(static_cast<size_t>(num_heads * padded_tri));
    DeviceBuffer<int32_t> order_tri(static_cast<size_t>(num_heads * padded_tri));
    segmented_sort_kernel<<<static_cast<unsigned>(num_heads), kSortThreads, 0, stream>>>(
        sorted_tri.data(), order_tri.data(), tri.data(), num_tri, num_tri, padded_tri,
        out.query_aware.data(), 1);
    MF_CUDA_CHECK_LAUNCH();
    coverage_walk_kernel<<<grid_for(num_heads, kThreads), kThreads, 0, stream>>>(
        grid.data(), sorted_tri.data(), order_tri.data(), padded_tri, out.query_aware.data(),
        num_heads, nb, params.gamma * static_cast<double>(nb));
    MF_CUDA_CHECK_LAUNCH();
  }

  build_csr(out, grid.data(), false, stream);
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
