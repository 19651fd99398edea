// The fp32 FlexPrefill search's two passes on Hopper (sm_90a, head_dim 64 and 128; the contract is
// cuda/flex_prefill_fp32_passes.h). A block of threads owns one query head's bs last-block rows
// and one split of kFp32SplitKeys keys, as the mma.sync kernels (cuda/flex_prefill_fp32_scores.cu),
// but warp specialised as the block-sparse attention kernel (cuda/block_sparse_attention_sm90.cu):
// a producer warp loads Q once and the split's 64-key tiles by TMA into a ring of stages
// (mbarriers `full` and `empty`), and bs / 64 consumer warpgroups own 64 rows each (16 per warp)
// and compute S = Q K^T of every tile with wgmma m64n64k16 from shared memory. The accumulator
// layout is mma.sync's m16n8 one per warp (s[4 n + 2 half + c]: row g + 8 half of the warp's 16,
// key 8 n + 2 t + c of the tile), so the arithmetic per value is the mma.sync kernels':
//  - pass 1: per row the tile's max, then the sum of 2^(S * factor - max) (one FFMA per exponent)
//    over the lane's 16 keys in a chain, rescaled when the max grows;
//  - pass 2: p = 2^(S * factor - lse2); the column sums by the butterfly over the 8 lanes sharing
//    a column (xor 16, 8, 4); for the diagonals each lane adds its values of in-warp diagonal
//    d = key - row = 8 j + 2 t + c - g (j = n - half in [-1, 7], at most two values). Every warp
//    stores its 64 column parts and, per lane row g, the 72 diagonal parts R_g[d + g] into one of
//    two parts buffers (tile i into buffer i % 2, so that one barrier a tile suffices); after the
//    barrier the threads add them up (a column: warps ascending; a warp's diagonal d: its parts
//    R_g[d + g] by a tree over g, then warps ascending) and accumulate the diagonals over the
//    split's tiles in shared memory. Measured and not kept (pass 2 at 32K under ncu, 126 us this
//    way; see docs/benchmarks.md): one parts buffer behind two barriers a tile (160 us), and two
//    dedicated combine warps fed through named barriers (203 us: they could not keep up).
// The stages go back to the producer as soon as the tile's wgmmas complete (the sums live in
// registers and their own arrays). At bs 128 and head_dim 128 three blocks of threads fit an SM in
// pass 1 (65 KB of shared memory each) and two in pass 2 (109 KB).
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "core/error.h"
#include "cuda/accumulator_fragments.cuh"
#include "cuda/cuda_check.h"
#include "cuda/flex_prefill_fp32.h"
#include "cuda/flex_prefill_fp32_passes.h"
#include "cuda/hopper_util.cuh"
#include "cuda/kernel_util.cuh"
#include "cuda/mma_util.cuh"
#include "cuda/tensor_map.h"

