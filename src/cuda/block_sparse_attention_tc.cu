// The tensor-core block-sparse causal attention kernel (sm_80 and later; see
// block_sparse_attention.h), FlashAttention-2 style: a block of kWarps warps owns kWarps * 32 query
// rows of one head, each warp 32 of them (two 16-row MMA tiles, so every K and V fragment read from
// shared memory feeds two MMAs). Key tiles of 64 keys (32 at head_dim 128) stream through a
// two-stage cp.async pipeline in the order of the row's CSR list; S = Q K^T and O += P V run on
// mma.sync m16n8k16 (bf16 in, fp32 accumulate), with the online softmax in registers. P is rounded
// to bf16 for the P V product (as cuDNN and FlashAttention do); the row sums use the unrounded fp32
// values. Shared-memory rows are padded by 16 bytes so ldmatrix reads hit distinct banks. Blocks of
// threads are issued last query rows first: they hold the most key blocks.
#include <cmath>
#include <cstdint>

#include "cuda/block_sparse_attention_kernels.h"
#include "cuda/block_sparse_tile_walk.cuh"
#include "cuda/cuda_check.h"
#include "cuda/kernel_util.cuh"
#include "cuda/mma_util.cuh"

namespace moeforge::cuda {
namespace {

constexpr int kRowsPerWarp = 32;  // two m16 tiles
constexpr int kStages = 2;

// Keys per pipeline stage: 64, or 32 at head_dim 128, where the fp32 output tile (128 registers
// per thread) leaves no room for a 64-key score tile without spilling.
template <int kHeadDim>
constexpr int kKeysFor = kHeadDim > 64 ? 32 : 64;

template <int kHeadDim, int kWarps>
struct TileConfig {
  static constexpr int kKeys = kKeysFor<kHeadDim>;
  static constexpr int kRows = kWarps * kRowsPerWarp;
  static constexpr int kStride = kHeadDim + 8;        // bf16 elements per shared-memory row
  static constexpr int kChunksPerRow = kHeadDim / 8;  // 16-byte chunks
  static constexpr int kThreads = kWarps * 32;
  static constexpr size_t kSmemBytes =
      static_cast<size_t>(kRows + 2 * kStages * kKeys) * kStride * sizeof(bf16);
};

template <int kHeadDim, int kWarps>
__global__ void __launch_bounds__(kWarps * 32)
    block_sparse_attention_tc_kernel(BlockSparseLaunch a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using Cfg = TileConfig<kHeadDim, kWarps>;
  constexpr int kKeys = Cfg::kKeys;
  constexpr int kStride = Cfg::kStride;
  constexpr int kKSteps = kHeadDim / 16;   // k-steps of Q K^T
  constexpr int kKeyTiles = kKeys / 8;     // n-tiles of S
  constexpr int kDimTiles = kHeadDim / 8;  // n-tiles of O
  extern __shared__ __align__(16) unsigned char smem[];
  bf16* q_tile = reinterpret_cast<bf16*>(smem);    // [kRows, kStride]
  bf16* kv_tiles = q_tile + Cfg::kRows * kStride;  // [kStages][K, V][kKeys, kStride]

  const int head = static_cast<int>(blockIdx.y);
  const int kv_head = head / (a.num_q_heads / a.num_kv_heads);
  const int64_t row0 = static_cast<int64_t>(gridDim.x - 1 - blockIdx.x) * Cfg::kRows;
  const int tid = static_cast<int>(threadIdx.x);
  const int warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;  // MMA fragment row group and column pair
  const int64_t q_row_stride = static_cast<int64_t>(a.num_q_heads) * kHeadDim;
  const int64_t kv_row_stride = static_cast<int64_t>(a.num_kv_heads) * kHeadDim;
  const bf16* q_head = a.q + static_cast<int64_t>(head) * kHeadDim;
  const bf16* k_head = a.k + static_cast<int64_t>(kv_head) * kHeadDim;
  const bf16* v_head = a.v + static_cast<int64_t>(kv_head) * kHeadDim;

  for (int idx = tid; idx < Cfg::kRows * Cfg::kChunksPerRow; idx += Cfg::kThreads) {
    const int r = idx / Cfg::kChunksPerRow, c = idx % Cfg::kChunksPerRow;
    const int64_t pos = row0 + r;
    const bool valid = pos < a.seq_len;
    cp_async_16(q_tile + r * kStride + c * 8, valid ? q_head + pos * q_row_stride + c * 8 : a.q,
                valid);
  }
  cp_async_commit();

  const TileWalk<kKeys> walk(a, head, row0, Cfg::kRows);
  const auto load_tile = [&](TileCursor c, int stage) {
    bf16* k_dst = kv_tiles + stage * 2 * kKeys * kStride;
    bf16* v_dst = k_dst + kKeys * kStride;
    for (int idx = tid; idx < kKeys * Cfg::kChunksPerRow; idx += Cfg::kThreads) {
      const int j = idx / Cfg::kChunksPerRow, ch = idx % Cfg::kChunksPerRow;
      const int64_t key = c.t0 + j;
      const bool valid = key < c.key_end;
      const int64_t offset = key * kv_row_stride + ch * 8;
      cp_async_16(k_dst + j * kStride + ch * 8, valid ? k_head + offset : a.k, valid);
      cp_async_16(v_dst + j * kStride + ch * 8, valid ? v_head + offset : a.v, valid);
    }
    cp_async_commit();
  };

  float o[2][kDimTiles][4];
  float row_max[4], row_sum[4];  // rows g, g + 8, 16 + g, 24 + g of the warp
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    row_max[i] = -INFINITY;
    row_sum[i] = 0.0f;
  }
#pragma unroll
  for (int m = 0; m < 2; ++m)
#pragma unroll
    for (int n = 0; n < kDimTiles; ++n)
#pragma unroll
      for (int c = 0; c < 4; ++c) o[m][n][c] = 0.0f;

