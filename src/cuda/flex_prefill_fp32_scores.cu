// Step 1 (and step 3's pooling) of the fp32 FlexPrefill search (cuda/flex_prefill_fp32.h) on
// tensor cores. A block of threads owns one query head's bs last-block rows (one warp per 32 rows,
// two m16 MMA tiles each) and one split of kFp32SplitKeys keys, which stream through a two-stage
// cp.async pipeline kFp32TileKeys at a time; S = Q K^T runs on mma.sync m16n8k16 (bf16 in, fp32
// accumulate) as in cuda/block_sparse_attention_tc.cu. Head_dim is a multiple of 8 padded with
// zeros to the MMA's 16; 64 and 128 are compiled in (constant strides and chunk counts, the MMA
// loop unrolled: at 128 and 32K keys pass 1 0.160 -> 0.129 ms, pass 2 0.198 -> 0.181 ms under
// ncu), others run on the same code with head_dim read at run time. Blocks of threads are issued
// heads fastest, so that the query heads of a KV head read the same keys at about the same time
// (from L2).
//  - Pass 1 (row_stats_kernel): per row and split the max of x = S * scale * log2(e) over the
//    visible keys (the max of S, times the factor) and the sum of 2^(S * factor - max) (one FFMA
//    per exponent; online: rescaled when the max grows).
//  - row_lse_kernel: lse2 = M + log2(sum over splits of sum * 2^(max - M)) in double, per row.
//  - Pass 2 (scores_kernel): p = 2^(S * factor - lse2) (FFMA, exp2_flush) in the registers of the
//    MMA's accumulator layout, and per tile:
//    - the column sums (vertical, complete: every row is in the block): a thread adds its 4 rows
//      of each of its 16 columns, a butterfly over the 8 lanes sharing those columns leaves each
//      lane 2 columns of the warp's 32 rows, and the warps' parts are added in shared memory;
//    - the diagonal sums: a thread adds its values of each diagonal (22 per thread: its keys and
//      rows differ by 8 j + 2 t + c - g, j in [-3, 7], c in {0, 1}), the parts go to a shared
//      [warp, diagonal, g] array in the key stage just multiplied (so that three blocks of
//      threads fit an SM), and a diagonal's sum is its 8 parts per warp, warps ascending,
//      accumulated over the split's tiles in shared memory; the split's diagonal sums go to global
//      memory (a diagonal spans bs keys, so its sum may continue in the next split).
//  - pool_kernel: slash = (the previous split's part + this split's part) / bs, and both kinds'
//    block sums in double.
// Every sum has a fixed order, so the results are deterministic.
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "core/error.h"
#include "cuda/accumulator_fragments.cuh"
#include "cuda/cuda_check.h"
#include "cuda/device_memory.h"
#include "cuda/flex_prefill_fp32.h"
#include "cuda/flex_prefill_fp32_passes.h"
#include "cuda/kernel_util.cuh"
#include "cuda/mma_util.cuh"