namespace moeforge::cuda {
namespace {

constexpr int kTileKeys = static_cast<int>(kFp32TileKeys);
constexpr int kSplitKeys = static_cast<int>(kFp32SplitKeys);
constexpr int kRowsPerWarp = 16;          // one wgmma m64 slice
constexpr int kRowParts = kTileKeys + 8;  // R_g[d + g], d + g = 8 j + 2 t + c in [-8, 64)
constexpr int kWarpFloats = 8 * kRowParts + kTileKeys;  // a warp's diagonal and column parts

static_assert(kTileKeys == 64, "S tiles are wgmma m64n64");
static_assert(kSplitKeys % kTileKeys == 0, "a split is whole tiles");

// The layout of a block of threads: kRows = bs rows (64 per compute warpgroup), head_dim kDim, two
// key stages; pass 2 (kScores) adds two parts buffers and the split's diagonal sums.
template <int kRows, int kDim, bool kScores>
struct PassConfig {
  static_assert(kRows == 64 || kRows == 128);
  static_assert(kDim == 64 || kDim == 128);
  static constexpr int kWarps = kRows / kRowsPerWarp;  // compute warps
  static constexpr int kConsumerThreads = 32 * kWarps;
  static constexpr int kThreads = kConsumerThreads + 32;  // and the producer warp
  static constexpr int kMinBlocks = kScores ? 2 : 3;      // per SM
  static constexpr int kStages = 2;
  static constexpr int kQBytes = kRows * kDim * 2;
  static constexpr int kTileBytes = kTileKeys * kDim * 2;
  static constexpr int kBarrierBytes = 16 * (1 + 2 * kStages);  // rounded up for the floats after
  static constexpr int kPartsFloats = kScores ? 2 * kWarps * kWarpFloats : 0;
  static constexpr int kSplitDiagonals = kSplitKeys + kRows - 1;
  static constexpr size_t kSmemBytes = static_cast<size_t>(kQBytes) + kStages * kTileBytes +
                                       kBarrierBytes +
                                       (kScores ? (kPartsFloats + kSplitDiagonals) * 4 : 0);
  static_assert(kSmemBytes * kMinBlocks + 1024 * kMinBlocks <= 228 * 1024,
                "kMinBlocks blocks of threads per SM");
};

// The launch arguments: the shapes and TMA descriptors of Q ([N, Hq * D], boxes of 64 columns x
// kRows rows) and K ([N, Hkv * D], boxes of 64 columns x 64 rows).
struct HopperPassArgs {
  Fp32PassArgs a;
  CUtensorMap q_map, k_map;
};

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
constexpr int kKeyTiles = kTileKeys / 8;  // n8 blocks of S
constexpr unsigned kFullMask = 0xffffffffu;

// One warp's S of a tile: s[4 n + 2 half + c] is row g + 8 half of the warp's 16, key 8 n + 2 t + c
// of the tile (g = lane / 4, t = lane % 4).
using WarpScores = float[kTileKeys / 2];

// The pipeline both passes share. The producer warp runs produce(); each consumer warp runs
// consume(body), which calls body(s, t0, masked) for every tile of the split in order, with s = S
// and -inf at the keys that a row does not see when masked (std::true_type: the tile reaches past
// the warpgroup's first row; the others get a copy without masking instructions).
template <int kRows, int kDim, bool kScores>
struct Pipeline {
  using Cfg = PassConfig<kRows, kDim, kScores>;
  const HopperPassArgs& args;
  unsigned char* q_tile;   // [kRows] rows in swizzled panels
  unsigned char* k_tiles;  // [kStages] tiles of 64 keys
  uint64_t* q_full;
  uint64_t* full;   // [kStages]
  uint64_t* empty;  // [kStages]
  int64_t h, kv_head, split_begin, split_end;
  int num_tiles, warp, lane;

  __device__ Pipeline(const HopperPassArgs& hopper_args, unsigned char* smem)
      : args(hopper_args),
        q_tile(smem),
        k_tiles(smem + Cfg::kQBytes),
        h(blockIdx.x),
        split_begin(static_cast<int64_t>(blockIdx.y) * kSplitKeys) {
    const Fp32PassArgs& a = args.a;
    q_full = reinterpret_cast<uint64_t*>(k_tiles + Cfg::kStages * Cfg::kTileBytes);
    full = q_full + 1;
    empty = full + Cfg::kStages;
    kv_head = h / a.group_size;
    split_end = min(a.seq_len, split_begin + kSplitKeys);
    num_tiles = static_cast<int>((split_end - split_begin + kTileKeys - 1) / kTileKeys);
    // The warp index through a shuffle, so that the compiler knows it is uniform over the warp
    // (wgmma under a branch it cannot prove uniform gets serialised).
    warp = __shfl_sync(kFullMask, static_cast<int>(threadIdx.x) / 32, 0);
    lane = static_cast<int>(threadIdx.x) % 32;
  }

  // Floats after the barriers (pass 2's arrays).
  __device__ float* extra() const {
    return reinterpret_cast<float*>(reinterpret_cast<unsigned char*>(q_full) + Cfg::kBarrierBytes);
  }

