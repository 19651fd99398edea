// MoE dispatch kernels. The row map is a stable counting sort over tiles of 1024 assignments:
// per-tile expert counts, a scan into each tile's first row per expert, then every assignment's
// rank inside its tile (warp match + per-warp counts). Scatter, gather and their backwards are row
// copies and fixed-order sums, 16 bytes per access where the row width allows; a scatter bounded
// by a device row count launches a block per row and the blocks past the count return at once.
#include <algorithm>

#include "core/error.h"
#include "cuda/cuda_check.h"
#include "cuda/kernel_util.cuh"
#include "cuda/moe_dispatch.h"

namespace moeforge::cuda {
namespace {

// Assignments per tile of the row map; one block of kTile threads (32 warps) per tile.
constexpr int kTile = 1024;
constexpr int kTileWarps = kTile / kWarpSize;
constexpr int kMaxExperts = 256;

// tile_counts[tile, e] = assignments of the tile routed to e.
__global__ void tile_counts_kernel(int32_t* tile_counts, const int32_t* expert_idx,
                                   int64_t num_assignments, int64_t num_experts) {
  __shared__ int32_t counts[kMaxExperts];
  for (int64_t e = threadIdx.x; e < num_experts; e += blockDim.x) counts[e] = 0;
  __syncthreads();
  const int64_t a = static_cast<int64_t>(blockIdx.x) * kTile + threadIdx.x;
  if (a < num_assignments && expert_idx[a] >= 0) atomicAdd(&counts[expert_idx[a]], 1);
  __syncthreads();
  for (int64_t e = threadIdx.x; e < num_experts; e += blockDim.x) {
    tile_counts[blockIdx.x * num_experts + e] = counts[e];
  }
}

// One thread per expert: tile_counts becomes each tile's first row for the expert (as if nothing
// were dropped), and expert_offsets the experts' row ranges (at most capacity - kept_before[e]
// rows each when capacity >= 0; kept_before, if not null, grows by the kept rows).
__global__ void tile_offsets_kernel(int32_t* expert_offsets, int32_t* tile_counts,
                                    int32_t* kept_before, int64_t num_tiles, int64_t num_experts,
                                    int64_t capacity) {
  __shared__ int32_t totals[kMaxExperts];
  const int64_t e = threadIdx.x;
  if (e < num_experts) {
    int32_t running = 0;
    for (int64_t t = 0; t < num_tiles; ++t) {
      const int32_t count = tile_counts[t * num_experts + e];
      tile_counts[t * num_experts + e] = running;
      running += count;
    }
    int64_t left = capacity;
    if (capacity >= 0 && kept_before != nullptr) {
      left = kept_before[e] < capacity ? capacity - kept_before[e] : 0;
    }
    const int32_t kept = capacity < 0 || running <= left ? running : static_cast<int32_t>(left);
    if (capacity >= 0 && kept_before != nullptr) kept_before[e] += kept;
    totals[e] = kept;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int32_t running = 0;
    for (int64_t i = 0; i < num_experts; ++i) {
      expert_offsets[i] = running;
      running += totals[i];
    }
    expert_offsets[num_experts] = running;
  }
  __syncthreads();
  if (e < num_experts) {
    for (int64_t t = 0; t < num_tiles; ++t) tile_counts[t * num_experts + e] += expert_offsets[e];
  }
}

// Rank of each assignment among the tile's assignments to the same expert, in order: within a
// warp by __match_any_sync, across the tile's warps by per-warp counts. An assignment whose row
// falls past its expert's kept rows (its rank reached the capacity) is dropped.
__global__ void assign_rows_kernel(int32_t* assignment_row, int32_t* row_token,
                                   const int32_t* tile_first_row, const int32_t* expert_offsets,
                                   const int32_t* expert_idx, int64_t num_assignments,
                                   int64_t num_experts, int64_t top_k) {
  __shared__ int32_t warp_counts[kTileWarps][kMaxExperts];
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  for (int64_t i = threadIdx.x; i < kTileWarps * num_experts; i += blockDim.x) {
    warp_counts[i / num_experts][i % num_experts] = 0;
  }
  __syncthreads();
  const int64_t a = static_cast<int64_t>(blockIdx.x) * kTile + threadIdx.x;
  const bool valid = a < num_assignments;
  const int32_t e = valid ? expert_idx[a] : -1;
  const unsigned same = __match_any_sync(0xffffffffu, e);
  const int rank_in_warp = __popc(same & ((1u << lane) - 1u));
  if (valid && e >= 0 && rank_in_warp == 0) warp_counts[warp][e] = __popc(same);
  __syncthreads();
  if (!valid) return;
  if (e < 0) {  // an expert of another rank
    assignment_row[a] = -1;
    return;
  }
  int32_t row = tile_first_row[blockIdx.x * num_experts + e] + rank_in_warp;
  for (int w = 0; w < warp; ++w) row += warp_counts[w][e];
  if (row >= expert_offsets[e + 1]) {
    assignment_row[a] = -1;
    return;
  }
  assignment_row[a] = row;
  row_token[row] = static_cast<int32_t>(a / top_k);
}

// local[a] = expert[a] - begin for the experts [begin, begin + count), else -1.
__global__ void localize_experts_kernel(int32_t* local, const int32_t* expert,
                                        int64_t num_assignments, int32_t begin, int32_t count) {
  const int64_t a = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (a >= num_assignments) return;
  const int32_t e = expert[a] - begin;
  local[a] = e >= 0 && e < count ? e : -1;
}

constexpr int kRowThreads = 256;
constexpr int kVec = 8;  // columns per thread and access in the vector kernels (c % 8 == 0)

// The row kernels take one block per row (or token); kVec = 1 is the scalar form, 8 the 16-byte
// vector form for c % 8 == 0 with aligned tensors. Sums run over the slots in order either way.
// The scatter's blocks past *used_rows (when not null) return at once.
template <int kWidth>
__global__ void scatter_rows_kernel(bf16* rows, const bf16* x, const int32_t* row_token,
                                    const int32_t* used_rows, int64_t c) {
  const int64_t r = blockIdx.x;
  if (used_rows != nullptr && r >= *used_rows) return;
  const int32_t token = row_token[r];
  bf16* dst = rows + r * c;
  if (token < 0) {
    for (int64_t j = threadIdx.x * kWidth; j < c; j += blockDim.x * kWidth) {
      if constexpr (kWidth == 1) {
        dst[j] = __float2bfloat16(0.0f);
      } else {
        *reinterpret_cast<uint4*>(dst + j) = make_uint4(0, 0, 0, 0);
      }
    }
    return;
  }
  const bf16* src = x + static_cast<int64_t>(token) * c;
  for (int64_t j = threadIdx.x * kWidth; j < c; j += blockDim.x * kWidth) {
    if constexpr (kWidth == 1) {
      dst[j] = src[j];
    } else {
      *reinterpret_cast<uint4*>(dst + j) = *reinterpret_cast<const uint4*>(src + j);
    }
  }
}

template <int kWidth>
__global__ void scatter_rows_backward_kernel(float* dx, const bf16* drows,
                                             const int32_t* assignment_row, int64_t top_k,
                                             int64_t c) {
  const int64_t t = blockIdx.x;
  for (int64_t j = threadIdx.x * kWidth; j < c; j += blockDim.x * kWidth) {
    float sum[kWidth] = {};
    for (int64_t slot = 0; slot < top_k; ++slot) {
      const int32_t r = assignment_row[t * top_k + slot];
      if (r < 0) continue;
      float v[kWidth];
      load_cols<kWidth>(v, drows + static_cast<int64_t>(r) * c + j);
#pragma unroll
      for (int i = 0; i < kWidth; ++i) sum[i] += v[i];
    }
    store_cols<kWidth>(dx + t * c + j, sum);
  }
}

template <int kWidth>
__global__ void combine_rows_kernel(float* out, const float* residual, const bf16* rows,
                                    const float* gates, const int32_t* assignment_row,
                                    int64_t top_k, int64_t c) {
  const int64_t t = blockIdx.x;
  for (int64_t j = threadIdx.x * kWidth; j < c; j += blockDim.x * kWidth) {
    float sum[kWidth] = {};
    for (int64_t slot = 0; slot < top_k; ++slot) {
      const int32_t r = assignment_row[t * top_k + slot];
      if (r < 0) continue;
      const float g = gates[t * top_k + slot];
      float v[kWidth];
      load_cols<kWidth>(v, rows + static_cast<int64_t>(r) * c + j);
#pragma unroll
      for (int i = 0; i < kWidth; ++i) sum[i] += g * v[i];
    }
    float res[kWidth] = {};
    if (residual != nullptr) load_cols<kWidth>(res, residual + t * c + j);
#pragma unroll
    for (int i = 0; i < kWidth; ++i) res[i] += sum[i];
    store_cols<kWidth>(out + t * c + j, res);
  }
}

// One block per token: drows for each slot, and dgates by a block reduction per slot.
template <int kWidth>
__global__ void combine_rows_backward_kernel(bf16* drows, float* dgates, const float* dout,
                                             const bf16* rows, const float* gates,
                                             const int32_t* assignment_row, int64_t top_k,
                                             int64_t c) {
  const int64_t t = blockIdx.x;
  __shared__ float partial[kRowThreads / kWarpSize];
  for (int64_t slot = 0; slot < top_k; ++slot) {
    const int32_t r = assignment_row[t * top_k + slot];
    float dot = 0.0f;
    if (r >= 0) {
      const float g = gates[t * top_k + slot];
      for (int64_t j = threadIdx.x * kWidth; j < c; j += blockDim.x * kWidth) {
        float dy[kWidth], y[kWidth], dr[kWidth];
        load_cols<kWidth>(dy, dout + t * c + j);
        load_cols<kWidth>(y, rows + static_cast<int64_t>(r) * c + j);
#pragma unroll
        for (int i = 0; i < kWidth; ++i) {
          dr[i] = g * dy[i];
          dot += dy[i] * y[i];
        }
        store_cols<kWidth>(drows + static_cast<int64_t>(r) * c + j, dr);
      }
    }
    dot = warp_sum(dot);
    if (threadIdx.x % kWarpSize == 0) partial[threadIdx.x / kWarpSize] = dot;
    __syncthreads();
    if (threadIdx.x == 0) {
      float total = 0.0f;
      for (int w = 0; w < kRowThreads / kWarpSize; ++w) total += partial[w];
      dgates[t * top_k + slot] = r >= 0 ? total : 0.0f;
    }
    __syncthreads();
  }
}

}  // namespace

namespace {

// The row map's tiles: at least one, so that an empty map still writes its offsets.
int64_t row_map_tiles(int64_t num_assignments) {
  return std::max<int64_t>(1, ceil_div(num_assignments, kTile));
}

// build_row_map's work; clear_rows: some assignments may be dropped (their rows unused).
// tile_rows: the scratch, [tiles, num_experts].
void row_map_kernels(int32_t* expert_offsets, int32_t* assignment_row, int32_t* row_token,
                     int32_t* tile_rows, const int32_t* expert_idx, int64_t num_tokens,
                     int64_t top_k, int64_t num_experts, int64_t capacity, bool clear_rows,
                     cudaStream_t stream, int32_t* kept_before) {
  MF_CHECK(num_experts > 0 && num_experts <= kMaxExperts,
           "build_row_map supports 1 to {} experts, got {}", kMaxExperts, num_experts);
  const int64_t num_assignments = num_tokens * top_k;
  const int64_t num_tiles = row_map_tiles(num_assignments);
  tile_counts_kernel<<<static_cast<unsigned>(num_tiles), kTile, 0, stream>>>(
      tile_rows, expert_idx, num_assignments, num_experts);
  MF_CUDA_CHECK_LAUNCH();
  tile_offsets_kernel<<<1, kMaxExperts, 0, stream>>>(expert_offsets, tile_rows, kept_before,
                                                     num_tiles, num_experts, capacity);
  MF_CUDA_CHECK_LAUNCH();
  if (num_assignments == 0) return;
  // With drops, the rows past the kept ones are unused: row_token -1 (all bits set).
  if (clear_rows) {
    MF_CUDA_CHECK(cudaMemsetAsync(row_token, 0xFF, num_assignments * sizeof(int32_t), stream));
  }
  assign_rows_kernel<<<static_cast<unsigned>(num_tiles), kTile, 0, stream>>>(
      assignment_row, row_token, tile_rows, expert_offsets, expert_idx, num_assignments,
      num_experts, top_k);
  MF_CUDA_CHECK_LAUNCH();
}

}  // namespace

int64_t row_map_scratch_ints(int64_t num_assignments, int64_t num_experts) {
  return row_map_tiles(num_assignments) * num_experts;
}

void build_row_map(int32_t* expert_offsets, int32_t* assignment_row, int32_t* row_token,
                   int32_t* scratch, const int32_t* expert_idx, int64_t num_tokens, int64_t top_k,
                   int64_t num_experts, int64_t capacity, cudaStream_t stream,
                   int32_t* kept_before) {
  row_map_kernels(expert_offsets, assignment_row, row_token, scratch, expert_idx, num_tokens, top_k,
                  num_experts, capacity, capacity >= 0, stream, kept_before);
}

void build_local_row_map(int32_t* expert_offsets, int32_t* assignment_row, int32_t* row_token,
                         int32_t* local_idx, int32_t* scratch, const int32_t* expert_idx,
                         int64_t num_tokens, int64_t top_k, int64_t expert_begin, int64_t num_local,
                         int64_t capacity, cudaStream_t stream) {
  const int64_t num_assignments = num_tokens * top_k;
  if (num_assignments > 0) {
    constexpr int kThreads = 256;
    localize_experts_kernel<<<static_cast<unsigned>(ceil_div(num_assignments, kThreads)), kThreads,
                              0, stream>>>(local_idx, expert_idx, num_assignments,
                                           static_cast<int32_t>(expert_begin),
                                           static_cast<int32_t>(num_local));
    MF_CUDA_CHECK_LAUNCH();
  }
  row_map_kernels(expert_offsets, assignment_row, row_token, scratch, local_idx, num_tokens, top_k,
                  num_local, capacity, true, stream, nullptr);
}

void scatter_rows(bf16* rows, const bf16* x, const int32_t* row_token, int64_t num_rows, int64_t c,
                  cudaStream_t stream) {
  scatter_rows(rows, x, row_token, nullptr, num_rows, c, stream);
}

void scatter_rows(bf16* rows, const bf16* x, const int32_t* row_token, const int32_t* used_rows,
                  int64_t num_rows, int64_t c, cudaStream_t stream) {
  if (num_rows == 0) return;
  const auto blocks = static_cast<unsigned>(num_rows);
  if (c % kVec == 0 && aligned_to(16, rows, x)) {
    scatter_rows_kernel<kVec><<<blocks, kRowThreads, 0, stream>>>(rows, x, row_token, used_rows, c);
  } else {
    scatter_rows_kernel<1><<<blocks, kRowThreads, 0, stream>>>(rows, x, row_token, used_rows, c);
  }
  MF_CUDA_CHECK_LAUNCH();
}

void scatter_rows_backward(float* dx, const bf16* drows, const int32_t* assignment_row,
                           int64_t num_tokens, int64_t top_k, int64_t c, cudaStream_t stream) {
  if (num_tokens == 0) return;
  const auto blocks = static_cast<unsigned>(num_tokens);
  if (c % kVec == 0 && aligned_to(16, dx, drows)) {
    scatter_rows_backward_kernel<kVec>
        <<<blocks, kRowThreads, 0, stream>>>(dx, drows, assignment_row, top_k, c);
  } else {
    scatter_rows_backward_kernel<1>
        <<<blocks, kRowThreads, 0, stream>>>(dx, drows, assignment_row, top_k, c);
  }
  MF_CUDA_CHECK_LAUNCH();
}

void combine_rows(float* out, const float* residual, const bf16* rows, const float* gates,
                  const int32_t* assignment_row, int64_t num_tokens, int64_t top_k, int64_t c,
                  cudaStream_t stream) {
  if (num_tokens == 0) return;
  const auto blocks = static_cast<unsigned>(num_tokens);
  if (c % kVec == 0 && aligned_to(16, out, residual, rows)) {
    combine_rows_kernel<kVec>
        <<<blocks, kRowThreads, 0, stream>>>(out, residual, rows, gates, assignment_row, top_k, c);
  } else {
    combine_rows_kernel<1>
        <<<blocks, kRowThreads, 0, stream>>>(out, residual, rows, gates, assignment_row, top_k, c);
  }
  MF_CUDA_CHECK_LAUNCH();
}

void combine_rows_backward(bf16* drows, float* dgates, const float* dout, const bf16* rows,
                           const float* gates, const int32_t* assignment_row, int64_t num_tokens,
                           int64_t top_k, int64_t c, cudaStream_t stream) {
  if (num_tokens == 0) return;
  const auto blocks = static_cast<unsigned>(num_tokens);
  if (c % kVec == 0 && aligned_to(16, drows, dout, rows)) {
    combine_rows_backward_kernel<kVec><<<blocks, kRowThreads, 0, stream>>>(
        drows, dgates, dout, rows, gates, assignment_row, top_k, c);
  } else {
    combine_rows_backward_kernel<1><<<blocks, kRowThreads, 0, stream>>>(
        drows, dgates, dout, rows, gates, assignment_row, top_k, c);
  }
  MF_CUDA_CHECK_LAUNCH();
}

}  // namespace moeforge::cuda