namespace moeforge::cuda {
namespace {

using flex::SearchShape;

constexpr int kTileKeys = static_cast<int>(kFp32TileKeys);
constexpr int kSplitKeys = static_cast<int>(kFp32SplitKeys);
constexpr int kRowsPerWarp = 32;          // two m16 tiles
constexpr int kKeyTiles = kTileKeys / 8;  // n-tiles of S
constexpr int kStages = 2;
// A warp's diagonals (key - row within its 32 rows and the tile's 64 keys) and their parts, one
// per lane row g: [kWarpDiagonals][8] floats per warp.
constexpr int kWarpDiagonals = kTileKeys + kRowsPerWarp - 1;
constexpr int kDiagonalParts = 8;
constexpr int kWarpParts = kWarpDiagonals * kDiagonalParts;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kPoolThreads = 128;

static_assert(kSplitKeys % kTileKeys == 0, "a split is whole tiles");
static_assert(kTileKeys == 64 && kRowsPerWarp == 32,
              "pass 2's sums follow the fragments of a 32 x 64 warp tile");
static_assert(kPoolThreads >= 128, "pool_kernel: a thread per position of a key block");

// One warp's S tile (see TileLoop::multiply).
using ScoreTile = float[2][kKeyTiles][4];

// bf16 elements per shared-memory row of Q and K: padded by 16 bytes so that ldmatrix reads hit
// distinct banks.
__host__ __device__ inline int tile_stride(int dim_pad) {
  return dim_pad + 8;
}

// bf16 elements per key stage: kTileKeys rows of keys or, in pass 2, at least the floats that
// reuse the stage once its keys are multiplied: the warps' diagonal parts [kWarps][kWarpParts]
// and column parts [kWarps][kTileKeys].
template <int kRows>
__host__ __device__ inline int stage_elems(int dim_pad, bool scores) {
  constexpr int kWarps = kRows / kRowsPerWarp;
  constexpr int kPartElems = kWarps * (kWarpParts + kTileKeys) * 2;
  const int keys = kTileKeys * tile_stride(dim_pad);
  return scores && kPartElems > keys ? kPartElems : keys;
}

// The shared memory of a pass: Q [kRows, stride], K [kStages][stage_elems] (bf16), then for pass 2
// the split's diagonal sums [kSplitKeys + kRows - 1] (floats).
template <int kRows>
size_t pass_smem_bytes(int dim_pad, bool scores) {
  const size_t tiles =
      (static_cast<size_t>(kRows) * static_cast<size_t>(tile_stride(dim_pad)) +
       static_cast<size_t>(kStages) * static_cast<size_t>(stage_elems<kRows>(dim_pad, scores))) *
      sizeof(bf16);
  const size_t extra = static_cast<size_t>(kSplitKeys + kRows - 1) * sizeof(float);
  return tiles + (scores ? extra : 0);
}

// The tile machinery both passes share: Q of head h's last bs rows in shared memory, key tiles of
// the block's split through a cp.async pipeline, and S = Q K^T of one tile per warp. kDim > 0:
// head_dim is kDim (a multiple of 16), known to the compiler (no padding, constant strides and
// divisions, the MMA loop unrolled); 0: any head_dim (args.dim_pad, args.head_dim).
template <int kRows, int kDim>
struct TileLoop {
  static constexpr int kWarps = kRows / kRowsPerWarp;
  static constexpr int kThreads = kWarps * 32;

  Fp32PassArgs a;
  bf16* q_tile;
  bf16* k_tiles;
  int stage_size;                              // bf16 elements per key stage
  int64_t h, kv_head, split_begin, split_end;  // keys [split_begin, split_end), < N

  __device__ TileLoop(const Fp32PassArgs& args, unsigned char* smem, int64_t head, int64_t split,
                      bool scores)
      : a(args),
        q_tile(reinterpret_cast<bf16*>(smem)),
        stage_size(stage_elems<kRows>(dim_pad(), scores)),
        h(head),
        kv_head(head / args.group_size),
        split_begin(split * kSplitKeys),
        split_end(min(args.seq_len, (split + 1) * int64_t{kSplitKeys})) {
    k_tiles = q_tile + kRows * stride();
  }

  __device__ int dim_pad() const {
    if constexpr (kDim > 0) return kDim;
    return a.dim_pad;
  }
  __device__ int stride() const { return tile_stride(dim_pad()); }
  __device__ int chunks_per_row() const { return dim_pad() / 8; }

  // 16-byte chunk c of a row of head_dim bf16: real when c * 8 < head_dim (head_dim % 8 == 0).
  __device__ bool real_chunk(int c) const {
    if constexpr (kDim > 0) return true;
    return c * 8 < a.head_dim;
  }

  __device__ void load_q() const {
    const int64_t first = a.seq_len - kRows;
    for (int idx = static_cast<int>(threadIdx.x); idx < kRows * chunks_per_row(); idx += kThreads) {
      const int r = idx / chunks_per_row(), c = idx % chunks_per_row();
      const bf16* src = a.q + ((first + r) * a.num_q_heads + h) * a.head_dim + c * 8;
      cp_async_16(q_tile + r * stride() + c * 8, real_chunk(c) ? src : a.q, real_chunk(c));
    }
    cp_async_commit();
  }

  // Keys [t0, t0 + kTileKeys) into stage `stage`; keys >= N are zeros (masked later).
  __device__ void load_k(int64_t t0, int stage) const {
    bf16* dst = k_tiles + stage * stage_size;
    for (int idx = static_cast<int>(threadIdx.x); idx < kTileKeys * chunks_per_row();
         idx += kThreads) {
      const int j = idx / chunks_per_row(), c = idx % chunks_per_row();
      const int64_t key = t0 + j;
      const bool valid = key < a.seq_len && real_chunk(c);
      const bf16* src = a.k + (key * a.num_kv_heads + kv_head) * a.head_dim + c * 8;
      cp_async_16(dst + j * stride() + c * 8, valid ? src : a.k, valid);
    }
    cp_async_commit();
  }