  __device__ void init_barriers() const {
    if (threadIdx.x == 0) {
      mbarrier_init(q_full, 1);
      for (int s = 0; s < Cfg::kStages; ++s) {
        mbarrier_init(&full[s], 1);
        mbarrier_init(&empty[s], Cfg::kWarps);  // lane 0 of every consumer warp
      }
      asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
  }

  __device__ void produce() const {
    if (lane != 0) return;
    const Fp32PassArgs& a = args.a;
    mbarrier_arrive_expect_tx(q_full, Cfg::kQBytes);
    for (int p = 0; p < kDim / kPanel; ++p) {
      tma_load(q_tile + p * kRows * kRowBytes, &args.q_map, static_cast<int>(h) * kDim + p * kPanel,
               static_cast<int>(a.seq_len - kRows), q_full);
    }
    for (int i = 0; i < num_tiles; ++i) {
      const int stage = i % Cfg::kStages;
      mbarrier_wait(&empty[stage], ((i / Cfg::kStages) & 1) ^ 1);
      mbarrier_arrive_expect_tx(&full[stage], Cfg::kTileBytes);
      unsigned char* dst = k_tiles + stage * Cfg::kTileBytes;
      const int t0 = static_cast<int>(split_begin) + i * kTileKeys;
      for (int p = 0; p < kDim / kPanel; ++p) {
        tma_load(dst + p * kTileKeys * kRowBytes, &args.k_map,
                 static_cast<int>(kv_head) * kDim + p * kPanel, t0, &full[stage]);
      }
    }
  }

  template <typename Body>
  __device__ void consume(Body&& body) const {
    const Fp32PassArgs& a = args.a;
    const int warpgroup = warp / 4, g = lane / 4, t = lane % 4;
    const int64_t wg_row0 = a.seq_len - kRows + 64 * warpgroup;  // positions
    const int64_t warp_row0 = wg_row0 + kRowsPerWarp * (warp % 4);
    const uint32_t q_base = smem_address(q_tile) + 64 * warpgroup * kRowBytes;
    mbarrier_wait(q_full, 0);
    // Issues tile i's S = Q K^T into acc (not waited for).
    const auto issue = [&](WarpScores& acc, int i) {
      const int stage = i % Cfg::kStages;
      mbarrier_wait(&full[stage], (i / Cfg::kStages) & 1);
      issue_scores<kRows, kDim, kTileKeys>(acc, q_base,
                                           smem_address(k_tiles + stage * Cfg::kTileBytes));
    };
    // Tile i's S is complete in acc: its stage goes back to the producer, then the body runs on it,
    // masked where the tile reaches past the warpgroup's first row (tiles ending at or before it
    // run a copy of the body without masking instructions).
    const auto finish = [&](WarpScores& acc, int i) {
#pragma unroll
      for (int j = 0; j < kTileKeys / 2; ++j) fence_operand(acc[j]);
      __syncwarp();
      if (lane == 0) mbarrier_arrive(&empty[i % Cfg::kStages]);
      const int64_t t0 = split_begin + int64_t{i} * kTileKeys;
      if (t0 + kTileKeys - 1 <= wg_row0) {
        body(acc, t0, std::false_type{});
        return;
      }
      // A masked tile starts within 127 keys before the warp's first row: the shift fits an int.
      mask_keys_past_rows<kKeyTiles>(acc, static_cast<int>(t0 - warp_row0), g, t);
      body(acc, t0, std::true_type{});
    };
    // One accumulator, the body after the wgmmas. Issuing tile i + 1's wgmmas before tile i's body
    // (the body on a copy of S, so that ptxas keeps them asynchronous) was measured in session 22:
    // no faster, pass 2 is bound by its sums; pass 1, needing the registers, slower.
    WarpScores s;
    for (int i = 0; i < num_tiles; ++i) {
      issue(s, i);
      wgmma_wait<0>();
      finish(s, i);
    }
  }
};

#endif

// Pass 1: partial [Hq, num_splits, kRows] (see cuda/flex_prefill_fp32_passes.h). Block (head,
// split).
template <int kRows, int kDim>
__global__ void __launch_bounds__(PassConfig<kRows, kDim, false>::kThreads,
                                  PassConfig<kRows, kDim, false>::kMinBlocks)
    hopper_row_stats_kernel(float2* partial, const __grid_constant__ HopperPassArgs args) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Cfg = PassConfig<kRows, kDim, false>;
  extern __shared__ __align__(1024) unsigned char smem[];
  const Pipeline<kRows, kDim, false> pipe(args, smem);
  pipe.init_barriers();
  __syncthreads();
  if (pipe.warp == Cfg::kWarps) {
    pipe.produce();
    return;
  }
  const float factor = args.a.scale_log2;
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.0f, 0.0f};  // rows g and g + 8
  pipe.consume([&](WarpScores& s, int64_t, auto) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      float mx = -INFINITY;
#pragma unroll
      for (int n = 0; n < kKeyTiles; ++n) {
        mx = fmaxf(mx, fmaxf(s[4 * n + 2 * half], s[4 * n + 2 * half + 1]));
      }
      mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, 2));
      // Rounding is monotone and the factor positive: the max of the rounded x is this.
      const float m_new = fmaxf(row_max[half], mx * factor);
      // A row with no visible key so far keeps max -inf: exponentiate against 0 (no NaN).
      const float base = m_new == -INFINITY ? 0.0f : m_new;
      float sum = 0.0f;
#pragma unroll
      for (int n = 0; n < kKeyTiles; ++n) {
        sum += exp2_flush(fmaf(s[4 * n + 2 * half], factor, -base));
        sum += exp2_flush(fmaf(s[4 * n + 2 * half + 1], factor, -base));
      }
      row_sum[half] = row_sum[half] * exp2_flush(row_max[half] - base) + sum;
      row_max[half] = m_new;
    }
  });
  const int g = pipe.lane / 4;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    float sum = row_sum[half];
    sum += __shfl_xor_sync(kFullMask, sum, 1);
    sum += __shfl_xor_sync(kFullMask, sum, 2);
    if (pipe.lane % 4 == 0) {
      const int row = kRowsPerWarp * pipe.warp + g + 8 * half;
      partial[(pipe.h * args.a.num_splits + blockIdx.y) * kRows + row] =
          make_float2(row_max[half], sum);
    }
  }
