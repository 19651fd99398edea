// Our causal GQA attention (see attention_fallback.h): the forward through the portable
// block-sparse kernel, and FlashAttention-2's backward in fp32 on bf16 inputs.
//
// Backward kernels: blocks of 8 warps work on 32 x 32 tiles (32 query rows x 32 keys). Each tile
// of q, dout, k and v is bf16 in shared memory with a row stride odd in 32-bit words, zero past
// head_dim and past seq, so lanes reading the rows of different keys hit different banks. For a
// tile, lane c and query row r = warp * 4 + n (n < 4) compute S and dP = dout v^T of (r, key c),
// then P = exp2(S * scale * log2 e - lse * log2 e) (0 where key > query or the row is past seq)
// and dS = P (dP - D), written to fp32 shared tiles. The accumulators live in registers: lane l
// owns dimensions l + 32 m (m < kDimsPerLane, head_dim <= 32 * kDimsPerLane, chosen at launch).
// - dk/dv kernel, grid (key blocks, KV heads, batch): warp w owns keys w * 4 + n of its block and
//   sums P^T dout and dS^T q over the query tiles from its block onwards (earlier rows see none of
//   its keys), for each query head of the group in turn: a fixed order, no atomics.
// - dq kernel, grid (query blocks, query heads, batch): warp w owns rows w * 4 + n and sums dS k
//   over the key tiles up to its block's last row.
// A row-parallel kernel computes D = rowsum(dout * out) (fp32) first.
#include "cuda/attention_fallback.h"

#include <cmath>

#include "core/error.h"
#include "cuda/cuda_check.h"
#include "cuda/kernel_util.cuh"
#include "ops/block_sparse_attention.h"