  // s = the warp's 32 rows times the tile's keys in stage `stage`: s[m][n][c] is row
  // 16 m + g + 8 (c / 2) of the warp, key 8 n + 2 t + c % 2 of the tile (g = lane / 4,
  // t = lane % 4).
  __device__ void multiply(ScoreTile& s, int stage) const {
    const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
    const bf16* k_tile = k_tiles + stage * stage_size;
#pragma unroll
    for (int m = 0; m < 2; ++m)
#pragma unroll
      for (int n = 0; n < kKeyTiles; ++n)
#pragma unroll
        for (int c = 0; c < 4; ++c) s[m][n][c] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < dim_pad() / 16; ++kk) {
      uint32_t qa[2][4];
#pragma unroll
      for (int m = 0; m < 2; ++m) {
        ldmatrix_x4(qa[m], q_tile + (warp * kRowsPerWarp + 16 * m + lane % 16) * stride() +
                               16 * kk + (lane / 16) * 8);
      }
#pragma unroll
      for (int p = 0; p < kTileKeys / 16; ++p) {
        uint32_t kb[4];
        ldmatrix_x4(kb, k_tile + (16 * p + (lane / 16) * 8 + lane % 8) * stride() + 16 * kk +
                            ((lane / 8) % 2) * 8);
#pragma unroll
        for (int m = 0; m < 2; ++m) {
          mma_bf16(s[m][2 * p], qa[m], kb[0], kb[1]);
          mma_bf16(s[m][2 * p + 1], qa[m], kb[2], kb[3]);
        }
      }
    }
  }

  // Runs body(s, t0, consumed) for every tile of the split with s = S and -inf at the keys that row
  // r (position N - kRows + r) does not see (key > N - kRows + r, which includes key >= N);
  // consumed is the tile's key stage, free for the body's own use once every warp has passed a
  // barrier after the multiply (the next load into it follows the body's closing barrier).
  template <typename Body>
  __device__ void for_each_tile(Body&& body) const {
    const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
    const int g = lane / 4, t = lane % 4;
    load_q();
    load_k(split_begin, 0);
    int stage = 0;
    int64_t t0 = split_begin;
    // One tile, masked if `masked` (std::true_type or std::false_type); then t0 and stage move on.
    const auto tile = [&](auto masked) {
      if (t0 + kTileKeys < split_end) {
        load_k(t0 + kTileKeys, stage ^ 1);
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
      __syncthreads();
      ScoreTile s;
      multiply(s, stage);
      if constexpr (decltype(masked)::value) {
        // Key t0 + key is visible to warp row `row` iff key <= shift + row (a masked tile starts
        // within kRows + kTileKeys keys of the end, so shift fits an int).
        const int shift = static_cast<int>(a.seq_len - kRows + warp * kRowsPerWarp - t0);
#pragma unroll
        for (int m = 0; m < 2; ++m)
#pragma unroll
          for (int n = 0; n < kKeyTiles; ++n)
#pragma unroll
            for (int c = 0; c < 4; ++c) {
              const int row = 16 * m + g + (c >= 2 ? 8 : 0);
              const int key = 8 * n + 2 * t + (c % 2);
              if (key > shift + row) s[m][n][c] = -INFINITY;
            }
      }
      body(s, t0, k_tiles + stage * stage_size);
      __syncthreads();  // this stage is consumed before the next iteration refills it
      t0 += kTileKeys;
      stage ^= 1;
    };
    // Only tiles reaching past the first row's position (N - kRows) hold keys that some row does
    // not see; they come last. The others run a copy of the loop without masking instructions
    // (predicated, those would still take issue slots).
    const int64_t first_masked = a.seq_len - kRows - kTileKeys + 2;
    while (t0 < split_end && t0 < first_masked) tile(std::false_type{});
    while (t0 < split_end) tile(std::true_type{});
  }
};

// Pass 1: partial [Hq, num_splits, kRows] = (max, sum of 2^(x - max)) of each row over the split's
// visible keys ((-inf, 0) when it sees none). Block (head, split).
template <int kRows, int kDim>
__global__ void __launch_bounds__(TileLoop<kRows, kDim>::kThreads)
    row_stats_kernel(float2* partial, Fp32PassArgs a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  extern __shared__ __align__(16) unsigned char smem[];
  const int64_t h = blockIdx.x, split = blockIdx.y;
  const TileLoop<kRows, kDim> loop(a, smem, h, split, false);
  float row_max[4], row_sum[4];  // warp rows g, g + 8, 16 + g, 24 + g
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    row_max[i] = -INFINITY;
    row_sum[i] = 0.0f;
  }
  loop.for_each_tile([&](ScoreTile& s, int64_t, bf16*) {
#pragma unroll
    for (int m = 0; m < 2; ++m)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int i = 2 * m + half;
        float mx = -INFINITY;
#pragma unroll
        for (int n = 0; n < kKeyTiles; ++n) {
          mx = fmaxf(mx, fmaxf(s[m][n][2 * half], s[m][n][2 * half + 1]));
        }
        mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, 2));
        // Rounding is monotone and the factor positive: the max of the rounded x is this.
        const float m_new = fmaxf(row_max[i], mx * a.scale_log2);
        // A row with no visible key so far keeps max -inf: exponentiate against 0 (no NaN).
        const float base = m_new == -INFINITY ? 0.0f : m_new;
        float sum = 0.0f;
#pragma unroll
        for (int n = 0; n < kKeyTiles; ++n) {
          sum += exp2_flush(fmaf(s[m][n][2 * half], a.scale_log2, -base));
          sum += exp2_flush(fmaf(s[m][n][2 * half + 1], a.scale_log2, -base));
        }
        row_sum[i] = row_sum[i] * exp2_flush(row_max[i] - base) + sum;
        row_max[i] = m_new;
      }
  });
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float sum = row_sum[i];
    sum += __shfl_xor_sync(kFullMask, sum, 1);
    sum += __shfl_xor_sync(kFullMask, sum, 2);
    if (lane % 4 == 0) {
      const int row = warp * kRowsPerWarp + 16 * (i / 2) + lane / 4 + 8 * (i % 2);
      partial[(h * a.num_splits + split) * kRows + row] = make_float2(row_max[i], sum);
    }
  }