#else
  __trap();  // launched only on sm_90 (hopper_fp32_passes_run)
#endif
}

// Pass 2: vs kind 0 and slash_part (see cuda/flex_prefill_fp32_passes.h). Block (head, split).
template <int kRows, int kDim>
__global__ void __launch_bounds__(PassConfig<kRows, kDim, true>::kThreads,
                                  PassConfig<kRows, kDim, true>::kMinBlocks)
    hopper_scores_kernel(float* vs, float* slash_part, const float* lse2,
                         const __grid_constant__ HopperPassArgs args) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Cfg = PassConfig<kRows, kDim, true>;
  constexpr int kWarps = Cfg::kWarps;
  constexpr int kThreads = Cfg::kConsumerThreads;
  constexpr int kJs = kKeyTiles + 1;                 // j = n - half in [-1, 7]
  constexpr int kDiagonals = kTileKeys + kRows - 1;  // of one tile
  extern __shared__ __align__(1024) unsigned char smem[];
  const Pipeline<kRows, kDim, true> pipe(args, smem);
  pipe.init_barriers();
  __syncthreads();
  if (pipe.warp == kWarps) {
    pipe.produce();
    return;
  }
  const Fp32PassArgs& a = args.a;
  // parts [2][kWarps][kWarpFloats]: warp w's R_g[k] (k = d + g in [-8, 64)) at [w][g][k + 8], then
  // its column parts [kTileKeys]; diag_sums [kSplitDiagonals].
  float* parts = pipe.extra();
  float* diag_sums = parts + Cfg::kPartsFloats;
  const int tid = static_cast<int>(threadIdx.x);
  const int lane = pipe.lane, g = lane / 4, t = lane % 4;
  const float factor = a.scale_log2;
  for (int e = tid; e < Cfg::kSplitDiagonals; e += kThreads) diag_sums[e] = 0.0f;
  float lse[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    lse[half] = lse2[pipe.h * kRows + kRowsPerWarp * pipe.warp + g + 8 * half];
  }

  pipe.consume([&](WarpScores& s, int64_t t0, auto) {
  // p = 2^(S * factor - lse2) in place (masked keys: 2^-inf = 0).
#pragma unroll
    for (int i = 0; i < kTileKeys / 2; ++i) {
      s[i] = exp2_flush(fmaf(s[i], factor, -lse[(i / 2) % 2]));
    }
    // Columns: the lane's rows g and g + 8, then the butterfly: v[0], v[1] are columns 8 g + 2 t
    // and + 1 of the warp's 16 rows.
    float v[2 * kKeyTiles];
#pragma unroll
    for (int n = 0; n < kKeyTiles; ++n)
#pragma unroll
      for (int c = 0; c < 2; ++c) v[2 * n + c] = s[4 * n + c] + s[4 * n + 2 + c];
    column_butterfly(v, lane);
    // Diagonals: value (n, half, c) is R_g[8 j + 2 t + c] with j = n - half; per (j, c) the lane
    // adds its values, half ascending.
    float diag[2][kJs];
#pragma unroll
    for (int c = 0; c < 2; ++c)
#pragma unroll
      for (int j = 0; j < kJs; ++j) diag[c][j] = 0.0f;
#pragma unroll
    for (int half = 0; half < 2; ++half)
#pragma unroll
      for (int n = 0; n < kKeyTiles; ++n)
#pragma unroll
        for (int c = 0; c < 2; ++c) diag[c][n - half + 1] += s[4 * n + 2 * half + c];
    // Tile i's parts go to buffer i % 2: every thread has combined tile i - 2 (that buffer's last
    // contents) before the barrier of tile i - 1.
    const int i = static_cast<int>((t0 - pipe.split_begin) / kTileKeys);
    const float* buffer = parts + (i % 2) * kWarps * kWarpFloats;
    float* warp_parts = parts + ((i % 2) * kWarps + pipe.warp) * kWarpFloats;
#pragma unroll
    for (int j = 0; j < kJs; ++j) {
      *reinterpret_cast<float2*>(warp_parts + g * kRowParts + 8 * j + 2 * t) =
          make_float2(diag[0][j], diag[1][j]);
    }
    *reinterpret_cast<float2*>(warp_parts + 8 * kRowParts + 8 * g + 2 * t) =
        make_float2(v[0], v[1]);
    named_barrier_sync<1>(kThreads);
    // The combine: job e < kDiagonals is tile diagonal e (key c, tile row r, c - r + kRows - 1 =
    // e), in-warp diagonal d = e - (kRows - 1) + 16 w of warp w: R_g[d + g] of its rows g by a
    // tree, warps ascending; job kDiagonals + x is column x, warps ascending. Entry i * 64 + e of
    // diag_sums is job e's of tile i and job e + 64's of tile i - 1, which every thread has done
    // before the barrier above.
    for (int job = tid; job < kDiagonals + kTileKeys; job += kThreads) {
      if (job >= kDiagonals) {
        const int x = job - kDiagonals;
        if (t0 + x < a.seq_len) {
          float col_sum = buffer[8 * kRowParts + x];
#pragma unroll
          for (int w = 1; w < kWarps; ++w) col_sum += buffer[w * kWarpFloats + 8 * kRowParts + x];
          vs[(pipe.h * 2) * a.seq_len + t0 + x] = col_sum * (1.0f / static_cast<float>(kRows));
        }
        continue;
      }
      float sum = 0.0f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        const int d = job - (kRows - 1) + kRowsPerWarp * w;
        if (d < -(kRowsPerWarp - 1) || d >= kTileKeys) continue;
        // R_g[d + g] at rows[g * (kRowParts + 1)]; zero where d + g lies outside [-8, 64).
        const float* rows = buffer + w * kWarpFloats + d + 8;
        float r[8];
#pragma unroll
        for (int gg = 0; gg < 8; ++gg) {
          r[gg] = d + gg >= -8 && d + gg < kTileKeys ? rows[gg * (kRowParts + 1)] : 0.0f;
        }
        sum = sum + (((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7])));
      }
      diag_sums[i * kTileKeys + job] += sum;
    }
  });
  named_barrier_sync<1>(kThreads);
  float* out = slash_part + (pipe.h * a.num_splits + blockIdx.y) * Cfg::kSplitDiagonals;
  for (int e = tid; e < Cfg::kSplitDiagonals; e += kThreads) out[e] = diag_sums[e];