  const int64_t warp_row0 = row0 + warp * kRowsPerWarp;
  TileCursor cur = walk.first(walk.begin);
  if (walk.begin < walk.end) load_tile(cur, 0);
  for (int stage = 0; cur.e < walk.end; stage ^= 1) {
    const TileCursor next = walk.next(cur);
    if (next.e < walk.end) {
      load_tile(next, stage ^ 1);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const bf16* k_tile = kv_tiles + stage * 2 * kKeys * kStride;
    const bf16* v_tile = k_tile + kKeys * kStride;
    // Warps whose rows all precede the tile have nothing to add (causal).
    if (cur.t0 <= warp_row0 + kRowsPerWarp - 1) {
      float s[2][kKeyTiles][4];
#pragma unroll
      for (int m = 0; m < 2; ++m)
#pragma unroll
        for (int n = 0; n < kKeyTiles; ++n)
#pragma unroll
          for (int c = 0; c < 4; ++c) s[m][n][c] = 0.0f;
#pragma unroll
      for (int kk = 0; kk < kKSteps; ++kk) {
        uint32_t qa[2][4];
#pragma unroll
        for (int m = 0; m < 2; ++m) {
          ldmatrix_x4(qa[m], q_tile + (warp * kRowsPerWarp + 16 * m + lane % 16) * kStride +
                                 16 * kk + (lane / 16) * 8);
        }
#pragma unroll
        for (int p = 0; p < kKeys / 16; ++p) {
          uint32_t kb[4];
          ldmatrix_x4(kb, k_tile + (16 * p + (lane / 16) * 8 + lane % 8) * kStride + 16 * kk +
                              ((lane / 8) % 2) * 8);
#pragma unroll
          for (int m = 0; m < 2; ++m) {
            mma_bf16(s[m][2 * p], qa[m], kb[0], kb[1]);
            mma_bf16(s[m][2 * p + 1], qa[m], kb[2], kb[3]);
          }
        }
      }
      // Offsets within the tile: a key is masked past its row (causal) or past its block's end.
      const int key_shift = static_cast<int>(cur.t0 - warp_row0);
      const int key_limit = static_cast<int>(min(cur.key_end - cur.t0, int64_t{kKeys}));
      const bool needs_mask = key_shift + kKeys - 1 > 0 || key_limit < kKeys;
#pragma unroll
      for (int m = 0; m < 2; ++m)
#pragma unroll
        for (int n = 0; n < kKeyTiles; ++n)
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            float x = s[m][n][c] * a.scale_log2;
            if (needs_mask) {
              const int row = 16 * m + g + (c >= 2 ? 8 : 0);
              const int key = 8 * n + 2 * t + (c % 2);
              if (key + key_shift > row || key >= key_limit) x = -INFINITY;
            }
            s[m][n][c] = x;
          }
          // Online softmax per row: the tile's row maximum over the quad of lanes sharing the row.
#pragma unroll
      for (int m = 0; m < 2; ++m)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int i = 2 * m + half;
          float mx = -INFINITY;
#pragma unroll
          for (int n = 0; n < kKeyTiles; ++n)
            mx = fmaxf(mx, fmaxf(s[m][n][2 * half], s[m][n][2 * half + 1]));
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
          const float m_new = fmaxf(row_max[i], mx);
          // A row with no key so far keeps max -inf: exponentiate against 0 so nothing is NaN.
          const float base = m_new == -INFINITY ? 0.0f : m_new;
          const float correction = exp2f(row_max[i] - base);
          float sum = 0.0f;
#pragma unroll
          for (int n = 0; n < kKeyTiles; ++n) {
            const float p0 = exp2f(s[m][n][2 * half] - base);
            const float p1 = exp2f(s[m][n][2 * half + 1] - base);
            s[m][n][2 * half] = p0;
            s[m][n][2 * half + 1] = p1;
            sum += p0 + p1;
          }
          row_sum[i] = row_sum[i] * correction + sum;
          row_max[i] = m_new;
#pragma unroll
          for (int n = 0; n < kDimTiles; ++n) {
            o[m][n][2 * half] *= correction;
            o[m][n][2 * half + 1] *= correction;
          }
        }
        // O += P V: the S accumulators of key tiles 2j and 2j + 1 are the A fragment of k-step j.
#pragma unroll
      for (int j = 0; j < kKeys / 16; ++j) {
        uint32_t pa[2][4];
#pragma unroll
        for (int m = 0; m < 2; ++m) {
          pa[m][0] = pack_bf16(s[m][2 * j][0], s[m][2 * j][1]);
          pa[m][1] = pack_bf16(s[m][2 * j][2], s[m][2 * j][3]);
          pa[m][2] = pack_bf16(s[m][2 * j + 1][0], s[m][2 * j + 1][1]);
          pa[m][3] = pack_bf16(s[m][2 * j + 1][2], s[m][2 * j + 1][3]);
        }
#pragma unroll
        for (int q = 0; q < kHeadDim / 16; ++q) {
          uint32_t vb[4];
          ldmatrix_x4_trans(vb, v_tile + (16 * j + ((lane / 8) % 2) * 8 + lane % 8) * kStride +
                                    16 * q + (lane / 16) * 8);
#pragma unroll
          for (int m = 0; m < 2; ++m) {
            mma_bf16(o[m][2 * q], pa[m], vb[0], vb[1]);
            mma_bf16(o[m][2 * q + 1], pa[m], vb[2], vb[3]);
          }
        }
      }
    }
    __syncthreads();  // this stage is consumed before the next iteration refills it
    cur = next;
  }
  cp_async_wait<0>();  // a block with an empty row list still committed q

#pragma unroll
  for (int m = 0; m < 2; ++m)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int i = 2 * m + half;
      float sum = row_sum[i];
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      const int64_t pos = warp_row0 + 16 * m + g + 8 * half;
      if (pos >= a.seq_len) continue;
      // sum > 0: every row lists its diagonal block, which holds the row's own key.
      const float inv = 1.0f / sum;
      bf16* out_row = a.out + pos * q_row_stride + static_cast<int64_t>(head) * kHeadDim;
#pragma unroll
      for (int n = 0; n < kDimTiles; ++n) {
        *reinterpret_cast<__nv_bfloat162*>(out_row + 8 * n + 2 * t) =
            __floats2bfloat162_rn(o[m][n][2 * half] * inv, o[m][n][2 * half + 1] * inv);
      }
      if (a.lse != nullptr && t == 0) {
        a.lse[static_cast<int64_t>(head) * a.seq_len + pos] =
            (row_max[i] + log2f(sum)) * 0.69314718055994531f;
      }
    }