#else
  __trap();  // launched only on sm_80 and later (check_fp32_search)
#endif
}

// lse2 [Hq * bs] = M + log2(sum_s sum_s 2^(max_s - M)), M the largest split max, in double; every
// row sees key 0, so M is finite.
__global__ void row_lse_kernel(float* lse2, const float2* partial, int64_t num_rows,
                               int64_t num_splits, int64_t block_size) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < num_rows;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t h = i / block_size, r = i % block_size;
    const float2* row = partial + h * num_splits * block_size + r;
    float best = -INFINITY;
    for (int64_t s = 0; s < num_splits; ++s) best = fmaxf(best, row[s * block_size].x);
    double sum = 0.0;
    for (int64_t s = 0; s < num_splits; ++s) {
      const float2 part = row[s * block_size];
      if (part.x > -INFINITY) {
        sum += static_cast<double>(part.y) *
               exp2(static_cast<double>(part.x) - static_cast<double>(best));
      }
    }
    lse2[i] = static_cast<float>(static_cast<double>(best) + log2(sum));
  }
}

// Pass 2: vs [Hq, 2, N] gets vertical (kind 0) of the split's keys; slash_part [Hq, num_splits,
// kSplitKeys + kRows - 1] the split's contribution to diagonals split_begin + e (the diagonal of
// key j and row r is j - r + kRows - 1). Block (head, split).
template <int kRows, int kDim>
__global__ void __launch_bounds__(TileLoop<kRows, kDim>::kThreads)
    scores_kernel(float* vs, float* slash_part, const float* lse2, Fp32PassArgs a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  constexpr int kThreads = TileLoop<kRows, kDim>::kThreads;
  constexpr int kWarps = TileLoop<kRows, kDim>::kWarps;
  constexpr int kDiagonals = kTileKeys + kRows - 1;  // of one tile
  constexpr int kSplitDiagonals = kSplitKeys + kRows - 1;
  constexpr int kJs = kKeyTiles + 3;  // j = n - 2 m - h in [-3, 7]
  // In-warp diagonals (plus 31) whose 8 parts all come from some lane: d + g in [-24, 63].
  constexpr int kFullFirst = 7, kFullLast = kWarpDiagonals - kDiagonalParts;
  extern __shared__ __align__(16) unsigned char smem[];
  const int64_t h = blockIdx.x, split = blockIdx.y;
  const TileLoop<kRows, kDim> loop(a, smem, h, split, true);
  float* diag_sums = reinterpret_cast<float*>(loop.k_tiles + kStages * loop.stage_size);
  const int tid = static_cast<int>(threadIdx.x);
  const int warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;
  for (int e = tid; e < kSplitDiagonals; e += kThreads) diag_sums[e] = 0.0f;
  float lse[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    lse[i] = lse2[h * kRows + warp * kRowsPerWarp + 16 * (i / 2) + g + 8 * (i % 2)];
  }

  loop.for_each_tile([&](ScoreTile& s, int64_t t0, bf16* consumed) {
    // The consumed key stage holds parts [kWarps][kWarpDiagonals][kDiagonalParts] (warp w's part
    // from lane row g of in-warp diagonal d = key - row, -31..63, at [w][d + 31][g]; the parts
    // no lane has hold stale keys and are never read) and col_parts [kWarps][kTileKeys].
    float* parts = reinterpret_cast<float*>(consumed);
    float* col_parts = parts + kWarps * kWarpParts;
    float* warp_parts = parts + warp * kWarpParts;
    // p = 2^(S * factor - lse2) in place (masked keys: 2^-inf = 0).
#pragma unroll
    for (int m = 0; m < 2; ++m)
#pragma unroll
      for (int n = 0; n < kKeyTiles; ++n)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          s[m][n][c] = exp2_flush(fmaf(s[m][n][c], a.scale_log2, -lse[2 * m + c / 2]));
        }
    // Columns: the lane's rows g, g + 8, 16 + g, 24 + g in that order, then the butterfly.
    float v[2 * kKeyTiles];
#pragma unroll
    for (int n = 0; n < kKeyTiles; ++n)
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        v[2 * n + c] = ((s[0][n][c] + s[0][n][2 + c]) + s[1][n][c]) + s[1][n][2 + c];
      }
    column_butterfly(v, lane);
    __syncthreads();  // every warp's MMAs have read the consumed stage's keys
    *reinterpret_cast<float2*>(col_parts + warp * kTileKeys + 8 * g + 2 * t) =
        make_float2(v[0], v[1]);
    // Diagonals: value (m, n, c) of the lane lies on in-warp diagonal 8 j + 2 t + c % 2 - g with
    // j = n - 2 m - c / 2; per (j, c % 2) the lane adds its values, m and then n ascending.
    float diag[2][kJs];
#pragma unroll
    for (int c = 0; c < 2; ++c)
#pragma unroll
      for (int j = 0; j < kJs; ++j) diag[c][j] = 0.0f;
#pragma unroll
    for (int m = 0; m < 2; ++m)
#pragma unroll
      for (int n = 0; n < kKeyTiles; ++n)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int j = n - 2 * m - c / 2 + 3;
          diag[c % 2][j] += s[m][n][c];
        }