#else
  __trap();  // launched only on sm_90 (hopper_fp32_passes_run)
#endif
}

template <int kRows, int kDim>
HopperPassArgs hopper_args(const Fp32PassArgs& a) {
  return {a, bf16_tensor_map(a.q, a.seq_len, a.num_q_heads * kDim, kRows),
          bf16_tensor_map(a.k, a.seq_len, a.num_kv_heads * kDim, kTileKeys)};
}

template <int kRows, int kDim>
void row_stats_for(float2* partial, const Fp32PassArgs& a, cudaStream_t stream) {
  using Cfg = PassConfig<kRows, kDim, false>;
  const auto kernel = hopper_row_stats_kernel<kRows, kDim>;
  MF_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                     static_cast<int>(Cfg::kSmemBytes)));
  const dim3 grid(static_cast<unsigned>(a.num_q_heads), static_cast<unsigned>(a.num_splits));
  kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(partial, hopper_args<kRows, kDim>(a));
  MF_CUDA_CHECK_LAUNCH();
}

template <int kRows, int kDim>
void scores_for(float* vs, float* slash_part, const float* lse2, const Fp32PassArgs& a,
                cudaStream_t stream) {
  using Cfg = PassConfig<kRows, kDim, true>;
  const auto kernel = hopper_scores_kernel<kRows, kDim>;
  MF_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                     static_cast<int>(Cfg::kSmemBytes)));
  const dim3 grid(static_cast<unsigned>(a.num_q_heads), static_cast<unsigned>(a.num_splits));
  kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(vs, slash_part, lse2,
                                                           hopper_args<kRows, kDim>(a));
  MF_CUDA_CHECK_LAUNCH();
}

}  // namespace