#else
  __trap();  // launched only on sm_80 and later (tensor_core_block_sparse_attention_runs)
#endif
}

template <int kHeadDim, int kWarps>
void launch(const BlockSparseLaunch& args, cudaStream_t stream) {
  using Cfg = TileConfig<kHeadDim, kWarps>;
  launch_over_query_blocks(block_sparse_attention_tc_kernel<kHeadDim, kWarps>, Cfg::kRows,
                           Cfg::kThreads, static_cast<int>(Cfg::kSmemBytes), args, stream);
}

}  // namespace

bool tensor_core_block_sparse_attention_runs(const BlockSparseLaunch& args, int device_major) {
  return device_major >= 8 && (args.head_dim == 64 || args.head_dim == 128) &&
         args.block_size % 64 == 0 && aligned_to(16, args.q, args.k, args.v, args.out);
}

void launch_tensor_core_block_sparse_attention(const BlockSparseLaunch& args, cudaStream_t stream) {
  // A block of threads covers 128 query rows where the block size allows (two 64-key fragments
  // of reuse per warp), else 64.
  const bool wide = args.block_size % 128 == 0;
  if (args.head_dim == 64) {
    wide ? launch<64, 4>(args, stream) : launch<64, 2>(args, stream);
  } else {
    wide ? launch<128, 4>(args, stream) : launch<128, 2>(args, stream);
  }
}

}  // namespace moeforge::cuda