#pragma unroll
    for (int c = 0; c < 2; ++c)
#pragma unroll
      for (int j = 0; j < kJs; ++j) {
        // d + 31 with d = 8 (j - 3) + 2 t + c - g.
        warp_parts[(8 * j + 7 + 2 * t + c - g) * kDiagonalParts + g] = diag[c][j];
      }
    __syncthreads();
    const int64_t key = t0 + tid;
    if (tid < kTileKeys && key < a.seq_len) {
      float col_sum = col_parts[tid];
#pragma unroll
      for (int w = 1; w < kWarps; ++w) col_sum += col_parts[w * kTileKeys + tid];
      vs[(h * 2) * a.seq_len + key] = col_sum * (1.0f / static_cast<float>(kRows));
    }
    // Tile diagonal e (key t0 + c, tile row r with c - r + kRows - 1 = e) is in-warp diagonal
    // e - (kRows - 1) + 32 w of warp w: the 8 parts of each warp that has it, warps ascending.
    for (int e = tid; e < kDiagonals; e += kThreads) {
      float sum = 0.0f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        const int dw = e - (kRows - 1) + kRowsPerWarp * w + kRowsPerWarp - 1;  // d + 31
        if (dw < 0 || dw >= kWarpDiagonals) continue;
        const float* part = parts + w * kWarpParts + dw * kDiagonalParts;
        if (dw >= kFullFirst && dw <= kFullLast) {
          const float4 lo = reinterpret_cast<const float4*>(part)[0];
          const float4 hi = reinterpret_cast<const float4*>(part)[1];
          sum = sum + lo.x + lo.y + lo.z + lo.w + hi.x + hi.y + hi.z + hi.w;
        } else {
#pragma unroll
          for (int p = 0; p < kDiagonalParts; ++p) {
            if (dw + p >= kFullFirst && dw + p < kWarpDiagonals) sum = sum + part[p];
          }
        }
      }
      diag_sums[t0 - loop.split_begin + e] += sum;
    }
  });
  float* part = slash_part + (h * a.num_splits + split) * kSplitDiagonals;
  for (int e = tid; e < kSplitDiagonals; e += kThreads) part[e] = diag_sums[e];