namespace moeforge::cuda {
namespace {

constexpr int kTile = 32;  // query rows and keys per tile; one key per lane
constexpr int kWarps = 8;
constexpr int kThreads = kWarps * kWarpSize;
constexpr int kRowsPerWarp = kTile / kWarps;  // query rows (dq kernel) or keys (dk/dv kernel)
constexpr int64_t kForwardBlock = 64;         // the dense causal layout's block size
constexpr float kLog2e = 1.4426950408889634f;
static_assert(kTile == kWarpSize, "the score step gives each lane one key of the tile");
static_assert(kTile % kWarps == 0, "each warp owns whole rows of a tile");

struct BackwardParams {
  bf16* dq;  // [batch, seq, num_q_heads, head_dim]
  bf16* dk;  // [batch, seq, num_kv_heads, head_dim]
  bf16* dv;
  const bf16* dout;    // like q
  const bf16* q;       // [batch, seq, num_q_heads, head_dim]
  const bf16* k;       // [batch, seq, num_kv_heads, head_dim]
  const bf16* v;       // like k
  const float* lse;    // [batch, num_q_heads, seq]
  const float* delta;  // [batch, num_q_heads, seq]
  int64_t seq;
  int num_q_heads, num_kv_heads, head_dim;
  int tile_stride;  // elements per shared-memory tile row: even, odd in 32-bit words
  float scale;      // 1 / sqrt(head_dim)
};

// Rows [pos0, pos0 + kTile) of one head of a token-major tensor (src points at position 0 of
// that head, consecutive positions row_elems apart) into a [kTile, tile_stride] tile.
__device__ void load_tile(bf16* tile, const bf16* src, int64_t row_elems, int64_t pos0,
                          const BackwardParams& a) {
  const bf16 zero = __float2bfloat16(0.0f);
  for (int idx = static_cast<int>(threadIdx.x); idx < kTile * a.tile_stride; idx += kThreads) {
    const int r = idx / a.tile_stride, c = idx % a.tile_stride;
    const int64_t pos = pos0 + r;
    tile[idx] = pos < a.seq && c < a.head_dim ? src[pos * row_elems + c] : zero;
  }
}

// lse (in log2 units) and D of the query rows [pos0, pos0 + kTile) of one (batch, head) row.
__device__ void load_row_stats(float* lse_log2, float* delta, const float* lse_src,
                               const float* delta_src, int64_t pos0, int64_t seq) {
  const int r = static_cast<int>(threadIdx.x);
  if (r >= kTile) return;
  const int64_t pos = pos0 + r;
  lse_log2[r] = pos < seq ? lse_src[pos] * kLog2e : 0.0f;
  delta[r] = pos < seq ? delta_src[pos] : 0.0f;
}

// P and dS [kTile, kTile] (fp32, row = query) of the tiles' query rows q_pos0 + r and keys
// k_pos0 + c; p_tile may be null (the dq kernel needs dS only).
__device__ void probabilities_and_score_grads(float* p_tile, float* ds_tile, const bf16* q_tile,
                                              const bf16* dout_tile, const bf16* k_tile,
                                              const bf16* v_tile, const float* lse_log2,
                                              const float* delta, int64_t q_pos0, int64_t k_pos0,
                                              const BackwardParams& a) {
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int num_pairs = (a.head_dim + 1) / 2;  // the odd head_dim's last pair ends in a zero
  const auto* k2 = reinterpret_cast<const __nv_bfloat162*>(k_tile + lane * a.tile_stride);
  const auto* v2 = reinterpret_cast<const __nv_bfloat162*>(v_tile + lane * a.tile_stride);
  float s[kRowsPerWarp], dp[kRowsPerWarp];
#pragma unroll
  for (int n = 0; n < kRowsPerWarp; ++n) s[n] = dp[n] = 0.0f;
  for (int p = 0; p < num_pairs; ++p) {
    const float2 kx = __bfloat1622float2(k2[p]), vx = __bfloat1622float2(v2[p]);
#pragma unroll
    for (int n = 0; n < kRowsPerWarp; ++n) {
      const int r = warp * kRowsPerWarp + n;
      const float2 qx = __bfloat1622float2(
          reinterpret_cast<const __nv_bfloat162*>(q_tile + r * a.tile_stride)[p]);
      const float2 ox = __bfloat1622float2(
          reinterpret_cast<const __nv_bfloat162*>(dout_tile + r * a.tile_stride)[p]);
      s[n] = fmaf(qx.y, kx.y, fmaf(qx.x, kx.x, s[n]));
      dp[n] = fmaf(ox.y, vx.y, fmaf(ox.x, vx.x, dp[n]));
    }
  }
  const float scale_log2 = a.scale * kLog2e;
  const int64_t key = k_pos0 + lane;
#pragma unroll
  for (int n = 0; n < kRowsPerWarp; ++n) {
    const int r = warp * kRowsPerWarp + n;
    const int64_t query = q_pos0 + r;
    const bool visible = query < a.seq && key <= query;
    const float prob = visible ? exp2f(s[n] * scale_log2 - lse_log2[r]) : 0.0f;
    if (p_tile != nullptr) p_tile[r * kTile + lane] = prob;
    ds_tile[r * kTile + lane] = prob * (dp[n] - delta[r]);
  }
}

// D [batch, num_q_heads, seq] = rowsum(dout * out), one warp per token-major row.
__global__ void __launch_bounds__(kThreads)
    attention_delta_kernel(float* delta, const bf16* dout, const bf16* out, int64_t num_rows,
                           int64_t seq, int num_q_heads, int head_dim) {
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int64_t first = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarpSize;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x / kWarpSize;
  for (int64_t row = first; row < num_rows; row += step) {  // row = (b * seq + pos) * heads + h
    float sum = 0.0f;
    for (int x = lane; x < head_dim; x += kWarpSize) {
      sum = fmaf(__bfloat162float(dout[row * head_dim + x]),
                 __bfloat162float(out[row * head_dim + x]), sum);
    }
    sum = warp_sum(sum);
    if (lane == 0) {
      const int64_t h = row % num_q_heads, token = row / num_q_heads;
      const int64_t b = token / seq, pos = token % seq;
      delta[(b * num_q_heads + h) * seq + pos] = sum;
    }
  }
}

template <int kDimsPerLane>
__global__ void __launch_bounds__(kThreads) attention_backward_dkdv_kernel(BackwardParams a) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int tile_elems = kTile * a.tile_stride;
  bf16* k_tile = reinterpret_cast<bf16*>(smem);  // [kTile, tile_stride] each
  bf16* v_tile = k_tile + tile_elems;
  bf16* q_tile = v_tile + tile_elems;
  bf16* dout_tile = q_tile + tile_elems;
  float* p_tile = reinterpret_cast<float*>(dout_tile + tile_elems);  // [kTile, kTile]
  float* ds_tile = p_tile + kTile * kTile;                           // [kTile, kTile]
  float* lse_log2 = ds_tile + kTile * kTile;                         // [kTile]
  float* delta = lse_log2 + kTile;                                   // [kTile]