bool hopper_fp32_passes_run(const Fp32PassArgs& a, int device_major) {
  // TMA coordinates are 32-bit; the boxes start at 16-byte aligned rows.
  return device_major == 9 && (a.head_dim == 64 || a.head_dim == 128) &&
         (a.block_size == 64 || a.block_size == 128) && a.seq_len < (int64_t{1} << 31) &&
         aligned_to(16, a.q, a.k);
}

void launch_hopper_row_stats(float2* partial, const Fp32PassArgs& args, cudaStream_t stream) {
  if (args.block_size == 128) {
    if (args.head_dim == 128) return row_stats_for<128, 128>(partial, args, stream);
    return row_stats_for<128, 64>(partial, args, stream);
  }
  if (args.head_dim == 128) return row_stats_for<64, 128>(partial, args, stream);
  return row_stats_for<64, 64>(partial, args, stream);
}

void launch_hopper_scores(float* vs, float* slash_part, const float* lse2, const Fp32PassArgs& args,
                          cudaStream_t stream) {
  if (args.block_size == 128) {
    if (args.head_dim == 128) return scores_for<128, 128>(vs, slash_part, lse2, args, stream);
    return scores_for<128, 64>(vs, slash_part, lse2, args, stream);
  }
  if (args.head_dim == 128) return scores_for<64, 128>(vs, slash_part, lse2, args, stream);
  return scores_for<64, 64>(vs, slash_part, lse2, args, stream);
}

}  // namespace moeforge::cuda