#else
  __trap();  // launched only on sm_80 and later (check_fp32_search)
#endif
}

// Block (key block b, head), kPoolThreads threads: slash of the block's positions i = (the part
// of split i / kSplitKeys - 1, when diagonal i reaches into it, + the part of split i /
// kSplitKeys) / bs into vs (kind 1); then pooled [Hq, 2, nb] = both kinds' block sums in double,
// by a fixed tree (a butterfly per warp, then the warps ascending) rather than a chain of bs
// dependent additions.
__global__ void __launch_bounds__(kPoolThreads)
    pool_kernel(double* pooled, float* vs, const float* slash_part, int64_t seq_len,
                int64_t block_size, int64_t num_blocks, int64_t num_splits) {
  constexpr int kWarps = kPoolThreads / 32;
  __shared__ double warp_sums[2][kWarps];
  const int64_t b = blockIdx.x, h = blockIdx.y;
  const int tid = static_cast<int>(threadIdx.x);
  const int64_t split_diagonals = kSplitKeys + block_size - 1;
  const int64_t length = min(block_size, seq_len - b * block_size);
  float* vertical = vs + (h * 2) * seq_len;
  float* slash = vs + (h * 2 + 1) * seq_len;
  double sums[2] = {0.0, 0.0};  // this position's values (+0.0 past the block)
  if (tid < length) {
    const int64_t i = b * block_size + tid;
    const int64_t split = i / kSplitKeys, offset = i % kSplitKeys;
    const float* parts = slash_part + h * num_splits * split_diagonals;
    float sum = parts[split * split_diagonals + offset];
    if (split > 0 && offset < block_size - 1) {
      sum = parts[(split - 1) * split_diagonals + kSplitKeys + offset] + sum;
    }
    const float value = sum * (1.0f / static_cast<float>(block_size));
    slash[i] = value;
    sums[0] = static_cast<double>(vertical[i]);
    sums[1] = static_cast<double>(value);
  }
#pragma unroll
  for (int kind = 0; kind < 2; ++kind) {
#pragma unroll
    for (int mask = 16; mask > 0; mask /= 2) {
      sums[kind] += __shfl_xor_sync(kFullMask, sums[kind], mask);
    }
    if (tid % 32 == 0) warp_sums[kind][tid / 32] = sums[kind];
  }
  __syncthreads();
  if (tid < 2) {
    double total = warp_sums[tid][0];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) total += warp_sums[tid][w];
    pooled[(h * 2 + tid) * num_blocks + b] = total;
  }
}

void launch_row_lse(float* lse2, const float2* partial, const Fp32PassArgs& args,
                    cudaStream_t stream) {
  const int64_t num_rows = args.num_q_heads * args.block_size;
  row_lse_kernel<<<grid_for(num_rows, 128), 128, 0, stream>>>(lse2, partial, num_rows,
                                                              args.num_splits, args.block_size);
  MF_CUDA_CHECK_LAUNCH();
}

template <int kRows, int kDim>
void launch_passes_for(float* vs, float* slash_part, float2* partial, float* lse2,
                       const Fp32PassArgs& args, cudaStream_t stream) {
  constexpr int kThreads = TileLoop<kRows, kDim>::kThreads;
  const dim3 grid(static_cast<unsigned>(args.num_q_heads), static_cast<unsigned>(args.num_splits));
  const size_t stats_smem = pass_smem_bytes<kRows>(args.dim_pad, false);
  MF_CUDA_CHECK(cudaFuncSetAttribute(row_stats_kernel<kRows, kDim>,
                                     cudaFuncAttributeMaxDynamicSharedMemorySize,
                                     static_cast<int>(stats_smem)));
  row_stats_kernel<kRows, kDim><<<grid, kThreads, stats_smem, stream>>>(partial, args);
  MF_CUDA_CHECK_LAUNCH();
  launch_row_lse(lse2, partial, args, stream);
  const size_t scores_smem = pass_smem_bytes<kRows>(args.dim_pad, true);
  MF_CUDA_CHECK(cudaFuncSetAttribute(scores_kernel<kRows, kDim>,
                                     cudaFuncAttributeMaxDynamicSharedMemorySize,
                                     static_cast<int>(scores_smem)));
  scores_kernel<kRows, kDim><<<grid, kThreads, scores_smem, stream>>>(vs, slash_part, lse2, args);
  MF_CUDA_CHECK_LAUNCH();
}