  const int kv_head = static_cast<int>(blockIdx.y);
  const int64_t batch = blockIdx.z;
  const int64_t key0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int d = a.head_dim, group = a.num_q_heads / a.num_kv_heads;
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int64_t q_row = static_cast<int64_t>(a.num_q_heads) * d;
  const int64_t kv_row = static_cast<int64_t>(a.num_kv_heads) * d;
  const int64_t kv_offset = batch * a.seq * kv_row + kv_head * d;
  load_tile(k_tile, a.k + kv_offset, kv_row, key0, a);
  load_tile(v_tile, a.v + kv_offset, kv_row, key0, a);

  float dk[kRowsPerWarp][kDimsPerLane], dv[kRowsPerWarp][kDimsPerLane];
#pragma unroll
  for (int n = 0; n < kRowsPerWarp; ++n) {
#pragma unroll
    for (int m = 0; m < kDimsPerLane; ++m) dk[n][m] = dv[n][m] = 0.0f;
  }
  for (int64_t query0 = key0; query0 < a.seq; query0 += kTile) {
    for (int h = kv_head * group; h < (kv_head + 1) * group; ++h) {
      __syncthreads();  // the previous tiles are consumed
      const int64_t q_offset = batch * a.seq * q_row + h * d;
      load_tile(q_tile, a.q + q_offset, q_row, query0, a);
      load_tile(dout_tile, a.dout + q_offset, q_row, query0, a);
      const int64_t stats_offset = (batch * a.num_q_heads + h) * a.seq;
      load_row_stats(lse_log2, delta, a.lse + stats_offset, a.delta + stats_offset, query0, a.seq);
      __syncthreads();
      probabilities_and_score_grads(p_tile, ds_tile, q_tile, dout_tile, k_tile, v_tile, lse_log2,
                                    delta, query0, key0, a);
      __syncthreads();
      for (int r = 0; r < kTile; ++r) {
        float p[kRowsPerWarp], ds[kRowsPerWarp];
#pragma unroll
        for (int n = 0; n < kRowsPerWarp; ++n) {
          p[n] = p_tile[r * kTile + warp * kRowsPerWarp + n];
          ds[n] = ds_tile[r * kTile + warp * kRowsPerWarp + n];
        }
#pragma unroll
        for (int m = 0; m < kDimsPerLane; ++m) {
          const int x = lane + kWarpSize * m;
          if (x >= d) break;
          const float o = __bfloat162float(dout_tile[r * a.tile_stride + x]);
          const float qx = __bfloat162float(q_tile[r * a.tile_stride + x]);
#pragma unroll
          for (int n = 0; n < kRowsPerWarp; ++n) {
            dv[n][m] = fmaf(p[n], o, dv[n][m]);
            dk[n][m] = fmaf(ds[n], qx, dk[n][m]);
          }
        }
      }
    }
  }
#pragma unroll
  for (int n = 0; n < kRowsPerWarp; ++n) {
    const int64_t key = key0 + warp * kRowsPerWarp + n;
    if (key >= a.seq) break;
#pragma unroll
    for (int m = 0; m < kDimsPerLane; ++m) {
      const int x = lane + kWarpSize * m;
      if (x >= d) break;
      const int64_t at = kv_offset + key * kv_row + x;
      a.dk[at] = __float2bfloat16_rn(dk[n][m] * a.scale);
      a.dv[at] = __float2bfloat16_rn(dv[n][m]);
    }
  }
}

template <int kDimsPerLane>
__global__ void __launch_bounds__(kThreads) attention_backward_dq_kernel(BackwardParams a) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int tile_elems = kTile * a.tile_stride;
  bf16* q_tile = reinterpret_cast<bf16*>(smem);  // [kTile, tile_stride] each
  bf16* dout_tile = q_tile + tile_elems;
  bf16* k_tile = dout_tile + tile_elems;
  bf16* v_tile = k_tile + tile_elems;
  float* ds_tile = reinterpret_cast<float*>(v_tile + tile_elems);  // [kTile, kTile]
  float* lse_log2 = ds_tile + kTile * kTile;                       // [kTile]
  float* delta = lse_log2 + kTile;                                 // [kTile]

  const int h = static_cast<int>(blockIdx.y);
  const int64_t batch = blockIdx.z;
  const int64_t query0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int d = a.head_dim, kv_head = h / (a.num_q_heads / a.num_kv_heads);
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int64_t q_row = static_cast<int64_t>(a.num_q_heads) * d;
  const int64_t kv_row = static_cast<int64_t>(a.num_kv_heads) * d;
  const int64_t q_offset = batch * a.seq * q_row + h * d;
  const int64_t kv_offset = batch * a.seq * kv_row + kv_head * d;
  load_tile(q_tile, a.q + q_offset, q_row, query0, a);
  load_tile(dout_tile, a.dout + q_offset, q_row, query0, a);
  const int64_t stats_offset = (batch * a.num_q_heads + h) * a.seq;
  load_row_stats(lse_log2, delta, a.lse + stats_offset, a.delta + stats_offset, query0, a.seq);

  float dq[kRowsPerWarp][kDimsPerLane];
#pragma unroll
  for (int n = 0; n < kRowsPerWarp; ++n) {
#pragma unroll
    for (int m = 0; m < kDimsPerLane; ++m) dq[n][m] = 0.0f;
  }
  const int64_t last_query = min(query0 + kTile, a.seq) - 1;
  for (int64_t key0 = 0; key0 <= last_query; key0 += kTile) {
    __syncthreads();  // the previous tiles are consumed
    load_tile(k_tile, a.k + kv_offset, kv_row, key0, a);
    load_tile(v_tile, a.v + kv_offset, kv_row, key0, a);
    __syncthreads();
    probabilities_and_score_grads(nullptr, ds_tile, q_tile, dout_tile, k_tile, v_tile, lse_log2,
                                  delta, query0, key0, a);
    __syncthreads();
    for (int c = 0; c < kTile; ++c) {
      float ds[kRowsPerWarp];
#pragma unroll
      for (int n = 0; n < kRowsPerWarp; ++n) ds[n] = ds_tile[(warp * kRowsPerWarp + n) * kTile + c];
#pragma unroll
      for (int m = 0; m < kDimsPerLane; ++m) {
        const int x = lane + kWarpSize * m;
        if (x >= d) break;
        const float kx = __bfloat162float(k_tile[c * a.tile_stride + x]);
#pragma unroll
        for (int n = 0; n < kRowsPerWarp; ++n) dq[n][m] = fmaf(ds[n], kx, dq[n][m]);
      }
    }
  }
#pragma unroll
  for (int n = 0; n < kRowsPerWarp; ++n) {
    const int64_t query = query0 + warp * kRowsPerWarp + n;
    if (query >= a.seq) break;
#pragma unroll
    for (int m = 0; m < kDimsPerLane; ++m) {
      const int x = lane + kWarpSize * m;
      if (x >= d) break;
      a.dq[q_offset + query * q_row + x] = __float2bfloat16_rn(dq[n][m] * a.scale);
    }
  }
}

template <typename Kernel>
void launch_tiles(Kernel kernel, dim3 grid, size_t smem, const BackwardParams& params,
                  cudaStream_t stream) {
  MF_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                     static_cast<int>(smem)));
  kernel<<<grid, kThreads, smem, stream>>>(params);
  MF_CUDA_CHECK_LAUNCH();
}

// The two tile kernels with kDimsPerLane the smallest that covers head_dim.
template <int kDimsPerLane>
void launch_backward(const BackwardParams& params, int64_t batch, cudaStream_t stream) {
  static_assert(kDimsPerLane * kWarpSize <= kAttentionFallbackMaxHeadDim);
  const auto blocks = static_cast<unsigned>(ceil_div(params.seq, kTile));
  const auto tile_bytes = static_cast<size_t>(kTile * params.tile_stride) * sizeof(bf16);
  const size_t stats_bytes = 2 * kTile * sizeof(float);
  const size_t score_bytes = kTile * kTile * sizeof(float);
  launch_tiles(
      attention_backward_dkdv_kernel<kDimsPerLane>,
      dim3(blocks, static_cast<unsigned>(params.num_kv_heads), static_cast<unsigned>(batch)),
      4 * tile_bytes + 2 * score_bytes + stats_bytes, params, stream);
  launch_tiles(
      attention_backward_dq_kernel<kDimsPerLane>,
      dim3(blocks, static_cast<unsigned>(params.num_q_heads), static_cast<unsigned>(batch)),
      4 * tile_bytes + score_bytes + stats_bytes, params, stream);
}