// The mma.sync passes with head_dim 64 or 128 known to the compiler, others at run time.
template <int kRows>
void launch_passes(float* vs, float* slash_part, float2* partial, float* lse2,
                   const Fp32PassArgs& args, cudaStream_t stream) {
  if (args.head_dim == 128) {
    launch_passes_for<kRows, 128>(vs, slash_part, partial, lse2, args, stream);
  } else if (args.head_dim == 64) {
    launch_passes_for<kRows, 64>(vs, slash_part, partial, lse2, args, stream);
  } else {
    launch_passes_for<kRows, 0>(vs, slash_part, partial, lse2, args, stream);
  }
}

// Whether the Hopper passes run: `passes` asks for them or for the automatic choice where they can.
bool use_hopper_passes(const Fp32PassArgs& args, Fp32Passes passes) {
  int device = 0, major = 0;
  MF_CUDA_CHECK(cudaGetDevice(&device));
  MF_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  const bool hopper_runs = hopper_fp32_passes_run(args, major);
  MF_CHECK(passes != Fp32Passes::hopper || hopper_runs,
           "fp32 FlexPrefill search: the Hopper passes need an sm_90 device, head_dim 64 or 128, "
           "block size 64 or 128 and N < 2^31 (device {} is {}.x, head_dim {}, block size {})",
           device, major, args.head_dim, args.block_size);
  return passes == Fp32Passes::hopper || (passes == Fp32Passes::automatic && hopper_runs);
}

}  // namespace

size_t fp32_scores_smem_bytes(const SearchShape& s) {
  const int dim_pad = static_cast<int>(ceil_div(s.head_dim, 16) * 16);
  return s.block_size == 128 ? pass_smem_bytes<128>(dim_pad, true)
                             : pass_smem_bytes<64>(dim_pad, true);
}

void fp32_vertical_slash(float* vs, double* pooled, const bf16* q, const bf16* k,
                         const SearchShape& s, cudaStream_t stream, Fp32Passes passes) {
  const int64_t bs = s.block_size;
  const int64_t num_splits = ceil_div(s.seq_len, kSplitKeys);
  const Fp32PassArgs args{q,
                          k,
                          s.seq_len,
                          s.num_q_heads,
                          s.num_kv_heads,
                          s.head_dim,
                          s.group_size,
                          num_splits,
                          bs,
                          static_cast<int>(ceil_div(s.head_dim, 16) * 16),
                          static_cast<float>(s.scale * 1.4426950408889634)};
  DeviceBuffer<float2> partial(static_cast<size_t>(s.num_q_heads * num_splits * bs));
  DeviceBuffer<float> lse2(static_cast<size_t>(s.num_q_heads * bs));
  DeviceBuffer<float> slash_part(
      static_cast<size_t>(s.num_q_heads * num_splits * (kSplitKeys + bs - 1)));
  if (use_hopper_passes(args, passes)) {
    launch_hopper_row_stats(partial.data(), args, stream);
    launch_row_lse(lse2.data(), partial.data(), args, stream);
    launch_hopper_scores(vs, slash_part.data(), lse2.data(), args, stream);
  } else if (bs == 128) {
    launch_passes<128>(vs, slash_part.data(), partial.data(), lse2.data(), args, stream);
  } else {
    launch_passes<64>(vs, slash_part.data(), partial.data(), lse2.data(), args, stream);
  }
  pool_kernel<<<dim3(static_cast<unsigned>(s.num_blocks), static_cast<unsigned>(s.num_q_heads)),
                kPoolThreads, 0, stream>>>(pooled, vs, slash_part.data(), s.seq_len, bs,
                                           s.num_blocks, num_splits);
  MF_CUDA_CHECK_LAUNCH();
}

}  // namespace moeforge::cuda