void check_shape(const AttentionShape& s, const char* what) {
  MF_CHECK(s.batch >= 0 && s.seq >= 0 && s.num_q_heads > 0 && s.num_kv_heads > 0,
           "{}: need batch >= 0, seq >= 0 and positive head counts, got {}, {}, {}, {}", what,
           s.batch, s.seq, s.num_q_heads, s.num_kv_heads);
  MF_CHECK(s.num_q_heads % s.num_kv_heads == 0,
           "{}: {} query heads are not a multiple of {} KV heads", what, s.num_q_heads,
           s.num_kv_heads);
  MF_CHECK(s.head_dim >= 1 && s.head_dim <= kAttentionFallbackMaxHeadDim,
           "{}: head_dim must be in [1, {}], got {}", what, kAttentionFallbackMaxHeadDim,
           s.head_dim);
  MF_CHECK(s.batch <= 65535 && s.num_q_heads <= 65535,
           "{}: batch {} and num_q_heads {} must be at most 65535 (grid dimensions)", what, s.batch,
           s.num_q_heads);
}

}  // namespace

void AttentionFallback::forward(bf16* out, float* lse, const bf16* q, const bf16* k, const bf16* v,
                                const AttentionShape& s, cudaStream_t stream) {
  check_shape(s, "attention forward (ours)");
  if (s.batch == 0 || s.seq == 0) return;
  if (layout_.num_heads != s.num_q_heads || layout_.num_blocks != ceil_div(s.seq, kForwardBlock)) {
    layout_ = upload_layout(ops::dense_causal_layout(s.num_q_heads, s.seq, kForwardBlock));
  }
  const ops::SparseAttentionDims dims{s.seq, s.num_q_heads, s.num_kv_heads, s.head_dim};
  const int64_t q_elems = s.seq * s.num_q_heads * s.head_dim;
  const int64_t kv_elems = s.seq * s.num_kv_heads * s.head_dim;
  for (int64_t b = 0; b < s.batch; ++b) {
    block_sparse_attention_forward(out + b * q_elems, lse + b * s.num_q_heads * s.seq,
                                   q + b * q_elems, k + b * kv_elems, v + b * kv_elems,
                                   layout_.view(), dims, stream, BlockSparseKernel::portable);
  }
}

void AttentionFallback::backward(bf16* dq, bf16* dk, bf16* dv, const bf16* dout, const bf16* q,
                                 const bf16* k, const bf16* v, const bf16* out, const float* lse,
                                 const AttentionShape& s, cudaStream_t stream) {
  check_shape(s, "attention backward (ours)");
  if (s.batch == 0 || s.seq == 0) return;
  const int64_t num_rows = s.batch * s.seq * s.num_q_heads;
  if (delta_.size() < static_cast<size_t>(num_rows)) delta_.resize(static_cast<size_t>(num_rows));
  attention_delta_kernel<<<grid_for(num_rows * kWarpSize, kThreads), kThreads, 0, stream>>>(
      delta_.data(), dout, out, num_rows, s.seq, static_cast<int>(s.num_q_heads),
      static_cast<int>(s.head_dim));
  MF_CUDA_CHECK_LAUNCH();

  int stride_words = static_cast<int>((s.head_dim + 1) / 2);
  if (stride_words % 2 == 0) ++stride_words;
  const BackwardParams params{dq,
                              dk,
                              dv,
                              dout,
                              q,
                              k,
                              v,
                              lse,
                              delta_.data(),
                              s.seq,
                              static_cast<int>(s.num_q_heads),
                              static_cast<int>(s.num_kv_heads),
                              static_cast<int>(s.head_dim),
                              2 * stride_words,
                              static_cast<float>(1.0 / std::sqrt(static_cast<double>(s.head_dim)))};
  if (s.head_dim <= 32) {
    launch_backward<1>(params, s.batch, stream);
  } else if (s.head_dim <= 64) {
    launch_backward<2>(params, s.batch, stream);
  } else if (s.head_dim <= 128) {
    launch_backward<4>(params, s.batch, stream);
  } else {
    launch_backward<8>(params, s.batch, stream);
  }
}

}  // namespace moeforge::cuda
